"""APT's pieces against known answers: the approximated R1 against autograd's R1, the
non-saturating losses, the multi-depth discriminator and loading another run's export."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distillkit.errors import ConfigError
from distillkit.recipes.apt import (
    approximated_r1,
    discriminate,
    load_exported_denoiser,
    pick_depths,
    r1_penalty,
)
from distillkit.recipes.gan import TappedBackbone, gan_discriminator_loss, gan_generator_loss
from distillkit.teachers.load import SMOKE_RESOLUTION, tiny_teacher_dir


def _smooth_discriminator(dim: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


def test_approximated_r1_tracks_autograd_r1():
    """E ||D(x + sigma n) - D(x)||^2 = sigma^2 E ||grad_x D||^2 + O(sigma^4) (the linear term of
    D's Taylor expansion; E[(n . g)^2] = ||g||^2, odd moments vanish). With sigma = 0.01 (APT)
    and 512 noise draws for each of 32 points the Monte Carlo error is ~sqrt(2 / 16384) = 1.1%,
    the bias ~1e-4: we ask for 5%. Its gradient w.r.t. D's weights (what training uses) points
    the same way as the exact penalty's (cosine > 0.99)."""
    d, sigma = _smooth_discriminator(), 0.01
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=gen).requires_grad_(True)
    exact = sigma**2 * r1_penalty(d(x).squeeze(1), x)
    (g_exact,) = torch.autograd.grad(exact, d[0].weight)

    draws = 512
    xs = x.detach().repeat(draws, 1)
    noise = torch.randn(xs.shape, generator=gen)
    approx = approximated_r1(d(xs).squeeze(1), d(xs + sigma * noise).squeeze(1))
    (g_approx,) = torch.autograd.grad(approx, d[0].weight)

    assert approx.item() == pytest.approx(exact.item(), rel=0.05)
    cosine = torch.nn.functional.cosine_similarity(g_exact.flatten(), g_approx.flatten(), dim=0)
    assert cosine > 0.99


def test_approximated_r1_is_zero_for_a_constant_discriminator():
    logits = torch.full((4,), 1.5)
    assert approximated_r1(logits, logits.clone()).item() == 0.0


def test_non_saturating_losses_known_values():
    log3 = torch.full((3,), math.log(3.0))
    # softplus(-log 3) = log(1 + 1/3)
    assert gan_generator_loss(log3).item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    assert gan_discriminator_loss(log3, -log3).item() == pytest.approx(2 * math.log(4 / 3), 1e-6)
    assert gan_discriminator_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(
        2 * math.log(2), rel=1e-6
    )
    # non-saturating: a confidently rejected sample still gets a unit gradient (the minimax
    # log(1 - sigmoid(l)) would give ~e^-20 here)
    fake = torch.tensor([-20.0], requires_grad=True)
    gan_generator_loss(fake).backward()
    assert fake.grad.item() == pytest.approx(-1.0, abs=1e-6)


def test_pick_depths():
    paper = [16 / 36, 26 / 36, 1.0]
    assert pick_depths(36, paper) == [15, 25, 35]  # APT's layers 16, 26, 36 (1-based)
    assert pick_depths(20, paper) == [8, 14, 19]  # SANA 1.6B: 20 blocks
    assert pick_depths(9, paper) == [3, 6, 8]  # SD1.5 UNet: 4 down, mid, 4 up
    assert pick_depths(1, paper) == [0]


@pytest.mark.parametrize("family", ["sd15", "sana"])
def test_discriminator_reads_several_depths(tiny_adapter, family):
    adapter = tiny_adapter(family)
    net = adapter.fresh_copy_of_denoiser()
    blocks = adapter.feature_blocks(net)
    taps = [blocks[i] for i in pick_depths(len(blocks), [0.5, 1.0])]
    disc = TappedBackbone(net, taps, adapter.features_to_map, width=32)
    cond = adapter.encode(["a cat", "a dog"])
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500.0)
    logits = discriminate(adapter, disc, x, t, cond.cond)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert len(disc.heads) == len(taps) >= 1
    assert not disc.capturing and disc.logits is None  # nothing kept between calls


def test_init_from_loads_an_exported_denoiser(tiny_adapter):
    adapter = tiny_adapter("sd15")
    net = load_exported_denoiser(str(tiny_teacher_dir("sd15", SMOKE_RESOLUTION)), adapter)
    for (name, got), want in zip(net.state_dict().items(), adapter.denoiser.state_dict().values()):
        assert torch.equal(got, want), name


def test_init_from_rejects_other_architectures(tiny_adapter, tmp_path):
    adapter = tiny_adapter("sd15")
    with pytest.raises(ConfigError, match="does not fit the teacher's UNet2DConditionModel"):
        load_exported_denoiser(str(tiny_teacher_dir("sdxl", SMOKE_RESOLUTION)), adapter)
    with pytest.raises(ConfigError, match="not a diffusers pipeline directory with a unet/"):
        load_exported_denoiser(str(tiny_teacher_dir("sana", SMOKE_RESOLUTION)), adapter)
    with pytest.raises(ConfigError, match="not a diffusers pipeline directory"):
        load_exported_denoiser(str(tmp_path), adapter)
