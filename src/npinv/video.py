"""Edit a video frame by frame: decode, invert each frame with DDIM (NPI by default), edit it with the
same Prompt-to-Prompt settings, and re-encode at the source's exact frame rate.

DDIM inversion is deterministic (no noise is drawn anywhere in NPI, NTI or the editing loop), so
every frame is edited the same way from its own inversion and a rerun gives the same frames: there
is no seed to set. Frames stream through in batches (``batch_size`` frames share each UNet call),
so memory does not grow with the video's length. The output is written to a temporary file beside
it and renamed only when every frame is in: an error, Ctrl-C or (on the command line) SIGTERM leaves no
partial video, and a later run to the same path removes what a killed one (SIGKILL) left. Only the
first video stream is edited; audio and subtitles are not carried over.

PyAV (``pip install 'npinv[video]'``) decodes and encodes; it bundles FFmpeg.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from npinv.cost import Meter
from npinv.editing import check_edit
from npinv.errors import NpinvError
from npinv.io import atomic_path, check_output_path, remove_abandoned_temporaries, tensor_to_image, writing
from npinv.methods import get_method
from npinv.model import Model
from npinv.service import edit, invert, prepare_picture
from npinv.settings import EditSettings, InvertSettings

# Output suffix -> (FFmpeg muxer, encoders to try in order). The first that opens is used: a build
# may lack libx264, and a name like "h264" may resolve to a hardware encoder that cannot open here.
_H264_FIRST = ("libx264", "h264", "mpeg4")
VIDEO_SUFFIXES: dict[str, tuple[str, tuple[str, ...]]] = {
    ".mp4": ("mp4", _H264_FIRST),
    ".m4v": ("mp4", _H264_FIRST),
    ".mov": ("mov", _H264_FIRST),
    ".mkv": ("matroska", _H264_FIRST),
    ".webm": ("webm", ("libvpx-vp9", "libvpx")),
}
# Per-encoder quality: near-transparent, since the frames are small and the edit is the point.
_ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"crf": "18", "preset": "medium"},
    "libvpx-vp9": {"crf": "20", "b": "0"},
}
_PIX_FMT = "yuv420p"  # what every player decodes; needs even frame sides


def require_av() -> Any:
    """The ``av`` module, or one clear line on how to install it."""
    try:
        import av
    except ImportError:
        raise NpinvError("edit-video needs PyAV: pip install 'npinv[video]'") from None
    return av


# -- reading ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns from a file without decoding it all."""

    path: Path
    fps: Fraction
    width: int  # as displayed (after the rotation in the file's metadata)
    height: int
    frames: int | None  # from the container header; None when it does not say (Matroska, WebM)
    codec: str
    container: str


def _open_input(av: Any, path: Path) -> Any:
    """Open ``path`` for reading, refusing missing, empty, non-video and still-image files."""
    if not path.exists():
        raise NpinvError(f"no such file: {path}")
    if path.is_dir():
        raise NpinvError(f"{path} is a folder, not a video")
    if path.stat().st_size == 0:
        raise NpinvError(f"{path} is empty")
    try:
        container = av.open(str(path), "r")
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise NpinvError(f"{path} is not a video file FFmpeg can read ({_short(exc)})") from None
    name = container.format.name
    has_video = bool(container.streams.video)
    if not has_video or name == "image2" or name.endswith("_pipe"):
        container.close()
        if not has_video:
            raise NpinvError(f"{path} has no video stream (or no video frames)")
        # FFmpeg reads a PNG or JPEG as a one-frame "video": say what to use instead.
        raise NpinvError(f"{path} is an image, not a video (npinv edit edits images)")
    return container


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _frame_rate(stream: Any, path: Path) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    raise NpinvError(f"{path}: the video does not say its frame rate")


