"""`distillkit plan CONFIG`: predicted peak memory per device, and the levers that fit it."""

from __future__ import annotations

import argparse

from distillkit.cli import positive_int
from distillkit.plan import GIB, SHARDED, format_plan, lever_configs, parse_memory, plan_memory


def cmd_plan(args: argparse.Namespace) -> int:
    from distillkit.config import load_config

    cfg = load_config(args.config, args.overrides)
    budget = parse_memory(args.gpu_memory)
    plan = plan_memory(cfg, device=args.device, sharding=args.sharding, gpus=args.gpus)
    where = f"{args.gpus} GPUs, {args.sharding}" if args.sharding != "none" else "1 device"
    print(f"{args.config}: {cfg.recipe.name} on {cfg.teacher.family} ({where})")
    print(format_plan(plan, budget))
    print("\nlevers (peak per device if applied):")
    for label, lever_cfg, sharding, gpus in lever_configs(cfg, args.sharding):
        total = plan_memory(lever_cfg, device=args.device, sharding=sharding, gpus=gpus).total
        mark = "fits" if total <= budget else "    "
        print(f"  {label:<58}{total / GIB:>8.2f} GiB  {mark}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="predict peak memory per device and the levers")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--gpu-memory", default="80GB", help="memory per device (default 80GB)")
    p.add_argument("--gpus", type=positive_int, default=1, help="devices the run is sharded over")
    p.add_argument("--sharding", choices=sorted(SHARDED), default="none")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.set_defaults(func=cmd_plan)
