"""LCM with student.step_counts: MLCM's multistep consistency distillation. The segment math
against closed forms (a flow schedule, a teacher that knows its one data point), and the
recipe's wiring on a tiny SD1.5 teacher: the count the stream draws, each sample's segment edge,
and the loss those give."""

from __future__ import annotations

import pytest
import torch

from distillkit.diffusion.schedules import FlowSchedule, VPSchedule
from distillkit.recipes.base import Batch
from distillkit.recipes.lcm import (
    from_boundary,
    pseudo_huber,
    segment_edges,
    segment_target,
    solver_step,
    to_boundary,
)
from tests.helpers.recipe_spy import build, make_batch, run_role, spy_on


def _vp() -> VPSchedule:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).float()
    return VPSchedule("epsilon", 1000, alphas_cumprod=abar)


SCHEDULES = {"vp": _vp(), "flow": FlowSchedule("flow", 1000, shift=3.0)}


def _draw(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 2, 2, generator=g), torch.randn(n, 4, 2, 2, generator=g)


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_boundary_map_is_ddim_and_inverts(kind):
    """to_boundary is the DDIM step of solver_step (written separately) for the network output
    that denoises to x0; from_boundary inverts it; the edge t = 0 is x0 itself."""
    schedule = SCHEDULES[kind]
    x0, eps = _draw()
    t, s = torch.tensor([999.0, 600.0, 79.0]), torch.tensor([759.0, 259.0, 0.0])
    x_t = schedule.add_noise(x0, eps, t)
    guess = x0 + 0.3  # any clean estimate, not the true one
    out = schedule.from_x0(guess, x_t, t)
    carried = to_boundary(schedule, guess, x_t, t, s)
    ddim = solver_step(schedule, out, x_t, t, s)
    torch.testing.assert_close(carried[:2], ddim[:2], atol=1e-5, rtol=1e-5)
    assert torch.equal(carried[2], guess[2])  # the clean end
    torch.testing.assert_close(from_boundary(schedule, carried, x_t, t, s), guess)


