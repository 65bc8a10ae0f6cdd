"""Score a digits teacher exactly as students are scored, and record it in the results JSON.

Why a separate module: training (teachers.py) must not depend on the judge. Scores come from
``distillkit.evaluation.digits_eval.evaluate_pipeline`` on the saved directory (the benchmark's
own protocol: fixed prompts and seeds, the pipeline's own scheduler), so teacher and student
numbers are comparable.
"""

from __future__ import annotations

import json
from pathlib import Path

from distillkit.benchmark.provenance import git_commit, machine

GUIDANCES = (1.0, 1.5, 2.0, 3.0, 5.0)
FEW_STEPS = (1, 4)
ACCURACY_GOAL = 0.9
METRICS = ("accuracy", "fd", "diversity", "precision", "mean_pairwise_ratio", "n")


def evaluate_teacher(
    path: Path, per_class: int = 100, guidances: tuple[float, ...] = GUIDANCES
) -> dict:
    """Scores at 25 steps for each guidance, then at 1 and 4 steps with the best guidance."""
    import time

    from distillkit.evaluation.digits_eval import evaluate_pipeline, load_judge
    from distillkit.evaluation.generate import load_pipeline

    pipe = load_pipeline(path, device="cpu")
    judge, split = load_judge()
    protocol: dict = {}

    def score(steps: int, guidance: float) -> dict:
        start = time.perf_counter()
        s = evaluate_pipeline(
            pipe, steps=steps, guidance=guidance, judge=judge, split=split, per_class=per_class
        )
        protocol.update({k: v for k, v in s["protocol"].items() if k not in ("steps", "guidance")})
        row = {"steps": steps, "guidance": guidance}
        row |= {k: round(float(s[k]), 4) for k in METRICS}
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        return row

    rows = [score(25, g) for g in guidances]
    best = best_guidance(rows)
    rows += [score(steps, best) for steps in FEW_STEPS]
    return {"best_guidance": best, "scores": rows, "protocol": protocol}


def best_guidance(rows: list[dict], min_accuracy: float = ACCURACY_GOAL) -> float:
    """The most realistic (lowest FD) guidance that meets the accuracy goal, else the most
    accurate: higher guidance keeps buying accuracy long after it starts costing FD/diversity."""
    good = [r for r in rows if r["accuracy"] >= min_accuracy]
    if good:
        return min(good, key=lambda r: r["fd"])["guidance"]
    return max(rows, key=lambda r: (r["accuracy"], -r["fd"]))["guidance"]


def record(results: Path, family: str, entry: dict) -> None:
    """Merge one family's entry into the results JSON; other families' entries are kept."""
    data = json.loads(results.read_text()) if results.is_file() else {}
    data.update(machine=machine(), commit=git_commit())
    data.setdefault("teachers", {})[family] = entry
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(data, indent=2) + "\n")
