"""Token bookkeeping for Prompt-to-Prompt: word spans, the word-swap ("replace") mapper, the global
alignment ("refine") mapper, reweighting and per-step cross-attention replacement weights.

Token index 0 is BOS, so word indices count it, as in the reference code (google/prompt-to-prompt's
``seq_aligner.py`` and ``ptp_utils.py``). Where npinv deliberately differs from it, docs/method.md
says so and a test in tests/test_align.py shows why.

Every function takes ``tokens``: a tokenizer (one CLIP text of ``model_max_length`` tokens, the UNet
family's) or a :class:`TextTokens`, the text sequence a flow transformer attends to, made of segments
each tokenized by its own tokenizer (SD3: CLIP's 77 rows, then T5's; FLUX: T5's). Positions are rows of
that whole sequence; a word has tokens in every segment that carries words, and the edits (word swap,
refinement, reweighting, windows) act in each segment with that segment's tokenizer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from npinv.checks import short_repr
from npinv.errors import NpinvError

Window = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class TextSegment:
    """Rows ``start .. start + length`` of the text sequence, the tokens of ``tokenizer`` (``None``:
    rows that carry no words, e.g. SD3's zero T5 rows when T5 is absent). ``bos``: 1 when the
    tokenizer starts with a BOS token (CLIP), 0 when it does not (T5)."""

    tokenizer: object | None
    start: int
    length: int
    bos: int = 1

    @property
    def last(self) -> int:
        """The last row a word token can take: the limit keeps the BOS (if any) and the EOS."""
        return self.start + self.length - 2

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=self.length).input_ids  # type: ignore[misc]

    def spans(self, text: str) -> list[list[int]]:
        """Rows of each whitespace-separated word (past the limit included); each word tokenized alone."""
        spans, pos = [], self.start + self.bos
        for word in text.split():
            n = len(self.tokenizer.encode(word, add_special_tokens=False))  # type: ignore[union-attr]
            spans.append(list(range(pos, pos + n)))
            pos += n
        return spans


@dataclasses.dataclass(frozen=True)
class TextTokens:
    """The text sequence an attention layer's keys cover, as segments in order (see the module doc)."""

    segments: tuple[TextSegment, ...]

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def worded(self) -> tuple[TextSegment, ...]:
        return tuple(s for s in self.segments if s.tokenizer is not None)

    @classmethod
    def of(cls, tokenizer, length: int | None = None, start: int = 0) -> TextTokens:
        """One tokenizer's text of ``length`` tokens (default its ``model_max_length``)."""
        return cls((segment(tokenizer, length, start),))


def segment(tokenizer, length: int | None = None, start: int = 0) -> TextSegment:
    """A tokenizer's segment; whether it begins with BOS is read from how it encodes the empty text
    (CLIP: BOS and EOS; T5: EOS alone)."""
    bos = len(tokenizer("").input_ids) - 1
    return TextSegment(tokenizer, start, int(length or tokenizer.model_max_length), max(0, min(bos, 1)))


def as_tokens(tokens) -> TextTokens:
    return tokens if isinstance(tokens, TextTokens) else TextTokens.of(tokens)


def word_positions(tokens, text: str) -> list[list[int]]:
    """Rows of each word of ``text`` in every worded segment, only those within each segment's limit."""
    words = text.split()
    out: list[list[int]] = [[] for _ in words]
    for seg in as_tokens(tokens).worded:
        for k, span in enumerate(seg.spans(text)):
            out[k] += [p for p in span if p <= seg.last]  # a word cut off by the limit keeps its first rows
    return out


def word_spans(tokenizer, text: str) -> list[list[int]]:
    """Token positions of each whitespace-separated word of ``text`` (BOS is position 0).

    Each word is tokenized on its own: CLIP's pre-tokenizer never joins across whitespace, so the
    spans add up to the prompt's own tokens. (The reference decodes tokens and counts characters,
    which loses its place on unicode and symbols.) Positions past the token limit are included:
    callers decide what a truncated word means.
    """
    return segment(tokenizer).spans(text)


def last_word_position(tokenizer) -> int:
    """The last position a word token can take: the limit keeps BOS, 75 tokens and EOS."""
    return tokenizer.model_max_length - 2


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids


def replace_mapper(tokens, source: str, target: str) -> torch.Tensor:
    """(K, K) matrix M with ``target_attention = source_attention @ M`` for a word swap.

    Word ``i`` of the source maps to word ``i`` of the target. Where the two words span different
    numbers of tokens, every source token of the word sends ``1 / len(target span)`` to each target
    token, so the word's total attention is kept (the reference's rule); every row of M sums to 1.
    Positions after the words (EOS, padding) map in order, source ``i`` to target ``j`` (the
    reference writes ``M[j, j]`` there, a bug that shifts everything after an uneven swap); when the
    target is longer, the source's last padding rows, which then have no target position, go to the
    last one (the reference drops real words there instead). With several segments M is block
    diagonal, one block per segment (rows without words: the identity).
    """
    tokens = as_tokens(tokens)
    m = torch.eye(tokens.length)
    for seg in tokens.worded:
        rows = slice(seg.start, seg.start + seg.length)
        m[rows, rows] = _segment_replace(seg, source, target)
    return m


def _segment_replace(seg: TextSegment, source: str, target: str) -> torch.Tensor:
    src, tgt = (_local(seg, x) for x in (source, target))
    if len(src) != len(tgt):
        raise NpinvError(
            f"replace needs prompts with equal word counts ({len(src)} vs {len(tgt)}): "
            f"{short_repr(source, 60)} -> {short_repr(target, 60)}; use the refine controller")
    k, bos = seg.length, seg.bos
    last = seg.last - seg.start
    m = torch.zeros(k, k)
    if bos:
        m[0, 0] = 1.0
    for s, t in zip(src, tgt, strict=True):
        s, t = [p for p in s if p <= last], [p for p in t if p <= last]  # words cut off by the limit
        if not s or not t:
            continue
        if len(s) == len(t):
            m[s, t] = 1.0
        else:
            m[torch.tensor(s)[:, None], torch.tensor(t)] = 1.0 / len(t)
    s_end = min(src[-1][-1] + 1 if src else bos, last + 1)  # EOS position of the (truncated) prompt
    t_end = min(tgt[-1][-1] + 1 if tgt else bos, last + 1)
    for r in range(k - max(s_end, t_end)):
        m[s_end + r, t_end + r] = 1.0
    # A swap that lengthens the prompt leaves the last source padding rows without a target position:
    # they keep their attention mass on the last target position instead of dropping it.
    m[k - (t_end - s_end):, k - 1] = 1.0 if t_end > s_end else 0.0
    return m


def _local(seg: TextSegment, text: str) -> list[list[int]]:
    """Word spans counted from the segment's first row."""
    return [[p - seg.start for p in span] for span in seg.spans(text)]


@dataclasses.dataclass(frozen=True)
class RefineMap:
    """For each target token: the aligned source token (``index``) and whether one exists (``alpha``)."""

    index: torch.Tensor  # (K,) long
    alpha: torch.Tensor  # (K,) float, 1 where the target token has a source counterpart


def global_alignment(x: list[int], y: list[int], match: int = 1, mismatch: int = -1, gap: int = 0) -> list[int]:
    """Needleman-Wunsch alignment of ``y`` to ``x``: for each position of ``y`` the aligned position
    of ``x``, or -1 for an inserted token.

    Ties are broken as the reference's traceback breaks them: a gap in ``x`` (``y``'s token is new)
    first, then a gap in ``y``, then the diagonal.
    """
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), dtype=np.int64)
    score[:, 0] = np.arange(n + 1) * gap
    score[0, :] = np.arange(m + 1) * gap
    move = np.zeros((n + 1, m + 1), dtype=np.int8)  # 1: left (new y token), 2: up (dropped x token), 3: diagonal
    move[0, 1:], move[1:, 0] = 1, 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i, j - 1] + gap, score[i - 1, j] + gap
            diag = score[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i, j] = best
            move[i, j] = 1 if best == left else 2 if best == up else 3
    out = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i, j] == 3:
            i, j = i - 1, j - 1
            out[j] = i
        elif move[i, j] == 1:
            j -= 1
        else:
            i -= 1
    return out


