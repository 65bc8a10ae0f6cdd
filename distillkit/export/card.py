"""The model card of an exported student, and what it and distillkit.json say about a run.

Why in export: the card says how to call the export (steps, guidance, SANA's sigmas) and how it
was made; it is written with the pipeline, rebuilt by `distillkit push`, and read back by the
evaluation harness (``export_call_defaults``). Nothing here touches the network or a token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from distillkit.config import RunConfig
from distillkit.export.pipeline import EXPORT_META, PROMPT_CALL_KWARGS
from distillkit.registry import get_family

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FAMILY_NAMES = {
    "sd15": "Stable Diffusion 1.5", "sdxl": "Stable Diffusion XL", "sana": "SANA",
    "sd3": "Stable Diffusion 3", "flux": "FLUX.1", "zimage": "Z-Image",
}  # fmt: skip
_LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class CardInfo:
    """What the model card says; filled by export/eval, rendered by `render_model_card`."""

    teacher_id: str  # hub id or local path the teacher came from
    teacher_revision: str | None
    family: str  # a registered family: "sd15", "sdxl", "sana", "sd3", ...
    pipeline_class: str  # e.g. "StableDiffusionPipeline"
    recipe: str  # e.g. "dmd2"
    student: str  # "lora" | "full"
    num_inference_steps: int  # steps the student is meant to be called with (usually 1)
    guidance_scale: float  # usually 0.0 for distilled students
    scheduler: str  # scheduler class name stored in the export
    license: str | None = None  # taken from the teacher card
    license_name: str | None = None  # with license "other": which one (e.g. FLUX.1-dev's)
    license_link: str | None = None
    config_summary: dict[str, Any] = field(default_factory=dict)  # flat key -> value
    eval_results: dict[str, Any] | list[dict[str, Any]] | None = None  # metrics or table rows
    sample_grid: str | None = None  # relative path of a PNG inside the pipeline dir
    has_lora: bool = False  # ../lora/pytorch_lora_weights.safetensors exists alongside
    repo_id: str | None = None  # where it will be pushed; makes the usage snippet copy-paste ready
    # per shipped step count, the call arguments beyond steps and guidance (SANA's few-step
    # sigmas), as the export's distillkit.json gives them
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    # teacher.loras the student was distilled with: (public name, scale); no local paths
    teacher_loras: list[tuple[str, float]] = field(default_factory=list)
    step_counts: list[int] = field(default_factory=list)  # student.step_counts, if several


def shipped_extras(call: dict[str, Any]) -> dict[str, Any]:
    """A shipped call's arguments beyond steps and guidance (SANA's few-step ``sigmas``): what a
    caller must add to reproduce the training grid (distillkit.json ``calls`` entries)."""
    return {k: v for k, v in call.items() if k not in ("num_inference_steps", "guidance_scale")}


def _extra_args(info: CardInfo, steps: int) -> str:
    extra = shipped_extras(info.calls.get(str(steps), {}))
    return "".join(f", {k}={v!r}" for k, v in extra.items())


def _is_hub_id(ref: str) -> bool:
    """A hub id ("org/name") rather than a local path; the Hub rejects paths as base_model."""
    return bool(_HUB_ID.fullmatch(ref)) and not Path(ref).exists()


def _teacher_ref(info: CardInfo) -> str:
    """Hub id as-is; for a local teacher only the folder name (no local paths in public cards)."""
    return info.teacher_id if _is_hub_id(info.teacher_id) else Path(info.teacher_id).name


def _fmt(value: Any) -> str:
    """One table cell: compact numbers, no line breaks or pipes that would break the table."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_fmt(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _front_matter(info: CardInfo) -> dict[str, Any]:
    steps_tag = "one-step" if info.num_inference_steps == 1 else "few-step"
    tags = ["distillkit", info.recipe, info.family, steps_tag, "text-to-image", "diffusers"]
    if info.has_lora:
        tags.append("lora")
    meta: dict[str, Any] = {}
    if info.license:
        meta["license"] = info.license
    if info.license_name:
        meta["license_name"] = info.license_name
    if info.license_link:
        meta["license_link"] = info.license_link
    if _is_hub_id(info.teacher_id):
        meta["base_model"] = info.teacher_id
    meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = "text-to-image"
    meta["tags"] = list(dict.fromkeys(tags))  # unique, order kept
    return meta


