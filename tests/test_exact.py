"""Exact inversion: fixed-point steps and decoder inversion (npinv.schemes, npinv.decoder), on tiny
SD 1.x, SD 2.x (v-prediction) and SDXL models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from npinv.cli import main
from npinv.cost import Meter
from npinv.errors import NpinvError
from npinv.guidance import CFG
from npinv.inversion import Inversion, ddim_inversion
from npinv.io import image_to_tensor
from npinv.methods import METHODS, reconstruct
from npinv.sampling import Branch, sample
from npinv.scenes import Scene
from npinv.schemes import SCHEMES, mixing_weights
from npinv.service import Inverted, edit
from npinv.settings import EditSettings

STEPS = 4
SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"


def picture(side: int) -> torch.Tensor:
    return image_to_tensor(Scene("circle", "red", "blue", 0.5).render(side))


@pytest.fixture(scope="module", params=["sd_folder", "sd_v_folder", "sdxl_folder"])
def model(request):
    from npinv import load_model

    return load_model(str(request.getfixturevalue(request.param)), device="cpu")


def round_trip_error(model, inv: Inversion) -> float:
    """max |z0' - z0| of guidance-1 sampling from the inversion's noise with the source prompt."""
    branch = Branch.constant(inv.source, inv.source, inv.steps)
    result = sample(model, inv.noise, inv.schedule_for(model), [branch], CFG(1.0), pair_start=inv.pair_start,
                    pair_gamma=inv.pair_gamma)
    return float((result.latents - inv.trajectory[:1]).abs().max())


def test_bdia_is_exact_at_one_unet_call_a_step_on_any_grid(model):
    """BDIA: the guidance-1 round trip returns z0 to float rounding even on a 4-step grid, where plain
    DDIM misses it by more than z0's own scale, with one UNet call a step (n - 1 when sampling)."""
    x = picture(model.resolution)
    for steps in (4, 10):
        plain = ddim_inversion(model, x, SOURCE, steps=steps)
        meter = Meter(model)
        exact = ddim_inversion(model, x, SOURCE, steps=steps, scheme="bdia")
        assert meter.cost.unet_calls == steps and exact.pair_start is not None
        scale = float(plain.trajectory[0].abs().max())
        plain_err, exact_err = round_trip_error(model, plain), round_trip_error(model, exact)
        assert exact_err < 1e-3 * scale < plain_err, (plain_err, exact_err)
        rec = reconstruct(model, exact, "npi", 7.5)
        assert rec.cost.unet_calls == steps - 1  # the first step is the stored z*[n-1]
        assert float((rec.latent - exact.trajectory[:1]).abs().max()) < 1e-3 * scale


def test_bdia_damping_factor_stays_exact_and_travels_with_the_inversion(model, tmp_path):
    """BDIA with gamma < 1 is still exact (the inversion divides by gamma where sampling multiplies);
    the inversion records gamma, and sampling with another gamma misses z0."""
    x = picture(model.resolution)
    inv = ddim_inversion(model, x, SOURCE, steps=10, scheme="bdia", gamma=0.8)
    scale = float(inv.trajectory[0].abs().max())
    assert inv.pair_gamma == 0.8 and inv.scheme_report()["bdia_gamma"] == 0.8
    exact_err = round_trip_error(model, inv)
    wrong_err = round_trip_error(model, dataclasses.replace(inv, scheme={**inv.scheme, "gamma": 1.0}))
    assert exact_err < 1e-3 * scale and wrong_err > 100 * exact_err, (exact_err, wrong_err)
    back = Inversion.load(inv.save(tmp_path / "inv.safetensors"))
    assert back.pair_gamma == 0.8 and round_trip_error(model, back) == exact_err
    rec = reconstruct(model, back, "npi", 7.5)  # NPI at any w: the source prompt at guidance 1
    assert float((rec.latent - inv.trajectory[:1]).abs().max()) < 1e-3 * scale


