"""`distillkit export RUN_DIR`: re-export a run from a checkpoint (the files its end wrote)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from distillkit.engine.reexport import reexport

    report = reexport(Path(args.run_dir), args.checkpoint)
    print(f"exported pipeline: {report.pipeline_dir}")
    if report.lora_dir is not None:
        print(f"exported LoRA:     {report.lora_dir}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="re-export a run's pipeline from a checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default=None, help="checkpoint dir name (default: latest)")
    p.set_defaults(func=cmd_export)
