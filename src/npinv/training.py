"""Train the embedded shapes model: a tiny Stable-Diffusion-shaped text-to-image model.

Stages, each resumable from the checkpoint in the run folder:
1. the VAE (``AutoencoderKL``) on random crops of rendered scenes (L1 + MSE + a tiny KL term);
2. the latent scale factor (1 / std of the encoded training set), then the UNet and the CLIP text
   encoder jointly on cached latents, epsilon prediction with the SD 1.x noise schedule,
   caption dropout for classifier-free guidance and EMA weights; optionally (``unet.grounding``)
   a grounding loss that makes each caption word's cross-attention cover its region of the scene
   (the object for its colour and shape words, the rest for the background's), as TokenCompose
   (Wang et al., 2024) does with segmentation masks: our scenes know their masks exactly.
The result is a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads.
Rerun: ``npinv train-scenes --config configs/shapes64.json --out DIR``; ``--resume`` continues an
interrupted run from its last checkpoint and ends with the same weights as an uninterrupted run
(every step's randomness is drawn from the seed and the step number alone).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from npinv.errors import NpinvError
from npinv.scenes import COLORS, SHAPES, Scene, balanced_scenes, random_scenes
from npinv.vocab import write_tokenizer

SD1_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

CAPTION_WORDS = ["a", "an", "the", "on", "of", "in", "with", "and", "background", "photo", "picture",
                 *SHAPES, *COLORS]


def write_vocabulary_list(model_folder: Path) -> None:
    """The words the model was trained on, so npinv can warn about prompts outside them."""
    (Path(model_folder) / "tokenizer" / "vocabulary_words.txt").write_text("\n".join(CAPTION_WORDS) + "\n")


def build_components(cfg: dict[str, Any], tokenizer_dir: Path) -> dict[str, Any]:
    """Fresh (untrained) tokenizer, text encoder, VAE, UNet and scheduler from a config."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    text = cfg["text"]
    write_tokenizer(tokenizer_dir, CAPTION_WORDS, max_length=text["max_length"])
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
        max_position_embeddings=text["max_length"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=text["hidden_size"],
    ))
    v = cfg["vae"]
    depth = len(v["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth, block_out_channels=tuple(v["block_out_channels"]),
        layers_per_block=1, latent_channels=v["latent_channels"], norm_num_groups=16,
        sample_size=cfg["resolution"], mid_block_add_attention=False,
    )
    u = cfg["unet"]
    latent = cfg["resolution"] // 2 ** (depth - 1)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=v["latent_channels"], out_channels=v["latent_channels"],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(u["block_out_channels"]), layers_per_block=u["layers_per_block"],
        cross_attention_dim=text["hidden_size"], attention_head_dim=u["attention_head_dim"], norm_num_groups=32,
    )
    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def _scene_batch(scenes: list, resolution: int) -> torch.Tensor:
    return _image_batch([s.render(resolution) for s in scenes])


def _image_batch(images: list) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def _lr_at(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The randomness of one training step, from the seed and the step alone (so a resumed run
    draws what an uninterrupted one would)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stage) * 10_000_019 + step)


