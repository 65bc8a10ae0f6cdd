"""`distillkit teach digits --family F`: train (or reuse) a digits teacher; optionally score."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from distillkit.benchmark.teachers import REPORT_FILE, digits_teacher_dir, get_spec
from distillkit.cli import positive_int
from distillkit.teachers.tiny import FAMILIES


def add_teach_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``distillkit teach digits`` ."""
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--quick", action="store_true", help="seconds of training, for tests")
    parser.add_argument("--eval", action="store_true", help="print judge accuracy and FD")
    parser.add_argument(
        "--per-class", type=positive_int, default=100, help="eval samples per digit"
    )
    parser.add_argument("--results", type=Path, help="merge the scores into this JSON file")


def cmd_teach(args: argparse.Namespace) -> int:
    """Train (or reuse) the family's digits teacher, print its directory, optionally score it."""
    path = digits_teacher_dir(args.family, quick=args.quick)
    print(path, flush=True)
    if not (getattr(args, "eval", False) or getattr(args, "results", None)):
        return 0
    from distillkit.benchmark.teacher_eval import evaluate_teacher, record

    start = time.perf_counter()
    scores = evaluate_teacher(path, per_class=args.per_class)
    if args.results:
        entry = {
            "command": getattr(args, "command", None) or shlex.join(["distillkit", *sys.argv[1:]]),
            "spec": asdict(get_spec(args.family, args.quick)),
            "train": json.loads((path / REPORT_FILE).read_text()),
            "eval_seconds": round(time.perf_counter() - start, 1),
            **scores,
        }
        record(args.results, args.family, entry)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("teach", help="train (or reuse) a digits teacher of a family")
    p.add_argument("benchmark", choices=["digits"])
    add_teach_arguments(p)
    p.set_defaults(func=cmd_teach)
