"""SwiftBrush's VSD losses against cases with known answers."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from distillkit.config import load_config
from distillkit.recipes.base import Batch
from distillkit.recipes.swiftbrush import (
    SwiftBrush,
    lora_denoising_loss,
    vsd_grad,
    vsd_loss,
    vsd_weight,
)
from distillkit.students import is_lora

REPO = Path(__file__).resolve().parents[2]


def _posterior_mean(x_t, a, s, mean, var):
    return mean + a * var / (a * a * var + s * s) * (x_t - a * mean)


def test_gradient_vanishes_when_lora_equals_teacher():
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    eps = torch.randn(2, 4, 8, 8)
    vsd_loss(x0, eps, eps.clone(), vsd_weight(torch.rand(2), x0)).backward()
    assert torch.count_nonzero(x0.grad) == 0


def test_direction_is_the_weighted_score_difference():
    """d loss / d x0 = sigma_t^2 (eps_teacher - eps_lora) / numel (the reference's
    score_gradient), and descent follows the score difference s_teacher - s_lora."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 4, 4, generator=gen, requires_grad=True)
    eps_real, eps_fake = (
        torch.randn(3, 4, 4, 4, generator=gen),
        torch.randn(3, 4, 4, 4, generator=gen),
    )
    sigma = torch.tensor([0.2, 0.7, 0.99])
    w = vsd_weight(sigma, x0)
    vsd_loss(x0, eps_real, eps_fake, w).backward()
    expected = sigma.square().view(3, 1, 1, 1) * (eps_real - eps_fake) / x0.numel()
    torch.testing.assert_close(x0.grad, expected)
    torch.testing.assert_close(vsd_grad(eps_real, eps_fake, w), expected * x0.numel())
    score_diff = -(eps_real - eps_fake) / sigma.view(3, 1, 1, 1)  # s = -eps / sigma
    assert torch.sum(-x0.grad * score_diff) > 0


def test_lora_loss_is_the_reference_alpha_weighted_epsilon_loss():
    gen = torch.Generator().manual_seed(1)
    pred, eps = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    alpha = torch.tensor([0.3, 0.9])
    a = alpha.view(2, 1, 1, 1)
    torch.testing.assert_close(lora_denoising_loss(pred, eps, alpha), F.mse_loss(a * pred, a * eps))


def test_gaussian_toy_generator_moves_to_target():
    """Analytic eps predictions of the teacher (target N(mu, 0.25 I)) and of a perfect LoRA score
    (the generator's N(theta, 0.25 I)): VSD descent pulls theta to mu."""
    gen = torch.Generator().manual_seed(0)
    dim, mu, var = 8, torch.linspace(-2, 2, 8), 0.25
    theta = torch.zeros(dim, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.05)
    start = (theta - mu).norm().item()
    for _ in range(300):
        x0 = theta + 0.5 * torch.randn(64, dim, generator=gen)
        abar = torch.rand(64, 1, generator=gen) * 0.9 + 0.05
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x_t = a * x0.detach() + s * torch.randn(64, dim, generator=gen)
        eps_real = (x_t - a * _posterior_mean(x_t, a, s, mu, var)) / s
        eps_fake = (x_t - a * _posterior_mean(x_t, a, s, theta.detach(), var)) / s
        opt.zero_grad()
        (vsd_loss(x0, eps_real, eps_fake, vsd_weight(s.squeeze(1), x0)) * dim).backward()
        opt.step()
    assert (theta - mu).norm().item() < 0.1 * start


def _batch(seed: int = 0) -> Batch:
    return Batch(["a photo of a cat", "a dog"], None, None, torch.Generator().manual_seed(seed))


def test_recipe_fake_score_is_a_lora_on_the_teacher_and_starts_equal(tiny_adapter):
    """The fake score is teacher + LoRA (rank from the config); LoRA starts at zero, so the
    first VSD gradient vanishes, and the LoRA's own loss trains only its adapter weights."""
    cfg = load_config(REPO / "recipes/swiftbrush_sd15.yaml", ["recipe.lora_rank=4"])
    recipe = SwiftBrush(cfg, tiny_adapter("sd15"))
    fake = recipe.roles["fake_score"]
    assert is_lora(fake) and fake.peft_config["default"].r == 4
    trainable = [n for n, p in fake.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = _batch()
    loss, logs = recipe.loss("generator", batch, 0)
    loss.backward()
    grads = [p.grad for p in recipe.roles["generator"].parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) == 0.0
    loss, logs = recipe.loss("fake_score", batch, 0)  # reuses the generator's samples
    loss.backward()
    assert torch.isfinite(loss) and "denoise" in logs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
