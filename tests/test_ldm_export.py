"""Round trip: tiny diffusers pipeline -> original-format single file -> ``from_single_file``, offline."""

from __future__ import annotations

import socket

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file

from ldm_export import export_single_file
from tiny import sd_pipeline, sdxl_pipeline


@pytest.fixture
def offline(monkeypatch):
    """No network: HF offline mode plus a socket that refuses to connect."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(self, *args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _randomize(*models) -> None:
    # Default inits leave many tensors equal (norm weights = 1, biases = 0); random values make any
    # swapped or dropped key show up in the comparison.
    with torch.no_grad():
        for model in models:
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.05)


def _sd_pipe(tmp_path):
    # Two resnets per block exercise the index mapping; layout: attention + downsampler in down block 0,
    # up block 0 has an upsampler without attention (slot 1).
    pipe = sd_pipeline(tmp_path, layers_per_block=2)
    _randomize(pipe.unet, pipe.vae, pipe.text_encoder)
    return pipe


def _sdxl_pipe(tmp_path):
    # SDXL layout: no attention in down block 0; up block 0 has attention + upsampler (slot 2).
    # 10 layers in the second encoder make infer_diffusers_model_type() see "xl_base".
    pipe = sdxl_pipeline(tmp_path, text_layers_2=10)
    _randomize(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    return pipe


def _assert_same_weights(a, b, name):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), name
    for key, value in sa.items():
        assert sb[key].device.type == "cpu", f"{name}.{key} not loaded"
        assert torch.equal(value, sb[key]), f"{name}.{key} differs"


def _run(pipe):
    out = pipe(
        "a red circle on the blue background",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images


@pytest.mark.parametrize(
    ("build", "cls", "model_type", "encoders", "prefixes"),
    [
        (_sd_pipe, StableDiffusionPipeline, "v1", ["text_encoder"], ["cond_stage_model.transformer."]),
        (
            _sdxl_pipe,
            StableDiffusionXLPipeline,
            "xl_base",
            ["text_encoder", "text_encoder_2"],
            ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
        ),
    ],
    ids=["sd1", "sdxl"],
)
def test_single_file_round_trip(tmp_path, offline, build, cls, model_type, encoders, prefixes):
    pipe = build(tmp_path)
    folder = tmp_path / "diffusers"
    pipe.save_pretrained(folder)
    path = tmp_path / "model.safetensors"
    export_single_file(pipe, path)

    state = load_file(path)
    expected = ["model.diffusion_model.", "first_stage_model.", *prefixes]
    assert all(k.startswith(tuple(expected)) for k in state)
    for prefix in expected:
        assert any(k.startswith(prefix) for k in state), prefix
    assert infer_diffusers_model_type(state) == model_type

    loaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    assert type(loaded) is cls
    for name in ["unet", "vae", *encoders]:
        _assert_same_weights(getattr(pipe, name), getattr(loaded, name), name)

    assert (loaded.vae.config.scaling_factor, loaded.unet.config.sample_size) == (
        pipe.vae.config.scaling_factor,
        pipe.unet.config.sample_size,
    )
    assert torch.equal(torch.from_numpy(_run(pipe)), torch.from_numpy(_run(loaded)))
