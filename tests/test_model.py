"""Loading every family from every kind of spec, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm_export import export_single_file
from npinv import load_model
from npinv.errors import NpinvError
from npinv.model import NpinvWarning


def _same_outputs(a, b) -> None:
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = a.encode_prompt("a photo of a cat")
    torch.testing.assert_close(a.unet_output(z, 500, cond), b.unet_output(z, 500, b.encode_prompt("a photo of a cat")))


@pytest.mark.parametrize("fixture,family,prediction", [
    ("sd_folder", "sd", "epsilon"), ("sd_v_folder", "sd", "v_prediction"), ("sdxl_folder", "sdxl", "epsilon")])
def test_folder(request, fixture, family, prediction):
    model = load_model(str(request.getfixturevalue(fixture)), device="cpu")
    assert model.family == family and model.prediction_type == prediction
    assert model.resolution == 32 and model.unet.dtype == torch.float32
    emb = model.encode_prompt("a photo of a cat")
    assert emb.hidden.shape[0] == 1 and (emb.pooled is not None) == (family == "sdxl")
    assert model.counter.calls == 0


@pytest.mark.parametrize("fixture", ["sd_folder", "sdxl_folder"])
def test_single_safetensors_file(request, tmp_path, fixture):
    folder = request.getfixturevalue(fixture)
    reference = load_model(str(folder), device="cpu")
    path = tmp_path / "model.safetensors"
    export_single_file(reference.pipe, path)
    model = load_model(str(path), device="cpu", config=str(folder))
    assert model.family == reference.family
    _same_outputs(reference, model)


def test_pickle_checkpoint_needs_opt_in(tmp_path, sd_folder):
    from safetensors.torch import load_file

    reference = load_model(str(sd_folder), device="cpu")
    st = tmp_path / "model.safetensors"
    export_single_file(reference.pipe, st)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(st)}, ckpt)
    with pytest.raises(NpinvError, match="pickle checkpoint"):
        load_model(str(ckpt), device="cpu", config=str(sd_folder))
    model = load_model(str(ckpt), device="cpu", config=str(sd_folder), allow_pickle=True)
    _same_outputs(reference, model)


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NpinvError, match="cannot load model 'nobody/no-such-model'") as err:
        load_model("nobody/no-such-model", device="cpu")
    assert "(hf download nobody/no-such-model)" in str(err.value)  # the CLI the installed huggingface_hub ships
    import shutil
    import sysconfig

    scripts = Path(sysconfig.get_path("scripts"))
    assert (scripts / "hf").is_file() or shutil.which("hf")


def test_load_model_from_python_prints_nothing():
    """``import npinv; npinv.load_model()`` (the README's snippet) writes nothing on stderr: no
    transformers warning about torchvision, which npinv never uses."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import npinv; npinv.load_model(device='cpu')"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_uncached_hub_id_is_checked_before_the_weights(tmp_path, monkeypatch, sd_folder, image_file, capsys):
    """With a network, an uncached hub id's scheduler and VAE configs are fetched alone (a few KB), so
    that a step count the model cannot honour is refused before the weights' download; offline the
    load, the first thing that needs the model, refuses at once."""
    import huggingface_hub
    import huggingface_hub.constants

    import npinv.model
    from npinv.cli import main

    fetched = []

    def download(repo, name, **kwargs):
        fetched.append(name)
        return str(sd_folder / name)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(npinv.model, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    argv = ["--quiet", "reconstruct", str(image_file), "--prompt", "a cat", "--model", "npinv-test/not-cached",
            "--out", str(tmp_path / "r.png")]
    assert main([*argv, "--steps", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--offset 0" in err, err
    assert fetched == ["model_index.json", "scheduler/scheduler_config.json", "vae/config.json"]  # the index: the family
    # Unreachable (no network, no such repo): nothing to check against; the load says what is wrong.
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    monkeypatch.setattr(npinv.model, "load_model", lambda *a, **k: (_ for _ in ()).throw(NpinvError("not loaded")))
    assert main([*argv, "--steps", "1000"]) == 2
    assert capsys.readouterr().err == "npinv: error: not loaded\n"


def test_bad_specs(tmp_path):
    with pytest.raises(NpinvError, match="not a diffusers model folder"):
        load_model(str(tmp_path), device="cpu")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(NpinvError, match="unsupported checkpoint"):
        load_model(str(tmp_path / "w.onnx"), device="cpu")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(NpinvError, match="not a readable safetensors"):
        load_model(str(tmp_path / "broken.safetensors"), device="cpu")
    with pytest.raises(NpinvError, match="unknown dtype"):
        load_model(str(tmp_path), device="cpu", dtype="fp8")


def test_prompt_over_the_limit_warns(sd_model):
    with pytest.warns(NpinvWarning, match="over the tokenizer's limit"):
        emb = sd_model.encode_prompt(" ".join(["cat"] * 90))
    assert emb.hidden.shape[1] == 77


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch, sd_folder):
    """A hub id resolves from the Hugging Face cache with no network, as users expect."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--npinv-test--tiny-sd"
    shutil.copytree(sd_folder, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("_tok*"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = load_model("npinv-test/tiny-sd", device="cpu")
    assert model.name == "npinv-test/tiny-sd"
    _same_outputs(load_model(str(sd_folder), device="cpu"), model)


def test_unknown_word_warning_sees_every_script_and_emoji(sd_model, monkeypatch):
    """The check matched [a-z]+ only: accented, non-Latin words and emoji passed silently."""
    import warnings

    from npinv.model import prompt_words

    assert prompt_words("A red circle, on a blue background!") == ["a", "red", "circle", "on", "a", "blue", "background"]
    assert prompt_words("Café 東京 हिन्दी a red🔴circle ❤️ 👍🏽 © +") == [
        "café", "東京", "हिन्दी", "a", "red", "🔴", "circle", "❤️", "👍🏽", "©", "+"]
    assert prompt_words("a \u200b red ... circle -- ") == ["a", "red", "circle"]  # no words made of spacing or dots
    monkeypatch.setattr(sd_model, "known_words", frozenset("a red green circle on blue background".split()))
    with pytest.warns(NpinvWarning) as caught:
        sd_model.encode_prompt("a rouge cercle café 東京 🔴 on a blue background 🔴")
    message = str(caught[0].message)
    assert "vocabulary: rouge, cercle, café, 東京, 🔴 (" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd_model.encode_prompt("A red circle, on a blue background!")  # known words and punctuation: silent
