"""Methods and inversion schemes on flow models (issue 28 item 3), on the tiny SD3 / SD3.5 / FLUX.1-dev layouts.

The plain flow inversion is textbook Euler; fixed point and Anderson solve the Euler sampler step's exact
inverse; BDIA carries over; RF-Solver's midpoint and FireFlow invert and sample with their own step (call
counts per step); the NTI analogue optimises the pooled embedding too; FlowEdit edits without inverting
(its call count and identity); UNet models refuse what is for flows only, in one line; SD3.5 skip-layer
guidance would break NPI's identity."""

from __future__ import annotations

import pytest
import torch

from npinv.errors import NpinvError
from npinv.flow_model import FlowModel
from npinv.flowedit import FlowEditSettings, flowedit, model_calls
from npinv.guidance import CFG
from npinv.inversion import NullTextOptimisation, ddim_inversion
from npinv.methods import METHODS, check_scheme, reconstruct
from npinv.metrics import psnr
from npinv.sampling import Branch, sample
from npinv.schemes import SCHEMES

SIZE = 16
SOURCE, TARGET = "a red circle on blue background", "a green square on blue background"


def _model(folder, **kwargs) -> FlowModel:
    from tiny_flow import flow_model

    return flow_model(folder, **kwargs)


def _image() -> torch.Tensor:
    from tiny_flow import circle_image

    return circle_image(SIZE)


def _pixels(x: torch.Tensor):
    return ((x[0].permute(1, 2, 0).clamp(-1, 1) + 1) / 2).numpy()


@pytest.fixture(scope="module")
def sd3(sd3_folder):
    return _model(sd3_folder)


@pytest.fixture(scope="module")
def flux(flux_dev_folder):
    return _model(flux_dev_folder, max_sequence_length=32)


class Recorder:
    """Wraps a model and records the timestep of each network call."""

    def __init__(self, model) -> None:
        self.model, self.timesteps = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def unet_output(self, z, t, cond):
        self.timesteps.append(t)
        return self.model.unet_output(z, t, cond)


# -- Euler inversion and the exact schemes ----------------------------------------------------------
def test_plain_flow_inversion_is_textbook_euler(sd3):
    """The `ddim` scheme on a flow grid: z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v(z_i, sigma_i)."""
    z0 = sd3.encode_image(_image())
    src = sd3.encode_prompt(SOURCE)
    s = sd3.schedule(5)
    rec = Recorder(sd3)
    trace = SCHEMES["ddim"].invert(rec, z0, s, src)
    assert rec.timesteps == [s.invert_timestep(i) for i in range(5)] and rec.timesteps[0] == 0.0
    z = z0
    for i in range(5):
        z = z + (s.sigma(i + 1) - s.sigma(i)) * sd3.unet_output(z, s.sigma(i).item() * 1000, src)
        assert torch.allclose(trace.trajectory[i + 1], z, atol=1e-6)


@pytest.mark.parametrize("scheme", ["fixed-point", "anderson"])
def test_exact_schemes_reconstruct_to_the_vae_round_trip_at_10_steps(sd3, scheme):
    x = _image()
    inv = ddim_inversion(sd3, x, SOURCE, steps=10, scheme=scheme, iters=50, tol=1e-6)
    assert all(r is not None and r <= 1e-6 for r in inv.scheme["residuals"])  # the Euler step's exact inverse
    rec = reconstruct(sd3, inv, "npi", 7.5)
    vae = psnr(_pixels(sd3.decode(inv.trajectory[:1])), _pixels(x))
    assert abs(psnr(_pixels(rec.image), _pixels(x)) - vae) <= 0.1
    euler = reconstruct(sd3, ddim_inversion(sd3, x, SOURCE, steps=10), "npi", 7.5)
    assert (rec.latent - inv.trajectory[0]).abs().max() < 1e-2 * (euler.latent - inv.trajectory[0]).abs().max()


def test_bdia_carries_to_euler_and_keeps_npis_identity(sd3):
    inv = ddim_inversion(sd3, _image(), SOURCE, steps=6, scheme="bdia")
    npi, w1 = reconstruct(sd3, inv, "npi", 7.5), reconstruct(sd3, inv, "npi", 1.0)
    assert torch.equal(npi.latent, w1.latent)  # the identity, on BDIA's coupled step too
    assert (npi.latent - inv.trajectory[0]).abs().max() < 1e-5  # and exact
    assert npi.cost.unet_calls == 6 - 1  # the first step is the inversion's pair


