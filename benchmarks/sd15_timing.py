"""Time NPI and NTI reconstruction and an NPI edit on a Stable-Diffusion-1.5-shaped model with random
weights (speed does not depend on the weights), on any device.

    python benchmarks/sd15_timing.py --device cpu --size 256 --steps 10 --out bench/sd15_cpu.json
    python benchmarks/sd15_timing.py --device cuda --size 512 --steps 50 --dtype fp16 --out bench/sd15_gpu.json

The model is built from SD 1.5's published component configs (UNet 860M parameters, VAE, a
12-layer 768-wide CLIP text encoder) in memory; the tokenizer is npinv's own small vocabulary.
Seconds and UNet calls are the results' own costs (:class:`npinv.cost.Cost`), through the service.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from npinv import service
from npinv.io import write_text
from npinv.methods import reconstruct
from npinv.model import Model, parse_dtype
from npinv.settings import EditSettings, InvertSettings
from npinv.training import SD1_SCHEDULER
from npinv.vocab import write_tokenizer

UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
WORDS = ["a", "photo", "of", "cat", "dog", "sitting", "on", "bench", "the"]


def build(device: torch.device, dtype: torch.dtype) -> Model:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp())
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder, WORDS, max_length=77))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**VAE), text_encoder=text, tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**UNET), scheduler=DDIMScheduler.from_config(SD1_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(device)
    pipe.unet.to(dtype)
    pipe.text_encoder.to(dtype)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    return Model(pipe, "sd15-shaped-random", device, dtype)


def idle(device: torch.device) -> None:
    """Let queued GPU work finish before the next part starts (its cost then counts only its own work;
    each part ends on a host read of its output, so its own work is done when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--nti-inner", type=int, default=10, help="NTI inner iterations (published: 10)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    model = build(device, dtype)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    source = service.Source(image, "random", "random")  # already at the model's input size
    prompt = "a photo of a cat sitting on a bench"
    rows: dict[str, list] = {"invert": [], "npi": [], "nti": [], "npi_edit": []}
    calls: dict[str, int] = {}
    edit_settings = EditSettings(method="npi", controller="replace", guidance=7.5)
    for _ in range(args.repeats):
        idle(device)
        inverted = service.invert_one(model, source, prompt, InvertSettings(steps=args.steps))
        costs = {"invert": inverted.cost}
        idle(device)
        costs["npi"] = reconstruct(model, inverted.inversion, "npi", 7.5).cost
        idle(device)
        # methods.reconstruct: the service's ReconstructSettings has no NTI inner-iteration count.
        costs["nti"] = reconstruct(model, inverted.inversion, "nti", 7.5, nti_inner_steps=args.nti_inner).cost
        idle(device)
        edited = service.edit(model, [(inverted, ["a photo of a dog sitting on a bench"])], edit_settings)[0]
        costs["npi_edit"] = edited.edit_cost
        for name, cost in costs.items():
            rows[name].append(cost.seconds)
            calls[name] = cost.unet_calls
    inv_s = statistics.median(rows["invert"])
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "dtype": args.dtype, "size": args.size, "steps": args.steps, "repeats": args.repeats, "torch": torch.__version__,
        "seconds_median": {k: statistics.median(v) for k, v in rows.items()},
        "unet_calls": calls,
        "npi_total_s": inv_s + statistics.median(rows["npi"]),
        "nti_total_s": inv_s + statistics.median(rows["nti"]),
    }
    result["nti_over_npi_time"] = result["nti_total_s"] / result["npi_total_s"]
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