class TrainLog:
    """The loss log (``train_log.jsonl``): one JSON row per call, with the seconds since this segment
    began; the stages (and ``benchmarks/train_sweep.py``) write through it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.time()

    def __call__(self, **row: Any) -> None:
        row["elapsed_s"] = round(time.time() - self.start, 1)
        line = json.dumps(row)
        with self.path.open("a") as fh:
            fh.write(line + "\n")
        print(line, flush=True)


def _save_ckpt(path: Path, **state: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_vae(vae, cfg: dict[str, Any], run: Path, log: Callable[..., None], device: torch.device) -> None:
    v = cfg["vae"]
    ckpt = run / "vae.ckpt"
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=v["lr"], weight_decay=0.0)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    # One fixed stream of scenes; a resumed run skips what the earlier steps used.
    scenes = itertools.islice(random_scenes(cfg["seed"] * 1000 + 1, v["steps"] * v["batch_size"]),
                              step * v["batch_size"], None)
    vae.train()
    crop, res = v["crop"], cfg["resolution"]
    while step < v["steps"]:
        gen = _step_generator(cfg["seed"], 1, step)
        batch = _scene_batch([next(scenes) for _ in range(v["batch_size"])], res)
        ox, oy = (int(i) for i in torch.randint(0, res - crop + 1, (2,), generator=gen) // 4 * 4)
        x = batch[:, :, oy : oy + crop, ox : ox + crop].to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, v["lr"], 100, v["steps"])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        y = vae.decode(z).sample
        mse = F.mse_loss(y, x)
        loss = F.l1_loss(y, x) + mse + v["kl_weight"] * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0 or step == v["steps"]:
            log(stage="vae", step=step, loss=round(loss.item(), 5), psnr=round(10 * math.log10(4 / mse.item()), 2))
        if step % cfg["checkpoint_every"] == 0 or step == v["steps"]:
            _save_ckpt(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step)
    vae.eval()


def training_scenes(cfg: dict[str, Any]) -> list[Scene]:
    """The UNet's training scenes: ``captions: "balanced"`` cycles through every (shape, colour,
    background) triple; otherwise each scene is drawn independently."""
    make = balanced_scenes if cfg.get("captions") == "balanced" else random_scenes
    return list(make(cfg["seed"] * 1000 + 2, cfg["train_scenes"]))


@torch.no_grad()
def encode_dataset(vae, cfg: dict[str, Any], run: Path, device: torch.device) -> dict[str, Any]:
    """Posterior mean and std of every training scene, its caption and its object's coverage of each
    latent cell (cached in the run folder)."""
    cache = run / "latents.pt"
    if cache.exists():
        return torch.load(cache, weights_only=False)
    scenes = training_scenes(cfg)
    means, stds, masks = [], [], []
    for i in range(0, len(scenes), 256):
        images, covers = zip(*(s.render_with_mask(cfg["resolution"]) for s in scenes[i : i + 256]), strict=True)
        post = vae.encode(_image_batch(list(images)).to(device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
        cover = torch.from_numpy(np.stack(covers))[:, None]
        masks.append(F.adaptive_avg_pool2d(cover, post.mean.shape[-1]).half())
    data = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": [s.caption for s in scenes],
            "masks": torch.cat(masks), "words": [(s.color, s.shape, s.background) for s in scenes]}
    _save_ckpt(cache, **data)  # atomic: a run killed while writing leaves no half cache to resume from
    return data


class _AttentionRecorder:
    """Keeps each cross-attention layer's probabilities (with their gradients) for the grounding loss."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def attention(self, probs: torch.Tensor, layer) -> torch.Tensor:
        if layer.is_cross:
            self.maps.append(probs)
        return probs


