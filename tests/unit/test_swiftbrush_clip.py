"""SwiftBrush v2's clamped CLIP loss: the pure loss against known answers, the config rules, and
the recipe's generator loss with a random-weight open_clip model loaded from a file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distillkit.config import load_config
from distillkit.errors import ConfigError
from distillkit.recipes.base import Batch
from distillkit.recipes.clip_loss import clamped_clip_loss
from distillkit.recipes.swiftbrush import SwiftBrush

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "recipes/swiftbrush_sd15.yaml"
CLIP_MODEL = "ViT-S-32-alt"  # what the clip_weights fixture (conftest.py) builds


def _pair(cos: float, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors with cosine ``cos`` (image scaled by 3: the loss must not care)."""
    text = torch.zeros(1, dim)
    text[0, 0] = 1.0
    image = torch.zeros(1, dim)
    image[0, 0], image[0, 1] = cos, (1 - cos**2) ** 0.5
    return 3 * image, text


# ----------------------------------------------------------------------------- pure loss


@pytest.mark.parametrize("cos", [-0.5, 0.0, 0.2, 0.34])
def test_below_the_clamp_it_is_one_minus_cosine(cos):
    image, text = _pair(cos)
    torch.testing.assert_close(clamped_clip_loss(image, text, 0.35), torch.tensor(1.0 - cos))


@pytest.mark.parametrize("cos", [0.36, 0.6, 0.99])
def test_above_the_clamp_the_gradient_is_zero(cos):
    image, text = _pair(cos)
    image.requires_grad_(True)
    loss = clamped_clip_loss(image, text, 0.35)
    loss.backward()
    torch.testing.assert_close(loss.detach(), torch.tensor(0.65))
    assert torch.count_nonzero(image.grad) == 0


def test_descent_raises_the_cosine_and_stops_at_the_clamp():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(4, 16, generator=gen, requires_grad=True)
    text = torch.randn(4, 16, generator=gen)
    start = torch.cosine_similarity(image, text, dim=-1).detach()
    loss = clamped_clip_loss(image, text, 0.9)
    loss.backward()
    stepped = image.detach() - 0.05 * image.grad
    after = torch.cosine_similarity(stepped, text, dim=-1)
    assert torch.all(after > start)
    opt = torch.optim.SGD([image], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        clamped_clip_loss(image, text, 0.5).backward()
        opt.step()
    final = torch.cosine_similarity(image, text, dim=-1).detach()
    assert torch.all(final >= 0.5) and torch.all(final < 0.6)  # pushed to the clamp, no further


def test_mixed_batch_averages_and_only_unaligned_pairs_get_gradient():
    low, text_low = _pair(0.1)
    high, text_high = _pair(0.8)
    image = torch.cat([low, high]).requires_grad_(True)
    loss = clamped_clip_loss(image, torch.cat([text_low, text_high]), 0.35)
    loss.backward()
    torch.testing.assert_close(loss.detach(), torch.tensor((0.9 + 0.65) / 2))
    assert image.grad[0].abs().sum() > 0 and torch.count_nonzero(image.grad[1]) == 0


# ----------------------------------------------------------------------------- config


def test_off_by_default():
    cfg = load_config(CONFIG).recipe
    assert cfg.clip_model is None and not cfg.use_clip


def test_weight_without_a_model_is_a_config_error():
    with pytest.raises(ConfigError, match="recipe.clip_model"):
        load_config(CONFIG, ["recipe.clip_weight=0.1"])


def test_missing_weight_file_names_the_field(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match=r"recipe\.clip_weights: .*nope\.safetensors"):
        load_config(CONFIG, [f"recipe.clip_model={CLIP_MODEL}", f"recipe.clip_weights={missing}"])
    with pytest.raises(ConfigError, match=r"recipe\.clip_weights"):
        load_config(CONFIG, [f"recipe.clip_model={CLIP_MODEL}"])


def test_unknown_architecture_names_the_field(tiny_adapter, clip_weights):
    cfg = load_config(
        CONFIG,
        ["recipe.lora_rank=4", "recipe.clip_model=ViT-Nope", f"recipe.clip_weights={clip_weights}"],
    )
    with pytest.raises(ConfigError, match=r"recipe\.clip_model: 'ViT-Nope'"):
        SwiftBrush(cfg, tiny_adapter("sd15"))


# ----------------------------------------------------------------------------- recipe


def _generator_loss(adapter, overrides: list[str]):
    torch.manual_seed(0)
    recipe = SwiftBrush(load_config(CONFIG, ["recipe.lora_rank=4", *overrides]), adapter)
    batch = Batch(["a photo of a cat", "a dog"], None, None, torch.Generator().manual_seed(3))
    loss, logs = recipe.loss("generator", batch, 0)
    loss.backward()
    grads = [p.grad for p in recipe.roles["generator"].parameters() if p.grad is not None]
    return recipe, loss.detach(), logs, grads


def test_generator_loss_adds_the_weighted_clip_term_and_its_gradient(tiny_adapter, clip_weights):
    """The LoRA starts at zero, so the VSD gradient vanishes at step 0: any generator gradient
    there comes from the CLIP term, through the frozen VAE decoder."""
    adapter = tiny_adapter("sd15")
    clip = [f"recipe.clip_model={CLIP_MODEL}", f"recipe.clip_weights={clip_weights}"]
    recipe, loss, logs, grads = _generator_loss(adapter, [*clip, "recipe.clip_weight=0.5"])
    assert recipe.clip is not None and "clip" in logs
    assert 0.0 < logs["clip"] <= 2.0
    torch.testing.assert_close(loss, logs["vsd"] + 0.5 * logs["clip"])
    assert grads and max(g.abs().max().item() for g in grads) > 0
    assert not any(p.requires_grad for p in recipe.clip.model.parameters())
    assert not any(p.requires_grad for p in adapter.pipe.vae.parameters())
    assert all(p.grad is None for p in adapter.pipe.vae.parameters())

    off, loss_off, logs_off, grads_off = _generator_loss(adapter, [*clip, "recipe.clip_weight=0"])
    assert off.clip is None and "clip" not in logs_off
    torch.testing.assert_close(logs_off["vsd"], logs["vsd"])
    assert loss_off != loss
    assert max(g.abs().max().item() for g in grads_off) == 0.0

    # clamped below every sample's cosine: the term is constant and adds no gradient
    _, _, logs_c, grads_c = _generator_loss(
        adapter, [*clip, "recipe.clip_weight=0.5", "recipe.clip_clamp=-0.99"]
    )
    torch.testing.assert_close(logs_c["clip"], torch.tensor(1.99))
    assert max(g.abs().max().item() for g in grads_c) == 0.0
