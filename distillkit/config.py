"""Run configuration: nested pydantic sections, strict keys, recipe chosen by its ``name``.

A recipe YAML is the whole truth about a run; ``key.sub=value`` overrides on the command line
edit it before validation, so a typo anywhere fails at start with the field's path.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from distillkit.errors import ConfigError
from distillkit.registry import recipe_config_union
from distillkit.schema import Strict

Family = Literal["sd15", "sdxl", "sana", "sd3", "flux", "zimage"]
Precision = Literal["no", "fp16", "bf16"]


class TeacherLora(Strict):
    """A style or character LoRA the teacher wears for the whole run (docs/teacher_loras.md)."""

    path: str = Field(
        min_length=1, description="a .safetensors file, a folder holding one, or a Hub repo id"
    )
    weight_name: str | None = Field(None, description="the file inside a folder or repo")
    scale: float = Field(1.0, ge=-8, le=8, description="the LoRA's strength, as set_adapters")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_]{1,40}$", description="adapter name (default: its index)"
    )


class TeacherConfig(Strict):
    """Which diffusers pipeline to distil. ``card`` fills the rest from teachers/*.yaml."""

    card: str | None = None
    model_id: str | None = Field(None, description="Hub id or local pipeline directory")
    revision: str | None = Field(None, description="Pinned commit / tag on the Hub")
    family: Family | None = None
    resolution: int | None = Field(None, ge=8, le=4096)
    default_guidance: float | None = Field(None, ge=0)
    max_sequence_length: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="text tokens per prompt (SANA, SD3, FLUX pipelines: their call argument of "
        "this name); the run encodes at this length and the export and its card ship it",
    )
    guidance: Literal["auto", "cfg", "embedded"] = Field(
        "auto",
        description="how recipes' guidance scales reach the teacher: cfg (two passes with the "
        "empty prompt) or embedded (the network's guidance input: FLUX.1-dev); auto picks "
        "embedded where the network has the input",
    )
    license: str | None = Field(None, description="the Hub licence id, e.g. openrail++ or other")
    license_name: str | None = Field(None, description="for license: other, e.g. its Hub name")
    license_link: str | None = Field(None, description="where the licence text is")
    variant: str | None = Field(None, description="e.g. fp16 weights variant on the Hub")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    use_safetensors: bool = Field(True, description="False allows pickle weights (unsafe)")
    trust_remote_code: bool = False
    loras: list[TeacherLora] = Field(
        default_factory=list,
        description="LoRAs loaded with the pipeline's load_lora_weights and fused for the run: "
        "the student learns base + these",
    )

    @field_validator("loras")
    @classmethod
    def _lora_names_unique(cls, loras: list[TeacherLora]) -> list[TeacherLora]:
        names = [lora.name or str(i) for i, lora in enumerate(loras)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"two LoRAs share the name {repeated[0]!r}: give each its own name")
        return loras

    def require(self) -> None:
        for name in ("model_id", "family", "resolution"):
            if getattr(self, name) is None:
                raise ConfigError(
                    f"teacher.{name} is not set: give it in the YAML or through teacher.card"
                )


class LoraConfigSection(Strict):
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1
    )


class StudentConfig(Strict):
    """The one-step generator, initialised from the teacher's denoiser."""

    type: Literal["lora", "full"] = "full"
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    shared_base: bool = Field(
        False,
        description="LoRA roles as adapters on the teacher's own denoiser: one copy of the base",
    )
    start_timestep: int | None = Field(
        None,
        ge=1,
        description="timestep the generator sees with pure noise (SiD-LSG's t_init); None = T-1. "
        "Epsilon teachers at T-1 divide the generator's error by alpha_T (~0.07): a fine speckle",
    )
    step_counts: list[Annotated[int, Field(ge=1, le=8)]] | None = Field(
        None,
        min_length=2,
        description="one student for several step counts, e.g. [1, 2, 4]: each generator update "
        "draws one (recipes whose config says takes_step_counts: DMD2, SiD, LCM as MLCM)",
    )

    @field_validator("step_counts")
    @classmethod
    def _counts_distinct(cls, counts: list[int] | None) -> list[int] | None:
        if counts is not None and len(set(counts)) != len(counts):
            raise ValueError(f"{counts} names a step count twice")
        return sorted(counts) if counts is not None else None


class DatasetSource(Strict):
    """A `datasets` source: local data file(s) or folder (imagefolder, parquet, ...) or Hub name."""

    path: str = Field(description="data file, folder, saved dataset, or Hub dataset name")
    name: str | None = Field(None, description="dataset configuration name (Hub datasets)")
    split: str = "train"
    revision: str | None = None
    column: str = Field("text", description="the prompt / caption column")
    image_column: str = Field("image", description="the image column (image-text sets)")
    limit: int | None = Field(None, ge=1, description="use only the first N rows")


class DataConfig(Strict):
    prompts: str | None = Field(
        None, description=".txt / .jsonl / .csv file, 'digits' or 'digits-compose'"
    )
    prompt_column: str = "text"
    images: str | None = Field(
        None,
        description="folder of real images, 'digits', 'digits:<style>' (bold, slant) or "
        "'digits-compose'",
    )
    prompts_dataset: DatasetSource | None = Field(None, description="prompts via `datasets`")
    images_dataset: DatasetSource | None = Field(None, description="image-text pairs via datasets")
    cache_dir: str | None = Field(None, description="text-embedding / VAE-latent cache folder")
    shuffle: bool = True


class EmaConfig(Strict):
    decay: float = Field(0.0, ge=0, lt=1, description="0 disables the generator EMA")
    use_for_export: bool = True


class TrainConfig(Strict):
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1, description="per device, before accumulation")
    grad_accumulation: int = Field(1, ge=1)
    seed: int = 0
    mixed_precision: Precision = "no"
    gradient_checkpointing: bool = False
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    max_grad_norm: float = Field(10.0, gt=0)
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw8bit: bitsandbytes 8-bit AdamW (CUDA), ~2 instead of 8 B/param"
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    ema: EmaConfig = Field(default_factory=EmaConfig)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    checkpoint_every: int = Field(500, ge=1)
    checkpoints_keep: int = Field(2, ge=1)
    nan_policy: Literal["skip", "rollback", "stop"] = Field(
        "skip", description="on a NaN/Inf loss or gradient: skip the update, roll back, or stop"
    )
    nan_max_skips: int = Field(10, ge=1, description="consecutive skipped steps before stopping")
    rollback_lr_factor: float = Field(0.5, gt=0, le=1)
    preempt_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2"]] = Field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"],
        description="signals that checkpoint at the next step and exit 75 (SLURM, Kubernetes)",
    )
    preempt_grace_s: float = Field(
        60.0, ge=0, description="seconds the scheduler gives after its signal before it kills"
    )
    collective_timeout_s: float = Field(
        600.0,
        gt=0,
        description="multi-process runs: seconds a rank waits for the others (a dead or hung "
        "rank) before it stops with a message",
    )


class ExportConfig(Strict):
    enabled: bool = True
    verify: bool = True
    tolerance: float = Field(1e-4, gt=0, description="fp32 teachers: max abs output difference")
    relative_tolerance: float = Field(
        0.02,
        gt=0,
        lt=1,
        description="bf16/fp16 teachers: relative RMS output difference (the pipeline's own "
        "half-precision rounding dominates there; the weights are compared bit for bit)",
    )
    lora_file: bool = True
    select: Literal["last", "best"] = Field(
        "last",
        description="best: export the generator (EMA if used) that scored best in "
        "logging.eval_every's evaluations, by logging.eval_select_by",
    )


EVAL_DIRECTIONS = {"fd": "min", "px_fd": "min", "accuracy": "max", "px_accuracy": "max"}
EVAL_DIRECTIONS["clip_score"] = "max"


class LoggingConfig(Strict):
    every: int = Field(10, ge=1)
    backends: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["jsonl"]
    )
    progress_bar: bool = True
    sample_every: int = Field(500, ge=0, description="sample grid every N steps (0: never)")
    sample_prompts: list[str] | None = Field(None, description="default: a few built-in prompts")
    sample_per_prompt: int = Field(2, ge=1, description="seeds per prompt (grid columns)")
    sample_seed: int = 0
    collapse_threshold: float = Field(
        0.3, ge=0, description="warn when sample diversity / the teacher's falls below this"
    )
    collapse_teacher_steps: int = Field(25, ge=1, description="teacher steps for the reference")
    report: bool = Field(True, description="loss curves and OUTPUT_DIR/report.md at the end")
    eval_every: int = Field(0, ge=0, description="score the generator every N steps (0: never)")
    eval_metrics: list[Literal["digits", "clip"]] = Field(
        default_factory=lambda: ["digits"],
        description="digits: both digits judges (digits teachers); clip: CLIP score",
    )
    eval_select_by: Literal["fd", "px_fd", "accuracy", "px_accuracy", "clip_score"] = Field(
        "fd", description="the score export.select: best ranks by (FDs lower, others higher)"
    )
    eval_per_class: int = Field(20, ge=2, description="digits: samples per digit (10 digits)")
    eval_prompts: list[str] | None = Field(None, description="clip: default the sample prompts")
    eval_per_prompt: int = Field(4, ge=1, description="clip: seeds per prompt")
    eval_seed: int = 0
    eval_clip_model: str = "ViT-L-14"
    eval_clip_weights: str | None = Field(None, description="clip: open_clip weights on disk")

    @model_validator(mode="after")
    def _check_eval(self) -> LoggingConfig:
        metric = "clip" if self.eval_select_by == "clip_score" else "digits"
        if self.eval_every and metric not in self.eval_metrics:
            raise ValueError(
                f"logging.eval_select_by={self.eval_select_by!r} is a {metric} score: add "
                f"{metric!r} to logging.eval_metrics"
            )
        if self.eval_every and "clip" in self.eval_metrics and not self.eval_clip_weights:
            raise ValueError(
                "logging.eval_metrics has 'clip': set logging.eval_clip_weights to an open_clip "
                "weight file on disk (nothing is downloaded)"
            )
        return self


class HubConfig(Strict):
    """Push the export to the Hugging Face Hub when the run ends (token: HF_TOKEN or login)."""

    push: bool = False
    repo_id: str | None = Field(None, pattern=r"^([\w.-]+/)?[\w.-]+$")
    private: bool = False
    revision: str | None = None

    @model_validator(mode="after")
    def _needs_repo(self) -> HubConfig:
        if self.push and not self.repo_id:
            raise ValueError("hub.repo_id is required when hub.push is true (e.g. me/my-model)")
        return self


@functools.cache
def _run_config_class() -> type:
    """RunConfig, built on first use. Its recipe section is the union of every registered
    recipe's config, and the recipes import torch: built lazily, ``import distillkit.config``
    stays light (the sections, overrides and YAML reading), as diffusers' lazy modules do."""
    recipe_section = Annotated[recipe_config_union(), Field(discriminator="name")]

    class RunConfig(Strict):
        output_dir: str = Field("runs/default", min_length=1)
        teacher: TeacherConfig
        student: StudentConfig = Field(default_factory=StudentConfig)
        recipe: recipe_section
        data: DataConfig = Field(default_factory=DataConfig)
        train: TrainConfig = Field(default_factory=TrainConfig)
        export: ExportConfig = Field(default_factory=ExportConfig)
        logging: LoggingConfig = Field(default_factory=LoggingConfig)
        hub: HubConfig = Field(default_factory=HubConfig)

        @model_validator(mode="after")
        def _check_hub(self) -> RunConfig:
            if self.hub.push and not self.export.enabled:
                raise ValueError(
                    "hub.push needs export.enabled: true (the export is what is pushed)"
                )
            return self

        @model_validator(mode="after")
        def _check_eval(self) -> RunConfig:
            if self.export.select == "best" and not self.logging.eval_every:
                raise ValueError(
                    "export.select: best needs evaluations to pick from: set "
                    "logging.eval_every (e.g. 100)"
                )
            digits = self.data.prompts == "digits"
            if self.logging.eval_every and "digits" in self.logging.eval_metrics and not digits:
                raise ValueError(
                    "logging.eval_metrics: 'digits' judges digit prompts, for a run distilling "
                    "a digits teacher (data.prompts: digits); use eval_metrics: [clip]"
                )
            return self

        @model_validator(mode="after")
        def _check_combination(self) -> RunConfig:
            allowed = getattr(self.recipe, "students", ("lora", "full"))
            if self.student.type not in allowed:
                raise ValueError(
                    f"student.type={self.student.type!r} is not supported by recipe "
                    f"{self.recipe.name!r}; use one of {list(allowed)}"
                )
            if self.student.step_counts and not getattr(self.recipe, "takes_step_counts", False):
                raise ValueError(
                    f"student.step_counts: recipe {self.recipe.name!r} trains one step count "
                    "(DMD2, SiD and LCM train several); remove it"
                )
            if self.student.step_counts and getattr(self.recipe, "generator_steps", 1) != 1:
                raise ValueError(
                    "student.step_counts and recipe.generator_steps both set the step count: "
                    "keep one"
                )
            return self

    RunConfig.__qualname__ = "RunConfig"  # pickles and reprs as distillkit.config.RunConfig
    return RunConfig


def __getattr__(name: str):
    if name == "RunConfig":  # `from distillkit.config import RunConfig` builds it
        return _run_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string; users mean a number
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def _merge_card(data: dict, base_dir: Path) -> None:
    """Fill teacher fields from its card; fields given in the run config win."""
    teacher = data.get("teacher")
    if not isinstance(teacher, dict) or not teacher.get("card"):
        return
    card_path = Path(teacher["card"])
    if not card_path.is_absolute():
        card_path = (base_dir / card_path).resolve()
    card = read_yaml(card_path)
    teacher["card"] = str(card_path)
    for key, value in card.items():
        teacher.setdefault(key, value)


def format_validation_error(err: ValidationError) -> str:
    from distillkit.registry import RECIPES

    lines = []
    for item in err.errors():
        parts = [str(p) for p in item["loc"] if not str(p).startswith("function-")]
        if len(parts) > 1 and parts[0] == "recipe" and parts[1] in RECIPES:
            del parts[1]  # the union's tag: the user wrote recipe.x, not recipe.dmd2.x
        loc = ".".join(p for p in parts if p != "[key]")
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; `distillkit validate` lists the sections)"
        elif item["type"] == "union_tag_invalid":
            msg = f"{msg} (see `distillkit ls` for recipe names)"
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:  # noqa: F821
    """Read a recipe YAML, apply overrides, resolve the teacher card, validate strictly."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [])
    _merge_card(data, path.parent)
    try:
        return _run_config_class().model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
