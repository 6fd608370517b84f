"""Export diffusers SD3 / SD3.5 / FLUX.1 models as original-format single ``.safetensors`` files.

Test utility, the flow-matching counterpart of ``ldm_export``: it lets npinv's single-file path for flow
models (``StableDiffusion3Pipeline.from_single_file``; ``FluxTransformer2DModel.from_single_file`` +
``FluxPipeline.from_pretrained``) run offline on tiny random models. Each function is the exact inverse of
a diffusers converter in ``diffusers/loaders/single_file_utils.py``:

* ``sd3_transformer_to_original`` of ``convert_sd3_transformer_checkpoint_to_diffusers``: MMDiT names
  (``joint_blocks.N.x_block`` / ``context_block``, ``attn.qkv`` = q|k|v stacked, ``attn.ln_q``,
  ``attn2`` for SD3.5's dual attention, ``adaLN_modulation.1``, ``mlp.fc1``/``fc2``, ``x_embedder``,
  ``t_embedder``, ``y_embedder``, ``pos_embed``, ``final_layer``). The last block's context stream and the
  final layer store their modulation as shift|scale, diffusers' as scale|shift.
* ``flux_transformer_to_original`` of ``convert_flux_transformer_checkpoint_to_diffusers``: BFL names
  (``double_blocks.N.img_attn.qkv``, ``img_mod.lin``, ``img_attn.norm.query_norm.scale``, ``img_mlp.0``,
  ``single_blocks.N.linear1`` = q|k|v|mlp stacked, ``linear2``, ``time_in``, ``vector_in``,
  ``guidance_in``, ``txt_in``, ``img_in``, ``final_layer``).
* The VAE as ``first_stage_model.*`` (``ldm_export.vae_to_ldm``); SD3's text encoders as
  ``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*`` and
  ``text_encoders.t5xxl.transformer.*`` in transformers' own names, as Stability's files hold them.

The layouts written are the released files': Stability's ``sd3_medium.safetensors`` (MMDiT under
``model.diffusion_model.`` + VAE; ``_incl_clips``/``_t5xxl`` variants add the text encoders) and BFL's
``flux1-dev.safetensors`` (the transformer alone, no prefix).

What diffusers 0.42 does with them, and the tests rely on:

* ``config=`` a local diffusers folder skips the file-type detection (``infer_diffusers_model_type``):
  every component config comes from the folder. Without it, detection keys on
  ``joint_blocks.0.context_block.adaLN_modulation.1.bias`` of width 9216 (SD3's 1536 x 6) for SD3 (a tiny
  SD3 reads as SD 1.x) and ``double_blocks.0.img_attn.norm.key_norm.scale`` for FLUX.
* ``StableDiffusion3Pipeline.from_single_file`` always reads the VAE from the file (``first_stage_model.``
  or ``vae.``); a text encoder absent from the file comes from the config folder's weights.
* SD3's CLIP-L from a file gets an identity ``text_projection`` (diffusers overwrites the file's).
* ``convert_flux_transformer_checkpoint_to_diffusers`` splits ``single_blocks.N.linear1`` at FLUX.1's
  width, 3072, written into the function (every released FLUX.1 has it): ``flux_width`` lets a tiny
  model's file through that one split.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from safetensors.torch import save_file

from ldm_export import vae_to_ldm

SD3_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
FLUX1_WIDTH = 3072  # the width diffusers' FLUX converter assumes


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """scale|shift <-> shift|scale (the swap is its own inverse)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class _Taker:
    """Pops a model's state dict key by key, so that a key no rule names is an error, not a silent drop."""

    def __init__(self, model) -> None:
        self.state = dict(model.state_dict())

    def __call__(self, key: str) -> torch.Tensor:
        return self.state.pop(key)

    def cat(self, *keys: str) -> torch.Tensor:
        return torch.cat([self.state.pop(k) for k in keys], dim=0)

    def done(self, what: str) -> None:
        if self.state:
            raise KeyError(f"{what}: no original name for {sorted(self.state)}")


