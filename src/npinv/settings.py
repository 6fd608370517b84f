"""The one settings schema: every inversion, reconstruction and edit setting with its type, default,
bounds and help, in one place.

Each setting is a dataclass field whose metadata holds a :class:`Spec` (its :class:`Kind` and help).
The front ends are derived from the fields: ``npinv`` flags (:mod:`npinv.cli`), edit-batch manifest
keys and CSV columns (:mod:`npinv.batch`) and the web app's controls (:mod:`npinv.webapp.app`). Values
are read by :func:`from_text` (flags, CSV cells, text boxes) or :func:`from_value` (JSON, the Python
API), and checked only by :meth:`Kind.check`, so a bad value gets the same one-line message
``NAME must be WHAT, got VALUE`` from every front end.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from npinv.checks import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE, short_repr
from npinv.errors import NpinvError

# -- kinds: how a value is read from text or JSON and what it must be ------------------------------


class Kind:
    """A setting's type. ``what`` completes "must be ..." in messages."""

    what = "a value"

    def from_text(self, text: str) -> Any:
        return text

    def from_value(self, value: Any) -> Any:
        return value

    def ok(self, value: Any) -> bool:
        return True

    def to_json(self, value: Any) -> Any:
        return value

    def message(self, name: str, value: Any) -> str:
        return f"{name} must be {self.what}, got {short_repr(value)}"


@dataclasses.dataclass(frozen=True)
class Number(Kind):
    """A finite number in ``low..high`` (``low_open``: above ``low``), whole if ``integer``;
    ``optional``: None allowed (text ``none``, ``default`` or empty)."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False
    optional: bool = False
    multiple: int = 1

    @property
    def what(self) -> str:  # type: ignore[override]
        kind = "a whole number" if self.integer else "a number"
        span = f"in ({self.low:g}, {self.high:g}]" if self.low_open else f"in {self.low:g}..{self.high:g}"
        extra = f" and a multiple of {self.multiple}" if self.multiple > 1 else ""
        return f"{kind} {span}{extra}" + (" (or none)" if self.optional else "")

    def from_text(self, text: str) -> Any:
        text = text.strip()
        if self.optional and text.lower() in ("", "none", "null", "default"):
            return None
        try:
            return int(text) if self.integer and re.fullmatch(r"[+-]?\d+", text) else float(text)
        except ValueError:
            return text  # refused by ok(), with the usual message

    def from_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.from_text(value)
        if self.integer and isinstance(value, float) and value.is_integer():
            return int(value)
        if not self.integer and isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)  # JSON's 3 is the command line's 3.0
            except OverflowError:
                return value
        return value

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        try:
            v = float(value)
        except OverflowError:
            return False
        if not math.isfinite(v) or v > self.high or v < self.low or (self.low_open and v == self.low):
            return False
        return not (self.integer and value % self.multiple)

    def message(self, name: str, value: Any) -> str:
        if (self.multiple > 1 and isinstance(value, int) and not isinstance(value, bool)
                and self.low <= value <= self.high and value % self.multiple):
            below = max(self.multiple, value - value % self.multiple)
            return f"{name} {value} must be a multiple of {self.multiple}; use {below} or {below + self.multiple}"
        return super().message(name, value)


@dataclasses.dataclass(frozen=True)
class Choice(Kind):
    """One of ``options`` (a callable for lists that live elsewhere: the method registry)."""

    options: tuple[Any, ...] | Callable[[], tuple[Any, ...]]
    optional: bool = False

    def choices(self) -> tuple[Any, ...]:
        return self.options() if callable(self.options) else self.options

    @property
    def what(self) -> str:  # type: ignore[override]
        names = [str(c) for c in self.choices()] + (["default"] if self.optional else [])
        return "one of " + ", ".join(names)

    def from_text(self, text: str) -> Any:
        text = text.strip()
        if self.optional and text.lower() in ("", "none", "null", "default"):
            return None
        for c in self.choices():
            if str(c) == text:
                return c
        return text

    def from_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.from_text(value)
        if isinstance(value, float) and value.is_integer():  # 1.0 from a JSON client for offset 1
            return int(value)
        return value

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        return not isinstance(value, bool) and any(value == c and type(value) is type(c) for c in self.choices())


@dataclasses.dataclass(frozen=True)
class Flag(Kind):
    what = "true or false"

    def from_text(self, text: str) -> Any:
        return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False, "": False}.get(
            text.strip().lower(), text)

    def from_value(self, value: Any) -> Any:
        if value is None:
            return False
        return self.from_text(value) if isinstance(value, str) else value

    def ok(self, value: Any) -> bool:
        return isinstance(value, bool)


def _fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1


class _Pair(Kind):
    """A kind whose value is a pair: JSON's list is the tuple."""

    def from_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.from_text(value)
        if isinstance(value, list):
            return tuple(value)
        return value


