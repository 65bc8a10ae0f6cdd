"""One perf measurement in a fresh process (peak RSS is per process): `bench_perf.py` calls it.

    python evaluation/perf_worker.py memory RUN.yaml   -> {"baseline_mb", "peak_mb", ...}
    python evaluation/perf_worker.py speed RUN.yaml    -> step times: Trainer vs bare passes
        (the bare passes are recorded from real steps, then replayed)
    python evaluation/perf_worker.py latency RUN_DIR TEACHER_DIR -> export vs teacher latency
    python evaluation/perf_worker.py teacher RUN.yaml  -> teacher-only inference peak RSS

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
from distillkit.recipes.gan import TappedBackbone

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


def teacher_inference(config: str) -> dict:
    """The teacher-only inference footprint in memory()'s accounting: the run's teacher loaded,
    one guided denoiser call (batch 2: CFG) at the run's latent size, no training."""
    from distillkit.config import load_config
    from distillkit.teachers.load import load_teacher

    baseline = psutil.Process().memory_info().rss
    cfg = load_config(config)
    teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    cond = teacher.encode(["a photo of a cat"])
    x = torch.randn(1, *teacher.latent_shape())
    with torch.no_grad():
        teacher.predict(teacher.denoiser, x, torch.full((1,), 500.0), cond, 7.5)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline_mb": baseline / MB, "peak_mb": peak / MB, "delta_mb": (peak - baseline) / MB}


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(config: str, windows: int = 2, every: int = 2, rounds: int = 5) -> dict:
    """Trainer steps vs the bare passes the same steps need, measured interleaved.

    ``train()`` runs ``windows`` logging windows first (warm-up: lazy optimiser state, caches,
    allocator), then one window's steps are recorded (``record_passes``); then ``rounds`` times,
    alternately, ``every`` real steps (``train_step`` plus the window's NaN check and log
    reduction, as ``train()`` does them) and their bare replay. Medians of each; alternating
    keeps load from other processes and allocator warm-up from favouring either side.
    """
    trainer = _trainer(config, **{"train.max_steps": windows * every, "logging.every": every})
    trainer.train()
    first = windows * every
    calls = record_passes(trainer, range(first, first + every))
    update = _time_updates(trainer)
    replay = bare_replay(trainer, calls)
    replay()
    real_s, bare_s, update_s = [], [], []
    for r in range(rounds):
        steps = list(range(first + (r + 1) * every, first + (r + 2) * every))
        update.clear()
        start = time.perf_counter()
        pending = [trainer.train_step(step) for step in steps]
        trainer.check_nonfinite(steps[-1])
        trainer._reduce(pending, trainer.accelerator)
        real_s.append((time.perf_counter() - start) / every)
        update_s.append(sum(update.values()) / every)
        start = time.perf_counter()
        replay()
        bare_s.append((time.perf_counter() - start) / every)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "step_s": statistics.median(real_s),
        "bare_s": statistics.median(bare_s),
        "update_s": statistics.median(update_s),
        "peak_rss_mb": peak / MB,
        "passes_per_step": passes_summary(calls, every),
    }


def _time_updates(trainer) -> dict[str, float]:
    """Wall time of the parameter-update work inside steps: clipping, optimiser, EMA."""
    spent: dict[str, float] = {}

    def wrap(obj, name, label):
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

        setattr(obj, name, timed)

    for opt in trainer.optimizers.values():
        wrap(opt, "step", "optimizer")
    wrap(trainer, "_clip", "clip")  # the grad norm, and the clip itself where not folded
    if trainer.ema is not None:
        wrap(trainer.ema, "step_masked", "ema")
    wrap(trainer.recipe, "after_update", "after_update")
    return spent


# ----------------------------------------------------------------------------- bare passes
# The bare passes of a step are found, not hand-listed: one real Trainer step per schedule slot
# runs with every network call recorded (the denoisers of all roles and the teacher, EMA targets,
# text encoders, VAE encoder), and the timed "bare" step replays exactly those calls (same
# modules, inputs, grad mode; inputs that carried a gradient get one) and one backward per role
# update over the outputs that need it. Everything else (the recipe's math, clipping, optimiser,
# EMA, logging, the loop) is the overhead the ratio measures.


