"""Train the embedded shapes model: a tiny Stable-Diffusion-shaped text-to-image model.

Stages, each resumable from the checkpoint in the run folder:
1. the VAE (``AutoencoderKL``) on random crops of rendered scenes (L1 + MSE + a tiny KL term);
2. the latent scale factor (1 / std of the encoded training set), then the UNet and the CLIP text
   encoder jointly on cached latents, epsilon prediction with the SD 1.x noise schedule,
   caption dropout for classifier-free guidance and EMA weights.
The result is a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads.
Rerun: ``npinv train-scenes --config configs/shapes64.json --out DIR``.
"""

from __future__ import annotations

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

from npinv.scenes import COLORS, SHAPES, random_scenes
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
    arr = np.stack([np.asarray(s.render(resolution), dtype=np.float32) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def _lr_at(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Log:
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


def train_vae(vae, cfg: dict[str, Any], run: Path, log: Callable[..., None]) -> None:
    v = cfg["vae"]
    ckpt = run / "vae.ckpt"
    opt = torch.optim.AdamW(vae.parameters(), lr=v["lr"], weight_decay=0.0)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    gen = torch.Generator().manual_seed(cfg["seed"] + step)
    scenes = random_scenes(cfg["seed"] * 1000 + 1 + step, v["steps"] * v["batch_size"])
    vae.train()
    crop, res = v["crop"], cfg["resolution"]
    while step < v["steps"]:
        batch = _scene_batch([next(scenes) for _ in range(v["batch_size"])], res)
        ox, oy = (int(i) for i in torch.randint(0, res - crop + 1, (2,), generator=gen) // 4 * 4)
        x = batch[:, :, oy : oy + crop, ox : ox + crop]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, v["lr"], 100, v["steps"])
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample(generator=gen)).sample
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


@torch.no_grad()
def encode_dataset(vae, cfg: dict[str, Any], run: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posterior mean and std of every training scene (cached in the run folder)."""
    cache = run / "latents.pt"
    if cache.exists():
        data = torch.load(cache, weights_only=False)
        return data["mean"], data["std"], data["captions"]
    scenes = list(random_scenes(cfg["seed"] * 1000 + 2, cfg["train_scenes"]))
    means, stds = [], []
    for i in range(0, len(scenes), 256):
        post = vae.encode(_scene_batch(scenes[i : i + 256], cfg["resolution"])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    data = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": [s.caption for s in scenes]}
    torch.save(data, cache)
    return data["mean"], data["std"], data["captions"]


def train_unet(parts: dict[str, Any], latents: tuple, cfg: dict[str, Any], run: Path, log: Callable[..., None]) -> None:
    u = cfg["unet"]
    unet, text_encoder, tokenizer, scheduler = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
    mean, std, captions = latents
    scale = parts["vae"].config.scaling_factor
    ids_all = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
    ids_null = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=u["lr"], weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    alphas = scheduler.alphas_cumprod.float()
    ckpt = run / "unet.ckpt"
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        step = state["step"]
    gen = torch.Generator().manual_seed(cfg["seed"] * 7 + step)
    unet.train()
    text_encoder.train()
    n = mean.shape[0]
    while step < u["steps"]:
        idx = torch.randint(0, n, (u["batch_size"],), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        ids = ids_all[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < u["caption_dropout"]
        ids[drop] = ids_null
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, u["lr"], u["warmup"], u["steps"])
        cond = text_encoder(ids).last_hidden_state
        loss = F.mse_loss(unet(zt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(u["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p.detach(), 1 - decay)
        if step % 50 == 0 or step == u["steps"]:
            log(stage="unet", step=step, loss=round(loss.item(), 5), lr=round(opt.param_groups[0]["lr"], 6))
        if step % cfg["checkpoint_every"] == 0 or step == u["steps"]:
            _save_ckpt(ckpt, unet=unet.state_dict(), text_encoder=text_encoder.state_dict(), opt=opt.state_dict(),
                       ema=ema, step=step)
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()


def train_scenes(config_path: str | Path, out: str | Path, run_dir: str | Path | None = None) -> Path:
    """Train (or resume) the shapes model described by ``config_path``; write a diffusers folder to ``out``."""
    from diffusers import StableDiffusionPipeline

    cfg = json.loads(Path(config_path).read_text())
    out = Path(out)
    run = Path(run_dir) if run_dir else out.with_name(out.name + ".run")
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    parts = build_components(cfg, run / "tokenizer")
    log = _Log(run / "train_log.jsonl")
    log(stage="start", config=cfg, threads=torch.get_num_threads())
    train_vae(parts["vae"], cfg, run, log)
    parts["vae"].requires_grad_(False)
    mean, std, captions = encode_dataset(parts["vae"], cfg, run)
    scale = float(1.0 / mean.std())
    parts["vae"].register_to_config(scaling_factor=round(scale, 5))
    log(stage="latents", scaling_factor=scale, n=len(captions))
    train_unet(parts, (mean, std, captions), cfg, run, log)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    # fp16 storage keeps the shipped folder small; the loader computes in fp32 unless told otherwise.
    pipe.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    write_vocabulary_list(staging)
    shutil.copy(run / "train_log.jsonl", staging / "train_log.jsonl")
    shutil.copy(config_path, staging / "train_config.json")
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    log(stage="done", out=str(out))
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    train_scenes(args.config, args.out, args.run_dir)
