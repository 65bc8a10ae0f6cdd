"""`distillkit run | validate | ls | plan | export | eval | push | demo`: recipes as YAML plus
key.sub=value overrides.

User errors (bad config, missing files, failed export checks) print one message and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distillkit.errors import DistillkitError

EXIT_USER_ERROR = 2


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
    result = run(cfg, smoke=args.smoke, resume=args.resume)
    if result.export is not None:
        print(f"exported pipeline: {result.export.pipeline_dir}")
        if result.export.lora_dir is not None:
            print(f"exported LoRA:     {result.export.lora_dir}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from distillkit.config import load_config

    for path in args.configs:
        cfg = load_config(path, args.overrides)
        print(
            f"{path}: ok ({cfg.recipe.name}, {cfg.teacher.family}, student={cfg.student.type}, "
            f"teacher={cfg.teacher.model_id})"
        )
    return 0


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


def cmd_export(args: argparse.Namespace) -> int:
    from distillkit.engine.reexport import reexport

    report = reexport(Path(args.run_dir), args.checkpoint)
    print(f"exported pipeline: {report.pipeline_dir}")
    if report.lora_dir is not None:
        print(f"exported LoRA:     {report.lora_dir}")
    return 0


def cmd_teach(args: argparse.Namespace) -> int:
    from distillkit.benchmark.teachers import cmd_teach as teach

    return teach(args)


def cmd_push(args: argparse.Namespace) -> int:
    from distillkit.hub import HubError
    from distillkit.publish import publish

    try:
        url, refreshed = publish(
            Path(args.output_dir),
            args.repo_id,
            private=args.private,
            revision=args.revision,
        )
    except HubError as err:
        raise DistillkitError(str(err)) from None
    if not refreshed:
        print("note: no run.yaml in OUTPUT_DIR: the model card was pushed as exported")
    print(f"pushed: {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train a student from a recipe YAML, then export it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--smoke", action="store_true", help="tiny same-family teacher, 2 steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check recipe YAMLs without loading any weights")
    p.add_argument("configs", nargs="+")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("ls", help="list recipes, teacher families and shipped configs")
    p.add_argument("--recipes-dir", default="recipes")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("export", help="re-export a run's pipeline from a checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default=None, help="checkpoint dir name (default: latest)")
    p.set_defaults(func=cmd_export)

    from distillkit.demo import add_demo_parser
    from distillkit.evaluation.digits_eval import add_eval_parser
    from distillkit.plan import add_plan_parser

    add_eval_parser(sub)
    add_demo_parser(sub)
    add_plan_parser(sub)

    p = sub.add_parser("teach", help="train (or reuse) a digits teacher of a family")
    p.add_argument("benchmark", choices=["digits"])
    p.set_defaults(func=cmd_teach)
    from distillkit.benchmark.teachers import add_teach_arguments

    add_teach_arguments(p)

    p = sub.add_parser("push", help="upload an exported run to the Hugging Face Hub")
    p.add_argument("output_dir")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_push)
    return parser


def quiet_libraries() -> None:
    """Keep the terminal for our progress bar and messages; library chatter goes to warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads that spin while waiting slow small CPU ops many-fold on a busy machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow flags such as --smoke; anything else is a real error.
    if extra and (not hasattr(args, "overrides") or any("=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except DistillkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
