"""`make gpu-check`: every real-size family on one CUDA GPU through distillkit's run path.

Per family (SD1.5, SDXL, SANA-1.6B): the published architectures with random bf16 weights
(distillkit.teachers.realsize, built on the GPU), then a few steps of the shipped DMD2 recipe as
a full student (recipes/dmd2_<family>.yaml as shipped) and as a LoRA shared-base student, at the
card's resolution and the YAML's batch size, with PyTorch SDPA and, when xformers imports, with
xformers. Each case runs in its own process (a failure or an out-of-memory is recorded with its
error and the next case runs) and records the step time after a warm-up step, peak CUDA memory
(allocated and reserved, training and export apart) against plan_memory(cfg, device="cuda"),
and the export's reload check. Results go to evaluation/results/gpu.json (or --out) after every
case, so a run cut short still reports what it finished.

DMD2 cases set recipe.fake_updates_per_generator=2 so that a few steps hold both kinds of step
(generator + fake score, fake score only); the shipped ratio's cycle time is derived from them.
Full-student checkpoints are not written (each is model-sized x 3 with Adam states, ~60 GB for
SDXL); LoRA cases write theirs.

    python3 evaluation/gpu_check.py --out $OUT/gpu.json        # on the GPU machine
    python3 evaluation/gpu_check.py --tiny 32 --out /tmp/g.json  # the same script on a CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's distillkit (not installed on the GPU machine)

from distillkit.benchmark.provenance import git_commit, machine  # noqa: E402
from distillkit.benchmark.realsize_cases import (  # noqa: E402
    FAMILY_CARDS,
    GIB,
    GPU_FAMILIES,
    TOO_BIG_FOR_ONE_GPU,
    Case,
    file_sizes,
    plan_summary,
    step_records,
    write_bench_data,
)

OUT = ROOT / "evaluation" / "results" / "gpu.json"
KINDS = ("dmd2_full", "dmd2_lora_shared")
FAKE_UPDATES = 2  # generator steps at 0, 2, ...: a warm-up step, then one of each kind
TAG = "GPUCHECK "


# ----------------------------------------------------------------------------- workers


def probe_worker() -> dict:
    """What the run path needs imports, and what the machine is (versions, GPU)."""
    out: dict = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "pydantic"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # a missing wheel: reported, not fatal to the report
            out[name] = f"import failed: {type(err).__name__}: {err}"
    import torch

    out["cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = props.name
        out["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
    try:
        import distillkit.engine.loop  # noqa: F401  (the whole run path's imports)

        out["distillkit_run_path"] = "imports"
    except Exception as err:
        out["distillkit_run_path"] = f"import failed: {type(err).__name__}: {err}"
    out["xformers"] = _xformers_version()
    return out


def _xformers_version() -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return None
    try:
        import xformers

        return xformers.__version__
    except Exception as err:
        return f"import failed: {type(err).__name__}: {err}"


def build_worker(family: str, out: str, tiny: int) -> dict:
    started = time.perf_counter()
    if tiny:
        from distillkit.teachers.tiny import TinySpec, save_tiny_teacher

        save_tiny_teacher(TinySpec(family=family, sample_size=tiny), Path(out))
    else:
        from distillkit.teachers.realsize import save_realsize_teacher

        save_realsize_teacher(FAMILY_CARDS[family], Path(out), device="cuda")
    return {"seconds": round(time.perf_counter() - started, 1), "files": file_sizes(Path(out))}


def _memory(cuda: bool) -> dict:
    import resource

    import torch

    if cuda:
        return {
            "allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
        }
    return {"ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def case_worker(spec: dict) -> dict:
    """One case through load_config + engine.loop.run (what `distillkit run` calls), with the
    export timed and its memory peak kept apart from training's."""
    from distillkit.cli import quiet_libraries

    quiet_libraries()
    import torch

    from distillkit.config import load_config
    from distillkit.engine import loop

    cuda = torch.cuda.is_available() and not spec["tiny"]
    result: dict = {"memory": {}}
    export = loop.Trainer.export

    def timed_export(self):
        result["memory"]["train"] = _memory(cuda)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            return export(self)
        finally:
            result["export_s"] = round(time.perf_counter() - started, 2)
            result["memory"]["export"] = _memory(cuda)

    loop.Trainer.export = timed_export
    if not spec["checkpoints"]:
        loop.Trainer.save_checkpoint = lambda self, step: None
    started = time.perf_counter()
    try:
        loop.run(load_config(spec["yaml"], spec["overrides"]))
        result["ok"] = True
    except BaseException as err:  # recorded: the parent goes on with the next case
        result["ok"] = False
        result["error"] = f"{type(err).__name__}: {err}"[:4000]
        result["traceback_tail"] = traceback.format_exc()[-3000:]
        result["memory"].setdefault("train", _memory(cuda))
    result["run_s"] = round(time.perf_counter() - started, 1)
    run_dir = Path(spec["run_dir"])
    result["steps"] = step_records(run_dir)
    path = run_dir / "export.json"
    result["export"] = json.loads(path.read_text()) if path.is_file() else None
    if (run_dir / "pipeline").is_dir():
        result["export_files"] = file_sizes(run_dir / "pipeline")["total_bytes"]
    result["plan"] = plan_summary(Path(spec["yaml"]), spec["overrides"], "cuda" if cuda else "cpu")
    return result


