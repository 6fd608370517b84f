"""A synthetic test video: a red circle moving right on blue, written with PyAV directly (not through npinv)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from npinv.scenes import Scene


def make_video(path: Path, frames: int = 6, rate: Fraction | int = Fraction(24000, 1001),
               size: tuple[int, int] = (32, 32), rotation: int | None = None) -> Path:
    import av

    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.time_base = 1 / Fraction(rate)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for t in range(frames):
            img = Scene("circle", "red", "blue", 0.45, cx=0.35 + 0.06 * t).render(max(w, h)).crop((0, 0, w, h))
            frame = av.VideoFrame.from_image(img)
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path
