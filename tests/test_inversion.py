"""Exact identities of the methods on tiny random models of every family."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from npinv import Inversion, ddim_inversion, load_model, reconstruct
from npinv.service import invert_one, prepare_file, reconstruct_inverted
from npinv.settings import InvertSettings, ReconstructSettings

STEPS = 6


@pytest.fixture(scope="module", params=["sd_folder", "sd_v_folder", "sdxl_folder"])
def family_model(request):
    return load_model(str(request.getfixturevalue(request.param)), device="cpu")


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    from npinv.io import image_to_tensor
    from npinv.scenes import Scene

    return image_to_tensor(Scene("square", "yellow", "black", 0.5, 0.45, 0.55).render(32))


def test_npi_equals_guidance_one_ddim_round_trip(family_model, picture):
    inv = ddim_inversion(family_model, picture, "a photo of a cat", steps=STEPS)
    npi = reconstruct(family_model, inv, "npi", 7.5)
    ddim1 = reconstruct(family_model, inv, "ddim", 1.0)
    assert torch.equal(npi.latent, ddim1.latent)
    assert torch.equal(npi.image, ddim1.image)
    assert npi.unet_calls == STEPS and npi.unet_rows == STEPS  # one call, one row per step
    ddim = reconstruct(family_model, inv, "ddim", 7.5)
    assert ddim.unet_calls == STEPS and ddim.unet_rows == 2 * STEPS
    assert not torch.equal(ddim.latent, npi.latent)


def test_inversion_trajectory_shape_and_first_step(sd_model, picture):
    inv = ddim_inversion(sd_model, picture, "a red circle", steps=STEPS, offset=0)
    assert inv.trajectory.shape == (STEPS + 1, 4, 16, 16)
    assert inv.trajectory.dtype == torch.float32
    # At offset 0 the first inversion step goes from alpha(0) to alpha(0): a no-op.
    torch.testing.assert_close(inv.trajectory[1], inv.trajectory[0], atol=1e-5, rtol=0)
    assert inv.schedule["offset"] == 0


def test_nti_loss_falls_and_beats_ddim(sd_model, picture):
    inv = ddim_inversion(sd_model, picture, "a photo of a dog", steps=STEPS)
    nti = reconstruct(sd_model, inv, "nti", 7.5)
    ddim = reconstruct(sd_model, inv, "ddim", 7.5)
    target = inv.trajectory[0:1]
    err = lambda r: float((r.latent - target).pow(2).mean())  # noqa: E731
    assert err(nti) < err(ddim)
    losses = nti.inversion.nti["losses"]
    assert len(losses) == STEPS
    assert all(steps[-1] <= steps[0] for steps in losses)
    assert any(steps[-1] < 0.9 * steps[0] for steps in losses)
    assert nti.inversion.negatives is not None and len(nti.inversion.negatives) == STEPS
    # cond once per step (reused by the loop), inner iterations, then the optimised negative row.
    inner = sum(len(s) for s in losses)
    assert nti.unet_calls == STEPS + inner + STEPS


def test_inversion_saves_and_loads(tmp_path, sd_model, picture):
    inv = ddim_inversion(sd_model, picture, "a photo of a cat", steps=STEPS)
    nti = reconstruct(sd_model, inv, "nti", 7.5, nti_inner_steps=2)
    path = nti.inversion.save(tmp_path / "cat.safetensors")
    back = Inversion.load(path)
    assert torch.equal(back.trajectory, nti.inversion.trajectory)
    assert torch.equal(back.source.hidden, inv.source.hidden)
    assert back.source_prompt == "a photo of a cat" and back.steps == STEPS
    assert back.model["fingerprint"] == sd_model.fingerprint
    assert len(back.negatives) == STEPS
    # A loaded NTI inversion reconstructs with its stored negatives, no optimisation, same result
    # (up to batch-size rounding: the walk ran its rows one at a time, the replay two at once).
    again = reconstruct(sd_model, back, "nti", 7.5)
    assert again.unet_calls == STEPS and again.unet_rows == 2 * STEPS
    torch.testing.assert_close(again.latent, nti.latent, atol=1e-3, rtol=0)


def test_inversion_records_the_prepared_image(tmp_path, sd_model, picture, image_file):
    """The digest of the pixels an inversion was made from: kept through save and load, the same for
    the same picture read twice or saved again in other bytes, another for another picture."""
    from npinv.errors import NpinvError
    from npinv.inversion import image_digest

    settings = InvertSettings(steps=2)
    source = prepare_file(image_file, sd_model, settings)
    inv = invert_one(sd_model, source, "a red circle", settings).inversion
    assert inv.image_digest == image_digest(source.image) == image_digest(source.image[0])
    back = Inversion.load(inv.save(tmp_path / "inv.safetensors"))
    assert back.image_digest == inv.image_digest
    again = tmp_path / "again.png"
    Image.open(image_file).save(again, compress_level=0)  # other bytes, the same pixels
    assert again.read_bytes() != image_file.read_bytes()
    for path in (image_file, again):
        back.check_image(prepare_file(path, sd_model, settings).image, path.name)
    with pytest.raises(NpinvError, match="^picture is not the image this inversion was made from"):
        back.check_image(picture, "picture")
    # A file written before the digest was recorded has nothing to compare: taken as it is.
    old = Inversion.load(dataclasses.replace(back, image_digest=None).save(tmp_path / "old.safetensors"))
    assert old.image_digest is None
    old.check_image(picture, "picture")


def test_inversion_refuses_another_model_or_settings(sd_model, sd_v_folder, picture):
    from npinv.errors import NpinvError

    inv = ddim_inversion(sd_model, picture, "a cat", steps=STEPS)
    other = load_model(str(sd_v_folder), device="cpu")
    with pytest.raises(NpinvError, match="made with model"):
        inv.check_compatible(other)
    with pytest.raises(NpinvError, match="steps"):
        inv.check_compatible(sd_model, steps=STEPS + 1)
    with pytest.raises(NpinvError, match="image"):
        inv.check_compatible(sd_model, size=(64, 64))
    inv.check_compatible(sd_model, steps=STEPS, size=(32, 32))


def test_report_counts_inversion_and_sampling(sd_model, image_file):
    settings = InvertSettings(steps=STEPS)
    inverted = invert_one(sd_model, prepare_file(image_file, sd_model, settings), "a red circle", settings)
    report = reconstruct_inverted(sd_model, inverted, ReconstructSettings("npi", 7.5))
    assert report.cost.unet_calls == 2 * STEPS and report.invert_cost.unet_calls == STEPS
    assert report.cost.unet_rows == 2 * STEPS
    assert report.psnr > 0 and 0 < report.ssim <= 1 and report.cost.seconds > report.invert_cost.seconds > 0


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_unet_with_fp32_schedule(sd_folder, picture, dtype):
    model = load_model(str(sd_folder), device="cpu", dtype=dtype)
    assert model.unet.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    inv = ddim_inversion(model, picture, "a cat", steps=3)
    assert inv.trajectory.dtype == torch.float32
    rec = reconstruct(model, inv, "npi", 7.5)
    assert torch.isfinite(rec.image).all()


def test_non_finite_unet_output_is_reported(sd_folder, picture):
    from npinv.errors import NpinvError

    model = load_model(str(sd_folder), device="cpu", dtype="fp16")
    with torch.no_grad():
        model.unet.conv_out.weight.mul_(1e8)  # overflows fp16, as large activations do in real models
    with pytest.raises(NpinvError, match="non-finite"):
        ddim_inversion(model, picture, "a cat", steps=3)


def test_fingerprint_follows_the_weights_not_the_folder(sd_folder, tmp_path, picture):
    """The same weights in another place (a copied model folder, another checkout) are the same model: an
    inversion saved with one loads with the other."""
    import shutil

    copy = shutil.copytree(sd_folder, tmp_path / "elsewhere" / "model")
    model, moved = load_model(str(sd_folder), device="cpu"), load_model(str(copy), device="cpu")
    assert moved.fingerprint == model.fingerprint
    inv = ddim_inversion(model, picture, "a cat", steps=3)
    back = Inversion.load(inv.save(tmp_path / "cat.safetensors"))
    back.check_compatible(moved)  # a file saved with one loads with the other
    torch.testing.assert_close(reconstruct(moved, back, "npi", 7.5).latent, reconstruct(model, inv, "npi", 7.5).latent)


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder", "text_encoder_2"])
def test_fingerprint_tells_apart_models_that_differ_in_any_network(sdxl_folder, part):
    """An inversion is refused on another model: a changed VAE or text encoder changes the latents too."""
    model = load_model(str(sdxl_folder), device="cpu")
    before = model.fingerprint
    with torch.no_grad():
        list(getattr(model.pipe, part).parameters())[-1].add_(0.5)
    assert model.fingerprint != before