# ----------------------------------------------------------------------------- the parent


def worker(args: list[str], timeout: float, log: Path) -> dict:
    """Run this script as a worker; its one tagged JSON line, or the failure."""
    cmd = [sys.executable, str(Path(__file__)), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1)
        )
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        log.write_text(out)
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "log": str(log)}
    log.write_text(proc.stdout + proc.stderr)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith(TAG)), None)
    if line is None:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"ok": False, "error": f"worker exited {proc.returncode}: {tail}", "log": str(log)}
    return {**json.loads(line[len(TAG) :]), "log": str(log)}


def summarise(result: dict, shipped_fake_updates: int | None) -> dict:
    """Step seconds after the warm-up step, by kind; measured memory over the plan."""
    steps = [s for s in result.get("steps", []) if s["seconds"]][1:]  # the first is warm-up
    gen = [s["seconds"] for s in steps if "generator" in s["roles"]]
    other = [s["seconds"] for s in steps if "generator" not in s["roles"]]
    out: dict = {}
    if gen:
        out["generator_step_s"] = round(sum(gen) / len(gen), 3)
    if other:
        out["fake_only_step_s"] = round(sum(other) / len(other), 3)
    k = shipped_fake_updates
    if gen and other and k:
        out["cycle_step_s_at_shipped_ratio"] = round((gen[0] + (k - 1) * other[0]) / k, 3)
    plan = result.get("plan", {}).get("total_gib")
    train = result.get("memory", {}).get("train", {})
    if plan and train.get("reserved_gib"):
        # the plan's CUDA row covers the context too, which torch's counters do not see
        out["reserved_over_plan"] = round(train["reserved_gib"] / plan, 3)
        out["allocated_over_plan"] = round(train["allocated_gib"] / plan, 3)
    elif plan and train.get("ru_maxrss_gib"):
        out["rss_over_plan"] = round(train["ru_maxrss_gib"] / plan, 3)
    return out


def cases_for(family: str, xformers: bool) -> list[Case]:
    attention = ["sdpa", "xformers"]
    kinds = [k for k in KINDS if (family, k) not in TOO_BIG_FOR_ONE_GPU]
    return [Case(family, k, a) for a in attention for k in kinds if a == "sdpa" or xformers]


def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(GPU_FAMILIES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=450, help="start no case after this")
    parser.add_argument("--case-timeout-s", type=float, default=240)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/distillkit-gpu-check"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--commit", default=None, help="the commit checked (no .git there)")
    parser.add_argument("--tiny", type=int, default=0, metavar="PX", help="tiny teachers, CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the YAML's")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "probe":
            got = probe_worker()
        elif kind == "build":
            got = build_worker(rest[0], rest[1], int(rest[2]))
        else:
            got = case_worker(json.loads(rest[0]))
        print(TAG + json.dumps(got), flush=True)
        return 0
    return check(args, argv)


