"""The Hub-native run through the real CLI: one --smoke run that samples grids, logs to
tensorboard and (offline) wandb, writes its report and pushes to a local Hub-protocol server;
then `distillkit push` refreshing the card with the repo id and an eval table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from distillkit.cli import main
from tests.helpers.local_hub import LocalHub

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_PLANTEDworkflowSecret42"


def remote_expected(out: Path) -> dict[str, bytes]:
    files = {
        p.relative_to(out / "pipeline").as_posix(): p.read_bytes()
        for p in (out / "pipeline").rglob("*")
        if p.is_file()
    }
    files |= {
        "lora/" + p.relative_to(out / "lora").as_posix(): p.read_bytes()
        for p in (out / "lora").rglob("*")
        if p.is_file()
    }
    return files


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Iterator[tuple[LocalHub, Path, subprocess.CompletedProcess]]:
    root = tmp_path_factory.mktemp("workflow")
    out = root / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env |= {"HF_TOKEN": TOKEN, "HF_HOME": str(root / "hf_home"), "WANDB_MODE": "offline"}
    env["MPLCONFIGDIR"] = str(root / "matplotlib")
    env |= {f"WANDB_{k}_DIR": str(root / f"wandb_{k.lower()}") for k in ("CONFIG", "CACHE", "DATA")}
    with LocalHub() as hub:
        env["HF_ENDPOINT"] = hub.endpoint
        args = ["run", "recipes/dmd2_sd15.yaml", "--smoke", "--builtin-data", f"output_dir={out}"]
        args += ["hub.push=true", "hub.repo_id=me/x", "logging.progress_bar=false"]
        args += ["logging.backends=[jsonl,tensorboard,wandb]"]
        proc = subprocess.run(
            [sys.executable, "-m", "distillkit.cli", *args],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield hub, out, proc


def test_smoke_run_pushes_byte_identical_and_never_writes_the_token(smoke_run) -> None:
    hub, out, proc = smoke_run
    assert hub.files("me/x") == remote_expected(out)
    assert "samples/grid.png" in hub.files("me/x")
    card = hub.files("me/x")["README.md"].decode()
    assert 'from_pretrained("me/x"' in card and "](samples/grid.png)" in card
    assert f"Bearer {TOKEN}" in hub.authorizations
    leaked = [p for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked and TOKEN not in proc.stdout + proc.stderr
    assert "pushed to the Hub: " + hub.endpoint in proc.stdout


def test_samples_report_and_logging_backends(smoke_run) -> None:
    _, out, _ = smoke_run
    assert (out / "samples" / "step-000002.png").is_file()
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < last["collapse/diversity_ratio"] < 10
    report = (out / "report.md").read_text()
    assert "](curves.png)" in report and "](samples/step-000002.png)" in report
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    # wandb (offline): a local run directory with its data file
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    # tensorboard: scalars from the metrics logger and the sample grid from the callback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "fake_score/loss" in events.Tags()["scalars"]
    assert "collapse/diversity_ratio" in events.Tags()["scalars"]
    assert "samples" in events.Tags()["images"]


def test_push_command_rewrites_the_card_with_repo_id_and_eval(
    smoke_run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    hub, out, _ = smoke_run
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # nothing in the user's ~/.cache
    scores = {"fid": 12.5, "clip_score": 31.0, "n": 8, "protocol": {"steps": 1}}
    (out / "eval.json").write_text(json.dumps(scores))
    assert main(["push", str(out), "--repo-id", "me/y"]) == 0
    card = hub.files("me/y")["README.md"].decode()
    assert 'from_pretrained("me/y"' in card and "me/x" not in card
    assert "| eval | steps | fid | clip_score | samples |" in card and "| 12.5 |" in card
    assert hub.files("me/y") == remote_expected(out)
    assert "pushed: " in capsys.readouterr().out
