"""End-of-run report: loss curves from metrics.jsonl and OUTPUT_DIR/report.md.

Why: a run directory should explain itself without TensorBoard or wandb: what was trained
(config), where it ended (final metrics), how it got there (curves), what it draws (last grid)
and whether the collapse guard fired. Everything is read back from files the run wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from distillkit.engine.callbacks import Callback

if TYPE_CHECKING:
    from distillkit.engine.loop import RunResult, Trainer

CURVES = "curves.png"
REPORT = "report.md"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(
    records: list[dict[str, Any]], path: Path, threshold: float | None = None
) -> Path | None:
    """One panel per group (losses, grad norms, collapse ratios) and per evaluation score
    (``eval/*``: steps below, wall-clock minutes on top); None without data/matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    keys = sorted({k for r in records for k in r if isinstance(r[k], int | float)})
    groups = {
        "loss": [k for k in keys if k.endswith("/loss")],
        "grad norm": [k for k in keys if k.endswith("/grad_norm")],
        "collapse (student / teacher)": [k for k in keys if k.startswith("collapse/")],
        **{key: [key] for key in keys if key.startswith("eval/")},
    }
    groups = {name: ks for name, ks in groups.items() if ks}
    if not groups:
        return None
    fig = Figure(figsize=(6, 2.6 * len(groups)), layout="tight")
    FigureCanvasAgg(fig)
    for i, (name, ks) in enumerate(groups.items()):
        ax = fig.add_subplot(len(groups), 1, i + 1)
        for key in ks:
            pts = [(r["step"], r[key]) for r in records if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=key)
        if name.startswith("collapse") and threshold is not None:
            ax.axhline(threshold, color="red", linestyle="--", label="warning threshold")
        ax.set_title(name)
        ax.set_xlabel("step")
        if name.startswith("eval/"):
            _wall_clock_axis(ax, records)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def _wall_clock_axis(ax, records: list[dict[str, Any]]) -> None:
    """A top axis in minutes since the first record, read off the records' (step, time)."""
    import numpy as np

    pts = sorted((r["step"], r["time"]) for r in records if "time" in r)
    if len(pts) < 2:
        return
    steps = np.array([p[0] for p in pts], dtype=float)
    minutes = (np.array([p[1] for p in pts]) - pts[0][1]) / 60.0
    top = ax.secondary_xaxis(
        "top",
        functions=(lambda x: np.interp(x, steps, minutes), lambda m: np.interp(m, minutes, steps)),
    )
    from matplotlib.ticker import MaxNLocator

    ticks = MaxNLocator(5).tick_values(0.0, float(minutes[-1]))
    top.set_xticks([t for t in ticks if 0.0 <= t <= minutes[-1]])  # none past the last record
    top.set_xlabel("wall clock (min)")


def _evaluation_lines(output_dir: Path, start: float | None) -> list[str]:
    """The evaluations (logging.eval_every) as a table: step, minutes since ``start`` (the
    first logged record), scores; then the best one."""
    from distillkit.engine.evaluate import BEST_DIR, BEST_META, EVAL_LOG

    rows = read_jsonl(output_dir / EVAL_LOG)
    if not rows:
        return []
    keys = [k for k in rows[0] if k not in ("step", "time", "best", "seconds")]
    start = rows[0]["time"] if start is None else start
    lines = ["| step | min | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        cells = [f"{r[k]:.4g}" for k in keys]
        lines.append(
            f"| {r['step']} | {(r['time'] - start) / 60:.1f} | " + " | ".join(cells) + " |"
        )
    meta = output_dir / BEST_DIR / BEST_META
    if meta.is_file():
        best = json.loads(meta.read_text())
        lines.append(f"\nBest by {best['select_by']}: step {best['step']} ({best['score']:.4g}).")
    return ["## Evaluation", "\n".join(lines)]


def _table(rows: list[tuple[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return "\n".join(["| key | value |", "|---|---|", *(f"| `{k}` | {cell(v)} |" for k, v in rows)])


def write_report(output_dir: Path, config: dict[str, Any], *, smoke: bool = False) -> Path:
    """Write OUTPUT_DIR/report.md (and curves.png) from the files of a finished run."""
    output_dir = Path(output_dir)
    records = read_jsonl(output_dir / "metrics.jsonl")
    threshold = config.get("logging", {}).get("collapse_threshold")
    curves = plot_curves(records, output_dir / CURVES, threshold) if records else None
    grids = sorted((output_dir / "samples").glob("step-*.png"))
    diversity = read_jsonl(output_dir / "samples" / "diversity.jsonl")
    teacher = config.get("teacher", {})
    parts = [
        f"# Run report: {config.get('recipe', {}).get('name')} on {teacher.get('family')}",
        f"Teacher: `{'tiny random (--smoke)' if smoke else teacher.get('model_id')}`, "
        f"output: `{output_dir}`.",
    ]
    if records:
        last = {k: v for k, v in records[-1].items() if k != "time"}
        parts += ["## Final metrics", _table(list(last.items()))]
    for name in ("train.json", "export.json"):
        if (output_dir / name).is_file():
            data = json.loads((output_dir / name).read_text())
            parts += [f"## {name[:-5].capitalize()}", _table(list(data.items()))]
    if curves is not None:
        parts += ["## Curves", f"![training curves]({CURVES})"]
    elif records:
        parts += ["## Curves", "(matplotlib is not installed: pip install 'distillkit[logging]')"]
    parts += _evaluation_lines(output_dir, records[0].get("time") if records else None)
    if grids:
        rel = grids[-1].relative_to(output_dir).as_posix()
        parts += [
            "## Samples",
            f"Last grid ({grids[-1].stem}): fixed prompts and seeds.",
            f"![]({rel})",
        ]
    if diversity:
        warnings = [d["warning"] for d in diversity if "warning" in d]
        last = diversity[-1]
        line = (
            f"Last diversity ratio {last['collapse/diversity_ratio']:.3g}, detail ratio "
            f"{last['collapse/detail_ratio']:.3g} (student / teacher, same prompts and noise)."
        )
        parts += ["## Collapse guard", line]
        parts += [f"- **warning**: {w}" for w in warnings] or ["No collapse warning."]
    dumped = yaml.safe_dump(config, sort_keys=False)
    parts += ["## Config", f"```yaml\n{dumped}```"]
    path = output_dir / REPORT
    path.write_text("\n\n".join(parts) + "\n")
    return path


class ReportCallback(Callback):
    def on_train_end(self, trainer: Trainer, result: RunResult) -> None:
        config = trainer.cfg.model_dump(mode="json")
        path = write_report(trainer.output_dir, config, smoke=trainer.smoke)
        trainer.accelerator.print(f"run report:        {path}")
