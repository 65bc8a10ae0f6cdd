"""`python evaluation/bench_time_to_goal.py`: when each digits recipe first meets the goal.

Each shipped `recipes/digits/<recipe>_<family>.yaml` runs through the real CLI, one job at a
time, with `logging.eval_every` and 1,000 evaluation samples (100 per digit, as the benchmark
scores, so the FD compares with the teacher's 1,000-sample FD). The first evaluation that meets
the digits goal under both judges gives the step and the wall time since launch, less the time
spent evaluating. Run it alone on the machine: times taken while other jobs share the cores are
unreadable (the result records the load average around every run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench_quality import GOAL, REF_STEPS, goal_verdict, teacher_card

from distillkit.benchmark.provenance import git_commit, machine

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("dmd2", "sid", "swiftbrush", "lcm", "lcm_lora", "apt")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="sd15")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "time_to_goal")
    p.add_argument("--out", type=Path, default=None, help="default: results/time_to_goal_F.json")
    p.add_argument(
        "--fresh", action="store_true", help="drop the out file's rows for other recipes"
    )
    args = p.parse_args(argv)
    args.out = args.out or ROOT / "evaluation" / "results" / f"time_to_goal_{args.family}.json"
    return args


def as_student(row: dict) -> dict:
    """An eval.jsonl row in the shape goal_verdict reads."""
    pixel = {"accuracy": row["px_accuracy"], "fd": row["px_fd"]}
    return {"accuracy": row["accuracy"], "fd": row["fd"], "pixel": pixel}


def first_meeting(rows: list[dict], ref: dict, launched: float) -> dict | None:
    """The first evaluation meeting the goal: its step, its scores, and the wall seconds since
    launch minus every evaluation's own seconds up to and including it."""
    spent = 0.0
    for row in rows:
        spent += row.get("seconds", 0.0)
        if goal_verdict(as_student(row), ref)[0]:
            return {
                **row,
                "eval_seconds": row.get("seconds"),
                "seconds": row["time"] - launched - spent,
            }
    return None


def teacher_reference(family: str, per_class: int) -> dict:
    from distillkit.benchmark.teachers import digits_teacher_dir
    from distillkit.evaluation.digits_eval import evaluate_pipeline, load_judge
    from distillkit.evaluation.generate import load_pipeline
    from distillkit.evaluation.pixel_judge import train_pixel_judge

    judge, split = load_judge()
    guidance = float(teacher_card(family)["default_guidance"])
    pipe = load_pipeline(digits_teacher_dir(family))
    s = evaluate_pipeline(
        pipe,
        steps=REF_STEPS,
        guidance=guidance,
        judge=judge,
        split=split,
        per_class=per_class,
        pixel_judge=train_pixel_judge(split),
    )
    return {"accuracy": s["accuracy"], "fd": s["fd"], "pixel": s["pixel"], "guidance": guidance}


def run_recipe(recipe: str, args, ref: dict) -> dict:
    config = ROOT / "recipes" / "digits" / f"{recipe}_{args.family}.yaml"
    run_dir = args.runs_dir / config.stem
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "distillkit.cli", "run", str(config), f"output_dir={run_dir}"]
    cmd += [f"logging.eval_every={args.eval_every}", f"logging.eval_per_class={args.per_class}"]
    if recipe == "apt":  # APT starts from this bench's DMD2 export (recipe.init_from)
        cmd.append(f"recipe.init_from={args.runs_dir / f'dmd2_{args.family}' / 'pipeline'}")
    print("+ " + " ".join(cmd), flush=True)
    load_before = os.getloadavg()
    launched = time.time()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.time() - launched
    row: dict = {"recipe": recipe, "config": str(config.relative_to(ROOT)), "exit_code": code}
    row["commit"], row["command"] = git_commit(), " ".join(cmd[1:])
    row.update(wall_seconds=wall, load_before=load_before, load_after=os.getloadavg())
    evals_path = run_dir / "eval.jsonl"
    evals = [json.loads(line) for line in evals_path.read_text().splitlines()] if code == 0 else []
    row["eval_seconds"] = sum(r.get("seconds", 0.0) for r in evals)
    row["evaluations"] = evals
    row["sample_steps"] = evals[-1].get("sample_steps") if evals else None
    row["first_meeting"] = first_meeting(evals, ref, launched)
    met = row["first_meeting"]
    print(
        f"[{recipe}] "
        + (f"goal at step {met['step']}, {met['seconds']:.0f} s" if met else "goal not met")
    )
    return row


def kept_rows(args: argparse.Namespace) -> list[dict]:
    """The out file's rows for recipes not rerun now, each keeping the commit it ran at (a
    rerun of one recipe must not erase the others' quiet measurements)."""
    if args.fresh or not args.out.is_file():
        return []
    earlier = json.loads(args.out.read_text())
    if earlier.get("protocol", {}).get("family") != args.family:
        return []
    rows = [r for r in earlier["recipes"] if r["recipe"] not in args.recipes]
    for row in rows:
        row.setdefault("commit", earlier["commit"])
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ref = teacher_reference(args.family, args.per_class)
    print(f"teacher {REF_STEPS} steps: acc {ref['accuracy']:.3f} fd {ref['fd']:.2f}", flush=True)
    results = {
        "machine": machine(),
        "commit": git_commit(),
        "command": "python evaluation/bench_time_to_goal.py " + " ".join(argv or sys.argv[1:]),
        "protocol": {
            "family": args.family,
            "eval_every": args.eval_every,
            "samples_per_evaluation": 10 * args.per_class,
            "goal": GOAL,
            "judges": ["cnn", "pixel"],
            "seconds": "wall time from launch to the first evaluation meeting the goal, minus "
            "the evaluations' own time (teacher load and text encoding included)",
        },
        "teacher": ref,
        "recipes": kept_rows(args),
    }
    for recipe in args.recipes:
        results["recipes"].append(run_recipe(recipe, args, ref))
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
