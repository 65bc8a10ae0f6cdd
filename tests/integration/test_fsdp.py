"""FSDP2 on two CPU processes (gloo) through the real CLI: checkpoints, exact resume, export.

accelerate never selects FSDP on a CPU, so the runs set ``DISTILLKIT_FSDP_ON_CPU=1`` (see
distillkit/engine/sharding.py): accelerate's own FSDP plugin is built from the ``FSDP_*``
environment of recipes/accelerate/fsdp_sdxl.yaml (FSDP2, transformer-based wrap of
BasicTransformerBlock / ResnetBlock2D, sharded state dicts) and the roles are really sharded
(DTensor parameters). ``DISTILLKIT_DUMP_RANK_WEIGHTS`` makes every rank dump its final
trainable weights, gathered whole (distillkit/engine/debug.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillkit.teachers.load import SMOKE_RESOLUTION

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
FSDP_ENV = {
    "ACCELERATE_USE_CPU": "1",
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "BasicTransformerBlock,ResnetBlock2D",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "DISTILLKIT_FSDP_ON_CPU": "1",
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
}
# full student with an EMA: the generator updates every step, so the EMA differs from it
FULL = [
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "train.ema.decay=0.5",
    "recipe.fake_updates_per_generator=1",
]
LORA = ["train.max_steps=2", "student.type=lora"]


def launch(out: Path, dump: Path, overrides: list[str], resume: bool = False) -> str:
    env = {**os.environ, **FSDP_ENV, "DISTILLKIT_DUMP_RANK_WEIGHTS": str(dump)}
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *("--nproc_per_node", str(WORLD), "-m", "distillkit.cli", "run"),
        *(
            "recipes/dmd2_sd15.yaml",
            "--smoke",
            "--builtin-data",
            f"output_dir={out}",
            "logging.progress_bar=false",
        ),
        *overrides,
        *(["--resume"] if resume else []),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    root = tmp_path_factory.mktemp("fsdp")
    found = {}
    for name, overrides in (("full", FULL), ("lora", LORA)):
        out, dump = root / name, root / f"{name}-dump"
        found[name] = (out, dump, launch(out, dump, overrides))
    # resume the full run from its step-2 checkpoint in a fresh directory
    out, dump = root / "resumed", root / "resumed-dump"
    (out / "checkpoints").mkdir(parents=True)
    step2 = "step-0000002"
    shutil.copytree(found["full"][0] / "checkpoints" / step2, out / "checkpoints" / step2)
    (out / "checkpoints" / "latest").write_text(step2)
    found["resumed"] = (out, dump, launch(out, dump, FULL, resume=True))
    return found


def rank_weights(dump: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(dump / f"rank{r}.safetensors")) for r in range(WORLD)]


def test_the_run_is_sharded_and_ranks_agree(runs):
    out, dump, stdout = runs["full"]
    assert "effective batch 2 on 2 process(es)" in stdout
    assert stdout.count("exported pipeline:") == 1  # rank 0 only
    ranks = rank_weights(dump)
    assert {k.split(".", 1)[0] for k in ranks[0]} == {"generator", "fake_score"}
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    ckpt = out / "checkpoints" / "step-0000004"
    # accelerate's own sharded FSDP files (torch.distributed.checkpoint) are there: FSDP ran
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_1").is_dir()


def test_checkpoint_holds_the_gathered_trainable_weights(runs):
    out, dump, _ = runs["full"]
    final = rank_weights(dump)[0]
    ckpt = out / "checkpoints" / "step-0000004"
    for role in ("generator", "fake_score"):
        saved = load_file(str(ckpt / f"{role}.safetensors"))
        expected = {k.split(".", 1)[1]: v for k, v in final.items() if k.startswith(role + ".")}
        assert set(saved) == set(expected)
        assert all(torch.equal(saved[k].float(), expected[k]) for k in saved), role
    # LoRA roles: the generator file holds the adapter only, not the frozen base
    out, dump, _ = runs["lora"]
    saved = load_file(str(out / "checkpoints" / "step-0000002" / "generator.safetensors"))
    assert saved and all("lora_" in k for k in saved)


def test_resume_is_exact(runs):
    straight, resumed = runs["full"], runs["resumed"]
    assert "resumed from step-0000002 (step 2)" in resumed[2]
    a, b = rank_weights(straight[1])[0], rank_weights(resumed[1])[0]
    assert set(a) == set(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"
    ema = [
        torch.load(run[0] / "checkpoints/step-0000004/custom_checkpoint_0.pkl", weights_only=True)
        for run in (straight, resumed)
    ]
    assert ema[0]["optimization_step"] == ema[1]["optimization_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(ema[0]["shadow_params"], ema[1]["shadow_params"]))


def test_export_is_the_gathered_ema_generator_and_samples_in_one_step(runs):
    from diffusers import DiffusionPipeline

    out, dump, _ = runs["full"]
    ema = torch.load(out / "checkpoints/step-0000004/custom_checkpoint_0.pkl", weights_only=True)
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    names = [n for n, _ in pipe.unet.named_parameters()]  # full student: every weight trained
    assert len(names) == len(ema["shadow_params"])
    # as stored: in the teacher's dtype (bf16 under --smoke), the EMA rounded to it
    exported = load_file(str(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    dtype = next(iter(exported.values())).dtype
    shadows = dict(zip(names, ema["shadow_params"]))
    assert all(torch.equal(exported[n], shadows[n].to(dtype)) for n in names)
    trained = rank_weights(dump)[0]
    assert any(  # the EMA is not just the last weights: the export really took the EMA path
        not torch.equal(shadows[n].to(dtype), trained[f"generator.{n}"].to(dtype)) for n in names
    )
    pipe.set_progress_bar_config(disable=True)
    size = {"height": SMOKE_RESOLUTION, "width": SMOKE_RESOLUTION}
    call = {"num_inference_steps": 1, "guidance_scale": 0.0, "output_type": "pt", **size}
    image = pipe("a handwritten digit seven", **call).images
    assert image.shape[0] == 1 and torch.isfinite(image).all()


def test_lora_export_equals_the_gathered_adapter(runs):
    out, dump, _ = runs["lora"]
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    trained = {
        k.removeprefix("generator.").replace(".default.", "."): v
        for k, v in rank_weights(dump)[0].items()
        if k.startswith("generator.")
    }
    lora = {k.removeprefix("unet."): v for k, v in lora.items()}
    assert set(lora) == set(trained)
    assert all(torch.equal(lora[k].float(), trained[k]) for k in lora)


def test_distillkit_export_rebuilds_the_same_pipeline_from_an_fsdp_checkpoint(runs, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(runs["full"][0], out)
    before = load_file(str(out / "pipeline/unet/diffusion_pytorch_model.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "distillkit.cli", "export", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = load_file(str(out / "pipeline/unet/diffusion_pytorch_model.safetensors"))
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the same EMA generator
