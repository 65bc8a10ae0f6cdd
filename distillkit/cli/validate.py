"""`distillkit validate CONFIG...`: check recipe YAMLs without loading any weights."""

from __future__ import annotations

import argparse


def cmd_validate(args: argparse.Namespace) -> int:
    from distillkit.config import load_config

    for path in args.configs:
        cfg = load_config(path, args.overrides)
        print(
            f"{path}: ok ({cfg.recipe.name}, {cfg.teacher.family}, student={cfg.student.type}, "
            f"teacher={cfg.teacher.model_id})"
        )
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check recipe YAMLs without loading any weights")
    p.add_argument("configs", nargs="+")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_validate)