def _usage(info: CardInfo) -> str:
    """A runnable snippet: the full pipeline, and the LoRA-on-teacher variant when shipped."""
    repo = info.repo_id or "your-username/your-model"
    call = (
        f'image = pipe("a photo of an astronaut riding a horse", '
        f"num_inference_steps={info.num_inference_steps}, "
        f"guidance_scale={float(info.guidance_scale)!r}"
        f"{_extra_args(info, info.num_inference_steps)}).images[0]"
    )
    lines = [
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline"
        + (f", {info.scheduler}" if info.has_lora else ""),
        "",
        'device = "cuda" if torch.cuda.is_available() else "cpu"',
        'dtype = torch.float16 if device == "cuda" else torch.float32',
        f'pipe = DiffusionPipeline.from_pretrained("{repo}", torch_dtype=dtype).to(device)',
        call,
        'image.save("sample.png")',
    ]
    if info.has_lora:
        lines += [
            "",
            "# Or: the teacher plus the distilled LoRA and the one-step scheduler"
            + (
                " (the LoRA holds the teacher's style LoRAs too: load it alone)"
                if info.teacher_loras
                else ""
            ),
            f'pipe = DiffusionPipeline.from_pretrained("{_teacher_ref(info)}", '
            "torch_dtype=dtype).to(device)",
            f'pipe.load_lora_weights("{repo}", subfolder="lora", weight_name="{_LORA_FILE}")',
            f'pipe.scheduler = {info.scheduler}.from_pretrained("{repo}", subfolder="scheduler")',
            call,
        ]
    if repo != info.repo_id:
        lines.insert(6, "# replace with this repo's id, or the local path of this folder")
    return "\n".join([*lines, "```"])


def public_lora_name(spec: dict) -> str:
    """A Hub LoRA as repo (and file); a local one by its file name only."""
    path, weight = str(spec["path"]), spec.get("weight_name")
    if _is_hub_id(path):
        return f"{path}/{weight}" if weight else path
    return weight or Path(path).name


def _teacher_loras(info: CardInfo) -> list[str]:
    if not info.teacher_loras:
        return []
    said = ", ".join(f"`{name}` at scale {scale:g}" for name, scale in info.teacher_loras)
    return [
        f"The teacher wore these LoRAs for the whole distillation, fused into its weights: "
        f"{said}. This pipeline samples base + those LoRAs; do not load them again."
    ]


def _stacking(info: CardInfo) -> str:
    """The LCM-LoRA property: the distilled LoRA next to a style LoRA it never saw, as two
    active adapters (diffusers' set_adapters), sampled with the few-step scheduler."""
    repo = info.repo_id or "your-username/your-model"
    steps = max(int(k) for k in info.calls) if info.calls else info.num_inference_steps
    return "\n".join(
        [
            "```python",
            "import torch",
            f"from diffusers import DiffusionPipeline, {info.scheduler}",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{_teacher_ref(info)}", '
            'torch_dtype=torch.float16).to("cuda")',
            f'pipe.load_lora_weights("{repo}", subfolder="lora", weight_name="{_LORA_FILE}", '
            'adapter_name="speed")',
            'pipe.load_lora_weights("path/to/your_style_lora.safetensors", adapter_name="style")',
            'pipe.set_adapters(["speed", "style"], adapter_weights=[1.0, 0.8])',
            f'pipe.scheduler = {info.scheduler}.from_pretrained("{repo}", subfolder="scheduler")',
            f'image = pipe("a portrait in your style", num_inference_steps={steps}, '
            f"guidance_scale={float(info.guidance_scale)!r}{_extra_args(info, steps)}).images[0]",
            "```",
        ]
    )