def grounding_losses(maps: list[torch.Tensor], masks: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token loss, pixel loss) over the cross-attention layers, for captioned rows only.

    ``masks`` (B, 1, h, w): the object's coverage of each latent cell; ``positions`` (B, 4): the token
    positions of the colour, shape, background-colour and "background" words, whose target regions are
    the object, the object, the rest and the rest. Token loss: (1 - the share of a word's attention
    that falls in its region)^2; pixel loss: binary cross-entropy of each word's attention against its
    region, per cell. Maps are averaged over heads; masks are area-pooled to each layer's size.
    """
    token, pixel = [], []
    for probs in maps:
        a = probs.float().mean(1)  # (B, Q, K)
        q = a.shape[1]
        side = math.isqrt(q)
        m = F.adaptive_avg_pool2d(masks.float(), side).flatten(1)  # (B, Q)
        target = torch.stack([m, m, 1 - m, 1 - m], -1)
        words = a.gather(2, positions[:, None, :].expand(-1, q, -1))  # (B, Q, 4)
        inside = (words * target).sum(1) / words.sum(1).clamp_min(1e-8)
        token.append(((1 - inside) ** 2).mean())
        pixel.append(F.binary_cross_entropy(words.clamp(1e-6, 1 - 1e-6), target))
    return torch.stack(token).mean(), torch.stack(pixel).mean()


def add_grounding(loss: torch.Tensor, maps: list[torch.Tensor], keep: torch.Tensor, masks: torch.Tensor,
                  positions: torch.Tensor, weights: tuple[float, float], device: torch.device) -> tuple[torch.Tensor, dict]:
    """``loss`` plus the weighted grounding losses of the captioned rows (``keep``; dropped captions have
    no words), and the two terms for the log."""
    if not bool(keep.any()):
        return loss, {}
    rows = keep.nonzero().squeeze(1).to(device)
    token, pixel = grounding_losses([m[rows] for m in maps], masks[keep].to(device), positions[keep].to(device))
    loss = loss + weights[0] * token + weights[1] * pixel
    return loss, {"token": round(token.item(), 4), "pixel": round(pixel.item(), 4)}


def optimiser_step(loss: torch.Tensor, params: list, opt, ema: list, step: int, ema_decay: float) -> int:
    """Back-propagate, clip to norm 1, step, and move the EMA weights (decay warming up to ``ema_decay``);
    returns the new step count."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    step += 1
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
    return step


def _word_positions(tokenizer, ids: torch.Tensor, words: list[tuple[str, str, str]]) -> torch.Tensor:
    """(N, 4) positions of each caption's colour, shape, background-colour and "background" tokens."""
    vocab = tokenizer.get_vocab()
    want = torch.tensor([[vocab[w + "</w>"] for w in (c, s, b, "background")] for c, s, b in words])
    return (ids[:, None, :] == want[:, :, None]).int().argmax(-1)


