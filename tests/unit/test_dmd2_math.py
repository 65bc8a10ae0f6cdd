"""DMD2's losses against cases with known answers."""

from __future__ import annotations

import math

import torch

from distillkit.recipes.dmd2 import distribution_matching_grad, distribution_matching_loss
from distillkit.recipes.gan import gan_discriminator_loss, gan_generator_loss


def test_gradient_vanishes_when_fake_equals_real():
    x0 = torch.randn(4, 4, 8, 8, requires_grad=True)
    score_x0 = torch.randn(4, 4, 8, 8)
    loss = distribution_matching_loss(x0, score_x0, score_x0.clone())
    loss.backward()
    assert torch.count_nonzero(x0.grad) == 0


def test_gradient_is_the_normalised_score_difference():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=gen, requires_grad=True)
    real, fake = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    distribution_matching_loss(x0, real, fake).backward()
    norm = (x0.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - real) / norm / x0.numel()
    torch.testing.assert_close(x0.grad, expected)
    # descent moves samples from the fake prediction toward the real one
    step = -x0.grad
    assert torch.sum(step * (real - fake)) > 0


def _posterior_mean(x_t, a, s, mean, var):
    """E[x0 | x_t] for x0 ~ N(mean, var I), x_t = a x0 + s eps: the ideal denoiser."""
    return mean + a * var / (a * a * var + s * s) * (x_t - a * mean)


def test_gaussian_toy_generator_moves_to_target():
    """With analytic real/fake denoisers, DM gradient descent pulls the generator's mean to the
    target's mean (the generator is x0 = theta + 0.5 z; the target is N(mu, 0.25 I))."""
    gen = torch.Generator().manual_seed(0)
    dim, mu, var = 8, torch.linspace(-2, 2, 8), 0.25
    theta = torch.zeros(dim, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.05)
    start = (theta - mu).norm().item()
    for _ in range(300):
        z = torch.randn(64, dim, generator=gen)
        x0 = theta + 0.5 * z
        abar = torch.rand(64, 1, generator=gen) * 0.9 + 0.05
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x_t = a * x0.detach() + s * torch.randn(64, dim, generator=gen)
        real = _posterior_mean(x_t, a, s, mu, var)
        fake = _posterior_mean(x_t, a, s, theta.detach(), var)
        opt.zero_grad()
        (distribution_matching_loss(x0, real, fake) * dim).backward()  # mean over the batch
        opt.step()
    assert (theta - mu).norm().item() < 0.1 * start


def test_gan_losses_known_values():
    zeros = torch.zeros(5)
    assert math.isclose(gan_generator_loss(zeros).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(gan_discriminator_loss(zeros, zeros).item(), 2 * math.log(2), rel_tol=1e-6)
    confident = gan_discriminator_loss(torch.full((5,), 20.0), torch.full((5,), -20.0))
    assert confident.item() < 1e-6


def test_grad_is_finite_for_degenerate_inputs():
    x0 = torch.zeros(2, 4)
    grad = distribution_matching_grad(x0, x0, torch.full((2, 4), float("nan")))
    assert torch.isfinite(grad).all()
