"""Prompt-to-Prompt token bookkeeping with Stable Diffusion's real CLIP BPE tokenizer.

The oracle functions below restate the reference code's rules (google/prompt-to-prompt,
``seq_aligner.py``: ``get_word_inds``, ``get_replacement_mapper_``, ``global_align`` and its
traceback, ``get_refinement_mapper``; ``ptp_utils.get_time_words_attention_alpha``) so that npinv
can be compared with them on real prompts. Where npinv deliberately differs (docs/method.md,
"Differences from the reference code"), a test here shows the difference and why.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clip_tokenizer
from npinv.attention.align import (
    cross_replace_alpha,
    find_word,
    global_alignment,
    refine_mapper,
    replace_mapper,
    reweight_vector,
    token_ids,
    word_spans,
)
from npinv.errors import NpinvError

K = 77

# Word swaps (equal word counts), PIE-Bench style and harder: multi-token words, punctuation,
# repeated words, case, unicode, several swapped words.
SWAPS = [
    ("a photo of a cat", "a photo of a hippopotamus"),
    ("a photo of a hippopotamus", "a photo of a cat"),
    ("a black-and-white photo of a dog", "a colorful photo of a dog"),
    ("a colorful photo of a dog", "a black-and-white photo of a dog"),
    ("a cat sitting on a wooden bench", "a dog sitting on a wooden bench"),
    ("a cat sitting on a wooden bench", "a cat sitting on a marble bench"),
    ("a cat sitting on a wooden bench", "a rhinoceros sitting on a wooden bench"),
    ("a red car parked in front of a house", "a blue car parked in front of a house"),
    ("a red car parked in front of a house", "a red bicycle parked in front of a house"),
    ("a woman with long hair in a field", "a woman with short hair in a field"),
    ("a man wearing a hat, smiling", "a man wearing a crown, smiling"),
    ("a man wearing a hat, smiling", "a man wearing a sombrero, smiling"),
    ("A Cat On A Mat", "A Dog On A Mat"),
    ("a cat and a cat on a sofa", "a dog and a cat on a sofa"),
    ("a cat and a cat on a sofa", "a cat and a tiger on a sofa"),
    ("the cat, the dog and the bird", "the cat, the fox and the bird"),
    ("a bowl of fruit on a table", "a bowl of strawberries on a table"),
    ("a bowl of strawberries on a table", "a bowl of fruit on a table"),
    ("a painting of a lighthouse at sunset", "a painting of a lighthouse at sunrise"),
    ("a painting of a lighthouse at sunset", "a watercolor of a lighthouse at sunset"),
    ("an astronaut riding a horse on the moon", "an astronaut riding a unicorn on the moon"),
    ("an astronaut riding a horse on the moon", "an astronaut riding a horse on the moon!"),
    ("a house in the snow", "a house in the desert"),
    ("a small boat on a calm lake", "a large steamship on a stormy lake"),
    ("a photo of a naïve café", "a photo of a quiet café"),
    ("a 🐱 on a mat", "a 🐶 on a mat"),
    ("a cat (sleeping) on a bed", "a dog (sleeping) on a bed"),
    ("a cat's toy on the floor", "a dog's toy on the floor"),
    ("two cats playing with yarn", "two kittens playing with yarn"),
    ("a slice of pizza on a plate", "a slice of cheesecake on a plate"),
    ("a tree in autumn", "a tree in springtime"),
    ("a golden retriever in the park", "a dalmatian in the park, running"),  # 6 vs 6 words: uneven spans
    ("portrait of a young man, oil painting", "portrait of a old man, oil painting"),
    ("portrait of a young man, oil painting", "portrait of a young woman, charcoal sketch"),
    ("a vase with sunflowers", "a vase with chrysanthemums"),
]

# Refinements (different word counts): additions, deletions, reorderings.
REFINES = [
    ("a photo of a cat", "a photo of a fluffy cat"),
    ("a photo of a cat", "a photo of a cat wearing sunglasses"),
    ("a photo of a fluffy cat", "a photo of a cat"),
    ("a cat sitting on a bench", "a cat sitting on a bench in the snow"),
    ("a cat sitting on a bench in the snow", "a cat on a bench"),
    ("a house", "a house on a hill, watercolor"),
    ("a dog", "a hippopotamus"),
    ("a red car", "a shiny red sports car"),
    ("a bowl of fruit", "a bowl of fruit and a glass of milk"),
    ("the cat, the dog and the bird", "the dog and the bird"),
    ("a cat and a cat", "a cat and a cat and a cat"),
    ("a black-and-white photo", "a photo"),
    ("a photo", "a black-and-white photo"),
    ("A Lighthouse At Sunset", "a lighthouse at sunset, oil painting"),
    ("猫 on a mat", "a cat on a mat"),
    ("a mountain landscape", "a mountain landscape with a river and a bridge"),
    ("an astronaut riding a horse", "an astronaut riding a horse in photorealistic style"),
    ("a woman reading", "a woman reading a book under a tree"),
    ("a plate of sushi", "sushi"),
    ("a boat", "a boat a boat a boat"),
    ("a cat", "a cat " + "very " * 80 + "cute"),  # target past the token limit
    ("a cat " + "very " * 80 + "cute", "a cat"),  # source past the token limit
]


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer.load()


# -- oracles: the reference's rules, restated ----------------------------------------------------
def ref_word_inds(text: str, place: int, tokenizer) -> list[int]:
    """The reference finds a word's tokens by decoding each token and counting characters."""
    split_text = text.split(" ")
    out = []
    words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
    cur_len, ptr = 0, 0
    for i, piece in enumerate(words_encode):
        cur_len += len(piece)
        if ptr == place:
            out.append(i + 1)
        if cur_len >= len(split_text[ptr]):
            ptr += 1
            cur_len = 0
    return out