# -- midpoint (RF-Solver) and FireFlow --------------------------------------------------------------
@pytest.mark.parametrize("name,calls", [("ddim", lambda n: n), ("midpoint", lambda n: 2 * n),
                                        ("fireflow", lambda n: n + 1), ("bdia", lambda n: n)])
def test_each_schemes_calls_per_step(sd3, name, calls):
    x = _image()
    for n in (4, 8):
        before = sd3.counter.calls
        inv = ddim_inversion(sd3, x, SOURCE, steps=n, scheme=name)
        assert sd3.counter.calls - before == calls(n)
        rec = reconstruct(sd3, inv, "npi", 7.5)  # sampled with the scheme's own step rule
        assert rec.cost.unet_calls == (n - 1 if name == "bdia" else calls(n))


def test_fixed_point_calls_are_one_plus_its_iterations(sd3):
    before = sd3.counter.calls
    inv = ddim_inversion(sd3, _image(), SOURCE, steps=4, scheme="fixed-point", iters=3, tol=0.0)
    assert sd3.counter.calls - before == 4 * (1 + 3) and inv.scheme["iterations"] == [3] * 4


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_second_order_round_trips_beat_euler_and_keep_npis_identity(sd3, flux, which):
    model = sd3 if which == "sd3" else flux
    x = _image()
    errors = {}
    for name in ("ddim", "midpoint", "fireflow"):
        inv = ddim_inversion(model, x, SOURCE, steps=6, scheme=name)
        npi = reconstruct(model, inv, "npi", 7.5)
        assert torch.equal(npi.latent, reconstruct(model, inv, "ddim", 1.0).latent), name  # NPI's identity
        errors[name] = float((npi.latent - inv.trajectory[0]).abs().max())
    assert errors["midpoint"] < errors["ddim"] / 5 and errors["fireflow"] < errors["ddim"] / 5, errors


def test_the_loops_midpoint_step_is_rf_solvers(sd3):
    """The loop's second-order sampling (w 1, one branch) is flow_schedule.midpoint_trajectory bit for bit,
    and FireFlow's reuse likewise: the one loop, not a copy, takes the step."""
    from npinv.flow_schedule import midpoint_trajectory

    src = sd3.encode_prompt(SOURCE)
    z = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    s = sd3.schedule(5)
    for solver, reuse in (("midpoint", False), ("fireflow", True)):
        loop = sample(sd3, z, s.with_solver(solver), [Branch.constant(src, src, 5)], CFG(1.0)).latents
        ref, _ = midpoint_trajectory(lambda y, t: sd3.unet_output(y, t, src), z, s.sigmas, reuse=reuse)
        assert torch.equal(loop, ref[-1]), solver


def test_second_order_edit_batch_is_1_plus_2t_rows_per_call(sd3):
    src, tgt = sd3.encode_prompt(SOURCE), sd3.encode_prompt(TARGET)
    z = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    s = sd3.schedule(4).with_solver("fireflow")
    edit = sample(sd3, z, s, [Branch.constant(src, src, 4), Branch.constant(tgt, src, 4)], CFG(7.5))
    assert edit.cost.unet_calls == 4 + 1 and edit.cost.unet_rows == 3 * (4 + 1)


# -- methods ---------------------------------------------------------------------------------------
def test_nti_analogue_optimises_pooled_and_reconstructs_at_least_as_well_as_ddim(sd3):
    x = _image()
    inv = ddim_inversion(sd3, x, SOURCE, steps=6)
    nti, ddim = reconstruct(sd3, inv, "nti", 3.0), reconstruct(sd3, inv, "ddim", 3.0)
    target = inv.trajectory[0]
    assert float(((nti.latent - target) ** 2).mean()) <= float(((ddim.latent - target) ** 2).mean())
    negatives = nti.inversion.negatives
    assert any(not torch.equal(e.pooled, inv.null.pooled) for e in negatives)  # the pooled embedding moved too
    assert NullTextOptimisation(sd3, inv, CFG(3.0)).optimise_pooled


def test_nti_keeps_the_unet_recipe(sd_model):
    """UNet models (SDXL's pooled embedding included) optimise only the hidden states, as published."""
    inv = ddim_inversion(sd_model, torch.zeros(1, 3, 32, 32), "a red circle", steps=2)
    assert not NullTextOptimisation(sd_model, inv, CFG(3.0)).optimise_pooled


