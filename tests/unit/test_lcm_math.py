"""LCM's pieces against known answers: boundary conditions, the solver step on Gaussian data
(where the probability-flow ODE is closed form), the pseudo-Huber distance and the EMA target."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler

from distillkit.diffusion.schedules import FlowSchedule, VPSchedule
from distillkit.recipes.lcm import ema_update, pseudo_huber, solver_step

REPO = Path(__file__).resolve().parents[2]
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


# ----------------------------------------------------------------------------- boundary


@pytest.mark.parametrize("family", ["sd15", "sana"])
def test_boundary_condition_makes_f_identity_at_zero(tiny_adapter, family):
    """c_skip(0) = 1, c_out(0) = 0 (VP); flow: x0 = x - 0 * v. Either way f(x, 0) = x exactly."""
    adapter = tiny_adapter(family)
    zero = torch.zeros(2)
    c_skip, c_out = adapter.boundary_scalings(zero)
    if family == "sd15":
        assert torch.equal(c_skip, torch.ones(2)) and torch.equal(c_out, torch.zeros(2))
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = adapter.encode(["a cat", "a dog"])
    with torch.no_grad():
        assert torch.equal(adapter.consistency(adapter.denoiser, x, zero, cond), x)


def test_vp_scalings_are_lcm_schedulers():
    """The adapter's scalings are LCMScheduler's, bit for bit, on the whole grid."""
    from distillkit.teachers.sd15 import UNetAdapterMixin

    class Probe(UNetAdapterMixin):
        def export_scheduler(self):
            return LCMScheduler()

    probe = Probe()
    t = torch.tensor([0, 1, 19, 259, 499, 759, 999])
    c_skip, c_out = probe.boundary_scalings(t)
    ref = LCMScheduler()
    for i, step in enumerate(t):
        skip, out = ref.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i] == skip and c_out[i] == out
    assert c_skip[-1] < 3e-9 and c_out[-1] == 1.0  # far from 0: f is the x0 prediction


@pytest.mark.parametrize(("family", "steps"), [("sd15", 1), ("sd15", 4), ("sana", 1), ("sana", 4)])
def test_generate_is_the_export_schedulers_trajectory(tiny_adapter, family, steps):
    """teacher.generate (what the export check compares against) equals stepping the exported
    scheduler by hand with the same noise stream, c_skip/c_out included."""
    adapter = tiny_adapter(family)
    net, cond = adapter.denoiser, adapter.encode(["a handwritten digit seven"])
    noise = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = adapter.generate(net, noise, cond, steps, generator=torch.Generator().manual_seed(9))
        scheduler = adapter.export_scheduler()
        extra = adapter.sampling_call_kwargs(steps)  # SANA's grid sigmas, as the export ships
        scheduler.set_timesteps(**(extra or {"num_inference_steps": steps}))
        gen, x = torch.Generator().manual_seed(9), noise
        for t in scheduler.timesteps:
            out = adapter.forward(net, x, t.float().expand(1), cond.cond)
            result = scheduler.step(out, t, x, generator=gen)
            x = result.prev_sample
        final = getattr(result, "denoised", None)
        final = x if final is None else final
    torch.testing.assert_close(ours, final, atol=1e-5, rtol=1e-5)


def test_vp_solver_grid_is_lcms_ddim_grid(tiny_adapter):
    """k = 20 on 1000 steps: [999, 979, ..., 19], LCMScheduler's original 50-step grid."""
    grid = tiny_adapter("sd15").solver_timesteps(50)
    scheduler = LCMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(50)
    assert grid.tolist() == scheduler.timesteps.float().tolist()
    assert grid[0] == 999 and grid[-1] == 19 and torch.all(grid[:-1] - grid[1:] == 20)


# ----------------------------------------------------------------------------- solver step