def ref_replacement_mapper(x: str, y: str, tokenizer, *, diagonal_bug: bool = True) -> torch.Tensor:
    words_x, words_y = x.split(" "), y.split(" ")
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [ref_word_inds(x, i, tokenizer) for i in inds_replace]
    inds_target = [ref_word_inds(y, i, tokenizer) for i in inds_replace]
    mapper = np.zeros((K, K))
    i = j = cur = 0
    while i < K and j < K:
        if cur < len(inds_source) and inds_source[cur][0] == i:
            s, t = inds_source[cur], inds_target[cur]
            if len(s) == len(t):
                mapper[s, t] = 1
            else:
                for t_pos in t:
                    mapper[s, t_pos] = 1 / len(t)
            cur += 1
            i += len(s)
            j += len(t)
        elif cur < len(inds_source):
            mapper[i, j] = 1
            i, j = i + 1, j + 1
        else:
            if diagonal_bug:
                mapper[j, j] = 1
            else:
                mapper[i, j] = 1
            i, j = i + 1, j + 1
    return torch.from_numpy(mapper).float()


def ref_alignment(x: list[int], y: list[int]) -> list[int]:
    """The reference's global_align + traceback (gap 0, match 1, mismatch -1)."""
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), dtype=np.int32)
    trace = np.zeros((n + 1, m + 1), dtype=np.int32)
    trace[0, 1:], trace[1:, 0], trace[0, 0] = 1, 2, 4
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i, j] = max(left, up, diag)
            trace[i, j] = 1 if score[i, j] == left else 2 if score[i, j] == up else 3
    pairs, i, j = [], n, m
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        elif trace[i, j] == 2:
            i -= 1
        else:
            break
    return [i for _, i in reversed(pairs)]


def ref_alpha(steps: int, bounds: tuple[float, float], n_targets: int = 1) -> torch.Tensor:
    alpha = torch.zeros(steps + 1, n_targets, K)
    start, end = int(bounds[0] * (steps + 1)), int(bounds[1] * (steps + 1))
    alpha[start:end] = 1
    return alpha


def uneven(tokenizer, x: str, y: str) -> bool:
    return any(len(s) != len(t) for s, t in zip(word_spans(tokenizer, x), word_spans(tokenizer, y), strict=True))


# -- the tokenizer and word positions ------------------------------------------------------------
def test_real_tokenizer(tok):
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok.encode("hippopotamus", add_special_tokens=False)) == 3  # the world has multi-token words
    assert len(tok.encode("black-and-white", add_special_tokens=False)) == 5


def test_enough_pairs():
    assert len(SWAPS) + len(REFINES) >= 57


@pytest.mark.parametrize("prompt", sorted({p for pair in SWAPS + REFINES for p in pair}))
def test_word_spans_tile_the_prompts_tokens(tok, prompt):
    ids = tok.encode(prompt)  # untruncated
    spans = word_spans(tok, prompt)
    assert [p for s in spans for p in s] == list(range(1, len(ids) - 1))
    for word, span in zip(prompt.split(), spans, strict=True):
        assert [ids[p] for p in span] == tok.encode(word, add_special_tokens=False)


