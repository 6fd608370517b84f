"""Flow models (SD3 / FLUX.1-dev) through every front end: loading, the CLI commands with the same flags and
JSON keys as on UNet models, the web engine, the Python API; NPI's identity and fixed-point inversion through
the service; the refusals (schnell asked to invert, FLUX without T5, an inversion of the other family)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from npinv.cli import main

STEPS = "2"
SOURCE, TARGET = "a red circle on blue background", "a green circle on blue background"
# The keys a UNet model's runs print (tests/test_cli.py and the commands' rows), which flow runs must print too.
RECONSTRUCT_KEYS = {"method", "steps", "guidance", "psnr", "ssim", "mse", "seconds", "unet_calls", "unet_rows", "out",
                    "invert_scheme", "model", "size"}
EDIT_KEYS = {"method", "controller", "source", "targets", "steps", "guidance", "seconds", "unet_calls", "unet_rows",
             "outputs", "grid", "invert_scheme"}
GENERATE_KEYS = {"prompt", "seed", "steps", "guidance", "seconds", "unet_calls", "out"}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--quiet", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, stderr: str) -> str:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npinv: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(params=["sd3", "flux-dev"])
def flow_folder(request, sd3_folder, flux_dev_folder) -> Path:
    return {"sd3": sd3_folder, "flux-dev": flux_dev_folder}[request.param]


@pytest.fixture(scope="module")
def sd3_model(sd3_folder):
    from npinv import load_model

    return load_model(sd3_folder, device="cpu")


def photo(size: int = 32) -> Image.Image:
    """A real photograph (scikit-image's astronaut), resized: smooth, unlike the flat scenes."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.LANCZOS)


# -- loading ---------------------------------------------------------------------------------------
def test_load_model_returns_the_flow_adapter(sd3_model, flux_dev_folder, sd3_no_t5_folder):
    import npinv
    from npinv.flow_model import FlowModel

    sd3 = sd3_model
    flux = npinv.load_model(flux_dev_folder, device="cpu", dtype="bf16")
    no_t5 = npinv.load_model(sd3_no_t5_folder, device="cpu")
    assert isinstance(sd3, FlowModel) and sd3.family == "sd3" and sd3.architecture == "flow"
    assert flux.family == "flux" and flux.embedded_guidance == 3.5 and flux.transformer.dtype == torch.bfloat16
    assert flux.vae.dtype == torch.float32  # the VAE's force_upcast, as for UNets
    assert no_t5.pipe.text_encoder_3 is None
    assert sd3.latent_channels == 4 and flux.latent_channels == 1 and sd3.network is sd3.transformer
    assert flux.edit_tokenizer is flux.pipe.tokenizer_2 and sd3.edit_tokenizer is sd3.pipe.tokenizer
    # The grid in fp32 whatever the network's dtype (flow arithmetic stays fp32).
    assert flux.schedule(4, latent_size=(16, 16)).sigmas.dtype == torch.float32


def test_models_json_says_each_family(capsys, sd3_folder, flux_schnell_folder):
    for folder, kind, invertible in ((sd3_folder, "sd3", True), (flux_schnell_folder, "flux", False)):
        code, stdout, stderr = run(capsys, "models", "--json", "--model", folder)
        assert code == 0, stderr
        info = json.loads(stdout)
        assert info["default"]["family"] == "unet"
        assert info["model"] | {"family": "flow", "kind": kind, "invertible": invertible} == info["model"]


# -- every front end, the same flags and keys as on UNet models ----------------------------------------
def test_reconstruct_edit_and_reuse_the_inversion(capsys, tmp_path, flow_folder, image_file):
    inv = tmp_path / "inv.safetensors"
    code, stdout, stderr = run(capsys, "reconstruct", image_file, "--prompt", SOURCE, "--model", flow_folder,
                               "--steps", STEPS, "--size", 32, "--out", tmp_path / "rec.png", "--json",
                               "--invert-scheme", "fixed-point", "--save-inversion", inv)
    assert code == 0, stderr
    row = json.loads(stdout)
    assert RECONSTRUCT_KEYS <= row.keys() and row["invert_scheme"] == "fixed-point" and row["size"] == [32, 32]
    assert Image.open(tmp_path / "rec.png").size == (32, 32)
    # An NPI edit from the saved inversion: 1 + 2T rows a step (T = 1), one call a step.
    code, stdout, stderr = run(capsys, "edit", image_file, "--inversion", inv, "--target", TARGET, "--controller",
                               "none", "--model", flow_folder, "--size", 32, "--out", tmp_path / "edit.png", "--json")
    assert code == 0, stderr
    row = json.loads(stdout)
    assert EDIT_KEYS <= row.keys() and row["source"] == SOURCE and row["invert_scheme"] == "fixed-point"
    assert row["unet_calls"] == int(STEPS) and row["unet_rows"] == 3 * int(STEPS)
    assert Image.open(tmp_path / "edit.png").size == (32, 32)


def test_generate(capsys, tmp_path, sd3_folder):
    """FLUX generates in test_schnell_is_refused_for_inversion_but_generates."""
    code, stdout, stderr = run(capsys, "generate", "--prompt", SOURCE, "--model", sd3_folder, "--steps", STEPS,
                               "--size", 32, "--out", tmp_path / "gen.png", "--json")
    assert code == 0, stderr
    row = json.loads(stdout)
    assert GENERATE_KEYS <= row.keys() and row["unet_calls"] == int(STEPS)
    assert Image.open(tmp_path / "gen.png").size == (32, 32)


def test_edit_batch_and_edit_video(capsys, tmp_path, flux_dev_folder, image_file):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"image": str(image_file), "source": SOURCE, "targets": [TARGET]}) + "\n")
    code, stdout, stderr = run(capsys, "edit-batch", manifest, "--out", tmp_path / "batch", "--model",
                               flux_dev_folder, "--steps", STEPS, "--size", 32, "--controller", "none", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["edits"] == summary["done_now"] == 1
    assert len((tmp_path / "batch" / "results.jsonl").read_text().splitlines()) == 1
    pytest.importorskip("av")
    from videos import make_video

    video = make_video(tmp_path / "in.mp4", 2, 8)
    code, stdout, stderr = run(capsys, "edit-video", video, "--source", SOURCE, "--target", TARGET, "--model",
                               flux_dev_folder, "--steps", STEPS, "--size", 32, "--controller", "none",
                               "--out", tmp_path / "out.mp4", "--json")
    assert code == 0, stderr
    row = json.loads(stdout)
    assert row["frames"] == 2 and row["width"] == 32 and row["unet_rows"] == 2 * (1 + 3) * int(STEPS)


def test_benches(capsys, tmp_path, sd3_folder):
    code, stdout, stderr = run(capsys, "bench", "reconstruct", "--model", sd3_folder, "--shapes", 1, "--steps", STEPS,
                               "--methods", "npi", "--lpips", "none", "--out", tmp_path / "rec")
    assert code == 0, stderr
    assert len((tmp_path / "rec" / "results.jsonl").read_text().splitlines()) == 1
    code, stdout, stderr = run(capsys, "bench", "edit-shapes", "--model", sd3_folder, "--scenes", 1, "--steps", STEPS,
                               "--methods", "npi", "--direct", "no", "--controllers", "none", "--no-blend",
                               "--out", tmp_path / "edit")
    assert code == 0, stderr
    assert len((tmp_path / "edit" / "edit_results.jsonl").read_text().splitlines()) >= 1


def test_web_engine(tmp_path, sd3_model, image_file):
    from npinv.webapp.engine import Engine

    engine = Engine(sd3_model, files_dir=tmp_path / "files")
    cache = engine.new_cache()
    first = engine.invert(cache, image_file, SOURCE, steps=2)
    request = engine.edit_request(TARGET, controller="none")
    report = engine.edit(cache, image_file, SOURCE, request, steps=2)
    assert first.psnr == pytest.approx(report.psnr) and report.edited.size == (32, 32)
    assert report.result.cost.unet_rows == 3 * 2  # the inversion came from the session's cache


# -- NPI's identity and exact inversion through the service ---------------------------------------
def test_npi_at_7_5_is_the_guidance_1_round_trip(sd3_model):
    from npinv.service import invert_one, prepare_picture, reconstruct_inverted
    from npinv.settings import InvertSettings, ReconstructSettings

    settings = InvertSettings(steps=4, invert_scheme="ddim")
    inverted = invert_one(sd3_model, prepare_picture(photo(), sd3_model, settings), SOURCE, settings)
    at = {w: reconstruct_inverted(sd3_model, inverted, ReconstructSettings(method="npi", guidance=w)) for w in (1.0, 7.5)}
    assert float((at[7.5].reconstruction.latent - at[1.0].reconstruction.latent).abs().max()) == 0.0


def test_fixed_point_reconstructs_to_the_vae_round_trip(sd3_model):
    from npinv.metrics import image_metrics, tensor_to_unit
    from npinv.service import invert_one, prepare_picture, reconstruct_inverted
    from npinv.settings import InvertSettings, ReconstructSettings

    settings = InvertSettings(steps=10, invert_scheme="fixed-point")
    source = prepare_picture(photo(), sd3_model, settings)
    vae = sd3_model.decode(sd3_model.encode_image(source.image))
    vae_psnr = image_metrics(tensor_to_unit(source.image), tensor_to_unit(vae))["psnr"]
    z0 = sd3_model.encode_image(source.image)
    errors = {}
    for scheme in ("fixed-point", "ddim"):
        settings = InvertSettings(steps=10, invert_scheme=scheme)
        rec = reconstruct_inverted(sd3_model, invert_one(sd3_model, source, SOURCE, settings),
                                   ReconstructSettings(method="npi", guidance=7.5))
        errors[scheme] = float((rec.reconstruction.latent - z0).abs().max())
        if scheme == "fixed-point":
            assert abs(rec.psnr - vae_psnr) < 0.1, (rec.psnr, vae_psnr)
    # The tiny random network's field is gentle (plain Euler inversion is close too): the latents tell them apart.
    assert errors["fixed-point"] < errors["ddim"] / 10, errors


# -- bad input: one line, exit 2 --------------------------------------------------------------------
def test_schnell_is_refused_for_inversion_but_generates(capsys, tmp_path, flux_schnell_folder, image_file):
    for command in (["reconstruct", image_file, "--prompt", SOURCE], ["edit", image_file, "--source", SOURCE,
                                                                      "--target", TARGET]):
        code, stdout, stderr = run(capsys, *command, "--model", flux_schnell_folder, "--steps", STEPS,
                                   "--out", tmp_path / "x.png")
        assert "timestep-distilled" in one_line(code, stderr) and stdout == ""
    assert not (tmp_path / "x.png").exists()
    code, _, stderr = run(capsys, "generate", "--prompt", SOURCE, "--model", flux_schnell_folder, "--steps", STEPS,
                          "--size", 32, "--out", tmp_path / "gen.png")
    assert code == 0, stderr


def test_flux_without_t5_is_refused_before_loading(capsys, tmp_path, flux_dev_folder, image_file):
    no_folder = shutil.copytree(flux_dev_folder, tmp_path / "no-t5-folder")
    shutil.rmtree(no_folder / "text_encoder_2")
    dropped = shutil.copytree(flux_dev_folder, tmp_path / "no-t5-listed")
    index = json.loads((dropped / "model_index.json").read_text())
    index["text_encoder_2"] = index["tokenizer_2"] = [None, None]
    (dropped / "model_index.json").write_text(json.dumps(index))
    for folder in (no_folder, dropped):
        for command in (["reconstruct", image_file, "--prompt", SOURCE], ["generate", "--prompt", SOURCE]):
            code, _, stderr = run(capsys, *command, "--model", folder, "--steps", STEPS, "--out", tmp_path / "x.png")
            assert "T5" in one_line(code, stderr)


def test_an_inversion_of_the_other_family_is_refused(capsys, tmp_path, sd3_folder, sd_folder, image_file):
    made = {}
    for name, folder in (("flow", sd3_folder), ("unet", sd_folder)):
        made[name] = tmp_path / f"{name}.safetensors"
        code, _, stderr = run(capsys, "reconstruct", image_file, "--prompt", SOURCE, "--model", folder, "--steps",
                              STEPS, "--out", tmp_path / f"{name}.png", "--save-inversion", made[name])
        assert code == 0, stderr
    for inv, folder, family in ((made["flow"], sd_folder, "flow-matching"), (made["unet"], sd3_folder, "UNet")):
        code, stdout, stderr = run(capsys, "edit", image_file, "--inversion", inv, "--target", TARGET, "--model",
                                   folder, "--out", tmp_path / "e.png")
        assert f"made with a {family} model" in one_line(code, stderr) and stdout == ""
    assert not (tmp_path / "e.png").exists()


def test_the_flow_inversion_file_keeps_its_grid(tmp_path, flux_dev_folder, image_file):
    """FLUX's dynamic shift: the file's sigmas are the inversion's, and its model record says the family
    and the embedded guidance."""
    from npinv import load_model
    from npinv.inversion import Inversion
    from npinv.service import invert_one, prepare_file
    from npinv.settings import InvertSettings

    model = load_model(flux_dev_folder, device="cpu")
    settings = InvertSettings(steps=3, size=16, invert_scheme="ddim")
    inverted = invert_one(model, prepare_file(image_file, model, settings), SOURCE, settings)
    path = inverted.inversion.save(tmp_path / "inv.safetensors")
    loaded = Inversion.load(path)
    assert loaded.model["family"] == "flux" and loaded.model["embedded_guidance"] == 3.5
    grid = loaded.schedule_for(model)
    assert torch.equal(grid.sigmas, model.schedule(3, latent_size=(16, 16)).sigmas)
    assert loaded.schedule["mu"] is not None and np.isfinite(loaded.schedule["mu"])


# -- other ways to name a model ---------------------------------------------------------------------
def test_a_flux_transformer_file_with_its_config_folder(tmp_path, flux_dev_folder):
    """FLUX checkpoints hold the transformer only: the rest comes from --model-config."""
    from safetensors.torch import save_file

    import npinv

    whole = npinv.load_model(flux_dev_folder, device="cpu")
    path = tmp_path / "flux-transformer.safetensors"
    save_file({k: v.contiguous() for k, v in whole.transformer.state_dict().items()}, str(path))
    single = npinv.load_model(path, device="cpu", config=flux_dev_folder)
    assert single.family == "flux" and single.fingerprint == whole.fingerprint


def test_a_cached_hub_id(capsys, tmp_path, monkeypatch, sd3_folder, image_file):
    """A hub id in the local cache, offline: the family from its cached model_index.json, the same run."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--npinv-test--tiny-sd3"
    shutil.copytree(sd3_folder, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, stdout, stderr = run(capsys, "models", "--model", "npinv-test/tiny-sd3", "--json")
    assert code == 0 and json.loads(stdout)["model"]["kind"] == "sd3", stderr
    code, stdout, stderr = run(capsys, "reconstruct", image_file, "--prompt", SOURCE, "--model", "npinv-test/tiny-sd3",
                               "--steps", STEPS, "--out", tmp_path / "rec.png", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["model"] == "npinv-test/tiny-sd3" and stderr == "", stderr


def test_a_timestep_offset_is_refused_before_loading(capsys, tmp_path, sd3_folder, image_file, monkeypatch):
    import npinv.model

    monkeypatch.setattr(npinv.model, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    code, _, stderr = run(capsys, "reconstruct", image_file, "--prompt", SOURCE, "--model", sd3_folder, "--offset", 1,
                          "--out", tmp_path / "x.png")
    assert "no timestep offset" in one_line(code, stderr)


def test_offload_needs_cuda(capsys, tmp_path, flux_dev_folder, image_file):
    """--offload (diffusers' model CPU offload) is CUDA only: refused in one line on the CPU, before loading."""
    from npinv.errors import NpinvError
    from npinv.model import load_model

    code, _, stderr = run(capsys, "reconstruct", image_file, "--prompt", SOURCE, "--model", flux_dev_folder,
                          "--offload", "--device", "cpu", "--out", tmp_path / "x.png")
    assert "--offload" in one_line(code, stderr) and not (tmp_path / "x.png").exists()
    with pytest.raises(NpinvError, match="CUDA device"):
        load_model(flux_dev_folder, device="cpu", offload=True)


@pytest.mark.parametrize("name,value", [("self_replace_size", 0.25), ("blend_res", 8)])
def test_a_unet_layer_knob_is_refused_on_a_flow_model(capsys, tmp_path, sd3_folder, sd3_model, image_file, name,
                                                      value):
    """Both pick UNet layers by map size; every flow block has one map size, so they would do nothing."""
    from npinv.errors import NpinvError
    from npinv.webapp.engine import Engine

    flag = "--" + name.replace("_", "-")
    out = tmp_path / "edit.png"
    code, stdout, stderr = run(capsys, "edit", image_file, "--source", SOURCE, "--target", TARGET, "--model",
                               sd3_folder, "--steps", STEPS, "--size", 32, "--out", out, "--json", flag, value)
    line = one_line(code, stderr)
    assert flag in line and "no effect" in line and stdout == "" and not out.exists()
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"image": str(image_file), "source": SOURCE, "target": TARGET, name: value}) + "\n")
    code, stdout, stderr = run(capsys, "edit-batch", manifest, "--out", tmp_path / "batch", "--model", sd3_folder,
                               "--steps", STEPS, "--size", 32, "--json")
    assert flag in one_line(code, stderr) and not (tmp_path / "batch" / "results.jsonl").exists()
    engine = Engine(sd3_model, files_dir=tmp_path / "files")
    before = sd3_model.counter.calls
    with pytest.raises(NpinvError, match="no effect"):
        engine.edit(engine.new_cache(), image_file, SOURCE, engine.edit_request(TARGET, **{name: value}), steps=2)
    assert sd3_model.counter.calls == before  # refused before the inversion


