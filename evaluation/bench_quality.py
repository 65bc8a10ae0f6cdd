"""`make bench-quality`: every digits recipe x family, scored against its teacher.

For each family: score the digits teacher at 1/2/4/25 steps (card guidance) plus a guidance
sweep at 25 steps, train each `recipes/digits/<recipe>_<family>.yaml` with the real CLI, score
its exported `pipeline/` (1 step, and its few-step setting), then write
`results/digits.json`, `results/digits.md` (with the goal verdict) and sample grids.

Everything is scored from exported pipeline directories only, with the fixed digits protocol.
`--quick` swaps in tiny random teachers and `--smoke` training so the harness itself is testable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from distillkit.benchmark.provenance import git_commit, machine

# On a busy CPU, OpenMP's default spin-waiting threads made small convs ~80x slower here
# (24 ms vs 0.3 ms); passive waiting costs little when idle. Set before torch loads; the
# training subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("sd15", "sdxl", "sana", "sd3", "flux")
TEACHER_STEPS = (1, 2, 4, 25)
REF_STEPS = 25
SWEEP = (1.0, 2.0, 4.0, 7.5)
GOAL = {"accuracy_gap": 0.03, "fd_ratio": 1.25}
# training order: APT starts from the DMD2 student's export (recipe.init_from)
RECIPE_ORDER = ("dmd2", "sid", "swiftbrush", "lcm", "lcm_lora", "apt")
KEEP = ("accuracy", "fd", "diversity", "precision", "mean_pairwise_ratio", "n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--recipes", nargs="*", default=None, help="names; none: only given pipelines")
    p.add_argument("--quick", action="store_true", help="tiny teachers, --smoke runs, 2/class")
    p.add_argument("--out-dir", type=Path, default=None, help="default: evaluation/results")
    p.add_argument("--runs-dir", type=Path, default=None, help="default: runs/bench")
    p.add_argument("--per-class", type=int, default=None, help="default: 100 (quick: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-cache", type=Path, default=None)
    p.add_argument("--recipes-dir", type=Path, default=ROOT / "recipes" / "digits")
    p.add_argument("--reuse-runs", action="store_true", help="score existing run exports")
    p.add_argument(
        "--student-pipeline",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also score this exported pipeline dir as student NAME (no training); repeatable",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="DIR",
        help="only merge the digits.json of runs made with --out-dir DIR (e.g. one per family, "
        "run side by side) into --out-dir, with their grids",
    )
    args = p.parse_args(argv)
    quick_root = ROOT / "runs" / "bench_quick"
    args.out_dir = args.out_dir or (
        quick_root / "results" if args.quick else ROOT / "evaluation/results"
    )
    args.runs_dir = args.runs_dir or (quick_root if args.quick else ROOT / "runs" / "bench")
    args.per_class = args.per_class or (2 if args.quick else 100)
    args.sweep = (1.0,) if args.quick else SWEEP
    return args


def teacher_card(family: str) -> dict:
    path = ROOT / "teachers" / "digits" / f"{family}.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def teacher_dir(family: str, quick: bool) -> Path:
    """Tiny random teacher (--quick) or the trained/cached digits teacher of the family."""
    if quick:
        from distillkit.teachers.load import tiny_teacher_dir  # caches save_tiny_teacher

        return tiny_teacher_dir(family, 32)
    try:
        from distillkit.benchmark.teachers import digits_teacher_dir
    except ImportError as err:
        raise SystemExit(
            "bench-quality needs distillkit.benchmark.teachers.digits_teacher_dir(family) to "
            f"train or reuse the digits teachers, and it cannot be imported ({err}). "
            "Use --quick to test the harness on tiny random teachers."
        ) from None
    return Path(digits_teacher_dir(family))


def _rel(path: Path) -> str:
    """Repo-relative when inside the repo, so committed results hold no machine paths."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def common(args) -> dict:
    return dict(
        judge=args.judge,
        pixel_judge=args.pixel_judge,
        split=args.split,
        per_class=args.per_class,
        seed=args.seed,
    )


def pick(scores: dict) -> dict:
    out = {k: scores[k] for k in (*KEEP, "per_class", "pixel") if k in scores}
    out.update(guidance=scores["protocol"]["guidance"], resolution=scores["protocol"]["resolution"])
    return out