def refine_mapper(tokens, source: str, target: str) -> RefineMap:
    """Token alignment for "refine": shared tokens take the source's attention, new ones keep theirs.

    Target padding reads source padding in order (target ``len(y) + r`` <- source ``len(x) + r``);
    where that runs past the limit the target keeps its own attention. (The reference reads source
    position ``j`` for target padding ``j``, which, when the target is shorter, hands the attention
    of the source's last words a second time to the target's padding.) Each segment is aligned with
    its own tokenizer; rows without words read themselves.
    """
    tokens = as_tokens(tokens)
    index = torch.arange(tokens.length)
    alpha = torch.ones(tokens.length)
    for seg in tokens.worded:
        x, y = seg.ids(source), seg.ids(target)
        k = seg.length
        aligned = global_alignment(x, y)
        local_index = torch.zeros(k, dtype=torch.long)
        local_alpha = torch.zeros(k)
        for j, i in enumerate(aligned):
            local_index[j] = max(i, 0)
            local_alpha[j] = float(i >= 0)
        for r in range(k - len(y)):
            if len(x) + r < k:
                local_index[len(y) + r] = len(x) + r
                local_alpha[len(y) + r] = 1.0
        index[seg.start : seg.start + k] = local_index + seg.start
        alpha[seg.start : seg.start + k] = local_alpha
    return RefineMap(index, alpha)


