"""Synthetic captioned scenes: the embedded model's training data and its ground truth.

A :class:`Scene` is one coloured shape on a plain background. It renders deterministically to an
anti-aliased RGB image (supersampled), with its caption and the object's soft mask. An
:class:`Edit` swaps the object colour, the shape or the background and renders the true edited
image. :func:`read_scene` answers "what is in this image?" for any picture (a sample, an edit),
so generated images can be scored against their captions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 215, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Area of each shape relative to its bounding box: how read_scene tells shapes apart.
_FILL_RATIO = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
_SUPERSAMPLE = 4

EditKind = Literal["color", "shape", "background"]


@dataclasses.dataclass(frozen=True)
class Scene:
    """One shape of colour ``color`` on a ``background``-coloured canvas.

    ``size`` is the shape's bounding-box side as a fraction of the image side; ``cx``/``cy`` its
    centre as fractions of width and height.
    """

    shape: str
    color: str
    background: str
    size: float = 0.5
    cx: float = 0.5
    cy: float = 0.5

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        for name in (self.color, self.background):
            if name not in COLORS:
                raise ValueError(f"unknown colour {name!r}; known: {', '.join(COLORS)}")
        if self.color == self.background:
            raise ValueError("object and background colours must differ")
        if not 0.05 <= self.size <= 1.0:
            raise ValueError("size must lie in [0.05, 1]")

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"

    def render(self, resolution: int = 64) -> Image.Image:
        """The anti-aliased RGB image."""
        rgb, _ = self.render_with_mask(resolution)
        return rgb

    def mask(self, resolution: int = 64) -> np.ndarray:
        """The object's coverage of each pixel, float32 in [0, 1], shape (H, W)."""
        _, cover = self.render_with_mask(resolution)
        return cover

    def render_with_mask(self, resolution: int = 64) -> tuple[Image.Image, np.ndarray]:
        """The image and the object's coverage, from one rendering."""
        big = resolution * _SUPERSAMPLE
        canvas = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(canvas)
        half = self.size * big / 2
        x, y = self.cx * big, self.cy * big
        box = (x - half, y - half, x + half, y + half)
        if self.shape == "circle":
            draw.ellipse(box, fill=255)
        elif self.shape == "square":
            draw.rectangle(box, fill=255)
        else:  # upward isosceles triangle filling its box
            draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=255)
        cover = np.asarray(canvas.resize((resolution, resolution), Image.Resampling.BOX), dtype=np.float32) / 255.0
        fg = np.array(COLORS[self.color], dtype=np.float32)
        bg = np.array(COLORS[self.background], dtype=np.float32)
        pixels = bg + cover[..., None] * (fg - bg)
        return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB"), cover

    def edited(self, edit: Edit) -> Scene:
        return edit.apply(self)


@dataclasses.dataclass(frozen=True)
class Edit:
    """Swap one attribute of a scene; the edited scene renders the edit's true result."""

    kind: EditKind
    value: str

    def apply(self, scene: Scene) -> Scene:
        field = {"color": "color", "shape": "shape", "background": "background"}[self.kind]
        return dataclasses.replace(scene, **{field: self.value})

    def words(self, scene: Scene) -> tuple[str, str]:
        """(source word, target word): the blend words for local blending."""
        old = {"color": scene.color, "shape": scene.shape, "background": scene.background}[self.kind]
        return old, self.value


def random_scene(rng: np.random.Generator, *, min_size: float = 0.35, max_size: float = 0.7) -> Scene:
    """A scene with every attribute drawn from ``rng``; the shape stays inside the canvas."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLORS)
    color = names[rng.integers(len(names))]
    background = [n for n in names if n != color][rng.integers(len(names) - 1)]
    size = float(rng.uniform(min_size, max_size))
    margin = size / 2 + 0.02
    cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
    return Scene(shape, color, background, round(size, 4), round(cx, 4), round(cy, 4))


def random_scenes(seed: int, count: int, **kwargs: float) -> Iterator[Scene]:
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield random_scene(rng, **kwargs)


def balanced_scenes(seed: int, count: int, *, min_size: float = 0.35, max_size: float = 0.7) -> Iterator[Scene]:
    """Scenes whose (shape, colour, background) triples come in shuffled rounds of all 90, so every
    colour pair is seen equally often (independent draws leave pair counts 10% apart in a 30 000-scene
    set); size and position are drawn as in :func:`random_scene`."""
    rng = np.random.default_rng(seed)
    triples = [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if b != c]
    made = 0
    while made < count:
        for k in rng.permutation(len(triples)):
            if made == count:
                return
            shape, color, background = triples[k]
            size = float(rng.uniform(min_size, max_size))
            margin = size / 2 + 0.02
            cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
            yield Scene(shape, color, background, round(size, 4), round(cx, 4), round(cy, 4))
            made += 1


def random_edit(scene: Scene, rng: np.random.Generator, kind: EditKind | None = None) -> Edit:
    """A valid edit of ``scene`` (object and background colours stay different)."""
    kind = kind or ("color", "shape", "background")[rng.integers(3)]
    if kind == "shape":
        choices = [s for s in SHAPES if s != scene.shape]
    else:
        choices = [c for c in COLORS if c not in (scene.color, scene.background)]
    return Edit(kind, choices[rng.integers(len(choices))])


@dataclasses.dataclass(frozen=True)
class SceneReading:
    """What :func:`read_scene` saw: the nearest palette colours, the shape, and the object mask."""

    color: str | None
    shape: str | None
    background: str
    mask: np.ndarray
    fill_ratio: float

    def matches(self, scene: Scene) -> bool:
        return (self.color, self.shape, self.background) == (scene.color, scene.shape, scene.background)


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    dist = ((pixels[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)
    return dist.argmin(-1)


def read_scene(image: Image.Image | np.ndarray, *, min_object_fraction: float = 0.01) -> SceneReading:
    """Classify a picture: background = the commonest palette colour on the border, object = the
    pixels of other colours, shape = the closest bounding-box fill ratio."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    names = list(COLORS)
    labels = _nearest_palette(pixels)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(names)).argmax())
    mask = labels != bg
    if mask.mean() < min_object_fraction:
        return SceneReading(None, None, names[bg], mask, 0.0)
    obj = int(np.bincount(labels[mask], minlength=len(names)).argmax())
    # Keep only the dominant object colour for the shape fit (ignores stray edge pixels).
    body = labels == obj
    ys, xs = np.nonzero(body)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    ratio = float(body.sum() / box)
    shape = min(_FILL_RATIO, key=lambda s: abs(_FILL_RATIO[s] - ratio))
    return SceneReading(names[obj], shape, names[bg], mask, ratio)
