"""Two CPU processes (gloo) through the real CLI: ranks agree, data is sharded, rank 0 writes.

Launched with ``python -m torch.distributed.run`` and ``ACCELERATE_USE_CPU=1`` (accelerate then
runs ``MULTI_CPU`` DDP). ``DISTILLKIT_DUMP_RANK_WEIGHTS`` makes every rank dump its final
trainable weights and the prompts of its micro-batches (distillkit/engine/debug.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillkit.data.sources import digits_data
from distillkit.teachers.load import SMOKE_RESOLUTION

REPO = Path(__file__).resolve().parents[2]
STEPS, WORLD = 3, 2


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("ddp")
    out, dump = root / "run", root / "dump"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "DISTILLKIT_DUMP_RANK_WEIGHTS": str(dump),
    }
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *("--nproc_per_node", str(WORLD), "-m", "distillkit.cli", "run"),
        *("recipes/dmd2_sd15.yaml", "--smoke", "--builtin-data", f"output_dir={out}"),
        *(f"train.max_steps={STEPS}", "logging.progress_bar=false"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, dump, proc.stdout


def test_ranks_end_with_identical_weights(two_rank_run):
    _, dump, _ = two_rank_run
    ranks = [load_file(str(dump / f"rank{r}.safetensors")) for r in range(WORLD)]
    assert set(ranks[0]) == set(ranks[1])
    roles = {key.split(".", 1)[0] for key in ranks[0]}
    assert roles == {"generator", "fake_score"}
    assert any(k.startswith("fake_score.heads.") for k in ranks[0]), "GAN head not trained"
    differ = [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])]
    assert not differ, f"ranks disagree on {len(differ)} tensors, e.g. {differ[:3]}"


def test_each_rank_gets_its_own_share_of_the_batch(two_rank_run):
    _, dump, _ = two_rank_run
    seen = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [s["num_processes"] for s in seen] == [WORLD, WORLD]
    assert seen[0]["prompts"] != seen[1]["prompts"]
    # together the ranks see exactly one process's batch of WORLD samples, in rank order
    data = digits_data(SMOKE_RESOLUTION)  # --smoke GAN runs train on the digits set
    for step in range(STEPS):
        expected, _, _, _ = data.batch(step, WORLD, seed=0, shuffle=True)
        got = [p for s in seen for micro in s["prompts"][str(step)] for p in micro]
        assert got == expected, f"step {step}"


def test_only_rank_zero_writes_logs_checkpoints_and_exports(two_rank_run):
    out, _, stdout = two_rank_run
    assert stdout.count("distillkit: dmd2 on sd15") == 1
    assert stdout.count("exported pipeline:") == 1  # printed only where the export ran
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    assert all(r["effective_batch"] == WORLD * 1 for r in lines)  # smoke: batch 1 per device
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", f"step-{STEPS:07d}"]
    files = sorted(p.name for p in (out / "checkpoints" / ckpts[1]).iterdir())
    # one copy of each role's weights; accelerate keeps one RNG state per rank for resumes
    assert files.count("generator.safetensors") == 1
    assert [f for f in files if f.startswith("random_states")] == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".lock")]
    assert not leftovers, leftovers
    # the role files hold the trained tensors themselves (not DDP's "module."-prefixed copy)
    final = load_file(str(out.parent / "dump" / "rank0.safetensors"))
    saved = load_file(str(out / "checkpoints" / ckpts[1] / "generator.safetensors"))
    expected = {k.split(".", 1)[1]: v for k, v in final.items() if k.startswith("generator.")}
    assert set(saved) == set(expected)
    assert all(torch.equal(saved[k].float(), expected[k]) for k in saved)
    assert (out / "pipeline" / "model_index.json").is_file()
    assert json.loads((out / "export.json").read_text())["pipeline_max_abs_diff"] is not None
