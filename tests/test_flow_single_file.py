"""SD3 and FLUX.1 single-file checkpoints, offline: tiny models written in the original layouts
(tests/flow_export.py) load through ``load_model(file, config=folder)`` and the CLI's ``--model-config``
exactly as their diffusers folders do; a flow file without its config, or with another family's, is
refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
from PIL import Image
from safetensors.torch import load_file

from flow_export import (
    SD3_PREFIX,
    export_flux_single_file,
    export_sd3_single_file,
    flux_transformer_to_original,
    flux_width,
    save_single_file,
    sd3_pipeline_for_files,
    sd3_transformer_to_original,
)
from npinv import load_model
from npinv.cli import main

PROMPT = "a red circle on blue background"
TINY_FLUX_WIDTH = 32  # tiny_flow's FLUX: 2 heads of 16


def _randomized(model, scale: float = 1.0):
    """Random values in every tensor (default inits leave norms at 1 and biases at 0: a swapped or dropped
    key would not show)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model


def _without_weights(folder: Path, dst: Path, parts: tuple[str, ...]) -> Path:
    """A copy of a diffusers folder whose ``parts`` keep their configs but lose their weights."""
    shutil.copytree(folder, dst)
    for part in parts:
        for weights in (dst / part).glob("*.safetensors"):
            weights.unlink()
    return dst


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory):
    """An SD3 model as a diffusers folder, and as Stability's two file layouts with their config folders:
    ``sd3_medium.safetensors`` (MMDiT + VAE; the text encoders from the config folder) and the all-in-one
    ``_incl_clips_t5xxl`` (everything in the file; the config folder holds no weights at all); and as a
    transformer alone (a "diffusion model" file: the VAE from the config folder too)."""
    root = tmp_path_factory.mktemp("sd3_files")
    pipe = sd3_pipeline_for_files()
    pipe.save_pretrained(root / "folder")
    encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    export_sd3_single_file(pipe, root / "sd3_medium.safetensors")
    export_sd3_single_file(pipe, root / "sd3_medium_incl_clips_t5xxl.safetensors", text_encoders=True)
    export_sd3_single_file(pipe, root / "sd3_medium_transformer.safetensors", vae=False)
    return {
        "folder": root / "folder",
        "medium": (root / "sd3_medium.safetensors", _without_weights(root / "folder", root / "cfg", ("transformer", "vae"))),
        "all-in-one": (root / "sd3_medium_incl_clips_t5xxl.safetensors",
                       _without_weights(root / "folder", root / "cfg_bare", ("transformer", "vae", *encoders))),
        "transformer-only": (root / "sd3_medium_transformer.safetensors",
                             _without_weights(root / "folder", root / "cfg_vae", ("transformer",))),
    }


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    """A FLUX.1-dev model as a diffusers folder, as BFL's transformer-only file and as ComfyUI's prefixed one,
    with a config folder whose transformer has no weights."""
    from tiny_flow import flux_pipeline

    root = tmp_path_factory.mktemp("flux_files")
    pipe = flux_pipeline()
    _randomized(pipe.transformer, 0.05)  # as sd3_pipeline_for_files: velocities of order 1
    pipe.save_pretrained(root / "folder")
    export_flux_single_file(pipe, root / "flux1-dev.safetensors")
    export_flux_single_file(pipe, root / "flux1-dev-comfy.safetensors", prefix="model.diffusion_model.")
    return {"folder": root / "folder", "bfl": root / "flux1-dev.safetensors", "comfy": root / "flux1-dev-comfy.safetensors",
            "config": _without_weights(root / "folder", root / "cfg", ("transformer",))}


def _assert_same(a, b) -> None:
    """Every component's state dict equal, tensor for tensor, and none left unloaded (on the meta device)."""
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        x, y = getattr(a.pipe, name, None), getattr(b.pipe, name, None)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys(), name
        for key, value in sx.items():
            assert sy[key].device.type == "cpu", f"{name}.{key} not loaded"
            assert torch.equal(value, sy[key]), f"{name}.{key} differs"