def train_unet(parts: dict[str, Any], data: dict[str, Any], cfg: dict[str, Any], run: Path,
               log: Callable[..., None], device: torch.device) -> None:
    from npinv.attention.processor import controlled_attention

    u = cfg["unet"]
    unet, text_encoder, tokenizer, scheduler = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
    unet.to(device)
    text_encoder.to(device)
    mean, std = data["mean"], data["std"]
    scale = parts["vae"].config.scaling_factor
    ids_all = tokenizer(data["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
    ids_null = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    ground = u.get("grounding") or {}
    token_weight, pixel_weight = float(ground.get("token_weight", 0.0)), float(ground.get("pixel_weight", 0.0))
    grounded = token_weight > 0 or pixel_weight > 0
    positions = _word_positions(tokenizer, ids_all, data["words"]) if grounded else None
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=u["lr"], weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    alphas = scheduler.alphas_cumprod.float().to(device)
    ckpt = run / "unet.ckpt"
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        step = state["step"]
    unet.train()
    text_encoder.train()
    n = mean.shape[0]
    recorder = _AttentionRecorder()
    hooked = controlled_attention(unet, recorder) if grounded else contextlib.nullcontext()
    with hooked:
        while step < u["steps"]:
            gen = _step_generator(cfg["seed"], 2, step)
            idx = torch.randint(0, n, (u["batch_size"],), generator=gen)
            z0 = ((mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale).to(device)
            ids = ids_all[idx].clone()
            drop = torch.rand(len(idx), generator=gen) < u["caption_dropout"]
            ids[drop] = ids_null
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
            noise = torch.randn(z0.shape, generator=gen).to(device)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, u["lr"], u["warmup"], u["steps"])
            recorder.maps.clear()
            cond = text_encoder(ids.to(device)).last_hidden_state
            loss = mse = F.mse_loss(unet(zt, t, cond).sample, noise)
            extra = {}
            if grounded:
                loss, extra = add_grounding(loss, recorder.maps, ~drop, data["masks"][idx], positions[idx],
                                            (token_weight, pixel_weight), device)
            recorder.maps.clear()
            step = optimiser_step(loss, params, opt, ema, step, u["ema_decay"])
            if step % 50 == 0 or step == u["steps"]:
                log(stage="unet", step=step, loss=round(mse.item(), 5), lr=round(opt.param_groups[0]["lr"], 6), **extra)
            if step % cfg["checkpoint_every"] == 0 or step == u["steps"]:
                _save_ckpt(ckpt, unet=unet.state_dict(), text_encoder=text_encoder.state_dict(), opt=opt.state_dict(),
                           ema=ema, step=step)
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()


CONFIG_COPY = "config.json"


def _check_run_folder(run: Path, cfg: dict[str, Any], resume: bool) -> None:
    """A run folder is resumed only when asked, and only with the config that started it."""
    started = any((run / name).exists() for name in ("vae.ckpt", "unet.ckpt", "latents.pt", "flow.ckpt"))
    if not started:
        return
    if not resume:
        raise NpinvError(f"{run} holds an earlier run's checkpoints; pass --resume to continue it, "
                         "or give another --run-dir")
    saved = run / CONFIG_COPY
    if saved.exists():
        before = {k: v for k, v in json.loads(saved.read_text()).items() if k != "notes"}
        if before != {k: v for k, v in cfg.items() if k != "notes"}:
            raise NpinvError(f"{run} was started with another config ({saved}); resume it with that one")


def train_scenes(config_path: str | Path, out: str | Path, run_dir: str | Path | None = None, *,
                 resume: bool = False, device: str = "cpu") -> Path:
    """Train (or, with ``resume``, continue) the shapes model described by ``config_path``; write a
    diffusers folder to ``out``. On the CPU the same config and seed give the same weights bit for
    bit, resumed or not; on CUDA, atomics in some backward kernels make runs differ in the last bits."""
    cfg = json.loads(Path(config_path).read_text())
    out = Path(out)
    run = Path(run_dir) if run_dir else out.with_name(out.name + ".run")
    _check_run_folder(run, cfg, resume)
    run.mkdir(parents=True, exist_ok=True)
    (run / CONFIG_COPY).write_text(json.dumps(cfg, indent=2))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    log = TrainLog(run / "train_log.jsonl")
    log(stage="start", config=cfg, threads=torch.get_num_threads(), device=str(dev), resume=resume)
    if "transformer" in cfg:  # the flow model (npinv.flow_training): an SD3 layout on the UNet model's VAE
        from npinv.flow_training import train_flow

        train_flow(cfg, run, out, log, dev)
        log(stage="done", out=str(out))
        return out
    torch.manual_seed(cfg["seed"])
    parts = build_components(cfg, run / "tokenizer")
    train_vae(parts["vae"], cfg, run, log, dev)
    parts["vae"].requires_grad_(False)
    data = encode_dataset(parts["vae"], cfg, run, dev)
    scale = float(1.0 / data["mean"].std())
    parts["vae"].register_to_config(scaling_factor=round(scale, 5))
    log(stage="latents", scaling_factor=scale, n=len(data["captions"]))
    train_unet(parts, data, cfg, run, log, dev)
    save_model(parts, cfg, run, out)
    log(stage="done", out=str(out))
    return out


def save_model(parts: dict[str, Any], cfg: dict[str, Any], run: Path, out: Path) -> Path:
    """Write the trained parts as a diffusers folder (fp16), with the config and the loss log beside them."""
    from diffusers import StableDiffusionPipeline

    # fp16 storage keeps the shipped folder small; the loader computes in fp32 unless told otherwise.
    for name in ("vae", "text_encoder", "unet"):
        parts[name].to("cpu", torch.float16)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    write_vocabulary_list(staging)
    shutil.copy(run / "train_log.jsonl", staging / "train_log.jsonl")
    (staging / "train_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    history = out / "MODEL_CARD_HISTORY.md"  # earlier versions' figures outlive a retrain (npinv.modelcard)
    if history.is_file():
        shutil.copy(history, staging / history.name)
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    train_scenes(args.config, args.out, args.run_dir, resume=args.resume, device=args.device)
