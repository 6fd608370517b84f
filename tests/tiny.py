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


# -- Real-world-shaped pipelines: Stable Diffusion's block layouts and tokenizer at tiny widths ----------------------


def _clip_text_encoder(tokenizer, hidden: int, *, with_projection: bool = False, projection_dim: int = 32,
                       layers: int = 2):
    """A CLIP text encoder with the real vocabulary (49,408 tokens) and 77 positions, at a tiny width."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                         hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         projection_dim=projection_dim)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _sd_vae(sample_size: int):
    """SD's AutoencoderKL layout (4 encoder/decoder levels, 8x downsampling, 2 resnets a level, a mid
    attention) at tiny widths."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                         layers_per_block=2, latent_channels=4, norm_num_groups=4, sample_size=sample_size,
                         scaling_factor=0.18215)


def sd15_layout_pipeline(folder: Path | None = None, seed: int = 0):
    """Stable Diffusion 1.5's exact structure at tiny widths, in memory.

    UNet: CrossAttnDownBlock2D x3 + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x3,
    ``layers_per_block=2`` as in SD (two resnets and transformers a down level, three an up level),
    one transformer layer per block, conv in/out projections (``use_linear_projection=False``),
    77-token context, ``sample_size=64`` so the default resolution is 512 px (latent 64x64; attention
    queries 64², 32², 16² and 8² in the mid block). Widths (8, 8, 16, 16) instead of (320, 640,
    1280, 1280); heads (1, 2, 2, 2) instead of 8 (one head at 64x64, where the 4096x4096 softmax
    is most of the CPU time); context width 32 instead of 768. Text encoder: CLIPTextModel
    with the real CLIP BPE tokenizer (pads with EOS, as SD 1.x). VAE: SD's 4-level AutoencoderKL.
    ``folder`` is unused (the tokenizer comes from the shared cache); kept for symmetry with ``sd_pipeline``.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from clip_tokenizer import load as load_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, 32)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=(1, 2, 2, 2), norm_num_groups=4, use_linear_projection=False)
    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER)
    return StableDiffusionPipeline(vae=_sd_vae(512), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_sd15_layout(folder: Path, seed: int = 0) -> Path:
    """``sd15_layout_pipeline`` saved as a diffusers folder."""
    sd15_layout_pipeline(folder, seed=seed).save_pretrained(folder)
    return folder


def sdxl_layout_pipeline(folder: Path | None = None, seed: int = 0):
    """SDXL base's structure at tiny widths, in memory.

    UNet: DownBlock2D, CrossAttnDownBlock2D x2; UNetMidBlock2DCrossAttn; CrossAttnUpBlock2D x2, UpBlock2D;
    ``layers_per_block=2``, linear projections, text_time added conditioning (6 size/crop ids plus
    the second encoder's pooled projection), ``sample_size=128`` so the default resolution is
    1024 px (latent 128x128; attention queries 64² and 32², none at the first level). Tiny widths
    (8, 8, 16) instead of (320, 640, 1280), heads (1, 1, 2) instead of (5, 10, 20), transformer
    layers (1, 1, 2) instead of (1, 2, 10).
    Two text encoders with the real CLIP tokenizers: CLIPTextModel (pads with EOS) and
    CLIPTextModelWithProjection (pads with "!", id 0), of different widths (32 and 64; the context
    is their concatenation, 96). ``folder`` is unused, as in ``sd15_layout_pipeline``.
    """
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from clip_tokenizer import load as load_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    tokenizer_2 = load_clip_tokenizer(pad_token="!")
    text_encoder = _clip_text_encoder(tokenizer, 32)
    text_encoder_2 = _clip_text_encoder(tokenizer_2, 64, with_projection=True, projection_dim=32)
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(8, 8, 16), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=96, attention_head_dim=(1, 1, 2),
        norm_num_groups=4, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER)
    return StableDiffusionXLPipeline(vae=_sd_vae(1024), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def build_sdxl_layout(folder: Path, seed: int = 0) -> Path:
    """``sdxl_layout_pipeline`` saved as a diffusers folder."""
    sdxl_layout_pipeline(folder, seed=seed).save_pretrained(folder)
    return folder
