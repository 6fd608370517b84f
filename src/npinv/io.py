"""Files in and out: image loading and preparation with clear errors, atomic writes."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from npinv.errors import FileError, NpinvError

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                  ".tiff": "TIFF"}


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    The file ends with the mode ``open()`` would give it: an existing ``path`` keeps its mode, a
    new one gets 0666 less the umask (the kernel applies it, and any default ACL, at creation;
    ``tempfile.mkstemp`` would leave it 0600). The temporary is locked while the block runs, so
    :func:`remove_abandoned_temporaries` tells it from one a killed process left.
    """
    path = Path(path)
    try:
        keep = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:  # no such file yet (or not readable): a new file's mode
        keep = None
    fd, tmp = _create_beside(path)
    try:
        if keep is not None:
            os.fchmod(fd, keep)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        yield tmp
        # A writer that replaced the temporary file instead of writing into it gets the mode back.
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(fd)  # after the unlink: the lock holds until the temporary is gone


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty ``.NAME.RANDOM.tmp`` beside ``path`` (what :func:`remove_stale_temporaries` matches),
    open and locked (:func:`_lock`) for as long as the descriptor stays open."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        _lock(fd)
        return fd, tmp
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def _lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting: True if taken (or locks do not exist
    here), False if another open file holds it. The kernel drops it when its holder exits, killed or not."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; nothing is ever taken for abandoned
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks
        return True
    return True


@contextlib.contextmanager
def writing(path: str | Path, action: str = "write") -> Iterator[None]:
    """Name ``path`` in an OS error raised while writing it: ``cannot write out.png: no space left on
    device`` (a :class:`FileError`, still an ``OSError``), not the temporary file's name or none."""
    try:
        yield
    except FileError:
        raise
    except OSError as exc:
        raise FileError.wrap(exc, path, action) from exc


Stage = Callable[[str | Path], Path]


@contextlib.contextmanager
def staged_outputs() -> Iterator[Stage]:
    """Write several files all or nothing: ``stage(path)`` gives a temporary path beside ``path``
    (:func:`atomic_path`); every staged file is renamed into place when the block ends normally, and
    none (their temporaries deleted) when it raises, so a full disk half-way leaves nothing partial."""
    with contextlib.ExitStack() as stack:
        def stage(path: str | Path) -> Path:
            with writing(path):
                return stack.enter_context(atomic_path(path))

        yield stage


def check_output_folder(folder: str | Path, flag: str = "--out") -> Path:
    """Fail early if ``folder`` (created when missing) is a file, or it or its nearest existing parent
    cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NpinvError(f"{flag} {folder} exists and is not a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NpinvError(f"{flag} {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NpinvError(f"output folder is not writable: {existing}")
    return folder


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete what :func:`atomic_path` left beside ``path`` when a process was killed mid-write.

    Call it only where this process is the one writer of ``path`` (an edit it owns, a merge under
    its lock): another writer's temporary file would vanish under it.
    """
    path = Path(path)
    stale = list(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def remove_abandoned_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporaries :func:`atomic_path` left beside ``path`` in processes that are gone
    (killed: SIGKILL, a power cut), keeping those a running process still writes: each writer holds a
    lock on its temporary, which the kernel drops when the writer exits. Safe beside other writers."""
    try:
        import fcntl  # noqa: F401  (without locks a live writer's file cannot be told from a dead one's)
    except ImportError:
        return []
    path = Path(path)
    removed = []
    for p in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            if _lock(fd):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
        finally:
            os.close(fd)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def check_output_path(out: str | Path, *, inputs: tuple[str | Path, ...] = (), image: bool = True) -> Path:
    """Fail early (before any model work) if ``out`` cannot be written or would clobber an input."""
    out = Path(out)
    if image and out.suffix.lower() not in IMAGE_SUFFIXES:
        raise NpinvError(f"{out}: unsupported output image type {out.suffix!r} (use .png, .jpg or .webp)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise NpinvError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise NpinvError(f"output folder is not writable: {parent}")
    if out.is_dir():
        raise NpinvError(f"output path is a folder: {out}")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    extra = len(".") + len(".12345678.tmp")  # atomic_path's temporary name around it
    if len(os.fsencode(out.name)) + extra > name_max:
        raise NpinvError(f"output file name too long: {out.name[:40]}... ({len(os.fsencode(out.name))} bytes; "
                         f"at most {name_max - extra} here)")
    for src in inputs:
        if Path(src).exists() and out.exists() and os.path.samefile(src, out):
            raise NpinvError(f"output path {out} is the input file; choose another name")
        if Path(src).resolve() == out.resolve():
            raise NpinvError(f"output path {out} is the input file; choose another name")
    return out


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB, EXIF orientation applied; one clear error for bad files."""
    path = Path(path)
    if not path.exists():
        raise NpinvError(f"no such file: {path}")
    if path.is_dir():
        raise NpinvError(f"{path} is a folder, not an image")
    if path.stat().st_size == 0:
        raise NpinvError(f"{path} is empty")
    try:
        with warnings.catch_warnings():
            # Over Pillow's pixel limit is a decompression bomb: an error, not a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise NpinvError(f"{path}: image is too large (over Pillow's {Image.MAX_IMAGE_PIXELS} pixel limit)") from None
    except UnidentifiedImageError:
        raise NpinvError(f"{path} is not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise NpinvError(f"{path}: cannot read image ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: alpha composited on white, 16-bit scaled down, palette expanded."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def prepare_image(img: Image.Image, size: int, *, mode: str = "crop", multiple: int = 8) -> Image.Image:
    """Fit an RGB image to the model.

    ``crop``: centre crop to a square, then resize to ``size`` x ``size``.
    ``fit``: keep the aspect ratio, longer side ``size``, both sides rounded to multiples of ``multiple``.
    A ``size`` that is not a multiple of ``multiple`` (at least 8) is refused rather than rounded.
    """
    from npinv.checks import check_size

    check_size(size, multiple)
    w, h = img.size
    if mode == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        target = (size, size)
    elif mode == "fit":
        scale = size / max(w, h)
        target = tuple(max(multiple, int(round(v * scale / multiple)) * multiple) for v in (w, h))
    else:
        raise NpinvError(f"unknown resize mode {mode!r} (crop or fit)")
    if img.size != target:
        img = img.resize(target, Image.Resampling.LANCZOS)
    return img


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """First image of a (B, 3, H, W) tensor in [-1, 1] as 8-bit RGB."""
    arr = ((x[0].detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")


def save_image(img: Image.Image, path: str | Path, *, stage: Stage | None = None) -> Path:
    """Write ``img`` atomically (or into ``stage``'s temporary, see :func:`staged_outputs`)."""
    path = Path(path)
    fmt = IMAGE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise NpinvError(f"{path}: unsupported output image type {path.suffix!r}")
    with writing(path):
        if stage is not None:
            img.save(stage(path), format=fmt)
        else:
            with atomic_path(path) as tmp:
                img.save(tmp, format=fmt)
    return path


def write_text(path: str | Path, text: str) -> Path:
    with writing(path), atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def image_grid(rows: list[list[Image.Image]], *, pad: int = 2, scale: int = 1) -> Image.Image:
    """Paste equally sized images into a grid (row-major) on white, optionally upscaled (nearest)."""
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            tile = img.resize((w, h), Image.Resampling.NEAREST) if scale != 1 else img
            grid.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
