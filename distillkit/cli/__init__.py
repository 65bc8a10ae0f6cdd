"""`distillkit run | validate | ls | plan | export | eval | push | demo | teach`: recipes as YAML
plus key.sub=value overrides. One module per command in this package.

User errors (bad config, missing files, failed export checks) print one message and exit 2; a
run stopped by a pre-emption signal checkpoints and exits 75 (distillkit.engine.preempt).
"""

from __future__ import annotations

import argparse
import os
import sys

from distillkit.errors import DistillkitError, Preempted

EXIT_USER_ERROR = 2


def positive_int(text: str) -> int:
    """argparse type for counts (steps, samples, devices): a bad one is a usage error, exit 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per module of this package, each with its own ``add_parser``; their heavy
    imports (torch, diffusers) wait until a command runs, so ``--help`` stays fast."""
    from distillkit.cli import demo, eval, export, ls, plan, push, run, teach, validate

    parser = argparse.ArgumentParser(prog="distillkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (run, validate, ls, plan, export, eval, push, demo, teach):
        command.add_parser(sub)
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
    except Preempted as stop:
        from distillkit.engine.preempt import EXIT_PREEMPTED

        if os.environ.get("RANK", "0") == "0":  # every rank stops alike: one says so
            print(f"pre-empted: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
