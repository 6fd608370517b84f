"""make bench's flow section (npinv.bench.flow) on tiny SD3: every row runs, costs count each method's
inversion (FlowEdit's none), and the tables carry every row and the family column."""

from __future__ import annotations

import pytest

from npinv.bench import flow
from npinv.bench.paired import EDIT_CASE, compare_paired


@pytest.fixture(scope="module")
def sd3_model(sd3_folder):
    from npinv import load_model

    return load_model(sd3_folder, device="cpu")


def test_flow_reconstruction_frontier_and_family_table(sd3_model, tmp_path):
    rec = flow.run_flow_reconstruct(sd3_model, tmp_path / "rec", shapes=1, steps_list=[2, 3])
    by = {(r["method"], r["steps"]): r for r in rec["rows"]}
    assert {m for m, _ in by} == set(flow.FLOW_RECON_METHODS)
    assert by[("npi", 3)]["unet_calls_mean"] == 6 and by[("npi@midpoint", 3)]["unet_calls_mean"] == 12
    assert by[("npi@fireflow", 3)]["unet_calls_mean"] == 8  # n + 1 calls inverting, n + 1 sampling
    assert by[("npi", 3)]["psnr_mean"] == by[("ddim1", 3)]["psnr_mean"]  # NPI's identity
    table = flow.flow_recon_table(rec)
    assert table.count("\n") == 2 + 1 + len(flow.FLOW_RECON_METHODS) and "VAE round trip" in table
    assert "npi@midpoint" in flow.same_calls_table(rec, budgets=(6, 12))
    assert flow.plot_calls(rec, tmp_path).is_file()
    family = flow.family_table(rec, rec, (3,))
    assert family.count("flow (npinv-shapes-flow-64)") == 1 + len(flow.FAMILY_METHODS)


def test_flow_edits_count_each_methods_inversion_and_pair_every_run(sd3_model, tmp_path):
    edits = flow.run_flow_edits(sd3_model, tmp_path, n_scenes=1, steps=3, flowedit_guidances=(2.0,))
    labels = [(r["label"], r["inversion"]) for r in edits["rows"]]
    assert labels == [("npi + word swap + blend", "euler"), ("npi + word swap", "euler"),
                      ("npi + word swap + blend", "fixed-point"), ("npi + word swap + blend", "midpoint"),
                      ("npi + word swap + blend", "fireflow"), ("flowedit", "none")]
    rows = {lab: r for lab, r in zip(labels, edits["rows"], strict=True)}
    npi = rows[("npi + word swap + blend", "euler")]
    assert npi["invert_calls"] == 3 and npi["calls"] == 3 + 3 and npi["rows"] == 3 + 3 * 3
    assert rows[("flowedit", "none")]["invert_calls"] == 0  # its edit needs no inversion
    assert len(edits["paired"]) == len(labels) - 1 and all(p["n"] == 3 for p in edits["paired"])
    assert "flowedit w 2" in flow.flow_paired_table(edits) and "fireflow" in flow.flow_edit_table(edits)


def test_paired_on_the_edit_alone_matches_two_methods(tmp_path):
    base = [{"scene": 0, "kind": "color", "target": "t", "steps": 3, "method": "npi", "controller": "replace",
             "guidance": 2.0, "success": True, "psnr_bg": 30.0}]
    other = [dict(base[0], method="flowedit", controller="none", guidance=7.5, success=False, psnr_bg=32.0)]
    with pytest.raises(ValueError, match="share no edit case"):  # the default case key includes the method
        compare_paired(base, other)
    c = compare_paired(base, other, fields=EDIT_CASE, names=("npi", "flowedit"))
    assert (c.base, c.other, c.n, c.base_only, c.bg_diff) == ("npi", "flowedit", 1, 1, 2.0)
