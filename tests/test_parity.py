"""One image, prompts and settings through every front end: the Python API (the service),
`npinv edit`, `npinv edit-batch` (settings in the manifest row, and as flags) and the web app's
handler give byte-identical PNGs and the same UNet calls and rows (inversion + edit)."""

from __future__ import annotations

import json

import pytest

from npinv.cli import main
from npinv.io import save_image, tensor_to_image
from npinv.scenes import Scene
from npinv.service import edit_image, prepare_file
from npinv.settings import EditSettings, InvertSettings, as_json, flag_name, from_value, specs

SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"
CASES = {
    "npi-replace-blend": {"method": "npi", "controller": "replace", "guidance": 3.0, "cross_replace": [0.1, 0.7],
                          "self_replace": 0.5, "blend": ["red", "green"], "blend_start": 0.4},
    "proxnpi-refine-reweight": {"method": "proxnpi", "controller": "refine", "guidance": 5.0, "reweight": {"green": 1.5},
                                "prox_quantile": 0.6, "recon_t": 600, "direct": True},
}
STEPS = 3


def flags(values: dict) -> list[str]:
    """The command-line flags of a settings dict (JSON values), through each setting's text form."""
    known = {f.name for f, _ in specs(EditSettings)}
    out = []
    for name, value in values.items():
        flag = f"--{flag_name(name)}"
        if value is True:
            out.append(flag)
        elif name == "blend":
            out += [flag, *value]
        elif name == "reweight":
            for word, scale in value.items():
                out += [flag, f"{word}={scale}"]
        elif isinstance(value, list):
            out += [flag, ",".join(map(str, value))]
        else:
            assert name in known
            out += [flag, str(value)]
    return out


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "in.png"
    Scene("circle", "red", "blue", 0.5).render(32).save(path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_every_front_end_gives_the_same_bytes_and_counts(case, picture, tmp_path, sd_folder, sd_model, capsys):
    values = CASES[case]
    settings = from_value(EditSettings, values)
    inv_settings = InvertSettings(steps=STEPS)
    outputs, counts = {}, {}

    # The Python API.
    edited = edit_image(sd_model, prepare_file(picture, sd_model, inv_settings), SOURCE, [TARGET], settings,
                        inv_settings)
    outputs["api"] = save_image(tensor_to_image(edited.images[:1]), tmp_path / "api.png")
    counts["api"] = (edited.cost.unet_calls, edited.cost.unet_rows)

    # npinv edit.
    argv = ["--quiet", "edit", str(picture), "--source", SOURCE, "--target", TARGET, "--steps", str(STEPS),
            *flags(values), "--model", str(sd_folder), "--json"]
    assert main([*argv, "--out", str(tmp_path / "cli.png")]) == 0
    row = json.loads(capsys.readouterr().out)
    outputs["cli"], counts["cli"] = tmp_path / "cli.png", (row["unet_calls"], row["unet_rows"])

    # npinv edit-batch: the settings in the manifest row, then as the run's flags.
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({"image": str(picture), "source": SOURCE, "target": TARGET, **values}) + "\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"image": str(picture), "source": SOURCE, "target": TARGET}) + "\n")
    for name, (path, extra) in {"batch-row": (manifest, []), "batch-flags": (plain, flags(values))}.items():
        out = tmp_path / name
        assert main(["--quiet", "edit-batch", str(path), "--steps", str(STEPS), *extra, "--model", str(sd_folder),
                     "--out", str(out), "--json"]) == 0, capsys.readouterr().err
        capsys.readouterr()
        result = json.loads((out / "results.jsonl").read_text().splitlines()[0])
        outputs[name], counts[name] = out / "edits" / "00001-0-in.png", (result["unet_calls"], result["unet_rows"])

    # The web app's handler.
    from npinv.cache import InversionCache
    from npinv.webapp.engine import Engine

    engine = Engine(sd_model)
    try:
        form = {k: (" ".join(v) if k == "blend" else
                    " ".join(f"{w}={s}" for w, s in v.items()) if k == "reweight" else
                    ",".join(map(str, v)) if isinstance(v, list) else v) for k, v in values.items()}
        request = engine.edit_request(TARGET, **form)
        assert as_json(request.settings) == as_json(settings.resolved(sd_model))  # the form's empty: the model's
        report = engine.edit(InversionCache(), picture, SOURCE, request, steps=STEPS)
        web = tmp_path / "web.png"
        web.write_bytes(report.edit_file.read_bytes())
        outputs["web"], counts["web"] = web, (report.timings.unet_calls, report.timings.unet_rows)
    finally:
        engine.close()

    reference = outputs["api"].read_bytes()
    assert {name: path.read_bytes() == reference for name, path in outputs.items()} == dict.fromkeys(outputs, True)
    assert len(set(counts.values())) == 1, counts
    calls, rows = counts["api"]
    assert calls == 2 * STEPS  # inversion + edit, one UNet call a step each
