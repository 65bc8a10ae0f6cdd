"""The model card's "## Evaluation" section, filled from a `distillkit eval --prompts` result.

Why here (export): the card is what leaves a run, and this works on the result JSON alone (no
torch, no metric models), so `distillkit eval --card` writes it and `distillkit push` keeps it.
The section is one table (a row per scored pipeline: student, teacher) and one protocol line
(samples, prompt file hash, seeds, resolution, resize, metric implementations, weight hashes),
so a reader can tell whether two cards' numbers are comparable. A hidden marker names the
section as generated: re-running replaces it, never adds a second one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from distillkit.errors import ConfigError

HEADING = "## Evaluation"
MARKER = "<!-- distillkit eval:"
COLUMNS = (
    ("fid", "FID", "{:.3f}"),
    ("clip_score", "CLIP", "{:.3f}"),
    ("precision", "prec", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
)
_FENCE = re.compile(r"^\s*(```|~~~)")
_BEFORE = ("## Licence", "## Samples")  # where render_model_card puts its own evaluation


def runs_table(rows: list[dict[str, Any]]) -> str:
    """One markdown table, a row per pipeline (student beside its teacher)."""
    shown = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    head = ["run", "steps", "guidance", "samples", *[c[1] for c in shown]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["label"]), str(r["steps"]), f"{r['guidance']:g}", str(r["n"])]
        cells += [fmt.format(r[key]) if key in r else "-" for key, _, fmt in shown]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _short(digest: str | None) -> str:
    return f"`{digest[:12]}`" if digest else "?"


def protocol_line(protocol: dict[str, Any]) -> str:
    """The protocol in one line: what decides the numbers, hashes shortened to 12 digits."""
    prompts = protocol.get("prompt_file") or {}
    said = f"{protocol.get('samples')} samples"
    if protocol.get("images_per_prompt", 1) > 1:
        said += f" ({protocol.get('prompts')} prompts x {protocol['images_per_prompt']})"
    if prompts:
        said += f" from `{Path(prompts['file']).name}` (sha256 {_short(prompts.get('file_sha256'))}"
        said += f", {prompts.get('selection')})"
    parts = [f"protocol `{protocol['name']}`"] if protocol.get("name") else []
    parts += [
        said,
        f"seed {protocol.get('seed')} (batch k of {protocol.get('batch_size')}: seed + k)",
        f"{protocol.get('resolution')} px",
    ]
    fid = protocol.get("fid")
    if fid:
        resize = str(fid.get("resize", "")).split(" (")[0]
        ref = fid.get("reference_samples")
        parts.append(
            f"FID: {fid.get('implementation')}, resize {resize}, Inception weights sha256 "
            f"{_short((fid.get('weights') or {}).get('sha256'))}"
            + (f", {ref} reference images" if ref else "")
        )
    if protocol.get("precision_recall"):
        k = protocol["precision_recall"].get("neighbours")
        parts.append(f"precision/recall: torch-fidelity, k={k}, on those features")
    clip = protocol.get("clip")
    if clip:
        parts.append(
            f"CLIP score: {clip.get('model')}, 100 * max(cos, 0), weights sha256 "
            f"{_short(clip.get('weights_sha256'))}"
        )
    return "*Protocol:* " + "; ".join(parts) + "."


def evaluation_section(results: dict[str, Any], source: str) -> str:
    """The whole section for one result file (``source``: its name, shown in the marker)."""
    if not isinstance(results.get("runs"), list) or not isinstance(results.get("protocol"), dict):
        raise ConfigError(
            f"--card: {source} is not a `distillkit eval --prompts` result (no runs / protocol)"
        )
    note = f"{MARKER} from {source}; `distillkit eval --card` rewrites this section -->"
    return "\n\n".join(
        [HEADING, note, runs_table(results["runs"]), protocol_line(results["protocol"])]
    )


def _sections(text: str) -> list[tuple[int, str]]:
    """(line number, heading) of every level-1/2 heading outside code blocks."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines()):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,2} ", line):
            found.append((number, line.strip()))
    return found


def _span(text: str) -> tuple[int, int] | None:
    """Lines [start, end) of the card's evaluation section, if it has one."""
    heads = _sections(text)
    for i, (number, title) in enumerate(heads):
        if title == HEADING:
            end = heads[i + 1][0] if i + 1 < len(heads) else len(text.splitlines())
            return number, end
    return None


def generated_section(text: str) -> str | None:
    """The section `distillkit eval --card` wrote into ``text``, if there is one."""
    span = _span(text)
    if span is None:
        return None
    body = "\n".join(text.splitlines()[span[0] : span[1]]).strip()
    return body if MARKER in body else None


def replace_section(text: str, section: str) -> str:
    """``text`` with its evaluation section replaced by ``section`` (else inserted before the
    licence / samples sections, else appended)."""
    lines = text.rstrip("\n").splitlines()
    span = _span(text)
    if span is None:
        heads = [n for n, title in _sections(text) if title in _BEFORE]
        at = heads[0] if heads else len(lines)
        span = (at, at)
    before, after = lines[: span[0]], lines[span[1] :]
    while before and not before[-1].strip():
        before.pop()
    parts = ["\n".join(before), section.strip(), "\n".join(after).strip()]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_eval_card(pipeline_dir: Path | str, results: dict[str, Any], source: str) -> Path:
    """Put the section into pipeline_dir/README.md (a minimal card when there is none)."""
    path = Path(pipeline_dir) / "README.md"
    section = evaluation_section(results, source)
    old = path.read_text(encoding="utf-8") if path.is_file() else f"# {Path(pipeline_dir).name}\n"
    path.write_text(replace_section(old, section), encoding="utf-8", newline="\n")
    return path
