"""An independent reference for NPI on flow models, written only with diffusers' public pipelines and
:class:`npinv.flow_schedule.FlowSchedule` (no npinv model code).

Euler-invert a VAE-encoded image by hand with the source prompt at guidance 1 (the network called
directly), then let the diffusers pipeline sample from the inverted noise with the source prompt as its
negative at guidance 7.5: that is the guidance-1 Euler round trip (the NPI identity). And a hand-written
Euler loop over FlowSchedule's grid reproduces the pipeline's own CFG sampling with another prompt.
"""

from __future__ import annotations

import pytest
import torch

from npinv.flow_schedule import FlowSchedule

STEPS = 5
SIZE = 32  # pixels; the tiny VAEs do not downsample
SOURCE, TARGET = "a red circle on blue background", "a green square on blue background"


def _image(pipe) -> torch.Tensor:
    from npinv.scenes import Scene

    return pipe.image_processor.preprocess(Scene("circle", "red", "blue", 0.5).render(SIZE))


def _encode(pipe, image: torch.Tensor) -> torch.Tensor:
    """The latent the img2img pipelines make: ``(mode - shift_factor) * scaling_factor``."""
    cfg = pipe.vae.config
    return (pipe.vae.encode(image).latent_dist.mode() - cfg.shift_factor) * cfg.scaling_factor


# -- SD3 ------------------------------------------------------------------------------------------------------

def _sd3_velocity(pipe, z, t: float, embeds, pooled):
    timestep = torch.full((z.shape[0],), t, dtype=torch.float32)  # SD3 takes t = sigma * 1000
    return pipe.transformer(hidden_states=z, timestep=timestep, encoder_hidden_states=embeds,
                            pooled_projections=pooled, return_dict=False)[0]


@pytest.fixture(scope="module")
def sd3_case(sd3_pipe):
    pipe = sd3_pipe
    with torch.no_grad():
        src, _, src_pooled, _ = pipe.encode_prompt(SOURCE, None, None, do_classifier_free_guidance=False)
        tgt, _, tgt_pooled, _ = pipe.encode_prompt(TARGET, None, None, do_classifier_free_guidance=False)
        z0 = _encode(pipe, _image(pipe))
    return pipe, z0, (src, src_pooled), (tgt, tgt_pooled)


