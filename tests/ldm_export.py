"""Export a diffusers Stable Diffusion (1.x or XL) pipeline as one original-format ``.safetensors`` file.

Test utility: it lets the single-file loading path (``StableDiffusionPipeline.from_single_file`` /
``StableDiffusionXLPipeline.from_single_file``) be exercised offline with tiny random-weight models.
It is the inverse of diffusers' own LDM -> diffusers converters in
``diffusers/loaders/single_file_utils.py`` (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``).

Key layout written (the CompVis / "stable-diffusion-webui" layout):

* UNet -> ``model.diffusion_model.*`` (``input_blocks`` / ``middle_block`` / ``output_blocks``,
  ``time_embed``, ``out``, and ``label_emb`` for SDXL's ``text_time`` addition embedding).
* VAE -> ``first_stage_model.*`` (``encoder.down.N.block.M``, ``mid.block_1``, ``mid.attn_1`` with
  1x1-conv attention weights, ``decoder.up.N`` in reversed order, ...).
* SD 1.x text encoder (``CLIPTextModel``) -> ``cond_stage_model.transformer.text_model.*``.
* SDXL ``text_encoder`` (``CLIPTextModel``) -> ``conditioner.embedders.0.transformer.text_model.*``;
  ``text_encoder_2`` (``CLIPTextModelWithProjection``) -> ``conditioner.embedders.1.model.*`` in OpenCLIP
  naming (``transformer.resblocks.N.attn.in_proj_weight`` = q|k|v stacked, ``ln_1``, ``mlp.c_fc``,
  ``positional_embedding``, ``ln_final``, ``text_projection`` stored transposed).

Loading it back offline::

    pipe.save_pretrained(folder)               # configs, tokenizer(s), scheduler
    export_single_file(pipe, "model.safetensors")
    StableDiffusionPipeline.from_single_file("model.safetensors", config=folder, local_files_only=True)

With ``config=`` a local diffusers folder, diffusers (0.42) takes every component config, the
tokenizers and the scheduler from that folder; the original LDM yaml (``original_config``) is only
fetched when ``original_config=`` is passed, so nothing touches the network. (Do not pass
``original_config`` together with ``config``: models reject both at once.)

Things diffusers relies on when reading the file back, which the exported models must respect:

* Without ``config=``, ``infer_diffusers_model_type`` picks the diffusers repo to take configs from:
  a file is ``"xl_base"`` only if ``conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias``
  exists, i.e. ``text_encoder_2`` has at least 10 layers; otherwise it reads as ``"v1"``. Callers that
  use this detection to choose SD vs SDXL need a >= 10-layer ``text_encoder_2``.
* SDXL: the two text encoders are told apart by the width of their position embeddings, so
  ``text_encoder`` and ``text_encoder_2`` must have different ``hidden_size`` (768 vs 1280 for real
  SDXL); with equal widths ``text_encoder_2`` would be read from ``embedders.0``.
* The UNet converter needs one int ``layers_per_block`` for all blocks and a cross-attention mid
  block (``middle_block.0/1/2`` = resnet/attention/resnet).
* The OpenCLIP converter splits ``in_proj_*`` by ``text_projection.shape[0]`` (= hidden size).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """Replace the leading module name of ``rest`` (e.g. ``norm1.weight``) using ``table``."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise KeyError(rest)