def _velocity(model) -> tuple[torch.Tensor, ...]:
    z = torch.randn(1, model.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompt(PROMPT)
    return cond.hidden, cond.pooled, model.unet_output(z, 750.0, cond)


def _same_velocity(a, b) -> None:
    """The prompt's embedding and one denoiser call on it: the same to float rounding, and bit for bit once
    both models' weights sit in freshly allocated memory (tensors read from a file stay where safetensors
    maps them, at any byte offset, and CPU kernels round unaligned data differently)."""
    for x, y in zip(_velocity(a), _velocity(b), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    for model in (a, b):
        for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
            part = getattr(model.pipe, name, None)
            for p in part.parameters() if part is not None else ():
                p.data = p.data.clone()
    assert all(torch.equal(x, y) for x, y in zip(_velocity(a), _velocity(b), strict=True))


# -- the exporter is the exact inverse of diffusers' converters ----------------------------------------
@pytest.mark.parametrize("extra", [{}, {"dual_attention_layers": (0, 2), "qk_norm": "rms_norm"}], ids=["sd3", "sd35"])
def test_sd3_export_inverts_diffusers_converter(extra):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    # Three blocks: the middle ones update the text tokens, the last does not (its modulation is swapped).
    transformer = _randomized(SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4, **extra))
    original = sd3_transformer_to_original(transformer)
    assert CHECKPOINT_KEY_NAMES["sd3"][1] in original  # the key diffusers' detection reads
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    state = transformer.state_dict()
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("dev", [True, False], ids=["dev", "schnell"])
def test_flux_export_inverts_diffusers_converter(dev):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = _randomized(FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=dev))
    original = flux_transformer_to_original(transformer)
    assert infer_diffusers_model_type(original) == ("flux-dev" if dev else "flux-schnell")
    with flux_width(TINY_FLUX_WIDTH):
        back = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    state = transformer.state_dict()
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


# -- load_model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["medium", "all-in-one", "transformer-only"])
def test_sd3_file_loads_as_its_folder(sd3_files, layout):
    path, config = sd3_files[layout]
    reference = load_model(sd3_files["folder"], device="cpu")
    model = load_model(path, device="cpu", config=config)
    assert model.family == reference.family and model.kind == "sd3"
    _assert_same(reference, model)
    _same_velocity(reference, model)


@pytest.mark.parametrize("layout", ["bfl", "comfy"])
def test_flux_file_loads_as_its_folder(flux_files, layout):
    reference = load_model(flux_files["folder"], device="cpu")
    with flux_width(TINY_FLUX_WIDTH):
        model = load_model(flux_files[layout], device="cpu", config=flux_files["config"])
    assert model.kind == "flux" and model.embedded_guidance == reference.embedded_guidance
    _assert_same(reference, model)
    _same_velocity(reference, model)


# -- the CLI, as a user types it -----------------------------------------------------------------------
def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--quiet", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _reconstruct(capsys, image, out: Path, *model_args) -> dict:
    code, stdout, stderr = _run(capsys, "reconstruct", image, "--prompt", PROMPT, "--steps", 2, "--size", 32,
                                "--device", "cpu", "--out", out, "--json", *model_args)
    assert code == 0, stderr
    return json.loads(stdout)


def test_cli_reconstructs_from_single_files(capsys, tmp_path, image_file, sd3_files, flux_files):
    """``npinv reconstruct --model FILE --model-config FOLDER``: the same picture as from the folder."""
    sd3_file, sd3_config = sd3_files["medium"]
    runs = [(sd3_files["folder"], sd3_file, sd3_config), (flux_files["folder"], flux_files["bfl"], flux_files["config"])]
    for i, (folder, path, config) in enumerate(runs):
        want = _reconstruct(capsys, image_file, tmp_path / f"folder{i}.png", "--model", folder)
        with flux_width(TINY_FLUX_WIDTH):
            got = _reconstruct(capsys, image_file, tmp_path / f"file{i}.png", "--model", path, "--model-config", config)
        assert got["unet_calls"] == want["unet_calls"] and got["psnr"] == pytest.approx(want["psnr"], rel=1e-6)
        pixels = [np.asarray(Image.open(run["out"]), dtype=np.int16) for run in (got, want)]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1  # float rounding (see _same_velocity) may flip a last bit


def _one_line(code: int, stdout: str, stderr: str) -> str:
    assert code == 2 and stdout == "", stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npinv: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_flow_file_without_config_is_refused_in_one_line(capsys, tmp_path, image_file, sd3_files, flux_files):
    for path, family in ((sd3_files["medium"][0], "Stable Diffusion 3"), (flux_files["bfl"], "FLUX")):
        code, stdout, stderr = _run(capsys, "reconstruct", image_file, "--prompt", PROMPT, "--model", path,
                                    "--steps", 2, "--device", "cpu", "--out", tmp_path / "x.png")
        line = _one_line(code, stdout, stderr)
        assert f"{path.name} is a single-file {family} checkpoint" in line and "--model-config" in line
    assert not (tmp_path / "x.png").exists()


def test_flow_file_with_another_family_config_is_refused_in_one_line(capsys, tmp_path, image_file, sd3_files,
                                                                     flux_files, sd_folder):
    sd3_file, sd3_config = sd3_files["medium"]
    vae_only = tmp_path / "vae_only.safetensors"  # a file without a transformer, e.g. a VAE
    save_single_file({k: v for k, v in load_file(sd3_file).items() if not k.startswith(SD3_PREFIX)}, vae_only)
    cases = [(sd3_file, flux_files["config"], "is a Stable Diffusion 3 checkpoint, but --model-config"),
             (flux_files["bfl"], sd_folder, "is a FLUX checkpoint, but --model-config"),
             (vae_only, sd3_config, "holds no Stable Diffusion 3 transformer")]
    for path, config, says in cases:
        code, stdout, stderr = _run(capsys, "reconstruct", image_file, "--prompt", PROMPT, "--model", path,
                                    "--model-config", config, "--steps", 2, "--device", "cpu", "--out", tmp_path / "x.png")
        assert says in _one_line(code, stdout, stderr)
    assert not (tmp_path / "x.png").exists()


