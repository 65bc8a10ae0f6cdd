"""`distillkit plan` on the shipped recipes (SD1.5 to FLUX.1-dev): rows, totals, levers.

The architectures come from teachers/configs on the meta device: no weights are downloaded.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from distillkit.cli.plan import add_parser as add_plan_parser
from distillkit.config import load_config
from distillkit.plan import GIB, plan_memory
from distillkit.plan_arch import CONFIGS, count_params

REPO = Path(__file__).resolve().parents[2]


def run_plan(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("sd15/unet", 859_520_964),
        ("sdxl_base/unet", 2_567_463_684),
        # SD3.5 Medium's 2.47B counts its 226M-value position table, a buffer
        ("sd35_medium/transformer", 2_243_171_520),
        ("sd35_large/transformer", 8_056_627_520),
        ("flux1_dev/transformer", 11_901_408_320),
        # T5-XXL encoder: shared and embed_tokens are one tied table, counted once
        ("sd35_medium/text_encoder_3", 4_762_310_656),
    ],
)
def test_shipped_configs_have_the_published_parameter_counts(folder, expected):
    assert count_params(CONFIGS / folder) == expected


def test_sana_transformer_is_1_6b():
    assert 1.55e9 < count_params(CONFIGS / "sana_1600m_1024" / "transformer") < 1.65e9


@pytest.mark.parametrize(
    ("recipe", "teacher_gib", "low", "high"),
    [("dmd2_sd15", 1.99, 30, 200), ("dmd2_sdxl", 6.46, 70, 200), ("dmd2_sana", 8.44, 40, 150),
     ("dmd2_flux", 31.42, 200, 600)],
)  # fmt: skip
def test_plan_table_for_shipped_recipes(capsys, recipe, teacher_gib, low, high):
    assert run_plan(f"recipes/{recipe}.yaml", "--gpu-memory", "80GB") == 0
    out = capsys.readouterr().out
    for row in ("teacher, frozen", "generator weights", "fake_score weights", "gradients",
                "optimizer states", "activations", "peak per device"):  # fmt: skip
        assert row in out, f"{row!r} missing:\n{out}"
    teacher = float(re.search(r"teacher, frozen.*?([\d.]+)\n", out).group(1))
    assert teacher == pytest.approx(teacher_gib, abs=0.02)
    total = float(re.search(r"peak per device\s+([\d.]+)", out).group(1))
    assert low < total < high
    assert "adapter-shared base" in out and "FSDP over 8 GPUs" in out


def test_levers_reduce_memory_in_the_expected_directions():
    cfg = load_config(REPO / "recipes" / "dmd2_sdxl.yaml")
    base = plan_memory(cfg).total
    fsdp = plan_memory(cfg, sharding="fsdp", gpus=8).total
    lora = load_config(REPO / "recipes" / "dmd2_sdxl.yaml", ["student.type=lora"])
    shared = load_config(
        REPO / "recipes" / "dmd2_sdxl.yaml",
        ["student.type=lora", "recipe.fake_score=lora", "student.shared_base=true"],
    )
    adam8 = load_config(REPO / "recipes" / "dmd2_sdxl.yaml", ["train.optimizer=adamw8bit"])
    assert fsdp < base and plan_memory(lora).total < base
    assert plan_memory(shared).total < plan_memory(lora).total
    # 8-bit moments: 6 bytes less per trained parameter (two full UNets here)
    saved = base - plan_memory(adam8).total
    assert saved == pytest.approx(6 * 2 * 2_567_463_684 / GIB * GIB, rel=0.01)


def test_encoding_cache_takes_the_text_encoders_off_the_gpu():
    plain = load_config(REPO / "recipes" / "dmd2_sdxl.yaml")
    cached = load_config(REPO / "recipes" / "dmd2_sdxl.yaml", ["data.cache_dir=/tmp/enc"])
    text = sum(count_params(CONFIGS / "sdxl_base" / f) for f in ("text_encoder", "text_encoder_2"))
    saved = plan_memory(plain).total - plan_memory(cached).total
    assert saved == pytest.approx(text * 2, rel=1e-6)  # bf16 teacher weights on a GPU
    assert plan_memory(cached, device="cpu").total == plan_memory(plain, device="cpu").total


def test_lcm_lora_on_the_shared_base_counts_one_copy_of_the_unet():
    """recipes/lcm_lora_sdxl.yaml (student.shared_base): the run holds the teacher's UNet once,
    the adapter and no target copy; without the shared base, a bf16 copy of the base more."""
    path = REPO / "recipes" / "lcm_lora_sdxl.yaml"
    cfg = load_config(path)
    assert cfg.student.shared_base

    def generator_bytes(rows) -> float:
        return next(v for k, v in rows if k.startswith("generator weights"))

    shared = plan_memory(cfg).rows
    separate = plan_memory(load_config(path, ["student.shared_base=false"])).rows
    assert not any("target" in k for k, _ in shared)
    unet = count_params(CONFIGS / "sdxl_base" / "unet")
    assert generator_bytes(separate) - generator_bytes(shared) == pytest.approx(2 * unet)
