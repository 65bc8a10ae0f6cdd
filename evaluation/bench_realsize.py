"""`make bench-realsize`: the user's path on real-size random-weight teachers, on the CPU.

For each family (SD1.5, SDXL, SANA-1.6B) the published architectures (teachers/configs) are
built with random bf16 weights into a diffusers pipeline directory (distillkit.teachers.realsize),
then driven through the real CLI, per case (a LoRA shared-base DMD2 and an LCM-LoRA):

1. ``distillkit run`` to step 1 (checkpoint; export off): the training-only process;
2. ``distillkit run --resume`` to step 2, with the run's own export and its reload check;
3. ``distillkit export RUN_DIR``: the re-export from the latest checkpoint;
4. a plain-diffusers reload of the export and a 1-step sample, in a process of its own.

Each is a fresh process whose RSS is polled every 50 ms (/proc) and whose ru_maxrss the kernel
reports at exit. The training peak (process 1's ru_maxrss, and process 2's peak before it writes
train.json) is compared with ``plan_memory(cfg, device="cpu")`` for the same config.

    python evaluation/bench_realsize.py --families sd15          # merge into realsize.json
    python evaluation/bench_realsize.py --replan                 # plan columns only, no runs
    python evaluation/bench_realsize.py --tiny --out /tmp/r.json # same path, tiny teachers
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's distillkit, whatever is installed

from distillkit.benchmark.provenance import git_commit, machine  # noqa: E402
from distillkit.benchmark.realsize_cases import (  # noqa: E402
    FAMILIES,
    FAMILY_CARDS,
    GIB,
    Case,
    file_sizes,
    mem_available,
    plan_summary,
    step_records,
    write_bench_data,
)

OUT = ROOT / "evaluation" / "results" / "realsize.json"
CASES = ("dmd2_lora_shared", "lcm_lora")
POLL_S = 0.05
TRAIN_START = "distillkit: "  # the loop's first line: teacher loaded, roles built


def _status(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of ``pid`` in bytes; zeros once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "RssAnon:")):
            key, kb = line.split(":")
            values[key] = int(kb.split()[0]) * 1024
    return values.get("VmRSS", 0), values.get("RssAnon", 0)


def monitored(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; its output (timestamped) goes to ``log``. Returns the exit code, seconds,
    ru_maxrss, and the polled (t, rss, anon) samples and output lines for phase windows."""
    start = time.time()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        with open(log, "w") as handle:
            for line in proc.stdout:
                lines.append((time.time() - start, line))
                handle.write(f"[{time.time() - start:8.2f}] {line}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples: list[tuple[float, int, int]] = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        samples.append((time.time() - start, *_status(proc.pid)))
        time.sleep(POLL_S)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    return {
        "rc": proc.returncode,
        "seconds": round(time.time() - start, 2),
        "start": start,
        "ru_maxrss_gib": round(usage.ru_maxrss * 1024 / GIB, 3),
        "samples": samples,
        "lines": lines,
        "log": str(log),
    }


def _peak(samples, t0: float, t1: float) -> dict | None:
    inside = [s for s in samples if t0 <= s[0] < t1]
    if not inside:
        return None
    top = max(inside, key=lambda s: s[1])
    return {"rss_gib": round(top[1] / GIB, 3), "anon_gib": round(top[2] / GIB, 3)}


def phase_windows(got: dict, run_dir: Path | None) -> dict:
    """Peak polled RSS per phase: load (until the loop's first line), train (until train.json
    is written), export (after it). Without those markers: the whole process."""
    end = got["seconds"] + 1
    t_start = next((t for t, line in got["lines"] if line.startswith(TRAIN_START)), None)
    t_train = None
    if run_dir is not None and (run_dir / "train.json").is_file():
        written = (run_dir / "train.json").stat().st_mtime - got["start"]
        t_train = written if written > 0 else None
    out = {"whole": _peak(got["samples"], 0, end)}
    if t_start is not None:
        out["load"] = _peak(got["samples"], 0, t_start)
        out["train"] = _peak(got["samples"], t_start, t_train or end)
        out["train_started_s"] = round(t_start, 2)
    if t_train is not None:
        out["export"] = _peak(got["samples"], t_train, end)
        out["train_ended_s"] = round(t_train, 2)
    return out


def child_env(work: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    env.setdefault("DISTILLKIT_CACHE", str(work / "cache"))
    return env


def shown(cmd: list[str], env: dict) -> str:
    """The command as a user would type it (environment that matters, then python)."""
    keep = ("DISTILLKIT_CACHE", "HF_HUB_OFFLINE")
    prefix = [f"{k}={env[k]}" for k in keep if k in env]
    return shlex.join([*prefix, "python", *cmd[1:]])


def phase(name: str, cmd: list[str], env: dict, work: Path, run_dir: Path | None) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shown(cmd, env)}", flush=True)
    got = monitored(cmd, env, work / "logs" / f"{name}.log")
    result = {
        "command": shown(cmd, env),
        "rc": got["rc"],
        "seconds": got["seconds"],
        "ru_maxrss_gib": got["ru_maxrss_gib"],
        "peaks": phase_windows(got, run_dir),
        "log": got["log"],
    }
    tail = "".join(line for _, line in got["lines"][-(15 if got["rc"] else 4) :])
    result["error" if got["rc"] else "output_tail"] = tail
    print(
        f"    rc {got['rc']}, {got['seconds']} s, peak RSS {got['ru_maxrss_gib']} GiB", flush=True
    )
    return result


# ----------------------------------------------------------------------------- workers


def build_worker(family: str, out: str, tiny: int) -> int:
    """Write the teacher (real-size from its card, or tiny at ``tiny`` px) to ``out``."""
    if tiny:
        from distillkit.teachers.tiny import TinySpec, save_tiny_teacher

        save_tiny_teacher(TinySpec(family=family, sample_size=tiny), Path(out))
    else:
        from distillkit.teachers.realsize import save_realsize_teacher

        save_realsize_teacher(FAMILY_CARDS[family], Path(out))
    return 0


def sample_worker(pipeline_dir: str, resolution: int, png: str) -> int:
    """A user's first call: plain diffusers (no distillkit import), the export's own call
    arguments (distillkit.json), one step, decoded to an image."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    started = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter() - started
    call = json.loads((Path(pipeline_dir) / "distillkit.json").read_text())["calls"]["1"]
    extra = {"use_resolution_binning": False} if type(pipe).__name__ == "SanaPipeline" else {}
    t0 = time.perf_counter()
    image = pipe(
        "a handwritten digit seven",
        height=resolution,
        width=resolution,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **call,
        **extra,
    ).images[0]
    pixels = np.asarray(image)
    from PIL import Image

    Image.fromarray((pixels * 255).clip(0, 255).astype(np.uint8)).save(png)
    result = {
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "call": call,
        "load_s": round(loaded, 2),
        "sample_s": round(time.perf_counter() - t0, 2),
        "shape": list(pixels.shape),
        "finite": bool(np.isfinite(pixels).all()),
        "mean": round(float(pixels.mean()), 4),
        "std": round(float(pixels.std()), 4),
    }
    print("SAMPLE " + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- the bench


def _sample_result(got: dict) -> dict | None:
    log = Path(got["log"]).read_text()
    line = next((x for x in log.splitlines() if "SAMPLE {" in x), None)
    return json.loads(line.split("SAMPLE ", 1)[1]) if line else None


def _export_json(run_dir: Path) -> dict | None:
    path = run_dir / "export.json"
    return json.loads(path.read_text()) if path.is_file() else None


def measured_train_peak(first: dict, second: dict) -> float | None:
    """GiB: the training-only process (1) whole, and process 2 until it wrote train.json."""
    values = [first["ru_maxrss_gib"]] if first["rc"] == 0 else []
    train = second["peaks"].get("train")
    if second["rc"] == 0 and train:
        values.append(train["rss_gib"])
    return max(values) if values else None


CLI = ("-m", "distillkit.cli")


def run_case(case: Case, teacher: Path, data: dict, args, work: Path, env: dict) -> dict:
    run_dir = work / "runs" / case.name
    shutil.rmtree(run_dir, ignore_errors=True)
    base = case.overrides(teacher, data, run_dir, args.resolution, batch_size=1)
    base.append("train.checkpoint_every=1")
    record: dict = {"family": case.family, "case": case.kind, "recipe_yaml": str(case.yaml)}
    record["overrides"] = base
    record["resolution"] = args.resolution
    record["denoiser_params"] = _denoiser_params(teacher)
    record["plan"] = plan_summary(case.yaml, [*base, "train.max_steps=2"], "cpu")
    plan = record["plan"]["total_gib"] * GIB
    short = _short_of_memory(args, plan * 1.1, "the plan")
    if short:
        record["skipped"] = short
        return record
    cli = [sys.executable, *CLI, "run", str(case.yaml), *base]
    first = phase(
        f"{case.name}.1-train",
        [*cli, "train.max_steps=1", "export.enabled=false"],
        env,
        work,
        run_dir,
    )
    record["processes"] = {"train": first}
    record["steps"] = step_records(run_dir)
    # the export holds a merged copy of the denoiser and a reloaded pipeline beside the run's
    # weights and states (activations are gone by then): SD1.5 measured 6.84 / 9.47 GiB
    # against 6.9 / 9.5 GiB from this estimate
    acts = sum(b for label, b in record["plan"]["rows"] if label.startswith("activations"))
    export_need = (record["plan"]["total_gib"] - acts) * GIB + _weights_bytes(teacher)
    export_need += _weights_bytes(teacher, denoiser_only=True)
    record["export_estimate_gib"] = round(export_need / GIB, 2)
    short = _short_of_memory(args, export_need * 1.05, "the export (merged copy, reload)")
    resume = [*cli, "train.max_steps=2", "--resume"]
    if short:  # the resume is still checked, without the export that would not fit
        record["skipped_export"] = short
        second = phase(
            f"{case.name}.2-resume", [*resume, "export.enabled=false"], env, work, run_dir
        )
        record["processes"]["resume"] = second
        record["steps"] = step_records(run_dir) or record["steps"]
        return _summary(record, run_dir)
    second = phase(f"{case.name}.2-resume-export", resume, env, work, run_dir)
    record["processes"]["resume_export"] = second
    record["steps"] = step_records(run_dir) or record["steps"]
    record["export_in_run"] = _export_json(run_dir)
    failed_check = second["rc"] != 0 and "export check failed" in second.get("error", "")
    if failed_check and args.retry_tolerance:
        export_retry(record, case, run_dir, args, work, env)
    finish_case(record, case, run_dir, args, work, env)
    return record


def _short_of_memory(args, need: float, what: str) -> str | None:
    if args.tiny or args.force or mem_available() >= need:
        return None
    return (
        f"only {mem_available() / GIB:.1f} GiB available; {what} needs about {need / GIB:.1f} "
        "GiB (--force runs it anyway)"
    )


def _weights_bytes(teacher: Path, denoiser_only: bool = False) -> int:
    files = teacher.rglob("*.safetensors")
    if denoiser_only:
        files = [f for f in files if f.parent.name in ("unet", "transformer")]
    return sum(f.stat().st_size for f in files)


def export_retry(record: dict, case: Case, run_dir: Path, args, work: Path, env: dict) -> None:
    """Export the step-2 checkpoint again. After a failed check: at a looser relative
    tolerance, so that the rest of the path (re-export, reload, sample) is still checked (the
    failure stays recorded; ``export_ok`` stays false). After an export skipped for memory: at
    the shipped tolerance, on a machine with room (``export_ok`` then says how that went)."""
    skipped = "skipped_export" in record
    cmd = [sys.executable, *CLI, "run", str(case.yaml), *record["overrides"], "train.max_steps=2"]
    tol = None if skipped else args.retry_tolerance
    cmd += ([] if tol is None else [f"export.relative_tolerance={tol}"]) + ["--resume"]
    retry = phase(f"{case.name}.2b-export-retry", cmd, env, work, run_dir)
    record["processes"]["export_retry"] = retry
    why = "the run's export check failed at the shipped tolerance (processes.resume_export.error)"
    if skipped:
        why = "the run skipped its export for lack of free memory (skipped_export)"
    record["export_retry"] = {
        "relative_tolerance": tol or "as shipped",
        "why": why + "; the checkpoint of step 2 is exported again",
        "ok": retry["rc"] == 0,
        "export": _export_json(run_dir),
        "commit": git_commit(),
    }


def finish_case(record: dict, case: Case, run_dir: Path, args, work: Path, env: dict) -> None:
    """Re-export with `distillkit export`, reload + sample with plain diffusers, summarise."""
    third = phase(
        f"{case.name}.3-reexport", [sys.executable, *CLI, "export", str(run_dir)], env, work, None
    )
    # `distillkit export` verifies as the run's export does (reload, compare) and exits 2
    # on a failed check; it writes no export.json of its own
    record["reexport_ok"] = third["rc"] == 0 and "exported pipeline:" in third["output_tail"]
    png = work / f"{case.name}_sample.png"
    sample = [sys.executable, str(Path(__file__)), "--sample", str(run_dir / "pipeline")]
    fourth = phase(
        f"{case.name}.4-reload-sample", [*sample, str(args.resolution), str(png)], env, work, None
    )
    record["processes"].update(reexport=third, reload_sample=fourth)
    record["reload_sample"] = _sample_result(fourth) if fourth["rc"] == 0 else None
    record["reload_ok"] = bool(record["reload_sample"] and record["reload_sample"]["finite"])
    _summary(record, run_dir)


def _summary(record: dict, run_dir: Path) -> dict:
    procs = record["processes"]
    second = procs.get("resume_export") or procs.get("resume") or {"rc": 1, "peaks": {}}
    peak = measured_train_peak(procs["train"], second)
    record["measured_train_peak_gib"] = peak
    if peak:
        record["ratio_measured_over_plan"] = round(peak / record["plan"]["total_gib"], 3)
    record["export_ok"] = bool("resume_export" in procs and second["rc"] == 0)
    record["export_ok"] = record["export_ok"] and bool(record.get("export_in_run"))
    retry = record.get("export_retry") or {}
    if "skipped_export" in record and retry.get("relative_tolerance") == "as shipped":
        record["export_ok"] = bool(retry.get("ok"))  # the export ran later, as shipped
    parts = [k for k in ("pipeline", "lora", "checkpoints") if (run_dir / k).is_dir()]
    record["files"] = {k: file_sizes(run_dir / k) for k in parts}
    return record


def retry_recorded(key: str, args, work: Path, env: dict) -> int:
    """``--retry-export FAMILY/CASE``: export_retry + finish_case for a recorded run whose
    export check failed (its run directory and teacher still on disk)."""
    result = json.loads(args.out.read_text())
    family, kind = key.split("/")
    record = result["families"][family]["runs"][kind]
    run_dir = Path(
        next(o for o in record["overrides"] if o.startswith("output_dir=")).split("=")[1]
    )
    args.resolution = record["resolution"]
    case = Case(family, kind)
    for name in ("reexport", "reload_sample"):  # what ran at the shipped tolerance
        if name in record["processes"]:
            record["processes"][f"{name}_before_retry"] = record["processes"].pop(name)
    export_retry(record, case, run_dir, args, work, env)
    finish_case(record, case, run_dir, args, work, env)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _denoiser_params(teacher: Path) -> dict:
    from distillkit.plan_arch import DENOISERS, count_params

    name = next(d for d in DENOISERS if (teacher / d / "config.json").is_file())
    return {name: count_params(teacher / name)}


def bench_family(family: str, args, work: Path, env: dict, data: dict) -> dict:
    teacher = work / "teachers" / (f"{family}-tiny{args.tiny}" if args.tiny else family)
    built = None
    if not (teacher / "model_index.json").is_file():
        shutil.rmtree(teacher, ignore_errors=True)
        cmd = [sys.executable, str(Path(__file__)), "--build", family, str(teacher)]
        built = phase(f"{family}.0-build", [*cmd, str(args.tiny)], env, work, None)
        if built["rc"] != 0:
            return {"teacher": {"build": built}, "runs": {}}
    entry = {
        "teacher": {
            "card": FAMILY_CARDS[family],
            "dir": str(teacher),
            "build": built or "reused an earlier build",
            "files": file_sizes(teacher),
        },
        "runs": {},
    }
    for kind in args.cases:
        case = Case(family, kind)
        entry["runs"][kind] = run_case(case, teacher, data, args, work, env)
    return entry


def replan(result: dict) -> None:
    """Recompute the plan columns of recorded runs (after a plan.py change), runs untouched.
    The built teacher may be gone: its configs are the card's, which the plan then reads."""
    for fam in result.get("families", {}).values():
        for rec in fam["runs"].values():
            overrides = [o for o in rec["overrides"] if not o.startswith("teacher.model_id=")]
            rec["plan"] = plan_summary(Path(rec["recipe_yaml"]), overrides, "cpu")
            if rec.get("measured_train_peak_gib"):
                ratio = rec["measured_train_peak_gib"] / rec["plan"]["total_gib"]
                rec["ratio_measured_over_plan"] = round(ratio, 3)


def merge(old: dict, new: dict) -> dict:
    """``new``'s families replace those in ``old``; the file says which families are missing."""
    families = {**old.get("families", {}), **new.get("families", {})}
    merged = {**old, **{k: v for k, v in new.items() if k != "families"}, "families": families}
    missing = [f for f in FAMILIES if f not in families]
    merged["partial"] = bool(missing)
    merged["families_pending"] = missing
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/distillkit-realsize"))
    parser.add_argument("--out", type=Path, default=OUT)
    dry = "tiny teachers at PX pixels instead of real size (a dry run of the same path)"
    parser.add_argument("--tiny", type=int, default=0, metavar="PX", help=dry)
    parser.add_argument("--replan", action="store_true", help="recompute plan columns of --out")
    parser.add_argument("--force", action="store_true", help="run even when memory looks short")
    parser.add_argument(
        "--retry-tolerance",
        type=float,
        default=0.05,
        help="when the export check fails, export again at this relative tolerance (0: no)",
    )
    parser.add_argument("--retry-export", metavar="FAMILY/CASE", help="retry a recorded export")
    parser.add_argument("--build", nargs=3, metavar=("FAMILY", "OUT", "TINY"), help="internal")
    parser.add_argument("--sample", nargs=3, metavar=("PIPELINE", "RES", "PNG"), help="internal")
    args = parser.parse_args(argv)
    if args.build:
        return build_worker(args.build[0], args.build[1], int(args.build[2]))
    if args.sample:
        return sample_worker(args.sample[0], int(args.sample[1]), args.sample[2])
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.replan:
        replan(old)
        old["replanned_at_commit"] = git_commit()
        args.out.write_text(json.dumps(old, indent=1) + "\n")
        return 0
    args.families = [f for f in args.families.split(",") if f]
    args.cases = [c for c in args.cases.split(",") if c]
    if args.tiny:
        args.resolution = args.tiny
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        parser.error(f"unknown families {bad}; choose from {list(FAMILIES)}")
    work = args.work_dir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = child_env(work)
    if args.retry_export:
        return retry_recorded(args.retry_export, args, work, env)
    data = write_bench_data(work / "data")
    how = {  # per family: families are measured by separate invocations, then merged
        "machine": machine(),
        "commit": git_commit(),
        "python_executable": sys.executable,
        "command": shlex.join(["python", "evaluation/bench_realsize.py", *(argv or sys.argv[1:])]),
        "teacher": f"tiny ({args.tiny} px)" if args.tiny else "real size, random weights, bf16",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for family in args.families:
        entry = {**how, **bench_family(family, args, work, env, data)}
        entry["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        old = merge(old, {"what": __doc__.split("\n\n")[1].strip(), "families": {family: entry}})
        args.out.write_text(json.dumps(old, indent=1) + "\n")  # after every family
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