def _other_calls(info: CardInfo) -> str:
    """The other step counts the export was checked at, with their arguments."""
    others = sorted(int(k) for k in info.calls if int(k) != info.num_inference_steps)
    if not others:
        return ""
    said = "; ".join(f"`num_inference_steps={k}{_extra_args(info, k)}`" for k in others)
    if info.step_counts:
        counts = ", ".join(str(k) for k in info.step_counts[:-1]) + f" and {info.step_counts[-1]}"
        return (
            f". One student for {counts} steps: each training update drew one of them, so "
            f"every count samples the grid it was trained on; also {said}"
        )
    return f". It also samples the grid it was trained on with {said}"


def _licence(info: CardInfo, teacher: str) -> str:
    name = info.license_name or info.license
    link = f" ({info.license_link})" if info.license_link else ""
    return (
        f"A distilled model is a derivative of its teacher: {teacher}'s licence, "
        f"`{name}`{link}, governs this model's use, weights and outputs; read it before use."
    )


def render_model_card(info: CardInfo) -> str:
    """README.md text: Hub metadata (YAML front matter), then how it was made and how to call it."""
    teacher = _teacher_ref(info)
    family = _FAMILY_NAMES.get(info.family, info.family)
    teacher_link = (
        f"[{teacher}](https://huggingface.co/{teacher})"
        if _is_hub_id(info.teacher_id)
        else f"a local teacher (`{teacher}`)"
    )
    revision = f" at revision `{info.teacher_revision}`" if info.teacher_revision else ""
    student = (
        "trained as LoRA adapters on the teacher's denoiser, fused into this pipeline's weights"
        if info.student == "lora"
        else "a fully trained copy of the teacher's denoiser"
    )
    steps = info.num_inference_steps
    n_steps = "one-step" if steps == 1 else f"{steps}-step"
    parts = [
        "---\n" + yaml.safe_dump(_front_matter(info), sort_keys=False, allow_unicode=True) + "---",
        f"# {info.recipe.upper()} {n_steps} student of {teacher}",
        f"A {n_steps} {family} text-to-image model (`{info.pipeline_class}`), distilled from "
        f"{teacher_link}{revision} with the **{info.recipe}** recipe of distillkit. "
        f"The student was {student}. The stored scheduler is `{info.scheduler}`, set up for "
        f"{n_steps} sampling; call it with `num_inference_steps={steps}` and "
        f"`guidance_scale={float(info.guidance_scale)!r}` "
        "(guidance is distilled into the student, so classifier-free guidance is not needed)"
        + _other_calls(info)
        + ".",
        *_teacher_loras(info),
        "## How to use",
        _usage(info),
    ]
    if info.has_lora:
        parts.append(
            f"The LoRA alone is in `lora/{_LORA_FILE}` (saved with its adapter metadata, so "
            "rank and alpha scaling survive reloading)."
        )
        parts += [
            "### Stacking with a style LoRA",
            "The distilled LoRA is an acceleration adapter: load it next to a style or "
            "character LoRA of the same base model as two active adapters, and sample in few "
            "steps without classifier-free guidance (lower the style's weight if it "
            "over-saturates).",
            _stacking(info),
        ]
    if info.config_summary:
        rows = [[f"`{k}`", v] for k, v in info.config_summary.items()]
        parts += ["## Training configuration", _table(["key", "value"], rows)]
    if info.eval_results:
        parts.append("## Evaluation")
        if isinstance(info.eval_results, dict):
            parts.append(
                _table(["metric", "value"], [[k, v] for k, v in info.eval_results.items()])
            )
        else:
            cols = list(dict.fromkeys(k for row in info.eval_results for k in row))
            parts.append(
                _table(cols, [[row.get(c, "") for c in cols] for row in info.eval_results])
            )
    if info.license:
        parts += ["## Licence", _licence(info, teacher)]
    if info.sample_grid:
        grid = PurePosixPath(Path(info.sample_grid).as_posix())
        if grid.is_absolute() or ".." in grid.parts:
            raise ValueError(
                f"sample_grid must be relative to the pipeline dir: {info.sample_grid}"
            )
        parts += ["## Samples", f"![{n_steps} samples]({grid})"]
    return "\n\n".join(parts) + "\n"


