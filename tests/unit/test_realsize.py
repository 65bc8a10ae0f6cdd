"""The real-size teacher builder (distillkit/teachers/realsize.py) without real-size memory.

The SD1.5 pipeline is assembled on the meta device and compared with teachers/configs; the save
path (one network at a time, model_index.json from the meta pipeline) runs on a shrunken copy
of the same configs and is reloaded with plain diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, PNDMScheduler, StableDiffusionPipeline

from distillkit.errors import ConfigError
from distillkit.plan_arch import CONFIGS
from distillkit.teachers.realsize import (
    MARKER,
    build_component,
    realsize_pipeline,
    save_realsize_teacher,
)
from distillkit.teachers.tiny import _SD_SCHEDULER

NETWORKS = ("text_encoder", "unet", "vae")


def _same(ours, theirs) -> bool:
    if isinstance(ours, list | tuple) and isinstance(theirs, list | tuple):
        return len(ours) == len(theirs) and all(map(_same, ours, theirs))
    return ours == theirs


def _config_mismatches(module, folder: Path) -> list[str]:
    """Keys of ``folder/config.json`` whose value the built module's config does not hold."""
    want = json.loads((folder / "config.json").read_text())
    have = module.config if hasattr(module.config, "keys") else module.config.to_dict()
    skip = {"_class_name", "architectures"}
    return [k for k, v in want.items() if k not in skip and not _same(have.get(k), v)]


def test_sd15_on_meta_is_the_published_pipeline():
    pipe = realsize_pipeline("sd15")
    assert type(pipe) is StableDiffusionPipeline
    assert {k for k, v in pipe.components.items() if v is not None} == {
        *NETWORKS,
        "tokenizer",
        "scheduler",
    }
    for name in NETWORKS:
        net = getattr(pipe, name)
        assert not _config_mismatches(net, CONFIGS / "sd15" / name), name
        assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in net.parameters())
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
    assert type(pipe.scheduler) is PNDMScheduler
    assert {k: pipe.scheduler.config[k] for k in _SD_SCHEDULER} == _SD_SCHEDULER
    # the small vocabulary indexes the real-size embedding table
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert max(ids) < pipe.text_encoder.config.vocab_size


def _shrunken_configs(root: Path) -> Path:
    """teachers/configs/sd15 with narrow layers: same classes and block layout."""
    small = {
        "unet": {
            "block_out_channels": [32, 32, 64, 64],
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "sample_size": 8,
        },
        "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64},
        "text_encoder": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
        },
    }
    for name, changes in small.items():
        cfg = json.loads((CONFIGS / "sd15" / name / "config.json").read_text())
        (root / "sd15" / name).mkdir(parents=True)
        (root / "sd15" / name / "config.json").write_text(json.dumps({**cfg, **changes}))
    return root


def test_saved_teacher_reloads_with_plain_diffusers(tmp_path):
    configs = _shrunken_configs(tmp_path / "configs")
    out = save_realsize_teacher("sd15", tmp_path / "teacher", configs=configs)
    assert json.loads((out / MARKER).read_text())["family"] == "sd15"
    pipe = DiffusionPipeline.from_pretrained(out, torch_dtype=torch.bfloat16)
    assert type(pipe) is StableDiffusionPipeline
    for name in NETWORKS:
        assert not _config_mismatches(getattr(pipe, name), configs / "sd15" / name), name
    # weights: saved in bf16, seeded (a second build is identical), and random (not constant)
    saved = json.loads((out / "unet" / "config.json").read_text())
    assert saved["_class_name"] == "UNet2DConditionModel"
    twin = build_component(configs / "sd15" / "unet", "unet").state_dict()
    for key, value in pipe.unet.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, twin[key]), key
    assert pipe.unet.conv_in.weight.float().std() > 0
    image = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64).images[0]
    assert image.size == (64, 64)
    # a complete build is reused; a different one in the same place is refused
    assert save_realsize_teacher("sd15", out, configs=configs) == out
    with pytest.raises(ConfigError, match="another build"):
        save_realsize_teacher("sd15", out, seed=1, configs=configs)


def test_unknown_card_is_a_config_error():
    with pytest.raises(ConfigError, match="no teacher card"):
        realsize_pipeline("sd99")
