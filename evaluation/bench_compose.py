"""`python evaluation/bench_compose.py`: compositional digits teachers (and given students) on
the digits-compose benchmark: attribute rates, all-correct rate, FD, diversity.

Teachers at 1 / 2 / 4 / 25 steps at their card guidance, plus a guidance sweep at 25 steps;
students (`--student NAME=PIPELINE_DIR`) at the step count their export ships. Writes
evaluation/results/digits_compose/compose.json (with machine, commit and command).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
KEYS = ("all_correct", "digit", "colour", "binding", "position", "count", "fd", "diversity")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="*", default=["sd15"], help="none: students only")
    p.add_argument("--scenes", type=int, default=600)
    p.add_argument("--sweep", nargs="*", type=float, default=[1.0, 2.0, 4.0])
    p.add_argument("--student", action="append", default=[], metavar="NAME=DIR")
    p.add_argument(
        "--grids", type=Path, default=None, help="save each row's first 48 scenes here (PNG)"
    )
    p.add_argument(
        "--out", type=Path, default=ROOT / "evaluation/results/digits_compose/compose.json"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import yaml

    from distillkit.benchmark.compose_teachers import compose_teacher_dir
    from distillkit.benchmark.provenance import git_commit, machine
    from distillkit.evaluation.compose_eval import evaluate_compose_pipeline
    from distillkit.evaluation.digits_eval import load_judge
    from distillkit.evaluation.generate import load_pipeline
    from distillkit.export.card import export_call_defaults

    args = parse_args(argv)
    judge, split = load_judge()
    results: dict = {"machine": machine(), "commit": git_commit(), "teachers": {}, "students": []}
    results["command"] = "python evaluation/bench_compose.py " + " ".join(argv or sys.argv[1:])

    def score(pipe, steps: int, guidance: float, name: str) -> dict:
        start = time.perf_counter()
        grid = args.grids / f"{name}_{steps}step_g{guidance:g}.png" if args.grids else None
        s = evaluate_compose_pipeline(pipe, steps=steps, guidance=guidance, judge=judge,
                                      split=split, scenes=args.scenes, grid=grid)  # fmt: skip
        row = {k: s[k] for k in KEYS} | {"steps": steps, "guidance": guidance}
        row["seconds"] = round(time.perf_counter() - start, 1)
        results["protocol"] = s["protocol"] | {"steps": None, "guidance": None}
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        return row

    for family in args.families:
        card = yaml.safe_load((ROOT / "teachers" / "digits" / f"compose_{family}.yaml").read_text())
        guidance = float(card["default_guidance"])
        path = compose_teacher_dir(family)
        report = json.loads((path / "distillkit_teacher.json").read_text())
        pipe = load_pipeline(path)
        name = f"{family}_teacher"
        rows = [score(pipe, steps, guidance, name) for steps in (1, 2, 4, 25)]
        rows += [score(pipe, 25, g, name) for g in args.sweep if g != guidance]
        results["teachers"][family] = {"train_seconds": report["train_seconds"], "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    for item in args.student:
        name, _, path = item.partition("=")
        call = export_call_defaults(path)
        row = score(load_pipeline(path), int(call.get("num_inference_steps", 1)), 0.0, name)
        results["students"].append({"name": name, "pipeline": path, **row})
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
