"""Prompt-to-Prompt editing: token mappers by hand, controllers, processors and row counts."""

from __future__ import annotations

import pytest
import torch

from npinv import ddim_inversion
from npinv.attention.align import (
    cross_replace_alpha,
    global_alignment,
    refine_mapper,
    replace_mapper,
    reweight_vector,
    word_spans,
)
from npinv.attention.control import CrossEdit
from npinv.attention.controllers import AttentionEdit, Reweighting
from npinv.attention.processor import ControlledAttnProcessor, controlled_attention, layer_infos
from npinv.editing import EditSettings, edit
from npinv.errors import NpinvError

STEPS = 5


@pytest.fixture(scope="module")
def tok(sd_model):
    return sd_model.pipe.tokenizer


@pytest.fixture(scope="module")
def inversion(sd_model):
    from npinv.io import image_to_tensor
    from npinv.scenes import Scene

    image = image_to_tensor(Scene("circle", "red", "blue", 0.5).render(32))
    return ddim_inversion(sd_model, image, "a red circle on a blue background", steps=STEPS)


def test_word_spans_count_bos(tok):
    # Every word of the test vocabulary is one token; "zebra" is not and splits into several.
    assert word_spans(tok, "a red circle") == [[1], [2], [3]]
    spans = word_spans(tok, "a zebra circle")
    assert spans[0] == [1] and len(spans[1]) > 1 and spans[2] == [spans[1][-1] + 1]


def test_replace_mapper_by_hand(tok):
    m = replace_mapper(tok, "a red circle", "a blue circle")
    k = tok.model_max_length
    assert m.shape == (k, k)
    assert torch.equal(m, torch.eye(k))  # one-token words swapped in place: identity
    # A one-token word replaced by an n-token word: the new tokens share the old word's attention.
    m = replace_mapper(tok, "a red circle", "a zebra circle")
    n = len(word_spans(tok, "a zebra circle")[1])
    assert m[2, 2 : 2 + n].tolist() == pytest.approx([1.0 / n] * n)
    assert m[3, 2 + n] == 1.0  # "circle" follows, shifted
    assert m[4, 3 + n] == 1.0  # EOS after the words maps to EOS after the words
    with pytest.raises(NpinvError, match="equal word counts.*refine"):
        replace_mapper(tok, "a red circle", "a big red circle")


def test_global_alignment_by_hand():
    #            a  red circle            a  big red circle
    assert global_alignment([0, 1, 2, 3], [0, 1, 9, 2, 3]) == [0, 1, -1, 2, 3]
    # With the reference scores (gap 0, mismatch -1) a substituted token is new, not aligned.
    assert global_alignment([0, 1, 2], [0, 5, 2]) == [0, -1, 2]


def test_refine_mapper_by_hand(tok):
    m = refine_mapper(tok, "a red circle", "a red blue circle")
    # BOS a red [blue] circle EOS: "blue" (position 3) is new, the rest keep their source tokens.
    assert m.index[:6].tolist() == [0, 1, 2, 0, 3, 4]
    assert m.alpha[:6].tolist() == [1, 1, 1, 0, 1, 1]
    assert m.index[6] == 5 and m.alpha[6] == 1  # padding maps to padding


def test_reweight_scales_only_chosen_tokens(tok):
    v = reweight_vector(tok, "a red circle", {"red": 2.0})
    assert v[2] == 2.0 and (v[torch.arange(len(v)) != 2] == 1).all()
    base = torch.rand(2, 6, tok.model_max_length)
    edit_ = CrossEdit(alpha=torch.ones(STEPS, 1, tok.model_max_length), edit=Reweighting(AttentionEdit(), v[None]))
    out = edit_.apply(base, base[None].clone(), 0)[0]
    assert torch.allclose(out[..., 2], 2 * base[..., 2])
    keep = torch.arange(len(v)) != 2
    assert torch.equal(out[..., keep], base[..., keep])
    with pytest.raises(NpinvError, match="not in the prompt"):
        reweight_vector(tok, "a red circle", {"green": 2.0})


def test_cross_replace_alpha_per_word(tok):
    a = cross_replace_alpha(tok, ["a blue circle"], 10, {"default_": 0.8, "blue": 0.3})
    assert a.shape == (10, 1, tok.model_max_length)
    assert a[:8, 0, 1].eq(1).all() and a[8:, 0, 1].eq(0).all()
    assert a[:3, 0, 2].eq(1).all() and a[3:, 0, 2].eq(0).all()


def test_processors_only_on_hooked_layers_and_restored_after_error(sd_model):
    unet = sd_model.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}

    class Boom:
        def attention(self, probs, layer):
            raise RuntimeError("boom")

    z = torch.randn(1, 4, 16, 16)
    with pytest.raises(RuntimeError, match="boom"):
        with controlled_attention(unet, Boom(), self_min_downscale=2) as hooked:
            kinds = {k: type(v) for k, v in unet.attn_processors.items()}
            assert all(kinds[k] is ControlledAttnProcessor for k in hooked)
            assert any(kinds[k] is before[k] for k in kinds if k not in hooked)  # fused ones stay
            sd_model.unet_output(z, 10, sd_model.encode_prompt("a cat"))
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_controlled_processor_matches_fused_attention(sd_model):
    class PassThrough:
        def attention(self, probs, layer):
            return probs

    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = sd_model.encode_prompt("a red circle")
    plain = sd_model.unet_output(z, 500, cond)
    with controlled_attention(sd_model.unet, PassThrough(), self_min_downscale=1):
        hooked = sd_model.unet_output(z, 500, cond)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)