def _gaussian(schedule, t, mu: float, s: float):
    """x_t for x0 ~ N(mu, s^2), the exact denoiser E[x0 | x_t] as a network output, and the
    exact PF-ODE map to another time: for Gaussian data the flow is the affine map between the
    marginals N(a mu, a^2 s^2 + sigma^2), z = (x - a mu) / sqrt(v) is constant along it."""
    a, sig = (c.double() for c in schedule.alpha_sigma(t))
    v = a * a * s * s + sig * sig
    gen = torch.Generator().manual_seed(0)
    x_t = a * mu + v.sqrt() * torch.randn(len(t), generator=gen, dtype=torch.float64)
    x0_hat = mu + a * s * s / v * (x_t - a * mu)
    out = schedule.from_x0(x0_hat, x_t, t)

    def exact(t_prev):
        a2, sig2 = (c.double() for c in schedule.alpha_sigma(t_prev))
        v2 = a2 * a2 * s * s + sig2 * sig2
        return a2 * mu + (v2 / v).sqrt() * (x_t - a * mu)

    return x_t, out, exact


def _angle(schedule, t, s: float):
    """theta with (a s, sigma) = sqrt(v) (cos theta, sin theta)."""
    a, sig = (c.double() for c in schedule.alpha_sigma(t))
    return torch.atan2(sig, a * s)


def _schedules():
    return [
        ("vp", VPSchedule.from_scheduler_config(SD_SCHEDULE)),
        ("flow", FlowSchedule("flow", 1000, shift=3.0)),
    ]


@pytest.mark.parametrize(("kind", "schedule"), _schedules())
@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_solver_step_on_gaussian_data_has_the_known_error(kind, schedule, s):
    """Known answer: with the exact denoiser, one DDIM (= Euler, for flow) step from t to t'
    scales the deviation x - a mu by cos(theta - theta') where the exact ODE scales it by 1,
    theta = atan2(sigma, a s). So DDIM is exact only as t' -> t, with a relative error
    1 - cos(dtheta) ~ dtheta^2 / 2 per step. Checked to 1e-6 (the schedules keep float32
    alpha and sigma, so alpha = 1 - sigma holds only to float32 rounding for flow)."""
    mu = 0.3
    t = torch.arange(50, 0, -1) * 20 - 1.0 if kind == "vp" else torch.arange(50, 0, -1) * 20.0
    t_prev = (t - 20).clamp_min(0)
    x_t, out, exact = _gaussian(schedule, t, mu, s)
    x_prev = solver_step(schedule, out, x_t, t, t_prev)
    a2 = schedule.alpha_sigma(t_prev)[0].double()
    target = exact(t_prev)
    ratio = (x_prev - a2 * mu) / (target - a2 * mu)
    torch.testing.assert_close(
        ratio, torch.cos(_angle(schedule, t, s) - _angle(schedule, t_prev, s)), atol=1e-6, rtol=0
    )
    # honest size of the one-step error on the LCM grid (k = 20), from the formula above
    rel = (x_prev - target).abs() / (target - a2 * mu).abs()
    assert rel.max() < 0.06  # worst: the last interval into t = 0 (2.1% VP / s = 0.5)
    interior = t_prev >= 100
    assert rel[interior].max() < 2e-3


def test_substeps_converge_to_the_exact_ode_solution():
    """Twenty unit steps across the same k = 20 interval: error ~ 1/20 of one big step."""
    schedule = VPSchedule.from_scheduler_config(SD_SCHEDULE)
    mu, s = 0.3, 0.5
    t0, t1 = torch.tensor([519.0]), torch.tensor([499.0])
    x_t, out, exact = _gaussian(schedule, t0, mu, s)
    one = solver_step(schedule, out, x_t, t0, t1)
    x = x_t
    for k in range(20):
        t, t_prev = t0 - k, t0 - k - 1
        a, sig = (c.double() for c in schedule.alpha_sigma(t))
        x0_hat = mu + a * s * s / (a * a * s * s + sig * sig) * (x - a * mu)
        x = solver_step(schedule, schedule.from_x0(x0_hat, x, t), x, t, t_prev)
    target = exact(t1)
    assert (x - target).abs().item() < (one - target).abs().item() / 10