def test_proxnpi_carries_to_flows(sd3):
    inv = ddim_inversion(sd3, _image(), SOURCE, steps=4, scheme="fixed-point", iters=20, tol=1e-6)
    npi = reconstruct(sd3, inv, "npi", 7.5)
    for name in ("proxnpi", "proxnpi-noig"):  # d = v_cond - v_neg is 0 when the negative is the condition
        assert torch.equal(reconstruct(sd3, inv, name, 7.5).latent, npi.latent)


def test_nti_cannot_sample_a_second_order_inversion():
    for scheme in ("midpoint", "fireflow"):
        with pytest.raises(NpinvError, match=f"^method nti cannot sample a {scheme} inversion: .*--invert-scheme "
                                             "ddim, fixed-point, anderson or bdia$"):
            check_scheme("nti", scheme)
        check_scheme("npi", scheme)


# -- FlowEdit ----------------------------------------------------------------------------------------
def test_flowedit_source_as_target_returns_the_input_exactly(sd3, flux):
    for model in (sd3, flux):
        z0 = model.encode_image(_image())
        src = model.encode_prompt(SOURCE)
        schedule = model.schedule(8, latent_size=z0.shape[-2:])
        same = FlowEditSettings(source_guidance=3.5, target_guidance=3.5)
        assert torch.equal(flowedit(model, z0, src, [src], schedule, same).latents, z0)
        edited = flowedit(model, z0, src, [model.encode_prompt(TARGET)], schedule).latents
        assert (edited - z0).abs().max() > 1e-2


def test_flowedit_calls_and_defaults(sd3, flux):
    z0 = sd3.encode_image(_image())
    src, tgt = sd3.encode_prompt(SOURCE), sd3.encode_prompt(TARGET)
    # The paper's SD3 defaults at its 50 steps: n_max 33, n_min 0, n_avg 1, guidance 3.5 / 13.5.
    assert FlowEditSettings().resolved("sd3", 50) == FlowEditSettings(33, 0, 1, 3.5, 13.5)
    assert FlowEditSettings().resolved("flux", 28) == FlowEditSettings(24, 0, 1, 1.5, 5.5)
    assert model_calls(FlowEditSettings(), "sd3", 50) == 33
    for settings in (FlowEditSettings(), FlowEditSettings(n_max=6, n_min=2, n_avg=2)):
        done = flowedit(sd3, z0, src, [tgt, tgt], sd3.schedule(10), settings)
        assert done.cost.unet_calls == model_calls(settings, "sd3", 10)
        window = done.settings.n_avg * (done.settings.n_max - done.settings.n_min)
        # Each window call: the source's 2 rows and each target's 2; a plain step: each target's 2.
        assert done.cost.unet_rows == window * (2 + 2 * 2) + done.settings.n_min * 2 * 2
    z0 = flux.encode_image(_image())
    done = flowedit(flux, z0, flux.encode_prompt(SOURCE), [flux.encode_prompt(TARGET)],
                    flux.schedule(7, latent_size=z0.shape[-2:]))
    assert done.cost.unet_calls == 2 * 6 == model_calls(FlowEditSettings(), "flux", 7)  # embedded guidances
    assert flux.embedded_guidance == 3.5  # the model's own value again after the edit
    with pytest.raises(NpinvError, match="n_min < n_max"):
        FlowEditSettings(n_max=3, n_min=3).resolved("sd3", 10)


def test_flowedit_through_edit_batch(sd3):
    from npinv.editing import EditJob, edit_batch
    from npinv.settings import EditSettings

    inv = ddim_inversion(sd3, _image(), SOURCE, steps=6)
    out = edit_batch(sd3, [EditJob(inv, [TARGET])], EditSettings(method="flowedit", guidance=7.0))[0]
    assert out.images.shape == (1, 3, SIZE, SIZE) and out.latents.shape[0] == 2
    assert torch.equal(out.latents[:1], inv.trajectory[:1]) and out.cost.unet_calls == 4  # round(6 * 33 / 50)