def check(args, argv: list[str] | None) -> int:
    started = time.time()
    work = args.work_dir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DISTILLKIT_CACHE", str(work / "cache"))
    data = write_bench_data(work / "data")
    families = [f for f in args.families.split(",") if f]
    report: dict = {
        "what": __doc__.split("\n\n")[1].strip(),
        "command": shlex.join(["python3", "evaluation/gpu_check.py", *(argv or sys.argv[1:])]),
        "commit": args.commit or git_commit(),
        "teacher": f"tiny ({args.tiny} px)" if args.tiny else "real size, random weights, bf16",
        "machine": {**machine(), "nvidia_smi": _nvidia_smi()},
        "families": {},
    }

    def save() -> None:
        report["seconds"] = round(time.time() - started)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    report["versions"] = worker(["--worker", "probe"], 120, work / "logs" / "probe.log")
    save()
    if report["versions"].get("distillkit_run_path") != "imports":
        print(f"distillkit's run path does not import: {report['versions']}", flush=True)
        return 1
    xformers = bool(report["versions"].get("xformers")) and "failed" not in str(
        report["versions"]["xformers"]
    )
    for family in families:
        entry = report["families"][family] = {"cases": {}}
        teacher = work / "teachers" / family
        left = args.budget_s - (time.time() - started)
        if left < 30:
            entry["skipped"] = "time budget spent before the teacher was built"
            continue
        shutil.rmtree(teacher, ignore_errors=True)
        build = ["--worker", "build", family, str(teacher), str(args.tiny)]
        entry["build"] = worker(build, min(left, 300), work / "logs" / f"{family}-build.log")
        save()
        if not (teacher / "model_index.json").is_file():
            continue
        for case in cases_for(family, xformers):
            entry["cases"][case.name] = run_case(case, teacher, data, args, work, started)
            save()
        if not args.tiny:
            shutil.rmtree(teacher, ignore_errors=True)  # the disk holds one family at a time
    if not xformers:
        report["xformers_cases"] = "not run: xformers does not import on this machine"
    save()
    print(f"wrote {args.out}", flush=True)
    return 0


def run_case(case: Case, teacher: Path, data: dict, args, work: Path, started: float) -> dict:
    import yaml

    left = args.budget_s - (time.time() - started)
    if left < 30:
        return {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
    run_dir = work / "runs" / case.name
    shutil.rmtree(run_dir, ignore_errors=True)
    resolution = args.tiny or None
    overrides = case.overrides(teacher, data, run_dir, resolution, args.batch_size)
    overrides += [f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}"]
    shipped = yaml.safe_load(case.yaml.read_text())["recipe"]
    k = shipped.get("fake_updates_per_generator")
    if k:
        overrides.append(f"recipe.fake_updates_per_generator={FAKE_UPDATES}")
    full = case.kind.endswith("_full")
    spec = {
        "yaml": str(case.yaml),
        "overrides": overrides,
        "run_dir": str(run_dir),
        "tiny": args.tiny,
        "checkpoints": not full,
    }
    print(f"[{time.strftime('%H:%M:%S')}] {case.name}", flush=True)
    got = worker(
        ["--worker", "case", json.dumps(spec)],
        min(left, args.case_timeout_s),
        work / "logs" / f"{case.name}.log",
    )
    got["summary"] = summarise(got, k)
    got["overrides"] = overrides
    got["recipe_yaml"] = str(case.yaml.relative_to(ROOT))
    got["checkpoints"] = "written" if not full else "not written (patched out: full-size states)"
    print(f"    ok={got.get('ok')} {json.dumps(got['summary'])}", flush=True)
    if not got.get("ok"):
        print(f"    error: {str(got.get('error'))[:500]}", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return got


if __name__ == "__main__":
    sys.exit(main())
