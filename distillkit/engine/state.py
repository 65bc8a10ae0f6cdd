"""Checkpoints that are never half-written: save to a temp dir, fsync, rename, move `latest` last.

Only trainable tensors are stored (LoRA weights for LoRA roles), so an SDXL LoRA checkpoint is
megabytes rather than a copy of the base model. Each checkpoint carries a manifest of SHA-256
checksums; a checkpoint that fails them is reported and skipped for the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from distillkit.errors import DistillkitError
from distillkit.faults import fault_point

MANIFEST = "manifest.json"


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def trainable_names(module: nn.Module) -> list[str]:
    return [name for name, p in _unwrap(module).named_parameters() if p.requires_grad]


def save_trainable(module: nn.Module, path: Path, full_state: dict | None = None) -> None:
    """Save the trainable tensors of ``module`` (from ``full_state`` when a wrapper gathered it)."""
    names = set(trainable_names(module))
    state = full_state if full_state is not None else _unwrap(module).state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k in names}
    save_file(tensors, str(path))


def load_trainable(module: nn.Module, path: Path, loader=None) -> None:
    """Load ``path`` into ``module``'s trainable tensors. ``loader(module, tensors)`` replaces
    the plain ``load_state_dict`` (the training loop passes one that also fills FSDP shards)."""
    tensors = load_file(str(path))
    names = set(trainable_names(module))
    missing = names - set(tensors)
    if missing:
        raise DistillkitError(f"{path}: missing trainable tensors, e.g. {sorted(missing)[:3]}")
    unexpected = sorted(set(tensors) - names)
    if unexpected:
        raise DistillkitError(f"{path}: tensors that the network lacks, e.g. {unexpected[:3]}")
    if loader is not None:
        loader(module, tensors)
    else:
        _unwrap(module).load_state_dict(tensors, strict=False)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path, meta: dict) -> None:
    files = {
        str(p.relative_to(ckpt)): _digest(p)
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (ckpt / MANIFEST).write_text(json.dumps({"meta": meta, "files": files}, indent=1))


def verify(ckpt: Path) -> dict:
    """The checkpoint's meta if every file matches its checksum; raises otherwise."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        raise DistillkitError(f"{ckpt}: no {MANIFEST} (incomplete write)")
    manifest = json.loads(manifest_path.read_text())
    for rel, digest in manifest["files"].items():
        path = ckpt / rel
        if not path.is_file() or _digest(path) != digest:
            raise DistillkitError(f"{ckpt}: {rel} is missing or corrupt (checksum mismatch)")
    return manifest["meta"]


class CheckpointDir:
    """`OUTPUT_DIR/checkpoints/step-000123/` directories plus a `latest` pointer file."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root = root
        self.keep = keep

    def staging(self, step: int) -> Path:
        tmp = self.root / f".tmp-step-{step:07d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, meta: dict) -> Path:
        """Manifest, fsync, rename, then move `latest`. A write that fails (a full disk) undoes
        this checkpoint whole: the previous one and `latest` stay as they were."""
        final = self.root / f"step-{step:07d}"
        pointer = self.root / "latest.tmp"
        renamed = False
        try:
            write_manifest(tmp, meta)
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            renamed = True
            fault_point(f"checkpoint-commit-{step}", pointer)
            pointer.write_text(final.name)
            with open(pointer, "rb") as handle:
                os.fsync(handle.fileno())
            pointer.replace(self.root / "latest")
        except OSError:
            self.discard(tmp)
            pointer.unlink(missing_ok=True)
            if renamed:
                shutil.rmtree(final, ignore_errors=True)
            raise
        self._prune()
        return final

    def discard(self, tmp: Path) -> None:
        """Remove a checkpoint that will not be committed (its temporary directory)."""
        shutil.rmtree(tmp, ignore_errors=True)

    def candidates(self) -> list[Path]:
        """Checkpoints newest first, the `latest` pointer's target leading."""
        if not self.root.is_dir():
            return []
        found = sorted(
            (p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step-")),
            reverse=True,
        )
        pointer = self.root / "latest"
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if named in found:
                found.remove(named)
                found.insert(0, named)
        return found

    def latest_good(self, warn=print) -> tuple[Path, dict] | None:
        for ckpt in self.candidates():
            try:
                return ckpt, verify(ckpt)
            except (DistillkitError, json.JSONDecodeError, KeyError) as err:
                warn(f"skipping checkpoint {ckpt.name}: {err}")
        return None

    def _prune(self) -> None:
        for old in self.candidates()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