def sd3_transformer_to_original(transformer, prefix: str = SD3_PREFIX) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel (SD3 / SD3.5) state dict -> MMDiT keys under ``prefix``."""
    take = _Taker(transformer)
    out: dict[str, torch.Tensor] = {
        "pos_embed": take("pos_embed.pos_embed"),
        "x_embedder.proj.weight": take("pos_embed.proj.weight"),
        "x_embedder.proj.bias": take("pos_embed.proj.bias"),
        "context_embedder.weight": take("context_embedder.weight"),
        "context_embedder.bias": take("context_embedder.bias"),
        "final_layer.linear.weight": take("proj_out.weight"),
        "final_layer.linear.bias": take("proj_out.bias"),
        "final_layer.adaLN_modulation.1.weight": _swap_halves(take("norm_out.linear.weight")),
        "final_layer.adaLN_modulation.1.bias": _swap_halves(take("norm_out.linear.bias")),
    }
    for ours, theirs in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
        for n, m in ((1, 0), (2, 2)):
            for p in ("weight", "bias"):
                out[f"{theirs}.mlp.{m}.{p}"] = take(f"time_text_embed.{ours}.linear_{n}.{p}")
    num_layers = transformer.config.num_layers
    for i in range(num_layers):
        b, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == num_layers - 1  # SD3's last block updates no text tokens (context_pre_only)
        dual = f"{b}attn2.to_q.weight" in take.state  # SD3.5's dual attention
        for p in ("weight", "bias"):
            out[f"{x}attn.qkv.{p}"] = take.cat(*(f"{b}attn.to_{n}.{p}" for n in "qkv"))
            out[f"{c}attn.qkv.{p}"] = take.cat(*(f"{b}attn.add_{n}_proj.{p}" for n in "qkv"))
            out[f"{x}attn.proj.{p}"] = take(f"{b}attn.to_out.0.{p}")
            out[f"{x}adaLN_modulation.1.{p}"] = take(f"{b}norm1.linear.{p}")
            context_mod = take(f"{b}norm1_context.linear.{p}")
            out[f"{c}adaLN_modulation.1.{p}"] = _swap_halves(context_mod) if last else context_mod
            out[f"{x}mlp.fc1.{p}"] = take(f"{b}ff.net.0.proj.{p}")
            out[f"{x}mlp.fc2.{p}"] = take(f"{b}ff.net.2.{p}")
            if not last:
                out[f"{c}attn.proj.{p}"] = take(f"{b}attn.to_add_out.{p}")
                out[f"{c}mlp.fc1.{p}"] = take(f"{b}ff_context.net.0.proj.{p}")
                out[f"{c}mlp.fc2.{p}"] = take(f"{b}ff_context.net.2.{p}")
            if dual:
                out[f"{x}attn2.qkv.{p}"] = take.cat(*(f"{b}attn2.to_{n}.{p}" for n in "qkv"))
                out[f"{x}attn2.proj.{p}"] = take(f"{b}attn2.to_out.0.{p}")
        for ours, theirs in (("norm_q", f"{x}attn.ln_q"), ("norm_k", f"{x}attn.ln_k"),
                             ("norm_added_q", f"{c}attn.ln_q"), ("norm_added_k", f"{c}attn.ln_k")):
            if f"{b}attn.{ours}.weight" in take.state:  # SD3.5's RMS QK-norm
                out[f"{theirs}.weight"] = take(f"{b}attn.{ours}.weight")
        for ours in ("norm_q", "norm_k"):
            if f"{b}attn2.{ours}.weight" in take.state:
                out[f"{x}attn2.ln_{ours[-1]}.weight"] = take(f"{b}attn2.{ours}.weight")
    take.done("SD3 transformer")
    return {prefix + k: v for k, v in out.items()}


def flux_transformer_to_original(transformer, prefix: str = "") -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel (dev or schnell) state dict -> BFL keys under ``prefix`` (BFL's files: none;
    ComfyUI's checkpoints: ``model.diffusion_model.``)."""
    take = _Taker(transformer)
    out: dict[str, torch.Tensor] = {}
    for p in ("weight", "bias"):
        out[f"txt_in.{p}"] = take(f"context_embedder.{p}")
        out[f"img_in.{p}"] = take(f"x_embedder.{p}")
        out[f"final_layer.linear.{p}"] = take(f"proj_out.{p}")
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(take(f"norm_out.linear.{p}"))
        for ours, theirs in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"),
                             ("guidance_embedder", "guidance_in")):
            if f"time_text_embed.{ours}.linear_1.{p}" in take.state:  # no guidance embedder in schnell
                out[f"{theirs}.in_layer.{p}"] = take(f"time_text_embed.{ours}.linear_1.{p}")
                out[f"{theirs}.out_layer.{p}"] = take(f"time_text_embed.{ours}.linear_2.{p}")
    for i in range(transformer.config.num_layers):
        b, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{d}img_mod.lin.{p}"] = take(f"{b}norm1.linear.{p}")
            out[f"{d}txt_mod.lin.{p}"] = take(f"{b}norm1_context.linear.{p}")
            out[f"{d}img_attn.qkv.{p}"] = take.cat(*(f"{b}attn.to_{n}.{p}" for n in "qkv"))
            out[f"{d}txt_attn.qkv.{p}"] = take.cat(*(f"{b}attn.add_{n}_proj.{p}" for n in "qkv"))
            out[f"{d}img_attn.proj.{p}"] = take(f"{b}attn.to_out.0.{p}")
            out[f"{d}txt_attn.proj.{p}"] = take(f"{b}attn.to_add_out.{p}")
            out[f"{d}img_mlp.0.{p}"] = take(f"{b}ff.net.0.proj.{p}")
            out[f"{d}img_mlp.2.{p}"] = take(f"{b}ff.net.2.{p}")
            out[f"{d}txt_mlp.0.{p}"] = take(f"{b}ff_context.net.0.proj.{p}")
            out[f"{d}txt_mlp.2.{p}"] = take(f"{b}ff_context.net.2.{p}")
        out[f"{d}img_attn.norm.query_norm.scale"] = take(f"{b}attn.norm_q.weight")
        out[f"{d}img_attn.norm.key_norm.scale"] = take(f"{b}attn.norm_k.weight")
        out[f"{d}txt_attn.norm.query_norm.scale"] = take(f"{b}attn.norm_added_q.weight")
        out[f"{d}txt_attn.norm.key_norm.scale"] = take(f"{b}attn.norm_added_k.weight")
    for i in range(transformer.config.num_single_layers):
        b, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{s}modulation.lin.{p}"] = take(f"{b}norm.linear.{p}")
            out[f"{s}linear1.{p}"] = take.cat(*(f"{b}attn.to_{n}.{p}" for n in "qkv"), f"{b}proj_mlp.{p}")
            out[f"{s}linear2.{p}"] = take(f"{b}proj_out.{p}")
        out[f"{s}norm.query_norm.scale"] = take(f"{b}attn.norm_q.weight")
        out[f"{s}norm.key_norm.scale"] = take(f"{b}attn.norm_k.weight")
    take.done("FLUX transformer")
    return {prefix + k: v for k, v in out.items()}


