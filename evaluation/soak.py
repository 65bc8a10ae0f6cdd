"""`make soak`: a long run on a tiny teacher with checkpoints, sample grids and logging on,
watched from outside: host memory must stay flat (RSS within 5 % of its post-warm-up level),
only `train.checkpoints_keep` checkpoints may remain, and the log must grow by a bounded amount
per logged step. Not part of `make test` (it takes a while); writes evaluation/results/soak.json.

Why from outside: a leak (FastGen #5: host memory growing to 1.8 TB over days) shows in the
process's resident set, which the run itself would distort by measuring it; /proc is read once
per second and paired with the step the run last logged.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from distillkit.benchmark.provenance import ROOT, git_commit, machine

OUT = ROOT / "evaluation" / "results" / "soak.json"
GOAL_RSS_GROWTH = 0.05


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def last_step(metrics: Path) -> int:
    """The step of the last complete line of metrics.jsonl (0 before the first)."""
    if not metrics.is_file():
        return 0
    with open(metrics, "rb") as handle:
        handle.seek(max(0, metrics.stat().st_size - 4096))
        lines = handle.read().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def summarise(samples: list[tuple[float, int, float]], steps: int, warmup: float) -> dict:
    """Baseline: median RSS over steps [warmup, warmup + 10 %] of the run; final: median over
    the last 10 %; growth relative to the baseline, and the largest excursion after warm-up."""

    def window(lo: float, hi: float) -> list[float]:
        return [r for _, s, r in samples if lo * steps <= s <= hi * steps]

    base, final = window(warmup, warmup + 0.1), window(0.9, 1.0)
    after = window(warmup, 1.0)
    if not base or not final:
        raise SystemExit("too few RSS samples: run more steps")
    baseline, end = statistics.median(base), statistics.median(final)
    return {
        "warmup_fraction": warmup,
        "baseline_rss_mib": round(baseline, 1),
        "final_rss_mib": round(end, 1),
        "max_rss_after_warmup_mib": round(max(after), 1),
        "growth": round(end / baseline - 1, 4),
        "max_excursion": round(max(after) / baseline - 1, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/distillkit-soak"))
    parser.add_argument("--recipe", default="recipes/dmd2_sd15.yaml")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    run_dir = args.work_dir / "run"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    keep = 2
    overrides = [
        f"output_dir={run_dir}",
        f"train.max_steps={args.steps}",
        "train.checkpoint_every=250",
        f"train.checkpoints_keep={keep}",
        "logging.every=10",
        "logging.sample_every=500",
        "logging.progress_bar=false",
    ]
    cmd = [sys.executable, "-m", "distillkit.cli", "run", args.recipe, "--smoke", "--builtin-data"]
    cmd += overrides
    commit = git_commit()  # before the run: the code it loads
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    samples: list[tuple[float, int, float]] = []
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        rss = rss_mib(proc.pid)
        if rss is not None:
            samples.append((round(time.monotonic() - started, 1), last_step(metrics), rss))
        time.sleep(1.0)
    log = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        print(log[-4000:])
        return proc.returncode
    training = [s for s in samples if 0 < s[1] < args.steps]  # the export phase is not the loop
    memory = summarise(training, args.steps, warmup=0.1)
    lines = metrics.read_text().splitlines()
    sizes = [len(line) + 1 for line in lines]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    grids = sorted(p.name for p in (run_dir / "samples").glob("*"))
    result = {
        "what": __doc__.strip(),
        "machine": machine(),
        "commit": commit,
        "command": "python evaluation/soak.py " + shlex.join(sys.argv[1:]),
        "run_command": shlex.join(["distillkit", *cmd[3:]]),
        "steps": args.steps,
        "wall_s": round(time.monotonic() - started, 1),
        "memory": {
            **memory,
            "goal": f"growth within {GOAL_RSS_GROWTH:.0%} of the post-warm-up baseline",
            "pass": abs(memory["growth"]) <= GOAL_RSS_GROWTH,
        },
        "checkpoints": {
            "kept": checkpoints,
            "train.checkpoints_keep": keep,
            "pass": len(checkpoints) == min(keep, -(-args.steps // 250)),
        },
        "log": {
            "metrics_lines": len(lines),
            "bytes_per_line_min": min(sizes),
            "bytes_per_line_max": max(sizes),
            "metrics_bytes": sum(sizes),
            "pass": len(lines) == args.steps // 10 and max(sizes) <= 2 * min(sizes),
        },
        "sample_grids": len(grids),
        "rss_samples": [
            {"t": t, "step": s, "rss_mib": round(r, 1)}
            for t, s, r in samples[:: max(1, len(samples) // 200)]
        ],
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("memory", "checkpoints", "log", "wall_s")}, indent=1))
    return 0 if all(result[k]["pass"] for k in ("memory", "checkpoints", "log")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
