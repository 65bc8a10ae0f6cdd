"""`distillkit eval PIPELINE_DIR`: score an exported pipeline (digits benchmark or prompt set)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillkit.cli import positive_int
from distillkit.errors import ConfigError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # fid.WEIGHTS_FILE (no torch import)


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


def cmd_compose_eval(args: argparse.Namespace, steps: int, guidance: float) -> int:
    """--benchmark digits-compose: the slot judge's rates, FD and diversity, as JSON with --out."""
    from distillkit.evaluation.compose_eval import evaluate_compose, format_compose

    scores = evaluate_compose(
        args.pipeline_dir,
        steps=steps,
        guidance=guidance,
        scenes=getattr(args, "scenes", 600),
        seed=args.seed,
        judge_cache=getattr(args, "judge_cache", None),
        grid=args.grid,
    )
    p = scores["protocol"]
    print(
        f"digits-compose: {args.pipeline_dir} ({p['pipeline_class']}), steps={steps}, "
        f"guidance={guidance:g}, {p['resolution']} px, {p['scenes']} scenes"
    )
    print(format_compose(f"{steps}-step", scores))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(scores, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


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
    if getattr(args, "protocol", None) and getattr(args, "prompts", None) is None:
        raise ConfigError(
            f"--protocol {args.protocol} needs --prompts CAPTIONS: e.g. COCO-2014 val's "
            "captions_val2014.json or a .txt/.jsonl/.csv of captions (distillkit ships none)"
        )
    if getattr(args, "card", False) and getattr(args, "prompts", None) is None:
        raise ConfigError(
            "--card fills the model card from a prompt-set evaluation: add --prompts FILE "
            "(the digits benchmark's scores are not written into cards)"
        )
    if getattr(args, "prompts", None) is not None:  # the general path: prompts + metrics
        if args.benchmark is not None:
            raise ConfigError("--benchmark and --prompts exclude each other: pick one")
        return cmd_prompt_eval(args)
    args.benchmark = getattr(args, "benchmark", None) or "digits"
    if args.benchmark not in ("digits", "digits-compose"):
        raise ConfigError(f"unknown benchmark {args.benchmark!r}; available: digits")
    steps, guidance = call_settings(args)
    if args.benchmark == "digits-compose":
        return cmd_compose_eval(args, steps, guidance)
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


def _teacher_run(args: argparse.Namespace) -> list:
    """--teacher DIR: the same call on the teacher at its own steps / guidance."""
    from distillkit.evaluation.prompt_eval import Run

    if args.teacher is None:
        return []
    if not (Path(args.teacher) / "model_index.json").is_file():
        raise ConfigError(f"--teacher: {args.teacher} is not a diffusers pipeline directory")
    if args.teacher_steps is None or args.teacher_guidance is None:
        raise ConfigError("--teacher needs --teacher-steps and --teacher-guidance (its own call)")
    return [Run("teacher", args.teacher, args.teacher_steps, args.teacher_guidance)]


def cmd_prompt_eval(args: argparse.Namespace) -> int:
    from distillkit.evaluation.prompt_eval import evaluate_prompts, parse_metrics
    from distillkit.evaluation.protocols import (
        format_runs,
        get_protocol,
        prompts_record,
        read_captions,
        select_prompts,
    )

    protocol = get_protocol(args.protocol)
    metrics = parse_metrics(args.metrics or ",".join(protocol.metrics if protocol else METRICS))
    column = args.prompt_column or (protocol.prompt_column if protocol else "text")
    samples = args.samples or (protocol.samples if protocol else None)
    path = Path(args.prompts)
    prompts, rule = select_prompts(read_captions(path, column), samples, args.seed)
    steps, guidance = call_settings(args)
    compare = _teacher_run(args)
    clip_model = args.clip_model or (protocol.clip_model if protocol else None)
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
        clip_model=clip_model,
        clip_weights=args.clip_weights,
        grid=args.grid,
        compare=compare,
        label="student" if compare else Path(args.pipeline_dir).name,
        protocol_name=protocol.name if protocol else None,
        prompts_info=prompts_record(path, prompts, rule, column),
        save_reference=args.fid_save_reference,
    )
    if scores is None:  # another rank of a multi-process run: rank 0 reports and writes
        return 0
    p = scores["protocol"]
    ranks = f", {p['world_size']} processes" if p["world_size"] > 1 else ""
    print(
        f"{p['samples']} samples at {p['resolution']} px, seed {p['seed']}{ranks}, prompts {path}"
    )
    print(format_runs(scores["runs"]))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(scores, indent=1) + "\n")
        print(f"wrote {out}")
    if args.card:
        from distillkit.export.eval_card import write_eval_card

        source = Path(args.out).name if args.out else "this evaluation"
        print(f"wrote {write_eval_card(args.pipeline_dir, scores, source)} (## Evaluation)")
    return 0


METRICS = ("fid", "clip")  # without --protocol


def add_prompt_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt-set evaluation (--prompts)")
    g.add_argument("--prompts", default=None, metavar="FILE", help=".txt/.jsonl/.csv/COCO .json")
    g.add_argument("--protocol", default=None, choices=["coco"], help="recorded preset: coco")
    g.add_argument("--prompt-column", default=None, help="of .jsonl/.csv (text; coco: caption)")
    g.add_argument("--samples", type=positive_int, default=None, help="prompts drawn (coco 30000)")
    g.add_argument("--metrics", default=None, help="fid, clip, prc (default fid,clip; coco all)")
    g.add_argument("--images-per-prompt", type=positive_int, default=1)
    g.add_argument("--batch-size", type=positive_int, default=16)
    g.add_argument("--fid-weights", default=None, metavar="PATH", help=WEIGHTS_FILE)
    g.add_argument("--fid-reference", default=None, metavar="DIR_OR_NPZ", help="real images")
    g.add_argument("--fid-save-reference", default=None, metavar="FILE.npz", help="stats out")
    g.add_argument("--clip-model", default=None, help="open_clip name (ViT-L-14; coco ViT-g-14)")
    g.add_argument("--clip-weights", default=None, metavar="PATH", help="open_clip weights")
    g.add_argument("--teacher", default=None, metavar="DIR", help="also score this pipeline")
    g.add_argument("--teacher-steps", type=positive_int, default=None)
    g.add_argument("--teacher-guidance", type=float, default=None)
    g.add_argument(
        "--card",
        action="store_true",
        help="write the scores + protocol line into PIPELINE_DIR/README.md (## Evaluation)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `distillkit eval` on the CLI's subparsers."""
    p = subparsers.add_parser("eval", help="score an exported pipeline: benchmark or prompt set")
    p.add_argument("pipeline_dir", help="a diffusers pipeline dir (e.g. runs/x/pipeline)")
    p.add_argument(
        "--benchmark",
        default=None,
        choices=["digits", "digits-compose"],
        help="default: digits; digits-compose: 64 px scenes of coloured digits (--scenes)",
    )
    p.add_argument("--scenes", type=positive_int, default=600, help="digits-compose: scenes")
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
