"""The embedded flow model (npinv-shapes-flow-64): it ships, loads by name in npinv and in diffusers
alone, keeps NPI's identity, reconstructs to its VAE's round trip, follows captions and edits."""

from __future__ import annotations

import json

import pytest
import torch

from npinv.demo import bundled_examples
from npinv.io import tensor_to_image
from npinv.metrics import psnr, tensor_to_unit
from npinv.model import EMBEDDED_MODELS, embedded_model_path, load_model, model_settings
from npinv.scenes import Scene, read_scene
from npinv.service import edit_image, generate, invert_one, prepare_file, reconstruct_inverted
from npinv.settings import EditSettings, InvertSettings, ReconstructSettings

FOLDER = embedded_model_path("shapes-flow")


@pytest.fixture(scope="module")
def flow():
    return load_model("shapes-flow", device="cpu")


@pytest.fixture(scope="module")
def example(flow):
    item = bundled_examples()[0]
    return item, prepare_file(item["path"], flow, InvertSettings())


def test_ships_small_with_its_card_and_loads_in_diffusers_alone():
    from diffusers import StableDiffusion3Pipeline

    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size <= 30 * 1024 * 1024
    for name in ("MODEL_CARD.md", "loss_curve.png", "samples.png", "train_log.jsonl", "train_config.json"):
        assert (FOLDER / name).is_file(), name
    declared = model_settings("shapes-flow")
    assert declared.max_sequence_length == 0 and declared.edit_guidance != 7.5  # measured by its card
    card = json.loads((FOLDER / "model_card_figures.json").read_text())
    assert (declared.edit_guidance, declared.edit_self_replace) == (card["recommended_guidance"],
                                                                   card["recommended_self_replace"])
    assert declared.edit_self_replace != 0.6  # its card's sweep found a better window than npinv's default
    pipe = StableDiffusion3Pipeline.from_pretrained(FOLDER, text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a yellow square on a blue background", max_sequence_length=0, num_inference_steps=20, height=64,
                 width=64, guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images[0]
    assert read_scene(image).matches(Scene("square", "yellow", "blue"))


@pytest.mark.parametrize("name", ["shapes-flow", "npinv-shapes-flow-64"])
def test_selected_by_name(flow, name):
    assert name in EMBEDDED_MODELS[1].aliases
    assert flow.name == "npinv-shapes-flow-64" and flow.is_flow and flow.family == "sd3"
    assert flow.max_sequence_length == 0 and flow.resolution == 64


def test_models_lists_both_embedded_models(capsys):
    from npinv.cli import main

    assert main(["models", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["default"]["name"] == "npinv-shapes-64" and info["default"]["family"] == "unet"
    assert info["shapes-flow"] == {"name": "npinv-shapes-flow-64", "path": str(FOLDER), "available": True,
                                   "family": "flow", "kind": "sd3", "invertible": True, "edit_guidance": 1.5,
                                   "edit_self_replace": 0.2}


def test_npi_is_the_round_trip_and_exact_inversion_reaches_the_vae(flow, example):
    item, source = example
    x = tensor_to_unit(source.image)
    plain = invert_one(flow, source, item["prompt"], InvertSettings(steps=10))
    npi = reconstruct_inverted(flow, plain, ReconstructSettings("npi", 7.5))
    once = reconstruct_inverted(flow, plain, ReconstructSettings("ddim", 1.0))
    assert torch.equal(npi.reconstruction.image, once.reconstruction.image)
    vae = psnr(x, tensor_to_unit(flow.decode(flow.encode_image(source.image))))
    exact = invert_one(flow, source, item["prompt"], InvertSettings(steps=10, invert_scheme="fixed-point"))
    rec = reconstruct_inverted(flow, exact, ReconstructSettings("npi", 7.5))
    assert rec.psnr >= vae - 0.1 > npi.psnr - 0.1
    drift = reconstruct_inverted(flow, plain, ReconstructSettings("ddim", 7.5))
    assert drift.psnr < npi.psnr - 5  # plain guidance with the empty negative drifts


def test_generate_follows_the_caption(flow):
    scene = Scene("triangle", "red", "white")
    hits = [read_scene(tensor_to_image(generate(flow, scene.caption, seed=s, steps=20).image)).matches(scene)
            for s in range(3)]
    assert sum(hits) >= 2


def test_colour_swap_with_word_swap_and_local_blend(flow, example):
    from npinv.bench.edit_shapes import EditCase, keep_region, region_psnr
    from npinv.scenes import Edit

    item, source = example
    scene = Scene(**item["scene"])
    case = EditCase(0, scene, Edit("color", "green"))
    settings = EditSettings(method="npi", controller="replace", blend=("red", "green"))  # the model's guidance
    done = edit_image(flow, source, scene.caption, [case.target.caption], settings, InvertSettings(steps=50))
    assert (done.settings.guidance, done.settings.self_replace) == (flow.edit_guidance, flow.edit_self_replace)
    assert read_scene(tensor_to_image(done.images)).matches(case.target)
    bg = region_psnr(tensor_to_unit(done.images), tensor_to_unit(source.image), keep_region(case, 64))
    assert bg >= 28.0
    assert done.edit_cost.unet_rows == 3 * 50
    assert done.result.controller.seen["blend_read"] == {(8, 8)}  # joint-attention maps, one per 2x2 patch


def test_demo_command(tmp_path, capsys):
    from npinv.cli import main

    assert main(["--quiet", "demo", "--model", "shapes-flow", "--steps", "10", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "demo_reconstruction.json").read_text())
    rows = {(r["method"], r["guidance"]): r for r in report["rows"] if "guidance" in r}
    assert rows[("npi", 7.5)]["psnr"] == rows[("ddim", 1.0)]["psnr"] and rows[("npi", 7.5)]["unet_calls"] == 20
    assert (tmp_path / "demo_reconstruction.png").is_file() and (tmp_path / "demo_edit.png").is_file()
    assert "npinv-shapes-flow-64" in capsys.readouterr().out


def test_web_engine_serves_it(flow, tmp_path):
    from npinv.webapp.engine import Engine

    item = bundled_examples()[0]
    engine = Engine(flow, files_dir=tmp_path / "files")
    cache = engine.new_cache()
    assert engine.edit_guidance == flow.edit_guidance  # the form starts at the model's declared guidance
    first = engine.invert(cache, item["path"], item["prompt"], steps=10)
    request = engine.edit_request("a green circle on a blue background", controller="replace", blend="red green")
    report = engine.edit(cache, item["path"], item["prompt"], request, steps=10)
    assert first.psnr == pytest.approx(report.psnr) and report.edited.size == (64, 64)
    assert report.result.cost.unet_rows == 3 * 10  # the inversion came from the session's cache
    assert read_scene(report.edited).matches(Scene("circle", "green", "blue"))
