"""SiD's losses and guidance modes against cases with known answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from distillkit.config import load_config
from distillkit.recipes.base import Batch
from distillkit.recipes.sid import SiD, SiDConfig, sid_generator_loss, sid_weight
from distillkit.teachers.base import Conditioning

REPO = Path(__file__).resolve().parents[2]


def _posterior_mean(x_t, a, s, mean, var):
    """E[x0 | x_t] for x0 ~ N(mean, var I), x_t = a x0 + s eps: the ideal denoiser."""
    return mean + a * var / (a * a * var + s * s) * (x_t - a * mean)


def test_gradient_vanishes_when_fake_and_real_scores_agree():
    """Same score function for teacher and fake: every term of the SiD gradient cancels, even
    though both are differentiated through x_t (unlike DMD, SiD does not stop that gradient)."""
    gen = torch.Generator().manual_seed(0)
    x_g = torch.randn(3, 4, 8, 8, generator=gen, requires_grad=True)
    weights = torch.randn(4, 4, generator=gen)

    def score(x):  # a nonlinear x0 predictor shared by both "networks"
        return torch.tanh(torch.einsum("nchw,cd->ndhw", x, weights))

    eps = torch.randn(x_g.shape, generator=gen)
    for alpha in (1.0, 1.2):
        x_g.grad = None
        x_t = 0.6 * x_g + 0.8 * eps
        loss = sid_generator_loss(x_g, score(x_t), score(x_t), alpha, sid_weight(x_g, score(x_t)))
        loss.backward()
        torch.testing.assert_close(x_g.grad, torch.zeros_like(x_g), atol=1e-9, rtol=0)


def test_loss_is_the_reference_expression():
    """SiD-LSG's training loop: (y_real - y_fake) * ((y_real - x) - alpha (y_real - y_fake)) / w,
    i.e. (1 - alpha) ||f_r - f_f||^2 + (f_r - f_f)(f_f - x); we take the element mean."""
    gen = torch.Generator().manual_seed(1)
    x, real, fake = (torch.randn(2, 4, 4, 4, generator=gen) for _ in range(3))
    w = sid_weight(x, real)
    for alpha in (1.0, 1.2, 0.5):
        ref = (real - fake) * ((real - x) - alpha * (real - fake)) * w
        torch.testing.assert_close(sid_generator_loss(x, real, fake, alpha, w), ref.mean())


def test_sid_weight_is_the_detached_inverse_mean_abs_error():
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    real = torch.randn(3, 2, 4, 4, requires_grad=True)
    w = sid_weight(x, real)
    assert not w.requires_grad and w.shape == (3, 1, 1, 1)
    expected = 1 / (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(w, expected.detach())


def test_gradient_is_the_analytic_one_through_both_networks():
    """Gaussian teacher and fake with equal variance: D = f_r - f_f = (1 - k a)(mu - theta) does
    not depend on x_g, so dL/dx_g = w D (k a - 1) exactly when both denoisers are differentiated
    (stopping either one's gradient changes the answer)."""
    gen = torch.Generator().manual_seed(3)
    n, dim, var, alpha = 16, 4, 0.25, 1.2
    mu, theta = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    a, s = torch.full((n, 1), 0.8), torch.full((n, 1), 0.6)
    x_g = (theta + 0.5 * torch.randn(n, dim, generator=gen)).requires_grad_()
    x_t = a * x_g + s * torch.randn(n, dim, generator=gen)
    real = _posterior_mean(x_t, a, s, mu, var)
    fake = _posterior_mean(x_t, a, s, theta, var)
    w = sid_weight(x_g, real)
    sid_generator_loss(x_g, real, fake, alpha, w).backward()
    k = a * var / (a * a * var + s * s)
    expected = w * (1 - k * a) * (mu - theta) * (k * a - 1) / (n * dim)
    torch.testing.assert_close(x_g.grad, expected.expand(n, dim))


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_gaussian_toy_generator_moves_to_target(alpha):
    """Analytic teacher (target N(mu, 0.25 I)) and fake (the generator's own N(theta, 0.25 I))
    denoisers, both differentiated through x_t: SiD's gradient pulls theta to mu."""
    gen = torch.Generator().manual_seed(0)
    dim, mu, var = 8, torch.linspace(-2, 2, 8), 0.25
    theta = torch.zeros(dim, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.05)
    start = (theta - mu).norm().item()
    for _ in range(300):
        x_g = theta + 0.5 * torch.randn(64, dim, generator=gen)
        abar = torch.rand(64, 1, generator=gen) * 0.9 + 0.05
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x_t = a * x_g + s * torch.randn(64, dim, generator=gen)  # not detached: SiD
        real = _posterior_mean(x_t, a, s, mu, var)
        fake = _posterior_mean(x_t, a, s, theta.detach(), var)  # the fake net's own weights
        loss = sid_generator_loss(x_g, real, fake, alpha, sid_weight(x_g, real))
        opt.zero_grad()
        (loss * dim).backward()
        opt.step()
    assert (theta - mu).norm().item() < 0.1 * start


def test_guidance_modes_resolve_to_the_papers_kappas():
    assert SiDConfig().kappas() == (4.5, 4.5, 4.5)  # LSG: kappa_1 = kappa_2 = kappa_3 = kappa_4
    lsg = SiDConfig(real_guidance_scale=3, fake_guidance_scale=2, fake_train_guidance_scale=1.5)
    assert lsg.kappas() == (1.5, 2.0, 3.0)
    assert SiDConfig(guidance="zero_cfg").kappas() == (None, None, 1.0)  # no text, no CFG
    anti = SiDConfig(guidance="anti_cfg", fake_guidance_scale=-1.0)
    assert anti.kappas() == (1.0, -1.0, 1.0)  # negative CFG in the fake score only
    for bad in (
        {"guidance": "zero_cfg", "real_guidance_scale": 4.5},
        {"guidance": "zero_cfg", "fake_guidance_scale": 0.0},
        {"guidance": "anti_cfg"},
        {"guidance": "anti_cfg", "fake_guidance_scale": -1.0, "real_guidance_scale": 2.0},
        {"fake_guidance_scale": -1.0},
        {"fake_train_guidance_scale": -1.0},
    ):
        with pytest.raises(ValidationError):
            SiDConfig(**bad)


def test_empty_prompt_substitution_is_per_sample_and_structural():
    """The contract method Zero-CFG and prompt dropout use: no key is named by the recipe."""
    cond = {"h": torch.ones(3, 2, 4), "extra": {"ids": torch.ones(3, 5)}, "flag": None}
    uncond = {"h": torch.zeros(3, 2, 4), "extra": {"ids": torch.zeros(3, 5)}, "flag": None}
    c = Conditioning(cond, uncond)
    some = c.with_empty_prompts(torch.tensor([True, False, True]))
    assert some.cond["h"][:, 0, 0].tolist() == [0, 1, 0]
    assert some.cond["extra"]["ids"][:, 0].tolist() == [0, 1, 0]
    assert some.cond["flag"] is None and some.uncond is c.uncond
    every = c.with_empty_prompts()
    assert torch.equal(every.cond["h"], uncond["h"])


def _recipe(tiny_adapter, *overrides: str) -> SiD:
    cfg = load_config(REPO / "recipes/sid_sd15.yaml", list(overrides))
    return SiD(cfg, tiny_adapter("sd15"))


def _batch(seed: int = 0, images: bool = False) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1 if images else None
    caps = ["a cat", "a dog"] if images else None
    return Batch(["a photo of a cat", "a dog"], imgs, caps, gen)


def test_generator_gradient_is_zero_at_init(tiny_adapter):
    """Before the fake score moves it equals the teacher, so (same kappa) the real and fake x0
    predictions agree as functions of x_t and SiD's generator gradient vanishes."""
    recipe = _recipe(tiny_adapter)
    loss, logs = recipe.loss("generator", _batch(), 0)
    loss.backward()
    grads = [p.grad for p in recipe.roles["generator"].parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) < 1e-6
    assert "sid" in logs


@pytest.mark.parametrize(
    "mode",
    [
        {"real_guidance_scale": 3.0, "fake_guidance_scale": 2.0, "fake_train_guidance_scale": 1.5},
        {"guidance": "zero_cfg"},
        {"guidance": "anti_cfg", "fake_guidance_scale": -1.0, "generator_steps": 2},
        {"gan_generator_weight": 0.01, "gan_discriminator_weight": 0.01, "weighting": "alpha"},
    ],
    ids=["lsg_kappas", "zero_cfg", "anti_cfg_2step", "sida"],
)
def test_every_mode_trains_both_roles(tiny_adapter, mode):
    cfg = load_config(REPO / "recipes/sid_sd15.yaml")
    cfg.recipe = SiDConfig(alpha=1.2, **mode)
    recipe = SiD(cfg, tiny_adapter("sd15"))
    gan = cfg.recipe.gan
    for step, role in enumerate(recipe.schedule(0)):
        loss, logs = recipe.loss(role, _batch(step, images=gan), 0)
        assert torch.isfinite(loss)
        loss.backward()
        assert any(p.grad is not None for p in recipe.roles[role].parameters()), role
        assert ("disc" in logs) == (gan and role == "fake_score")
