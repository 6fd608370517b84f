"""Checks of the values a user gives, shared by every front end (the CLI, edit-batch, edit-video, the
web app and the Python API): each refuses a bad value with one :class:`NpinvError` line, before any
model work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

from npinv.errors import NpinvError

# Every Stable Diffusion VAE downsamples 8x, and prepare_image's "fit" mode rounds sides to 8 pixels:
# sides npinv accepts are multiples of max(8, the model's VAE downscale) (Model.size_multiple).
SIZE_MULTIPLE = 8
MIN_SIZE, MAX_SIZE = 8, 4096
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
T = TypeVar("T")


def short_repr(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: what a message may quote of a user's value."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit limit for conversion to text
        text = f"a {type(value).__name__} too long to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lookup(registry: Mapping[str, T], name: Any, what: str) -> T:
    """``registry[name]``, or one line naming the choices (the method, controller and scheme registries)."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise NpinvError(f"unknown {what} {short_repr(name)}; choose one of {', '.join(registry)}") from None


def finite(value: Any, what: str) -> float:
    """``value`` as a float; NaN, infinities, booleans and non-numbers are refused."""
    if isinstance(value, bool):
        raise NpinvError(f"{what} must be a number, got {short_repr(value)}")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise NpinvError(f"{what} must be a number, got {short_repr(value)}") from None
    if not math.isfinite(out):
        raise NpinvError(f"{what} must be a finite number, got {out}")
    return out


def check_guidance(value: Any, what: str = "guidance") -> float:
    out = finite(value, what)
    if out < 0:
        raise NpinvError(f"{what} must be a finite number >= 0, got {out:g}")
    return out


def check_prompt(text: Any, what: str = "prompt") -> str:
    """A prompt must be a string with at least one non-space character."""
    if not isinstance(text, str):
        raise NpinvError(f"{what} must be text, got {type(text).__name__}")
    if not text.strip():
        raise NpinvError(f"{what} is empty: a prompt needs words")
    return text


def check_seed(seed: Any, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise NpinvError(f"{what} must be a whole number, got {short_repr(seed)}")
    if not 0 <= seed <= MAX_SEED:
        raise NpinvError(f"{what} must lie in 0..{MAX_SEED} (2**64 - 1), got {short_repr(seed)}")
    return seed


def check_steps(steps: Any, what: str = "steps", most: int = 1000) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
        raise NpinvError(f"{what} must lie in 1..{most}, got {short_repr(steps)}")
    return steps


def check_size(size: Any, multiple: int = SIZE_MULTIPLE, what: str = "size") -> int | None:
    """An image side the model can honour: ``None`` (the model's), or 8..4096 and a multiple of
    ``multiple`` (the latent must be a whole number of cells; a 65 px image would come back 64 px)."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int):
        raise NpinvError(f"{what} must be a whole number of pixels, got {short_repr(size)}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise NpinvError(f"{what} must lie in {MIN_SIZE}..{MAX_SIZE}, got {size}")
    multiple = max(SIZE_MULTIPLE, int(multiple))
    if size % multiple:
        below = max(multiple, size - size % multiple)
        raise NpinvError(f"{what} {size} must be a multiple of {multiple} pixels for this model; "
                         f"use {below} or {below + multiple}")
    return size