def test_layer_resolutions_derive_from_config(sd_model, sdxl_folder):
    from npinv import load_model

    infos = layer_infos(sd_model.unet)
    assert {i.downscale for i in infos.values() if i.is_cross} == {1, 2}  # CrossAttnDown at 1, the mid block at 2
    xl = layer_infos(load_model(str(sdxl_folder), device="cpu").unet)
    assert {i.downscale for i in xl.values() if i.is_cross} == {2}


@pytest.mark.parametrize("controller", ["replace", "refine"])
def test_npi_three_rows_equal_four_rows(sd_model, inversion, controller):
    settings = EditSettings(method="npi", controller=controller, cross_replace=0.8, self_replace=0.6)
    three = edit(sd_model, inversion, ["a red square on a blue background"], settings)
    four = edit(sd_model, inversion, ["a red square on a blue background"], settings, source_rows="separate")
    assert three.unet_calls == STEPS and three.unet_rows == 3 * STEPS
    assert four.unet_rows == 4 * STEPS
    # Equal up to the rounding of a different batch size.
    torch.testing.assert_close(three.latents, four.latents, atol=1e-4, rtol=0)
    torch.testing.assert_close(three.images, four.images, atol=1e-4, rtol=0)


def test_npi_source_branch_is_the_reconstruction(sd_model, inversion):
    from npinv import reconstruct

    res = edit(sd_model, inversion, ["a red square on a blue background"], EditSettings(method="npi"))
    rec = reconstruct(sd_model, inversion, "npi", 7.5)
    torch.testing.assert_close(res.source_image, rec.image, atol=1e-4, rtol=0)


def test_many_targets_in_one_batch(sd_model, inversion):
    targets = ["a red square on a blue background", "a blue circle on a blue background", "a red circle on a red background"]
    res = edit(sd_model, inversion, targets, EditSettings(method="npi", controller="replace", blend=None))
    assert res.images.shape == (3, 3, 32, 32)
    assert res.unet_calls == STEPS and res.unet_rows == (1 + 2 * 3) * STEPS


@pytest.mark.parametrize("method", ["ddim", "nti", "proxnpi", "proxnpi-noig"])
def test_every_method_edits(sd_model, inversion, method):
    res = edit(sd_model, inversion, ["a red square on a blue background"],
               EditSettings(method=method, controller="refine", blend=("circle", "square")))
    assert res.images.shape == (1, 3, 32, 32) and torch.isfinite(res.images).all()
    assert res.blend_mask is not None and res.blend_mask.shape == (1, 1, 16, 16)
    assert set(res.blend_mask.unique().tolist()) <= {0.0, 1.0}


def test_direct_inversion_pins_source_to_trajectory(sd_model, inversion):
    res = edit(sd_model, inversion, ["a red square on a blue background"],
               EditSettings(method="ddim", controller="refine", direct=True))
    # The source branch ends exactly on z*[0], whatever the guidance did.
    assert torch.equal(res.latents[0], inversion.trajectory[0])


def test_bad_edit_settings(sd_model, inversion):
    with pytest.raises(NpinvError, match="blend word 'dog'"):
        edit(sd_model, inversion, ["a red square on a blue background"], EditSettings(blend=("dog", "square")))
    with pytest.raises(NpinvError, match="equal word counts"):
        edit(sd_model, inversion, ["a big red square on a blue background"], EditSettings(controller="replace"))
    with pytest.raises(NpinvError, match="method must be one of npi, proxnpi, proxnpi-noig, nti, ddim, flowedit, got 'magic'"):
        edit(sd_model, inversion, ["x"], EditSettings(method="magic"))


def test_blend_maps_are_read_after_the_controllers_edit(sd_model, inversion):
    """As in the reference (its store keeps the tensor the controller then edits in place), local
    blend reads the targets' cross-attention after the source's maps were injected: with a one-token
    swap replaced at every step, the target's recorded maps are the source's."""
    settings = EditSettings(controller="replace", cross_replace=1.0, blend=("circle", "square"))
    res = edit(sd_model, inversion, ["a red square on a blue background"], settings)
    sums = res.controller.blend_sum
    torch.testing.assert_close(sums[1], sums[0], rtol=0, atol=1e-6)


def test_local_blend_starts_at_int_start_times_steps(sd_model, inversion):
    """Blend acts from step int(blend_start * steps), as the null-text notebook's counter does
    (5 steps: 0.2 and 0.39 both start at step 1, 0.4 at step 2, 1.0 never blends)."""
    target = ["a red square on a blue background"]

    def run(start):
        # A high threshold: the random model's attention is nearly flat, a 0.3 mask may cover everything.
        return edit(sd_model, inversion, target, EditSettings(controller="replace", blend=("circle", "square"),
                                                            blend_start=start, blend_threshold=0.95)).latents

    assert torch.equal(run(0.2), run(0.39))
    assert not torch.equal(run(0.2), run(0.4))
    unblended = edit(sd_model, inversion, target, EditSettings(controller="replace")).latents
    assert torch.equal(run(1.0), unblended)