def score_teacher(family: str, args, grids: Path) -> tuple[dict, dict]:
    """Scores by step count at the card guidance, and the 25-step guidance sweep."""
    from distillkit.evaluation.digits_eval import evaluate_pipeline
    from distillkit.evaluation.generate import load_pipeline

    guidance = float(teacher_card(family).get("default_guidance", 2.0 if args.quick else -1))
    if guidance < 0:
        raise SystemExit(f"teachers/digits/{family}.yaml has no default_guidance")
    pipe = load_pipeline(teacher_dir(family, args.quick))
    by_steps = {}
    for steps in TEACHER_STEPS:
        grid = grids / f"{family}_teacher{steps}.png" if steps in (1, REF_STEPS) else None
        s = evaluate_pipeline(pipe, steps=steps, guidance=guidance, grid=grid, **common(args))
        by_steps[str(steps)] = pick(s)
        print(f"[{family}] teacher {steps:>2} steps: acc {s['accuracy']:.3f}  fd {s['fd']:.1f}")
    sweep = {f"{guidance:g}": by_steps[str(REF_STEPS)]}
    for g in sorted(set(args.sweep) - {guidance}):
        sweep[f"{g:g}"] = pick(evaluate_pipeline(pipe, steps=REF_STEPS, guidance=g, **common(args)))
    best = max(sweep, key=lambda g: (sweep[g]["accuracy"], -sweep[g]["fd"]))
    return by_steps, {"default": f"{guidance:g}", "best": best, "scores": sweep}


def recorded_train_seconds(run_dir: Path) -> float | None:
    """The engine's own training time (train.json) if recorded, else our wall-clock record."""
    for name in ("train.json", "summary.json", "bench_train.json"):
        path = run_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("train_seconds")
            if value is not None:
                return float(value)
    return None


def train_student(config: Path, run_dir: Path, args) -> tuple[Path, float | None]:
    """`distillkit run CONFIG output_dir=RUN_DIR` in a subprocess, timed by wall clock."""
    pipeline = run_dir / "pipeline"
    if args.reuse_runs and (pipeline / "model_index.json").is_file():
        return pipeline, recorded_train_seconds(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "distillkit.cli", "run", str(config), f"output_dir={run_dir}"]
    cmd += ["--smoke"] if args.quick else []
    print("+ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`distillkit run {config.name}` exited with {proc.returncode}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench_train.json").write_text(json.dumps({"train_seconds": wall, "cmd": cmd}))
    return pipeline, recorded_train_seconds(run_dir)


def shipped_steps(pipeline: Path, card: dict) -> list[int]:
    """1, the export's default count and every count it ships and checked (distillkit.json's
    calls: 1, 2 and 4 for a student.step_counts student)."""
    from distillkit.export.pipeline import EXPORT_META

    meta = pipeline / EXPORT_META
    calls = json.loads(meta.read_text()).get("calls", {}) if meta.is_file() else {}
    return sorted({1, int(card.get("num_inference_steps", 1)), *(int(k) for k in calls)})


def student_jobs(family: str, args) -> list[dict]:
    """Students to score: <recipe>_<family>.yaml runs, then pipelines given by NAME=DIR."""
    from distillkit.config import load_config

    def order(config: Path) -> tuple[int, str]:
        recipe = config.stem[: -len(family) - 1]
        known = recipe in RECIPE_ORDER
        return (RECIPE_ORDER.index(recipe) if known else len(RECIPE_ORDER), recipe)

    jobs = []
    for config in sorted(args.recipes_dir.glob(f"*_{family}.yaml"), key=order):
        recipe = config.stem[: -len(family) - 1]
        if args.recipes is not None and recipe not in args.recipes:
            continue
        load_config(config)  # a broken YAML fails here, before any training
        jobs.append({"recipe": recipe, "config": config})  # steps: 1 and the export's own
    for item in args.student_pipeline:
        name, _, path = item.partition("=")
        jobs.append({"recipe": name, "pipeline": Path(path), "config": None})
    return jobs


