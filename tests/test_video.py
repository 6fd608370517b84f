"""npinv edit-video: a synthetic video edited end to end, batching, exact frame rates, atomic output
and every bad-input path."""

from __future__ import annotations

import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import videos
from npinv.cli import main
from npinv.scenes import Scene

av = pytest.importorskip("av")

SOURCE = "a red circle on a blue background"
TARGET = "a red square on a blue background"
RATE = Fraction(24000, 1001)
FRAMES = 6


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def make_video(path: Path, frames: int = FRAMES, rate: Fraction = RATE, size: tuple[int, int] = (32, 32),
               rotation: int | None = None) -> Path:
    return videos.make_video(path, frames, rate, size, rotation)


def decode(path: Path) -> tuple[list[np.ndarray], Fraction]:
    """Frames and the stream's rate; frame t must sit at t / rate, to the container's time resolution
    (MP4 stores 24000/1001 exactly, Matroska rounds to milliseconds)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        rate = stream.average_rate
        for t, f in enumerate(decoded):
            assert abs(Fraction(f.pts) * f.time_base - t / rate) <= f.time_base / 2, (t, f.pts, f.time_base)
        return [f.to_ndarray(format="rgb24") for f in decoded], rate


@pytest.fixture
def video_file(tmp_path) -> Path:
    return make_video(tmp_path / "input.mp4")


def test_edit_video_end_to_end(capsys, tmp_path, sd_folder, video_file):
    out = tmp_path / "edited.mp4"
    code, stdout, stderr = run(capsys, "edit-video", str(video_file), "--source", SOURCE, "--target", TARGET,
                               "--controller", "replace", "--steps", "4", "--model", str(sd_folder), "--out", str(out),
                               "--json")
    assert code == 0, stderr
    row = json.loads(stdout)
    frames, rate = decode(out)
    assert len(frames) == FRAMES and rate == RATE  # frame count and the exact 24000/1001 rate kept
    assert frames[0].shape == (32, 32, 3)  # the model's resolution
    assert row["frames"] == FRAMES and row["source_frames"] == FRAMES and row["fps"] == "24000/1001"
    assert (row["width"], row["height"]) == (32, 32) and row["codec"] == "libx264"
    assert row["unet_calls"] == FRAMES * (4 + 4)  # per frame: 4 inversion + 4 edit calls
    assert row["unet_rows"] == FRAMES * (4 + 4 * 3)  # NPI edit: source + 2 target rows a step
    assert len(row["seconds_per_frame"]) == FRAMES
    assert 0 < row["seconds_per_frame_median"] <= max(row["seconds_per_frame"])
    assert math.isclose(row["seconds_per_frame_mean"], sum(row["seconds_per_frame"]) / FRAMES)
    for key in ("source_change", "edit_change", "temporal_consistency"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert math.isclose(row["temporal_consistency"], row["edit_change"] / row["source_change"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.mp4", "input.mp4"]  # no temporary left

    # The human summary names the figures.
    code, stdout, _ = run(capsys, "edit-video", str(video_file), "--source", SOURCE, "--target", TARGET, "--steps", "2",
                          "--max-frames", "2", "--model", str(sd_folder), "--out", str(tmp_path / "again.mov"))
    assert code == 0
    assert "2 frames at 24000/1001 fps" in stdout and "temporal consistency" in stdout and "s/frame" in stdout


def test_frames_match_npinv_edit_and_batching(tmp_path, sd_model, video_file):
    """Each frame is what `npinv edit` gives for it; 2 frames per UNet call give the same frames."""
    from npinv.editing import EditSettings, edit
    from npinv.inversion import ddim_inversion
    from npinv.settings import InvertSettings
    from npinv.video import edit_video, read_frames

    settings = EditSettings(controller="replace")
    runs = {}
    for batch in (1, 2):
        runs[batch] = edit_video(sd_model, video_file, tmp_path / f"b{batch}.mp4", SOURCE, TARGET, settings,
                                 InvertSettings(steps=3), batch_size=batch, max_frames=5, keep_frames=True)
    one, two = runs[1], runs[2]
    assert one.frames == two.frames == 5 and len(one.edited) == len(two.edited) == 5
    assert one.unet_calls == 5 * 6 and two.unet_calls == 3 * 6  # 5 frames in batches of 2: 3 calls a step
    for a, b in zip(one.edited, two.edited, strict=True):
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert math.isclose(one.temporal_consistency, two.temporal_consistency, rel_tol=1e-3)

    from npinv.io import image_to_tensor, prepare_image

    first = image_to_tensor(prepare_image(next(read_frames(video_file)), sd_model.resolution))
    alone = edit(sd_model, ddim_inversion(sd_model, first, SOURCE, steps=3), [TARGET], settings)
    assert torch.equal(alone.images, one.edited[0])


def test_exact_inversion_report_counts_each_unet_batch_once(tmp_path, sd_model, video_file):
    """The frames of one UNet batch share their fixed-point iterations: the report sums them per
    batch, so that plain calls + extra calls is every UNet call made."""
    from npinv.editing import EditSettings
    from npinv.settings import InvertSettings
    from npinv.video import edit_video

    for batch, batches in ((1, 3), (2, 2)):
        r = edit_video(sd_model, video_file, tmp_path / f"b{batch}.mp4", SOURCE, TARGET, EditSettings(),
                       InvertSettings(steps=3, invert_scheme="fixed-point", invert_iters=4), batch_size=batch,
                       max_frames=3)
        row = r.summary()
        assert (row["invert_scheme"], row["invert_iters"]) == ("fixed-point", 4)
        assert 3 * batches <= row["invert_extra_calls"] <= 4 * 3 * batches  # one check a step at least
        assert row["unet_calls"] == 2 * 3 * batches + row["invert_extra_calls"]
        assert row["invert_residual"] is not None


def test_max_frames_keep_size_fit_and_integer_rate(capsys, tmp_path, sd_folder):
    video = make_video(tmp_path / "wide.mkv", frames=4, rate=Fraction(12), size=(48, 32))
    out = tmp_path / "wide_edit.mkv"
    code, stdout, stderr = run(capsys, "edit-video", str(video), "--source", SOURCE, "--target", TARGET, "--steps", "2",
                               "--resize", "fit", "--keep-size", "--max-frames", "3", "--batch-size", "2", "--model",
                               str(sd_folder), "--out", str(out), "--json")
    assert code == 0, stderr
    row = json.loads(stdout)
    frames, rate = decode(out)
    assert len(frames) == row["frames"] == 3 and rate == 12 and row["fps"] == "12/1"
    assert frames[0].shape == (32, 48, 3)  # edited at 32x24 (fit), upscaled back to the source's 48x32
    assert row["unet_calls"] == 2 * (2 + 2)  # batches of 2 + 1 frames


def test_rotated_video_is_read_upright(tmp_path):
    from npinv.video import probe_video, read_frames

    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display rotation")
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise, as phones tag portrait video
        for t in range(2):
            arr = np.zeros((16, 32, 3), np.uint8)
            arr[:, :8] = 255  # white bar on the stored frame's left edge
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    info = probe_video(path)
    assert (info.width, info.height) == (16, 32)
    frames = [np.asarray(img) for img in read_frames(path)]
    assert len(frames) == 2 and frames[0].shape == (32, 16, 3)
    # Turned counter-clockwise, the left edge is at the bottom.
    assert frames[0][-6:].mean() > 200 and frames[0][:20].mean() < 30


def test_encoder_fallback_and_exact_rate(tmp_path, monkeypatch):
    from npinv import video

    monkeypatch.setitem(video.VIDEO_SUFFIXES, ".mp4", ("mp4", ("no-such-encoder", "mpeg4")))
    frames = [Scene("square", "green", "white", 0.3 + 0.1 * t).render(32) for t in range(5)]
    assert video.write_video(tmp_path / "v.mp4", frames, Fraction(30000, 1001)) == "mpeg4"
    decoded, rate = decode(tmp_path / "v.mp4")
    assert len(decoded) == 5 and rate == Fraction(30000, 1001)
    monkeypatch.setitem(video.VIDEO_SUFFIXES, ".mp4", ("mp4", ("no-such-encoder",)))
    with pytest.raises(video.NpinvError, match="no working encoder"):
        video.write_video(tmp_path / "w.mp4", frames, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_frame_change_and_still_video():
    from npinv.video import FrameChange

    change = FrameChange()
    assert change.mean is None
    for value in (-1.0, 1.0, 1.0, 0.0):  # in [0, 1]: 0, 1, 1, 0.5 -> changes 1, 0, 0.5
        change.add(torch.full((1, 3, 4, 4), value))
    assert change.mean == pytest.approx(0.5)


def _assert_clean_error(code: int, stderr: str, folder: Path, before: set[str], match: str) -> None:
    assert code == 2, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("npinv: error:"), stderr
    assert match in lines[0], lines[0]
    assert {p.name for p in folder.iterdir()} == before  # nothing written


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file"),
    ("empty", "is empty"),
    ("text", "not a video file FFmpeg can read"),
    ("image", "is an image, not a video"),
    ("no-frames", "no video frames"),
    ("same-as-input", "is the input file"),
    ("bad-suffix", "unsupported output video type '.png'"),
    ("no-folder", "does not exist"),
    ("batch-size", "--batch-size must be at least 1"),
    ("max-frames", "--max-frames must be at least 1"),
    ("steps", "steps must be a whole number in 1..1000, got 0"),
    ("self-replace", "self-replace"),
    ("blend-word", "blend word 'dog'"),
])
def test_bad_input_one_line_exit_2_nothing_written(capsys, tmp_path, sd_folder, video_file, case, match):
    video, out, extra = str(video_file), str(tmp_path / "out.mp4"), []
    if case == "missing":
        video = str(tmp_path / "nope.mp4")
    elif case == "empty":
        (tmp_path / "empty.mp4").write_bytes(b"")
        video = str(tmp_path / "empty.mp4")
    elif case == "text":
        (tmp_path / "notes.mp4").write_text("hello, not a video")
        video = str(tmp_path / "notes.mp4")
    elif case == "image":
        Scene("circle", "red", "blue").render(32).save(tmp_path / "still.png")
        video = str(tmp_path / "still.png")
    elif case == "no-frames":
        # A Matroska file with a video stream that holds no frame (only audio packets).
        video = str(tmp_path / "silent.mkv")
        with av.open(video, "w") as container:
            v = container.add_stream("libx264", rate=12)
            v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
            a = container.add_stream("aac", rate=8000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, 0
            for packet in [*a.encode(frame), *a.encode(None)]:
                container.mux(packet)
    elif case == "same-as-input":
        out = video
    elif case == "bad-suffix":
        out = str(tmp_path / "out.png")
    elif case == "no-folder":
        out = str(tmp_path / "missing" / "out.mp4")
    elif case == "batch-size":
        extra = ["--batch-size", "0"]
    elif case == "max-frames":
        extra = ["--max-frames", "0"]
    elif case == "steps":
        extra = ["--steps", "0"]
    elif case == "self-replace":
        extra = ["--self-replace", "0.9,0.1"]
    elif case == "blend-word":
        extra = ["--blend", "dog", "square"]
    before = {p.name for p in tmp_path.iterdir()}
    input_bytes = video_file.read_bytes()
    code, _, stderr = run(capsys, "edit-video", video, "--source", SOURCE, "--target", TARGET, "--steps", "2",
                          "--model", str(sd_folder), "--out", out, *extra)
    _assert_clean_error(code, stderr, tmp_path, before, match)
    assert video_file.read_bytes() == input_bytes  # the input is never changed


@pytest.mark.parametrize("failure,exit_code", [(RuntimeError, 1), (KeyboardInterrupt, 130)])
def test_failure_midway_leaves_no_output(capsys, tmp_path, sd_folder, video_file, monkeypatch, failure, exit_code):
    """An error or Ctrl-C after some frames were encoded leaves neither the video nor a temporary."""
    from npinv import video

    real, calls = video.edit, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise failure("stop")
        return real(*args, **kwargs)

    monkeypatch.setattr(video, "edit", failing)
    before = {p.name for p in tmp_path.iterdir()}
    code, _, _ = run(capsys, "edit-video", str(video_file), "--source", SOURCE, "--target", TARGET, "--steps", "2",
                     "--model", str(sd_folder), "--out", str(tmp_path / "out.mp4"))
    assert code == exit_code and len(calls) == 3  # two frames were written to the temporary file first
    assert {p.name for p in tmp_path.iterdir()} == before


def test_missing_pyav_says_how_to_install(capsys, tmp_path, video_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    before = {p.name for p in tmp_path.iterdir()}
    code, _, stderr = run(capsys, "edit-video", str(video_file), "--source", SOURCE, "--target", TARGET, "--out",
                          str(tmp_path / "out.mp4"))
    _assert_clean_error(code, stderr, tmp_path, before, "edit-video needs PyAV: pip install 'npinv[video]'")


def test_sigterm_leaves_no_temporary_and_a_later_run_clears_a_killed_ones(capsys, tmp_path, sd_folder):
    """edit-video stopped by SIGTERM (timeout, kill, a cancelled CI job) cleans up as Ctrl-C does: no
    hidden .tmp beside --out. The signal goes once the temporary exists; should the run finish first,
    no temporary may be left either, so the test does not depend on winning the race. Then a temporary
    a SIGKILLed run left (no process holds it) is removed by the next successful run to that path."""
    import os
    import signal
    import subprocess
    import time

    video = make_video(tmp_path / "long.mp4", frames=120)
    out = tmp_path / "edited.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "npinv", "-q", "edit-video", str(video), "--source", SOURCE,
                             "--target", TARGET, "--steps", "2", "--model", str(sd_folder), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    temporaries: list[Path] = []
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            temporaries = list(tmp_path.glob(".edited.mp4.*.tmp"))
            if temporaries:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(tmp_path.glob(".*.tmp")) == []
    if proc.returncode != 0:  # stopped by the signal: exit 143, one line, no output
        assert proc.returncode == 128 + signal.SIGTERM and stderr == "npinv: terminated\n", stderr
        assert not out.exists() and temporaries

    stale = tmp_path / ".edited.mp4.0badf00d.tmp"  # what a SIGKILLed run leaves
    stale.write_bytes(b"")
    short = make_video(tmp_path / "short.mp4", frames=2)
    code, _, stderr = run(capsys, "edit-video", str(short), "--source", SOURCE, "--target", TARGET, "--steps", "2",
                          "--model", str(sd_folder), "--out", str(out))
    assert code == 0, stderr
    assert out.is_file() and sorted(tmp_path.glob(".*.tmp")) == []
