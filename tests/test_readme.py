"""The README's Python example, run as printed on the embedded model."""

from __future__ import annotations

import re
from pathlib import Path

from npinv.scenes import Scene, read_scene

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs_as_printed(tmp_path, monkeypatch):
    from npinv.io import tensor_to_image
    from npinv.model import model_edit_guidance

    code = re.search(r"## Python\s+```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (tmp_path / "src").symlink_to(ROOT / "src")  # the example names a file relative to the repository
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    rec, edited, inverted = scope["rec"], scope["edited"], scope["inverted"]
    assert rec.psnr > 28 and rec.cost.unet_calls == 100 and rec.invert_cost.unet_calls == 50
    assert edited.settings.guidance == model_edit_guidance(None) and edited.edit_cost.unet_calls == 50
    assert read_scene(tensor_to_image(edited.images[:1])).matches(Scene("circle", "green", "blue"))
    assert (tmp_path / "inv.safetensors").is_file() and inverted.inversion.steps == 50


def test_readme_exact_inversion_command_runs_as_printed(tmp_path, monkeypatch, capsys):
    """The exact-inversion command (BDIA by default for reconstruct, 5 steps, decoder inversion) beats
    the VAE's own round trip of the example, at one UNet call a step."""
    import json
    import shlex

    from npinv.cli import main
    from npinv.io import image_to_tensor, load_image
    from npinv.metrics import image_metrics, tensor_to_unit
    from npinv.model import load_model

    block = re.search(r"## Exact inversion.*?```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == [".venv/bin/npinv", "reconstruct"] and "--invert-scheme" not in argv
    (tmp_path / "src").symlink_to(ROOT / "src")
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet", *argv[1:]]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["invert_scheme"] == "bdia" and row["decoder_steps"] == 100 and row["unet_calls"] == 5 + 4
    model = load_model()
    x = image_to_tensor(load_image(ROOT / "src/npinv/examples/red_circle.png"))
    vae = image_metrics(tensor_to_unit(x), tensor_to_unit(model.decode(model.encode_image(x))))["psnr"]
    assert row["psnr"] > vae + 1.0, (row["psnr"], vae)


def test_readme_flow_commands_run_as_printed(tmp_path, monkeypatch, capsys, sd3_folder, flux_dev_folder):
    """The "Flow models" commands, literally, with ./sd3-medium and ./flux-dev the tiny test folders."""
    import json
    import shlex

    from npinv.cli import main

    block = re.search(r"## Flow models.*?```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [[".venv/bin/npinv", c] for c in ("models", "reconstruct", "edit", "generate")]
    (tmp_path / "src").symlink_to(ROOT / "src")
    (tmp_path / "sd3-medium").symlink_to(sd3_folder)
    (tmp_path / "flux-dev").symlink_to(flux_dev_folder)
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        assert main(["--quiet", *argv[1:]]) == 0, argv
        out = capsys.readouterr().out
        if argv[1] == "models":
            assert json.loads(out)["model"]["family"] == "flow"
    assert all((tmp_path / f).is_file() for f in ("rec.png", "circle.safetensors", "green.png", "flux.png"))


def test_readme_flow_demo_runs_as_printed(tmp_path, monkeypatch):
    """The embedded flow model's demo command, literally, gives the table the README prints (PSNR and
    SSIM to their printed digits give or take a unit of rounding, model calls exactly)."""
    import json
    import shlex

    from npinv.cli import main

    found = re.search(r"## The embedded flow model.*?```sh\n(.*?)```\s*```\n(.*?)```", (ROOT / "README.md").read_text(),
                      re.S)
    argv = shlex.split(found.group(1).replace("\\\n", " "))
    assert argv[:2] == [".venv/bin/npinv", "demo"] and "--model" in argv
    printed = {}
    for line in found.group(2).splitlines()[1:]:
        method, w, psnr_db, ssim, _seconds, calls = line.split()
        printed[(method, float(w.removeprefix("w=")))] = (float(psnr_db), float(ssim), int(calls))
    (tmp_path / "src").symlink_to(ROOT / "src")
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet", *argv[1:]]) == 0
    out = Path(argv[argv.index("--out") + 1])
    report = json.loads((out / "demo_reconstruction.json").read_text())
    rows = {(r["method"], r["guidance"]): r for r in report["rows"] if "guidance" in r}
    assert rows.keys() == printed.keys()
    for key, (psnr_db, ssim, calls) in printed.items():
        assert abs(rows[key]["psnr"] - psnr_db) <= 0.015 and abs(rows[key]["ssim"] - ssim) <= 0.0015, key
        assert rows[key]["unet_calls"] == calls, key
    assert (out / "demo_reconstruction.png").is_file() and (out / "demo_edit.png").is_file()