def test_self_replacement_layers_follow_the_size_setting(sd_model, inversion):
    """Self-attention is replaced in layers whose query maps are at most the given fraction of the
    latent's side (0.5: 32x32 at 512 px, the reference); cross-attention is edited everywhere."""
    target = ["a red square on a blue background"]
    for size, expected in ((0.5, {(8, 8)}), (1.0, {(16, 16), (8, 8)})):
        res = edit(sd_model, inversion, target, EditSettings(controller="replace", self_replace_size=size))
        assert res.controller.seen["self_replaced"] == expected
        assert res.controller.seen["cross_edited"] == {(16, 16), (8, 8)}


@pytest.mark.parametrize("fixture", ["sd_v_folder", "sdxl_folder"])
def test_editing_works_on_sd2_v_and_sdxl(request, fixture):
    from npinv import load_model
    from npinv.io import image_to_tensor
    from npinv.scenes import Scene

    model = load_model(str(request.getfixturevalue(fixture)), device="cpu")
    image = image_to_tensor(Scene("circle", "red", "blue", 0.5).render(32))
    inv = ddim_inversion(model, image, "a red circle on a blue background", steps=STEPS)
    for controller in ("replace", "refine"):
        settings = EditSettings(method="npi", controller=controller, blend=("red", "blue"), reweight={"blue": 2.0})
        three = edit(model, inv, ["a blue circle on a blue background"], settings)
        four = edit(model, inv, ["a blue circle on a blue background"], settings, source_rows="separate")
        assert three.unet_rows == 3 * STEPS and four.unet_rows == 4 * STEPS
        torch.testing.assert_close(three.latents, four.latents, atol=1e-4, rtol=0)
        assert three.blend_mask is not None


@pytest.mark.parametrize("settings", [
    EditSettings(method="npi", controller="replace", blend=("red", "green")),
    EditSettings(method="proxnpi", controller="refine", direct=True),
    EditSettings(method="nti", controller="none", guidance=3.0),
], ids=["npi-replace-blend", "proxnpi-refine-direct", "nti"])
def test_batched_images_edit_as_each_alone(sd_model, settings):
    """Two images (different prompts, different target counts) in one UNet batch per step give
    each image the edit it gets alone: groups never see each other's attention or quantiles."""
    from npinv.editing import EditJob, edit_batch
    from npinv.inversion import ddim_inversion_batch
    from npinv.io import image_to_tensor
    from npinv.scenes import Scene

    images = torch.cat([image_to_tensor(Scene("circle", "red", "blue", 0.5).render(32)),
                        image_to_tensor(Scene("square", "red", "yellow", 0.4).render(32))])
    prompts = ["a red circle on a blue background", "a red square on a yellow background"]
    batch_inv = ddim_inversion_batch(sd_model, images, prompts, steps=STEPS)
    alone_inv = [ddim_inversion(sd_model, images[k : k + 1], p, steps=STEPS) for k, p in enumerate(prompts)]
    for a, b in zip(batch_inv, alone_inv, strict=True):
        torch.testing.assert_close(a.trajectory, b.trajectory, atol=1e-5, rtol=0)
    targets = [["a green circle on a blue background", "a green square on a blue background"],
               ["a green square on a yellow background"]]
    calls0 = sd_model.counter.calls
    together = edit_batch(sd_model, [EditJob(inv, t) for inv, t in zip(alone_inv, targets, strict=True)], settings)
    batch_calls = sd_model.counter.calls - calls0
    for k, (inv, t) in enumerate(zip(alone_inv, targets, strict=True)):
        alone = edit(sd_model, inv, t, settings)
        assert together[k].images.shape == alone.images.shape == (len(t), 3, 32, 32)
        torch.testing.assert_close(together[k].images, alone.images, atol=1e-4, rtol=0)
        torch.testing.assert_close(together[k].source_image, alone.source_image, atol=1e-4, rtol=0)
        if settings.blend:
            assert torch.equal(together[k].blend_mask, alone.blend_mask)
    if settings.method == "npi":
        assert batch_calls == STEPS  # one UNet call a step for both images


def test_batched_edit_refuses_mixed_schedules(sd_model, inversion):
    from npinv.editing import EditJob, edit_batch
    from npinv.io import image_to_tensor
    from npinv.scenes import Scene

    other = ddim_inversion(sd_model, image_to_tensor(Scene("circle", "red", "blue", 0.5).render(32)),
                           "a red circle on a blue background", steps=STEPS + 1)
    with pytest.raises(NpinvError, match="same model, steps"):
        edit_batch(sd_model, [EditJob(inversion, ["a green circle on a blue background"]),
                              EditJob(other, ["a green circle on a blue background"])], EditSettings())