def _upright(frame: Any) -> Image.Image:
    """The frame as RGB, turned as the file's display matrix asks (phone videos shot upright)."""
    img = frame.to_image()
    angle = float(getattr(frame, "rotation", 0) or 0)  # PyAV < 14 has no rotation: frames as stored
    turn = int(round(angle / 90)) * 90 % 360 if math.isfinite(angle) else 0
    if turn:
        # The display matrix turns the frame counter-clockwise by this angle, as PIL's rotate does.
        img = img.rotate(turn, expand=True)
    return img.convert("RGB")


def probe_video(path: str | Path) -> VideoInfo:
    """Frame rate (exact), displayed size, frame count and codec; decodes only the first frame,
    so a file with no frame fails here, before any model work."""
    av = require_av()
    path = Path(path)
    container = _open_input(av, path)
    try:
        stream = container.streams.video[0]
        fps = _frame_rate(stream, path)
        first = _first_frame(container, stream, path)
        if first is None:
            raise NpinvError(f"{path} has no video frames")
        img = _upright(first)
        return VideoInfo(path=path, fps=fps, width=img.width, height=img.height, frames=int(stream.frames) or None,
                         codec=stream.codec_context.name, container=container.format.name)
    finally:
        container.close()


def _first_frame(container: Any, stream: Any, path: Path) -> Any:
    try:
        return next(iter(container.decode(stream)), None)
    except Exception as exc:  # FFmpeg raises several types for corrupt data
        raise NpinvError(f"{path}: cannot decode the video ({_short(exc)})") from None


