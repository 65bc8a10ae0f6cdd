"""`distillkit push OUTPUT_DIR --repo-id ID`: upload an exported run with its model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from distillkit.errors import DistillkitError


def cmd_push(args: argparse.Namespace) -> int:
    from distillkit.export.push import HubError, publish

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


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="upload an exported run to the Hugging Face Hub")
    p.add_argument("output_dir")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_push)
