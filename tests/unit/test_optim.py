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
         "--builtin-data", f"output_dir={out}", "train.optimizer=adamw8bit"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "train.optimizer=adamw8bit" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and a norm under the limit
def test_clip_folded_into_fused_adamw_equals_clip_then_step(max_norm):
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (7, 3, 3)]
    folded = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in folded]
    opts = [torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True) for ps in (folded, plain)]
    for _ in range(3):
        grads = [torch.randn(s) * 3 for s in shapes]
        for p, q, g in zip(folded, plain, grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = torch.nn.utils.get_total_norm([p.grad for p in folded])
        opts[0].grad_scale = optim.clip_divisor(norm, max_norm)
        opts[0].step()
        opts[0].grad_scale = None
        assert torch.nn.utils.clip_grad_norm_(plain, max_norm) == norm
        opts[1].step()
        for p, q in zip(folded, plain):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert (norm > max_norm) == (max_norm == 0.5)  # both branches of the clip were exercised


def test_trainer_folds_the_clip_and_trains_the_same_weights(tmp_path, monkeypatch):
    """A smoke DMD2 run with the clip folded into the step, and one with torch's clip, end on the
    same weights (max_grad_norm small enough that every update is clipped). An fp32 teacher:
    through --smoke's bf16 one, a 1e-8 rounding difference in the first update flips bf16
    roundings of the teacher's input, and Adam turns the changed tiny gradients into whole
    lr-sized steps (measured: 1.4e-5 apart after two steps with one thread, equal with two)."""
    from accelerate import Accelerator

    from distillkit.config import load_config
    from distillkit.engine import loop

    def run(fold: bool, name: str) -> dict[str, torch.Tensor]:
        seen = []
        monkeypatch.setattr(loop, "folds_clipping", lambda acc, opt: seen.append(fold) or fold)
        cfg = load_config(
            REPO / "recipes" / "dmd2_sd15.yaml",
            [f"output_dir={tmp_path / name}", "logging.progress_bar=false",
             "train.max_grad_norm=1e-3", "recipe.fake_updates_per_generator=1",
             "teacher.dtype=fp32"],
        )  # fmt: skip
        (tmp_path / name).mkdir()
        trainer = loop.Trainer(
            cfg, Accelerator(mixed_precision="no"), smoke=True, builtin_data=True
        )
        before = [p.detach().clone() for p in trainer.params["generator"]]
        norms = [trainer.train_step(step)["generator/grad_norm"] for step in range(3)]
        assert seen and all(n > 1e-3 for n in norms)  # clipped at every update
        assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params["generator"]))
        return {role: [p.detach().clone() for p in ps] for role, ps in trainer.params.items()}

    folded, clipped = run(True, "folded"), run(False, "clipped")
    for role in clipped:
        for p, q in zip(folded[role], clipped[role]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_fold_only_where_accelerate_would_clip_whole_local_gradients():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
    for kind, expected in [
        (DistributedType.NO, True),
        (DistributedType.MULTI_CPU, True),
        (DistributedType.MULTI_GPU, True),
        (DistributedType.FSDP, False),
        (DistributedType.DEEPSPEED, False),
    ]:
        assert optim.folds_clipping(SimpleNamespace(distributed_type=kind), opt) is expected
    unfused = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], foreach=True)
    assert not optim.folds_clipping(SimpleNamespace(distributed_type=DistributedType.NO), unfused)