def _hf_text_encoder(model, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers text encoder under ``prefix`` in its own names (``text_model.`` kept or restored:
    transformers >= 5.6 flattens CLIPTextModel, original files never are)."""
    state = model.state_dict()
    if type(model).__name__.startswith("CLIP") and not hasattr(model, "text_model"):
        state = {("text_model." + k if k != "text_projection.weight" else k): v for k, v in state.items()}
    return {prefix + k: v for k, v in state.items() if not k.endswith("position_ids")}


def sd3_to_original_state_dict(pipe, *, vae: bool = True, text_encoders: bool = False) -> dict[str, torch.Tensor]:
    """A StableDiffusion3Pipeline as one original-format state dict: the MMDiT, the VAE (``vae``) and,
    with ``text_encoders``, CLIP-L, CLIP-G and T5 (when the pipeline has it)."""
    state = sd3_transformer_to_original(pipe.transformer)
    if vae:
        state.update(vae_to_ldm(pipe.vae))
    if text_encoders:
        state.update(_hf_text_encoder(pipe.text_encoder, CLIP_L_PREFIX))
        state.update(_hf_text_encoder(pipe.text_encoder_2, CLIP_G_PREFIX))
        if pipe.text_encoder_3 is not None:
            state.update(_hf_text_encoder(pipe.text_encoder_3, T5_PREFIX))
    return state


def sd3_pipeline_for_files(*, seed: int = 0):
    """A tiny StableDiffusion3Pipeline whose all-in-one file diffusers reads back as it reads SD3's: tiny_flow's
    SD3 but for the text encoders. diffusers tells CLIP-L from CLIP-G in a file by their widths (768 and
    1280 in SD3), so here they are 12 and 20 wide (together the transformer's 32-wide text input), and
    CLIP-L's projection is the identity that diffusers gives it from a file (SD3 takes CLIP-L's pooled
    output unprojected). Every weight is random, so that a swapped or dropped tensor shows."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from clip_tokenizer import load as load_clip_tokenizer
    from tiny_flow import SD3_SCHEDULER, _t5_encoder, _vae, t5_tokenizer

    torch.manual_seed(seed)

    def clip(tokenizer, width: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=width, layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    tokenizer, tokenizer_2, tokenizer_3 = load_clip_tokenizer(), load_clip_tokenizer(pad_token="!"), t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                          num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                          pooled_projection_dim=32, out_channels=4),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=_vae(4),
        text_encoder=clip(tokenizer, 12), tokenizer=tokenizer, text_encoder_2=clip(tokenizer_2, 20), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(len(tokenizer_3)), tokenizer_3=tokenizer_3)
    with torch.no_grad():
        for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            for p in part.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(12))
    return pipe


