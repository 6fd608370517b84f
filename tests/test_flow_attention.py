"""Prompt-to-Prompt on joint attention (SD3 / SD3.5 MMDiT, FLUX.1 double- and single-stream blocks).

Processor-level checks use values equal to the identity (``V = I``, one value channel per key), so a
block's attention output *is* its probabilities: the edited maps, text masses and the fused path's
algebra are read off exactly. End-to-end edits run the tiny models in float64, where fused and explicit
attention agree to float32 rounding (cf. tests/test_fused_attention.py)."""

from __future__ import annotations

import types

import pytest
import torch

from npinv.attention.align import TextTokens, replace_mapper, segment
from npinv.attention.control import BranchGroup, EditController
from npinv.attention.controllers import get_controller
from npinv.attention.install import attention_control, blend_downscale, edit_tokens
from npinv.attention.joint import JointControlledProcessor, JointLayout, JointSession
from npinv.attention.processor import LayerInfo
from npinv.editing import edit
from npinv.flow_model import FlowModel
from npinv.sampling import Row
from npinv.settings import EditSettings, InvertSettings

SIZE, STEPS = 16, 4
SOURCE = "a red circle on blue background"
GREEN = "a green circle on blue background"
SQUARE = "a red square on blue background"


def _model(folder, dtype=torch.float64, **kwargs) -> FlowModel:
    from tiny_flow import load

    return FlowModel(load(folder).to(dtype), str(folder), torch.device("cpu"), dtype, **kwargs)


@pytest.fixture(scope="module")
def models(sd3_folder, sd35_folder, sd3_no_t5_folder, flux_dev_folder):
    return {"sd3": _model(sd3_folder), "sd35": _model(sd35_folder), "sd3-no-t5": _model(sd3_no_t5_folder),
            "flux-dev": _model(flux_dev_folder, max_sequence_length=16)}


@pytest.fixture(scope="module")
def inversions(models):
    from npinv.scenes import Scene
    from npinv.service import invert, prepare_picture

    settings = InvertSettings(steps=STEPS, size=SIZE)
    out = {}
    for name in ("sd3", "sd35", "flux-dev"):
        model = models[name]
        source = prepare_picture(Scene("circle", "red", "blue", 0.5).render(SIZE), model, settings)
        out[name] = invert(model, [source], [SOURCE], settings)[0].inversion
    return out


# -- token layouts ----------------------------------------------------------------------------------------
def test_each_family_addresses_its_text_rows(models):
    sd3, flux, bare = edit_tokens(models["sd3"]), edit_tokens(models["flux-dev"]), edit_tokens(models["sd3-no-t5"])
    clip, t5 = sd3.segments
    assert (clip.start, clip.length, clip.bos) == (0, 77, 1) and (t5.start, t5.length, t5.bos) == (77, 256, 0)
    assert sd3.length == models["sd3"].encode_prompt(SOURCE).hidden.shape[1]
    assert bare.segments[1].tokenizer is None and bare.length == sd3.length
    assert flux.length == 16 == models["flux-dev"].encode_prompt(SOURCE).hidden.shape[1]
    assert flux.segments[0].tokenizer is models["flux-dev"].pipe.tokenizer_2 and flux.segments[0].bos == 0
    # "red" is CLIP row 2 (after BOS and "a") and T5 row 77 + 1 (T5 has no BOS).
    m = replace_mapper(sd3, SOURCE, GREEN)
    assert m[2, 2] == 1 and m[78, 78] == 1 and m.sum(1).eq(1).all()
    assert m[:77, 77:].eq(0).all() and m[77:, :77].eq(0).all()  # one block per segment
    assert torch.equal(replace_mapper(bare, SOURCE, GREEN)[77:, 77:], torch.eye(256))  # zero rows: themselves


def test_t5_words_are_spanned_by_t5_pieces():
    from tiny_flow import t5_tokenizer

    seg = segment(t5_tokenizer(), 16)
    spans = seg.spans("a red zebra")  # "zebra" is not a piece of the tiny vocabulary: several pieces
    assert seg.bos == 0 and spans[:2] == [[0], [1]] and len(spans[2]) > 1 and spans[2][0] == 2
    assert len(seg.ids("a red zebra")) == spans[2][-1] + 2  # the pieces, then </s>: spans tile the ids
    tokens = TextTokens((seg,))
    m = replace_mapper(tokens, "a red zebra", "a blue zebra")
    assert m[1, 1] == 1 and m.sum(1).eq(1).all()


