"""Prompt-to-Prompt through fused attention (``--attention fused``, the default) gives the edits of the
explicit path (``--attention explicit``, which materialises every hooked layer's probabilities and
edits them), on every tiny layout, controller and row layout; and it never materialises a
self-attention map, even at SDXL's 1024 px.

The equality runs the UNet in float64: in float32 the two kernels' rounding alone (no edit at all)
moves 5-step latents by about 5e-5 once guidance 7.5 amplifies it, which would hide a small error
in the edit's algebra; in float64 the latents of the two paths agree to float32 rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import npinv.attention.install
from npinv import ddim_inversion, load_model
from npinv.attention.processor import ControlledAttnProcessor
from npinv.editing import EditJob, EditSettings, edit, edit_batch
from npinv.io import image_to_tensor
from npinv.scenes import Scene

STEPS = 5
SOURCE = "a red circle on a blue background"
SQUARE = "a red square on a blue background"


@pytest.fixture
def processors(monkeypatch) -> list[dict[str, ControlledAttnProcessor]]:
    """The controlled processors each edit installs (their counters say which path each call took)."""
    installed: list[dict[str, ControlledAttnProcessor]] = []
    real = npinv.attention.install.controlled_attention

    @contextlib.contextmanager
    def recording(unet, hook, **kwargs):
        with real(unet, hook, **kwargs) as hooked:
            installed.append({info.name: unet.attn_processors[key] for key, info in hooked.items()})
            yield hooked

    monkeypatch.setattr(npinv.attention.install, "controlled_attention", recording)
    return installed


@pytest.fixture(scope="module", params=["sd_folder", "sd_v_folder", "sdxl_folder"], ids=["sd1", "sd2v", "sdxl"])
def model(request):
    return load_model(str(request.getfixturevalue(request.param)), device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def inversion(model):
    image = image_to_tensor(Scene("circle", "red", "blue", 0.5).render(32))
    return ddim_inversion(model, image, SOURCE, steps=STEPS)


CASES = {
    "replace-two-targets-blend": (
        dict(controller="replace", blend=("circle", "square")), [SQUARE, "a blue square on a blue background"]),
    "replace-windows": (
        dict(controller="replace", cross_replace=(0.2, 0.8), cross_replace_words={"square": 0.4},
             self_replace=(0.2, 0.8)), [SQUARE]),
    "refine-reweight": (dict(controller="refine", reweight={"square": 2.0}), ["a photo of a red square on a blue background"]),
    "reweight": (dict(controller="reweight", reweight={"red": 0.5}, self_replace=1.0), [SOURCE, SQUARE]),
    "reweight-replace-blend": (
        dict(controller="replace", reweight={"square": 3.0}, blend=("circle", "square")), [SQUARE]),
    "ddim-refine-blend": (dict(method="ddim", controller="refine", blend=("circle", "square")), [SQUARE]),
    "proxnpi-direct": (dict(method="proxnpi", controller="refine", direct=True), [SQUARE]),
    "refine-keep-maps": (dict(controller="refine", keep_attention_maps=True), ["a red square on the blue background"]),
}


def both(run) -> tuple:
    """``run(attention)`` under each path: (explicit, fused)."""
    return run("explicit"), run("fused")


def assert_same_edit(explicit, fused) -> None:
    assert (explicit.latents - fused.latents).abs().max().item() <= 1e-5
    assert explicit.controller.seen == fused.controller.seen
    if explicit.blend_mask is not None:
        assert torch.equal(explicit.blend_mask, fused.blend_mask)
    for mine, theirs in ((explicit.controller.blend_sum, fused.controller.blend_sum),
                         (explicit.controller.map_sum, fused.controller.map_sum)):
        assert mine.keys() == theirs.keys()
        for b in mine:
            torch.testing.assert_close(mine[b], theirs[b], atol=1e-6, rtol=0)


def test_each_edits_linear_form_is_the_edit(sd_model):
    """``AttentionEdit.linear`` and ``CrossEdit.weights`` restate each edit exactly (float64 maps)."""
    from npinv.attention.align import cross_replace_alpha, refine_mapper, replace_mapper, reweight_vector
    from npinv.attention.control import CrossEdit
    from npinv.attention.controllers import AttentionEdit, Refinement, Reweighting, WordSwap

    tok = sd_model.pipe.tokenizer
    k = tok.model_max_length
    targets = [SQUARE, "a blue circle on a blue background"]
    g = torch.Generator().manual_seed(0)
    base = torch.rand(2, 6, k, generator=g, dtype=torch.float64).softmax(-1)
    target = torch.rand(2, 2, 6, k, generator=g, dtype=torch.float64).softmax(-1)
    swap = WordSwap(torch.stack([replace_mapper(tok, SOURCE, t) for t in targets]))
    refine = Refinement([refine_mapper(tok, SOURCE, t) for t in ["a photo of a red square on a blue background",
                                                                   "a red circle on the blue background"]])
    scales = torch.stack([reweight_vector(tok, t, {"blue": 2.5}) for t in targets])
    for edit_ in (AttentionEdit(), swap, refine, Reweighting(swap, scales), Reweighting(refine, scales)):
        a, d = edit_.linear(2, k)
        by_form = torch.einsum("hqk,tkj->thqj", base, a.double()) + target * d.double()[:, None, None, :]
        torch.testing.assert_close(by_form, edit_(base, target), atol=1e-12, rtol=0)
        cross = CrossEdit(cross_replace_alpha(tok, targets, 10, {"default_": (0.1, 0.7), "square": 0.3}), edit_)
        w = cross.value_weights()
        assert len(w.base) == len(set(w.row_of_step)) < 10  # the distinct rows of the window table
        for step in range(10):
            u = w.row(step)
            uses_base = torch.tensor(w.uses_base[u], dtype=torch.float64)[:, None, None, None]
            by_form = (torch.einsum("hqk,tkj->thqj", base, w.base[u].double()) * uses_base
                       + target * w.own[u].double()[:, None, None, :])
            torch.testing.assert_close(by_form, cross.apply(base, target, step), atol=1e-12, rtol=0)
            assert w.own_is_one[u] == tuple(bool(x) for x in w.own[u].eq(1).all(1))


class SoftmaxSizes:
    """Records the size of the last dimension of every ``Tensor.softmax`` (how diffusers' explicit
    attention normalises its probabilities)."""

    def __init__(self, monkeypatch) -> None:
        self.sizes: list[int] = []
        real = torch.Tensor.softmax

        def softmax(tensor, *args, **kwargs):
            self.sizes.append(tensor.shape[-1])
            return real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "softmax", softmax)


def assert_fused_everywhere(installed: dict[str, ControlledAttnProcessor], sizes: list[int], keys: int,
                            maps: bool) -> None:
    """Every controlled layer went the fused way every call, and the only probabilities materialised
    (``sizes``: the key counts of every softmax) were cross-attention maps recorded for local blend or
    heat maps (``maps``)."""
    assert installed and all(p.fused_calls and not p.explicit_calls for p in installed.values())
    assert set(sizes) == ({keys} if maps else set())


@pytest.mark.parametrize("case", list(CASES))
def test_fused_edits_equal_explicit_ones(model, inversion, processors, monkeypatch, case):
    knobs, targets = CASES[case]
    settings = EditSettings(**knobs)
    explicit = edit(model, inversion, targets, dataclasses.replace(settings, attention="explicit"))
    softmax = SoftmaxSizes(monkeypatch)
    fused = edit(model, inversion, targets, settings)  # the default
    assert_same_edit(explicit, fused)
    assert "self_replaced" in fused.controller.seen and "cross_edited" in fused.controller.seen
    assert all(p.explicit_calls and not p.fused_calls for p in processors[0].values())
    keys = model.pipe.tokenizer.model_max_length
    assert_fused_everywhere(processors[1], softmax.sizes, keys, settings.keep_attention_maps or settings.blend is not None)


def test_fused_npi_with_separate_source_rows(model, inversion):
    """NPI's four-rows layout (the source's negative a row of its own) edits the same both ways."""
    settings = EditSettings(controller="replace", blend=("circle", "square"))
    explicit, fused = both(lambda attention: edit(model, inversion, [SQUARE], dataclasses.replace(
        settings, attention=attention), source_rows="separate"))
    assert fused.unet_rows == 4 * STEPS
    assert_same_edit(explicit, fused)


@pytest.mark.parametrize("knobs", [dict(controller="replace", blend=("red", "green")),
                                   dict(method="ddim", controller="refine", reweight={"green": 2.0})],
                         ids=["npi-replace-blend", "ddim-refine-reweight"])
def test_fused_batch_of_two_images_equals_explicit(model, knobs):
    """Two images (different prompts and target counts) in one UNet batch: each group reads only its
    own source, both ways."""
    from npinv.inversion import ddim_inversion_batch

    images = torch.cat([image_to_tensor(Scene("circle", "red", "blue", 0.5).render(32)),
                        image_to_tensor(Scene("square", "red", "yellow", 0.4).render(32))])
    invs = ddim_inversion_batch(model, images, [SOURCE, "a red square on a blue background"], steps=STEPS)
    targets = [["a green circle on a blue background", "a green square on a blue background"],
               ["a green square on a blue background"]]
    explicit, fused = both(lambda attention: edit_batch(
        model, [EditJob(inv, t) for inv, t in zip(invs, targets, strict=True)], EditSettings(attention=attention, **knobs)))
    for e, f in zip(explicit, fused, strict=True):
        assert_same_edit(e, f)


def test_fused_on_the_sd15_layout(sd15_layout_folder, processors):
    """SD 1.5's block layout and real tokenizer (multi-token words swapped), at 128 px."""
    model = load_model(str(sd15_layout_folder), device="cpu", dtype=torch.float64)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inv = ddim_inversion(model, image, "a photo of a hippopotamus on the grass", steps=3)
    targets = ["a photo of a rhinoceros on the grass", "a photo of a dog on the grass"]
    explicit, fused = both(lambda attention: edit(model, inv, targets, EditSettings(
        controller="replace", self_replace_size=1.0, attention=attention)))
    assert_same_edit(explicit, fused)
    assert all(p.fused_calls and not p.explicit_calls for p in processors[1].values())


