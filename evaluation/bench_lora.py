"""`make bench-lora`: the teacher-LoRA and stacking proof on the digits benchmark.

Per family: the project's two digits style LoRAs (distillkit.benchmark.digits_styles: style A
slanted, style B back-slanted strokes) and the teacher wearing each at 25 steps (card
guidance) as references; then for each LoRA recipe (DMD2 with LoRA roles on a shared base,
LCM-LoRA; the shipped `recipes/digits/<recipe>_<family>.yaml`):

- **styled**: base + style A distilled (`teacher.loras`; LCM also trains on the restyled digits,
  `data.images=digits:<A>`), its exported pipeline scored at its step counts against the
  teacher + A: accuracy within 0.03, FD within 1.25x (FD against the restyled held-out digits),
  style statistic within 10 %;
- **stacked**: the acceleration LoRA distilled on the plain base, loaded on the base pipeline
  next to style B, which it never saw (`set_adapters(["speed", "style"], [1, 1])`, the export's
  scheduler), at 1 and 4 steps against the teacher + B: accuracy within 0.05, style statistic
  within 15 %.

Writes `evaluation/results/digits_lora.json` (+ .md). Everything is scored from exported
pipelines and LoRA files with the fixed digits protocol.
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

import yaml

from distillkit.benchmark.provenance import git_commit, machine

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_quality.py
ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("sd15", "sdxl", "sana")
RECIPES = ("dmd2_lora_shared", "lcm_lora")
REF_STEPS = 25
STACK_STEPS = (1, 4)
GOAL = {
    "styled": {"accuracy_gap": 0.03, "fd_ratio": 1.25, "style_rel": 0.10},
    "stacked": {"accuracy_gap": 0.05, "style_rel": 0.15},
}
KEEP = ("accuracy", "fd", "diversity", "precision", "style_statistic", "n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=FAMILIES)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--style-a", default="slant")
    p.add_argument("--style-b", default="backslant")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench_lora")
    p.add_argument("--out", type=Path, default=ROOT / "evaluation" / "results" / "digits_lora")
    p.add_argument("--reuse-runs", action="store_true", help="score existing run exports")
    p.add_argument(
        "--quick", action="store_true", help="quick teachers and LoRAs, 2-step runs, 2 per class"
    )
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="only merge the given result files (e.g. one per family) into --out",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.per_class = 2
        args.runs_dir = ROOT / "runs" / "bench_lora_quick"
        args.out = args.runs_dir / "digits_lora"
    return args


def card_guidance(family: str) -> float:
    card = yaml.safe_load((ROOT / "teachers" / "digits" / f"{family}.yaml").read_text())
    return float(card["default_guidance"])


def pick(scores: dict) -> dict:
    out = {k: scores[k] for k in (*KEEP, "pixel") if k in scores}
    return out | {"guidance": scores["protocol"]["guidance"]}


def with_style(pipe, lora_dir: Path, name: str, weight: float = 1.0) -> None:
    """What a user does with a style LoRA file: load it as an adapter and activate it."""
    pipe.load_lora_weights(lora_dir, weight_name="pytorch_lora_weights.safetensors",
                           adapter_name=name)  # fmt: skip
    active = list(pipe.get_active_adapters()) if hasattr(pipe, "get_active_adapters") else []
    names = [*[a for a in active if a != name], name]
    weights = [1.0] * (len(names) - 1) + [weight]
    pipe.set_adapters(names, adapter_weights=weights)


def run_student(config: Path, run_dir: Path, overrides: list[str], reuse: bool) -> Path:
    """`distillkit run CONFIG output_dir=RUN_DIR OVERRIDES...`, one job at a time."""
    if reuse and (run_dir / "pipeline" / "model_index.json").is_file():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "distillkit.cli", "run", str(config), f"output_dir={run_dir}"]
    cmd += overrides
    print("+ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"`distillkit run {config.name}` failed")
    (run_dir / "bench_train.json").write_text(
        json.dumps({"train_seconds": round(time.perf_counter() - start, 1), "cmd": cmd})
    )
    return run_dir


def judge_misses(row: dict, ref: dict, goal: dict, prefix: str = "") -> list[str]:
    """Accuracy gap and FD ratio in one judge's scores."""
    misses = []
    if row["accuracy"] < ref["accuracy"] - goal["accuracy_gap"]:
        limit = ref["accuracy"] - goal["accuracy_gap"]
        misses.append(f"{prefix}accuracy {row['accuracy']:.3f} < {limit:.3f}")
    if "fd_ratio" in goal and row["fd"] > goal["fd_ratio"] * ref["fd"]:
        misses.append(f"{prefix}fd {row['fd']:.3g} > {goal['fd_ratio'] * ref['fd']:.3g}")
    return misses