def test_flowedit_edits_from_an_encoding_alone_and_an_encoding_is_never_sampled(sd3, tmp_path):
    """FlowEdit's front ends encode the image only (no model call before the edit); the same edit as from a
    full inversion; an encoded-only "inversion" is refused by every method that samples, and as a file."""
    from npinv.editing import EditJob, edit_batch
    from npinv.inversion import ddim_inversion_batch
    from npinv.settings import EditSettings

    calls = sd3.counter.calls
    encoded = ddim_inversion_batch(sd3, _image(), [SOURCE], steps=6, encode_only=True)[0]
    assert sd3.counter.calls == calls and encoded.encoded_only and encoded.trajectory.shape[0] == 1
    full = ddim_inversion(sd3, _image(), SOURCE, steps=6)
    assert torch.equal(encoded.trajectory[0], full.trajectory[0])
    settings = EditSettings(method="flowedit", guidance=7.0)
    a = edit_batch(sd3, [EditJob(encoded, [TARGET])], settings)[0]
    b = edit_batch(sd3, [EditJob(full, [TARGET])], settings)[0]
    assert torch.equal(a.latents, b.latents)
    message = "^method npi samples from an inversion, but this one holds only the clean latent"
    with pytest.raises(NpinvError, match=message):
        edit_batch(sd3, [EditJob(encoded, [TARGET])], EditSettings(method="npi", guidance=2.0))
    with pytest.raises(NpinvError, match=message):
        reconstruct(sd3, encoded, "npi")
    with pytest.raises(NpinvError, match="not a file npinv can reuse"):
        encoded.save(tmp_path / "enc.safetensors")
    assert not (tmp_path / "enc.safetensors").exists()