def score_students(
    family: str, args, grids: Path, rows: list[dict], saved: Callable[[], None]
) -> None:
    """Train and score each student into `rows`; `saved()` after each run, so a long bench that
    is stopped keeps the rows it finished."""
    from distillkit.evaluation.digits_eval import evaluate_pipeline
    from distillkit.evaluation.generate import load_pipeline
    from distillkit.export.card import export_call_defaults

    for job in student_jobs(family, args):
        recipe, config, seconds = job["recipe"], job["config"], None
        rel = _rel(config) if config else None
        try:
            if config is not None:
                run_dir = args.runs_dir / config.stem
                job["pipeline"], seconds = train_student(config, run_dir, args)
            card = export_call_defaults(job["pipeline"])
            steps = job.get("steps") or shipped_steps(job["pipeline"], card)
            pipe = load_pipeline(job["pipeline"])
        except Exception as err:  # a failed recipe is reported; the others still run
            print(f"[{family}] {recipe}: FAILED: {err}", flush=True)
            rows.append({"recipe": recipe, "family": family, "config": rel, "error": str(err)})
            saved()
            continue
        for k in steps:
            grid = grids / f"{family}_{recipe}_student{k}.png" if k == 1 else None
            guidance = float(card.get("guidance_scale", 0.0))
            s = evaluate_pipeline(pipe, steps=k, guidance=guidance, grid=grid, **common(args))
            row = {"recipe": recipe, "family": family, "steps": k, **pick(s)}
            row.update(train_seconds=seconds, config=rel, pipeline=_rel(job["pipeline"]))
            rows.append(row)
            print(f"[{family}] {recipe} {k} step: acc {s['accuracy']:.3f}  fd {s['fd']:.1f}")
        saved()


def goal_failures(student: dict, ref: dict, prefix: str = "") -> list[str]:
    """Accuracy >= teacher(25) - 0.03 and FD <= 1.25 x teacher(25) FD, in one judge's scores."""
    min_acc = ref["accuracy"] - GOAL["accuracy_gap"]
    max_fd = ref["fd"] * GOAL["fd_ratio"]
    fails = []
    if student["accuracy"] < min_acc:
        fails.append(f"{prefix}acc {student['accuracy']:.3f} < {min_acc:.3f}")
    if student["fd"] > max_fd:
        fails.append(f"{prefix}FD {student['fd']:.3g} > {max_fd:.3g}")
    return fails


def goal_verdict(student: dict, ref: dict) -> tuple[bool, str]:
    """The goal under the CNN judge and, where both rows carry it, under the pixel judge."""
    fails = goal_failures(student, ref)
    if "pixel" in student and "pixel" in ref:
        fails += goal_failures(student["pixel"], ref["pixel"], prefix="px ")
    return not fails, "pass" if not fails else "FAIL (" + "; ".join(fails) + ")"


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render_markdown(results: dict) -> str:
    """Teachers x steps, then students with the goal verdict on their 1-step rows."""

    def cell(accuracy: float, fd: float, diversity: float, pixel: dict | None = None, **_) -> str:
        text = f"acc {accuracy:.3f} / FD {fd:.1f} / div {diversity:.2f}"
        return text + (f" / px {pixel['accuracy']:.3f}, {pixel['fd']:.3f}" if pixel else "")

    steps = [str(s) for s in TEACHER_STEPS]
    m, proto = results["machine"], results["protocol"]
    device = m.get("device") or ("cuda" if m.get("cuda") else "cpu")  # older files: "device"
    head = ["family", "guidance", *(f"{s} steps" for s in steps), f"best guidance @{REF_STEPS}"]
    lines = [
        "# Digits benchmark",
        f"`{results['command']}` at commit `{results['commit']}` on {m['platform']} "
        f"({m.get('cores', m.get('cpu_count'))} CPUs, {device}); {proto['samples']} samples "
        "per setting.",
        f"Goal: student accuracy >= teacher({REF_STEPS}) - {GOAL['accuracy_gap']} and "
        f"FD <= {GOAL['fd_ratio']} x teacher({REF_STEPS}) FD at its step count, under the CNN "
        "judge and under the pixel judge (px: RBF SVM on 8x8 pooled pixels, FD in that space).",
        "",
        "## Teachers (card guidance)",
        _row(head),
        _row(["---"] * len(head)),
    ]
    for fam, by in results["teachers"].items():
        sw = results["teacher_guidance_sweep"][fam]
        best = f"{sw['best']}: {cell(**sw['scores'][sw['best']])}"
        lines.append(_row([fam, sw["default"], *(cell(**by[s]) for s in steps), best]))
    head = ["recipe", "family", "steps", "accuracy", "FD", "diversity", "px acc", "px FD"]
    head += ["train s", "goal"]
    lines += ["", "## Students (guidance from the export)", _row(head), _row(["---"] * len(head))]
    for r in results["students"]:
        if "error" in r:
            fail = f"FAIL (run failed: {r['error'][:80]})"
            lines.append(_row([r["recipe"], r["family"], *["-"] * 7, fail]))
            continue
        ref = results["teachers"][r["family"]][str(REF_STEPS)]
        verdict = goal_verdict(r, ref)[1]  # few-step rows (LCM) against the same goal
        secs = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}"
        cells = [r["recipe"], r["family"], r["steps"], f"{r['accuracy']:.3f}", f"{r['fd']:.1f}"]
        cells += [f"{r['diversity']:.2f}", *_pixel_cells(r), secs, verdict]
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def _pixel_cells(row: dict) -> list[str]:
    px = row.get("pixel")
    return [f"{px['accuracy']:.3f}", f"{px['fd']:.3f}"] if px else ["-", "-"]


