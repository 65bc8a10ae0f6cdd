"""What keeps a run from losing or corrupting work: start-up checks, the run lock, NaN guard.

Everything here fails before damage is done: GPU-only options are refused before weights load,
an output directory is owned by one run at a time, and non-finite weights never reach disk.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import yaml

from distillkit.config import RunConfig
from distillkit.engine.optim import check_optimizer
from distillkit.engine.state import CheckpointDir
from distillkit.errors import ConfigError

LOCK_NAME = ".distillkit.lock"


def check_runtime(cfg: RunConfig) -> None:
    """GPU-only options fail here with the field name, before any weights are loaded."""
    check_optimizer(cfg.train)
    cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA device; on CPU use 'no' or 'bf16'"
        )
    if cfg.train.attention == "xformers":
        if not cuda:
            raise ConfigError(
                "train.attention=xformers needs a CUDA device; use train.attention=sdpa (or auto)"
            )
        if not xformers_importable():
            raise ConfigError(
                "train.attention=xformers but xformers is not installed: "
                "pip install 'distillkit[gpu]', or use train.attention=sdpa"
            )


def xformers_importable() -> bool:
    try:
        import xformers  # noqa: F401
    except ImportError:
        return False
    return True


def use_xformers(cfg: RunConfig) -> bool:
    """auto = xformers when it is installed and we are on CUDA, else PyTorch SDPA."""
    if cfg.train.attention == "sdpa" or not torch.cuda.is_available():
        return False
    return xformers_importable()


# what may change between a run and its resume: where and how long it runs, what it logs and
# exports; anything else (recipe, teacher, student, data, optimiser) would splice two runs
RESUMABLE_CHANGES = (
    "output_dir",
    "logging.",
    "export.",
    "hub.",
    "train.max_steps",
    "train.checkpoint_every",
    "train.checkpoints_keep",
)


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resume_config(path: Path, cfg: RunConfig, smoke: bool) -> None:
    """A resume continues the run in ``path`` only if it is the same run: its run.yaml must
    match this config outside RESUMABLE_CHANGES (a changed recipe would otherwise silently
    continue from weights trained under the old one)."""
    run_file = path / "run.yaml"
    if not run_file.is_file() or not CheckpointDir(path / "checkpoints", 1).candidates():
        return
    saved = yaml.safe_load(run_file.read_text()) or {}
    old = _flatten({"smoke": saved.get("smoke", False), **(saved.get("config") or {})})
    new = _flatten({"smoke": smoke, **cfg.model_dump(mode="json")})
    changed = [
        key
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
        raise ConfigError(
            f"output_dir: {path} holds checkpoints of a different run ({shown}{more}); "
            "resume it with its own config, or choose another output_dir (or remove this one)"
        )


# an earlier run's exports: a fresh run never overwrites them (its logs and run.yaml, which a run
# that failed before its first checkpoint leaves behind, are rewritten)
EXPORT_OUTPUTS = ("pipeline", "lora")


def writable_dir(path: Path, field: str) -> None:
    """Create ``path`` if needed and prove a file can be written there, before hours of work
    depend on it; ConfigError names ``field``."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}: {path} is a file; choose a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{field}: cannot write to {path} ({err.strerror})") from None


def prepare_output_dir(path: Path, resume: bool) -> None:
    writable_dir(path, "output_dir")
    if not resume and CheckpointDir(path / "checkpoints", 1).candidates():
        raise ConfigError(
            f"output_dir: {path} already holds checkpoints of a run; pass --resume to continue "
            "it, or choose another output_dir"
        )
    taken = [name for name in EXPORT_OUTPUTS if (path / name).exists()] if not resume else []
    if taken:
        raise ConfigError(
            f"output_dir: {path} already holds {' and '.join(f'{n}/' for n in taken)} (an "
            "earlier export?), which a new run would overwrite: choose another output_dir"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One run per output directory: a lock file naming its owner; a dead owner's is taken over."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        mine = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text().split() if self.path.is_file() else []
                pid = int(owner[0]) if owner and owner[0].isdigit() else -1
                same_host = len(owner) < 2 or owner[1] == socket.gethostname()
                if pid > 0 and (_alive(pid) or not same_host):
                    raise ConfigError(
                        f"output_dir: {self.path.parent} is in use by another run (pid {pid}); "
                        f"wait for it, or remove {self.path} if that run is gone"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner died
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(mine)
            self.held = True
            return
        raise ConfigError(f"output_dir: could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def all_finite(params) -> bool:
    """One host sync for a whole parameter list (used before checkpoints and exports only)."""
    flags = [torch.isfinite(p.detach()).all() for p in params]
    return bool(torch.stack(flags).all()) if flags else True
