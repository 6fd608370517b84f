from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npinv.scenes import COLORS, SHAPES, Edit, Scene, random_edit, random_scenes, read_scene
from npinv.vocab import build_vocab, write_tokenizer


def test_render_is_deterministic_and_antialiased():
    s = Scene("circle", "red", "blue", 0.5, 0.4, 0.6)
    a, b = np.asarray(s.render(64)), np.asarray(s.render(64))
    assert np.array_equal(a, b)
    mask = s.mask(64)
    assert mask.min() == 0 and mask.max() == 1
    assert ((mask > 0) & (mask < 1)).any()  # soft edge pixels
    assert s.caption == "a red circle on a blue background"
    assert abs(mask.sum() - np.pi * 16**2) < 20  # area of a radius-16 circle


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_reader_recovers_random_scenes(seed):
    scene = next(random_scenes(seed, 1))
    assert read_scene(scene.render(64)).matches(scene)


def test_edits_render_their_ground_truth():
    s = Scene("square", "green", "white")
    assert read_scene(s.edited(Edit("color", "black")).render(64)).color == "black"
    assert read_scene(s.edited(Edit("shape", "triangle")).render(64)).shape == "triangle"
    assert read_scene(s.edited(Edit("background", "red")).render(64)).background == "red"
    assert Edit("color", "black").words(s) == ("green", "black")
    rng = np.random.default_rng(0)
    for scene in random_scenes(1, 50):
        edit = random_edit(scene, rng)
        edited = scene.edited(edit)
        assert edited != scene and edited.color != edited.background


def test_invalid_scenes():
    with pytest.raises(ValueError):
        Scene("hexagon", "red", "blue")
    with pytest.raises(ValueError):
        Scene("circle", "red", "red")


def test_blank_image_has_no_object():
    reading = read_scene(Scene("circle", "red", "blue", 0.05).render(64))
    assert reading.background == "blue"


def test_tokenizer_keeps_vocabulary_words_whole(tmp_path):
    from transformers import CLIPTokenizer

    words = ["a", "on", "background", *SHAPES, *COLORS]
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path, words, max_length=32))
    caption = "a yellow triangle on a black background"
    assert tok.tokenize(caption) == [w + "</w>" for w in caption.split()]
    assert tok.model_max_length == 32
    ids = tok(caption).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    # Out-of-vocabulary text still tokenizes (byte fallback), it is just split.
    assert len(tok.tokenize("purple hexagon")) > 2
    vocab, merges = build_vocab(words)
    assert len(vocab) == len(set(vocab.values()))
