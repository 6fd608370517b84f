"""Build CLIP byte-level BPE vocabulary files (``vocab.json`` + ``merges.txt``) for a word list.

``transformers.CLIPTokenizer`` loads the result like any Stable Diffusion tokenizer. Every word of
the list becomes one token; any other text still tokenizes, byte by byte, because every byte
symbol (with and without the end-of-word mark) is in the vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character table of GPT-2/CLIP BPE.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _symbols(word: str, table: dict[int, str]) -> list[str]:
    syms = [table[b] for b in word.encode("utf-8")]
    syms[-1] += "</w>"
    return syms


def _apply(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as CLIP applies it: merge the lowest-ranked adjacent pair until none is known."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) such that each of ``words`` encodes to a single token.

    Merges are appended per word after simulating the merges so far; a word that already encodes
    to one token is unaffected by later (lower-priority) merges, so each word stays whole.
    """
    table = bytes_to_unicode()
    base = list(table.values())
    tokens = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = _apply(_symbols(word, table), ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            symbols = _apply(_symbols(word, table), ranks)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return vocab, merges


def write_tokenizer(folder: str | Path, words: Iterable[str], *, max_length: int) -> Path:
    """Write a CLIPTokenizer folder (vocab, merges, special tokens, config) for ``words``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return folder