def test_segment_target_for_a_teacher_that_knows_its_one_data_point():
    """Data = one point x*: its ODE is exact in DDIM, so a target network that predicts x*
    gives the segment target x* at every edge; one that predicts x* + d gives x* + r d, with
    r = (1 - s/e) / (1 - s/t) on a flow schedule (sigma = t/T): the edge's error is carried
    back through both DDIM maps. At e = s (the solver landed on the edge) r = 0; at s = 0,
    r = 1 (plain LCM: the target network's own estimate)."""
    flow = FlowSchedule("flow", 1000)
    star, eps = _draw(1)
    star, eps = star.expand(4, -1, -1, -1), eps.expand(4, -1, -1, -1)
    t = torch.tensor([900.0, 900.0, 500.0, 300.0])  # t_start
    e = torch.tensor([800.0, 500.0, 400.0, 200.0])  # t_end
    s = torch.tensor([500.0, 500.0, 0.0, 100.0])  # the segment edge
    x_t = flow.add_noise(star, eps, t)
    x_e = flow.add_noise(star, eps, e)  # the exact ODE point of a one-point teacher
    exact = segment_target(flow, star, x_e, e, x_t, t, s)
    torch.testing.assert_close(exact, star, atol=1e-5, rtol=1e-5)
    d = torch.full_like(star, 0.2)
    got = segment_target(flow, star + d, x_e, e, x_t, t, s)
    r = torch.where(s == 0, 1.0, (1 - s / e) / (1 - s / t)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(got, star + r * d, atol=1e-5, rtol=1e-5)


def test_segment_edges_cut_the_grid_at_the_sampling_points():
    grid = torch.tensor([999.0, 899, 799, 699, 599, 499, 399, 299, 199, 99, 0])
    assert segment_edges(grid, grid[:1]).tolist() == [10] * 10  # one step: every edge is 0
    two = segment_edges(grid, torch.tensor([999.0, 499.0]))
    assert two.tolist() == [5] * 5 + [10] * 5
    four = segment_edges(grid, torch.tensor([999.0, 799.0, 499.0, 299.0]))
    assert four.tolist() == [2, 2, 5, 5, 5, 7, 7, 10, 10, 10]
    with pytest.raises(ValueError, match="not on the grid"):
        segment_edges(grid, torch.tensor([999.0, 550.0]))


def _edge(points: list[float], t: float) -> float:
    """The segment edge below t: the largest sampling point under it, else 0 (by hand)."""
    below = [p for p in points[1:] if p < t]
    return max(below) if below else 0.0


def test_lcm_with_step_counts_pulls_each_sample_to_its_segment_edge(tiny_adapter, monkeypatch):
    """student.step_counts=[1, 2, 4]: the update's count is the stream's first draw (replayed);
    each sample's edge is the export's k-step point below its t_start (or 0); the loss is the
    pseudo-Huber distance of the student's estimate to the target network's estimate carried
    to that edge and back (recomputed here from the recorded calls); k = 1 is plain LCM."""
    sd15 = tiny_adapter("sd15")
    recipe = build("lcm", "sd15", sd15, "student.step_counts=[1,2,4]",
                   monkeypatch=monkeypatch, yaml="lcm_lora_sd15")  # fmt: skip
    assert recipe.step_counts == (1, 2, 4) and recipe.export_steps == 4
    c = recipe.cfg.huber_c
    first = make_batch(sd15, n=4, images=True)
    spy = spy_on(monkeypatch, sd15, recipe, first.prompts, first.captions)
    seen, moved = set(), 0
    for seed in range(10):
        batch = make_batch(sd15, seed, n=4, images=True)
        replay = Batch(batch.prompts, None, None, torch.Generator().set_state(
            batch.generator.get_state()))  # fmt: skip
        k = (1, 2, 4)[replay.choice(3)]
        spy.clear()
        loss, _, _ = run_role(recipe, "generator", batch, backward=False)
        student, _, target = spy.calls
        points = sd15.generator_timesteps(k).tolist()
        edge = torch.tensor([_edge(points, t) for t in student.t.tolist()])
        assert (edge <= target.t).all() and (target.t < student.t).all()
        pred = _consistency(sd15, student)
        plain = _consistency(sd15, target)
        want = segment_target(sd15, plain, target.x, target.t, student.x, student.t, edge)
        torch.testing.assert_close(loss, pseudo_huber(pred, want, c))
        if k == 1:
            assert torch.equal(want, plain)
        moved += int((~torch.isclose(want, plain)).any())
        seen.add(k)
    assert seen == {1, 2, 4} and moved > 0


def _consistency(adapter, call) -> torch.Tensor:
    c_skip, c_out = adapter.boundary_scalings(call.t)
    x0 = adapter.to_x0(call.out, call.x, call.t)
    return c_skip.reshape(-1, 1, 1, 1) * call.x + c_out.reshape(-1, 1, 1, 1) * x0


def test_lcm_step_counts_export_every_count_on_the_training_grid(tiny_adapter, monkeypatch):
    """Every shipped count samples points of recipe.grid; inference_steps stays the export's
    default call when it is one of the counts, else the largest count is."""
    sana = tiny_adapter("sana")
    recipe = build("lcm", "sana", sana, "student.step_counts=[1,2,4]", monkeypatch=monkeypatch)
    for k in recipe.step_counts:
        assert torch.isin(sana.generator_timesteps(k), recipe.grid).all()
    assert recipe.export_steps == 4
    recipe = build("lcm", "sana", sana, "student.step_counts=[1,2]", "recipe.inference_steps=4",
                   monkeypatch=monkeypatch)  # fmt: skip
    assert recipe.step_counts == (1, 2) and recipe.export_steps == 2


def test_step_counts_off_the_grid_are_a_config_error(tiny_adapter, monkeypatch):
    """A family whose k-step points missed the distillation grid would train toward edges the
    export never samples: refused with the field named, not a traceback."""
    from distillkit.errors import ConfigError

    sd15 = tiny_adapter("sd15")
    monkeypatch.setattr(sd15, "generator_timesteps", lambda k: torch.tensor([999.0, 550.0]))
    with pytest.raises(ConfigError, match="student.step_counts: the sd15 export's sampling"):
        build("lcm", "sd15", sd15, "student.step_counts=[1,2]", monkeypatch=monkeypatch)
