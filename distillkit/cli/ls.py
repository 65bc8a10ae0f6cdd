"""`distillkit ls`: recipes, teacher families and shipped configs."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_ls(args: argparse.Namespace) -> int:
    from distillkit.registry import FAMILIES, RECIPES, _load_all

    _load_all()
    print("recipes:  " + ", ".join(sorted(RECIPES)))
    print(
        "families: " + ", ".join(f"{k} ({v.pipeline_class})" for k, v in sorted(FAMILIES.items()))
    )
    root = Path(args.recipes_dir)
    if root.is_dir():
        print(f"configs in {root}/:")
        for path in sorted(root.rglob("*.yaml")):
            print(f"  {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("ls", help="list recipes, teacher families and shipped configs")
    p.add_argument("--recipes-dir", default="recipes")
    p.set_defaults(func=cmd_ls)
