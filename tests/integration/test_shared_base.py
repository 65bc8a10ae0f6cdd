"""Adapter-shared base: generator and fake score as LoRA adapters on the teacher's own
denoiser give the same losses and updates as separate copies, with one copy of the base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
ARGS = [
    "recipes/dmd2_sdxl_lora.yaml",
    "--smoke",
    "--builtin-data",
    "recipe.fake_score=lora",
    "train.max_steps=3",
    "recipe.fake_updates_per_generator=2",
    "train.mixed_precision=no",
    "teacher.dtype=fp32",  # the modes must agree to float32 rounding; bf16 runs: test_shipped_*
]


def _run(out: Path, shared: bool) -> None:
    cmd = [sys.executable, "-m", "distillkit.cli", "run", *ARGS, f"output_dir={out}"]
    cmd.append(f"student.shared_base={str(shared).lower()}")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(out: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.endswith(("/loss", "/dm", "/denoise"))} for r in rows]


def _lora(path: Path) -> dict[str, torch.Tensor]:
    """Tensors keyed by module path, whichever mode (separate copy or adapter view) wrote them."""
    out = {}
    for key, value in load_file(str(path)).items():
        key = key.replace("net.", "", 1) if key.startswith("net.") else key
        for view in ("lora.", "net.lora."):
            if key.startswith(view):
                key = key[len(view) :].replace("__", ".")
        for adapter in (".default.", ".generator.", ".fake_score."):
            key = key.replace(adapter, ".")
        out[key] = value
    return out


def test_shared_base_matches_separate_copies(tmp_path):
    _run(tmp_path / "separate", shared=False)
    _run(tmp_path / "shared", shared=True)
    separate, shared = _losses(tmp_path / "separate"), _losses(tmp_path / "shared")
    assert len(separate) == len(shared) == 3
    for a, b in zip(separate, shared):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), key
    for role in ("generator", "fake_score"):
        name = f"checkpoints/step-0000003/{role}.safetensors"
        a, b = _lora(tmp_path / "separate" / name), _lora(tmp_path / "shared" / name)
        assert a.keys() == b.keys() and len(a) > 10
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    # the shared run's export is a plain pipeline with only the generator merged in
    lora = tmp_path / "shared" / "lora" / "pytorch_lora_weights.safetensors"
    assert all("fake_score" not in k for k in load_file(str(lora)))
    report = json.loads((tmp_path / "shared" / "export.json").read_text())
    assert report["pipeline_max_abs_diff"] <= 1e-4 and report["lora_max_abs_diff"] <= 1e-4
