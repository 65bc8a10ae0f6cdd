"""`distillkit eval PIPELINE_DIR`: score an exported pipeline (digits benchmark or prompt set)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillkit.cli import positive_int
from distillkit.errors import ConfigError


def call_settings(args: argparse.Namespace) -> tuple[int, float]:
    """--steps / --guidance, else what the export's distillkit.json says it is called with."""
    from distillkit.export.card import export_call_defaults

    card = export_call_defaults(args.pipeline_dir)
    steps = args.steps if args.steps is not None else card.get("num_inference_steps")
    guidance = args.guidance if args.guidance is not None else card.get("guidance_scale")
    if steps is None or guidance is None:
        raise ConfigError(
            f"{args.pipeline_dir} has no distillkit model card saying how to call it; "
            "pass --steps and --guidance (a teacher's card default_guidance, 0 for students)"
        )
    return int(steps), float(guidance)


def cmd_eval(args: argparse.Namespace) -> int:
    """Score PIPELINE_DIR; steps/guidance default to what a distillkit export's card says."""
    from distillkit.evaluation.digits_eval import evaluate_digits, format_table

    if not (Path(args.pipeline_dir) / "model_index.json").is_file():
        what = (
            "does not exist" if not Path(args.pipeline_dir).exists() else "has no model_index.json"
        )
        raise ConfigError(
            f"{args.pipeline_dir} {what}: give a diffusers pipeline directory "
            "(e.g. runs/NAME/pipeline, or a teacher from `distillkit teach digits`)"
        )
    if getattr(args, "prompts", None) is not None:  # the general path: prompts + metrics
        if args.benchmark is not None:
            raise ConfigError("--benchmark and --prompts exclude each other: pick one")
        return cmd_prompt_eval(args)
    args.benchmark = getattr(args, "benchmark", None) or "digits"
    if args.benchmark != "digits":
        raise ConfigError(f"unknown benchmark {args.benchmark!r}; available: digits")
    steps, guidance = call_settings(args)
    scores = evaluate_digits(
        args.pipeline_dir,
        steps=steps,
        guidance=guidance,
        per_class=args.per_class,
        seed=args.seed,
        judge_cache=getattr(args, "judge_cache", None),
        grid=args.grid,
    )
    p = scores["protocol"]
    print(
        f"digits: {args.pipeline_dir} ({p['pipeline_class']}), steps={p['steps']}, "
        f"guidance={p['guidance']:g}, {p['resolution']} px, {p['samples']} samples"
    )
    print(format_table([(f"{p['steps']}-step", scores)]))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(scores, indent=1) + "\n")
        print(f"wrote {out}")
    if args.grid:
        print(f"wrote {args.grid}")
    return 0


def cmd_prompt_eval(args: argparse.Namespace) -> int:
    from distillkit.data.sources import read_prompts
    from distillkit.evaluation.prompt_eval import evaluate_prompts, parse_metrics

    metrics = parse_metrics(args.metrics)
    try:
        prompts = read_prompts(Path(args.prompts), args.prompt_column)
    except ConfigError as err:  # its messages name the run config's fields; here: our flags
        text = str(err).replace("data.prompt_column", "--prompt-column")
        raise ConfigError(text.replace("data.prompts", "--prompts")) from None
    steps, guidance = call_settings(args)
    for flag, value in (
        ("--images-per-prompt", args.images_per_prompt),
        ("--batch-size", args.batch_size),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    scores = evaluate_prompts(
        args.pipeline_dir,
        prompts,
        metrics=metrics,
        steps=steps,
        guidance=guidance,
        seed=args.seed,
        images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size,
        fid_weights=args.fid_weights,
        fid_reference=args.fid_reference,
        clip_model=args.clip_model,
        clip_weights=args.clip_weights,
        grid=args.grid,
    )
    shown = "  ".join(f"{k}={scores[k]:.4g}" for k in ("fid", "clip_score") if k in scores)
    print(f"{args.pipeline_dir}: {scores['n']} samples, steps={steps}  {shown}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(scores, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def add_prompt_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt-set evaluation (--prompts)")
    g.add_argument("--prompts", default=None, metavar="FILE", help=".txt / .jsonl / .csv")
    g.add_argument("--prompt-column", default="text", help="column of a .jsonl / .csv file")
    g.add_argument("--metrics", default="fid,clip", help="comma-separated: fid, clip")
    g.add_argument("--images-per-prompt", type=positive_int, default=1)
    g.add_argument("--batch-size", type=positive_int, default=16)
    g.add_argument("--fid-weights", default=None, metavar="PATH", help="Inception v3 weights")
    g.add_argument("--fid-reference", default=None, metavar="DIR_OR_NPZ", help="real images")
    g.add_argument("--clip-model", default=None, help="open_clip architecture (ViT-L-14)")
    g.add_argument("--clip-weights", default=None, metavar="PATH", help="open_clip weights")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `distillkit eval` on the CLI's subparsers."""
    p = subparsers.add_parser("eval", help="score an exported pipeline: benchmark or prompt set")
    p.add_argument("pipeline_dir", help="a diffusers pipeline dir (e.g. runs/x/pipeline)")
    p.add_argument("--benchmark", default=None, choices=["digits"], help="default: digits")
    p.add_argument("--steps", type=positive_int, default=None, help="default: the export's card")
    p.add_argument(
        "--guidance", type=float, default=None, help="default: the export's card (0 for students)"
    )
    p.add_argument("--per-class", type=positive_int, default=100, help="samples per digit class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="FILE.json")
    p.add_argument("--grid", default=None, metavar="FILE.png", help="10 classes x 8 samples")
    p.add_argument("--judge-cache", default=None, help="default: $DISTILLKIT_CACHE/judge")
    add_prompt_eval_args(p)
    p.set_defaults(func=cmd_eval)
    return p
