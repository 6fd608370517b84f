"""Token bookkeeping for Prompt-to-Prompt: word spans, the word-swap ("replace") mapper, the global
alignment ("refine") mapper, reweighting and per-step cross-attention replacement weights.

Token index 0 is BOS, so word indices count it, as in the reference code.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from npinv.errors import NpinvError


def word_spans(tokenizer, text: str) -> list[list[int]]:
    """Token positions of each space-separated word of ``text`` (BOS is position 0)."""
    spans, pos = [], 1
    for word in text.split():
        n = len(tokenizer.encode(word, add_special_tokens=False))
        spans.append(list(range(pos, pos + n)))
        pos += n
    return spans


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids


def replace_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """(K, K) matrix M with ``target_attention = source_attention @ M`` for a word swap.

    Word ``i`` of the source maps to word ``i`` of the target; a word spanning a different number
    of tokens spreads its attention evenly. Positions after the words (EOS, padding) map in order.
    """
    src, tgt = word_spans(tokenizer, source), word_spans(tokenizer, target)
    if len(src) != len(tgt):
        raise NpinvError(
            f"replace needs prompts with equal word counts ({len(src)} vs {len(tgt)}): "
            f"{source!r} -> {target!r}; use --controller refine")
    k = tokenizer.model_max_length
    m = torch.zeros(k, k)
    m[0, 0] = 1.0
    for s, t in zip(src, tgt, strict=True):
        for tj, t_pos in enumerate(t):
            if len(s) == len(t):
                _set(m, s[tj], t_pos, 1.0)
            else:
                for s_pos in s:
                    _set(m, s_pos, t_pos, 1.0 / len(s))
    s_end = src[-1][-1] + 1 if src else 1
    t_end = tgt[-1][-1] + 1 if tgt else 1
    for r in range(k - max(s_end, t_end)):
        m[s_end + r, t_end + r] = 1.0
    return m


def _set(m: torch.Tensor, i: int, j: int, v: float) -> None:
    if i < m.shape[0] and j < m.shape[1]:  # words past the token limit were truncated away
        m[i, j] = v


@dataclasses.dataclass(frozen=True)
class RefineMap:
    """For each target token: the aligned source token (``index``) and whether one exists (``alpha``)."""

    index: torch.Tensor  # (K,) long
    alpha: torch.Tensor  # (K,) float, 1 where the target token has a source counterpart


def global_alignment(x: list[int], y: list[int], match: int = 1, mismatch: int = -1, gap: int = 0) -> list[int]:
    """Needleman-Wunsch alignment of ``y`` to ``x``: for each position of ``y`` the aligned position
    of ``x``, or -1 for an inserted token. Ties prefer the diagonal, then a gap in ``x``."""
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), dtype=np.int64)
    score[:, 0] = np.arange(n + 1) * gap
    score[0, :] = np.arange(m + 1) * gap
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            score[i, j] = max(diag, score[i - 1, j] + gap, score[i, j - 1] + gap)
    out = [-1] * m
    i, j = n, m
    while i > 0 and j > 0:
        diag = score[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
        if score[i, j] == diag:
            out[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i, j] == score[i, j - 1] + gap:
            j -= 1
        else:
            i -= 1
    return out


def refine_mapper(tokenizer, source: str, target: str) -> RefineMap:
    """Token alignment for "refine": shared tokens take the source's attention, new ones keep theirs."""
    x, y = token_ids(tokenizer, source), token_ids(tokenizer, target)
    k = tokenizer.model_max_length
    aligned = global_alignment(x, y)
    index = torch.zeros(k, dtype=torch.long)
    alpha = torch.zeros(k)
    for j, i in enumerate(aligned):
        index[j] = max(i, 0)
        alpha[j] = float(i >= 0)
    for r in range(k - len(y)):  # padding after the target maps to padding after the source
        index[len(y) + r] = min(len(x) + r, k - 1)
        alpha[len(y) + r] = 1.0
    return RefineMap(index, alpha)


def reweight_vector(tokenizer, prompt: str, weights: dict[str, float]) -> torch.Tensor:
    """(K,) scale per token: ``weights[word]`` on that word's tokens, 1 elsewhere."""
    words = prompt.split()
    scale = torch.ones(tokenizer.model_max_length)
    spans = word_spans(tokenizer, prompt)
    for word, w in weights.items():
        hits = [i for i, x in enumerate(words) if x == word]
        if not hits:
            raise NpinvError(f"reweight word {word!r} is not in the prompt {prompt!r}")
        for i in hits:
            for pos in spans[i]:
                if pos < len(scale):
                    scale[pos] = w
    return scale


def find_word(tokenizer, prompt: str, word: str, what: str = "blend") -> list[int]:
    """Token positions of every occurrence of ``word`` in ``prompt``; a clear error if absent."""
    words = prompt.split()
    spans = word_spans(tokenizer, prompt)
    hits = [pos for i, x in enumerate(words) if x == word for pos in spans[i]]
    if not hits:
        raise NpinvError(f"{what} word {word!r} is not in the prompt {prompt!r}")
    return [p for p in hits if p < tokenizer.model_max_length]


def cross_replace_alpha(tokenizer, targets: list[str], steps: int, cross_replace: float | dict[str, float]) -> torch.Tensor:
    """(steps, T, K) weight of the source's cross-attention in each target at each step.

    A number ``f`` replaces during the first ``int(f * steps)`` steps; a dict gives per-word
    fractions with ``"default_"`` for the rest, as the reference code does.
    """
    k = tokenizer.model_max_length
    if isinstance(cross_replace, dict):
        spec = dict(cross_replace)
        default = float(spec.pop("default_", 1.0))
    else:
        spec, default = {}, float(cross_replace)
    if not 0.0 <= default <= 1.0 or any(not 0.0 <= v <= 1.0 for v in spec.values()):
        raise NpinvError("cross-replace fractions must lie in [0, 1]")
    alpha = torch.zeros(steps, len(targets), k)
    for t, prompt in enumerate(targets):
        alpha[: int(default * steps), t, :] = 1.0
        for word, frac in spec.items():
            for pos in find_word(tokenizer, prompt, word, "cross-replace"):
                alpha[:, t, pos] = 0.0
                alpha[: int(frac * steps), t, pos] = 1.0
    return alpha
