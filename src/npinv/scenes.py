"""Synthetic captioned scenes: the embedded model's training data and its ground truth.

A :class:`Scene` is one coloured shape on a plain background. It renders deterministically to an
anti-aliased RGB image (supersampled), with its caption and the object's soft mask. An
:class:`Edit` swaps the object colour, the shape or the background and renders the true edited
image. :func:`read_scene` answers "what is in this image?" for any picture (a sample, an edit),
so generated images can be scored against their captions.
"""

from __future__ import annotations

import dataclasses
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
        half = self.size * resolution / 2
        x, y = self.cx * resolution, self.cy * resolution
        cover = _coverage(self.shape, (x - half, y - half, x + half, y + half), (resolution, resolution))
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


def _coverage(shape: str, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """How much of each pixel of an (H, W) = ``size`` canvas the shape drawn in ``box`` (x0, y0, x1,
    y1 in pixels) covers, float32 in [0, 1], supersampled."""
    height, width = size
    canvas = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * _SUPERSAMPLE for v in box)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    else:  # upward isosceles triangle filling its box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    return np.asarray(canvas.resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255.0


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
    """What :func:`read_scene` saw: the nearest palette colours, the shape, the object's silhouette
    and how far it is from each shape (:func:`shape_mismatch`)."""

    color: str | None
    shape: str | None
    background: str
    mask: np.ndarray
    mismatch: dict[str, float]

    def matches(self, scene: Scene) -> bool:
        return (self.color, self.shape, self.background) == (scene.color, scene.shape, scene.background)


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    dist = ((pixels[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)
    return dist.argmin(-1)


def _grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` dilated by one pixel (3x3)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of ``mask``: (labels 1..n, 0 outside; n)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    n = 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = n
                    stack.append((ny, nx))
    return labels, n


def silhouette(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected part of ``mask`` with its holes filled: the object's outline, without
    stray specks and without blotches of other colours inside it."""
    labels, n = _components(mask)
    if n == 0:
        return mask.copy()
    body = labels == 1 + int(np.bincount(labels[labels > 0])[1:].argmax())
    outside, count = _components(~body)
    edge = set(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]]).tolist()) - {0}
    return body | ((outside > 0) & ~np.isin(outside, list(edge)))


def shape_mismatch(body: np.ndarray) -> dict[str, float]:
    """For each shape, the pixels where ``body`` and that shape drawn in ``body``'s bounding box
    disagree, as a share of ``body``'s area; disagreements within one pixel of the drawn outline do
    not count (anti-aliasing, a ragged edge row, slightly rounded corners)."""
    ys, xs = np.nonzero(body)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    area = float(body.sum())
    out = {}
    for shape in SHAPES:
        drawn = _coverage(shape, box, body.shape) >= 0.5
        edge = _grow(drawn) & _grow(~drawn)
        out[shape] = float(((body != drawn) & ~edge).sum()) / area
    return out


def read_scene(image: Image.Image | np.ndarray, *, min_object_fraction: float = 0.01) -> SceneReading:
    """Classify a picture: background = the commonest palette colour on the border, object colour =
    the commonest other one, shape = the one whose outline, drawn in the object's bounding box,
    the object's silhouette matches best (:func:`shape_mismatch`)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    names = list(COLORS)
    labels = _nearest_palette(pixels)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(names)).argmax())
    mask = labels != bg
    if mask.mean() < min_object_fraction:
        return SceneReading(None, None, names[bg], mask, {})
    obj = int(np.bincount(labels[mask], minlength=len(names)).argmax())
    body = silhouette(mask)
    mismatch = shape_mismatch(body)
    return SceneReading(names[obj], min(mismatch, key=mismatch.get), names[bg], body, mismatch)
