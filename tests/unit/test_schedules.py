"""The schedule math against closed forms and against diffusers' own schedulers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from distillkit.diffusion.schedules import FlowSchedule, VPSchedule

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def _schedules():
    for prediction in ("epsilon", "v_prediction", "sample"):
        yield VPSchedule.from_scheduler_config({**SD_CONFIG, "prediction_type": prediction})
    yield FlowSchedule("flow", 1000, shift=3.0)


def test_vp_alphas_match_diffusers():
    ours = VPSchedule.from_scheduler_config(SD_CONFIG).alphas_cumprod
    theirs = DDPMScheduler(**SD_CONFIG).alphas_cumprod
    torch.testing.assert_close(ours, theirs)


def test_vp_add_noise_matches_diffusers():
    sched = VPSchedule.from_scheduler_config(SD_CONFIG)
    ref = DDPMScheduler(**SD_CONFIG)
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 250, 500, 999])
    torch.testing.assert_close(sched.add_noise(x0, eps, t.float()), ref.add_noise(x0, eps, t))


@pytest.mark.parametrize("sched", list(_schedules()), ids=lambda s: s.prediction)
def test_parameterization_round_trips(sched):
    """The exact target, read back through to_x0 / to_eps, recovers x0 and eps."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    t = sched.sample_t(6, gen, 0.05, 0.95)
    x_t = sched.add_noise(x0, eps, t)
    out = sched.target(x0, eps, t)
    torch.testing.assert_close(sched.to_x0(out, x_t, t), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(sched.to_eps(out, x_t, t), eps, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(sched.from_x0(x0, x_t, t), out, atol=2e-4, rtol=1e-4)


def test_flow_schedule_is_linear_interpolation():
    sched = FlowSchedule("flow", 1000)
    x0, eps = torch.ones(1, 2), torch.zeros(1, 2)
    for sigma in (0.0, 0.25, 1.0):
        t = torch.tensor([sigma * 1000])
        torch.testing.assert_close(sched.add_noise(x0, eps, t), torch.full((1, 2), 1 - sigma))
    # velocity target points from data to noise
    torch.testing.assert_close(sched.target(x0, eps, torch.tensor([500.0])), -torch.ones(1, 2))


def test_sample_t_ranges():
    gen = torch.Generator().manual_seed(0)
    vp = VPSchedule.from_scheduler_config(SD_CONFIG)
    t = vp.sample_t(2000, gen, 0.02, 0.98)
    assert t.min() >= 20 and t.max() < 980 and torch.equal(t, t.round())
    flow = FlowSchedule("flow", 1000, shift=3.0)
    t = flow.sample_t(2000, gen)
    assert t.min() > 0 and t.max() <= 1000
    # a shift of 3 puts most samples at high noise
    assert (t > 500).float().mean() > 0.7
