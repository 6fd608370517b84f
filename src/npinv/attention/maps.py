"""Per-word cross-attention heat maps of an edit, shared by ``npinv edit --save-attention`` and the web app."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch
from PIL import Image

from npinv.attention.align import word_positions


@dataclasses.dataclass
class WordMap:
    """The mean cross-attention of one word of one branch's prompt over the edit's steps."""

    branch: int  # 0: the source, k: the k-th target (1-based, as in the sampling batch)
    label: str  # "source", "target0", "target1", ...
    index: int  # the word's position in its prompt
    word: str
    heat: torch.Tensor  # (h, w) at the controller's map resolution

    @property
    def file_stem(self) -> str:
        return f"{self.label}_{self.index:02d}_{safe_word(self.word)}"


def word_maps(model, result, source_prompt: str) -> list[WordMap]:
    """One map per word of the source and of each target prompt of an edit run with
    ``keep_attention_maps=True``; words wholly past the tokenizer's limit have no map."""
    if result.controller is None:
        return []
    from npinv.attention.install import edit_tokens

    tokens = edit_tokens(model)
    maps = []
    prompts = [("source", source_prompt)] + [(f"target{k}", t) for k, t in enumerate(result.targets)]
    for branch, (label, prompt) in enumerate(prompts):
        for index, (word, span) in enumerate(zip(prompt.split(), word_positions(tokens, prompt), strict=True)):
            if span:
                maps.append(WordMap(branch, label, index, word, result.controller.word_maps(result.first_branch + branch, span)))
    return maps


def safe_word(word: str) -> str:
    """A word as a file-name part: letters, digits, ``_`` and ``-`` only, at most 40 characters."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", word)[:40] or "word"


def heat_image(heat: torch.Tensor, scale: int = 1) -> Image.Image:
    """A heat map normalised to its own range, coloured with viridis (grey without matplotlib), upscaled."""
    arr = heat.detach().float().cpu().numpy()
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)
    try:
        from matplotlib import colormaps

        rgb = (colormaps["viridis"](arr)[..., :3] * 255).astype(np.uint8)
    except ImportError:  # plots extra absent: grey levels
        rgb = np.repeat((arr[..., None] * 255).astype(np.uint8), 3, axis=-1)
    img = Image.fromarray(rgb, "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def save_attention_maps(model, result, source_prompt: str, folder, *, stage=None) -> list[str]:
    """One heat map PNG per word of the source and of each target prompt (into ``stage``'s
    temporaries when given, see :func:`npinv.io.staged_outputs`)."""
    import contextlib
    from pathlib import Path

    from npinv.attention.maps import heat_image, word_maps
    from npinv.io import save_image, writing

    folder = Path(folder)
    created = not folder.exists()
    with writing(folder, "create folder"):
        folder.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for m in word_maps(model, result, source_prompt):
            path = folder / f"{m.file_stem}.png"
            save_image(heat_image(m.heat, scale=max(1, 256 // m.heat.shape[-1])), path, stage=stage)
            written.append(str(path))
    except BaseException:
        if created and stage is None:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise
    return written