def _layers_per_block(config) -> int:
    lpb = config["layers_per_block"]
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ValueError(f"diffusers' LDM converter needs one layers_per_block for all blocks, got {lpb}")
        lpb = lpb[0]
    return int(lpb)


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict -> LDM ``model.diffusion_model.*`` keys."""
    config = unet.config
    lpb = _layers_per_block(config)
    per_block = lpb + 1  # LDM indices per diffusers block: lpb layers + down/upsampler slot
    up_has_attention = [hasattr(block, "attentions") for block in unet.up_blocks]
    if config.get("mid_block_type") not in ("UNetMidBlock2DCrossAttn", None) or unet.mid_block is None:
        raise ValueError(f"unsupported mid block {config.get('mid_block_type')!r}")

    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    if config.get("addition_embed_type") == "text_time":
        fixed["add_embedding.linear_1."] = "label_emb.0.0."
        fixed["add_embedding.linear_2."] = "label_emb.0.2."
    if config.get("class_embed_type") in ("timestep", "projection"):
        fixed["class_embedding.linear_1."] = "label_emb.0.0."
        fixed["class_embedding.linear_2."] = "label_emb.0.2."

    def name(key: str) -> str:
        for old, new in fixed.items():
            if key.startswith(old):
                return new + key[len(old) :]
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + b * per_block + j
            if kind == "resnets":
                return f"input_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}"
            return f"input_blocks.{index}.1.{rest}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            return f"input_blocks.{1 + int(m[1]) * per_block + lpb}.0.op.{m[2]}"
        if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            return f"middle_block.{2 * int(m[1])}.{_rename_head(m[2], _UNET_RESNET)}"
        if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            return f"middle_block.1.{m[1]}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = b * per_block + j
            if kind == "resnets":
                return f"output_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}"
            return f"output_blocks.{index}.1.{rest}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            slot = 2 if up_has_attention[b] else 1
            return f"output_blocks.{b * per_block + lpb}.{slot}.conv.{m[2]}"
        raise KeyError(f"no LDM name for UNet key {key!r}")

    return _convert(unet.state_dict(), UNET_PREFIX, name)


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> LDM ``first_stage_model.*`` keys."""
    num_up = len(vae.config["up_block_types"])
    fixed = {
        "encoder.conv_norm_out.": "encoder.norm_out.",
        "decoder.conv_norm_out.": "decoder.norm_out.",
    }
    same = ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.", "quant_conv.", "post_quant_conv.")

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut.", "nin_shortcut.", 1) if rest.startswith("conv_shortcut.") else rest

    def name(key: str) -> str:
        if key.startswith(same):
            return key
        for old, new in fixed.items():
            if key.startswith(old):
                return new + key[len(old) :]
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            return f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            return f"{m[1]}.mid.attn_1.{_rename_head(m[2], _VAE_ATTENTION)}"
        raise KeyError(f"no LDM name for VAE key {key!r}")

    out = _convert(vae.state_dict(), VAE_PREFIX, name)
    # The original VAE attention uses 1x1 convolutions; diffusers squeezes them back to linear.
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None].contiguous()
    return out


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> ``{prefix}text_model.*`` (transformers' own names, as in original files).

    transformers >= 5.6 flattens ``CLIPTextModel`` (no ``text_model.`` in its keys); original files
    always carry it, and diffusers strips it again for flattened models.
    """
    wrapped = hasattr(text_encoder, "text_model")
    state = text_encoder.state_dict()
    return {prefix + (k if wrapped else "text_model." + k): v.contiguous() for k, v in state.items()}


def open_clip_to_ldm(text_encoder, prefix: str = SDXL_OPENCLIP_PREFIX) -> dict[str, torch.Tensor]:
    """HF CLIPTextModelWithProjection -> OpenCLIP names under ``prefix`` (SDXL's second encoder)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.position_ids":
            continue  # buffer, not a weight of the original model
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T  # OpenCLIP: x @ text_projection
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            out[f"{prefix}transformer.resblocks.{m[1]}.{_rename_head(m[2], _OPENCLIP_LAYER)}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    for (layer, kind), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {k: v.contiguous() for k, v in out.items()}


def _convert(state: dict[str, torch.Tensor], prefix: str, name: Callable[[str], str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = prefix + name(key)
        if new in out:
            raise KeyError(f"two keys map to {new!r}")
        out[new] = value.contiguous()
    return out


def to_ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The whole original-format state dict for an SD 1.x or SDXL diffusers pipeline."""
    state = unet_to_ldm(pipe.unet)
    state.update(vae_to_ldm(pipe.vae))
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    if text_encoder_2 is None:
        state.update(clip_to_ldm(pipe.text_encoder, SD_CLIP_PREFIX))
    else:
        if pipe.text_encoder is not None:
            if pipe.text_encoder.config.hidden_size == text_encoder_2.config.hidden_size:
                raise ValueError("SDXL text encoders need different hidden sizes for diffusers to tell them apart")
            state.update(clip_to_ldm(pipe.text_encoder, SDXL_CLIP_PREFIX))
        state.update(open_clip_to_ldm(text_encoder_2))
    return state


def export_single_file(pipe, path) -> None:
    """Write pipe's unet, vae and text encoder(s) as one LDM-format safetensors file."""
    state = {k: v.detach().cpu().contiguous() for k, v in to_ldm_state_dict(pipe).items()}
    save_file(state, os.fspath(path), metadata={"format": "pt"})