# -- FLUX.1-dev vs FLUX.1-schnell: the file's guidance embedding against its config's -------------------
@pytest.fixture(scope="module")
def flux_variant_files(tmp_path_factory, flux_files, flux_schnell_folder):
    """A schnell transformer (no guidance embedding) in BFL's, ComfyUI's and diffusers' layouts, and the dev
    transformer of ``flux_files`` in diffusers' layout too (a FluxTransformer2DModel's state dict saved as is)."""
    from diffusers import FluxTransformer2DModel

    root = tmp_path_factory.mktemp("flux_variants")
    files = {"dev": {"bfl": flux_files["bfl"], "comfy": flux_files["comfy"], "diffusers": root / "dev.safetensors"},
             "schnell": {layout: root / f"schnell-{layout}.safetensors" for layout in ("bfl", "comfy", "diffusers")}}
    dev = FluxTransformer2DModel.from_pretrained(flux_files["folder"] / "transformer")
    schnell = FluxTransformer2DModel.from_pretrained(flux_schnell_folder / "transformer")
    save_single_file(dev.state_dict(), files["dev"]["diffusers"])
    save_single_file(schnell.state_dict(), files["schnell"]["diffusers"])
    save_single_file(flux_transformer_to_original(schnell), files["schnell"]["bfl"])
    save_single_file(flux_transformer_to_original(schnell, SD3_PREFIX), files["schnell"]["comfy"])
    return files


@pytest.mark.parametrize("layout", ["bfl", "comfy", "diffusers"])
def test_flux_dev_and_schnell_mismatch_is_refused_in_one_line(flux_variant_files, flux_files, flux_schnell_folder,
                                                              layout):
    """A schnell file with a dev config (diffusers: a meta-tensor error) and a dev file with a schnell config
    (diffusers: its guidance weights silently dropped, a schnell model) are both refused before any weights load."""
    from npinv.errors import NpinvError

    cases = [(flux_variant_files["schnell"][layout], flux_files["config"],
              ("FLUX.1-schnell-like", "without guidance embedding", "guidance_embeds: true", "FLUX.1-schnell")),
             (flux_variant_files["dev"][layout], flux_schnell_folder,
              ("FLUX.1-dev-like", "with guidance embedding", "guidance_embeds: false", "black-forest-labs/FLUX.1-dev"))]
    for path, config, says in cases:
        with pytest.raises(NpinvError) as caught:
            load_model(path, device="cpu", config=config)
        message = str(caught.value)
        assert "\n" not in message and path.name in message and str(config) in message, message
        assert all(words in message for words in says), message


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_flux_schnell_file_loads_with_its_schnell_config(flux_variant_files, flux_schnell_folder, layout):
    reference = load_model(flux_schnell_folder, device="cpu")
    with flux_width(TINY_FLUX_WIDTH):
        model = load_model(flux_variant_files["schnell"][layout], device="cpu", config=flux_schnell_folder)
    assert model.kind == "flux" and model.timestep_distilled and model.embedded_guidance is None
    _assert_same(reference, model)


def test_cli_refuses_flux_dev_schnell_mismatch_in_one_line(capsys, tmp_path, image_file, flux_variant_files,
                                                           flux_files, flux_schnell_folder):
    """Each mismatch through a command that inverts (its file, not its schnell config, named as what it is:
    the check runs before the config-only refusal of schnell for inversion) and through generate."""
    schnell_file, dev_file = flux_variant_files["schnell"]["bfl"], flux_variant_files["dev"]["comfy"]
    cases = [(("reconstruct", image_file), schnell_file, flux_files["config"], "FLUX.1-schnell-like"),
             (("reconstruct", image_file), dev_file, flux_schnell_folder, "FLUX.1-dev-like"),
             (("generate",), dev_file, flux_schnell_folder, "FLUX.1-dev-like")]
    for command, path, config, says in cases:
        with flux_width(TINY_FLUX_WIDTH):
            code, stdout, stderr = _run(capsys, *command, "--prompt", PROMPT, "--model", path, "--model-config", config,
                                        "--steps", 2, "--size", 32, "--device", "cpu", "--out", tmp_path / "x.png")
        line = _one_line(code, stdout, stderr)
        assert says in line and path.name in line and str(config) in line, line
    assert not (tmp_path / "x.png").exists()
