"""FlowModel: SD3 / SD3.5 / FLUX.1 pipelines under the one sampling loop and the inversion schemes.

NPI's identity tensor for tensor on each flow layout (sampling at guidance 7.5 with the source as the
negative is the guidance-1 round trip), exact inversion by the fixed-point scheme, and the adapter's
calls agreeing with diffusers' own pipelines (packing, t / 1000, the guidance embedding, pooled
projections)."""

from __future__ import annotations

import json

import pytest
import torch

from npinv.errors import NpinvError
from npinv.flow_model import FlowModel, flow_family, image_ids, pack, unpack
from npinv.guidance import CFG
from npinv.sampling import Branch, sample
from npinv.schemes import DDIMScheme, FixedPoint

SIZE, STEPS = 16, 4
SOURCE, TARGET = "a red circle on blue background", "a green square on blue background"


def _model(folder, **kwargs) -> FlowModel:
    from tiny_flow import flow_model

    return flow_model(folder, **kwargs)


def _image() -> torch.Tensor:
    from tiny_flow import circle_image

    return circle_image(SIZE)


@pytest.fixture(scope="module")
def models(sd3_folder, sd35_folder, sd3_no_t5_folder, flux_dev_folder):
    return {"sd3": _model(sd3_folder), "sd35": _model(sd35_folder), "sd3-no-t5": _model(sd3_no_t5_folder),
            "flux-dev": _model(flux_dev_folder, max_sequence_length=32)}


