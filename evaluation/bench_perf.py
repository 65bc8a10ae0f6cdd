"""`make bench-perf`: loop overhead, memory (measured vs `distillkit plan`), export latency.

CPU only, random weights, SD1.5 architecture at 256 px (32x32 latents):
- "mid" UNet: the SD1.5 block layout at 128-512 channels (~140M params); "real": the real
  859.5M-parameter SD1.5 UNet config. Both with small text encoder / VAE (not what is measured).
- overhead_ratio = Trainer step time / the bare forward+backward passes that step needs (same
  process, networks and shapes): every network call of real steps is recorded, then replayed
  bare with one backward per role update (perf_worker.record_passes). Every recipe with its
  shipped sd15 recipe section and EMA, full student, per-device batch 4, fp32, no
  checkpointing; DMD2 with fake_updates_per_generator=1 (and APT with one discriminator update)
  so a step has both roles; real images (LCM, APT) are the digits set at 256 px. Real steps and
  bare replays alternate in one process (medians of 5). update_s: the step's grad norm +
  optimiser + EMA time (fused AdamW, clip folded in; work a bare forward/backward does not do);
  overhead_ratio_without_update leaves it out.
- Batch 4 because the update's cost is fixed per step while the passes grow with batch and
  resolution: the shipped recipes run 2-32 per device at 512-1024 px (8-256x these passes per
  update). PERF_BATCH=B / PERF_ACCUMULATION=N measure other settings into "recipes_batch_B" /
  "recipes_batch_B_grad_accumulation_N" (batch 1: the update alone is 10-16 % of the passes).
- plan_validation: peak RSS growth of one real Trainer step vs plan_memory(device="cpu").
- adapter_shared_vs_teacher_inference: the adapter-shared DMD2 LoRA run's peak vs the teacher
  alone making one guided call; `bench_perf.py --teacher-footprint` measures only that.
Writes evaluation/results/perf.json. Each measurement runs in a fresh process (perf_worker.py).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import psutil
import yaml

from distillkit.benchmark.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("PERF_WORK", "/tmp/distillkit-perf"))
OUT = ROOT / "evaluation" / "results" / "perf.json"
UNETS = {"mid": (128, 256, 512, 512), "real": (320, 640, 1280, 1280)}
HEADLINE_BATCH = 4  # per-device batch of the "recipes" rows (docstring)
PROMPTS = ["a photo of a cat", "a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen"]


def teacher_dir(size: str) -> Path:
    """A saved SD1.5-layout pipeline with a random UNet of ``size`` (built once)."""
    out = WORK / f"teacher-{size}"
    if (out / "model_index.json").is_file():
        return out
    import torch
    from diffusers import UNet2DConditionModel

    from distillkit.teachers.tiny import TinySpec, build_tiny_pipeline

    pipe = build_tiny_pipeline(TinySpec("sd15", sample_size=256, text_hidden=768))
    cfg = json.loads((ROOT / "teachers/configs/sd15/unet/config.json").read_text())
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config(
        {**cfg, "block_out_channels": UNETS[size], "sample_size": 32}
    )
    pipe.register_modules(unet=pipe.unet)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def recipe_section(recipe: str, student: str) -> tuple[dict, dict, dict]:
    """(recipe section, data extras, train extras): DMD2 as before, the others as shipped in
    recipes/<recipe>_sd15.yaml with the schedule knobs set so every step updates every role."""
    if recipe == "dmd2":
        section = {
            "name": "dmd2",
            "fake_score": student,
            "real_guidance_scale": 1.75,
            "fake_updates_per_generator": 1,
            "lr": {"generator": 1e-5, "fake_score": 1e-5},
        }
        return section, {}, {}
    shipped = yaml.safe_load((ROOT / "recipes" / f"{recipe}_sd15.yaml").read_text())
    section = dict(shipped["recipe"])
    if recipe == "apt":
        section["discriminator_updates_per_generator"] = 1
    data = {"images": "digits"} if recipe in ("lcm", "apt") else {}
    ema = shipped.get("train", {}).get("ema")
    return section, data, ({"ema": ema} if ema else {})


def run_config(
    name: str, size: str, student: str, shared: bool = False, recipe: str = "dmd2", **train
) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    section, data_extra, train_extra = recipe_section(recipe, student)
    data = {
        "output_dir": str(WORK / "runs" / name),
        "teacher": {"model_id": str(teacher_dir(size)), "family": "sd15", "resolution": 256},
        "student": {"type": student, "shared_base": shared, "lora": {"rank": 16, "alpha": 16}},
        "recipe": section,
        "data": {"prompts": str(WORK / "prompts.txt"), **data_extra},
        "train": {
            "max_steps": 1,
            "batch_size": 1,
            "checkpoint_every": 10**6,
            **train_extra,
            **train,
        },
        "export": {"enabled": False},
        "logging": {"progress_bar": False, "sample_every": 0, "report": False},
    }
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def worker(*args: str) -> dict:
    cmd = [sys.executable, str(ROOT / "evaluation" / "perf_worker.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("PERF ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][5:])


def predicted_mb(config: Path) -> float:
    from distillkit.config import load_config
    from distillkit.plan import CPU_RUNTIME, plan_memory

    # perf_worker measures growth from an already-imported process: the runtime row is in its
    # baseline, not in what it measures
    return (plan_memory(load_config(config), device="cpu").total - CPU_RUNTIME) / 2**20


def validate(name: str, size: str, student: str, shared: bool) -> dict:
    path = run_config(name, size, student, shared)
    got = worker("memory", str(path))
    pred = predicted_mb(path)
    desc = f"{size} SD1.5 UNet, DMD2, {student} generator + {student} fake score"
    desc += ", adapter-shared base" if shared else ""
    return {
        "config": desc + ", 32x32 latents, batch 1, fp32, no checkpointing",
        "predicted_mb": round(pred),
        "measured_mb": round(got["delta_mb"]),
        "error": round(pred / got["delta_mb"] - 1, 3),
    }


def teacher_footprint(shared_mb: float) -> dict:
    """Adapter-shared DMD2 LoRA training vs the teacher alone at inference (same run config)."""
    got = worker("teacher", str(run_config("mem_real_lora_shared", "real", "lora", True)))
    return {
        "teacher_inference_mb": round(got["delta_mb"]),
        "shared_training_mb": round(shared_mb),
        "ratio": round(shared_mb / got["delta_mb"], 3),
        "note": "peak-RSS growth from process start: real-size SD1.5 UNet teacher, one guided "
        "call at 32x32 latents, vs DMD2 LoRA generator + fake score on student.shared_base",
    }


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--teacher-footprint", action="store_true", help="only that figure, merged into perf.json"
    )
    if parser.parse_args().teacher_footprint:
        merged = json.loads(OUT.read_text())
        shared = next(v for v in merged["plan_validation"] if "adapter-shared" in v["config"])
        merged["adapter_shared_vs_teacher_inference"] = {
            **teacher_footprint(shared["measured_mb"]),
            "commit": git_commit(),
        }
        OUT.write_text(json.dumps(merged, indent=1) + "\n")
        print(json.dumps(merged["adapter_shared_vs_teacher_inference"]))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg(),
        },
        "commit": git_commit(),  # -dirty when the measured code was not all committed
        "command": "make bench-perf",
        "setup": __doc__.split("\n\n")[1].strip(),
        "recipes": {},
    }
    runs = [("dmd2", "full"), ("dmd2", "lora")] + [
        (recipe, "full") for recipe in ("sid", "swiftbrush", "lcm", "apt")
    ]
    only = os.environ.get("PERF_RECIPES")  # e.g. PERF_RECIPES=lcm,apt: re-measure only those
    batch = int(os.environ.get("PERF_BATCH", str(HEADLINE_BATCH)))
    accumulation = int(os.environ.get("PERF_ACCUMULATION", "1"))
    headline = (batch, accumulation) == (HEADLINE_BATCH, 1)
    recipes_key = "recipes" if headline else f"recipes_batch_{batch}"
    recipes_key += f"_grad_accumulation_{accumulation}" if accumulation > 1 else ""
    result[recipes_key] = result.pop("recipes")
    for recipe, student in runs:
        if only and recipe not in only.split(","):
            continue
        name = f"{recipe}_sd15_mid_{student}_b{batch}" + (
            f"_acc{accumulation}" if accumulation > 1 else ""
        )
        enable_export = (recipe, student) == ("dmd2", "full") and headline
        path = run_config(
            name, "mid", student, recipe=recipe, batch_size=batch, grad_accumulation=accumulation
        )
        if enable_export:  # the latency measurement needs this run's exported pipeline
            data = yaml.safe_load(path.read_text())
            data["export"] = {"enabled": True, "verify": True}
            path.write_text(yaml.safe_dump(data))
        got = worker("speed", str(path))
        key = recipe if student == "full" else f"{recipe}_{student}"
        result[recipes_key][key] = {
            "overhead_ratio": round(got["step_s"] / got["bare_s"], 3),
            "steps_per_s": round(1 / got["step_s"], 3),
            "step_s": round(got["step_s"], 3),
            "bare_passes_s": round(got["bare_s"], 3),
            "peak_rss_mb": round(got["peak_rss_mb"]),
            "update_s": round(got["update_s"], 3),
            "overhead_ratio_without_update": round(
                (got["step_s"] - got["update_s"]) / got["bare_s"], 3
            ),
            "config": f"mid SD1.5 UNet, {student} student, batch {batch}, "
            f"grad_accumulation {accumulation}, run {name}",
            "bare_passes": got["passes_per_step"],
        }
        print(key, json.dumps(result[recipes_key][key]), flush=True)
    if only or not headline:  # merge these rows into the committed file, measure no more
        merged = json.loads(OUT.read_text()) if OUT.is_file() else {}
        merged.setdefault(recipes_key, {}).update(result[recipes_key])
        rerun = {"commit": result["commit"], "recipes": (only or "all").split(",")}
        merged[f"{recipes_key}_rerun"] = {**rerun, "load_avg_at_start": os.getloadavg()}
        OUT.write_text(json.dumps(merged, indent=1) + "\n")
        return 0
    result["export_latency"] = worker(
        "latency", str(WORK / "runs" / f"dmd2_sd15_mid_full_b{batch}"), str(teacher_dir("mid"))
    )
    result["activation_calibration"] = [
        worker("activations", "lora", str(lat), ck) for ck in ("off", "on") for lat in (16, 32)
    ]
    result["plan_validation"] = [
        validate("mem_real_lora_shared", "real", "lora", True),
        validate("mem_mid_full", "mid", "full", False),
    ]
    shared = result["plan_validation"][0]
    result["adapter_shared_vs_teacher_inference"] = teacher_footprint(shared["measured_mb"])
    if psutil.virtual_memory().available > 14 * 2**30:
        copies = validate("mem_real_lora_copies", "real", "lora", False)
        result["plan_validation"].append(copies)
        result["adapter_shared_memory_ratio"] = round(
            shared["measured_mb"] / copies["measured_mb"], 3
        )
        result["adapter_shared_note"] = (
            "measured peak-RSS growth, real-size SD1.5 UNet DMD2 LoRA (generator + fake score): "
            "student.shared_base=true / false (false keeps two fp32 copies of the UNet)"
        )
    else:
        result["adapter_shared_memory_ratio"] = None
        result["adapter_shared_note"] = "skipped: less than 14 GiB free for the copies run"
    result["seconds"] = round(time.time() - started)
    if OUT.is_file():  # other settings' rows are measured by their own runs (and commits): kept
        kept = json.loads(OUT.read_text())
        result.update({k: v for k, v in kept.items() if k.startswith("recipes_batch_")})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
