"""Where a benchmark figure came from: the commit and the machine, written into every results
file. Standard library only (torch on demand), so the GPU check can use it on a machine
without diffusers."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def git_commit(root: Path = ROOT) -> str:
    """HEAD, with -dirty when tracked files differ from it; 'unknown' without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # results files written by the bench itself do not make the measured code dirty
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!*/results/*"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def machine() -> dict:
    """CPU model, cores, RAM, load, Python and torch: what a timing or a score depends on."""
    model = platform.processor() or platform.machine()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in text.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    mem = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    info = {
        "platform": platform.platform(),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / GIB, 1),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import torch

        info |= {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    except ImportError:
        pass
    return info
