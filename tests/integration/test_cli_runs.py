"""The real CLI on tiny same-family teachers: re-export and the embedding cache (resume and
its refusals: test_crash_safety, test_bad_inputs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillkit.teachers.load import SMOKE_RESOLUTION

REPO = Path(__file__).resolve().parents[2]


def distillkit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "distillkit.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"distillkit {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def _content(path: Path) -> bytes:
    """A file's bytes; for safetensors its tensors' bytes and its metadata as a sorted map:
    safetensors writes the metadata map in the process's hash order (a Rust HashMap), so the
    same content may come out in another key order from another process."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.dumps(handle.metadata() or {}, sort_keys=True).encode()
        tensors = [
            key.encode() + handle.get_tensor(key).view(torch.uint8).numpy().tobytes()
            for key in sorted(handle.keys())
        ]
    return meta + b"".join(tensors)


def _exported_files(run_dir: Path) -> dict[str, bytes]:
    files = [p for d in ("pipeline", "lora") for p in (run_dir / d).rglob("*") if p.is_file()]
    out = {str(p.relative_to(run_dir)): _content(p) for p in files}
    out["export.json"] = (run_dir / "export.json").read_bytes()
    return out


def test_reexport_writes_what_training_wrote(tmp_path):
    """`distillkit export` goes through the same export as the end of training: the same file
        list, card, metadata (distillkit.json), export.json and weights, byte for byte (safetensors:
    tensors byte for byte, metadata as a map), for a LoRA
        student exported from its EMA weights at several shipped step counts."""
    out = tmp_path / "run"
    distillkit(
        "run",
        "recipes/lcm_lora_sd15.yaml",
        "--smoke",
        "--builtin-data",
        f"output_dir={out}",
        "train.max_steps=2",
        "train.ema.decay=0.5",
    )
    trained = _exported_files(out)
    meta = json.loads(trained["pipeline/distillkit.json"])
    assert meta["recipe"] == "lcm" and meta["family"] == "sd15"
    assert any(name.startswith("lora/") for name in trained)
    for name in list(trained):
        if name != "export.json":
            (out / name).unlink()
    (out / "export.json").unlink()
    distillkit("export", str(out))
    again = _exported_files(out)
    assert sorted(again) == sorted(trained)
    changed = [name for name in trained if again[name] != trained[name]]
    assert not changed, f"the re-export differs from the trained export in {changed}"


def test_embedding_cache_gives_the_same_run(tmp_path, tiny_adapter):
    """data.cache_dir precomputes text embeddings and image latents once; training is unchanged.

    The cache encodes 32 rows at a time, a plain run each micro-batch, so the numbers agree up to
    the rounding of batched kernels, which differs between CPUs (7e-4 relative in a loss on one,
    under 1e-4 on another). So the cache's rows are compared with per-item encodings at a float32
    tolerance, and the two runs' losses at 1e-2: far above that rounding, far below what a row of
    another prompt or image moves them by."""
    common = [
        "run",
        "recipes/dmd2_sd15.yaml",
        "--smoke",
        "--builtin-data",
        "logging.sample_every=0",
    ]
    common.append("teacher.dtype=fp32")  # the cache, not half-precision rounding, under test
    distillkit(*common, f"output_dir={tmp_path / 'plain'}")
    cache = tmp_path / "cache"
    distillkit(*common, f"output_dir={tmp_path / 'cached'}", f"data.cache_dir={cache}")
    files = sorted(cache.rglob("*.safetensors"))
    assert [f.name for f in files] == ["latents.safetensors", "text.safetensors"]

    from distillkit.data.sources import digits_data

    adapter = tiny_adapter("sd15")
    folder = files[0].parent
    texts = json.loads((folder / "meta.json").read_text())["texts"]
    text = load_file(str(folder / "text.safetensors"))["cond/encoder_hidden_states"]
    for i in (0, 7, len(texts) - 1):  # row i is text i, encoded alone here
        alone = adapter.encode_prompts([texts[i]])[0]["encoder_hidden_states"]
        torch.testing.assert_close(text[i : i + 1], alone, rtol=1e-4, atol=1e-5)
    latents = load_file(str(files[0]))["latents"]
    images = digits_data(SMOKE_RESOLUTION).images
    for i in (0, 5, len(images) - 1):  # row i is image i
        alone = adapter.encode_images(images[i : i + 1])
        torch.testing.assert_close(latents[i : i + 1], alone, rtol=1e-4, atol=1e-5)

    def losses(run: str) -> list[dict]:
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(r).items() if "loss" in k} for r in rows]

    plain, cached = losses("plain"), losses("cached")
    assert [sorted(r) for r in plain] == [sorted(r) for r in cached] and plain
    for a, b in zip(plain, cached):
        assert b == pytest.approx(a, rel=1e-2)
