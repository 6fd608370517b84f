"""The method and controller registries: what each method gives the loop, and that a new method or
controller is one object that every front end then offers (the CLI here, through the schema)."""

from __future__ import annotations

import json
from types import MappingProxyType

import pytest
import torch

from npinv.attention import controllers
from npinv.attention.controllers import CONTROLLERS, AttentionEdit, Controller
from npinv.cli import main
from npinv.errors import NpinvError
from npinv.guidance import CFG, ProximalGuidance
from npinv.inversion import ddim_inversion
from npinv.io import image_to_tensor
from npinv.methods import METHODS, InversionGuidance, Method, get_method, reconstruct
from npinv.model import PromptEmbedding
from npinv.scenes import Scene
from npinv.settings import EditSettings

STEPS = 3
SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"


@pytest.fixture(scope="module")
def inversion(sd_model):
    image = image_to_tensor(Scene("circle", "red", "blue", 0.5).render(32))
    return ddim_inversion(sd_model, image, SOURCE, steps=STEPS)


def test_registry_lists_every_method_once_in_front_end_order():
    assert list(METHODS) == ["npi", "proxnpi", "proxnpi-noig", "nti", "ddim", "flowedit"]
    assert all(get_method(name).name == name and get_method(name).summary for name in METHODS)
    with pytest.raises(NpinvError, match="unknown method 'magic'; choose one of npi, proxnpi"):
        get_method("magic")
    with pytest.raises(TypeError):
        METHODS["x"] = METHODS["npi"]  # read-only: no module-level mutable state


def test_each_method_gives_its_negatives_guidance_and_hooks(inversion):
    inv = inversion
    assert all(e is inv.source for e in METHODS["npi"].negatives(inv, 7.5))
    assert all(e is inv.null for e in METHODS["ddim"].negatives(inv, 7.5))
    assert METHODS["nti"].negatives(inv, 7.5) is None  # not optimised yet: the optimiser runs
    for name in ("npi", "nti", "ddim"):
        assert isinstance(METHODS[name].guidance(7.5), CFG) and METHODS[name].hooks(EditSettings(), []) == []
    assert isinstance(METHODS["proxnpi"].guidance(7.5), ProximalGuidance)
    assert [type(h) for h in METHODS["proxnpi"].hooks(EditSettings(), [])] == [InversionGuidance]
    assert METHODS["proxnpi-noig"].hooks(EditSettings(), []) == []


def test_nti_reuse_rule_is_its_guidance(sd_model, inversion):
    rec = reconstruct(sd_model, inversion, "nti", 7.5)
    nti = METHODS["nti"]
    assert nti.negatives(rec.inversion, 7.5) is not None  # reused at the guidance it was optimised for
    assert nti.negatives(rec.inversion, 3.0) is None  # another guidance optimises again
    again = reconstruct(sd_model, rec.inversion, "nti", 7.5)
    # The same walk up to float rounding (the optimiser evaluated the condition and negative apart).
    assert again.cost.unet_calls == STEPS and torch.allclose(again.latent, rec.latent, atol=1e-3)


@pytest.mark.parametrize("name", [m for m in METHODS if METHODS[m].needs_inversion])
def test_every_method_reconstructs_and_costs_what_it_says(sd_model, inversion, name):
    rec = reconstruct(sd_model, inversion, name, 7.5)
    rows = {"npi": STEPS, "proxnpi": STEPS, "proxnpi-noig": STEPS, "ddim": 2 * STEPS}
    if name in rows:  # a shared negative (NPI's) costs one row a step
        assert rec.cost.unet_calls == STEPS and rec.cost.unet_rows == rows[name]
    if name.startswith("proxnpi"):  # d = e_cond - e_neg is 0 when the negative is the condition
        assert torch.equal(rec.latent, reconstruct(sd_model, inversion, "npi", 7.5).latent)


class SourceThenNull(Method):
    """A made-up method for the test: NPI's negative for the first step, the null prompt after."""

    name = "source-then-null"
    summary = "test method"

    def negatives(self, inv, guidance) -> list[PromptEmbedding]:
        return [inv.source] + [inv.null] * (inv.steps - 1)


class Halve(Controller):
    """A made-up controller for the test: the source's cross-attention at half strength."""

    name = "halve"
    summary = "test controller"

    def attention_edit(self, tokenizer, source, targets) -> AttentionEdit:
        class Half(AttentionEdit):
            def __call__(self, base, target):
                return 0.5 * base.unsqueeze(0).expand_as(target)

        return Half()


def test_a_new_method_and_controller_are_one_object_each(monkeypatch, capsys, tmp_path, sd_folder):
    import npinv.methods as methods

    monkeypatch.setattr(methods, "METHODS", MappingProxyType({**METHODS, SourceThenNull.name: SourceThenNull()}))
    monkeypatch.setattr(controllers, "CONTROLLERS", MappingProxyType({**CONTROLLERS, Halve.name: Halve()}))
    image = tmp_path / "in.png"
    Scene("circle", "red", "blue", 0.5).render(32).save(image)
    code = main(["--quiet", "edit", str(image), "--source", SOURCE, "--target", TARGET, "--steps", str(STEPS),
                 "--method", "source-then-null", "--controller", "halve", "--guidance", "3", "--model", str(sd_folder),
                 "--out", str(tmp_path / "out.png"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(out)
    # Inversion: one row a step. Edit: step 0 shares the source's negative (1 + 2 rows), then 2 + 2.
    assert row["unet_calls"] == 2 * STEPS and row["unet_rows"] == STEPS + 3 + 4 * (STEPS - 1)
    assert (tmp_path / "out.png").is_file()
    code = main(["--quiet", "edit", str(image), "--source", SOURCE, "--target", TARGET, "--method", "nope",
                 "--model", str(sd_folder), "--out", str(tmp_path / "x.png")])
    assert code == 2 and "method must be one of npi, proxnpi, proxnpi-noig, nti, ddim, flowedit, source-then-null" in \
        capsys.readouterr().err
