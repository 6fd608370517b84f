"""Every bad input and fault, across the commands: exit 2, one line, nothing written, nothing changed.

One table, one test. Each case builds its inputs in ``in/`` (and sometimes patches a writer to fail
as a full disk would), runs the CLI in-process, and checks with ``test_cli._assert_clean_error``:
exit code 2, stderr exactly one ``npinv: error:`` line with no traceback (npinv's warnings and the
lines diffusers' and transformers' own loggers would print count too), and the whole folder as it
was (no output, no ``.*.tmp``, the inputs and the pre-existing ``out/existing.png`` unchanged in
bytes and mtime). One case runs as a program, as a user meets it: ``test_blend_word_past_limit_subprocess``.

Cases other helpers own live with their features:
- edit-batch killed (SIGKILL) mid-write, and its folder lock: tests/test_batch.py;
- the web app's bad requests and uploads: tests/test_webapp.py;
- file modes and the umask of written files: tests/test_io.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from npinv.scenes import Scene
from test_cli import _assert_clean_error, run, snapshot
from videos import make_video

SRC = "a red circle on a blue background"
TGT = "a red square on a blue background"
# Over every tokenizer's limit (the tiny models' 77 tokens, the embedded model's 32), "red" past it.
LONG_SRC = "a red circle on a blue background " + "very " * 80 + "red"
LONG_TGT = "a red square on a blue background " + "very " * 80 + "red"


@dataclasses.dataclass
class Env:
    """A case's world: inputs in ``in/``, outputs in ``out/`` (which holds ``existing.png``)."""

    root: Path
    model: str
    good_inversion: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def image(self) -> Path:
        return self.root / "in" / "input.png"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def existing(self) -> Path:
        return self.out / "existing.png"

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.root / "in" / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def model_copy(self, change: Callable[[Path], None]) -> str:
        """A copy of the tiny model with ``change`` applied to it."""
        folder = self.root / "in" / "model"
        shutil.copytree(self.model, folder)
        change(folder)
        return str(folder)

    def inversion(self, meta: Callable[[dict], None] | None = None, tensors: Callable[[dict], None] | None = None,
                  name: str = "inv.safetensors") -> Path:
        """A copy of a good inversion file, its metadata or tensors changed."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(self.good_inversion), "pt") as fh:
            m = json.loads(fh.metadata()["npinv"])
            t = {k: fh.get_tensor(k) for k in fh.keys()}
        if meta:
            meta(m)
        if tensors:
            tensors(t)
        path = self.root / "in" / name
        save_file(t, str(path), metadata={"npinv": json.dumps(m)})
        return path

    def fail_writes(self, target, name: str, err: int, after: int = 0) -> None:
        """Make ``target.name`` raise ``OSError(err)`` (a full disk, ...) from its ``after + 1``-th call."""
        real = getattr(target, name)
        calls = {"n": 0}

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(err, os.strerror(err))
            return real(*args, **kwargs)

        self.monkeypatch.setattr(target, name, failing)

    def video(self, frames: int = 2) -> Path:
        pytest.importorskip("av")
        return make_video(self.root / "in" / "clip.mp4", frames, rate=24)


# -- command lines (the flags after ``extra`` win: argparse keeps the last) -------------------------------
def reconstruct(e: Env, *extra, image=None, out=None, prompt=SRC, model=None) -> list:
    return ["reconstruct", image or e.image, "--prompt", prompt, "--steps", "2", "--model", model or e.model,
            "--out", out or e.existing, *extra]


def edit(e: Env, *extra, image=None, out=None, source=SRC, target=TGT, model=None) -> list:
    src = [] if source is None else ["--source", source]
    return ["edit", image or e.image, *src, "--target", target, "--steps", "2", "--model", model or e.model,
            "--out", out or e.existing, *extra]


def edit_inv(e: Env, inversion, *extra, image=None) -> list:
    return ["edit", image or e.image, "--inversion", inversion, "--target", TGT, "--model", e.model,
            "--out", e.existing, *extra]


def generate(e: Env, *extra, prompt=SRC) -> list:
    return ["generate", "--prompt", prompt, "--steps", "2", "--model", e.model, "--out", e.existing, *extra]


def edit_video(e: Env, *extra, video=None, out=None, source=SRC, target=TGT) -> list:
    return ["edit-video", video or e.video(), "--source", source, "--target", target, "--steps", "2",
            "--model", e.model, "--out", out or e.out / "edited.mp4", *extra]


def edit_batch(e: Env, rows: list | str, *extra, out=None) -> list:
    text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
    manifest = e.file("manifest.jsonl", text)
    return ["edit-batch", manifest, "--steps", "2", "--model", e.model, "--out", out or e.out / "batch", *extra]


ROW = {"image": "input.png", "source": SRC, "target": TGT}


def _truncated_png(e: Env) -> Path:
    Image.effect_noise((64, 64), 40).convert("RGB").save(e.root / "in" / "full.png")
    return e.file("cut.png", (e.root / "in" / "full.png").read_bytes()[:200])


def _unwritable(e: Env) -> list:
    locked = e.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):
        pytest.skip("this user (root?) can write a 0555 folder anyway")
    return reconstruct(e, out=locked / "out.png")


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    weights["conv_out.bias"][0] = float("nan")
    save_file(weights, str(path))


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _json_bad(path: Path) -> None:
    path.write_text('{"_class_name": "StableDiffusionPipeline",')


def _scheduler_steps(folder: Path) -> None:
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(path.read_text().replace('"num_train_timesteps": 1000', '"num_train_timesteps": -5'))


def _disk_full_second_edit(e: Env) -> list:
    e.fail_writes(Image.Image, "save", errno.ENOSPC, after=1)  # the first edit written, the second fails
    return edit(e, "--target", "a blue circle on a blue background", out=e.out / "two.png")


def _disk_full_inversion(e: Env) -> list:
    e.fail_writes(Path, "write_bytes", errno.ENOSPC)  # the image is staged; the inversion's bytes fail
    return reconstruct(e, "--save-inversion", e.out / "inv.safetensors", out=e.out / "rec.png")


def _encoder_error(e: Env) -> list:
    """Pillow's OSError without an errno (a codec's failure): still the user's output file, one line."""
    def save(*args, **kwargs):
        raise OSError("encoder error -2 when writing image file")

    e.monkeypatch.setattr(Image.Image, "save", save)
    return reconstruct(e, out=e.out / "rec.png")