def test_flow_ddim_step_is_the_euler_step():
    schedule = FlowSchedule("flow", 1000, shift=3.0)
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    t, t_prev = torch.tensor([1000.0, 600.0, 30.0]), torch.tensor([700.0, 100.0, 0.0])
    sigma, sigma_prev = t / 1000, t_prev / 1000
    euler = x + (sigma_prev - sigma)[:, None] * v
    torch.testing.assert_close(solver_step(schedule, v, x, t, t_prev), euler)


# ----------------------------------------------------------------------------- loss, EMA


def test_pseudo_huber_known_values():
    # sqrt(d^2 + c^2) - c: d = 0 -> 0, d = sqrt(3) c -> c
    zero, d = torch.zeros(1), torch.tensor([math.sqrt(3.0)])
    assert pseudo_huber(torch.cat([zero, d]), torch.zeros(2), c=1.0).item() == pytest.approx(0.5)
    c = 0.001
    assert pseudo_huber(torch.ones(4), torch.zeros(4), c).item() == pytest.approx(
        math.sqrt(1 + c * c) - c, rel=1e-6
    )
    # L1-like far from the target (gradient ~ sign), L2-like within c (gradient ~ d / c)
    for value, slope in ((5.0, 1.0), (1e-5, 1e-5 / c)):
        x = torch.tensor([value], requires_grad=True)
        pseudo_huber(x, torch.zeros(1), c).backward()
        assert x.grad.item() == pytest.approx(slope, rel=1e-3)


def test_ema_target_update():
    target, source = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for p in target.parameters():
        torch.nn.init.zeros_(p)
    for p in source.parameters():
        torch.nn.init.ones_(p)
    ema_update(target, source, decay=0.95)
    for p in target.parameters():
        torch.testing.assert_close(p.detach(), torch.full_like(p, 0.05))


# ----------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize("student", ["full", "lora"])
def test_recipe_loss_trains_only_the_student(tiny_adapter, student):
    """One data-free LCM loss on the tiny SD1.5 teacher: finite, gradients reach the student
    only, and the EMA target (full students; LoRA has none) moves by (1 - mu) toward it."""
    from distillkit.config import load_config
    from distillkit.recipes.base import Batch
    from distillkit.recipes.lcm import LCM

    config = "lcm_sd15" if student == "full" else "lcm_lora_sd15"
    path = REPO / "recipes" / f"{config}.yaml"
    # separate copies: a shared base would put the adapter on the session's tiny teacher
    # (the shared-base wiring is tested in test_recipe_wiring on a teacher of its own)
    overrides = ["recipe.latents=teacher", "recipe.teacher_steps=3", "student.shared_base=false"]
    cfg = load_config(path, overrides)
    adapter = tiny_adapter("sd15")
    recipe = LCM(cfg, adapter)
    assert recipe.grid[0] == 999 and recipe.grid[-2] == 19 and recipe.grid[-1] == 0
    assert recipe.export_steps == 4 and not LCM.needs_images(cfg.recipe)
    batch = Batch(["a cat", "a dog"], None, None, torch.Generator().manual_seed(0))
    loss, logs = recipe.loss("generator", batch, 0)
    assert torch.isfinite(loss) and loss > 0 and set(logs) == {"consistency", "omega"}
    loss.backward()
    net = recipe.roles["generator"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is None for p in adapter.denoiser.parameters())
    if student == "lora":
        assert recipe.target is None and recipe.state_modules() == {}
        return
    assert set(recipe.state_modules()) == {"target"}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    before = [p.clone() for p in recipe.target.parameters()]
    recipe.after_update("generator", 0)
    for b, p in zip(before, recipe.target.parameters()):
        torch.testing.assert_close(p, b + 0.05, rtol=0, atol=1e-5)
