"""Train the embedded flow model: a tiny Stable-Diffusion-3-shaped (MMDiT) text-to-image model.

The flow model reuses the embedded UNet model's VAE and text encoder, frozen, as SD3 reuses
pretrained autoencoders and CLIP/T5 encoders: the two CLIP slots of SD3 hold that encoder (with an
identity text projection, since the UNet model's encoder has none) and the T5 slot is empty. Only the
transformer trains, with rectified flow on the same scenes and captions as the UNet model:

    z_sigma = (1 - sigma) z0 + sigma noise,   target velocity  noise - z0,

sigma drawn logit-normal (SD3's ``lognorm(0, 1)``), caption dropout for classifier-free guidance,
EMA weights, and (``transformer.grounding``) the same TokenCompose-style grounding loss as the UNet
model, here on each joint-attention layer's image-query softmax over the text keys. Every step's
randomness comes from the seed and the step number, so ``--resume`` ends with the weights of an
uninterrupted run. The result is a diffusers folder that ``StableDiffusion3Pipeline.from_pretrained``
loads (with ``text_encoder_3=None, tokenizer_3=None``; its prompts take ``max_sequence_length=0``,
declared in the folder's ``npinv.json``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as sdpa

from npinv.errors import NpinvError

CHECKPOINT = "flow.ckpt"


def _init_folder(cfg: dict[str, Any]) -> Path:
    from npinv.model import embedded_model_path

    init = cfg.get("init", "shapes64")
    folder = embedded_model_path() if init == "shapes64" else Path(init).expanduser()
    if not (folder / "model_index.json").is_file():
        raise NpinvError(f"the flow model starts from {folder}'s VAE and text encoder, which is not a model folder")
    return folder


def build_flow_components(cfg: dict[str, Any]) -> dict[str, Any]:
    """The frozen VAE, tokenizers and text encoders taken from ``cfg["init"]`` (the embedded UNet
    model), and a fresh transformer and scheduler from the config."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = _init_folder(cfg)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    base = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)
    config = CLIPTextConfig(**{**base.config.to_dict(), "architectures": ["CLIPTextModelWithProjection"],
                               "projection_dim": base.config.hidden_size})
    encoders = []
    for _ in range(2):  # SD3's two CLIP slots; both hold the UNet model's encoder
        enc = CLIPTextModelWithProjection(config)
        enc.text_model.load_state_dict(getattr(base, "text_model", base).state_dict())  # transformers 5 flattens CLIPTextModel
        with torch.no_grad():
            enc.text_projection.weight.copy_(torch.eye(config.hidden_size))
        encoders.append(enc.eval().requires_grad_(False))
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
    t = cfg["transformer"]
    torch.manual_seed(cfg["seed"])
    latent = cfg["resolution"] // 2 ** (len(vae.config.block_out_channels) - 1)
    width = t["num_attention_heads"] * t["attention_head_dim"]
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=t["patch_size"], in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels, num_layers=t["num_layers"], attention_head_dim=t["attention_head_dim"],
        num_attention_heads=t["num_attention_heads"], joint_attention_dim=2 * config.hidden_size,
        caption_projection_dim=width, pooled_projection_dim=2 * config.hidden_size,
        pos_embed_max_size=t["pos_embed_max_size"], qk_norm=t.get("qk_norm"))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(cfg["scheduler"]["shift"]))
    return {"tokenizer": tokenizer, "text_encoder": encoders[0], "text_encoder_2": encoders[1], "vae": vae,
            "transformer": transformer, "scheduler": scheduler}


def pipeline(parts: dict[str, Any]):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=parts["transformer"], scheduler=parts["scheduler"], vae=parts["vae"],
        text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], text_encoder_2=parts["text_encoder_2"],
        tokenizer_2=parts["tokenizer"], text_encoder_3=None, tokenizer_3=None)


