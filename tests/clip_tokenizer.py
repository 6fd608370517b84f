"""Stable Diffusion's real CLIP BPE tokenizer (49,408 tokens), built offline for the tests.

The BPE merges come from the ``open-clip-torch`` wheel, which ships ``bpe_simple_vocab_16e6.txt.gz``
(the file OpenAI's CLIP and SD 1.x/2.x use). Only the wheel file is fetched from the package registry,
never its dependencies (they would pull a CUDA torch); it is cached under ``.cache/clip`` in the
project (or ``$NPINV_CLIP_CACHE``), so the download happens once per machine.

The vocabulary is built the way CLIP builds it: the 256 byte symbols, the same with the end-of-word
mark, one token per merge, then BOS and EOS. ``transformers.CLIPTokenizer`` then loads it like the
tokenizer folder of any SD checkpoint.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from npinv.vocab import bytes_to_unicode

OPEN_CLIP_WHEEL = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file
SD_PAD = "<|endoftext|>"  # SD 1.x pads with EOS; SD 2.x's tokenizer pads with "!" (id 0)


def cache_dir() -> Path:
    return Path(os.environ.get("NPINV_CLIP_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "clip"))


def bpe_file() -> Path:
    """The merges file, fetched from the wheel on first use."""
    folder = cache_dir()
    path = folder / "bpe_simple_vocab_16e6.txt.gz"
    if path.exists():
        return path
    wheels = folder / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    OPEN_CLIP_WHEEL, "-d", str(wheels)], check=True)
    wheel = next(wheels.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(BPE_MEMBER)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def tokenizer_folder(pad_token: str = SD_PAD) -> Path:
    """A folder with ``vocab.json``, ``merges.txt`` and a tokenizer config, like an SD checkpoint's."""
    name = "sd1" if pad_token == SD_PAD else "sd2"
    folder = cache_dir() / f"tokenizer-{name}"
    if (folder / "tokenizer_config.json").exists():
        return folder
    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    base = list(bytes_to_unicode().values())  # CLIP's byte symbols, in its order
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tmp = folder.with_name(folder.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
        "do_lower_case": True}))
    if folder.exists():  # another process finished first
        return folder
    tmp.replace(folder)
    return folder


def load(pad_token: str = SD_PAD):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_folder(pad_token))
