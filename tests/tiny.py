"""Tiny random Stable Diffusion pipelines built from configs (no download), one per family."""

from __future__ import annotations

from pathlib import Path

import torch

from npinv.training import SD1_SCHEDULER
from npinv.vocab import write_tokenizer

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "circle", "square", "on", "background", "the"]


def _tokenizer(folder: Path, max_length: int = 77):
    from transformers import CLIPTokenizer

    write_tokenizer(folder, WORDS, max_length=max_length)
    return CLIPTokenizer.from_pretrained(folder)


def _text_encoder(tokenizer, hidden: int, with_projection: bool = False, projection_dim: int = 32, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2,
                         max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=32)


def sd_pipeline(folder: Path, *, prediction_type: str = "epsilon", seed: int = 0, text_layers: int = 2,
                layers_per_block: int = 1):
    """SD 1.x / 2.x-shaped (v-prediction for 2.x) tiny pipeline in memory; ``folder`` receives the tokenizer files."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder / "_tok")
    text_encoder = _text_encoder(tokenizer, 32, layers=text_layers)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = _vae()
    scheduler = DDIMScheduler.from_config({**SD1_SCHEDULER, "prediction_type": prediction_type})
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_sd(folder: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """``sd_pipeline`` saved as a diffusers folder."""
    sd_pipeline(folder, prediction_type=prediction_type, seed=seed).save_pretrained(folder)
    return folder


def sdxl_pipeline(folder: Path, *, seed: int = 0, text_layers: int = 2, text_layers_2: int = 2):
    """SDXL-shaped tiny pipeline in memory: two text encoders, text_time added conditioning.

    ``folder`` receives the tokenizer files. diffusers' ``infer_diffusers_model_type`` only reports
    "xl_base" when the second encoder has at least 10 layers (it looks for ``resblocks.9``).
    """
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder / "_tok")
    tokenizer_2 = _tokenizer(folder / "_tok2")
    text_encoder = _text_encoder(tokenizer, 32, layers=text_layers)
    # Different widths: diffusers' single-file loader tells the two encoders apart by hidden size.
    text_encoder_2 = _text_encoder(tokenizer_2, 64, with_projection=True, projection_dim=32, layers=text_layers_2)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=96, attention_head_dim=(2, 4), norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        use_linear_projection=True)
    vae = _vae()
    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def build_sdxl(folder: Path, seed: int = 0) -> Path:
    """``sdxl_pipeline`` saved as a diffusers folder."""
    sdxl_pipeline(folder, seed=seed).save_pretrained(folder)
    return folder