def test_a_damaged_bdia_gamma_is_refused(tmp_path, sd_model):
    inv = ddim_inversion(sd_model, picture(32), SOURCE, steps=STEPS, scheme="bdia", gamma=0.9)
    for bad in (0, 1.5, "x", True):
        path = dataclasses.replace(inv, scheme={**inv.scheme, "gamma": bad}).save(tmp_path / "bad.safetensors")
        with pytest.raises(NpinvError, match="BDIA gamma"):
            Inversion.load(path)
    with pytest.raises(NpinvError, match=r"bdia-gamma must be a number in \(0, 1\], got 0"):
        ddim_inversion(sd_model, picture(32), SOURCE, steps=STEPS, scheme="bdia", gamma=0)
    # Rounding grows as gamma^-steps: refused past 1e5, with what would do.
    with pytest.raises(NpinvError, match=r"^bdia-gamma 0.8 with 100 steps: .* 4.9e\+09 .* at least 0.892 or at most 51 steps$"):
        ddim_inversion(sd_model, picture(32), SOURCE, steps=100, scheme="bdia", gamma=0.8)


@pytest.mark.parametrize("scheme", ["fixed-point", "anderson"])
def test_exact_inversion_then_sampling_gives_back_z0(model, scheme):
    """Plain DDIM inversion's guidance-1 round trip misses z0 (by 0.1 to 4 on these random models);
    an exact scheme's lands within 1% of z0's scale, over 100 times closer. 50 steps: the random
    UNets are too rough for the large low-noise steps of coarser grids (see docs/method.md)."""
    steps = 50
    x = picture(model.resolution)
    plain = ddim_inversion(model, x, SOURCE, steps=steps)
    meter = Meter(model)
    exact = ddim_inversion(model, x, SOURCE, steps=steps, scheme=scheme, iters=20, tol=1e-6)
    calls = meter.cost.unet_calls
    scale = float(plain.trajectory[0].abs().max())
    plain_err, exact_err = round_trip_error(model, plain), round_trip_error(model, exact)
    assert exact_err < 1e-2 * scale and exact_err < plain_err / 100, (plain_err, exact_err)
    # Every evaluation counted: one plain call a step plus each iteration's.
    record = exact.scheme
    assert calls == steps + sum(record["iterations"]) and all(1 <= k <= 20 for k in record["iterations"])
    assert record["name"] == scheme and len(record["residuals"]) == steps


def test_anderson_weights_solve_least_squares_and_repeat():
    """Well-conditioned: the least-squares weights. Nearly collinear differences (late iterations): the
    same weights every call (torch.linalg.lstsq's CPU default did not repeat here) and a residual no
    worse than lstsq's."""
    gen = torch.Generator().manual_seed(0)
    d_f, f = torch.randn(2, 512, 3, generator=gen), torch.randn(2, 512, 1, generator=gen)
    torch.testing.assert_close(mixing_weights(d_f, f), torch.linalg.lstsq(d_f, f, driver="gelsd").solution,
                               rtol=1e-4, atol=1e-5)
    base = torch.randn(2, 4096, 1, generator=gen)
    collinear = torch.cat([base, base * 1.0001 + 1e-6 * torch.randn(2, 4096, 1, generator=gen),
                           torch.randn(2, 4096, 1, generator=gen)], -1)
    target = f.repeat(1, 8, 1)
    first = mixing_weights(collinear, target)
    assert all(torch.equal(first, mixing_weights(collinear, target)) for _ in range(20))
    ours = (target - collinear @ first).norm()
    best = (target - collinear @ torch.linalg.lstsq(collinear, target, driver="gelsd").solution).norm()
    assert ours <= best * (1 + 1e-4)


def test_anderson_inversion_repeats_exactly(sd_model):
    # Every iteration runs (tol 0), so the last ones mix nearly collinear differences.
    runs = [ddim_inversion(sd_model, picture(32), SOURCE, steps=STEPS, scheme="anderson", iters=12, tol=0.0)
            for _ in range(3)]
    assert all(torch.equal(r.trajectory, runs[0].trajectory) for r in runs[1:])
    assert all(r.scheme["residuals"] == runs[0].scheme["residuals"] for r in runs[1:])


def test_iteration_cap_is_exact_in_unet_calls(sd_model):
    meter = Meter(sd_model)
    inv = ddim_inversion(sd_model, picture(32), SOURCE, steps=STEPS, scheme="fixed-point", iters=2, tol=0.0)
    assert meter.cost.unet_calls == STEPS * (1 + 2) and inv.scheme["iterations"] == [2] * STEPS