def _unknown_errno_on_input(e: Env) -> list:
    """An OS error npinv has no words for (ENXIO: a socket or a vanished device), naming the input."""
    real = Path.read_bytes

    def read_bytes(self):
        if self == e.image and sys._getframe(1).f_globals.get("__name__", "").startswith("npinv."):  # not the test's
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), str(self))
        return real(self)

    e.monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return reconstruct(e)


def _disk_full_video(e: Env) -> list:
    argv = edit_video(e)
    from npinv.video import VideoWriter

    e.fail_writes(VideoWriter, "write", errno.ENOSPC, after=1)
    return argv


# (name, build the command line, what the one line must contain[, paths that may appear: not outputs])
CASES: list[tuple] = [
    # images
    ("image-not-an-image", lambda e: reconstruct(e, image=e.file("notes.png", "hello")), "not an image"),
    ("image-truncated-png", lambda e: reconstruct(e, image=_truncated_png(e)), "cannot read image"),
    ("image-0-bytes", lambda e: reconstruct(e, image=e.file("empty.png", b"")), "is empty"),
    ("image-is-a-folder", lambda e: reconstruct(e, image=e.root / "in"), "is a folder, not an image"),
    ("image-missing", lambda e: edit(e, image=e.root / "in" / "nope.png"), "no such file"),
    # prompts
    ("prompt-empty", lambda e: reconstruct(e, prompt=""), "--prompt is empty"),
    ("prompt-whitespace-target", lambda e: edit(e, target="   "), "--target is empty"),
    ("prompt-empty-generate", lambda e: generate(e, prompt=""), "--prompt is empty"),
    ("prompt-empty-video-source", lambda e: edit_video(e, source=" \t"), "--source is empty"),
    ("prompt-over-long", lambda e: edit(e, "--blend", "circle", "red",
                                        target="a circle on a blue background " + "very " * 80 + "red"),
     "77-token limit"),
    # A word past the limit of long prompts: refused before the inversion, so before any warning
    # about the prompts' length and before diffusers echoes their cut-off ends.
    ("blend-word-past-limit-long-source", lambda e: edit(e, "--blend", "red", "red", source=LONG_SRC, target=LONG_TGT),
     "blend word 'red' falls past the 77-token limit"),
    ("reweight-word-past-limit", lambda e: edit(e, "--controller", "reweight", "--reweight", "red=2", source=LONG_SRC,
                                                target=LONG_TGT), "77-token limit"),
    ("blend-word-past-limit-video", lambda e: edit_video(e, "--blend", "red", "red", source=LONG_SRC, target=LONG_TGT),
     "blend word 'red' falls past the 77-token limit"),
    ("blend-word-missing-inversion", lambda e: edit_inv(e, e.good_inversion, "--blend", "dog", "square"), "dog"),
    # numbers
    ("guidance-nan", lambda e: reconstruct(e, "--guidance", "nan"), "guidance must be a number in 0..30, got nan"),
    ("guidance-inf", lambda e: edit(e, "--guidance", "inf"), "guidance must be a number in 0..30 (or none), got inf"),
    ("guidance-negative", lambda e: reconstruct(e, "--guidance", "-1"), "guidance must be a number in 0..30, got -1.0"),
    ("blend-threshold-nan", lambda e: edit(e, "--blend", "circle", "square", "--blend-threshold", "nan"),
     "blend-threshold must be a number in 0..1, got nan"),
    ("reweight-inf", lambda e: edit(e, "--controller", "reweight", "--reweight", "red=inf"),
     "reweight must be WORD=NUMBER items"),
    ("cross-replace-nan", lambda e: edit(e, "--cross-replace", "nan"), "cross-replace must be a fraction in 0..1"),
    ("self-replace-size-inf", lambda e: edit(e, "--self-replace-size", "inf"),
     "self-replace-size must be a number in (0, 1], got inf"),
    ("seed-huge", lambda e: generate(e, "--seed", "99999999999999999999"), "--seed must lie in 0..18446744073709551615"),
    ("seed-negative", lambda e: generate(e, "--seed", "-1"), "--seed must lie in 0.."),
    ("size-65-reconstruct", lambda e: reconstruct(e, "--size", "65"), "size 65 must be a multiple of 8"),
    ("size-65-generate", lambda e: generate(e, "--size", "65"), "size 65 must be a multiple of 8"),
    ("size-65-edit-fit", lambda e: edit(e, "--size", "65", "--resize", "fit"), "size 65 must be a multiple of 8"),
    ("size-65-edit-video", lambda e: edit_video(e, "--size", "65"), "size 65 must be a multiple of 8"),
    ("size-65-edit-batch", lambda e: edit_batch(e, [ROW], "--size", "65"), "size 65 must be a multiple of 8"),
    ("steps-0", lambda e: reconstruct(e, "--steps", "0"), "steps must be a whole number in 1..1000"),
    ("steps-1000-offset-1", lambda e: reconstruct(e, "--steps", "1000"), "use offset 0 (--offset 0)"),
    ("steps-1001-edit", lambda e: edit(e, "--steps", "1001"), "steps must be a whole number in 1..1000"),
    ("batch-size-0", lambda e: edit_batch(e, [ROW], "--batch-size", "0"), "--batch-size must be at least 1"),
    ("max-frames-0", lambda e: edit_video(e, "--max-frames", "0"), "--max-frames must be at least 1"),
    ("threads-0", lambda e: reconstruct(e, "--threads", "0"), "--threads must be at least 1"),
    # generate inverts nothing: the inversion-only flags are refused, not accepted and ignored
    ("generate-invert-scheme", lambda e: generate(e, "--invert-scheme", "bdia"), "--invert-scheme does not apply"),
    ("generate-invert-iters", lambda e: generate(e, "--invert-iters", "5"), "--invert-iters does not apply"),
    ("generate-invert-tol", lambda e: generate(e, "--invert-tol", "0.1"), "--invert-tol does not apply"),
    ("generate-bdia-gamma", lambda e: generate(e, "--bdia-gamma", "0.9"), "--bdia-gamma does not apply"),
    ("generate-decoder-steps", lambda e: generate(e, "--decoder-steps", "10"), "--decoder-steps does not apply"),
    ("generate-resize", lambda e: generate(e, "--resize", "fit"), "--resize does not apply"),
    # paths
    ("out-missing-folder", lambda e: reconstruct(e, out=e.out / "nope" / "o.png"), "output folder does not exist"),
    ("out-is-input", lambda e: reconstruct(e, out=e.image), "is the input file"),
    ("out-unwritable-folder", _unwritable, "not writable"),
    ("out-wrong-suffix", lambda e: reconstruct(e, out=e.out / "o.txt"), "unsupported output image type"),
    ("out-name-too-long", lambda e: reconstruct(e, out=e.out / ("n" * 250 + ".png")), "file name too long"),
    ("out-is-a-folder", lambda e: generate(e, "--out", _mkdir(e.out / "folder.png")), "output path is a folder"),
    ("save-inversion-png", lambda e: reconstruct(e, "--save-inversion", e.out / "inv.png"), "must end in .safetensors"),
    ("save-attention-is-file", lambda e: edit(e, "--save-attention", e.existing), "is not a folder"),
    ("video-out-wrong-suffix", lambda e: edit_video(e, out=e.out / "edited.gif"), "unsupported output video type"),
    ("batch-out-is-file", lambda e: edit_batch(e, [ROW], out=e.existing), "exists and is not a folder"),
    # inversion files
    ("inversion-missing", lambda e: edit_inv(e, e.root / "in" / "nope.safetensors"), "no such inversion file"),
    ("inversion-truncated", lambda e: edit_inv(e, e.file("cut.safetensors", e.good_inversion.read_bytes()[:300])),
     "not a readable inversion file"),
    ("inversion-not-safetensors", lambda e: edit_inv(e, e.file("text.safetensors", "hello")),
     "not a readable inversion file"),
    ("inversion-not-npinv", lambda e: edit_inv(e, _plain_safetensors(e)), "is not an npinv inversion file"),
    ("inversion-wrong-model", lambda e: edit_inv(e, e.inversion(meta=lambda m: m["model"].update(fingerprint="0"))),
     "made with model"),
    ("inversion-steps-vs-trajectory", lambda e: edit_inv(e, e.inversion(meta=lambda m: m["schedule"].update(steps=50)),
                                                         "--direct"), "the metadata says 50 steps, so 51 latents"),
    ("inversion-negatives-count", lambda e: edit_inv(e, e.inversion(tensors=_drop_negative)), "negatives"),
    ("inversion-latent-vs-size", lambda e: edit_inv(e, e.inversion(meta=lambda m: m.update(image_size=[40, 40]))),
     "latents cannot be of a 40x40 image"),
    ("inversion-other-offset", lambda e: edit_inv(e, e.good_inversion, "--offset", "0"),
     "the inversion was made with offset 1; asked for --offset 0"),
    ("inversion-other-source", lambda e: edit_inv(e, e.good_inversion, "--source", "a dog"), "source prompt"),
    # An attacker's header over the same bytes: other dtypes of the same size, other shapes of the same count.
    ("inversion-trajectory-i32", lambda e: edit_inv(e, _reheaded(e, trajectory={"dtype": "I32"})),
     "'trajectory' holds int32 values, not float32"),
    ("inversion-trajectory-u32", lambda e: edit_inv(e, _reheaded(e, trajectory={"dtype": "U32"})),
     "'trajectory' holds uint32 values, not float32"),
    ("inversion-source-i32", lambda e: edit_inv(e, _reheaded(e, **{"source.hidden": {"dtype": "I32"}})),
     "'source.hidden' holds int32 values"),
    ("inversion-negatives-u32", lambda e: edit_inv(e, _reheaded(e, **{"negatives.hidden": {"dtype": "U32"}})),
     "'negatives.hidden' holds uint32 values"),
    ("inversion-trajectory-f16-pairs", lambda e: edit_inv(e, _reheaded(e, trajectory=_f16_pairs)),
     "'trajectory' holds float16 values"),
    ("inversion-trajectory-shape", lambda e: edit_inv(e, _reheaded(e, trajectory=_halved_width)),
     "latents cannot be of a 32x32 image"),
    ("inversion-embedding-shape", lambda e: edit_inv(e, _reheaded(e, **{k: _halved_width for k in EMBEDDINGS})),
     "the inversion's prompt embeddings are"),
    ("inversion-extra-tensor", lambda e: edit_inv(e, e.inversion(tensors=_extra_tensor)), "unexpected tensor 'extra'"),
    ("inversion-bad-digest", lambda e: edit_inv(e, e.inversion(meta=lambda m: m.update(image_digest="abc"))),
     "image digest 'abc'"),
    ("inversion-is-folder", lambda e: edit_inv(e, _mkdir(e.root / "in" / "inv.safetensors")),
     "inv.safetensors is a folder, not an inversion file"),
    ("inversion-of-another-image", lambda e: edit_inv(e, e.good_inversion, image=_other_image(e)),
     "other.png is not the image this inversion was made from"),
    # model folders
    ("model-missing-unet", lambda e: reconstruct(e, model=e.model_copy(lambda f: shutil.rmtree(f / "unet"))),
     "the folder has no unet/"),
    ("model-index-broken-json", lambda e: reconstruct(e, model=e.model_copy(lambda f: _json_bad(f / "model_index.json"))),
     "model_index.json: not valid JSON"),
    ("model-config-broken-json", lambda e: reconstruct(e, model=e.model_copy(lambda f: _json_bad(f / "unet" / "config.json"))),
     "config.json: not valid JSON"),
    ("model-scheduler-negative-timesteps", lambda e: reconstruct(e, model=e.model_copy(_scheduler_steps)),
     "num_train_timesteps must be a positive whole number, got -5"),
    ("model-pickle-without-allow", lambda e: reconstruct(e, model=e.file("weights.ckpt", b"\x80\x04")),
     "pickle checkpoint"),
    # NaN weights in fp32: said as such, without the half-precision advice (--dtype) of an fp16 overflow
    ("model-nan-weights-fp32", lambda e: reconstruct(e, model=e.model_copy(_nan_weights)),
     "in float32: the model's weights or the inputs hold NaN"),
    ("model-no-such-file", lambda e: reconstruct(e, model=e.root / "in" / "nothing.safetensors"), "no such model"),
    ("model-hub-offline", lambda e: reconstruct(e, model="npinv-test/not-cached"), "not in the local Hugging Face cache"),
    ("model-hub-offline-says-hf", lambda e: reconstruct(e, model="npinv-test/not-cached"),
     "(hf download npinv-test/not-cached)"),
    # manifests (edit-batch): a bad row stops everything, with its line number
    ("manifest-missing", lambda e: ["edit-batch", e.root / "in" / "none.jsonl", "--out", e.out / "batch"],
     "no such manifest"),
    ("manifest-not-json", lambda e: edit_batch(e, json.dumps(ROW) + "\n{oops\n"), "manifest.jsonl:2: not valid JSON"),
    ("manifest-row-missing-image", lambda e: edit_batch(e, [ROW, {**ROW, "image": "gone.png"}]), "manifest.jsonl:2"),
    ("manifest-row-blank-target", lambda e: edit_batch(e, [{**ROW, "target": "  "}]), "non-empty"),
    ("manifest-row-nan-guidance", lambda e: edit_batch(e, '{"image": "input.png", "source": "a cat", '
                                                         '"target": "a dog", "guidance": NaN}\n'),
     "manifest.jsonl:1: guidance must be a number in 0..30 (or none), got nan"),
    ("manifest-row-size-65", lambda e: edit_batch(e, [{**ROW, "size": 65}]), "manifest.jsonl:1: size 65 must be a multiple of 8"),
    ("manifest-row-steps-1000", lambda e: edit_batch(e, [ROW, {**ROW, "steps": 1000}]), "line 2: 1000 steps"),
    # videos
    ("video-not-a-video", lambda e: edit_video(e, video=e.file("clip.mp4", "not a video")), "not a video file"),
    ("video-is-an-image", lambda e: edit_video(e, video=e.image), "is an image, not a video"),
    # disk full and other OS faults while writing (a patched writer fails as the OS would)
    ("disk-full-reconstruct", lambda e: (e.fail_writes(Image.Image, "save", errno.ENOSPC), reconstruct(e))[1],
     "cannot write " + "{existing}: no space left on device"),
    ("disk-full-second-edit", _disk_full_second_edit, "no space left on device"),
    ("disk-full-inversion", _disk_full_inversion, "inv.safetensors: no space left on device"),
    ("write-oserror-without-errno", _encoder_error, "rec.png: encoder error -2 when writing image file"),
    ("read-oserror-unknown-errno", _unknown_errno_on_input, "input.png: No such device or address"),
    ("disk-quota-generate", lambda e: (e.fail_writes(Image.Image, "save", errno.EDQUOT), generate(e))[1],
     "disk quota exceeded"),
    ("read-only-fs-generate", lambda e: (e.fail_writes(Image.Image, "save", errno.EROFS), generate(e))[1],
     "read-only file system"),
    ("disk-full-edit-video", _disk_full_video, "edited.mp4: no space left on device"),
    # edit-batch keeps finished edits by design (a rerun resumes); here none finished: no image, no
    # results row, only its empty folders and the results merge lock (tests/test_batch.py owns the lock).
    ("disk-full-edit-batch", lambda e: (e.fail_writes(Image.Image, "save", errno.ENOSPC), edit_batch(e, [ROW]))[1],
     "00001-0-input.png: no space left on device", {"out/batch", "out/batch/edits", "out/batch/.results.lock"}),
    # devices
    ("device-unknown", lambda e: reconstruct(e, "--device", "tpu9"), "unknown device 'tpu9'"),
    ("device-absent-cuda", lambda e: generate(e, "--device", "cuda:99"), "--device cuda:99"),
]
# Not here (their owners test them with their features): edit-batch killed mid-write and its folder
# lock (tests/test_batch.py), the web app's requests (tests/test_webapp.py), file modes and the
# umask (tests/test_io.py).


