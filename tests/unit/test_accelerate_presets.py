"""recipes/accelerate/*.yaml: accelerate reads them, and their wrap classes exist in the models.

These presets were never run on GPUs here; this checks what can be checked without them: the
launcher's own config loader and launch-time validation, and that every FSDP wrap class is a
diffusers class present in the real-size denoiser of the family (built on the meta device).
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

from distillkit.plan_arch import CONFIGS, build_meta

PRESETS = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"
FSDP = {
    "fsdp_sdxl.yaml": "sdxl_base/unet",
    "fsdp_sana.yaml": "sana_1600m_1024/transformer",
    "fsdp_sd3.yaml": "sd35_large/transformer",
    "fsdp_flux.yaml": "flux1_dev/transformer",
}
DEEPSPEED = {"deepspeed_zero2.yaml": 2, "deepspeed_zero3.yaml": 3}


def test_the_presets_are_shipped():
    assert {p.name for p in PRESETS.glob("*.yaml")} == set(FSDP) | set(DEEPSPEED)


@pytest.mark.parametrize("name", sorted([*FSDP, *DEEPSPEED]))
def test_accelerate_loads_and_validates_the_preset(name):
    cfg = load_config_from_file(str(PRESETS / name))
    assert cfg.num_processes == 8 and cfg.mixed_precision == "bf16" and not cfg.use_cpu
    args = launch_command_parser().parse_args(
        ["--config_file", str(PRESETS / name), "-m", "distillkit.cli", "run", "x.yaml"]
    )
    args, _, _ = _validate_launch_command(args)  # what `accelerate launch` does first
    assert args.num_processes == 8
    if name in DEEPSPEED:
        assert cfg.distributed_type == DistributedType.DEEPSPEED and args.use_deepspeed
        assert cfg.deepspeed_config["zero_stage"] == DEEPSPEED[name]
    else:
        assert cfg.distributed_type == DistributedType.FSDP and args.use_fsdp


@pytest.mark.parametrize("name", sorted(FSDP))
def test_fsdp_wrap_classes_exist_in_the_family_denoiser(name):
    fsdp = load_config_from_file(str(PRESETS / name)).fsdp_config
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    classes = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
    net = build_meta(CONFIGS / FSDP[name])
    present = {type(m).__name__ for m in net.modules()}
    for cls in classes:
        assert cls in present, f"{cls} not in {type(net).__name__}"
        found = [m for m in net.modules() if type(m).__name__ == cls]
        assert type(found[0]).__module__.startswith("diffusers.")
    assert hasattr(diffusers, type(net).__name__)