def test_scheme_is_recorded_in_the_inversion_file(tmp_path, sd_model):
    inv = ddim_inversion(sd_model, picture(32), SOURCE, steps=STEPS, scheme="fixed-point", iters=3, tol=1e-4,
                         decoder_steps=2)
    back = Inversion.load(inv.save(tmp_path / "inv.safetensors"))
    assert back.scheme == inv.scheme and back.scheme_report()["invert_scheme"] == "fixed-point"
    assert back.scheme_report()["decoder_steps"] == 2 and torch.equal(back.trajectory, inv.trajectory)


@pytest.mark.parametrize("scheme", ["fixed-point", "bdia"])
@pytest.mark.parametrize("method", [m for m in METHODS if not METHODS[m].flow_only])
def test_an_exact_inversion_edits_with_every_method(sd_model, method, scheme):
    inv = ddim_inversion(sd_model, picture(32), SOURCE, steps=STEPS, scheme=scheme, iters=3)
    if not METHODS[method].samples_bdia and SCHEMES[scheme].pair_start:  # refused (tests/test_scheme_matrix.py)
        with pytest.raises(NpinvError, match=f"method {method} cannot sample a {scheme} inversion"):
            edit(sd_model, [(Inverted(inv, picture(32)), [TARGET])], EditSettings(method=method, guidance=3.0))
        return
    done = edit(sd_model, [(Inverted(inv, picture(32)), [TARGET])], EditSettings(method=method, guidance=3.0))[0]
    assert done.images.shape == (1, 3, 32, 32) and torch.isfinite(done.images).all()


def test_decoder_inversion_beats_the_vae_round_trip(sd_model):
    from npinv.decoder import invert_decoder

    x = picture(32)
    z0 = sd_model.encode_image(x)
    fit = invert_decoder(sd_model, x, z0, 30)
    before = float(((sd_model.decode(z0) - x) ** 2).mean())
    after = float(((sd_model.decode(fit.latent) - x) ** 2).mean())
    assert fit.losses[-1] < fit.losses[0] and after < 0.9 * before


def test_cli_reports_the_scheme_and_refuses_bad_values(capsys, tmp_path, sd_folder, image_file):
    argv = ["--quiet", "reconstruct", str(image_file), "--prompt", SOURCE, "--steps", str(STEPS), "--model",
            str(sd_folder), "--json"]
    assert main([*argv, "--invert-scheme", "fixed-point", "--invert-iters", "2", "--invert-tol", "0",
                 "--decoder-steps", "3", "--out", str(tmp_path / "a.png")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["invert_scheme"], row["invert_iters"], row["decoder_steps"]) == ("fixed-point", 2, 3)
    assert row["unet_calls"] == 3 * STEPS + STEPS and row["invert_extra_calls"] == 2 * STEPS
    for flag, value, message in (("--invert-scheme", "newton", "invert-scheme must be one of ddim, fixed-point"),
                                 ("--invert-iters", "0", "invert-iters must be a whole number in 1..100, got 0"),
                                 ("--invert-tol", "-1", "invert-tol must be a number in 0..1, got -1.0"),
                                 ("--decoder-steps", "-2", "decoder-steps must be a whole number in 0..10000")):
        assert main([*argv, flag, value, "--out", str(tmp_path / "b.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "b.png").exists()


def test_cli_takes_bdias_damping_factor(capsys, tmp_path, sd_folder, image_file):
    argv = ["--quiet", "reconstruct", str(image_file), "--prompt", SOURCE, "--steps", str(STEPS), "--model",
            str(sd_folder), "--json", "--invert-scheme", "bdia"]
    saved = tmp_path / "inv.safetensors"
    assert main([*argv, "--bdia-gamma", "0.9", "--save-inversion", str(saved), "--out", str(tmp_path / "a.png")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["invert_scheme"], row["bdia_gamma"]) == ("bdia", 0.9) and Inversion.load(saved).pair_gamma == 0.9
    # BDIA does not iterate: no iteration cap is reported or recorded, whatever --invert-iters says.
    assert (row["invert_iters"], row["invert_extra_calls"]) == (0, 0) and Inversion.load(saved).scheme["iters"] == 0
    for value in ("0", "1.1", "x"):
        assert main([*argv, "--bdia-gamma", value, "--out", str(tmp_path / "b.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "bdia-gamma must be a number in (0, 1]" in err, err
    assert main([*argv, "--bdia-gamma", "0.8", "--steps", "100", "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bdia-gamma 0.8 with 100 steps" in err, err
    assert not (tmp_path / "b.png").exists()
