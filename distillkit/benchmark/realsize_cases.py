"""What the real-size checks run: shipped recipes on random-weight real-size teachers.

Why: `make bench-realsize` (CPU) and `make gpu-check` (one CUDA machine) ask the same question,
"does the path users run hold at the published sizes, and is `distillkit plan` right about it?",
so they share the cases, their CLI overrides, the small data set, and how a run is recorded.
Nothing here imports torch: the GPU check's parent process stays off the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
FAMILIES = ("sd15", "sdxl", "sana", "sd3")  # what a 24 GiB CPU machine can hold (bench-realsize)
GPU_FAMILIES = (*FAMILIES, "flux")  # FLUX.1-dev's 12B + T5-XXL: only on the GPU check
FAMILY_CARDS = {"sd15": "sd15", "sdxl": "sdxl_base", "sana": "sana_1600m_1024"}
FAMILY_CARDS.update(sd3="sd35_medium", flux="flux1_dev")
# cases `distillkit plan` puts beyond one 141 GB H200 (full FLUX DMD2: about 389 GiB)
TOO_BIG_FOR_ONE_GPU = {("flux", "dmd2_full")}
LORA_SHARED = ("student.type=lora", "recipe.fake_score=lora", "student.shared_base=true")
# case name -> (recipe YAML prefix, overrides that make the case)
CASE_KINDS = {
    "dmd2_lora_shared": ("dmd2", LORA_SHARED),
    "dmd2_full": ("dmd2", ()),
    "lcm_lora": ("lcm_lora", ()),
}
PROMPTS = (
    "a handwritten digit seven",
    "a photo of a cat",
    "a handwritten digit three",
    "a lighthouse at dusk, watercolor",
)
GIB = 2**30


@dataclass(frozen=True)
class Case:
    family: str
    kind: str  # a CASE_KINDS key
    attention: str = "sdpa"

    @property
    def name(self) -> str:
        tail = "" if self.attention == "sdpa" else f"_{self.attention}"
        return f"{self.family}_{self.kind}{tail}"

    @property
    def yaml(self) -> Path:
        return RECIPES / f"{CASE_KINDS[self.kind][0]}_{self.family}.yaml"

    def overrides(
        self,
        teacher_dir: Path,
        data: dict[str, Path],
        output_dir: Path,
        resolution: int | None = None,
        batch_size: int | None = None,
    ) -> list[str]:
        """The CLI overrides of this case (the YAML's own data keys decide which data it gets)."""
        import yaml

        shipped = yaml.safe_load(self.yaml.read_text()).get("data") or {}
        out = [
            f"teacher.model_id={teacher_dir}",
            "teacher.dtype=bf16",
            "teacher.variant=null",  # the cards' Hub variants (fp16 / bf16 file names)
            f"data.prompts={data['prompts']}",
            f"output_dir={output_dir}",
            f"train.attention={self.attention}",
            "logging.every=1",  # a metrics line per step: per-step seconds
            "logging.sample_every=0",  # grids need 25 teacher steps: not what is measured
            "logging.progress_bar=false",
        ]
        if "images" in shipped:
            out.append(f"data.images={data['images']}")
        if resolution is not None:
            out.append(f"teacher.resolution={resolution}")
        if batch_size is not None:
            out += [f"train.batch_size={batch_size}", "train.grad_accumulation=1"]
        return [*out, *CASE_KINDS[self.kind][1]]


def write_bench_data(folder: Path, n_images: int = 4) -> dict[str, Path]:
    """A prompt file and an image folder (UCI digits, 64 px, with captions) for the GAN and
    LCM terms: enough to exercise the data path; the weights are random anyway."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    images = folder / "images"
    images.mkdir(exist_ok=True)
    digits = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows = []
    for i in range(n_images):
        pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        img = Image.fromarray(pixels).resize((64, 64), Image.NEAREST).convert("RGB")
        img.save(images / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"a handwritten digit {names[i]}"})
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"prompts": prompts, "images": images}


def step_records(run_dir: Path) -> list[dict]:
    """Per-step seconds and losses from metrics.jsonl (logging.every=1)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        speed = rec.get("steps_per_s")
        roles = sorted(k.split("/")[0] for k in rec if k.endswith("/loss"))
        losses = {k: round(v, 5) for k, v in rec.items() if k.endswith("/loss")}
        seconds = round(1 / speed, 3) if speed else None
        out.append({"step": rec["step"], "seconds": seconds, "roles": roles, "losses": losses})
    return out


def plan_summary(yaml_path: Path, overrides: list[str], device: str) -> dict:
    """`distillkit plan` for the same config and overrides, row by row (GiB)."""
    from distillkit.config import load_config
    from distillkit.plan import plan_memory

    plan = plan_memory(load_config(yaml_path, overrides), device=device)
    rows = [[label, round(b / GIB, 3)] for label, b in plan.rows]
    return {"device": device, "total_gib": round(plan.total / GIB, 3), "rows": rows}


def file_sizes(folder: Path) -> dict:
    """Every file under ``folder`` with its size, and the total (bytes)."""
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    return {"total_bytes": sum(files.values()), "files": files}


def mem_available() -> int:
    """MemAvailable in bytes (what a new process can take without swapping)."""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0