def save_single_file(state: dict[str, torch.Tensor], path) -> None:
    """Write ``state`` as safetensors (each tensor its own copy: T5's tied embeddings share storage)."""
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, os.fspath(path),
              metadata={"format": "pt"})


def export_sd3_single_file(pipe, path, *, vae: bool = True, text_encoders: bool = False) -> None:
    """Write an SD3 pipeline as Stability's single-file layout (see ``sd3_to_original_state_dict``)."""
    save_single_file(sd3_to_original_state_dict(pipe, vae=vae, text_encoders=text_encoders), path)


def export_flux_single_file(pipe, path, *, prefix: str = "") -> None:
    """Write a FLUX pipeline's transformer as BFL's single-file layout (the transformer only)."""
    save_single_file(flux_transformer_to_original(pipe.transformer, prefix), path)


@contextlib.contextmanager
def flux_width(width: int) -> Iterator[None]:
    """Inside it, diffusers' FLUX converter splits ``single_blocks.N.linear1`` (q|k|v|mlp) at ``width``
    instead of FLUX.1's 3072, its one hard-coded size; everything else in the conversion runs as shipped."""
    from diffusers.loaders import single_file_utils

    flux1 = (FLUX1_WIDTH,) * 3 + (4 * FLUX1_WIDTH,)

    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def split(tensor, sizes, dim=0):
            if isinstance(sizes, (tuple, list)) and tuple(sizes) == flux1:
                sizes = (width,) * 3 + (tensor.shape[dim] - 3 * width,)
            return torch.split(tensor, sizes, dim)

    saved = single_file_utils.torch
    single_file_utils.torch = _Torch()
    try:
        yield
    finally:
        single_file_utils.torch = saved