def _plain_safetensors(e: Env) -> Path:
    import torch
    from safetensors.torch import save_file

    path = e.root / "in" / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    return path


def _drop_negative(t: dict) -> None:
    t["negatives.hidden"] = t["negatives.hidden"][:1]


def _extra_tensor(t: dict) -> None:
    import torch

    t["extra"] = torch.zeros(2)


EMBEDDINGS = ("source.hidden", "null.hidden", "negatives.hidden")


def _reheaded(e: Env, **changes) -> Path:
    """The good inversion file with its safetensors header (JSON after an 8-byte length) changed:
    ``changes[name]`` a dict merged into that tensor's entry, or a function of the entry; the tensor
    bytes stay as they are."""
    data = e.good_inversion.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    for name, change in changes.items():
        header[name] = change(header[name]) if callable(change) else {**header[name], **change}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    return e.file("reheaded.safetensors", len(text).to_bytes(8, "little") + text + data[8 + n :])


def _halved_width(entry: dict) -> dict:
    *rest, w = entry["shape"]
    shape = [*rest[:-1], rest[-1] * 2, w // 2]  # the same element count, another layout
    return {**entry, "shape": shape}


def _f16_pairs(entry: dict) -> dict:
    return {**entry, "dtype": "F16", "shape": [*entry["shape"][:-1], entry["shape"][-1] * 2]}  # the same bytes


def _other_image(e: Env) -> Path:
    path = e.root / "in" / "other.png"
    Scene("square", "yellow", "green", 0.5).render(32).save(path)
    return path


@pytest.fixture(scope="module")
def good_inversion(tmp_path_factory, sd_model) -> Path:
    """An NTI inversion (so it holds negatives) of the input picture, 2 steps."""
    from npinv.inversion import ddim_inversion
    from npinv.io import image_to_tensor
    from npinv.methods import reconstruct

    image = image_to_tensor(Scene("circle", "red", "blue", 0.5).render(32))
    inv = reconstruct(sd_model, ddim_inversion(sd_model, image, SRC, steps=2), "nti", 7.5, nti_inner_steps=2).inversion
    return inv.save(tmp_path_factory.mktemp("inv") / "good.safetensors")


def test_table_is_big_and_unique():
    names = [case[0] for case in CASES]
    assert len(names) == len(set(names)) and len(names) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exit_2_one_line_nothing_written(capsys, tmp_path, monkeypatch, sd_folder, good_inversion, case):
    name, build, match, *rest = case
    may_add = frozenset(rest[0]) if rest else frozenset()
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    Scene("circle", "red", "blue", 0.5).render(32).save(tmp_path / "in" / "input.png")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "out" / "existing.png")
    old = 1_000_000_000 * 1_600_000_000  # an old mtime, so a rewrite with the same bytes still shows
    for path in (tmp_path / "in" / "input.png", tmp_path / "out" / "existing.png"):
        os.utime(path, ns=(old, old))
    env = Env(tmp_path, str(sd_folder), good_inversion, monkeypatch)
    try:
        argv = [str(a) for a in build(env)]
        before = snapshot(tmp_path)
        with library_log_lines() as library:
            code, _, stderr = run(capsys, *argv)
    finally:
        locked = tmp_path / "locked"
        if locked.exists():
            locked.chmod(0o755)
    stderr += "".join(f"{line}\n" for line in library)  # one stream, as a user sees it
    _assert_clean_error(code, stderr, tmp_path, before, match.format(existing=env.existing), may_add=may_add)


@contextlib.contextmanager
def library_log_lines() -> Iterator[list[str]]:
    """The lines diffusers' and transformers' own stderr handlers print meanwhile. In-process their
    handlers write to the stream of their import time, which capsys does not see: this handler gets
    the same records (what passes the loggers' levels and filters) and keeps their text."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    keep = Keep()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(keep)
    try:
        yield lines
    finally:
        for logger in loggers:
            logger.removeHandler(keep)


def test_blend_word_past_limit_subprocess(tmp_path):
    """The issue's case as a user runs it: the embedded model (32 tokens, its own vocabulary), long
    prompts with words it never saw. Exit 2, exactly one stderr line (no warning about the prompts,
    no echo of their cut-off ends from diffusers), and no output file."""
    image = tmp_path / "input.png"
    Scene("circle", "red", "blue", 0.5).render(64).save(image)
    source = "a red circle on a blue background " + "very " * 40 + "dog"
    proc = subprocess.run([sys.executable, "-m", "npinv", "edit", str(image), "--source", source, "--target", source,
                           "--blend", "circle", "dog", "--steps", "2", "--out", str(tmp_path / "edit.png")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("npinv: error: blend word 'dog' falls past the 32-token limit"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.png"]