@dataclasses.dataclass(frozen=True)
class Window(_Pair):
    """A fraction ``f`` of the steps (the first f), or a window ``START,END`` of fractions.
    ``optional``: None allowed (text ``none``, ``default`` or empty)."""

    optional: bool = False

    @property
    def what(self) -> str:  # type: ignore[override]
        return "a fraction in 0..1 or a window START,END of fractions with START <= END" + (
            " (or none)" if self.optional else "")

    def from_text(self, text: str) -> Any:
        if self.optional and text.strip().lower() in ("", "none", "null", "default"):
            return None
        parts = [p.strip() for p in text.split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            return text
        return values[0] if len(values) == 1 else tuple(values)

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, tuple):
            return len(value) == 2 and all(map(_fraction, value)) and value[0] <= value[1]
        return _fraction(value)

    def to_json(self, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value


def _word_items(text: str) -> list[tuple[str, str]] | None:
    """``"red=2 blue=0.5"`` (spaces or semicolons between items) -> [("red", "2"), ("blue", "0.5")]."""
    out = []
    for item in re.split(r"[\s;]+", text.strip()):
        if not item:
            continue
        word, sep, value = item.partition("=")
        if not sep or not word:
            return None
        out.append((word, value))
    return out


@dataclasses.dataclass(frozen=True)
class WordWindows(Kind):
    """Per-word windows of the target prompt: ``WORD=FRACTION`` or ``WORD=START,END`` items."""

    what = "WORD=FRACTION or WORD=START,END items, each a fraction in 0..1 or a window of fractions"

    def from_text(self, text: str) -> Any:
        items = _word_items(text)
        return text if items is None else {w: Window().from_text(v) for w, v in items}

    def from_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.from_text(value)
        if isinstance(value, dict):
            return {w: Window().from_value(v) for w, v in value.items()}
        return value

    def ok(self, value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(w, str) and w and Window().ok(v) for w, v in value.items())

    def to_json(self, value: Any) -> Any:
        return {w: Window().to_json(v) for w, v in value.items()}


@dataclasses.dataclass(frozen=True)
class WordNumbers(Kind):
    """Per-word numbers in ``-limit..limit``: ``WORD=NUMBER`` items (commas also separate them)."""

    limit: float = 20.0

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"WORD=NUMBER items with numbers in -{self.limit:g}..{self.limit:g}"

    def from_text(self, text: str) -> Any:
        items = _word_items(text.replace(",", " "))
        if items is None:
            return text
        out: dict[str, Any] = {}
        for word, value in items:
            try:
                out[word] = float(value)
            except ValueError:
                out[word] = value
        return out

    def from_value(self, value: Any) -> Any:
        return self.from_text(value) if isinstance(value, str) else value

    def ok(self, value: Any) -> bool:
        return isinstance(value, dict) and all(
            isinstance(w, str) and w and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and -self.limit <= v <= self.limit for w, v in value.items())


@dataclasses.dataclass(frozen=True)
class WordPair(_Pair):
    """Two words (a source prompt's and a target prompt's), or none."""

    what = "two words, SOURCE_WORD TARGET_WORD (or none)"

    def from_text(self, text: str) -> Any:
        words = text.replace(",", " ").split()
        return None if not words or words == ["none"] else tuple(words)

    def ok(self, value: Any) -> bool:
        return value is None or (isinstance(value, tuple) and len(value) == 2
                                 and all(isinstance(w, str) and w.strip() and not any(c.isspace() for c in w)
                                         for w in value))

    def to_json(self, value: Any) -> Any:
        return None if value is None else list(value)


# -- the schema ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    """What the front ends need of one setting besides its name and default."""

    kind: Kind
    help: str
    label: str = ""  # the web app's control label (default: the help's first clause)
    metavar: str | None = None
    web: bool = True  # offered by the web app's form
    advanced: bool = False  # the web app shows it under "More settings"
    aliases: tuple[str, ...] = ()  # older flag names the CLI still takes


def setting(default: Any, kind: Kind, help: str, **spec: Any) -> Any:
    factory = {"default_factory": type(default)} if isinstance(default, dict) else {"default": default}
    return dataclasses.field(**factory, metadata={"spec": Spec(kind, help, **spec)})


def flag_name(name: str) -> str:
    """``cross_replace`` -> ``cross-replace``: the flag (after ``--``) and the name messages use."""
    return name.replace("_", "-")


T = TypeVar("T")


def specs(cls: type) -> Iterator[tuple[dataclasses.Field, Spec]]:
    """The schema's fields of a settings class (fields without a Spec are not user settings)."""
    for f in dataclasses.fields(cls):
        if "spec" in f.metadata:
            yield f, f.metadata["spec"]


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_value(name: str, kind: Kind, value: Any) -> Any:
    """The one check of every setting: the same message from every front end."""
    if not kind.ok(value):
        raise NpinvError(kind.message(flag_name(name), value))
    return value


def check_fields(obj: Any) -> None:
    for f, spec in specs(type(obj)):
        check_value(f.name, spec.kind, getattr(obj, f.name))


def from_value(cls: type[T], values: dict[str, Any], base: T | None = None) -> T:
    """``cls`` from JSON-like ``values`` (a manifest row, the web app's form, the API), over ``base``
    (or the defaults); unknown names are refused; every value is checked."""
    return _build(cls, values, base, text=False)


def from_text(cls: type[T], values: dict[str, str], base: T | None = None) -> T:
    """``cls`` from text values (command-line flags, CSV cells)."""
    return _build(cls, values, base, text=True)


def _build(cls: type[T], values: dict[str, Any], base: Any, text: bool) -> T:
    fields = {f.name: spec for f, spec in specs(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise NpinvError(f"unknown setting {short_repr(unknown[0])} (known: {', '.join(fields)})")
    out = {}
    for name, value in values.items():
        kind = fields[name].kind
        if text and isinstance(value, str):
            value = kind.from_text(value)
        else:
            value = kind.from_value(value)
        out[name] = check_value(name, kind, value)
    obj = cls() if base is None else base
    obj = dataclasses.replace(obj, **out)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def as_json(obj: Any) -> dict[str, Any]:
    """The schema's values of a settings object as JSON-ready values (resume keys, reports)."""
    return {f.name: spec.kind.to_json(getattr(obj, f.name)) for f, spec in specs(type(obj))}


# -- the settings --------------------------------------------------------------------------------
def _method_names() -> tuple[str, ...]:
    from npinv.methods import method_names

    return method_names()


# Fixed-point inversion's defaults. Most steps converge in 3 to 5 iterations; the cap is for the one
# that crawls (a large step at low noise, residual falling ~5% an iteration): at 10 steps on the
# embedded model a cap of 10 leaves it 0.05 dB short of NTI@50, 60 reaches it (docs/method.md).
DEFAULT_INVERT_ITERS = 60
DEFAULT_INVERT_TOL = 1e-3
# BDIA with damping factor gamma < 1 divides by gamma at every inversion step, multiplying float rounding
# by gamma^-steps. On the embedded model 0.8^-50 (7e4) still reconstructs exactly and 0.8^-100 (5e9)
# gives noise (docs/method.md): refuse amplifications above this.
MAX_BDIA_AMPLIFICATION = 1e5


def check_bdia_gamma(gamma: float, steps: int) -> None:
    """Refuse a BDIA damping factor outside (0, 1], or one whose inversion would amplify rounding past
    :data:`MAX_BDIA_AMPLIFICATION` over ``steps`` steps."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise NpinvError(f"bdia-gamma must be a number in (0, 1], got {gamma!r}")
    if gamma < 1 and steps * -math.log(gamma) > math.log(MAX_BDIA_AMPLIFICATION):
        most = int(math.log(MAX_BDIA_AMPLIFICATION) / -math.log(gamma))
        least = math.ceil(MAX_BDIA_AMPLIFICATION ** (-1 / steps) * 1000) / 1000
        raise NpinvError(f"bdia-gamma {gamma:g} with {steps} steps: inverting divides by gamma at every step, "
                         f"which multiplies float rounding by {gamma ** -steps:.1e} (at most "
                         f"{MAX_BDIA_AMPLIFICATION:.0e}); use a gamma of at least {least:g} or at most {most} steps")


def _scheme_names() -> tuple[str, ...]:
    from npinv.schemes import scheme_names

    return scheme_names()


def _controller_names() -> tuple[str, ...]:
    from npinv.attention.controllers import controller_names

    return controller_names()


@dataclasses.dataclass(frozen=True)
class InvertSettings:
    """How an image becomes an inversion: the step grid and how the image is sized."""

    steps: int = setting(50, Number(1, 1000, integer=True), "DDIM steps", label="DDIM steps")
    offset: int | None = setting(None, Choice((0, 1), optional=True),
                                 "timestep offset: 0 as published code, 1 as the SD config (default: the model's config)",
                                 label="Timestep offset")
    size: int | None = setting(None, Number(MIN_SIZE, MAX_SIZE, integer=True, optional=True, multiple=SIZE_MULTIPLE),
                               "side in pixels for the model (default: the model's)", web=False)
    resize: str = setting("crop", Choice(("crop", "fit")),
                          "crop: centre square crop; fit: keep aspect, sides multiples of 8",
                          label="Resize (crop: centre square)")
    invert_scheme: str = setting("ddim", Choice(_scheme_names),
                                 "how each inversion step finds the next latent: ddim (one UNet call a step), "
                                 "fixed-point or anderson (iterate until the step inverts exactly; see "
                                 "--invert-iters), bdia (exact with one UNet call a step); flow models only: midpoint "
                                 "(RF-Solver's second-order step, 2 calls a step) or fireflow (about 1 call a step), "
                                 "whose inversions sample with the same step",
                                 label="Inversion scheme")
    invert_iters: int = setting(DEFAULT_INVERT_ITERS, Number(1, 100, integer=True),
                                "fixed-point and anderson: at most this many extra UNet calls a step (default "
                                f"{DEFAULT_INVERT_ITERS}; a step stops as soon as it meets --invert-tol)",
                                label="Iterations a step, most (fixed-point, anderson)")
    invert_tol: float = setting(DEFAULT_INVERT_TOL, Number(0, 1), "fixed-point and anderson: stop a step once its "
                                "denoising step lands within this relative distance of where it started (default "
                                f"{DEFAULT_INVERT_TOL:g})",
                                label="Tolerance (fixed-point, anderson)")
    bdia_gamma: float = setting(1.0, Number(0, 1, low_open=True),
                                "bdia: damping factor gamma of each step (BDIA's; 1: the plain step; below 1 edits "
                                "follow the target prompt more, and inverting divides by it every step, so rounding "
                                "grows as gamma^-steps); recorded in the inversion",
                                label="BDIA gamma")
    decoder_steps: int = setting(0, Number(0, 10000, integer=True),
                                 "decoder inversion: Adam steps fitting the clean latent to the image through the VAE "
                                 "decoder before inverting (default 0: off; 100 gains 4-6 dB on the embedded model)",
                                 label="Decoder inversion steps")

    def validate(self) -> None:
        from npinv.schemes import get_scheme

        check_fields(self)
        scheme = get_scheme(self.invert_scheme)
        if scheme.pair_start:
            check_bdia_gamma(self.bdia_gamma, self.steps)
        # A knob the scheme does not use is refused rather than ignored.
        elif self.bdia_gamma != 1.0:
            raise NpinvError(f"bdia-gamma applies to --invert-scheme bdia only, not {self.invert_scheme}")
        if not scheme.iterates:
            for name, default in (("invert_iters", DEFAULT_INVERT_ITERS), ("invert_tol", DEFAULT_INVERT_TOL)):
                if getattr(self, name) != default:
                    raise NpinvError(f"{flag_name(name)} applies to --invert-scheme fixed-point and anderson only, "
                                     f"not {self.invert_scheme}")

    def key(self) -> tuple:
        """Everything that changes the inversion."""
        return (self.steps, self.offset, self.size, self.resize, *self.scheme_key())

    def scheme_key(self) -> tuple:
        """The scheme and its knobs, only those it uses (a BDIA or DDIM inversion makes no iterations),
        and decoder inversion."""
        from npinv.schemes import get_scheme

        knobs = (self.invert_iters, self.invert_tol) if get_scheme(self.invert_scheme).iterates else ()
        if self.invert_scheme == "bdia":
            knobs = (*knobs, self.bdia_gamma)
        return (self.invert_scheme, *knobs, self.decoder_steps)

    def scheme_kwargs(self) -> dict[str, Any]:
        return {"scheme": self.invert_scheme, "iters": self.invert_iters, "tol": self.invert_tol,
                "gamma": self.bdia_gamma, "decoder_steps": self.decoder_steps}


@dataclasses.dataclass(frozen=True)
class ReconstructSettings:
    """How an inversion is reconstructed."""

    method: str = setting("npi", Choice(_method_names), "inversion method")
    guidance: float = setting(7.5, Number(0, 30), "guidance scale w (default 7.5)")

    def validate(self) -> None:
        from npinv.methods import get_method

        check_fields(self)
        get_method(self.method).check_reconstruct()  # an edit-only method (flowedit), before any work


GUIDANCE_HELP = ("guidance scale w (default: the model's recommended editing guidance, else 7.5; flowedit: the "
                 "paper's target guidance)")
SELF_REPLACE_HELP = ("fraction of steps (or START,END window) with self-attention replaced (default: the model's "
                     "recommended window, else 0.6)")
# EditSettings fields whose None is the model's declared value (``edit_<name>`` in its npinv.json, else
# npinv's default): Model, FlowModel and ModelSettings carry each as ``edit_<name>``.
MODEL_DECLARED = ("guidance", "self_replace")
# EditSettings fields only --method flowedit reads (refused with any other method).
FLOWEDIT_KNOBS = ("flowedit_n_max", "flowedit_n_min", "flowedit_n_avg", "flowedit_source_guidance")


@dataclasses.dataclass(frozen=True)
class EditSettings:
    """Everything that shapes an edit besides the prompts and the inversion."""

    method: str = setting("npi", Choice(_method_names), "inversion method (proxnpi: proximal guidance with "
                          "inversion guidance; proxnpi-noig: without it)", label="Method")
    controller: str = setting("refine", Choice(_controller_names),
                              "attention control: replace (word swap), refine (add or change words), reweight, none",
                              label="Attention control")
    # None: the model's recommended editing guidance (its folder's npinv.json), else 7.5; see resolved().
    guidance: float | None = setting(None, Number(0, 30, optional=True), GUIDANCE_HELP, label="Guidance")
    cross_replace: float | tuple[float, float] = setting(
        0.8, Window(), "fraction of steps (or START,END window) with cross-attention replaced (default 0.8)",
        label="Cross-attention replace (fraction or START,END)", metavar="F|START,END")
    cross_replace_words: dict[str, float | tuple[float, float]] = setting(
        {}, WordWindows(), "per-word cross-replace windows of target words, WORD=F or WORD=START,END",
        label="Per-word cross-replace (WORD=F ...)", metavar="WORD=F", advanced=True, aliases=("cross-replace-word",))
    # None: the model's declared window (its folder's npinv.json), else 0.6; see resolved().
    self_replace: float | tuple[float, float] | None = setting(
        None, Window(optional=True), SELF_REPLACE_HELP,
        label="Self-attention replace (fraction or START,END)", metavar="F|START,END")
    # Self-attention is replaced in layers whose query maps are at most this fraction of the latent's side:
    # 0.5 is 32x32 at 512 px, as google/prompt-to-prompt (diffusers' community pipeline: 0.25).
    self_replace_size: float = setting(
        0.5, Number(0, 1, low_open=True), "replace self-attention in layers whose maps are at most this fraction "
        "of the latent side (0.5: 32x32 at 512 px, as google/prompt-to-prompt)",
        label="Self-replace layers (fraction of the latent side)", advanced=True)
    blend: tuple[str, str] | None = setting(None, WordPair(), "local blend: edit only near these words",
                                            label="Local blend: SOURCE_WORD TARGET_WORD", metavar="SRC TGT")
    blend_threshold: float = setting(0.3, Number(0, 1), "local blend's mask threshold (default 0.3)",
                                     label="Blend threshold", advanced=True)
    blend_start: float = setting(0.2, Number(0, 1), "local blend acts from this fraction of the steps "
                                 "(default 0.2, as the null-text notebook)", label="Blend start", advanced=True)
    # Side (longer, in cells) of the cross-attention maps local blend reads; None: those closest to 16 cells.
    blend_res: int | None = setting(None, Number(1, 4096, integer=True, optional=True),
                                    "read local blend's masks from the cross-attention maps whose longer side is "
                                    "closest to this many cells (default 16: SD's 16x16 layers at 512 px)",
                                    label="Blend map side (cells; empty: 16)", metavar="CELLS", advanced=True)
    reweight: dict[str, float] = setting({}, WordNumbers(), "scale a target word's cross-attention, WORD=SCALE",
                                         label="Reweight (WORD=SCALE ...)", metavar="WORD=SCALE")
    direct: bool = setting(False, Flag(), "direct inversion: pin the source branch to the trajectory",
                           label="Direct inversion (pin the source branch)")
    prox_quantile: float = setting(0.75, Number(0, 1), "ProxNPI: quantile of |guidance| kept as the edit (0.75)",
                                   label="ProxNPI quantile", advanced=True)
    recon_t: int = setting(400, Number(0, 1000, integer=True),
                           "ProxNPI: inversion guidance acts below this timestep (default 400)",
                           label="ProxNPI inversion-guidance timestep", advanced=True)
    recon_lr: float = setting(1.0, Number(0, 1), "ProxNPI: inversion guidance's pull (1 copies the trajectory)",
                              label="ProxNPI inversion-guidance strength", advanced=True)
    # FlowEdit's knobs (method flowedit, flow models; docs/method.md): None takes the paper's value.
    flowedit_n_max: int | None = setting(None, Number(1, 1000, integer=True, optional=True),
                                         "FlowEdit: edit over the last N steps (default: the paper's share of the "
                                         "steps, 33 of 50 on SD3, 24 of 28 on FLUX.1)",
                                         label="FlowEdit n_max (empty: the paper's)", metavar="N", advanced=True)
    flowedit_n_min: int = setting(0, Number(0, 1000, integer=True),
                                  "FlowEdit: sample the last N steps plainly from the edit (default 0)",
                                  label="FlowEdit n_min", advanced=True)
    flowedit_n_avg: int = setting(1, Number(1, 100, integer=True),
                                  "FlowEdit: noise draws averaged each step (default 1; each costs a call)",
                                  label="FlowEdit n_avg", advanced=True)
    flowedit_source_guidance: float | None = setting(
        None, Number(0, 30, optional=True), "FlowEdit: the source's guidance (default: the paper's, 3.5 on SD3, "
        "1.5 embedded on FLUX.1); --guidance is the target's", label="FlowEdit source guidance (empty: the paper's)",
        advanced=True)
    # An output choice, not a setting: record per-word maps at the latent resolution for heat maps.
    keep_attention_maps: bool = False
    # How controlled attention layers compute (docs/method.md "Fused attention"): the same edits either way.
    attention: str = setting("fused", Choice(("fused", "explicit")),
                             "how edited attention layers compute: fused (scaled_dot_product_attention with the "
                             "edits folded into the values; probabilities only for the maps local blend and "
                             "--save-attention read) or explicit (every hooked layer's probabilities, the "
                             "reference form; slower, and large at high resolutions)",
                             label="Attention computation", advanced=True)

    def validate(self) -> None:
        check_fields(self)
        if self.controller == "reweight" and not self.reweight:
            raise NpinvError("the reweight controller needs at least one reweight WORD=SCALE")
        if self.method != "flowedit":  # a knob the method does not use is refused rather than ignored
            defaults = EditSettings()
            for name in FLOWEDIT_KNOBS:
                if getattr(self, name) != getattr(defaults, name):
                    raise NpinvError(f"{flag_name(name)} applies to --method flowedit only, not {self.method}")
        elif self.flowedit_n_max is not None and self.flowedit_n_min >= self.flowedit_n_max:
            raise NpinvError(f"flowedit-n-min must be below flowedit-n-max ({self.flowedit_n_max}), "
                             f"got {self.flowedit_n_min}")

    def resolved(self, model: Any) -> EditSettings:
        """With the model's declared values (:data:`MODEL_DECLARED`: its guidance and self-replace
        window) where none is set, but a method's own default guidance first (FlowEdit's: the paper's,
        for the model's ``family``). ``model``: a loaded model, or its :class:`~npinv.model.ModelSettings`
        (with the family the CLI reads from its configs)."""
        from npinv.methods import METHODS

        filled = {name: getattr(model, f"edit_{name}") for name in MODEL_DECLARED if getattr(self, name) is None}
        if "guidance" in filled and self.method in METHODS:  # an unknown method: validate() says so, as always
            own = METHODS[self.method].default_guidance(getattr(model, "family", None))
            filled["guidance"] = filled["guidance"] if own is None else own
        return dataclasses.replace(self, **filled) if filled else self

    @property
    def cross_windows(self) -> float | tuple[float, float] | dict[str, Any]:
        """Cross-replace as :func:`npinv.attention.align.cross_replace_alpha` takes it."""
        if not self.cross_replace_words:
            return self.cross_replace
        return {"default_": self.cross_replace, **self.cross_replace_words}

    @property
    def self_window(self) -> tuple[float, float]:
        w = self.self_replace
        if w is None:
            raise ValueError("self_replace is the model's: resolve the settings first (EditSettings.resolved)")
        return (0.0, float(w)) if not isinstance(w, tuple) else (float(w[0]), float(w[1]))