# -- processor-level: the maths of one block ----------------------------------------------------------------
def _controller(controller: str, targets: list[str], tokens: TextTokens, *, self_window=(0.0, 0.0), steps=4,
                **settings) -> EditController:
    s = EditSettings(controller=controller, **settings)
    cross = get_controller(controller).cross_edit(tokens, SOURCE, targets, steps, s)
    return EditController(steps, [BranchGroup(0, list(range(1, 1 + len(targets))), cross)], self_window)


def _step(controller: EditController, i: int, rows: list[Row]) -> None:
    controller.state = types.SimpleNamespace(i=i, rows=rows, z=torch.zeros(1, 1, 4, 4))


@pytest.fixture(scope="module")
def t5_tokens():
    from tiny_flow import t5_tokenizer

    return TextTokens((segment(t5_tokenizer(), 12),))


def _qkv(rows: int, n_img: int, n_txt: int, *, text_first: bool, seed: int = 0):
    """Random queries and keys (B, H, S, 8) and identity values (B, H, S, S): the output is the probabilities."""
    g = torch.Generator().manual_seed(seed)
    s = n_img + n_txt
    q = torch.randn(rows, 2, s, 8, generator=g, dtype=torch.float64) * 2
    k = torch.randn(rows, 2, s, 8, generator=g, dtype=torch.float64) * 2
    v = torch.eye(s, dtype=torch.float64).expand(rows, 2, s, s).contiguous()
    img, txt = (slice(n_txt, s), slice(0, n_txt)) if text_first else (slice(0, n_img), slice(n_img, s))
    return q, k, v, JointLayout(img, txt)


CASES = {
    "replace": dict(controller="replace", targets=[GREEN]),
    "replace-window": dict(controller="replace", targets=[GREEN], cross_replace=(0.0, 0.4)),
    "refine": dict(controller="refine", targets=["a big red circle on blue background"]),
    "reweight": dict(controller="reweight", targets=[SOURCE], reweight={"red": 2.0}),
    "replace-reweight-two": dict(controller="replace", targets=[GREEN, SQUARE], reweight={"blue": 0.5}),
}


@pytest.mark.parametrize("text_first", [False, True], ids=["sd3-layout", "flux-layout"])
@pytest.mark.parametrize("case", CASES)
def test_fused_equals_explicit_and_keeps_the_text_stream(t5_tokens, case, text_first):
    spec = dict(CASES[case])
    targets, name = spec.pop("targets"), spec.pop("controller")
    n_txt, n_img = t5_tokens.length, 9
    rows = [Row(0, "cond")] + [Row(t + 1, "cond") for t in range(len(targets))] + [Row(0, "neg")]
    q, k, v, lay = _qkv(len(rows), n_img, n_txt, text_first=text_first)
    layer = LayerInfo("block", True, 1)
    outs = {}
    for mode in ("fused", "explicit"):
        ctrl = _controller(name, targets, t5_tokens, **spec)
        for step in (0, 3):
            _step(ctrl, step, rows)
            outs[mode, step] = JointSession(ctrl, mode, n_txt).attend(q, k, v, layer, lay)
    plain = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1)
    for step in (0, 3):
        torch.testing.assert_close(outs["fused", step], outs["explicit", step], atol=1e-12, rtol=0)
        probs = outs["fused", step]
        # Text queries (every row) and the source and negative rows are unedited.
        torch.testing.assert_close(probs[:, :, lay.text], plain[:, :, lay.text], atol=1e-12, rtol=0)
        torch.testing.assert_close(probs[[0, -1]], plain[[0, -1]], atol=1e-12, rtol=0)
        # Each target image query keeps its image-key row; a word swap keeps its text mass.
        torch.testing.assert_close(probs[1:-1, :, lay.image, lay.image], plain[1:-1, :, lay.image, lay.image])
        if case in ("replace", "replace-window"):  # refine and reweight change the mass by design
            mass = probs[1:-1, :, lay.image, lay.text].sum(-1)
            torch.testing.assert_close(mass, plain[1:-1, :, lay.image, lay.text].sum(-1), atol=1e-12, rtol=0)
    edited_now = not torch.allclose(outs["fused", 0][1:-1], plain[1:-1])
    assert edited_now
    if case == "replace-window":  # outside the cross-replace window the target's own attention
        torch.testing.assert_close(outs["fused", 3], plain, atol=1e-12, rtol=0)


