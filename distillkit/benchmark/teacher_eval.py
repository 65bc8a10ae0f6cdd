"""Score a digits teacher the way students will be scored: judge accuracy and FD per setting.

Why a separate module: training (teachers.py) must not depend on the judge, and the protocol
here (fixed prompts, one seed per sample, the pipeline's own scheduler) is what the results
JSON records, so it lives in one place.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from distillkit.data.digits import eval_prompts, load_digits_split
from distillkit.evaluation.judge import load_or_train_judge
from distillkit.evaluation.metrics import digits_scores
from distillkit.registry import get_family
from distillkit.teachers.base import TeacherAdapter
from distillkit.teachers.load import cache_root

RESOLUTION = 32
GUIDANCES = (1.0, 2.0, 3.0, 5.0)
PROTOCOL = (
    "eval_prompts(per_class) (classes interleaved, templates cycling); sample i uses "
    "torch.Generator().manual_seed(seed + i); the saved pipeline's own scheduler at 32 px; "
    "digits_scores against the held-out split with the cached digit judge (seed 0)"
)


@torch.no_grad()
def sample_digits(
    adapter: TeacherAdapter, steps: int, guidance: float, per_class: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Images in [-1, 1] for ``eval_prompts(per_class)`` and their labels."""
    prompts = eval_prompts(per_class)
    extra = {"height": RESOLUTION, "width": RESOLUTION, **adapter.pipeline_call_kwargs()}
    images = []
    for start in range(0, len(prompts), 200):
        chunk = prompts[start : start + 200]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = adapter.pipe(
            [p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
            generator=gens, output_type="pt", **extra,
        ).images  # fmt: skip
        images.append(out.float() * 2 - 1)
    return torch.cat(images), torch.tensor([y for _, y in prompts])


def evaluate_teacher(
    path: Path, family: str, per_class: int = 100, guidances: tuple[float, ...] = GUIDANCES
) -> dict:
    """Scores at 25 steps per guidance, then 1 and 4 steps at the best guidance."""
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    adapter = get_family(family)(pipe, RESOLUTION, torch.device("cpu"))
    split = load_digits_split()
    judge = load_or_train_judge(cache_root() / "judge")

    def score(steps: int, guidance: float) -> dict:
        start = time.perf_counter()
        images, labels = sample_digits(adapter, steps, guidance, per_class)
        s = digits_scores(images, labels, judge, split.heldout_images)
        row = {"steps": steps, "guidance": guidance, **{k: round(v, 4) for k, v in s.items()}}
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        return row

    rows = [score(25, g) for g in guidances]
    best = max(rows, key=lambda r: (r["accuracy"], -r["fd"]))["guidance"]
    rows += [score(steps, best) for steps in (1, 4)]
    return {"best_guidance": best, "scores": rows}


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.machine()}, {cores} CPU cores (shared with other jobs), no GPU"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(results: Path, family: str, entry: dict) -> None:
    """Merge one family's entry into the results JSON (other families are kept)."""
    data = json.loads(results.read_text()) if results.is_file() else {}
    data.update(machine=machine(), commit=git_commit(), protocol=PROTOCOL)
    data.setdefault("teachers", {})[family] = entry
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(data, indent=2) + "\n")