def read_frames(path: str | Path, *, max_frames: int | None = None) -> Iterator[Image.Image]:
    """Decode the first video stream's frames as upright RGB images, in order.

    Every frame is returned at the first frame's size: a stream that changes resolution midway
    is rescaled so that one output video (and one UNet batch) can hold its frames.
    """
    av = require_av()
    path = Path(path)
    container = _open_input(av, path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # decode with FFmpeg's threads; frames still come in order
        size = None
        count = 0
        decoded = container.decode(stream)
        while max_frames is None or count < max_frames:
            try:
                frame = next(decoded, None)
            except Exception as exc:
                raise NpinvError(f"{path}: cannot decode frame {count} ({_short(exc)})") from None
            if frame is None:
                break
            img = _upright(frame)
            if size is None:
                size = img.size
            elif img.size != size:
                img = img.resize(size, Image.Resampling.LANCZOS)
            count += 1
            yield img
        if count == 0:
            raise NpinvError(f"{path} has no video frames")
    finally:
        container.close()


# -- writing ---------------------------------------------------------------------------------------
def check_video_output(out: str | Path, *, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Fail early if ``out`` has no video suffix, cannot be written or is one of ``inputs``."""
    out = Path(out)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise NpinvError(f"{out}: unsupported output video type {out.suffix!r} "
                         f"(use {', '.join(VIDEO_SUFFIXES)})")
    return check_output_path(out, inputs=inputs, image=False)


def pick_encoder(suffix: str, width: int, height: int, fps: Fraction) -> str:
    """The first encoder for ``suffix`` that this FFmpeg build has and can open at this size."""
    av = require_av()
    fmt = VIDEO_SUFFIXES.get(suffix.lower())
    if fmt is None:
        raise NpinvError(f"unsupported output video type {suffix!r} (use {', '.join(VIDEO_SUFFIXES)})")
    for name in fmt[1]:
        try:
            ctx = av.CodecContext.create(name, "w")
            ctx.width, ctx.height, ctx.pix_fmt = width, height, _PIX_FMT
            ctx.time_base, ctx.framerate = 1 / fps, fps
            ctx.open()
        except (av.error.FFmpegError, ValueError, OSError):
            continue
        return name
    raise NpinvError(f"this FFmpeg build has no working encoder for {suffix} (tried {', '.join(fmt[1])})")


class VideoWriter:
    """Encodes RGB frames of one fixed size into an open container at a constant, exact rate."""

    def __init__(self, container: Any, stream: Any, fps: Fraction, size: tuple[int, int]) -> None:
        self._container, self._stream = container, stream
        self.fps, self.size = fps, size
        self.codec = stream.codec_context.name
        self.frames = 0
        # The encoder's time base: the muxer may change the stream's own once the header is written.
        self._time_base = 1 / fps

    def write(self, img: Image.Image) -> None:
        av = require_av()
        if img.size != self.size:
            raise ValueError(f"frame of size {img.size}, the video is {self.size}")
        frame = av.VideoFrame.from_image(img.convert("RGB"))
        # pts counts frames in a 1/fps time base: the muxer then stores the exact rate (24000/1001 stays so).
        frame.pts = self.frames
        frame.time_base = self._time_base
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def _flush(self) -> None:
        for packet in self._stream.encode(None):
            self._container.mux(packet)


@contextlib.contextmanager
def open_video_writer(path: str | Path, fps: Fraction, size: tuple[int, int]) -> Iterator[VideoWriter]:
    """A :class:`VideoWriter` on a temporary file beside ``path``, renamed over ``path`` only when
    the block ends normally with at least one frame written; otherwise nothing is left behind."""
    av = require_av()
    path = Path(path)
    width, height = size
    if width % 2 or height % 2:
        raise NpinvError(f"video frames need even sides, got {width}x{height}")
    fmt, _ = VIDEO_SUFFIXES[path.suffix.lower()]
    codec = pick_encoder(path.suffix, width, height, fps)
    with atomic_path(path) as tmp:
        # The temporary name ends in .tmp, so the muxer is named rather than guessed.
        with av.open(str(tmp), "w", format=fmt) as container:
            stream = container.add_stream(codec, rate=fps, options=dict(_ENCODER_OPTIONS.get(codec, {})))
            stream.width, stream.height, stream.pix_fmt = width, height, _PIX_FMT
            stream.time_base = 1 / fps
            if codec in ("mpeg4", "libvpx"):
                # Bit-rate encoders: about 1 bit per pixel, generous for small frames.
                stream.bit_rate = max(1_000_000, int(width * height * fps))
            writer = VideoWriter(container, stream, fps, size)
            yield writer
            if writer.frames == 0:
                raise NpinvError("no frames to write")
            writer._flush()


def write_video(path: str | Path, frames: Iterable[Image.Image], fps: Fraction | int | float) -> str:
    """Write equally sized RGB frames as a video at ``fps`` (atomically); returns the encoder used."""
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise NpinvError("no frames to write")
    with open_video_writer(path, Fraction(fps).limit_denominator(1_000_000), first.size) as writer:
        writer.write(first)
        for img in iterator:
            writer.write(img)
    return writer.codec


# -- editing ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class EditedFrame:
    """One frame at the model's resolution before and after the edit, and its share of the time."""

    index: int
    source: torch.Tensor  # (1, 3, H, W) in [-1, 1]: the prepared input frame
    edited: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    seconds: float  # inversion + edit time of its batch, divided by the batch's frame count
    # Its inversion's Inversion.scheme_report(); a batch's frames share one (iterations are per UNet batch).
    scheme: dict[str, Any] = dataclasses.field(default_factory=dict)
    first_of_batch: bool = True


def edit_frames(model: Model, frames: Iterable[Image.Image], source: str, target: str, settings: EditSettings,
                invert_settings: InvertSettings | None = None, *, batch_size: int = 1) -> Iterator[EditedFrame]:
    """Invert and edit each frame toward ``target``, ``batch_size`` frames per UNet call.

    Every frame gets the same settings and is edited from its own DDIM inversion, exactly as
    ``npinv edit`` edits one image (batched frames agree with single ones up to float rounding).
    """
    invert_settings = invert_settings or InvertSettings()
    settings = settings.resolved(model)
    settings.validate()
    invert_settings.validate()
    if batch_size < 1:
        raise NpinvError(f"batch size must be at least 1, got {batch_size}")
    index = 0
    for batch in _batched(frames, batch_size):
        sources = [prepare_picture(img, model, invert_settings, name=f"frame{index + k}") for k, img in enumerate(batch)]
        inverted = invert(model, sources, [source] * len(batch), invert_settings,
                          encode_only=not get_method(settings.method).needs_inversion)
        edited = edit(model, [(inv, [target]) for inv in inverted], settings)
        share = (inverted[0].cost + edited[0].edit_cost).seconds / len(batch)
        for k, done in enumerate(edited):
            yield EditedFrame(index, sources[k].image, done.images[0:1].cpu(), share,
                              inverted[k].inversion.scheme_report(), k == 0)
            index += 1


def _batched(items: Iterable[Image.Image], n: int) -> Iterator[list[Image.Image]]:
    batch: list[Image.Image] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class FrameChange:
    """Running mean of |frame_t - frame_{t-1}| (per pixel and channel, images in [0, 1])."""

    def __init__(self) -> None:
        self._previous: torch.Tensor | None = None
        self._total = 0.0
        self._pairs = 0

    def add(self, image: torch.Tensor) -> None:
        unit = (image.detach().float().cpu().clamp(-1, 1) + 1) / 2
        if self._previous is not None:
            self._total += float((unit - self._previous).abs().mean())
            self._pairs += 1
        self._previous = unit

    @property
    def mean(self) -> float | None:
        return self._total / self._pairs if self._pairs else None


@dataclasses.dataclass
class VideoEditResult:
    """An edited video: what went in and out, the cost per frame and the temporal consistency.

    ``temporal_consistency`` is ``edit_change / source_change``: the edit's mean frame-to-frame
    change over the source's, both on the model-resolution frames. 1 means the edit moves exactly
    as much as the input; above 1 it flickers more. None for one frame or a still video.
    """

    out: Path
    frames: int
    fps: Fraction
    width: int
    height: int
    codec: str
    seconds_per_frame: list[float]
    seconds: float
    unet_calls: int
    unet_rows: int
    source_change: float | None
    edit_change: float | None
    temporal_consistency: float | None
    edited: list[torch.Tensor] | None = None  # the model-resolution edits, when asked to keep them
    # The frames' inversions as Inversion.scheme_report() words them: extra UNet calls summed over
    # the UNet batches, the worst step residual of any frame.
    inversion: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no tensors)."""
        per = self.seconds_per_frame
        return {
            "out": str(self.out), "frames": self.frames, "fps": f"{self.fps.numerator}/{self.fps.denominator}",
            "fps_value": float(self.fps), "width": self.width, "height": self.height, "codec": self.codec,
            "seconds": self.seconds, "seconds_per_frame_median": statistics.median(per),
            "seconds_per_frame_mean": statistics.fmean(per), "seconds_per_frame": per,
            "unet_calls": self.unet_calls, "unet_rows": self.unet_rows, "source_change": self.source_change,
            "edit_change": self.edit_change, "temporal_consistency": self.temporal_consistency, **self.inversion,
        }


def combined_scheme_report(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``Inversion.scheme_report`` for a video's UNet batches (one report each): the settings they
    share, their extra UNet calls summed, the worst residual."""
    if not reports:
        return {}
    residuals = [r["invert_residual"] for r in reports if r.get("invert_residual") is not None]
    return {**reports[0], "invert_extra_calls": sum(r.get("invert_extra_calls", 0) for r in reports),
            "invert_residual": max(residuals) if residuals else None}


def output_size(info: VideoInfo, model_size: tuple[int, int], *, keep_size: bool, resize: str) -> tuple[int, int]:
    """(width, height) of the output frames: the model's, or with ``keep_size`` the region of the
    source that was edited (its centre square for ``crop``, the whole frame for ``fit``), rounded
    down to even sides as yuv420p needs."""
    if not keep_size:
        w, h = model_size
    elif resize == "crop":
        w = h = min(info.width, info.height)
    else:
        w, h = info.width, info.height
    return max(2, w - w % 2), max(2, h - h % 2)


def edit_video(model: Model, video: str | Path, out: str | Path, source: str, target: str, settings: EditSettings,
               invert_settings: InvertSettings | None = None, *, batch_size: int = 1, max_frames: int | None = None,
               keep_size: bool = False, keep_frames: bool = False,
               progress: bool = False, on_frame: Callable[[EditedFrame], None] | None = None) -> VideoEditResult:
    """Edit every frame of ``video`` (up to ``max_frames``) and write the edited video to ``out``
    at the source's frame rate, atomically. ``on_frame`` sees each edited frame as it is done."""
    from npinv.progress import Progress

    video, out = Path(video), Path(out)
    check_video_output(out, inputs=(video,))
    info = probe_video(video)
    if max_frames is not None and max_frames < 1:
        raise NpinvError(f"max frames must be at least 1, got {max_frames}")
    total = None if info.frames is None else min(info.frames, max_frames or info.frames)
    src_change, edit_change = FrameChange(), FrameChange()
    per_frame: list[float] = []
    batch_reports: list[dict[str, Any]] = []  # one inversion report per UNet batch
    kept: list[torch.Tensor] = []
    invert_settings = invert_settings or InvertSettings()
    # The words (blend, reweight, per-word cross-replace) before the first frame's inversion and its warnings.
    check_edit(model, source, [target], invert_settings.steps, settings)
    meter = Meter(model)
    frames = read_frames(video, max_frames=max_frames)
    edits = edit_frames(model, frames, source, target, settings, invert_settings, batch_size=batch_size)
    bar = Progress(total=total, desc="edit-video", unit="frame", enabled=progress)
    try:
        first = next(edits, None)
        if first is None:
            raise NpinvError(f"{video} has no video frames")
        model_size = (first.edited.shape[-1], first.edited.shape[-2])
        size_out = output_size(info, model_size, keep_size=keep_size, resize=invert_settings.resize)
        # An OS error in here is the output's (a full disk): reading errors are NpinvErrors already.
        with writing(out), open_video_writer(out, info.fps, size_out) as writer:
            for done in _chain_first(first, edits):
                img = tensor_to_image(done.edited)
                if img.size != size_out:
                    img = img.resize(size_out, Image.Resampling.LANCZOS)
                writer.write(img)
                src_change.add(done.source)
                edit_change.add(done.edited)
                per_frame.append(done.seconds)
                if done.first_of_batch:
                    batch_reports.append(done.scheme)
                if keep_frames:
                    kept.append(done.edited)
                if on_frame is not None:
                    on_frame(done)
                bar.update(1)
    finally:
        bar.close()
        # Close the decoder now, not at garbage collection, when the loop stopped early.
        edits.close()
        frames.close()
    remove_abandoned_temporaries(out)  # from earlier runs to this path that were killed mid-write
    ratio = None
    if src_change.mean and edit_change.mean is not None:
        ratio = edit_change.mean / src_change.mean
    cost = meter.cost
    return VideoEditResult(
        out=out, frames=writer.frames, fps=info.fps, width=size_out[0], height=size_out[1], codec=writer.codec,
        seconds_per_frame=per_frame, seconds=cost.seconds, unet_calls=cost.unet_calls,
        unet_rows=cost.unet_rows, source_change=src_change.mean, edit_change=edit_change.mean,
        temporal_consistency=ratio if ratio is None or math.isfinite(ratio) else None,
        edited=kept if keep_frames else None, inversion=combined_scheme_report(batch_reports))


def _chain_first(first: EditedFrame, rest: Iterator[EditedFrame]) -> Iterator[EditedFrame]:
    yield first
    yield from rest
