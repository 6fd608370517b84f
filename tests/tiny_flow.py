"""Tiny random flow-matching pipelines (SD3, SD3.5, FLUX.1-dev, FLUX.1-schnell) built offline.

The networks take diffusers' own tiny test configs (``tests/pipelines/stable_diffusion_3`` and
``tests/pipelines/flux`` in the diffusers repository); the schedulers take the real models' configs
(SD3/SD3.5: ``shift=3.0``; FLUX.1-dev: dynamic shift; FLUX.1-schnell: no shift). Where diffusers'
tests download tokenizers from the hub, these use the real CLIP BPE tokenizer the suite builds
(``clip_tokenizer``) and a small T5 tokenizer made with the ``tokenizers`` library. Each ``build_*``
saves a diffusers folder that loads with ``from_pretrained`` like a user's.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The real models' scheduler configs (their hub folders' scheduler_config.json).
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                      "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}

# The T5 tokenizer's words (each one token, with SentencePiece's word-start mark); any other word
# still tokenizes, letter by letter.
T5_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "green", "circle", "square", "triangle", "on",
            "background", "the", "and", "with", "small", "large"]


def t5_tokenizer():
    """A T5 tokenizer (Unigram, SentencePiece-style word starts, ``</s>`` appended) built with ``tokenizers``
    and wrapped in ``T5TokenizerFast`` so that it saves and loads like the real one."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    # T5's layout: <pad> 0, </s> 1, <unk> 2, then the pieces scored by log-probability.
    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -2.0}
    scores |= {"\u2581" + w: -5.0 for w in T5_WORDS}
    scores |= {c: -10.0 for c in letters} | {"\u2581" + c: -10.5 for c in letters if "\u2581" + c not in scores}
    tok = Tokenizer(Unigram(list(scores.items()), unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)


def _t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg)


def _clip_encoder(tokenizer, *, with_projection: bool):
    """diffusers' tiny CLIP text encoder (hidden 32, 5 layers, 4 heads, intermediate 37, projection 32)
    over the real CLIP vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=5,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
                         layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _vae(latent_channels: int):
    """diffusers' tiny SD3/FLUX VAE: one level (no downsampling), with SD3's shift and scaling factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def sd3_pipeline(*, sd35: bool = False, t5: bool = True, seed: int = 0):
    """StableDiffusion3Pipeline in memory: SD3-Medium's layout, or SD3.5's (``sd35``: a dual-attention
    layer and RMS QK-norm); ``t5=False`` drops the third text encoder as ``text_encoder_3=None`` does."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from clip_tokenizer import load as load_clip_tokenizer

    torch.manual_seed(seed)
    extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if sd35 else {}
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4, **extra)
    tokenizer, tokenizer_2 = load_clip_tokenizer(), load_clip_tokenizer(pad_token="!")
    text_encoder = _clip_encoder(tokenizer, with_projection=True)
    text_encoder_2 = _clip_encoder(tokenizer_2, with_projection=True)
    tokenizer_3 = t5_tokenizer() if t5 else None
    text_encoder_3 = _t5_encoder(len(tokenizer_3)) if t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=_vae(4),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def flux_pipeline(*, dev: bool = True, seed: int = 0):
    """FluxPipeline in memory: FLUX.1-dev's layout (guidance embedding, dynamic shift) or, with
    ``dev=False``, FLUX.1-schnell's (no guidance embedding, no shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from clip_tokenizer import load as load_clip_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=dev)
    tokenizer = load_clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if dev else FLUX_SCHNELL_SCHEDULER))
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(1),
                        text_encoder=_clip_encoder(tokenizer, with_projection=False), tokenizer=tokenizer,
                        text_encoder_2=_t5_encoder(len(tokenizer_2)), tokenizer_2=tokenizer_2)


def build_sd3(folder: Path, *, sd35: bool = False, t5: bool = True, seed: int = 0) -> Path:
    """``sd3_pipeline`` saved as a diffusers folder."""
    sd3_pipeline(sd35=sd35, t5=t5, seed=seed).save_pretrained(folder)
    return folder


def build_flux(folder: Path, *, dev: bool = True, seed: int = 0) -> Path:
    """``flux_pipeline`` saved as a diffusers folder."""
    flux_pipeline(dev=dev, seed=seed).save_pretrained(folder)
    return folder


def absent_components(folder: Path) -> dict[str, None]:
    """The components ``model_index.json`` lists as ``[null, null]`` that the pipeline class requires.

    ``save_pretrained`` writes a dropped T5 (``text_encoder_3=None``) that way, but ``from_pretrained``
    refuses such a folder unless each is passed as ``None`` again, as users drop T5 at load time."""
    import json

    from diffusers import DiffusionPipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())
    cls = getattr(__import__("diffusers"), index["_class_name"], DiffusionPipeline)
    optional = set(getattr(cls, "_optional_components", []))
    return {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None] and k not in optional}


def load(folder: Path, **kwargs):
    """A saved folder loaded back through diffusers' generic loader, as a user's folder is (fp32, CPU)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, **{**absent_components(folder), **kwargs})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flow_model(folder: Path, **kwargs):
    """An fp32 CPU FlowModel over the tiny folder, built directly (the tests of the adapter itself)."""
    from npinv.flow_model import FlowModel

    return FlowModel(load(folder), str(folder), torch.device("cpu"), torch.float32, **kwargs)


def circle_image(size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: a red circle on blue, the tests' real-world-ish picture."""
    import numpy as np

    from npinv.scenes import Scene

    pixels = np.asarray(Scene("circle", "red", "blue", 0.5).render(size), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]