def test_word_positions_where_the_reference_loses_its_place(tok):
    """The reference counts decoded characters: a character split into byte tokens derails it.
    npinv tokenizes each word and finds the right tokens (a deliberate difference)."""
    prompt = "猫 on a mat"
    assert ref_word_inds(prompt, 1, tok) != [4]  # "on" is token 4: the reference points elsewhere
    assert find_word(tok, prompt, "on") == [4]
    assert find_word(tok, prompt, "mat") == [6]
    # Where decoding works, both agree.
    for prompt, _ in SWAPS[:10]:
        for place in range(len(prompt.split(" "))):
            assert word_spans(tok, prompt)[place] == ref_word_inds(prompt, place, tok)


# -- word swap --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("source", "target"), SWAPS)
def test_replace_mapper_matches_the_reference(tok, source, target):
    ours = replace_mapper(tok, source, target)
    # Equal to the reference everywhere, once its M[j, j] slip after an uneven span is corrected, except
    # in the last source rows when the target is longer: padding pushed past the end, which the
    # reference drops and npinv sends to the last target position.
    n_src, n_tgt = len(tok.encode(source)), len(tok.encode(target))
    kept = K - max(0, n_tgt - n_src)
    ref = ref_replacement_mapper(source, target, tok, diagonal_bug=False)
    assert torch.allclose(ours[:kept], ref[:kept])
    assert torch.equal(ours[kept:, K - 1], torch.ones(K - kept)) and ours[kept:].sum() == K - kept
    if not uneven(tok, source, target):
        assert torch.equal(ours, ref_replacement_mapper(source, target, tok))
    # Every source token sends all of its attention somewhere: every row sums to 1.
    assert torch.equal(ours.sum(1), torch.ones(K))


def test_uneven_swap_keeps_each_querys_attention_mass(tok):
    """cat (1 token) -> hippopotamus (3): the new word shares the old word's attention, it does not get
    it three times over. This failed before the fix (weights 1/len(source span))."""
    source, target = "a photo of a cat", "a photo of a hippopotamus"
    m = replace_mapper(tok, source, target)
    assert m[5, 5:8].tolist() == pytest.approx([1 / 3] * 3)
    attn = torch.softmax(torch.randn(4, 16, K), -1)
    edited = attn @ m  # the two last padding positions, past the longer target's end, keep their mass too
    assert torch.allclose(edited.sum(-1), torch.ones(4, 16), atol=1e-5)
    assert torch.allclose(edited[..., 5:8].sum(-1), attn[..., 5], atol=1e-6)
    # And back: hippopotamus (3) -> cat (1) gathers the three tokens' attention into one.
    back = attn @ replace_mapper(tok, target, source)
    assert torch.allclose(back.sum(-1), torch.ones(4, 16), atol=1e-5)
    assert torch.allclose(back[..., 5], attn[..., 5:8].sum(-1), atol=1e-6)


def test_reference_diagonal_slip_after_an_uneven_span(tok):
    """After an uneven span the reference writes M[j, j]: "sitting" (source 6) is then read from the
    target's own position, a different word. npinv maps source i -> target j (a deliberate difference)."""
    source, target = "a cat sitting on a wooden bench", "a rhinoceros sitting on a wooden bench"
    n = len(tok.encode("rhinoceros", add_special_tokens=False))
    assert n > 1
    ours, ref = replace_mapper(tok, source, target), ref_replacement_mapper(source, target, tok)
    assert ours[3, 2 + n] == 1  # "sitting" -> "sitting"
    assert ref[3, 2 + n] == 0 and ref[2 + n, 2 + n] == 1


def test_replace_refuses_unequal_word_counts(tok):
    with pytest.raises(NpinvError, match="equal word counts"):
        replace_mapper(tok, "a cat", "a fluffy cat")


# -- refinement -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("source", "target"), REFINES + SWAPS)
def test_refine_matches_the_reference_alignment(tok, source, target):
    x, y = token_ids(tok, source), token_ids(tok, target)
    expected = ref_alignment(x, y)
    assert global_alignment(x, y) == expected
    m = refine_mapper(tok, source, target)
    assert m.index[: len(y)].tolist() == [max(i, 0) for i in expected]
    assert m.alpha[: len(y)].tolist() == [float(i >= 0) for i in expected]
    # Aligned tokens really are the same token.
    for j, i in enumerate(expected):
        if i >= 0:
            assert x[i] == y[j]