def test_word_swap_gives_the_target_the_sources_renormalised_map(t5_tokens):
    ctrl = _controller("replace", [GREEN], t5_tokens)
    rows = [Row(0, "cond"), Row(1, "cond")]
    q, k, v, lay = _qkv(2, 9, t5_tokens.length, text_first=True, seed=3)
    _step(ctrl, 0, rows)
    probs = JointSession(ctrl, "fused", t5_tokens.length).attend(q, k, v, LayerInfo("b", True, 1), lay)
    plain = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1)
    src = plain[0, :, lay.image, lay.text]
    mapper = replace_mapper(t5_tokens, SOURCE, GREEN).double()
    want = (src / src.sum(-1, keepdim=True)) @ mapper
    got = probs[1, :, lay.image, lay.text]
    torch.testing.assert_close(got / got.sum(-1, keepdim=True), want, atol=1e-12, rtol=0)
    assert torch.allclose(got.sum(-1), plain[1, :, lay.image, lay.text].sum(-1), atol=1e-12)


def test_self_replace_injects_the_sources_image_queries_and_keys(t5_tokens):
    ctrl = _controller("replace", [GREEN], t5_tokens, self_window=(0.0, 0.5), cross_replace=0.0)
    rows = [Row(0, "cond"), Row(1, "cond")]
    n_txt = t5_tokens.length
    q, k, v, lay = _qkv(2, 9, n_txt, text_first=False, seed=5)
    qi, ki = q.clone(), k.clone()
    qi[1, :, lay.image], ki[1, :, lay.image] = q[0, :, lay.image], k[0, :, lay.image]
    injected = torch.softmax(qi @ ki.transpose(-1, -2) / 8**0.5, -1)
    plain = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1)
    for mode in ("fused", "explicit"):
        for step, want in ((0, injected), (1, injected), (2, plain)):  # window (0, 0.5) of 4 steps: 0 and 1
            _step(ctrl, step, rows)
            out = JointSession(ctrl, mode, n_txt).attend(q, k, v, LayerInfo("b", True, 1), lay)
            torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    # The target's text queries keep their own queries and keys, over the injected image keys.
    assert not torch.allclose(injected[1, :, lay.text], plain[1, :, lay.text])


