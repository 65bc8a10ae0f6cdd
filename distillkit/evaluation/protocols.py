"""Recorded evaluation protocols: which prompts, how many samples, which metric models.

`--protocol coco` is the zero-shot text-to-image protocol of DMD2 / SiD / GigaGAN: captions
from COCO-2014 val (the user's file: the official `captions_val2014.json` or a prepared
.txt / .jsonl / .csv), 30K samples (10K also used), fixed seeds, generation at the pipeline's
resolution, FID with the TF-FID resize (see `fid.py`), CLIP score with open_clip ViT-g-14 (the
model DMD2 reports), precision / recall on the Inception features. Everything that decides a
number goes into the result file, so two files can be compared or refused as incomparable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distillkit.errors import ConfigError


@dataclass(frozen=True)
class Protocol:
    name: str
    samples: int
    metrics: tuple[str, ...]
    clip_model: str
    prompt_column: str
    note: str


PROTOCOLS = {
    "coco": Protocol(
        name="coco",
        samples=30000,
        metrics=("fid", "clip", "prc"),
        clip_model="ViT-g-14",
        prompt_column="caption",
        note="COCO-2014 val captions, zero-shot FID-30K as in DMD2 / GigaGAN (10K: --samples)",
    ),
}


def get_protocol(name: str | None) -> Protocol | None:
    if name is None:
        return None
    if name not in PROTOCOLS:
        raise ConfigError(f"--protocol: unknown {name!r}; available: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def read_captions(path: Path, column: str) -> list[str]:
    """Prompts from a COCO annotations .json (its `annotations[].caption`, by annotation id) or
    anything `read_prompts` reads (.txt, .jsonl, .csv)."""
    if path.suffix.lower() != ".json":
        from distillkit.data.sources import read_prompts

        try:
            return read_prompts(path, column)
        except ConfigError as err:  # its messages name the run config's fields; here: our flags
            text = str(err).replace("data.prompt_column", "--prompt-column")
            raise ConfigError(text.replace("data.prompts", "--prompts")) from None
    if not path.is_file():
        raise ConfigError(f"--prompts: {path} does not exist")
    try:
        data = json.loads(path.read_text())
        notes = sorted(data["annotations"], key=lambda a: a.get("id", 0))
        captions = [str(a["caption"]).strip() for a in notes]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ConfigError(
            f"--prompts: {path} is not a COCO captions file (annotations[].caption): "
            f"{type(err).__name__}"
        ) from None
    captions = [c for c in captions if c]
    if not captions:
        raise ConfigError(f"--prompts: {path} holds no captions")
    return captions


def select_prompts(prompts: list[str], samples: int | None, seed: int) -> tuple[list[str], str]:
    """``samples`` prompts: all in file order when the file holds exactly that many, else a
    seeded draw without replacement (numpy default_rng(seed)); returns the rule applied."""
    if samples is None or samples == len(prompts):
        return prompts, "all, in file order"
    if samples > len(prompts):
        raise ConfigError(
            f"--samples {samples}: the prompt file holds only {len(prompts)} prompts "
            "(lower --samples or use --images-per-prompt)"
        )
    index = np.random.default_rng(seed).choice(len(prompts), size=samples, replace=False)
    return [prompts[i] for i in sorted(index)], f"{samples} drawn with numpy default_rng({seed})"


def prompts_record(path: Path, chosen: list[str], rule: str, column: str) -> dict[str, Any]:
    """Which prompts were used, by hash: the file's bytes and the chosen list itself."""
    from distillkit.evaluation.fid import file_sha256

    listed = hashlib.sha256(json.dumps(chosen, ensure_ascii=False).encode()).hexdigest()
    return {
        "file": str(path),
        "file_sha256": file_sha256(path),
        "column": column,
        "selection": rule,
        "count": len(chosen),
        "prompts_sha256": listed,
    }


def format_runs(rows: list[dict[str, Any]]) -> str:
    """One markdown table, a row per pipeline: the one the model card shows (`--card`)."""
    from distillkit.export.eval_card import runs_table

    return runs_table(rows)
