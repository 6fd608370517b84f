"""The schedule agrees with diffusers' own DDIM schedulers, and inversion undoes sampling exactly
when the noise model depends on t alone."""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from npinv.errors import NpinvError
from npinv.guidance import CFG
from npinv.model import PromptEmbedding, UNetCounter
from npinv.sampling import Branch, sample
from npinv.schedule import Schedule
from npinv.schemes import SCHEMES
from npinv.training import SD1_SCHEDULER


def _config(prediction_type: str) -> dict:
    return {**SD1_SCHEDULER, "prediction_type": prediction_type}


def test_grid_offsets():
    s0 = Schedule.from_scheduler_config(SD1_SCHEDULER, 50, offset=0)
    s1 = Schedule.from_scheduler_config(SD1_SCHEDULER, 50)
    assert s0.timesteps[0] == 980 and s0.timesteps[-1] == 0 and len(s0.timesteps) == 50
    assert s1.offset == 1 and s1.timesteps[0] == 981 and s1.timesteps[-1] == 1
    assert s0.final_alpha == pytest.approx(float(DDIMScheduler.from_config(SD1_SCHEDULER).alphas_cumprod[0]))
    ddim = DDIMScheduler.from_config(SD1_SCHEDULER)
    ddim.set_timesteps(50)
    assert s1.timesteps == ddim.timesteps.tolist()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("offset", [0, 1])
def test_steps_match_diffusers(prediction_type, offset):
    cfg = _config(prediction_type) | {"steps_offset": offset}
    ours = Schedule.from_scheduler_config(cfg, 20)
    fwd = DDIMScheduler.from_config(cfg)
    fwd.set_timesteps(20)
    inv = DDIMInverseScheduler.from_config(cfg)
    inv.set_timesteps(20)
    assert ours.timesteps == fwd.timesteps.tolist()
    assert list(reversed(ours.timesteps)) == inv.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(ours.timesteps):
        z, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = fwd.step(out, t, z, eta=0.0).prev_sample
        torch.testing.assert_close(ours.denoise_step(z, out, i), expected, atol=1e-6, rtol=0)
    for i, t in enumerate(inv.timesteps.tolist()):
        z, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = inv.step(out, t, z).prev_sample
        torch.testing.assert_close(ours.invert_step(z, out, i), expected, atol=1e-6, rtol=0)


def test_fp32_arithmetic_whatever_the_input_dtype():
    s = Schedule.from_scheduler_config(SD1_SCHEDULER, 10)
    z = torch.randn(1, 4, 8, 8).half()
    assert s.denoise_step(z, torch.randn(1, 4, 8, 8).half(), 3).dtype == torch.float32
    assert s.alphas_cumprod.dtype == torch.float32


def test_first_inversion_step_and_last_denoising_step_are_no_ops_at_offset_0():
    s = Schedule.from_scheduler_config(SD1_SCHEDULER, 10, offset=0)
    z, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(s.invert_step(z, eps, 0), z, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.denoise_step(z, eps, 9), z, atol=1e-6, rtol=0)


def test_bad_grid_is_a_user_error():
    with pytest.raises(NpinvError):
        Schedule.from_scheduler_config(SD1_SCHEDULER, 0)
    with pytest.raises(NpinvError):
        Schedule.from_scheduler_config(SD1_SCHEDULER, 1000, offset=1)


class TimeOnlyModel:
    """A stand-in noise model whose output depends on t alone: DDIM inversion is then exact. It has what
    the loops ask of a model besides the UNet call: a device and a run's deferred checks (none here)."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.counter = UNetCounter()
        self.pattern = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def deferred_checks(self):
        return contextlib.nullcontext()

    def unet_output(self, z: torch.Tensor, t: int, cond: PromptEmbedding) -> torch.Tensor:
        self.counter.calls += 1
        self.counter.rows += z.shape[0]
        return (torch.sin(self.pattern * (t + 1) / 100.0)).expand(z.shape[0], -1, -1, -1)


@pytest.mark.parametrize("offset", [0, 1])
def test_inversion_then_sampling_returns_the_input(offset):
    model = TimeOnlyModel()
    schedule = Schedule.from_scheduler_config(SD1_SCHEDULER, 25, offset=offset)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = PromptEmbedding(torch.zeros(1, 3, 8))
    trajectory = SCHEMES["ddim"].invert(model, z0, schedule, cond).trajectory[:, 0]
    assert trajectory.shape == (26, 4, 8, 8)
    result = sample(model, trajectory[-1:], schedule, [Branch.constant(cond, cond, 25)], CFG(7.5))
    torch.testing.assert_close(result.latents, z0, atol=1e-4, rtol=0)
    assert result.unet_calls == 25 and result.unet_rows == 25  # shared negative: one row a step