def test_refine_ties_break_as_the_reference():
    # BOS a EOS -> BOS a a EOS: which "a" is new is a tie. The reference's traceback keeps the first
    # and marks the second new (npinv used to do the opposite).
    assert global_alignment([0, 1, 9], [0, 1, 1, 9]) == ref_alignment([0, 1, 9], [0, 1, 1, 9]) == [0, 1, -1, 2]
    x, y = [0, 3, 1, 9], [0, 1, 1, 3, 9]
    assert global_alignment(x, y) == ref_alignment(x, y) == [0, 2, -1, -1, 3]


def test_refine_padding_reads_source_padding(tok):
    """A shorter target's padding reads the source's padding, never the source's words. (The reference
    reads source position j for target padding j: "fluffy cat" would be read a second time.)"""
    source, target = "a photo of a fluffy cat", "a photo of a cat"
    x, y = token_ids(tok, source), token_ids(tok, target)
    m = refine_mapper(tok, source, target)
    pad = m.index[len(y) :][m.alpha[len(y) :] > 0]
    assert pad.tolist() == list(range(len(x), K))  # in order, up to the last source position
    assert (m.alpha[len(y) + K - len(x) :] == 0).all()  # the rest keep their own attention
    read = m.index[m.alpha > 0].tolist()
    assert len(read) == len(set(read))  # each source token is read at most once
    reference_pad = list(range(len(y), K))  # what the reference reads
    assert set(reference_pad) & set(m.index[: len(y)][m.alpha[: len(y)] > 0].tolist())  # it re-reads a word


# -- reweight, blend and the token limit -------------------------------------------------------------
def test_reweight_and_blend_words_with_multi_token_words(tok):
    prompt = "a photo of a hippopotamus, smiling"
    span = word_spans(tok, prompt)[4]
    assert len(span) == 4  # hippo po tamus + ","
    v = reweight_vector(tok, prompt, {"hippopotamus,": 2.0})
    assert v[span].eq(2).all() and v.sum() == K + len(span)
    assert find_word(tok, "a cat and a cat", "cat") == [2, 5]  # every occurrence


def test_words_past_the_token_limit_are_refused(tok):
    long = "a cat " + "very " * 80 + "cute dog"
    assert len(tok.encode(long)) > K
    for call in (lambda: find_word(tok, long, "dog"), lambda: reweight_vector(tok, long, {"dog": 2.0}),
                 lambda: cross_replace_alpha(tok, [long], 10, {"dog": 0.5})):
        with pytest.raises(NpinvError, match="77-token limit"):
            call()
    assert find_word(tok, long, "cat") == [2]  # inside the limit: fine


def test_prompt_of_exactly_the_limit(tok):
    words = ["cat"] * 75
    prompt = " ".join(words)
    assert len(tok(prompt, truncation=True, max_length=K).input_ids) == K
    assert find_word(tok, prompt, "cat")[-1] == 75  # the last word token before EOS
    m = replace_mapper(tok, prompt, " ".join(["dog"] + words[1:]))
    assert m[1, 1] == 1 and m[76, 76] == 1  # EOS -> EOS


# -- cross-replace schedule ------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [4, 10, 20, 50])
@pytest.mark.parametrize("bounds", [0.4, 0.8, 1.0, (0.2, 0.6), (0.0, 0.0)])
def test_cross_replace_alpha_matches_the_reference(tok, steps, bounds):
    window = (0.0, bounds) if isinstance(bounds, float) else bounds
    ours = cross_replace_alpha(tok, ["a dog"], steps, bounds)
    assert torch.equal(ours, ref_alpha(steps, window)[:steps])


def test_cross_replace_cut_off_is_int_f_times_steps_plus_one(tok):
    # 4 steps at 0.8: the reference replaces int(0.8 * 5) = 4 steps (int(0.8 * 4) would give 3).
    a = cross_replace_alpha(tok, ["a dog"], 4, 0.8)
    assert a[:, 0, 1].tolist() == [1, 1, 1, 1]


def test_cross_replace_per_word_windows(tok):
    a = cross_replace_alpha(tok, ["a hippopotamus", "a dog"], 9, {"default_": 0.8, "hippopotamus": (0.2, 0.5)})
    hippo = word_spans(tok, "a hippopotamus")[1]
    assert a[:, 0, hippo[0]].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0]  # rows int(0.2*10)=2 .. int(0.5*10)=5
    assert a[:, 1, 2].tolist() == [1] * 8 + [0]  # "a dog" has no hippopotamus: the default window
    with pytest.raises(NpinvError, match="no target prompt"):
        cross_replace_alpha(tok, ["a dog"], 9, {"cat": 0.5})
    with pytest.raises(NpinvError, match="window"):
        cross_replace_alpha(tok, ["a dog"], 9, (0.6, 0.2))
