"""Nothing lost: SIGKILL at any point resumes bit-exactly; a pre-emption signal checkpoints at
the step boundary and exits 75, and resumes bit-exactly; corrupt checkpoints are skipped; NaN
policies hold; one run per output directory; failed exports leave the old one intact."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
# GAN head (a discriminator) and EMA on, generator updated every other step
COMMON = [
    "recipes/dmd2_sd15.yaml",
    "--smoke",
    "--builtin-data",
    "train.max_steps=6",
    "train.checkpoint_every=2",
    "train.checkpoints_keep=3",
    "train.ema.decay=0.9",
    "recipe.fake_updates_per_generator=2",
    "train.batch_size=2",
    "logging.every=1",
]


def run_cli(out: Path, *extra: str, fault: str | None = None, resume: bool = False):
    env = dict(os.environ)
    env.pop("DISTILLKIT_FAULT", None)
    if fault:
        env["DISTILLKIT_FAULT"] = fault
    args = [sys.executable, "-m", "distillkit.cli", "run", *COMMON, f"output_dir={out}", *extra]
    if resume:
        args.append("--resume")
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def _logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_state(out: Path) -> dict[str, bytes]:
    ckpt = out / "checkpoints" / "step-0000006"
    tensors = {}
    for role in ("generator", "fake_score"):
        for key, value in load_file(str(ckpt / f"{role}.safetensors")).items():
            tensors[f"{role}.{key}"] = value.numpy().tobytes()
    tensors["ema"] = (ckpt / "custom_checkpoint_0.pkl").read_bytes()
    unet = out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors["export"] = hashlib.sha256(unet.read_bytes()).hexdigest().encode()
    # a replayed step's earlier record is dropped on resume: each step logged once, in order
    tensors["logged_steps"] = json.dumps(_logged_steps(out)).encode()
    return tensors


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("clean") / "run"
    proc = run_cli(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return final_state(out)


@pytest.mark.parametrize("fault", ["after-step-3", "checkpoint-write-4"])
def test_sigkill_then_resume_is_bit_exact(tmp_path, uninterrupted, fault):
    out = tmp_path / "run"
    killed = run_cli(out, fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "pipeline").exists()
    resumed = run_cli(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step-0000002" in resumed.stdout + resumed.stderr
    state = final_state(out)
    assert state.keys() == uninterrupted.keys()
    different = [k for k in state if state[k] != uninterrupted[k]]
    assert not different, f"resumed run differs in {different[:5]}"


def test_preemption_signal_checkpoints_then_resume_is_bit_exact(tmp_path, uninterrupted):
    """SIGTERM arrives between steps (checkpoint_every=2, so step 3 is off-cadence): the run
    writes a checkpoint there, the marker a requeue script reads, and exits 75. (SIGUSR1: the
    outside-signal test below.)"""
    sig, at = "SIGTERM", 3
    out = tmp_path / "run"
    stopped = run_cli(out, fault=f"{sig}:after-step-{at}")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert f"{sig} at step {at}" in stopped.stderr and "Traceback" not in stopped.stderr
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["step"] == at and marker["checkpoint"] == f"step-{at:07d}"
    assert not (out / "pipeline").exists()
    resumed = run_cli(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step-{at:07d}" in resumed.stdout + resumed.stderr
    assert not (out / "preempted.json").exists()
    state = final_state(out)
    different = [k for k in state if state[k] != uninterrupted[k]]
    assert not different, f"resumed run differs in {different[:5]}"


def test_preemption_without_time_for_a_checkpoint_keeps_the_last_one(tmp_path):
    out = tmp_path / "run"
    stopped = run_cli(out, "train.preempt_grace_s=0", fault="SIGTERM:after-step-3")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000002"]
    assert json.loads((out / "preempted.json").read_text())["checkpoint"] == "step-0000002"


def test_preemption_by_an_outside_signal(tmp_path):
    """A real signal from another process, at whatever step the run is on."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "DISTILLKIT_FAULT"}
    args = [sys.executable, "-m", "distillkit.cli", "run", *COMMON, f"output_dir={out}"]
    args += ["train.max_steps=400", "train.checkpoint_every=1000", "logging.every=1"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr.decode()[-2000:]
    # no terminal: one plain progress line per logging interval instead of rich's bar
    assert "dmd2 step 1/400 (0%)" in stderr.decode() and "━" not in stderr.decode()
    step = json.loads((out / "preempted.json").read_text())["step"]
    assert 2 <= step < 400 and (out / "checkpoints" / f"step-{step:07d}").is_dir()
    finished = run_cli(out, f"train.max_steps={step + 1}", resume=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert (out / "pipeline" / "model_index.json").is_file()


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".distillkit.lock" not in p.name
    }


@pytest.mark.parametrize("point", ["checkpoint-write-4", "checkpoint-commit-4"])
def test_full_disk_at_a_checkpoint_then_resume_is_bit_exact(tmp_path, uninterrupted, point):
    """ENOSPC half-way through the step-4 checkpoint (its files; the `latest` pointer)."""
    out = tmp_path / "run"
    failed = run_cli(out, fault=f"ENOSPC:{point}")
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "No space left on device" in failed.stderr and "Traceback" not in failed.stderr
    assert "step-0000002 and checkpoints/latest stand" in failed.stderr
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000002"]  # no temp files
    assert (ckpts / "latest").read_text() == "step-0000002"
    resumed = run_cli(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = final_state(out)
    assert not [k for k in state if state[k] != uninterrupted[k]]


def test_full_disk_during_an_export_leaves_the_previous_one(tmp_path, monkeypatch, capsys):
    """Each export write fails in turn on a finished LoRA run: the earlier export (pipeline,
    LoRA, export.json) is byte-identical afterwards and no temporary file is left. (The
    exports run in this process, through the CLI's own main: nothing is killed here.)"""
    from distillkit.cli import main

    out = tmp_path / "run"
    done = run_cli(out, "train.max_steps=2", "student.type=lora")
    assert done.returncode == 0, done.stderr[-2000:]
    before = _tree(out)
    assert "lora/pytorch_lora_weights.safetensors" in before
    for point in ("export-save", "export-lora", "export-card", "export-summary"):
        monkeypatch.setenv("DISTILLKIT_FAULT", f"ENOSPC:{point}")
        code = main(["export", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "No space left on device" in err, point
        assert "Traceback" not in err
        if point != "export-summary":  # there the new pipeline is in place; the summary stands
            assert _tree(out) == before, point
        assert not [p.name for p in out.iterdir() if ".tmp" in p.name], point


def test_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    out = tmp_path / "run"
    assert run_cli(out, "train.max_steps=4").returncode == 0
    victim = out / "checkpoints" / "step-0000004" / "generator.safetensors"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_cli(out, resume=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-2000:]
    assert "skipping checkpoint step-0000004" in text and "resumed from step-0000002" in text


def test_nan_skip_stop_and_rollback(tmp_path):
    skip = run_cli(tmp_path / "skip", "train.nan_policy=skip", fault="nan-step-3")
    assert skip.returncode == 0 and "update skipped" in skip.stdout + skip.stderr
    assert (tmp_path / "skip" / "pipeline" / "model_index.json").is_file()

    stop = run_cli(tmp_path / "stop", "train.nan_policy=stop", fault="nan-step-3")
    assert stop.returncode == 2 and "NaN" in stop.stderr and "Traceback" not in stop.stderr
    assert not (tmp_path / "stop" / "pipeline").exists()
    assert sorted(p.name for p in (tmp_path / "stop" / "checkpoints").glob("step-*")) == [
        "step-0000002"
    ]

    roll = run_cli(
        tmp_path / "roll", "train.nan_policy=rollback", "train.nan_max_skips=2", fault="nan-step-3"
    )
    text = roll.stdout + roll.stderr
    # the fault fires every time step 3 runs, so rollback repeats until the skip budget ends
    assert "rolled back to step 2" in text
    assert roll.returncode == 2 and "consecutive" in roll.stderr


def test_one_run_per_output_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".distillkit.lock").write_text(f"{os.getpid()} {os.uname().nodename}\n")
    busy = run_cli(out)
    assert busy.returncode == 2 and f"pid {os.getpid()}" in busy.stderr
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (out / ".distillkit.lock").write_text(f"{dead.stdout.strip()} {os.uname().nodename}\n")
    taken = run_cli(out, "train.max_steps=2")
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert not (out / ".distillkit.lock").exists()


def test_hub_token_never_written(tmp_path):
    secret = "hf_PLANTEDtoken0123456789abcdef"
    out = tmp_path / "run"
    env_token = {"HF_TOKEN": secret}
    os.environ.update(env_token)
    try:
        proc = run_cli(out, "train.max_steps=2", "logging.backends=[jsonl,tensorboard]")
    finally:
        os.environ.pop("HF_TOKEN")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert secret not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert json.loads((out / "export.json").read_text())["pipeline"]
