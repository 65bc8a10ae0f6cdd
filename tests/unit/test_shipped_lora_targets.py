"""Every LoRA target module a shipped YAML names exists in the published architecture of its
teacher (teachers/configs, built on the meta device: no weights). peft only refuses a target
list that matches nothing, so one misspelt name among fourteen would silently train less."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillkit.config import load_config
from distillkit.plan_arch import build_meta

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def _lora_targets(cfg) -> dict[str, list[str]]:
    """role -> the target modules of each LoRA network the config trains."""
    found = {}
    if cfg.student.type == "lora" or getattr(cfg.recipe, "fake_score", None) == "lora":
        found["student.lora"] = list(cfg.student.lora.target_modules)
    if cfg.recipe.name == "swiftbrush":
        found["recipe.lora_target_modules"] = list(cfg.recipe.lora_target_modules)
    return found


def _matches(names: list[str], target: str) -> int:
    """peft's rule for a string target: the module's name is it, or ends with '.' + it."""
    return sum(name == target or name.endswith("." + target) for name in names)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_lora_targets_exist_in_the_real_architecture(path):
    cfg = load_config(path)
    targets = _lora_targets(cfg)
    if not targets:
        pytest.skip("no LoRA network in this recipe")
    card = Path(cfg.teacher.card).stem
    folder = REPO / "teachers" / "configs" / card
    denoiser = folder / ("unet" if cfg.teacher.family in ("sd15", "sdxl") else "transformer")
    names = [name for name, _ in build_meta(denoiser).named_modules()]
    for field, modules in targets.items():
        missing = [t for t in modules if _matches(names, t) == 0]
        assert not missing, f"{path.name} {field}: {missing} match no module of {card}"


def test_the_rule_sees_a_misspelt_target():
    names = ["down_blocks.0.attn.to_q", "mid_block.resnets.0.conv1"]
    assert _matches(names, "to_q") == 1 and _matches(names, "conv1") == 1
    assert _matches(names, "to_qq") == 0 and _matches(names, "q") == 0


def test_dmd2_sdxl_lora_is_the_reference_run():
    """tianweiy/DMD2's SDXL LoRA run: rank 64, alpha 8 (scale 0.125), attention, feed-forward,
    ResNet convs, samplers and time_emb_proj; a full fake score; lr 5e-5 for both."""
    cfg = load_config(REPO / "recipes" / "dmd2_sdxl_lora.yaml")
    lora = cfg.student.lora
    assert (lora.rank, lora.alpha, cfg.recipe.fake_score) == (64, 8.0, "full")
    assert {"conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
            "time_emb_proj", "to_q", "ff.net.2"} <= set(lora.target_modules)  # fmt: skip
    assert cfg.recipe.lr == {"generator": 5e-5, "fake_score": 5e-5}