def test_flowedit_on_the_command_line_costs_its_edit_alone(capsys, tmp_path, sd3_folder):
    import json

    from npinv.cli import main
    from npinv.io import save_image, tensor_to_image

    image = save_image(tensor_to_image(_image()), tmp_path / "in.png")
    common = ["--quiet", "edit", str(image), "--source", SOURCE, "--target", TARGET, "--method", "flowedit",
              "--model", str(sd3_folder), "--steps", "6", "--controller", "none", "--json"]
    assert main([*common, "--out", str(tmp_path / "a.png")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["unet_calls"] == 4  # FlowEdit's window (round(6 * 33 / 50)); nothing spent inverting
    assert main([*common, "--out", str(tmp_path / "b.png"), "--save-inversion", str(tmp_path / "inv.safetensors")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["unet_calls"] == 6 + 4 and (tmp_path / "inv.safetensors").is_file()  # the file asked for an inversion


# -- refusals, one line each -------------------------------------------------------------------------
def test_unet_models_refuse_what_is_for_flows(sd_model):
    from npinv.editing import EditJob, edit_batch
    from npinv.settings import EditSettings, ReconstructSettings

    x = torch.zeros(1, 3, 32, 32)
    for scheme in ("midpoint", "fireflow"):
        with pytest.raises(NpinvError, match=f"^--invert-scheme {scheme} is for flow-matching models .*: use ddim, "
                                             "fixed-point, anderson, bdia$"):
            ddim_inversion(sd_model, x, "a red circle", steps=2, scheme=scheme)
    inv = ddim_inversion(sd_model, x, "a red circle", steps=2)
    with pytest.raises(NpinvError, match="^method flowedit is for flow-matching models .* is a UNet model$"):
        edit_batch(sd_model, [EditJob(inv, ["a red square"])], EditSettings(method="flowedit"))
    with pytest.raises(NpinvError, match="^method flowedit edits without inverting: it has no reconstruction; use npinv edit$"):
        ReconstructSettings("flowedit").validate()
    with pytest.raises(NpinvError, match="no reconstruction"):
        reconstruct(sd_model, inv, "flowedit")
    assert "flowedit" in METHODS and {"midpoint", "fireflow"} <= set(SCHEMES)


# -- SD3.5 skip-layer guidance -------------------------------------------------------------------------
def test_skip_layer_guidance_would_break_npis_identity(sd35_folder):
    """NPI's identity holds on SD3.5 without skip-layer guidance (FlowModel never passes it). With the
    pipeline's SLG term added at sampling only (``(v_text - v_skip) * scale`` on a window of steps), the
    source branch leaves the guidance-1 round trip: the term is not 0 when the prompt is the negative."""
    model = _model(sd35_folder)
    src = model.encode_prompt(SOURCE)
    z0 = model.encode_image(_image())
    s = model.schedule(6)
    z_t = SCHEMES["fixed-point"].invert(model, z0, s, src, iters=30, tol=1e-6).trajectory[-1]
    branch = [Branch.constant(src, src, 6)]
    round_trip = sample(model, z_t, s, branch, CFG(1.0)).latents
    assert torch.equal(sample(model, z_t, s, branch, CFG(7.5)).latents, round_trip)

    z = z_t
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            v = model.unet_output(z, t, src)  # NPI at any w: the source's velocity
            if 0.01 * 6 < i < 0.2 * 6 + 1:  # the pipeline's default window (skip_layer_guidance_start/stop)
                skip = model.transformer(hidden_states=z, timestep=torch.full((1,), t), encoder_hidden_states=src.hidden,
                                         pooled_projections=src.pooled, skip_layers=[0], return_dict=False)[0]
                v = v + 2.8 * (v - skip)  # the pipeline's default skip_guidance_scale
            z = s.denoise_step(z, v, i)
    assert (z - round_trip).abs().max() > 1e-3


# -- through the CLI ---------------------------------------------------------------------------------
def test_the_cli_takes_the_flow_schemes_and_flowedit(capsys, tmp_path, sd3_folder):
    import json

    from npinv.cli import main
    from npinv.scenes import Scene

    image = tmp_path / "in.png"
    Scene("circle", "red", "blue", 0.5).render(32).save(image)
    model = ["--model", str(sd3_folder), "--steps", "4", "--json"]
    for scheme, calls in (("midpoint", 2 * 4), ("fireflow", 4 + 1)):
        assert main(["--quiet", "reconstruct", str(image), "--prompt", SOURCE, "--invert-scheme", scheme,
                     "--out", str(tmp_path / f"{scheme}.png"), *model]) == 0
        row = json.loads(capsys.readouterr().out)
        assert row["invert_scheme"] == scheme and row["unet_calls"] == 2 * calls  # inversion, then its sampler
    assert main(["--quiet", "edit", str(image), "--source", SOURCE, "--target", TARGET, "--method", "flowedit",
                 "--out", str(tmp_path / "edit.png"), *model]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["method"] == "flowedit" and row["unet_calls"] == 3  # round(4 * 33 / 50) window steps; no inversion
    assert (tmp_path / "edit.png").is_file()
    for argv, needle in ((["reconstruct", str(image), "--prompt", SOURCE, "--method", "nti", "--invert-scheme",
                           "fireflow"], "method nti cannot sample a fireflow inversion"),
                         (["reconstruct", str(image), "--prompt", SOURCE, "--method", "flowedit"],
                          "method flowedit edits without inverting")):
        assert main(["--quiet", *argv, "--out", str(tmp_path / "no.png"), *model]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "no.png").exists()


def test_a_saved_second_order_inversion_samples_with_its_step(sd3, flux, tmp_path):
    from npinv.inversion import Inversion

    for model in (sd3, flux):
        inv = ddim_inversion(model, _image(), SOURCE, steps=4, scheme="fireflow")
        back = Inversion.load(inv.save(tmp_path / "inv.safetensors"))
        assert back.schedule_for(model).solver == "fireflow"  # the grid as recorded (FLUX's mu), FireFlow's step
        assert torch.equal(reconstruct(model, back, "npi", 7.5).latent, reconstruct(model, inv, "npi", 7.5).latent)


def test_nti_analogue_on_flux_dev(flux):
    inv = ddim_inversion(flux, _image(), SOURCE, steps=4)
    nti, ddim = reconstruct(flux, inv, "nti", 3.0), reconstruct(flux, inv, "ddim", 3.0)
    target = inv.trajectory[0]
    assert float(((nti.latent - target) ** 2).mean()) <= float(((ddim.latent - target) ** 2).mean())


def test_flowedits_knobs_are_settings(capsys, tmp_path, sd3):
    """--flowedit-n-max/-n-min/-n-avg/-source-guidance reach FlowEdit; with another method they are refused."""
    from npinv.cli import main
    from npinv.editing import EditJob, edit_batch
    from npinv.settings import EditSettings

    inv = ddim_inversion(sd3, _image(), SOURCE, steps=6)
    settings = EditSettings(method="flowedit", guidance=7.0, flowedit_n_max=5, flowedit_n_min=1, flowedit_n_avg=2,
                            flowedit_source_guidance=2.0)
    out = edit_batch(sd3, [EditJob(inv, [TARGET])], settings)[0]
    assert out.cost.unet_calls == 2 * (5 - 1) + 1
    for bad, needle in ((EditSettings(flowedit_n_avg=2), "flowedit-n-avg applies to --method flowedit only, not npi"),
                        (EditSettings(method="flowedit", flowedit_n_max=3, flowedit_n_min=3),
                         "flowedit-n-min must be below flowedit-n-max (3), got 3")):
        with pytest.raises(NpinvError, match=f"^{needle}$".replace("(", r"\(").replace(")", r"\)")):
            bad.validate()
    image = tmp_path / "in.png"
    image.write_bytes(b"")  # refused before the image is read
    assert main(["--quiet", "edit", str(image), "--source", SOURCE, "--target", TARGET, "--flowedit-n-min", "2",
                 "--out", str(tmp_path / "e.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flowedit-n-min applies to --method flowedit only" in err, err