def test_the_web_form_leaves_out_the_knobs_the_model_cannot_use(tmp_path, sd3_model, sd_model):
    from npinv.webapp.app import ServeOptions, build_app
    from npinv.webapp.engine import Engine

    def ids(model) -> set:
        demo = build_app(Engine(model, files_dir=tmp_path / model.name.replace("/", "_")), ServeOptions(examples=False))
        return {getattr(b, "elem_id", None) for b in demo.blocks.values()}

    # Choosing FlowEdit moves the guidance slider to its own default (the paper's target guidance), and back.
    demo = build_app(Engine(sd3_model, files_dir=tmp_path / "sd3"), ServeOptions(examples=False))
    follow = next(d for d in demo.fns.values() if [b.elem_id for b in d.inputs] == ["npinv-method"])
    assert [b.elem_id for b in follow.outputs] == ["npinv-guidance"]
    assert (follow.fn("flowedit"), follow.fn("npi")) == (13.5, sd3_model.edit_guidance)

    knobs = {"npinv-self-replace-size", "npinv-blend-res"}
    assert knobs <= ids(sd_model) and not knobs & ids(sd3_model)
    assert "npinv-self-replace" in ids(sd3_model)  # the window itself acts on joint attention
    flowedit = {"npinv-flowedit-n-max", "npinv-flowedit-n-min", "npinv-flowedit-n-avg", "npinv-flowedit-source-guidance"}
    assert flowedit <= ids(sd3_model) and not flowedit & ids(sd_model)  # FlowEdit is not offered on a UNet


def test_web_flowedit_on_a_fresh_upload_encodes_only_and_reuses_a_session_inversion(tmp_path, sd3_model, image_file):
    from npinv.webapp.engine import Engine

    engine = Engine(sd3_model, files_dir=tmp_path / "files")
    request = engine.edit_request(TARGET, method="flowedit", controller="none")
    fresh = engine.edit(engine.new_cache(), image_file, SOURCE, request, steps=2)
    assert fresh.inversion_file is None and fresh.result.inverted.inversion.encoded_only
    assert fresh.result.inverted.cost.unet_calls == 0  # no inversion was run for it
    assert fresh.result.cost.unet_calls == fresh.result.edit_cost.unet_calls > 0
    cache = engine.new_cache()
    engine.invert(cache, image_file, SOURCE, steps=2)
    again = engine.edit(cache, image_file, SOURCE, request, steps=2)
    assert again.timings.inversion_cached and again.inversion_file is not None  # the session's, downloadable
    assert torch.equal(again.result.images, fresh.result.images)  # FlowEdit reads the clean latent only
