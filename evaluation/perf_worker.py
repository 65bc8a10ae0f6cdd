"""One perf measurement in a fresh process (peak RSS is per process): `bench_perf.py` calls it.

    python evaluation/perf_worker.py memory RUN.yaml   -> {"baseline_mb", "peak_mb", ...}
    python evaluation/perf_worker.py speed RUN.yaml    -> step times: Trainer vs bare passes
    python evaluation/perf_worker.py latency RUN_DIR TEACHER_DIR -> export vs teacher latency

Why a worker: ru_maxrss only grows, so each configuration needs its own process; and the
Trainer is driven in-process with checkpoint writes switched off, since serialising a
checkpoint is not part of a training step's memory or time.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psutil
import torch

from distillkit.cli import quiet_libraries

MB = 2**20


def _trainer(config: str, **overrides):
    from accelerate import Accelerator

    from distillkit.config import load_config
    from distillkit.engine.loop import Trainer

    extra = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(config, extra)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    Trainer.save_checkpoint = lambda self, step: None  # not part of a step's cost
    return Trainer(cfg, Accelerator(mixed_precision=cfg.train.mixed_precision))


def memory(config: str) -> dict:
    baseline = psutil.Process().memory_info().rss
    trainer = _trainer(config)
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline_mb": baseline / MB, "peak_mb": peak / MB, "delta_mb": (peak - baseline) / MB}


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(config: str, windows: int = 3, every: int = 2) -> dict:
    """Median Trainer step (windows after the first) vs the bare passes the same step needs."""
    trainer = _trainer(config, **{"train.max_steps": windows * every, "logging.every": every})
    trainer.train()
    text = (trainer.output_dir / "metrics.jsonl").read_text().splitlines()
    lines = [json.loads(x) for x in text[-windows:]]  # this run's windows; the first warms up
    step_s = statistics.median(1 / r["steps_per_s"] for r in lines[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": step_s, "bare_s": bare_dmd2_step(trainer), "peak_rss_mb": peak / MB}


def bare_dmd2_step(trainer) -> float:
    """DMD2 (no GAN, fake guidance 1, fake_updates_per_generator=1) with nothing around it:
    generator step = generator fwd+bwd, fake fwd, teacher fwd at 2B (CFG); fake step = fake
    fwd+bwd on the generator's (reused) sample. Same networks, shapes and dtypes."""
    t, rc = trainer.teacher, trainer.recipe
    gen, fake = rc.roles["generator"], rc.roles["fake_score"]
    b = trainer.cfg.train.batch_size
    cond = t.encode(trainer.data.prompts[:b])
    x = torch.randn((b, *t.latent_shape()), device=t.device)
    ts = t.sample_t(b, None, 0.02, 0.98)
    g = rc.cfg.real_guidance_scale

    def step() -> None:
        out = t.forward(gen, x, ts, cond.cond)
        with torch.no_grad():
            t.forward(fake, x, ts, cond.cond)
            t.predict(t.denoiser, x, ts, cond, g)
        out.float().square().mean().backward()
        t.forward(fake, x, ts, cond.cond).float().square().mean().backward()
        for p in trainer.params["generator"] + trainer.params["fake_score"]:
            p.grad = None

    step()
    return _timed(step, 5)


def latency(run_dir: str, teacher_dir: str, steps: int = 25, guidance: float = 7.5) -> dict:
    from diffusers import DiffusionPipeline

    student = DiffusionPipeline.from_pretrained(Path(run_dir) / "pipeline")
    teacher = DiffusionPipeline.from_pretrained(teacher_dir)
    call = json.loads((Path(run_dir) / "pipeline" / "distillkit.json").read_text())
    size = int(student.unet.config.sample_size) * student.vae_scale_factor
    out = {}
    for name, pipe, n, cfg in (
        ("student", student, call["num_inference_steps"], 0.0),
        ("teacher", teacher, steps, guidance),
    ):
        pipe.set_progress_bar_config(disable=True)

        def run(pipe=pipe, n=n, cfg=cfg) -> None:
            kwargs = {"height": size, "width": size, "guidance_scale": cfg}
            pipe("a photo of a cat", num_inference_steps=n, **kwargs)

        run()
        out[f"{name}_s"] = _timed(run, 3)
        out[f"{name}_steps"] = n
    out["speedup"] = out["teacher_s"] / out["student_s"]
    out["resolution"] = size
    return out


def activations(mode: str, latent: str, ckpt: str = "off") -> dict:
    """Calibration point: a real-size SD1.5 UNet (random weights) fwd+bwd at latent^2, batch 1:
    peak RSS growth vs the meta trace of `distillkit plan` (what ACT_K / ACT_C are fitted to)."""
    from diffusers import UNet2DConditionModel

    from distillkit.config import LoraConfigSection
    from distillkit.plan_arch import CONFIGS, build_meta, denoiser_inputs, trace_activations
    from distillkit.students import lora_config

    def setup(net):
        net.requires_grad_(mode == "full")
        if mode == "lora":
            net.add_adapter(lora_config(LoraConfigSection()))
        return net

    lat, folder = int(latent), CONFIGS / "sd15" / "unet"
    trace = trace_activations(setup(build_meta(folder)), 1, lat)
    net = setup(UNet2DConditionModel.from_config(json.loads((folder / "config.json").read_text())))
    if ckpt == "on":
        net.enable_gradient_checkpointing()
    (x, t), kw = denoiser_inputs(net, 1, lat)
    x, t = torch.randn(x.shape), torch.full((1,), 500.0)
    text = torch.randn(kw["encoder_hidden_states"].shape)
    before = psutil.Process().memory_info().rss
    net(x, t, encoder_hidden_states=text, return_dict=False)[0].square().mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = sum(p.numel() * 4 for p in net.parameters() if p.requires_grad)
    return {
        "mode": mode,
        "latent": lat,
        "checkpointing": ckpt == "on",
        "traced_mb": (trace.checkpointed if ckpt == "on" else trace.saved) / MB,
        "measured_mb": (peak - before - grads) / MB,
    }


if __name__ == "__main__":
    quiet_libraries()
    torch.set_num_threads(int(os.environ.get("PERF_THREADS", "2")))
    kind, *rest = sys.argv[1:]
    modes = {"memory": memory, "speed": speed, "latency": latency, "activations": activations}
    result = modes[kind](*rest)
    print("PERF " + json.dumps(result))