def test_sd3_npi_identity_through_the_diffusers_pipeline(sd3_case):
    pipe, z0, (src, src_pooled), _ = sd3_case
    s = FlowSchedule.from_scheduler_config(pipe.scheduler.config, STEPS)
    with torch.no_grad():
        z = z0
        for i in range(s.steps):  # Euler inversion: the velocity at the step's start (latent and sigma)
            z = s.invert_step(z, _sd3_velocity(pipe, z, s.invert_timestep(i), src, src_pooled), i)
        z_t = z
        for i, t in enumerate(s.timesteps):  # the guidance-1 round trip
            z = s.denoise_step(z, _sd3_velocity(pipe, z, t, src, src_pooled), i)
        out = pipe(prompt_embeds=src, pooled_prompt_embeds=src_pooled, negative_prompt_embeds=src,
                   negative_pooled_prompt_embeds=src_pooled, guidance_scale=7.5, latents=z_t,
                   num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent").images
    assert out.shape == z0.shape
    assert (out - z).abs().max() <= 1e-5
    assert (out - z0).abs().max() > 1e-3  # plain Euler inversion is not exact: the identity is not a round trip to z0


def _hand_cfg(schedule: FlowSchedule, z_t: torch.Tensor, velocity, scale: float) -> torch.Tensor:
    """Euler sampling by hand with CFG: ``velocity(z, t, negative)`` is the negative's (True) or the condition's."""
    z = z_t
    for i, t in enumerate(schedule.timesteps):
        v_neg, v_cond = velocity(z, t, True), velocity(z, t, False)
        z = schedule.denoise_step(z, v_neg + scale * (v_cond - v_neg), i)
    return z


def test_sd3_flow_schedule_loop_reproduces_the_pipelines_cfg(sd3_case):
    pipe, z0, (src, src_pooled), (tgt, tgt_pooled) = sd3_case
    s = FlowSchedule.from_scheduler_config(pipe.scheduler.config, STEPS)
    w = 7.5
    z_t = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = _hand_cfg(s, z_t, lambda z, t, neg: _sd3_velocity(pipe, z, t, *((src, src_pooled) if neg else (tgt, tgt_pooled))),
                      w)
        out = pipe(prompt_embeds=tgt, pooled_prompt_embeds=tgt_pooled, negative_prompt_embeds=src,
                   negative_pooled_prompt_embeds=src_pooled, guidance_scale=w, latents=z_t,
                   num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent").images
    assert (out - z).abs().max() <= 1e-5
    assert (out - z_t).abs().max() > 1e-2


# -- FLUX.1-dev ---------------------------------------------------------------------------------------------------

TEXT_LEN = 32  # T5 tokens (FLUX's default 512 only costs time here)
EMBEDDED_GUIDANCE = 3.5


def _pack(z: torch.Tensor) -> torch.Tensor:
    """FLUX's tokens: 2x2 latent patches, channels then the patch's rows and columns (B, h/2 * w/2, 4 C)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _image_ids(h: int, w: int) -> torch.Tensor:
    """RoPE ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def _flux_velocity(pipe, z, t: float, prompt, img_ids):
    embeds, pooled, text_ids = prompt
    timestep = torch.full((z.shape[0],), t, dtype=torch.float32) / 1000  # FLUX takes sigma, t / 1000
    guidance = torch.full((z.shape[0],), EMBEDDED_GUIDANCE, dtype=torch.float32)
    return pipe.transformer(hidden_states=z, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                            encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]


@pytest.fixture(scope="module")
def flux_case(flux_dev_pipe):
    pipe = flux_dev_pipe
    with torch.no_grad():
        src = pipe.encode_prompt(SOURCE, None, max_sequence_length=TEXT_LEN)
        tgt = pipe.encode_prompt(TARGET, None, max_sequence_length=TEXT_LEN)
        z0 = _encode(pipe, _image(pipe))
    h, w = z0.shape[-2:]
    packed = _pack(z0)
    s = FlowSchedule.from_scheduler_config(pipe.scheduler.config, STEPS, grid="flux", image_seq_len=packed.shape[1])
    return pipe, packed, _image_ids(h, w), s, src, tgt


def _flux_pipe(pipe, prompt, negative, scale, latents):
    return pipe(prompt_embeds=prompt[0], pooled_prompt_embeds=prompt[1], negative_prompt_embeds=negative[0],
                negative_pooled_prompt_embeds=negative[1], true_cfg_scale=scale, guidance_scale=EMBEDDED_GUIDANCE,
                latents=latents, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent",
                max_sequence_length=TEXT_LEN).images


def test_flux_dev_npi_identity_through_the_diffusers_pipeline(flux_case):
    pipe, z0, img_ids, s, src, _ = flux_case
    assert s.mu is not None  # the dynamic shift of this resolution, reused by inversion and sampling
    with torch.no_grad():
        z = z0
        for i in range(s.steps):
            z = s.invert_step(z, _flux_velocity(pipe, z, s.invert_timestep(i), src, img_ids), i)
        z_t = z
        for i, t in enumerate(s.timesteps):
            z = s.denoise_step(z, _flux_velocity(pipe, z, t, src, img_ids), i)
        out = _flux_pipe(pipe, src, src, 7.5, z_t)
    assert out.shape == z0.shape
    assert (out - z).abs().max() <= 1e-5
    assert (out - z0).abs().max() > 1e-3


def test_flux_dev_flow_schedule_loop_reproduces_the_pipelines_true_cfg(flux_case):
    pipe, z0, img_ids, s, src, tgt = flux_case
    scale = 4.0
    z_t = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = _hand_cfg(s, z_t, lambda z, t, neg: _flux_velocity(pipe, z, t, src if neg else tgt, img_ids), scale)
        out = _flux_pipe(pipe, tgt, src, scale, z_t)
    assert (out - z).abs().max() <= 1e-5
    assert (out - z_t).abs().max() > 1e-2