def find_word(tokens, prompt: str, word: str, what: str = "blend") -> list[int]:
    """Token positions of every occurrence of ``word`` in ``prompt`` (in every worded segment).

    A one-line error if the word is absent, or if an occurrence falls (in part) past the token
    limit, where the text encoder never sees it. With several segments, a segment whose limit cuts
    the word off gives no positions; the error comes only when every segment's does.
    """
    tokens = as_tokens(tokens)
    words = prompt.split()
    if word not in words:
        raise NpinvError(f"{what} word {short_repr(word)} is not in the prompt {short_repr(prompt, 60)}")
    found: list[int] = []
    for seg in tokens.worded:
        hits = [span for w, span in zip(words, seg.spans(prompt), strict=True) if w == word]
        if not any(p > seg.last for span in hits for p in span):
            found += [p for span in hits for p in span]
    if not found:
        seg = tokens.worded[0]
        raise NpinvError(f"{what} word {word!r} falls past the {seg.length}-token limit of the prompt "
                         f"{short_repr(prompt, 60)}; shorten the prompt")
    return found


def reweight_vector(tokens, prompt: str, weights: dict[str, float]) -> torch.Tensor:
    """(K,) scale per token: ``weights[word]`` on that word's tokens, 1 elsewhere."""
    scale = torch.ones(as_tokens(tokens).length)
    for word, w in weights.items():
        scale[find_word(tokens, prompt, word, "reweight")] = w
    return scale


def as_window(value: float | Window | list[float], what: str = "cross-replace") -> Window:
    """A fraction ``f`` means the window ``(0, f)``; a pair is ``(start, end)`` with 0 <= start <= end <= 1."""
    a, b = (0.0, float(value)) if isinstance(value, (int, float)) else (float(value[0]), float(value[1]))
    if not 0.0 <= a <= b <= 1.0:
        raise NpinvError(f"{what} must be a fraction in [0, 1] or a window start <= end within [0, 1]")
    return a, b


def cross_replace_alpha(tokens, targets: list[str], steps: int,
                        cross_replace: float | Window | dict[str, float | Window]) -> torch.Tensor:
    """(steps, T, K) weight of the source's cross-attention in each target at each step.

    As the reference: a table of ``steps + 1`` rows of which step ``i`` reads row ``i``; a window
    ``(a, b)`` (a fraction ``f`` is ``(0, f)``) sets rows ``int(a * (steps + 1))`` to
    ``int(b * (steps + 1))``. A dict gives per-word windows, with ``"default_"`` for every other token
    (the whole run when absent); a word applies to the targets that contain it.
    """
    k = as_tokens(tokens).length
    spec = dict(cross_replace) if isinstance(cross_replace, dict) else {"default_": cross_replace}
    default = as_window(spec.pop("default_", 1.0))
    words = {word: as_window(w) for word, w in spec.items()}
    rows = steps + 1

    def cut(window: Window) -> slice:
        return slice(int(window[0] * rows), int(window[1] * rows))

    alpha = torch.zeros(rows, len(targets), k)
    alpha[cut(default)] = 1.0
    for word, window in words.items():
        present = [t for t, prompt in enumerate(targets) if word in prompt.split()]
        if not present:
            raise NpinvError(f"cross-replace word {word!r} is in no target prompt")
        for t in present:
            pos = find_word(tokens, targets[t], word, "cross-replace")
            alpha[:, t, pos] = 0.0
            alpha[cut(window), t, pos] = 1.0
    return alpha[:steps]