def test_packing_and_ids_are_fluxpipelines():
    from diffusers import FluxPipeline

    z = torch.randn(2, 3, 6, 8)
    tokens = pack(z)
    assert torch.equal(tokens, FluxPipeline._pack_latents(z, 2, 3, 6, 8))
    assert torch.equal(unpack(tokens, 6, 8), z)
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 6 * 8, 8 * 8, 8), z)  # pixels / vae_scale_factor 8
    assert torch.equal(image_ids(6, 8, torch.device("cpu"), torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    with pytest.raises(NpinvError, match="odd side"):
        pack(torch.zeros(1, 1, 3, 4))


def test_family_comes_from_model_index(sd3_folder, flux_dev_folder, tmp_path):
    assert flow_family(sd3_folder) == "sd3" and flow_family(flux_dev_folder) == "flux"
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert flow_family(tmp_path) is None and flow_family(tmp_path / "missing") is None


def test_facts_of_each_layout(models, flux_schnell_folder):
    sd3, flux = models["sd3"], models["flux-dev"]
    assert sd3.family == "sd3" and flux.family == "flux" and flux.embedded_guidance == 3.5
    assert sd3.embedded_guidance is None and not flux.timestep_distilled
    assert sd3.latent_channels == 4 and flux.latent_channels == 1 == flux.transformer.config.in_channels // 4
    assert models["sd3-no-t5"].pipe.text_encoder_3 is None
    assert models["sd35"].transformer.config.qk_norm == "rms_norm"
    schnell = _model(flux_schnell_folder)
    assert schnell.timestep_distilled and schnell.embedded_guidance is None
    assert sd3.fingerprint != models["sd35"].fingerprint
    assert flux.fingerprint != _model(flux.pipe.name_or_path, embedded_guidance=2.0).fingerprint
    with pytest.raises(ValueError, match="latent_size"):
        flux.schedule(4)
    with pytest.raises(NpinvError, match="offset"):
        sd3.schedule(4, 1)
    # FLUX's shift follows the token count of the latent's 2x2 patches.
    assert flux.schedule(4, latent_size=(32, 32)).mu == pytest.approx(0.5 + 0.65 * (256 - 256) / 3840)


def test_sd3_velocity_is_the_transformers_call_and_is_counted(models):
    model = models["sd3"]
    cond = model.encode_prompt(SOURCE)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    before = model.counter.calls
    v = model.unet_output(z, 750.0, cond)
    direct = model.transformer(hidden_states=z, timestep=torch.tensor([750.0]), encoder_hidden_states=cond.hidden,
                               pooled_projections=cond.pooled, return_dict=False)[0]
    assert torch.equal(v, direct) and model.counter.calls == before + 1
    assert cond.hidden.shape == (1, 77 + 256, 32) and cond.pooled.shape == (1, 64)


@pytest.mark.parametrize("name", ["sd3", "sd35", "sd3-no-t5", "flux-dev"])
def test_npi_identity_and_exact_inversion_through_the_one_loop(models, name):
    model = models[name]
    z0 = model.encode_image(_image())
    src = model.encode_prompt(SOURCE)
    schedule = model.schedule(STEPS, latent_size=z0.shape[-2:])
    trace = FixedPoint().invert(model, z0, schedule, src, iters=30, tol=1e-6)
    assert all(r is not None and r <= 1e-6 for r in trace.residuals)
    z_t = trace.trajectory[-1]
    branch = [Branch.constant(src, src, STEPS)]
    npi = sample(model, z_t, schedule, branch, CFG(7.5))
    round_trip = sample(model, z_t, schedule, branch, CFG(1.0))
    assert torch.equal(npi.latents, round_trip.latents)  # the identity, tensor for tensor
    assert npi.cost.unet_calls == STEPS and npi.cost.unet_rows == STEPS  # the source branch costs 1 row a step
    assert (npi.latents - z0).abs().max() < 1e-4  # exact inversion: back to the image's latent
    plain = DDIMScheme().invert(model, z0, schedule, src).trajectory[-1]
    euler = sample(model, plain, schedule, branch, CFG(7.5)).latents
    assert (euler - z0).abs().max() > 10 * (npi.latents - z0).abs().max()


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_an_npi_edit_batch_keeps_the_source_branch_on_its_round_trip(models, name):
    model = models[name]
    z0 = model.encode_image(_image())
    src, tgt = model.encode_prompt(SOURCE), model.encode_prompt(TARGET)
    schedule = model.schedule(STEPS, latent_size=z0.shape[-2:])
    z_t = FixedPoint().invert(model, z0, schedule, src, iters=30, tol=1e-6).trajectory[-1]
    edit = sample(model, z_t, schedule, [Branch.constant(src, src, STEPS), Branch.constant(tgt, src, STEPS)], CFG(7.5))
    alone = sample(model, z_t, schedule, [Branch.constant(src, src, STEPS)], CFG(1.0))
    assert edit.cost.unet_rows == 3 * STEPS  # 1 + 2T rows a step, T = 1
    assert (edit.latents[:1] - alone.latents).abs().max() <= 1e-5
    assert (edit.latents[1:] - edit.latents[:1]).abs().max() > 1e-2


def test_sd3_loop_reproduces_stablediffusion3pipeline(models):
    model = models["sd3"]
    src, tgt = model.encode_prompt(SOURCE), model.encode_prompt(TARGET)
    schedule = model.schedule(STEPS)
    z_t = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    ours = sample(model, z_t, schedule, [Branch.constant(tgt, src, STEPS)], CFG(5.0)).latents
    with torch.no_grad():
        ref = model.pipe(prompt_embeds=tgt.hidden, pooled_prompt_embeds=tgt.pooled, negative_prompt_embeds=src.hidden,
                         negative_pooled_prompt_embeds=src.pooled, guidance_scale=5.0, latents=z_t,
                         num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent").images
    assert (ours - ref).abs().max() <= 1e-5


def test_flux_loop_reproduces_fluxpipelines_true_cfg(models):
    model = models["flux-dev"]
    src, tgt = model.encode_prompt(SOURCE), model.encode_prompt(TARGET)
    schedule = model.schedule(STEPS, latent_size=(SIZE, SIZE))
    z_t = torch.randn(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    ours = sample(model, z_t, schedule, [Branch.constant(tgt, src, STEPS)], CFG(4.0)).latents
    with torch.no_grad():
        ref = model.pipe(prompt_embeds=tgt.hidden, pooled_prompt_embeds=tgt.pooled, negative_prompt_embeds=src.hidden,
                         negative_pooled_prompt_embeds=src.pooled, true_cfg_scale=4.0, guidance_scale=3.5,
                         latents=pack(z_t), num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent",
                         max_sequence_length=32).images
    assert (ours - unpack(ref, SIZE, SIZE)).abs().max() <= 1e-5


def test_decode_inverts_encode_with_the_shift_and_scaling_factors(models):
    model = models["sd3"]
    z = model.encode_image(_image())
    cfg = model.vae.config
    with torch.no_grad():
        raw = model.vae.encode(_image()).latent_dist.mean
    assert torch.allclose(z, (raw - cfg.shift_factor) * cfg.scaling_factor)
    assert model.decode(z).shape == (1, 3, SIZE, SIZE)