def combined_grid(family: str, grids: Path) -> Path | None:
    """Teacher 25 | teacher 1 | each student at 1 step, side by side."""
    from distillkit.evaluation.digits_eval import combine_grids

    paths = [grids / f"{family}_teacher{REF_STEPS}.png", grids / f"{family}_teacher1.png"]
    paths += sorted(grids.glob(f"{family}_*_student1.png"))
    panels = [(p.stem.removeprefix(f"{family}_"), p) for p in paths if p.is_file()]
    return combine_grids(panels, grids / f"{family}_combined.png") if panels else None


def protocol(args) -> dict:
    from distillkit.evaluation.digits_eval import benchmark_protocol
    from distillkit.evaluation.pixel_judge import pixel_judge_protocol

    return {
        **benchmark_protocol(args.split, per_class=args.per_class, seed=args.seed),
        "teacher_steps": list(TEACHER_STEPS),
        "reference_steps": REF_STEPS,
        "guidance_sweep": list(args.sweep),
        "student_guidance": "from the export's model card (0 for distilled students)",
        "goal": GOAL,
        "goal_judges": ["cnn", "pixel"],
        "pixel_judge": pixel_judge_protocol(),
        "quick": args.quick,
    }


def write_results(results: dict, out_dir: Path) -> None:
    """Written after every family, so a crash late in a long run keeps what was scored."""
    for row in results["students"]:
        if "steps" in row and row["family"] in results["teachers"]:
            ref = results["teachers"][row["family"]][str(REF_STEPS)]
            row["goal_pass"] = goal_verdict(row, ref)[0]
    (out_dir / "digits.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "digits.md").write_text(render_markdown(results))


def merge_results(parts: list[Path], out_dir: Path) -> dict:
    """One digits.json from per-family runs: their teachers, sweeps and students, in order."""
    merged: dict | None = None
    for part in parts:
        result = json.loads((part / "digits.json").read_text())
        if merged is None:
            merged = {**result, "teachers": {}, "teacher_guidance_sweep": {}, "students": []}
            merged["command"] = result["command"] + " (families run side by side, then --merge)"
            merged["commit_by_family"] = {}
        # a family re-scored later keeps the commit it was measured at
        merged["commit_by_family"].update(dict.fromkeys(result["teachers"], result["commit"]))
        merged["teachers"].update(result["teachers"])
        merged["teacher_guidance_sweep"].update(result["teacher_guidance_sweep"])
        merged["students"] += result["students"]
        for grid in (part / "grids").glob("*.png"):
            (out_dir / "grids").mkdir(parents=True, exist_ok=True)
            shutil.copy2(grid, out_dir / "grids" / grid.name)
    if merged is None:
        raise SystemExit("--merge needs at least one directory holding a digits.json")
    write_results(merged, out_dir)
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        merge_results(args.merge, args.out_dir)
        print(f"wrote {args.out_dir / 'digits.json'} and {args.out_dir / 'digits.md'}")
        return 0
    from distillkit.cli import quiet_libraries
    from distillkit.evaluation.digits_eval import load_judge
    from distillkit.evaluation.pixel_judge import train_pixel_judge

    quiet_libraries()
    grids = args.out_dir / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    args.judge, args.split = load_judge(args.judge_cache)
    args.pixel_judge = train_pixel_judge(args.split)
    results: dict = {
        "machine": machine(),
        "commit": git_commit(),
        "command": "make bench-quality" + (" (--quick)" if args.quick else ""),
        "protocol": protocol(args),
        "teachers": {},
        "teacher_guidance_sweep": {},
        "students": [],
    }
    for family in args.families:
        by_steps, sweep = score_teacher(family, args, grids)
        results["teachers"][family] = by_steps
        results["teacher_guidance_sweep"][family] = sweep
        save = lambda: write_results(results, args.out_dir)  # noqa: E731
        score_students(family, args, grids, results["students"], save)
        combined_grid(family, grids)
        write_results(results, args.out_dir)
    print(f"wrote {args.out_dir / 'digits.json'} and {args.out_dir / 'digits.md'}")
    return 1 if any("error" in r for r in results["students"]) else 0


if __name__ == "__main__":
    sys.exit(main())
