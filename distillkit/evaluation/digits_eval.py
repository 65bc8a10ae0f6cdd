"""`distillkit eval PIPELINE_DIR --benchmark digits`: score an exported pipeline on digits.

The pipeline is prompted with the fixed digits prompts (`eval_prompts`), its images are judged
by the cached digit judge and compared with the real held-out digits. Every number comes with
the protocol that produced it (judge, split, seeds, steps, guidance, size), so results from
different machines or runs can be told apart or matched.

Heavy imports (torch, diffusers) happen inside functions: the CLI imports this module to
register the subcommand and should stay fast for `distillkit --help`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillkit.images import save_grid

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from distillkit.data.digits import DigitsSplit
    from distillkit.evaluation.judge import DigitJudge
    from distillkit.evaluation.pixel_judge import PixelJudge

JUDGE_SEED = 0
SPLIT_SEED = 0
METRIC_KEYS = ("accuracy", "fd", "diversity", "precision", "mean_pairwise_ratio", "n")


def default_judge_cache() -> Path:
    from distillkit.teachers.load import cache_root

    return cache_root() / "judge"


def load_judge(judge_cache: Path | str | None = None) -> tuple[DigitJudge, DigitsSplit]:
    """The benchmark's fixed judge and split (trained once, then read from the cache)."""
    from distillkit.data.digits import load_digits_split
    from distillkit.evaluation.judge import load_or_train_judge

    split = load_digits_split(seed=SPLIT_SEED)
    cache = Path(judge_cache) if judge_cache is not None else default_judge_cache()
    return load_or_train_judge(cache, seed=JUDGE_SEED, split=split), split


def benchmark_protocol(
    split: DigitsSplit, *, per_class: int, seed: int, batch_size: int = 100
) -> dict[str, Any]:
    """What fixes a digits score besides the model: judge, split, prompts and seeds."""
    from distillkit.data.digits import NUM_CLASSES
    from distillkit.evaluation.judge import DEFAULT_EPOCHS, JUDGE_VERSION

    samples = NUM_CLASSES * per_class
    return {
        "benchmark": "digits",
        "judge_version": JUDGE_VERSION,
        "judge_seed": JUDGE_SEED,
        "judge_epochs": DEFAULT_EPOCHS,
        "split_seed": split.seed,
        "test_fraction": split.test_fraction,
        "real_heldout": len(split.heldout_images),
        "per_class": per_class,
        "samples": samples,
        "seed": seed,
        "batch_seeds": [seed + i for i in range(math.ceil(samples / batch_size))],
        "batch_size": batch_size,
    }


def evaluate_pipeline(
    pipe: DiffusionPipeline,
    *,
    steps: int,
    guidance: float,
    judge: DigitJudge,
    split: DigitsSplit,
    per_class: int = 100,
    seed: int = 0,
    batch_size: int = 100,
    resolution: int | None = None,
    grid: Path | str | None = None,
    style: str | None = None,
    sampling: dict | None = None,
    pixel_judge: PixelJudge | None = None,
) -> dict[str, Any]:
    """Scores of an already loaded pipeline (the harness reuses one load for many settings).

    ``style`` (a digits style): FD against the held-out digits in that style, and its
    ``style_statistic``; ``sampling``: call arguments instead of those the export stores;
    ``pixel_judge``: the second, independent judge's scores under ``pixel``."""
    import torch

    from distillkit.data.digits import eval_prompts, restyle
    from distillkit.evaluation.generate import default_resolution, generate_images
    from distillkit.evaluation.metrics import digits_scores, style_statistic
    from distillkit.evaluation.pixel_judge import pixel_judge_protocol

    pairs = eval_prompts(per_class)
    prompts, labels = [p for p, _ in pairs], [label for _, label in pairs]
    resolution = resolution or default_resolution(pipe)
    images = generate_images(
        pipe,
        prompts,
        steps=steps,
        guidance=guidance,
        seed=seed,
        batch_size=batch_size,
        resolution=resolution,
        sampling=sampling,
    )
    real = split.heldout_images if style is None else restyle(split.heldout_images, style)
    scores: dict[str, Any] = digits_scores(images, labels, judge, real)
    scores["n"] = len(images)
    if pixel_judge is not None:
        from distillkit.evaluation.pixel_judge import pixel_scores

        scores["pixel"] = pixel_scores(images, torch.as_tensor(labels), pixel_judge, real)
    if style is not None:
        scores["style_statistic"] = style_statistic(images, style)
    if grid is not None:
        save_grid(images, grid, labels=labels)
    scores["protocol"] = {
        **benchmark_protocol(split, per_class=per_class, seed=seed, batch_size=batch_size),
        "steps": steps,
        "guidance": float(guidance),
        "resolution": resolution,
        "pipeline_class": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        **({"style": style} if style else {}),
        **({"pixel_judge": pixel_judge_protocol()} if pixel_judge is not None else {}),
    }
    return scores


def evaluate_digits(
    pipeline_dir: Path | str,
    *,
    steps: int,
    guidance: float,
    per_class: int = 100,
    seed: int = 0,
    judge_cache: Path | str | None = None,
    batch_size: int = 100,
    resolution: int | None = None,
    grid: Path | str | None = None,
) -> dict[str, Any]:
    """Load an exported pipeline dir and score it: metrics plus a `protocol` dict."""
    from distillkit.evaluation.generate import load_pipeline
    from distillkit.evaluation.pixel_judge import train_pixel_judge

    pipe = load_pipeline(pipeline_dir)
    judge, split = load_judge(judge_cache)
    scores = evaluate_pipeline(
        pipe,
        steps=steps,
        guidance=guidance,
        judge=judge,
        split=split,
        per_class=per_class,
        seed=seed,
        batch_size=batch_size,
        resolution=resolution,
        grid=grid,
        pixel_judge=train_pixel_judge(split),
    )
    scores["protocol"]["pipeline_dir"] = str(pipeline_dir)
    return scores


def combine_grids(panels: list[tuple[str, Path]], path: Path | str, gap: int = 6) -> Path:
    """Grids side by side under captions, scaled (nearest) to the tallest one's height."""
    from PIL import Image, ImageDraw

    images = [(caption, Image.open(p).convert("RGB")) for caption, p in panels]
    height, top = max(im.height for _, im in images), 14
    nearest = Image.Resampling.NEAREST
    images = [(c, im.resize((im.width * height // im.height, height), nearest)) for c, im in images]
    width = sum(im.width for _, im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, top + height), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for caption, im in images:
        canvas.paste(im, (x, top))
        draw.text((x + 2, 1), caption, fill="black")
        x += im.width + gap
    path = Path(path)
    canvas.save(path)
    return path


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A short fixed-width table: one line per (name, scores); the pixel judge's accuracy and
    FD (``px acc`` / ``px fd``) when it scored them."""
    pixel = any("pixel" in s for _, s in rows)
    header = f"{'':<12} {'accuracy':>9} {'fd':>9} {'diversity':>9} {'precision':>9} {'n':>6}"
    lines = [header + (f" {'px acc':>9} {'px fd':>9}" if pixel else "")]
    for name, s in rows:
        line = (
            f"{name:<12} {s['accuracy']:>9.3f} {s['fd']:>9.1f} {s['diversity']:>9.3f} "
            f"{s['precision']:>9.3f} {int(s['n']):>6d}"
        )
        if "pixel" in s:
            line += f" {s['pixel']['accuracy']:>9.3f} {s['pixel']['fd']:>9.3f}"
        lines.append(line)
    return "\n".join(lines)
