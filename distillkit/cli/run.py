"""`distillkit run CONFIG [key=value ...] [--smoke [--builtin-data]] [--resume]`: train, export."""

from __future__ import annotations

import argparse


def _smoke_overrides(overrides: list[str]) -> list[str]:
    """--smoke: 2 steps of batch 1 unless the user says otherwise, checkpoint at the end."""
    given = {o.split("=", 1)[0] for o in overrides}
    extra = []
    for key, value in (
        ("train.max_steps", "2"),
        ("train.batch_size", "1"),
        ("train.grad_accumulation", "1"),
        ("logging.every", "1"),
    ):
        if key not in given:
            extra.append(f"{key}={value}")
    return extra + overrides


def cmd_run(args: argparse.Namespace) -> int:
    from distillkit.config import load_config
    from distillkit.engine.loop import run

    overrides = _smoke_overrides(args.overrides) if args.smoke else args.overrides
    cfg = load_config(args.config, overrides)
    if args.smoke:
        cfg.train.checkpoint_every = min(cfg.train.checkpoint_every, cfg.train.max_steps)
    result = run(cfg, smoke=args.smoke, resume=args.resume, builtin_data=args.builtin_data)
    if result.export is not None:
        print(f"exported pipeline: {result.export.pipeline_dir}")
        if result.export.lora_dir is not None:
            print(f"exported LoRA:     {result.export.lora_dir}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="train a student from a recipe YAML, then export it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--smoke", action="store_true", help="tiny same-family teacher, 2 steps")
    p.add_argument(
        "--builtin-data",
        action="store_true",
        help="with --smoke: built-in prompts and digits images instead of data.* (said in the log)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.set_defaults(func=cmd_run)