def test_an_edit_without_a_linear_form_keeps_explicit_cross_attention(model, inversion, processors, monkeypatch):
    """A controller's edit that is only a callable (no ``linear``): its cross-attention layers take the
    explicit path, self-attention stays fused, and the edit is the explicit one."""
    from npinv.attention.controllers import Replace

    real = Replace.attention_edit

    def plain(self, tokenizer, source, targets):
        swap = real(self, tokenizer, source, targets)
        return lambda base, target: swap(base, target)

    monkeypatch.setattr(Replace, "attention_edit", plain)
    explicit, fused = both(lambda attention: edit(model, inversion, [SQUARE], EditSettings(
        controller="replace", attention=attention)))
    assert_same_edit(explicit, fused)
    layers = processors[1]
    assert all(p.explicit_calls and not p.fused_calls for name, p in layers.items() if name.endswith("attn2"))
    assert all(p.fused_calls and not p.explicit_calls for name, p in layers.items() if name.endswith("attn1"))


# -- SDXL at 1024 px: no self-attention map -------------------------------------------------------------------------


def test_sdxl_1024_self_replace_never_materialises_self_attention(sdxl_layout_folder, processors, monkeypatch):
    """SDXL's layout at 1024 px (latent 128x128, self-attention over 64x64 = 4096 and 32x32 = 1024
    queries), self-attention replaced at every layer and step: no softmax over more keys than the
    77 text tokens; the explicit path, at a small size, is seen doing it (the check works)."""
    model = load_model(str(sdxl_layout_folder), device="cpu")
    g = torch.Generator().manual_seed(0)
    small = ddim_inversion(model, torch.rand(1, 3, 256, 256, generator=g) * 2 - 1, "a photo of a hippopotamus", steps=2)
    large = ddim_inversion(model, torch.rand(1, 3, 1024, 1024, generator=g) * 2 - 1, "a photo of a hippopotamus",
                           steps=2)
    settings = EditSettings(controller="replace", self_replace=1.0, self_replace_size=1.0,
                            blend=("hippopotamus", "rhinoceros"))
    softmax = SoftmaxSizes(monkeypatch)
    edit(model, small, ["a photo of a rhinoceros"], dataclasses.replace(settings, attention="explicit"))
    assert max(softmax.sizes) == (256 // 8 // 2) ** 2  # the explicit path's 16x16 self-attention maps
    softmax.sizes.clear()
    result = edit(model, large, ["a photo of a rhinoceros"], settings)
    assert result.images.shape == (1, 3, 1024, 1024)
    assert result.controller.seen["self_replaced"] == {(64, 64), (32, 32)}
    assert_fused_everywhere(processors[1], softmax.sizes, 77, maps=True)  # only local blend's cross-attention maps


# -- the setting through the command line ---------------------------------------------------------------------------


def test_cli_attention_flag_reaches_the_processors(capsys, tmp_path, sd_folder, image_file, processors):
    """``--attention explicit`` and the default (fused) run the same edit, heat maps included, each on
    its own path; a bad value is the schema's one-line error."""
    import numpy as np
    from PIL import Image

    from npinv.cli import main

    def run(*argv) -> int:
        return main(["--quiet", "edit", str(image_file), "--source", SOURCE, "--target", SQUARE, "--controller",
                     "replace", "--blend", "circle", "square", "--steps", "3", "--model", str(sd_folder), *argv])

    pictures = {}
    for mode in ("explicit", "fused"):
        flag = ["--attention", mode] if mode == "explicit" else []
        assert run("--out", str(tmp_path / f"{mode}.png"), "--save-attention", str(tmp_path / mode), *flag) == 0
        with Image.open(tmp_path / f"{mode}.png") as img:
            pictures[mode] = np.asarray(img, dtype=np.int16)
    explicit, fused = processors
    assert all(p.explicit_calls and not p.fused_calls for p in explicit.values())
    assert all(p.fused_calls and not p.explicit_calls for p in fused.values())
    assert np.abs(pictures["explicit"] - pictures["fused"]).max() <= 1  # float32: kernel rounding only
    names = sorted(p.name for p in (tmp_path / "explicit").glob("*.png"))
    assert names and names == sorted(p.name for p in (tmp_path / "fused").glob("*.png"))
    capsys.readouterr()
    assert run("--out", str(tmp_path / "bad.png"), "--attention", "sparse") == 2
    assert "attention must be one of fused, explicit, got 'sparse'" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


# -- CUDA graphs (npinv.graphs), with a stand-in capture on the CPU ------------------------------------------------


def test_fused_edits_replay_one_graph_per_plan(sd_folder, monkeypatch):
    """With graphs on, a fused edit's UNet calls are keyed by the plans of their layers: captured once
    per plan key (here 3 keys in 5 steps: the cross-replace and self-replace windows open and close)
    and replayed. The stand-in capture replays the recorded operations without the Python between
    them, as a CUDA graph does: the edit equals the eager one exactly, and would not if the key missed
    a change (one key for every step). An edit that records maps (local blend) runs eagerly."""
    from npinv.attention.control import EditController
    from npinv.graphs import GraphCache, recording_capture

    model = load_model(str(sd_folder), device="cpu")
    inv = ddim_inversion(model, image_to_tensor(Scene("circle", "red", "blue", 0.5).render(32)), SOURCE, steps=STEPS)
    settings = EditSettings(controller="refine", cross_replace=(0.2, 0.8), self_replace=(0.2, 0.6), guidance=7.5)
    targets = ["a photo of a red square on a blue background", "a red square on the blue background"]
    eager = edit(model, inv, targets, settings)
    model.graphs = GraphCache(enabled=True, capture=recording_capture)
    graphed = edit(model, inv, targets, settings)
    assert torch.equal(graphed.latents, eager.latents)
    assert graphed.controller.seen == eager.controller.seen
    stats = model.graphs.stats
    assert (stats.captures, stats.replays, stats.eager, stats.failures) == (3, STEPS, 0, 0)
    edit(model, inv, [SQUARE], dataclasses.replace(settings, controller="replace", blend=("circle", "square")))
    assert (stats.captures, stats.eager) == (3, STEPS)

    real = EditController.graph_key
    monkeypatch.setattr(EditController, "graph_key", lambda self, *a: None if real(self, *a) is None else "one key")
    model.graphs = GraphCache(enabled=True, capture=recording_capture)
    frozen = edit(model, inv, targets, settings)
    assert model.graphs.stats.captures == 1 and (frozen.latents - eager.latents).abs().max() > 1e-2
