"""train.optimizer: AdamW by default; 8-bit AdamW refused at start where it cannot run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillkit.config import TrainConfig
from distillkit.engine import optim
from distillkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_adamw_gets_the_run_settings():
    cfg = TrainConfig(adam_beta1=0.8, adam_beta2=0.95, weight_decay=0.1)
    opt = optim.build_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg, lr=1e-4)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.8, 0.95), 0.1)


def test_adamw8bit_without_bitsandbytes_names_the_field(monkeypatch):
    monkeypatch.setattr(optim, "bitsandbytes_importable", lambda: False)
    with pytest.raises(ConfigError, match=r"train\.optimizer=adamw8bit needs bitsandbytes"):
        optim.check_optimizer(TrainConfig(optimizer="adamw8bit"))


def test_adamw8bit_without_cuda_names_the_field(monkeypatch):
    monkeypatch.setattr(optim, "bitsandbytes_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train\.optimizer=adamw8bit needs a CUDA device"):
        optim.build_optimizer(
            [torch.nn.Parameter(torch.zeros(1))], TrainConfig(optimizer="adamw8bit"), 1e-4
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cli_refuses_adamw8bit_before_loading_anything(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "distillkit.cli", "run", "recipes/dmd2_sd15.yaml", "--smoke",
         f"output_dir={out}", "train.optimizer=adamw8bit"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "train.optimizer=adamw8bit" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
