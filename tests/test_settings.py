"""The settings schema (npinv.settings) is the one place that checks a setting: every bound is
enforced with the same one-line message by the command line, an edit-batch manifest row (JSON and
CSV) and the web app. The table is derived from the schema itself, so a new setting is covered."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from npinv.cli import build_parser, main
from npinv.errors import NpinvError
from npinv.scenes import Scene
from npinv.settings import (
    Choice,
    EditSettings,
    Flag,
    InvertSettings,
    Number,
    Window,
    WordNumbers,
    WordPair,
    WordWindows,
    flag_name,
    from_text,
    from_value,
    specs,
)

SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"


def bad_values(kind) -> list[object]:
    """Values each kind must refuse, as JSON values (the command line gets their text)."""
    if isinstance(kind, Number):
        out = [kind.low - 1.5 if not kind.integer else int(kind.low) - 1, "lots"]
        out.append(kind.high + 0.5 if not kind.integer else int(kind.high) + 1)
        if kind.multiple > 1:
            out.append(kind.multiple * 8 + 1)
        return out
    if isinstance(kind, Choice):
        return ["bogus"]
    if isinstance(kind, Flag):
        return ["maybe"]
    if isinstance(kind, Window):
        return [1.5, "0.8,0.2", "soon"]
    if isinstance(kind, WordWindows):
        return ["red=1.5", "red"]
    if isinstance(kind, WordNumbers):
        return ["red=21", "red=x"]
    if isinstance(kind, WordPair):
        return ["red"]
    raise AssertionError(f"no bad values for {kind}")


CASES = [(cls, f.name, spec.kind, value) for cls in (EditSettings, InvertSettings) for f, spec in specs(cls)
         for value in bad_values(spec.kind)]


def text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def expected(cls, name, kind, value) -> str:
    """The schema's own message for this value."""
    with pytest.raises(NpinvError) as err:
        from_value(cls, {name: value})
    return str(err.value)


def test_every_setting_has_a_flag_a_manifest_key_and_help():
    parser = build_parser()
    edit = parser._subparsers._group_actions[0].choices["edit"]  # argparse keeps sub-commands here
    flags = {s for a in edit._actions for s in a.option_strings}
    for cls in (EditSettings, InvertSettings):
        for f, spec in specs(cls):
            assert f"--{flag_name(f.name)}" in flags and spec.help
    assert [f.name for f in dataclasses.fields(EditSettings) if "spec" not in f.metadata] == ["keep_attention_maps"]


@pytest.mark.parametrize("cls,name,kind,value", CASES, ids=[f"{c[1]}={c[3]}" for c in CASES])
def test_text_and_json_give_the_same_message(cls, name, kind, value):
    message = expected(cls, name, kind, value)
    assert message.startswith(f"{flag_name(name)} ") and "\n" not in message
    with pytest.raises(NpinvError) as err:
        from_text(cls, {name: text(value)})
    assert str(err.value) == message


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("settings")
    Scene("circle", "red", "blue", 0.5).render(32).save(folder / "in.png")
    return folder / "in.png"


@pytest.mark.parametrize("cls,name,kind,value", CASES, ids=[f"{c[1]}={c[3]}" for c in CASES])
def test_cli_and_manifest_give_the_schema_message(capsys, tmp_path, picture, sd_folder, cls, name, kind, value):
    message = expected(cls, name, kind, value)
    # A switch (--direct) takes no value and --blend takes two words: argparse refuses those shapes itself.
    if not isinstance(kind, (Flag, WordPair)):
        code = main(["--quiet", "edit", str(picture), "--source", SOURCE, "--target", TARGET,
                     f"--{flag_name(name)}", text(value), "--model", str(sd_folder), "--out", str(tmp_path / "out.png")])
        err = capsys.readouterr().err
        assert code == 2 and err == f"npinv: error: {message}\n"
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"image": str(picture), "source": SOURCE, "target": TARGET, name: value}) + "\n")
    code = main(["--quiet", "edit-batch", str(manifest), "--model", str(sd_folder), "--out", str(tmp_path / "batch")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"npinv: error: manifest.jsonl:1: {message}\n"
    csv = tmp_path / "manifest.csv"
    csv.write_text(f"image,source,target,{name}\n{picture},{SOURCE},{TARGET},\"{text(value)}\"\n")
    code = main(["--quiet", "edit-batch", str(csv), "--model", str(sd_folder), "--out", str(tmp_path / "batch")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"npinv: error: manifest.csv:2: {message}\n"
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "batch").exists()


def test_the_run_flags_are_each_rows_defaults(tmp_path, picture, sd_folder):
    """A manifest row's per-word cross-replace keeps the run's --cross-replace for the other words."""
    from npinv.batch import read_manifest

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": str(picture), "source": SOURCE, "target": TARGET,
                                    "cross_replace": {"green": [0.2, 0.5]}}) + "\n")
    row = read_manifest(manifest, EditSettings(cross_replace=0.4))[0]
    assert row.edit.cross_replace == 0.4 and row.edit.cross_replace_words == {"green": (0.2, 0.5)}
    assert row.edit.cross_windows == {"default_": 0.4, "green": (0.2, 0.5)}


@pytest.fixture(scope="module")
def engine(sd_model):
    from npinv.webapp.engine import Engine

    engine = Engine(sd_model)
    yield engine
    engine.close()


WEB_CASES = [c for c in CASES if c[1] != "size"]  # the page has no size: an upload is sized to the model


@pytest.mark.parametrize("cls,name,kind,value", WEB_CASES, ids=[f"{c[1]}={c[3]}" for c in WEB_CASES])
def test_web_app_gives_the_schema_message(engine, cls, name, kind, value):
    """The web app's handler reads a form value (any JSON a client sends) through the same schema."""
    message = expected(cls, name, kind, value)
    with pytest.raises(NpinvError) as err:
        if cls is EditSettings:
            engine.edit_request(TARGET, **{name: value})
        else:
            engine.invert_settings(**{name: value})
    assert str(err.value) == message


def test_inversion_key_holds_only_the_knobs_the_scheme_uses():
    # A BDIA or DDIM inversion makes no iterations: its cap and tolerance must not split the cache.
    for scheme in ("ddim", "bdia"):
        a = InvertSettings(steps=10, invert_scheme=scheme, invert_iters=5, invert_tol=0.01)
        b = InvertSettings(steps=10, invert_scheme=scheme, invert_iters=20, invert_tol=0.001)
        assert a.key() == b.key()
    for scheme in ("fixed-point", "anderson"):
        a = InvertSettings(steps=10, invert_scheme=scheme, invert_iters=5)
        assert a.key() != dataclasses.replace(a, invert_iters=20).key()
        assert a.key() != dataclasses.replace(a, invert_tol=0.01).key()
        assert a.key() == dataclasses.replace(a, bdia_gamma=0.9).key()
    bdia = InvertSettings(steps=10, invert_scheme="bdia")
    assert bdia.key() != dataclasses.replace(bdia, bdia_gamma=0.9).key()
    assert bdia.key() != dataclasses.replace(bdia, decoder_steps=10).key()