def verdict(row: dict, ref: dict, goal: dict) -> tuple[bool, list[str]]:
    """The goal under the CNN judge, the pixel judge (where scored) and the style statistic."""
    misses = judge_misses(row, ref, goal)
    if "pixel" in row and "pixel" in ref:
        misses += judge_misses(row["pixel"], ref["pixel"], goal, prefix="px ")
    rel = abs(row["style_statistic"] - ref["style_statistic"]) / abs(ref["style_statistic"])
    row["style_rel_diff"] = rel
    if rel > goal["style_rel"]:
        misses.append(f"style statistic off by {rel:.1%} (> {goal['style_rel']:.0%})")
    return not misses, misses


def score_family(family: str, args, judge, split) -> dict:
    from distillkit.benchmark.digits_styles import style_lora_dir
    from distillkit.benchmark.teachers import digits_teacher_dir
    from distillkit.evaluation.digits_eval import evaluate_pipeline
    from distillkit.evaluation.generate import load_pipeline
    from distillkit.evaluation.pixel_judge import train_pixel_judge

    common = dict(judge=judge, split=split, per_class=args.per_class, seed=args.seed)
    common["pixel_judge"] = train_pixel_judge(split)
    guidance = card_guidance(family)
    teacher = Path(digits_teacher_dir(family, quick=args.quick))
    a, b = args.style_a, args.style_b
    styles = {s: style_lora_dir(family, s, quick=args.quick) for s in (a, b)}
    quick = [f"teacher.model_id={teacher}", "train.max_steps=2", "train.checkpoint_every=2"]
    quick = quick if args.quick else []
    refs, plain = {}, load_pipeline(teacher)
    for s in (a, b):
        refs[f"plain_{s}"] = pick(
            evaluate_pipeline(plain, steps=REF_STEPS, guidance=guidance, style=s, **common)
        )
    for s, lora in styles.items():
        pipe = load_pipeline(teacher)
        with_style(pipe, lora, s)
        refs[s] = pick(evaluate_pipeline(pipe, steps=REF_STEPS, guidance=guidance, style=s,
                                         **common))  # fmt: skip
        print(f"[{family}] teacher + {s} @25: {refs[s]}", flush=True)
    rows = []
    for recipe in args.recipes:
        config = ROOT / "recipes" / "digits" / f"{recipe}_{family}.yaml"
        styled_over = [f"teacher.loras=[{{path: {styles[a]}, name: {a}}}]"]
        if recipe.startswith("lcm"):
            styled_over.append(f"data.images=digits:{a}")
        styled_run = run_student(
            config, args.runs_dir / family / f"{recipe}_{a}", styled_over + quick, args.reuse_runs
        )
        base_run = run_student(config, args.runs_dir / family / recipe, quick, args.reuse_runs)
        shipped = json.loads((styled_run / "pipeline" / "distillkit.json").read_text())["calls"]
        exported = load_pipeline(styled_run / "pipeline")
        for steps in sorted(int(k) for k in shipped):
            row = pick(evaluate_pipeline(exported, steps=steps, guidance=0.0, style=a, **common))
            ok, misses = verdict(row, refs[a], GOAL["styled"])
            rows.append({"family": family, "recipe": recipe, "kind": "styled", "style": a,
                         "steps": steps, **row, "pass": ok, "misses": misses})  # fmt: skip
            print(f"[{family}] {recipe} base+{a} @{steps}: {row} {'PASS' if ok else misses}")
        stacked = load_pipeline(teacher)
        stacked.load_lora_weights(base_run / "lora", weight_name="pytorch_lora_weights.safetensors",
                                  adapter_name="speed")  # fmt: skip
        with_style(stacked, styles[b], b)
        scheduler_class = type(load_pipeline(base_run / "pipeline").scheduler)
        stacked.scheduler = scheduler_class.from_pretrained(base_run / "pipeline" / "scheduler")
        from distillkit.export.card import export_sampling_kwargs

        for steps in STACK_STEPS:
            sampling = export_sampling_kwargs(base_run / "pipeline", steps)
            row = pick(evaluate_pipeline(stacked, steps=steps, guidance=0.0, style=b,
                                         sampling=sampling, **common))  # fmt: skip
            ok, misses = verdict(row, refs[b], GOAL["stacked"])
            rows.append({"family": family, "recipe": recipe, "kind": "stacked", "style": b,
                         "steps": steps, **row, "pass": ok, "misses": misses})  # fmt: skip
            print(
                f"[{family}] {recipe} speed + unseen {b} @{steps}: {row} {'PASS' if ok else misses}"
            )
        for run in (styled_run, base_run):
            seconds = json.loads((run / "bench_train.json").read_text())["train_seconds"]
            rows[-1].setdefault("train_seconds", {})[run.name] = seconds
    return {"references": refs, "rows": rows, "guidance": guidance}


