"""Gradient accumulation is invisible: batch 8 x accumulation 1 and batch 1 x accumulation 8 give
the same update (TRL's invariance test), on LCM through the real loop.

Each micro-batch has its own random stream, so the two groupings draw different noise by design
(a resume reproduces its own grouping exactly). Here every draw LCM makes through ``Batch``
(grid index, noise, guidance scale) is keyed by the row's caption instead, so both groupings see
the same rows with the same noise, and what is left to differ is what the loop does with the
micro-batches: loss scaling, accumulation across backward passes, the single optimiser step and
the logged averages. Batched and single-row kernels round differently, so the comparison is at
1e-4 of the gradient's norm (measured: about 1e-6).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from distillkit.recipes.base import Batch

REPO = Path(__file__).resolve().parents[2]


def _row_streams(batch: Batch, n: int) -> list[torch.Generator]:
    """One generator per row, keyed by its text and by how many draws this batch has made."""
    draw = batch.__dict__.get("_draws", 0)
    batch.__dict__["_draws"] = draw + 1
    texts = batch.captions if batch.captions is not None else batch.prompts
    assert len(texts) == n
    return [torch.Generator().manual_seed(zlib.crc32(f"{text}|{draw}".encode())) for text in texts]


def _keyed_randn(self: Batch, shape, device):
    rows = [torch.randn(tuple(shape[1:]), generator=g) for g in _row_streams(self, shape[0])]
    return torch.stack(rows).to(device)


def _keyed_rand(self: Batch, n: int):
    return torch.cat([torch.rand(1, generator=g) for g in _row_streams(self, n)])


def _keyed_randint(self: Batch, high: int, n: int):
    return torch.cat([torch.randint(high, (1,), generator=g) for g in _row_streams(self, n)])


def _first_update(tmp_path: Path, batch: int, accumulation: int, monkeypatch):
    from accelerate import Accelerator

    from distillkit.config import load_config
    from distillkit.engine.loop import Trainer

    out = tmp_path / f"b{batch}x{accumulation}"
    overrides = [
        f"output_dir={out}",
        "logging.progress_bar=false",
        f"train.batch_size={batch}",
        f"train.grad_accumulation={accumulation}",
        "teacher.dtype=fp32",
        "train.mixed_precision=no",
    ]
    cfg = load_config(REPO / "recipes" / "lcm_sd15.yaml", overrides)
    out.mkdir()
    trainer = Trainer(cfg, Accelerator(mixed_precision="no"), smoke=True, builtin_data=True)
    grads: dict[str, torch.Tensor] = {}
    for role, opt in trainer.optimizers.items():
        real_step = opt.step

        def recording_step(*args, _role=role, _real=real_step, **kwargs):
            grads[_role] = torch.cat([p.grad.flatten() for p in trainer.params[_role]]).clone()
            return _real(*args, **kwargs)

        monkeypatch.setattr(opt, "step", recording_step)
    logs = trainer.train_step(0)
    return grads, {k: float(v) for k, v in logs.items() if not k.startswith("_")}


def test_batch_8_equals_batch_1_times_8_micro_batches(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(Batch, "randn", _keyed_randn)
    monkeypatch.setattr(Batch, "rand", _keyed_rand)
    monkeypatch.setattr(Batch, "randint", _keyed_randint)
    whole, whole_logs = _first_update(tmp_path, 8, 1, monkeypatch)
    split, split_logs = _first_update(tmp_path, 1, 8, monkeypatch)
    assert whole.keys() == split.keys() == {"generator"}
    g8, g1 = whole["generator"], split["generator"]
    assert g8.norm() > 0
    assert ((g8 - g1).norm() / g8.norm()).item() < 1e-4
    assert whole_logs.keys() == split_logs.keys()
    for key, value in whole_logs.items():
        tolerance = 1e-4 * max(abs(value), 1e-3)
        assert abs(split_logs[key] - value) < tolerance, (key, value, split_logs[key])
