"""FlowSchedule: the sigma grid the diffusers pipelines use, their Euler step bit for bit, and exact
inversion by the existing schemes (fixed point, Anderson, BDIA) driving it unchanged."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from npinv.errors import NpinvError
from npinv.flow_schedule import FlowSchedule, euler_step, midpoint_step, midpoint_trajectory
from npinv.schemes import BDIA, AndersonFixedPoint, DDIMScheme, FixedPoint
from tiny_flow import FLUX_DEV_SCHEDULER, FLUX_SCHNELL_SCHEDULER, SD3_SCHEDULER


def _pipeline_grid(pipe, steps: int, size: int, **kwargs) -> tuple[torch.Tensor, list[float]]:
    """The sigmas and timesteps a pipeline run really used (recorded by its step callback)."""
    seen = []

    def record(p, i, t, kw):
        seen.append(float(t))
        return {}

    pipe(prompt="a red circle", num_inference_steps=steps, height=size, width=size, output_type="latent",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=record, **kwargs)
    return pipe.scheduler.sigmas.clone(), seen


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_sd3_grid_is_the_pipelines(sd3_pipe, steps):
    sigmas, seen = _pipeline_grid(sd3_pipe, steps, 16, guidance_scale=1.0)
    s = FlowSchedule.from_scheduler_config(sd3_pipe.scheduler.config, steps)
    assert torch.equal(s.sigmas, sigmas.float())
    assert s.timesteps == seen and s.steps == steps and s.mu is None and s.shift == 3.0
    # The shift formula sigma' = 3 s / (1 + 2 s) over a linear grid from 1 (independent of diffusers' code).
    lin = np.linspace(1.0, float(sigmas[-2]) / (3 - 2 * float(sigmas[-2])), steps)
    np.testing.assert_allclose(s.sigmas[:-1].numpy(), 3 * lin / (1 + 2 * lin), atol=2e-6)


@pytest.mark.parametrize("size", [16, 32])
def test_flux_grid_is_the_pipelines_with_dynamic_shift(flux_dev_pipe, size):
    steps = 5
    sigmas, seen = _pipeline_grid(flux_dev_pipe, steps, size, guidance_scale=3.5, max_sequence_length=32)
    seq = (size // 2) ** 2  # packed 2x2 latent patches (the tiny VAE does not downsample)
    s = FlowSchedule.from_scheduler_config(flux_dev_pipe.scheduler.config, steps, grid="flux", image_seq_len=seq)
    assert torch.equal(s.sigmas, sigmas.float()) and s.timesteps == seen
    mu = 0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256)  # FLUX's line through (256, 0.5) and (4096, 1.15)
    assert s.mu == pytest.approx(mu, abs=1e-12)
    lin = np.linspace(1.0, 1 / steps, steps)
    np.testing.assert_allclose(s.sigmas[:-1].numpy(), math.exp(mu) / (math.exp(mu) + (1 / lin - 1)), atol=1e-6)


def test_flux_mu_changes_the_grid_and_needs_the_sequence_length():
    a = FlowSchedule.from_scheduler_config(FLUX_DEV_SCHEDULER, 10, grid="flux", image_seq_len=256)
    b = FlowSchedule.from_scheduler_config(FLUX_DEV_SCHEDULER, 10, grid="flux", image_seq_len=4096)
    assert a.mu == pytest.approx(0.5) and b.mu == pytest.approx(1.15)
    assert (b.sigmas[1:-1] > a.sigmas[1:-1]).all()  # a larger image spends more steps at high noise
    with pytest.raises(ValueError, match="image_seq_len"):
        FlowSchedule.from_scheduler_config(FLUX_DEV_SCHEDULER, 10, grid="flux")
    schnell = FlowSchedule.from_scheduler_config(FLUX_SCHNELL_SCHEDULER, 4, grid="flux", image_seq_len=4096)
    assert schnell.mu is None
    assert torch.allclose(schnell.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


@pytest.mark.parametrize("config,grid", [(SD3_SCHEDULER, "scheduler"), (FLUX_DEV_SCHEDULER, "flux")])
def test_denoise_step_is_scheduler_step_bit_for_bit(config, grid):
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, seq = 6, 1024
    s = FlowSchedule.from_scheduler_config(config, steps, grid=grid, image_seq_len=seq)
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps) if grid == "flux" else None, mu=s.mu)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(z.shape, generator=g)
        ours = s.denoise_step(z, v, i)
        z = sched.step(v, t, z, return_dict=False)[0]
        assert torch.equal(ours, z)
        assert float(t) == s.timesteps[i] == s.denoise_timestep(i)


def test_levels_and_index_conventions():
    s = FlowSchedule.from_scheduler_config(SD3_SCHEDULER, 5)
    n = s.steps
    assert s.level(0) == 0.0 and s.level(n) == s.timesteps[0]
    assert list(reversed(s.timesteps)) == [s.level(k + 1) for k in range(n)]  # the schemes' destination timesteps
    assert [s.invert_timestep(i) for i in range(n)] == [s.level(i) for i in range(n)]
    assert float(s.sigma(0)) == 0.0 and float(s.sigma(n)) == float(s.sigmas[0])
    z, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    for k in range(n):
        up = s.invert_step(z, v, k)
        assert torch.allclose(up, z + (s.sigma(k + 1) - s.sigma(k)) * v)
        assert torch.equal(s.invert_step_at(z, v, up, k), up)
        # Undoing inversion step k is the denoising step n - 1 - k, between the same two sigmas.
        assert torch.allclose(s.denoise_step_to(up, v, k), z, atol=1e-6)


def test_to_dict_and_back_is_the_same_grid():
    s = FlowSchedule.from_scheduler_config(FLUX_DEV_SCHEDULER, 7, grid="flux", image_seq_len=777)
    d = s.to_dict()
    assert d["family"] == "flow" and d["steps"] == 7 and d["offset"] == 0 and d["mu"] == s.mu
    back = FlowSchedule.from_dict(d)
    assert torch.equal(back.sigmas, s.sigmas) and back.timesteps == s.timesteps and back.mu == s.mu


def test_bad_schedulers_are_refused():
    with pytest.raises(NpinvError, match="deterministic Euler"):
        FlowSchedule.from_scheduler_config({**SD3_SCHEDULER, "stochastic_sampling": True}, 4)
    with pytest.raises(NpinvError, match="steps"):
        FlowSchedule.from_scheduler_config(SD3_SCHEDULER, 0)
    with pytest.raises(NpinvError, match="strictly"):
        FlowSchedule(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1000.0, 1000.0]))


# -- exact inversion on a toy velocity field: the schemes of npinv.schemes drive the flow schedule unchanged --

class LinearField:
    """A stand-in for the model: ``v(z, t) = A(t) z + c`` with ``A`` mixing channels and depending on
    the timestep, so inversion errors show and each step's exact inverse is a linear solve."""

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.a = 0.6 * torch.randn(channels, channels, generator=g) / channels**0.5
        self.c = torch.randn(1, channels, 1, 1, generator=g)
        self.calls = 0
        self.device = torch.device("cpu")

    def deferred_checks(self):
        return contextlib.nullcontext()

    def unet_output(self, z: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        self.calls += 1
        a = self.a * (1 + t / 1000)
        return torch.einsum("dc,bchw->bdhw", a, z.float()) + self.c


def _sample(field: LinearField, z: torch.Tensor, s: FlowSchedule) -> torch.Tensor:
    for i, t in enumerate(s.timesteps):
        z = s.denoise_step(z, field.unet_output(z, t), i)
    return z


@pytest.mark.parametrize("config,grid", [(SD3_SCHEDULER, "scheduler"), (FLUX_DEV_SCHEDULER, "flux")])
@pytest.mark.parametrize("scheme", [FixedPoint(), AndersonFixedPoint()])
def test_fixed_point_inversion_is_the_exact_inverse_of_euler_sampling(config, grid, scheme):
    s = FlowSchedule.from_scheduler_config(config, 8, grid=grid, image_seq_len=4096)
    field = LinearField()
    z0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    tol = 1e-6
    trace = scheme.invert(field, z0, s, None, iters=50, tol=tol)
    assert all(r is not None and r <= tol for r in trace.residuals)  # every step inverted to its tolerance
    back = _sample(field, trace.trajectory[-1], s)
    assert (back - z0).abs().max() < 2e-5
    plain = DDIMScheme().invert(field, z0, s, None)
    plain_err = (_sample(field, plain.trajectory[-1], s) - z0).abs().max()
    assert plain_err > 100 * (back - z0).abs().max()  # plain Euler inversion is far from exact here


def test_euler_sampling_then_fixed_point_inversion_recovers_the_trajectory():
    s = FlowSchedule.from_scheduler_config(SD3_SCHEDULER, 6)
    field = LinearField(seed=3)
    z_t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    path = [z_t]
    for i, t in enumerate(s.timesteps):
        path.append(s.denoise_step(path[-1], field.unet_output(path[-1], t), i))
    trace = FixedPoint().invert(field, path[-1], s, None, iters=60, tol=1e-7)
    # trajectory[k] is z*[k]: the sampler's latent after n - k steps.
    for k in range(s.steps + 1):
        assert torch.allclose(trace.trajectory[k], path[s.steps - k], atol=1e-5)


def test_fixed_point_step_residual_is_the_exact_linear_solve():
    s = FlowSchedule.from_scheduler_config(SD3_SCHEDULER, 4)
    field = LinearField(seed=5)
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    trace = FixedPoint().invert(field, z, s, None, iters=80, tol=1e-7)
    # Step 0 solves y = z - (sigma(0) - sigma(1)) (A(t) y + c), t = level(1): (I + dt A) y = z - dt c.
    dt = float(s.sigma(0) - s.sigma(1))
    a = field.a * (1 + s.level(1) / 1000)
    m = torch.eye(4) + dt * a
    rhs = (z - dt * field.c).permute(0, 2, 3, 1).reshape(-1, 4)
    exact = torch.linalg.solve(m, rhs.T).T.reshape(1, 3, 3, 4).permute(0, 3, 1, 2)
    assert torch.allclose(trace.trajectory[1], exact, atol=1e-5)
    assert trace.residuals[0] <= 1e-7


def test_bdia_on_the_flow_schedule_inverts_exactly():
    s = FlowSchedule.from_scheduler_config(SD3_SCHEDULER, 6)
    field = LinearField(seed=6)
    z0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    traj = BDIA().invert(field, z0, s, None).trajectory
    n = s.steps
    # Sampling as the loop does with pair_start: z*[n], z*[n-1] given, then BDIA steps i = 1..n-1.
    z_prev, z = traj[n], traj[n - 1]
    for i in range(1, n):
        z_prev, z = z, s.bdia_step(z, z_prev, field.unet_output(z, s.timesteps[i]), i)
    assert (z - z0).abs().max() < 1e-5


# -- the second-order steps ------------------------------------------------------------------------------------

def test_midpoint_is_rf_solvers_taylor_step_and_second_order():
    a = -0.8
    field = lambda z, t: a * z  # noqa: E731 - exact flow z(s) = exp(a s) z(0)
    z0 = torch.ones(1, 1, 1, 1)
    one = midpoint_step(field, z0, 0.2, 0.6)
    dt, v = 0.4, a * z0
    v_mid = a * (z0 + dt / 2 * v)
    taylor = z0 + dt * v + dt**2 / 2 * (v_mid - v) / (dt / 2)  # RF-Solver's form
    assert torch.allclose(one.z, taylor) and one.calls == 2
    errors = {}
    for n in (4, 8):
        sig = torch.linspace(0, 1, n + 1)
        mid, calls = midpoint_trajectory(field, z0, sig)
        eul = z0.clone()
        for x, y in zip(sig[:-1], sig[1:], strict=True):
            eul = euler_step(eul, field(eul, 0), x, y)
        exact = math.exp(a)
        errors[n] = (abs(float(mid[-1]) - exact), abs(float(eul) - exact))
        assert calls == 2 * n and errors[n][0] < errors[n][1] / 5
    assert errors[4][0] / errors[8][0] > 3.5  # halving the step quarters the midpoint error


def test_fireflow_reuses_the_midpoint_velocity():
    calls = []

    def field(z, t):
        calls.append(t)
        return -0.5 * z

    sig = torch.linspace(0, 1, 6)
    path, n_calls = midpoint_trajectory(field, torch.ones(1, 1, 1, 1), sig, reuse=True)
    assert n_calls == 6 == len(calls) and path.shape[0] == 6  # n + 1 calls for n = 5 steps
    # After the first step's start velocity, every call is at a midpoint sigma.
    assert calls[0] == 0.0
    assert calls[1:] == pytest.approx([float((a + b) / 2 * 1000) for a, b in zip(sig[:-1], sig[1:], strict=True)])
    exact = math.exp(-0.5)
    assert abs(float(path[-1]) - exact) < 2e-3