def test_recorded_maps_are_the_text_block_renormalised(t5_tokens):
    recorded = []

    class Recording(EditController):
        def _record(self, probs, layer, cond_rows, state):
            recorded.append(probs.detach().clone())

    n_txt = t5_tokens.length
    q, k, v, lay = _qkv(2, 9, n_txt, text_first=True, seed=7)
    for mode in ("fused", "explicit"):
        ctrl = Recording(4, [BranchGroup(0, [1], get_controller("replace").cross_edit(
            t5_tokens, SOURCE, [GREEN], 4, EditSettings(controller="replace")))], blend_downscale=1)
        _step(ctrl, 0, [Row(0, "cond"), Row(1, "cond")])
        out = JointSession(ctrl, mode, n_txt).attend(q, k, v, LayerInfo("b", True, 1), lay)
        maps = recorded[-1]
        assert maps.shape == (2, 2, 9, n_txt)
        # (the fused path records in float32, as the UNet path does)
        torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 9, dtype=maps.dtype), atol=1e-6, rtol=0)
        block = out[:, :, lay.image, lay.text]
        torch.testing.assert_close(maps, (block / block.sum(-1, keepdim=True)).to(maps.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(recorded[0], recorded[1].to(recorded[0].dtype), atol=1e-6, rtol=0)


# -- installation through diffusers' processor API -------------------------------------------------------------
def _attention_io(transformer):
    """Forward hooks capturing every attention module's inputs and outputs."""
    seen, handles = {}, []
    for name, module in transformer.named_modules():
        if hasattr(module, "processor") and hasattr(module, "set_processor"):
            def grab(mod, args, kwargs, out, name=name):
                seen[name] = (args, dict(kwargs), out)
            handles.append(module.register_forward_hook(grab, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux-dev"])
def test_unhooked_blocks_are_diffusers_and_an_idle_controller_changes_nothing(models, name):
    model = models[name]
    transformer = model.transformer
    z = torch.randn(2, model.latent_channels, 8, 8, dtype=torch.float64)
    cond = model.encode_prompt(SOURCE)
    cond = type(cond)(cond.hidden.expand(2, -1, -1), cond.pooled.expand(2, -1))
    plain = model.unet_output(z, 500.0, cond)
    ctrl = _controller("replace", [GREEN], edit_tokens(model), self_window=(0.0, 1.0))
    # A controller outside a step leaves the output bit for bit (the fused processors' plain call).
    with attention_control(model, ctrl, self_replace_size=0.5, mode="fused"):
        assert torch.equal(model.unet_output(z, 500.0, cond), plain)
    # Hook only the first block; the edit changes the output, and every other block's attention output
    # is what diffusers' own processor gives for its inputs.
    first = "transformer_blocks.0.attn"
    _step(ctrl, 0, [Row(0, "cond"), Row(1, "cond")])
    seen, handles = _attention_io(transformer)
    try:
        with attention_control(model, ctrl, self_replace_size=0.5, mode="fused", blocks=lambda n: n == first):
            kinds = {k: type(p).__name__ for k, p in transformer.attn_processors.items()}
            edited = model.unet_output(z, 500.0, cond)
    finally:
        for h in handles:
            h.remove()
    assert kinds[first + ".processor"] == "JointControlledProcessor"
    assert sum(v == "JointControlledProcessor" for v in kinds.values()) == 1
    assert not torch.allclose(edited, plain)
    others = [n for n in seen if n != first]
    assert len(others) == len(kinds) - 1  # (the tiny SD3 has one block: nothing else to compare there)
    for n in others:
        module = transformer.get_submodule(n)
        args, kwargs, out = seen[n]
        again = module.processor(module, *args, **kwargs)
        for a, b in zip(again if isinstance(again, tuple) else (again,), out if isinstance(out, tuple) else (out,),
                        strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux-dev"])
def test_processors_are_restored_after_an_edit_and_after_an_error(models, name):
    model = models[name]
    before = dict(model.transformer.attn_processors)
    ctrl = _controller("replace", [GREEN], edit_tokens(model))
    with attention_control(model, ctrl, self_replace_size=0.5, mode="fused") as session:
        assert isinstance(session, JointSession)
        during = model.transformer.attn_processors
        assert all(isinstance(p, JointControlledProcessor) for p in during.values())
        if name == "sd35":  # the image-only attn2 layers: self-replacement only
            attn2 = [p for k, p in during.items() if ".attn2." in k]
            assert attn2 and all(not p.layer.is_cross for p in attn2)
    with pytest.raises(RuntimeError, match="boom"), attention_control(model, ctrl, mode="explicit"):
        raise RuntimeError("boom")
    after = model.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    # Without self-replacement SD3.5's attn2 layers are not hooked at all.
    with attention_control(model, ctrl, mode="fused"):
        hooked = {k for k, p in model.transformer.attn_processors.items() if isinstance(p, JointControlledProcessor)}
    assert hooked == {k for k in before if ".attn2." not in k}


def test_blend_reads_every_block_at_the_patch_grid(models):
    assert blend_downscale(models["sd3"], (16, 16), 4) == models["sd3"].patch
    assert blend_downscale(models["flux-dev"], (16, 16)) == 2


# -- end to end: NPI edits through npinv.editing ---------------------------------------------------------------
E2E = {
    "replace-blend": dict(controller="replace", blend=("red", "green")),
    "refine": dict(controller="refine"),
    "reweight": dict(controller="reweight", reweight={"green": 2.0}),
    "self-replace": dict(controller="replace", self_replace=0.5, cross_replace=0.5),
}


@pytest.mark.parametrize("case", E2E)
@pytest.mark.parametrize("name", ["sd3", "sd35", "flux-dev"])
def test_npi_edits_fused_equal_explicit(models, inversions, name, case):
    model, inv = models[name], inversions[name]
    results = {}
    for mode in ("fused", "explicit"):
        settings = EditSettings(method="npi", guidance=7.5, attention=mode, **E2E[case])
        results[mode] = edit(model, inv, [GREEN], settings)
    fused, explicit = results["fused"], results["explicit"]
    assert (fused.latents - explicit.latents).abs().max() <= 1e-5
    assert fused.cost.unet_rows == explicit.cost.unet_rows == 3 * STEPS  # 1 + 2T rows a step, T = 1
    if fused.blend_mask is not None:
        assert torch.equal(fused.blend_mask, explicit.blend_mask)
    seen = fused.controller.seen
    assert "cross_edited" in seen and ("self_replaced" in seen) == (E2E[case].get("self_replace", 0.6) > 0)


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_npi_edit_batch_with_replace_and_blend(models, inversions, name):
    from npinv.editing import EditJob, edit_batch

    model, inv = models[name], inversions[name]
    # (a high threshold: the random tiny models spread each word almost evenly over the image)
    settings = EditSettings(method="npi", guidance=7.5, controller="replace", blend=("red", "green"),
                            blend_threshold=0.99)
    targets = [GREEN, "a green circle on red background"]
    (result,) = edit_batch(model, [EditJob(inv, targets)], settings)
    assert result.cost.unet_rows == (1 + 2 * len(targets)) * STEPS
    assert result.blend_mask.shape == (2, 1, *inv.trajectory.shape[-2:])
    assert 0 < result.blend_mask.float().mean() < 1  # a local mask, not all or nothing
    # Outside the mask the targets keep the source's latents (local blend after the last step).
    outside = result.blend_mask[0, 0] == 0
    assert torch.allclose(result.latents[1][:, outside], result.latents[0][:, outside], atol=1e-6)
    none = edit(model, inv, targets[:1], EditSettings(method="npi", guidance=7.5, controller="none"))
    assert not torch.allclose(none.latents[1], result.latents[1])


def test_flux_text_of_another_length_is_refused_and_the_processors_restored(models):
    """FLUX's single-stream blocks are not told the text length: the installer's must be the call's."""
    model = models["flux-dev"]
    before = dict(model.transformer.attn_processors)
    cond = model.encode_prompt(SOURCE)
    short = type(cond)(cond.hidden[:, :8], cond.pooled)
    ctrl = _controller("replace", [GREEN], edit_tokens(model))
    with pytest.raises(ValueError, match="text of 8 tokens, but the edit addresses 16"), \
            attention_control(model, ctrl, mode="fused"):
        model.unet_output(torch.zeros(1, 1, 4, 4, dtype=torch.float64), 500.0, short)
    assert all(model.transformer.attn_processors[k] is p for k, p in before.items())


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_heat_maps_read_the_same_maps(models, inversions, name):
    """--save-attention on a flow model: one map per word of each prompt, at the latent's size, from the
    edited image->text maps of every block (each map's rows sum to 1 over the text rows, and the words'
    rows are disjoint, so the source words' maps add up to at most 1 everywhere)."""
    from npinv.attention.maps import word_maps

    model, inv = models[name], inversions[name]
    result = edit(model, inv, [GREEN], EditSettings(method="npi", guidance=7.5, controller="replace",
                                                    keep_attention_maps=True))
    maps = word_maps(model, result, SOURCE)
    assert [(m.label, m.word) for m in maps] == [("source", w) for w in SOURCE.split()] + [
        ("target0", w) for w in GREEN.split()]
    for m in maps:
        assert m.heat.shape == inv.trajectory.shape[-2:] and m.heat.min() >= 0
    total = sum(m.heat for m in maps if m.label == "source")
    assert 0 < total.max() <= 1 + 1e-6


@pytest.mark.parametrize("mode", ["fused", "explicit"])
def test_fused_mode_materialises_only_the_image_text_block(models, inversions, monkeypatch, mode):
    """Fused: probabilities only for the maps local blend reads, image queries x text keys; explicit: the
    whole joint softmax of every hooked block (the oracle)."""
    import npinv.attention.joint as joint

    model, inv = models["flux-dev"], inversions["flux-dev"]
    shapes = []
    real = joint._probs

    def probs(q, k):
        shapes.append((q.shape[-2], k.shape[-2]))
        return real(q, k)

    monkeypatch.setattr(joint, "_probs", probs)
    edit(model, inv, [GREEN], EditSettings(method="npi", guidance=7.5, controller="replace", blend=("red", "green"),
                                           attention=mode))
    n_txt, n_img = edit_tokens(model).length, model.image_seq_len(tuple(inv.trajectory.shape[-2:]))
    want = (n_img, n_txt) if mode == "fused" else (n_txt + n_img, n_txt + n_img)
    assert shapes and set(shapes) == {want}