def _tree(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_tree(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _tree(v, fn) for k, v in value.items()}
    return value


def _leaves(value) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _tree(value, lambda t: out.append(t) or t)
    return out


def _networks(trainer) -> list[tuple[str, object, str]]:
    """(label, object, method) for every network a step may call."""
    found: dict[int, tuple[str, object, str]] = {}
    for name, module in trainer.teacher.pipe.components.items():
        if isinstance(module, torch.nn.Module):
            method = "encode" if name == "vae" else "forward"
            found.setdefault(id(module), (f"teacher.{name}", module, method))
    for name, module in {**trainer.recipe.roles, **trainer.recipe.state_modules()}.items():
        found.setdefault(id(module), (name, module, "forward"))
    return list(found.values())


def record_passes(trainer, steps) -> list[tuple]:
    """Run ``steps`` real train steps, recording each network call (outermost calls only)."""
    calls: list[tuple] = []
    depth = [0]
    patched = []

    def wrap(label, obj, method):
        original = getattr(obj, method)

        def recorded(*args, **kwargs):
            if depth[0] == 0:
                keep = lambda t: t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
                capturing = bool(getattr(obj, "capturing", False))
                calls.append(
                    ("call", label, obj, method, _tree(args, keep), _tree(kwargs, keep),
                     torch.is_grad_enabled(), capturing)
                )  # fmt: skip
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(obj, method, recorded)
        patched.append((obj, method))

    for label, obj, method in _networks(trainer):
        wrap(label, obj, method)
    recipe, acc = trainer.recipe, trainer.accelerator
    loss, backward = recipe.loss, acc.backward

    def loss_marked(role, batch, step):
        if not calls or calls[-1][:2] != ("role", role):
            calls.append(("role", role))
        return loss(role, batch, step)

    def backward_marked(value, **kwargs):
        calls.append(("backward",))
        return backward(value, **kwargs)

    recipe.loss, acc.backward = loss_marked, backward_marked
    try:
        for step in steps:
            trainer.train_step(step)
    finally:
        del recipe.loss, acc.backward
        for obj, method in patched:
            delattr(obj, method)
    return calls


def passes_summary(calls, steps: int) -> dict[str, str]:
    """Per step: network -> 'F fwd (G with grad), B in backward' at the recorded batch sizes."""
    out: dict[str, list[str]] = {}
    for call in calls:
        if call[0] == "call":
            _, label, _, method, args, kwargs, grad, _ = call
            batch = next((t.shape[0] for t in _leaves((args, kwargs)) if t.ndim >= 2), "?")
            out.setdefault(label, []).append(f"{method}(batch {batch}{', grad' if grad else ''})")
    return {
        k: f"{len(v) / steps:g} calls/step: " + ", ".join(sorted(set(v))) for k, v in out.items()
    }


def bare_replay(trainer, calls):
    """A function that replays the recorded network calls bare."""
    params = trainer.params

    def replay() -> None:
        outputs: list[torch.Tensor] = []
        for call in calls:
            if call[0] == "role":
                for name, ps in params.items():
                    for p in ps:
                        p.requires_grad_(name == call[1])
            elif call[0] == "backward":
                if outputs:
                    sum(o.float().mean() for o in outputs).backward()
                outputs = []
                for ps in params.values():
                    for p in ps:
                        p.grad = None
            else:
                _, _, obj, method, args, kwargs, grad, capturing = call
                fresh = lambda t: t.detach().requires_grad_(t.requires_grad)  # noqa: E731
                # a call made for GAN logits (call_with_logits) is replayed with its heads on:
                # the logits join the outputs that the replay back-propagates
                tapped = isinstance(obj, TappedBackbone) and capturing
                if tapped:
                    obj.capturing = True
                try:
                    with torch.set_grad_enabled(grad):
                        out = getattr(obj, method)(*_tree(args, fresh), **_tree(kwargs, fresh))
                finally:
                    if tapped:
                        obj.capturing = False
                if tapped:
                    out, obj.logits = (out, obj.logits), None
                outputs += [o for o in _leaves(out) if o.requires_grad]
        for ps in params.values():
            for p in ps:
                p.requires_grad_(True)
                p.grad = None

    return replay


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
    modes = {
        "memory": memory,
        "speed": speed,
        "latency": latency,
        "activations": activations,
        "teacher": teacher_inference,
    }
    result = modes[kind](*rest)
    print("PERF " + json.dumps(result))
