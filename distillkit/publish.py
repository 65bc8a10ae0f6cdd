"""Publish a run's export: refresh the model card (repo id, eval table, sample grid), then push.

Why a layer over `hub.push_output`: the card is written at export time, before the repo id,
the evaluation and the final grid are known. Both the end-of-run push (hub.push: true) and
`distillkit push` rebuild it from the run's own files, so the Hub page is always current.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from distillkit.hub import CardInfo, push_output, write_model_card

logger = logging.getLogger(__name__)

GRID = "samples/grid.png"  # where the card's grid lives inside pipeline/


def latest_grid(output_dir: Path) -> Path | None:
    grids = sorted((Path(output_dir) / "samples").glob("step-*.png"))
    return grids[-1] if grids else None


def eval_rows(output_dir: Path) -> list[dict[str, Any]]:
    """One table row per eval JSON in the run dir (eval*.json, eval/*.json): scalar metrics."""
    output_dir = Path(output_dir)
    files = sorted(output_dir.glob("eval*.json")) + sorted(output_dir.glob("eval/*.json"))
    rows = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("skipping unreadable eval file %s", path)
            continue
        if not isinstance(data, dict):
            continue
        protocol = data.get("protocol") or {}
        row: dict[str, Any] = {"eval": path.stem, "steps": protocol.get("steps", "")}
        row |= {
            k: v
            for k, v in data.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "n"
        }
        row["samples"] = data.get("n", protocol.get("samples", ""))
        rows.append(row)
    return rows


def card_for_run(output_dir: Path, repo_id: str | None) -> CardInfo | None:
    """The run's CardInfo rebuilt from run.yaml + pipeline/distillkit.json; None if not a run."""
    from distillkit.config import RunConfig
    from distillkit.evaluation.generate import export_call_defaults
    from distillkit.export.card import card_info

    output_dir = Path(output_dir)
    run_file = output_dir / "run.yaml"
    if not run_file.is_file():
        return None
    try:
        saved = yaml.safe_load(run_file.read_text())
        cfg = RunConfig.model_validate(saved["config"])
    except Exception as err:  # an older schema: push as exported rather than fail
        logger.warning("cannot rebuild the card from %s: %s", run_file, err)
        return None
    info = card_info(cfg, bool(saved.get("smoke")))
    call = export_call_defaults(output_dir / "pipeline")
    info.num_inference_steps = int(call.get("num_inference_steps", info.num_inference_steps))
    info.guidance_scale = float(call.get("guidance_scale", info.guidance_scale))
    info.has_lora = (output_dir / "lora").is_dir()
    info.repo_id = repo_id
    info.eval_results = eval_rows(output_dir) or None
    return info


def refresh_card(output_dir: Path, repo_id: str | None) -> bool:
    """Copy the last sample grid into pipeline/ and rewrite README.md; False if not a run dir."""
    output_dir = Path(output_dir)
    info = card_for_run(output_dir, repo_id)
    if info is None:
        return False
    grid = latest_grid(output_dir)
    if grid is not None:
        target = output_dir / "pipeline" / GRID
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, target)
        info.sample_grid = GRID
    write_model_card(output_dir / "pipeline", info)
    return True


def publish(
    output_dir: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> tuple[str, bool]:
    """Refresh the card when the run's files allow it, then push; (commit URL, card refreshed)."""
    output_dir = Path(output_dir)
    refreshed = (output_dir / "pipeline").is_dir() and refresh_card(output_dir, repo_id)
    url = push_output(output_dir, repo_id, private=private, revision=revision, token=token)
    return url, refreshed