def write_model_card(pipeline_dir: Path, info: CardInfo) -> Path:
    """Write pipeline_dir/README.md (the Hub renders it as the model page)."""
    pipeline_dir = Path(pipeline_dir)
    if not pipeline_dir.is_dir():
        raise FileNotFoundError(f"pipeline directory not found: {pipeline_dir}")
    if info.sample_grid and not (pipeline_dir / info.sample_grid).is_file():
        raise FileNotFoundError(f"sample grid not found: {pipeline_dir / info.sample_grid}")
    meta = pipeline_dir / "distillkit.json"  # export.EXPORT_META: the shipped call arguments
    if meta.is_file() and not info.calls:
        shipped = json.loads(meta.read_text())
        info.calls = shipped.get("calls", {})
        info.guidance_scale = float(shipped.get("guidance_scale", info.guidance_scale))
    path = pipeline_dir / "README.md"
    path.write_text(render_model_card(info), encoding="utf-8", newline="\n")
    return path


def card_info(cfg: RunConfig, smoke: bool) -> CardInfo:
    teacher = cfg.teacher
    return CardInfo(
        teacher_id=("tiny random " + teacher.family) if smoke else str(teacher.model_id),
        teacher_revision=None if smoke else teacher.revision,
        family=teacher.family,
        pipeline_class=get_family(teacher.family).pipeline_class,
        recipe=cfg.recipe.name,
        student=cfg.student.type,
        num_inference_steps=1,
        guidance_scale=0.0,
        scheduler=get_family(teacher.family).export_scheduler_name,
        license=teacher.license,
        license_name=teacher.license_name,
        license_link=teacher.license_link,
        config_summary=flat_summary(cfg),
        has_lora=cfg.student.type == "lora" and cfg.export.lora_file,
        teacher_loras=[(public_lora_name(spec.model_dump()), spec.scale) for spec in teacher.loras],
        step_counts=list(cfg.student.step_counts or []),
    )


def flat_summary(cfg: RunConfig) -> dict:
    out = {}
    for section in ("recipe", "student", "train"):
        for key, value in getattr(cfg, section).model_dump(mode="json").items():
            if not isinstance(value, dict | list):
                out[f"{section}.{key}"] = value
    return out


def export_call_defaults(pipeline_dir: Path | str) -> dict[str, float | int]:
    """Steps and guidance a distillkit export is meant to be called with (its distillkit.json).

    Returns {} for a folder that is not a distillkit export (e.g. a teacher): the caller chooses.
    """
    meta = Path(pipeline_dir) / EXPORT_META
    if not meta.is_file():
        return {}
    data = json.loads(meta.read_text())
    return {k: data[k] for k in ("num_inference_steps", "guidance_scale") if k in data}


def export_resolution(pipeline_dir: Path | str) -> int | None:
    """The resolution an export was trained at (its distillkit.json), if it says."""
    meta = Path(pipeline_dir) / EXPORT_META
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("resolution")


def export_sampling_kwargs(pipeline_dir: Path | str, steps: int) -> dict:
    """Call arguments beyond steps and guidance that make an export sample its training grid at
    ``steps`` (SANA's few-step ``sigmas``), from its distillkit.json, with the arguments every
    call repeats (a card's ``max_sequence_length``); {} where it stores none."""
    meta = Path(pipeline_dir) / EXPORT_META
    if not meta.is_file():
        return {}
    data = json.loads(meta.read_text())
    shipped = shipped_extras(data.get("calls", {}).get(str(steps), {}))
    return {**data.get(PROMPT_CALL_KWARGS, {}), **shipped}