@torch.no_grad()
def caption_embeddings(parts: dict[str, Any], captions: list[str], max_sequence_length: int) -> dict[str, Any]:
    """Each distinct caption's (and the empty prompt's) hidden states and pooled vector, as the SD3
    pipeline encodes them: the text encoders are frozen, so this is done once."""
    pipe = pipeline(parts)
    unique = sorted(set(captions)) + [""]
    hidden, _, pooled, _ = pipe.encode_prompt(unique, None, None, device=torch.device("cpu"), num_images_per_prompt=1,
                                              do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    index = {c: i for i, c in enumerate(unique)}
    return {"hidden": hidden.float(), "pooled": pooled.float(), "rows": torch.tensor([index[c] for c in captions]),
            "null": index[""]}


class _JointRecorder:
    """Stands in for :class:`npinv.attention.joint.JointSession` while training: plain attention, plus each
    layer's image-query softmax over the text keys (the map Prompt-to-Prompt edits), kept with gradients."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def attend(self, q, k, v, layer, lay) -> torch.Tensor:
        if lay.has_text:
            scores = q[:, :, lay.image] @ k[:, :, lay.text].transpose(-1, -2) * q.shape[-1] ** -0.5
            self.maps.append(scores.float().softmax(-1))
        return sdpa(q, k, v)


class _recording:
    def __init__(self, transformer, recorder: _JointRecorder, patch: int) -> None:
        self.transformer, self.recorder, self.patch = transformer, recorder, patch

    def __enter__(self) -> None:
        from npinv.attention.joint import JointControlledProcessor, joint_layers

        self.original = dict(self.transformer.attn_processors)
        self.transformer.set_attn_processor({
            key: JointControlledProcessor(self.recorder, info, "sd3", self.original[key]) if info.is_cross
            else self.original[key] for key, info in joint_layers(self.transformer, "sd3", self.patch).items()})

    def __exit__(self, *exc: Any) -> None:
        self.transformer.set_attn_processor(self.original)


def train_transformer(parts: dict[str, Any], data: dict[str, Any], cfg: dict[str, Any], run: Path,
                      log: Callable[..., None], device: torch.device) -> None:
    from npinv.training import _lr_at, _save_ckpt, _step_generator, _word_positions, add_grounding, optimiser_step

    t = cfg["transformer"]
    transformer = parts["transformer"].to(device)
    vae = parts["vae"]
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    text = caption_embeddings(parts, data["captions"], cfg["text"]["max_sequence_length"])
    hidden, pooled, rows = text["hidden"].to(device), text["pooled"].to(device), text["rows"]
    ground = t.get("grounding") or {}
    token_weight, pixel_weight = float(ground.get("token_weight", 0.0)), float(ground.get("pixel_weight", 0.0))
    grounded = token_weight > 0 or pixel_weight > 0
    if grounded:
        tok = parts["tokenizer"]
        ids = tok(data["captions"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        positions = _word_positions(tok, ids, data["words"])
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=t["lr"], weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    ckpt = run / CHECKPOINT
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        transformer.load_state_dict(state["transformer"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        step = state["step"]
    transformer.train()
    mean, std = data["mean"], data["std"]
    n = mean.shape[0]
    recorder = _JointRecorder()
    with _recording(transformer, recorder, t["patch_size"]) if grounded else contextlib.nullcontext():
        while step < t["steps"]:
            gen = _step_generator(cfg["seed"], 3, step)
            idx = torch.randint(0, n, (t["batch_size"],), generator=gen)
            z0 = ((mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen) - shift) * scale).to(device)
            drop = torch.rand(len(idx), generator=gen) < t["caption_dropout"]
            which = torch.where(drop, torch.full_like(rows[idx], text["null"]), rows[idx]).to(device)
            sigma = torch.sigmoid(torch.randn(len(idx), generator=gen)).to(device)  # logit-normal(0, 1)
            noise = torch.randn(z0.shape, generator=gen).to(device)
            s = sigma.view(-1, 1, 1, 1)
            zt = (1 - s) * z0 + s * noise
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, t["lr"], t["warmup"], t["steps"])
            recorder.maps.clear()
            out = transformer(hidden_states=zt, timestep=sigma * 1000, encoder_hidden_states=hidden[which],
                              pooled_projections=pooled[which], return_dict=False)[0]
            loss = mse = F.mse_loss(out, noise - z0)
            extra = {}
            if grounded:
                loss, extra = add_grounding(loss, recorder.maps, ~drop, data["masks"][idx], positions[idx],
                                            (token_weight, pixel_weight), device)
            recorder.maps.clear()
            step = optimiser_step(loss, params, opt, ema, step, t["ema_decay"])
            if step % 50 == 0 or step == t["steps"]:
                log(stage="transformer", step=step, loss=round(mse.item(), 5), lr=round(opt.param_groups[0]["lr"], 6),
                    **extra)
            if step % cfg["checkpoint_every"] == 0 or step == t["steps"]:
                _save_ckpt(ckpt, transformer=transformer.state_dict(), opt=opt.state_dict(), ema=ema, step=step)
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    transformer.eval()


def train_flow(cfg: dict[str, Any], run: Path, out: Path, log: Callable[..., None], device: torch.device) -> Path:
    """The flow stages of :func:`npinv.training.train_scenes`: encode the scenes with the frozen VAE,
    set SD3's latent shift and scale from them, train the transformer, save the folder."""
    from npinv.training import encode_dataset

    parts = build_flow_components(cfg)
    data = encode_dataset(parts["vae"], cfg, run, device)
    shift = float(data["mean"].mean())
    scale = float(1.0 / (data["mean"] - shift).std())
    parts["vae"].register_to_config(shift_factor=round(shift, 5), scaling_factor=round(scale, 5))
    log(stage="latents", shift_factor=shift, scaling_factor=scale, n=len(data["captions"]))
    train_transformer(parts, data, cfg, run, log, device)
    return save_flow_model(parts, cfg, run, out)


def save_flow_model(parts: dict[str, Any], cfg: dict[str, Any], run: Path, out: Path) -> Path:
    """Write the pipeline as a diffusers folder (fp16 weights), with its ``npinv.json``, config and log."""
    from npinv.training import write_vocabulary_list

    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        parts[name].to("cpu", torch.float16)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline(parts).save_pretrained(staging, safe_serialization=True)
    write_vocabulary_list(staging)
    shutil.copy(run / "train_log.jsonl", staging / "train_log.jsonl")
    (staging / "train_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    settings = {"max_sequence_length": cfg["text"]["max_sequence_length"], **cfg.get("npinv", {})}
    old = out / "npinv.json"  # the card's measured edit guidance outlives a retrain until it is measured again
    if old.is_file():
        settings = {**json.loads(old.read_text()), **settings}
    (staging / "npinv.json").write_text(json.dumps(settings) + "\n")
    for keep in ("MODEL_CARD_HISTORY.md",):
        if (out / keep).is_file():
            shutil.copy(out / keep, staging / keep)
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    return out