def _pixel_cell(row: dict, ref: dict) -> str:
    if "pixel" not in row or "pixel" not in ref:
        return "-"
    px, rx = row["pixel"], ref["pixel"]
    return f"{px['accuracy']:.3f} / {px['fd']:.3f} ({rx['accuracy']:.3f} / {rx['fd']:.3f})"


def render_markdown(results: dict) -> str:
    head = ["family", "recipe", "kind", "style", "steps", "accuracy", "FD", "style stat"]
    head += ["ref acc", "ref FD", "ref stat", "px acc / FD (ref)", "pass"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family, part in results["families"].items():
        for r in part["rows"]:
            ref = part["references"][r["style"]]
            lines.append(
                f"| {family} | {r['recipe']} | {r['kind']} | {r['style']} | {r['steps']} | "
                f"{r['accuracy']:.3f} | {r['fd']:.1f} | {r['style_statistic']:.3f} | "
                f"{ref['accuracy']:.3f} | {ref['fd']:.1f} | {ref['style_statistic']:.3f} | "
                f"{_pixel_cell(r, ref)} | "
                f"{'yes' if r['pass'] else 'no: ' + '; '.join(r['misses'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_json = args.out.with_suffix(".json")
    if args.merge:
        merged = None
        for path in args.merge:
            part = json.loads(path.read_text())
            if merged is None:
                merged = part
            else:
                merged["families"].update(part["families"])
                merged["commit_by_family"].update(part["commit_by_family"])
        out_json.write_text(json.dumps(merged, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(render_markdown(merged))
        return 0
    from distillkit.evaluation.digits_eval import benchmark_protocol, load_judge

    judge, split = load_judge()
    commit = git_commit()
    results = {
        "machine": machine(),
        "commit": commit,
        "command": "python evaluation/bench_lora.py " + " ".join(argv or sys.argv[1:]),
        "protocol": {
            **benchmark_protocol(split, per_class=args.per_class, seed=args.seed),
            "reference_steps": REF_STEPS,
            "stack_steps": list(STACK_STEPS),
            "styles": {"A": args.style_a, "B": args.style_b},
            "fd_reference": "the held-out digits restyled like the row's style",
            "goal": GOAL,
        },
        "families": {},
        "commit_by_family": {},
    }
    for family in args.families:
        results["families"][family] = score_family(family, args, judge, split)
        results["commit_by_family"][family] = commit
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
