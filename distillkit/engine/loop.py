"""The one training loop. For each step, for each role the recipe names: loss, backward, step.

Everything around the math lives here once: accelerate (devices, DDP/FSDP, mixed precision),
gradient accumulation, clipping, EMA, checkpoints, resume, logging and the final export.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from distillkit.config import RunConfig
from distillkit.data.sources import load_train_data
from distillkit.engine.callbacks import default_callbacks
from distillkit.engine.debug import dump_rank_state
from distillkit.engine.guards import (
    RunLock,
    all_finite,
    check_resume_config,
    check_runtime,
    prepare_output_dir,
    use_xformers,
    writable_dir,
)
from distillkit.engine.logging import MetricsLogger, progress_bar
from distillkit.engine.nanguard import GuardedEMA, NanPolicy
from distillkit.engine.optim import build_optimizer, folds_clipping, guarded_step
from distillkit.engine.preempt import PreemptionWatch, clear_marker, write_marker
from distillkit.engine.sharding import (
    gather_full,
    gather_tensors,
    gather_trainable,
    is_sharded,
    load_trainable_state,
    make_accelerator,
)
from distillkit.engine.state import CheckpointDir, load_trainable
from distillkit.errors import ConfigError, PeerLost, Preempted, TrainingDiverged, WriteFailed
from distillkit.export import ExportReport
from distillkit.export.run import export_run
from distillkit.faults import fault_active, fault_point
from distillkit.recipes.base import Batch, Recipe
from distillkit.registry import get_recipe
from distillkit.students import trainable_parameters
from distillkit.teachers.base import TeacherAdapter
from distillkit.teachers.load import SMOKE_RESOLUTION, load_teacher


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    export: ExportReport | None
    train_seconds: float


SHARED_STREAM = 2**31 - 1  # stands in for the rank in step_generator's keys: same on all ranks


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """An independent random stream per (step, micro-batch, rank, role): exact resumes."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        accelerator: Accelerator,
        *,
        smoke: bool = False,
        resume: bool = False,
        builtin_data: bool = False,
    ) -> None:
        self.cfg, self.smoke, self.resume = cfg, smoke, resume
        self.output_dir = Path(cfg.output_dir)
        self.accelerator = accelerator
        recipe_class = get_recipe(cfg.recipe.name)
        resolution = SMOKE_RESOLUTION if smoke else cfg.teacher.resolution
        # data files are checked before the (possibly many-GB) teacher is loaded
        self.data = load_train_data(
            cfg.data,
            resolution,
            smoke,
            need_images=recipe_class.needs_images(cfg.recipe),
            builtin=builtin_data,
        )
        set_seed(cfg.train.seed)
        # rank 0 first: it downloads (or builds the tiny --smoke teacher) once; the others then
        # read the finished cache instead of racing on a half-written directory
        with accelerator.main_process_first():
            self.teacher: TeacherAdapter = load_teacher(cfg.teacher, accelerator.device, smoke)
        self.teacher.use_start_timestep(cfg.student.start_timestep)
        if cfg.data.cache_dir:
            from distillkit.data.cache import TeacherKey, precompute_cache

            with accelerator.main_process_first():
                key = TeacherKey.from_config(cfg.teacher, smoke)
                encodings = precompute_cache(self.teacher, self.data, cfg.data.cache_dir, key)
            self.teacher.use_precomputed(encodings.to(accelerator.device))
            self.data.latents = encodings.latents
        self.recipe: Recipe = recipe_class(cfg, self.teacher)
        if use_xformers(cfg):
            self.teacher.denoiser.enable_xformers_memory_efficient_attention()
            for module in self.recipe.roles.values():
                for sub in module.modules():
                    if hasattr(sub, "enable_xformers_memory_efficient_attention"):
                        sub.enable_xformers_memory_efficient_attention()
                        break
        self._build_optimisation()
        self.checkpoints = CheckpointDir(
            self.output_dir / "checkpoints", cfg.train.checkpoints_keep
        )
        self.start_step = 0
        self.checkpoint_seconds = 0.0  # the last checkpoint's write time: fits the grace period?
        self.lr_scale = 1.0
        self.callbacks = default_callbacks(cfg) if accelerator.is_main_process else []
        if is_sharded(accelerator):
            self._drop_rank0_sampling(cfg, accelerator)

    def _drop_rank0_sampling(self, cfg: RunConfig, accelerator: Accelerator) -> None:
        """Grids and evaluations run the generator on rank 0 alone; a sharded forward needs
        every rank, so under FSDP they are off (and export.select: best has nothing to pick)."""
        from distillkit.engine.evaluate import EvalCallback
        from distillkit.engine.samples import SampleCallback

        if cfg.export.select == "best":
            raise ConfigError(
                "export.select: best needs logging.eval_every's evaluations, which do not run "
                "under FSDP yet: use export.select: last and evaluate the exported pipeline"
            )
        drop = (SampleCallback, EvalCallback)
        if any(isinstance(c, drop) for c in self.callbacks):
            accelerator.print(
                "warning: sample grids and evaluations (logging.sample_every, eval_every) are "
                "not made under FSDP yet; evaluate the exported pipeline instead"
            )
        self.callbacks = [c for c in self.callbacks if not isinstance(c, drop)]

    # ------------------------------------------------------------------ setup
    def _build_optimisation(self) -> None:
        cfg, acc = self.cfg.train, self.accelerator
        names = list(self.recipe.roles)
        if acc.distributed_type == DistributedType.DEEPSPEED and len(names) > 1:
            raise ConfigError(
                f"recipe {self.cfg.recipe.name!r} trains {len(names)} networks ({names}); "
                "accelerate's DeepSpeed integration prepares only one model per run. Use an "
                "FSDP preset (recipes/accelerate/fsdp_*.yaml) or DDP instead"
            )
        if is_sharded(acc) and self.cfg.student.shared_base:
            raise ConfigError(
                "student.shared_base=true cannot be sharded: its roles are adapters on the "
                "teacher's own denoiser, which FSDP does not wrap. Turn student.shared_base off "
                "(each role its own sharded copy) or use DDP"
            )
        self.params = {n: trainable_parameters(self.recipe.roles[n]) for n in names}
        optimizers = [
            build_optimizer(self.params[n], cfg, self.recipe.learning_rate(n)) for n in names
        ]
        # by keyword (get_scheduler's third parameter is step_rules), counted in accelerate's
        # units: a prepared scheduler steps num_processes times per call. diffusers' "constant"
        # ignores warmup; lr_warmup_steps applies to every curve here.
        kind = cfg.lr_scheduler
        if kind == "constant" and cfg.lr_warmup_steps > 0:
            kind = "constant_with_warmup"
        schedulers = [
            get_scheduler(
                kind,
                opt,
                num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,
                num_training_steps=cfg.max_steps * acc.num_processes,
            )
            for opt in optimizers
        ]
        # one prepare() per role: accelerate's FSDP2 takes one model (with its optimiser) per
        # call ("Only one model is supported when using FSDP2"); accelerate's model, optimiser
        # and scheduler lists (hence checkpoint file order) come out as with a single call
        self.optimizers, self.schedulers = {}, {}
        for name, opt, sched in zip(names, optimizers, schedulers):
            module, opt, sched = acc.prepare(self.recipe.roles[name], opt, sched)
            self.recipe.roles[name] = module
            self.optimizers[name], self.schedulers[name] = opt, sched
        # FSDP2 replaces parameters in prepare(): switch, clip and average the prepared ones
        self.params = {n: trainable_parameters(self.recipe.roles[n]) for n in names}
        self.nan = NanPolicy(cfg.nan_policy, cfg.nan_max_skips, cfg.rollback_lr_factor, acc.device)
        self.nonfinite = self.nan.tracker
        self.ema = None
        if cfg.ema.decay > 0:
            self.ema = GuardedEMA(self.params[self.recipe.generator_role], decay=cfg.ema.decay)
            acc.register_for_checkpointing(self.ema)

        # Each role's trainable tensors go to <role>.safetensors (what `distillkit export` and
        # resumes read). Under FSDP accelerate saves/loads the sharded models itself and hands
        # these hooks empty lists: the roles are gathered here on every rank (a collective),
        # rank 0 writes, and every rank loads its shard back from the whole tensors.
        def save_hook(models, weights, out_dir):
            for name in names:
                tensors = gather_trainable(acc, self.recipe.roles[name])
                if tensors is not None:
                    save_file(tensors, str(Path(out_dir) / f"{name}.safetensors"))
            weights.clear()

        def load_hook(models, in_dir):
            for name in names:
                load_trainable(
                    self.recipe.roles[name],
                    Path(in_dir) / f"{name}.safetensors",
                    loader=lambda module, tensors: load_trainable_state(acc, module, tensors),
                )
            models.clear()

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> None:
        acc, began = self.accelerator, time.perf_counter()
        params = [p for ps in self.params.values() for p in ps]
        if not all_finite(params):
            raise TrainingDiverged(
                f"step {step}: trainable weights are not finite; no checkpoint was written"
            )
        tmp = self.checkpoints.root / f".tmp-step-{step:07d}"
        try:
            if acc.is_main_process:
                self.checkpoints.staging(step)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            if acc.is_main_process:
                for name, module in self.recipe.state_modules().items():
                    save_file(module.state_dict(), str(tmp / f"state-{name}.safetensors"))
            fault_point(f"checkpoint-write-{step}", tmp)
            acc.wait_for_everyone()
            if acc.is_main_process:
                self.checkpoints.commit(tmp, step, {"step": step, "recipe": self.cfg.recipe.name})
        except OSError as err:
            self.checkpoints.discard(tmp)
            found = self.checkpoints.latest_good(warn=lambda _: None)
            kept = (
                f"the previous checkpoint {found[0].name} and checkpoints/latest stand"
                if found
                else "there is no earlier checkpoint"
            )
            raise WriteFailed(
                f"checkpoint step-{step:07d}: cannot write {err.filename or tmp} ({err.strerror})"
                f"; {kept} and the temporary files are removed: free space (or lower "
                "train.checkpoints_keep), then --resume"
            ) from None
        acc.wait_for_everyone()
        self.checkpoint_seconds = time.perf_counter() - began

    def stop_preempted(self, step: int, signal_name: str) -> None:
        """After the pre-emption checkpoint (or without one, when the grace period had no room
        for it): the marker a requeue script reads, then a clean exit with EXIT_PREEMPTED."""
        newest = self.checkpoints.candidates()  # `latest` first; not re-hashed in the grace period
        name = newest[0].name if newest else None
        if self.accelerator.is_main_process:
            write_marker(self.output_dir, step, signal_name, name)
        self.accelerator.wait_for_everyone()
        saved = f"checkpoint {name}" if name else "no checkpoint yet"
        raise Preempted(
            f"{signal_name} at step {step}: stopped at the step boundary with {saved} "
            f"(train.preempt_grace_s={self.cfg.train.preempt_grace_s:g}); continue with --resume",
            step,
        )

    def load_latest(self) -> bool:
        found = self.checkpoints.latest_good(warn=self.accelerator.print)
        if found is None:
            return False
        path, meta = found
        self.accelerator.load_state(str(path))
        for name, module in self.recipe.state_modules().items():
            module.load_state_dict(load_file(str(path / f"state-{name}.safetensors")))
        self.start_step = int(meta["step"])
        self.accelerator.print(f"resumed from {path.name} (step {self.start_step})")
        return True

    # ------------------------------------------------------------------ the loop
    def micro_batches(self, step: int) -> list[tuple]:
        cfg, acc = self.cfg.train, self.accelerator
        out = []
        for micro in range(cfg.grad_accumulation):
            slot = (step * cfg.grad_accumulation + micro) * acc.num_processes + acc.process_index
            out.append(self.data.batch(slot, cfg.batch_size, cfg.seed, self.cfg.data.shuffle))
        return out

    def train_step(self, step: int) -> dict[str, torch.Tensor] | None:
        """One step of every scheduled role, without a host sync.

        A non-finite gradient norm sets a device flag that vetoes this and every later update of
        the step (as the old early return did): the fused AdamW step reads it as ``found_inf``
        and skips exactly; the EMA and the recipe's ``after_update`` take it too; the tracker
        counts it for ``check_nonfinite``. Returns None only on the host-sync fallback path
        (optimisers that cannot take found_inf), when a non-finite gradient skipped the step.
        """
        acc, cfg = self.accelerator, self.cfg.train
        micro = self.micro_batches(step)
        scratch: list[dict] = [{} for _ in micro]
        logs: dict[str, torch.Tensor] = {}
        roles = self.recipe.schedule(step)
        bad: torch.Tensor | None = None  # 0-dim float on the device: 1 once a gradient was bad
        sharded = is_sharded(acc)
        try:
            for role_index, role in enumerate(roles):
                for name, params in self.params.items():
                    for p in params:
                        p.requires_grad_(name == role)
                module, opt = self.recipe.roles[role], self.optimizers[role]
                opt.zero_grad(set_to_none=True)
                for m, (prompts, images, captions, latents) in enumerate(micro):
                    gen = step_generator(cfg.seed, step, m, acc.process_index, role_index)
                    batch = Batch(prompts, images, captions, gen, scratch[m], latents=latents)
                    if sharded:  # rank-free stream: all ranks make the same structural choices
                        batch.shared = step_generator(cfg.seed, step, m, SHARED_STREAM, role_index)
                    sync = m == len(micro) - 1
                    ctx = contextlib.nullcontext() if sync else acc.no_sync(module)
                    with ctx, acc.autocast():
                        loss, parts = self.recipe.loss(role, batch, step)
                        if fault_active(f"nan-step-{step}"):
                            loss = loss * float("nan")
                        acc.backward(loss / len(micro))
                    for key, value in {"loss": loss.detach(), **parts}.items():
                        logs[f"{role}/{key}"] = logs.get(f"{role}/{key}", 0) + value / len(micro)
                folded = folds_clipping(acc, opt)
                grad_norm = self._clip(role, folded)
                update = guarded_step(
                    opt, grad_norm, bad, folded=folded, max_norm=cfg.max_grad_norm
                )
                if update is None:  # the host-sync fallback saw a non-finite gradient
                    opt.zero_grad(set_to_none=True)
                    self.nonfinite.record(step, torch.ones((), device=acc.device))
                    return None
                bad, applied = update
                if grad_norm is not None:
                    logs[f"{role}/grad_norm"] = torch.as_tensor(grad_norm).detach()
                opt.zero_grad(set_to_none=True)  # hold one role's gradients at a time
                self.recipe.after_update(role, step, applied)
                if role == self.recipe.generator_role and self.ema is not None:
                    ok = applied if applied is not None else torch.ones((), device=acc.device)
                    self.ema.step_masked(self.params[role], ok)
        finally:
            for params in self.params.values():
                for p in params:
                    p.requires_grad_(True)
            # every role's rate follows the loop step, also through skipped updates and for
            # roles not scheduled this step (DMD2's generator updates every 5th step)
            for sched in self.schedulers.values():
                sched.step()
        if bad is not None:
            logs["_applied"] = 1.0 - bad  # _reduce leaves skipped steps out of the averages
        # a good step ends a run of bad ones (the counters stay on the device: no sync)
        self.nonfinite.record(step, bad if bad is not None else torch.zeros((), device=acc.device))
        return logs

    def smoke_substitutions(self) -> str:
        """What --smoke runs instead of the configured run: a preflight says what it swapped."""
        cfg, dtype = self.cfg, str(self.teacher.dtype).removeprefix("torch.")
        lines = [
            f"smoke: a tiny random {cfg.teacher.family} teacher at {SMOKE_RESOLUTION} px instead "
            f"of {cfg.teacher.model_id} at {cfg.teacher.resolution} px, in {dtype} "
            f"(teacher.dtype={cfg.teacher.dtype}, as on CUDA)",
            f"smoke: train.max_steps={cfg.train.max_steps}, batch {cfg.train.batch_size}, "
            f"accumulation {cfg.train.grad_accumulation}; every other setting as configured",
        ]
        if self.data.substituted:
            lines.append(f"smoke: data: {self.data.substituted}")
        if self.teacher.loras is not None:
            lines += self.teacher.loras.notes
        return "\n".join(lines)

    def _clip(self, role: str, folded: bool = False) -> torch.Tensor | float | None:
        """The role's total gradient norm; its gradients clipped to train.max_grad_norm, unless
        ``folded``: then the optimiser step applies the clip (optim.folds_clipping)."""
        acc, params, max_norm = self.accelerator, self.params[role], self.cfg.train.max_grad_norm
        if folded:
            return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if not is_sharded(acc):
            return acc.clip_grad_norm_(params, max_norm)
        # accelerate's FSDP branch looks for the role's model by comparing parameter lists with
        # ==, which turns into elementwise DTensor ops when two roles have as many parameters
        # (SiD, SANA's DMD2): clip the role's DTensor gradients with torch directly
        acc.unscale_gradients()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm  # replicated: no comm

    def check_nonfinite(self, step: int) -> int | None:
        """Apply train.nan_policy to what the device counters saw (one sync; called only where
        the loop syncs anyway: logging, before a checkpoint, at the end, and at once on the
        host-sync fallback). Returns the step to continue from after a rollback, else None."""
        decision = self.nan.check(step)  # raises when the policy stops
        if decision is None:
            return None
        if decision.action == "skip":
            self.accelerator.print(
                f"warning: {decision.where}; update skipped (train.nan_policy=skip)"
            )
            return None
        return self.roll_back(decision.where)

    def roll_back(self, where: str) -> int:
        """train.nan_policy=rollback: the latest checkpoint, with lower rates."""
        cfg, acc = self.cfg.train, self.accelerator
        if not self.load_latest():
            raise TrainingDiverged(
                f"{where} and there is no checkpoint to roll back to: lower "
                "train.checkpoint_every, or use train.nan_policy=skip"
            )
        # the checkpoint restores the original rates: apply every rollback's factor so far
        self.lr_scale *= cfg.rollback_lr_factor
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] *= self.lr_scale
            sched = getattr(self.schedulers[name], "scheduler", self.schedulers[name])
            sched.base_lrs = [lr * self.lr_scale for lr in sched.base_lrs]
        acc.print(f"warning: {where}; rolled back to step {self.start_step} with lower lr")
        return self.start_step

    def train(self) -> RunResult:
        cfg, acc = self.cfg, self.accelerator
        if self.resume and not self.load_latest():
            acc.print("--resume: no checkpoint found, starting from step 0")
        main = acc.is_main_process
        logger = MetricsLogger(
            self.output_dir,
            cfg.logging.backends,
            cfg.model_dump(mode="json"),
            enabled=main,
            start_step=self.start_step,
        )
        if main:
            self.write_run_config()
            effective = cfg.train.batch_size * cfg.train.grad_accumulation * acc.num_processes
            acc.print(
                f"distillkit: {cfg.recipe.name} on {cfg.teacher.family} "
                f"({'smoke: tiny teacher' if self.smoke else cfg.teacher.model_id}), "
                f"effective batch {effective} on {acc.num_processes} process(es), {acc.device}"
            )
            if self.smoke:
                acc.print(self.smoke_substitutions())
        for callback in self.callbacks:
            callback.on_train_start(self)
        started, window = time.perf_counter(), time.perf_counter()
        pending: list[dict[str, torch.Tensor]] = []
        bar = progress_bar(cfg.logging.progress_bar and main)
        total, step = cfg.train.max_steps, self.start_step
        watch = PreemptionWatch(cfg.train.preempt_signals, cfg.train.preempt_grace_s)
        preempt: str | None = None  # the signal all ranks agreed on
        with bar, watch:
            task = bar.add_task(cfg.recipe.name, total=total, completed=step, speed="", losses="")
            while step < total:
                logs = self.train_step(step)
                if logs is None:  # the host-sync fallback saw a bad update: decide now
                    restart = self.check_nonfinite(step)
                    step = step + 1 if restart is None else restart
                    continue
                pending.append(logs)
                step += 1
                fault_point(f"after-step-{step}")
                preempt = watch.agreed(acc) if step < total else None
                log_now = step % cfg.logging.every == 0 or step == total or preempt
                save_now = step % cfg.train.checkpoint_every == 0 or step == total
                if preempt and not save_now:
                    save_now = watch.time_to_checkpoint(acc, self.checkpoint_seconds)
                if log_now or save_now:  # the deferred NaN guard, where the loop syncs anyway
                    restart = self.check_nonfinite(step - 1)
                    if restart is not None:
                        step, pending, window = restart, [], time.perf_counter()
                        continue
                if log_now:
                    values = self._reduce(pending, acc)
                    speed = len(pending) / max(time.perf_counter() - window, 1e-9)
                    values["steps_per_s"] = speed
                    generator_sched = self.schedulers[self.recipe.generator_role]
                    values["lr/generator"] = generator_sched.get_last_lr()[0]
                    values["effective_batch"] = (
                        cfg.train.batch_size * cfg.train.grad_accumulation * acc.num_processes
                    )
                    for callback in self.callbacks:
                        callback.on_log(self, step, values)
                    logger.log(step, values)
                    shown = "  ".join(
                        f"{k}={v:.4g}" for k, v in values.items() if k.endswith("/loss")
                    )
                    bar.update(task, completed=step, speed=f"{speed:.2f} it/s", losses=shown)
                    pending, window = [], time.perf_counter()
                if save_now:
                    self.save_checkpoint(step)
                if preempt:
                    break
                for callback in self.callbacks:
                    callback.on_step_end(self, step)
        train_seconds = time.perf_counter() - started
        dump_rank_state(self)  # test-only, every rank: no-op unless DISTILLKIT_DUMP_RANK_WEIGHTS
        logger.close()
        if preempt:
            self.stop_preempted(step, preempt)
        if main:
            clear_marker(self.output_dir)
        if main:
            summary = {"steps": total, "train_seconds": round(train_seconds, 2)}
            (self.output_dir / "train.json").write_text(json.dumps(summary))
        report = self.export() if cfg.export.enabled else None  # every rank: may gather
        acc.wait_for_everyone()
        result = RunResult(self.output_dir, cfg.train.max_steps, report, train_seconds)
        for callback in self.callbacks:
            callback.on_train_end(self, result)
        return result

    @staticmethod
    def _reduce(pending: list[dict[str, torch.Tensor]], acc: Accelerator) -> dict[str, float]:
        """Average the logged tensors of the window (and over ranks) with a single host sync.
        Steps whose update was skipped (``_applied`` = 0, NaN losses) are left out."""
        if not pending:
            return {}
        flat = {(i, k): torch.as_tensor(v).float() for i, logs in enumerate(pending)
                for k, v in logs.items()}  # fmt: skip
        host = {}
        for device in {v.device for v in flat.values()}:  # one sync per device
            keys = [key for key, v in flat.items() if v.device == device]
            host.update(zip(keys, torch.stack([flat[key] for key in keys]).cpu()))
        kept = [i for i in range(len(pending)) if host.get((i, "_applied"), 1.0) > 0]
        keys = sorted({k for (i, k) in host if k != "_applied" and i in kept})
        if not keys:
            return {}
        means = [torch.stack([host[i, k] for i in kept if (i, k) in host]).mean() for k in keys]
        stacked = torch.stack(means)
        if acc.num_processes > 1:  # log the whole effective batch's losses, not rank 0's share
            stacked = acc.reduce(stacked.to(acc.device), "mean").cpu()
        return dict(zip(keys, stacked.tolist()))

    # ------------------------------------------------------------------ export
    def write_run_config(self) -> None:
        data = {"smoke": self.smoke, "config": self.cfg.model_dump(mode="json")}
        (self.output_dir / "run.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def generator_for_export(self) -> torch.nn.Module | None:
        """The generator to export (EMA weights when configured), whole, on the main process;
        None elsewhere. Call on every rank: under FSDP gathering the shards is a collective."""
        acc = self.accelerator
        use_ema = self.ema is not None and self.cfg.train.ema.use_for_export
        module = self.recipe.generator_net()
        if not is_sharded(acc):
            if not acc.is_main_process:
                return None
            net = acc.unwrap_model(module, keep_fp32_wrapper=False)
            if not use_ema:
                return net
            ema_net = copy.deepcopy(net)
            self.ema.copy_to([p for p in ema_net.parameters() if p.requires_grad])
            return ema_net
        # FSDP: every rank gathers the generator (and the EMA shadows), rank 0 rebuilds a
        # plain, unsharded copy from the teacher and loads the whole state into it
        state = gather_full(acc, module)
        shadows = gather_tensors(acc, self.ema.shadow_params) if use_ema else None
        if not acc.is_main_process:
            return None
        net = self.recipe.plain_generator()
        net.load_state_dict(state, strict=True)
        if shadows is not None:
            trainable = [p for p in net.parameters() if p.requires_grad]
            for p, shadow in zip(trainable, shadows, strict=True):
                p.data.copy_(shadow)
        return net

    def export(self) -> ExportReport | None:
        """The end-of-training export (every rank: FSDP gathers), the same as `distillkit export`
        makes from the last checkpoint."""
        generator = self.generator_for_export()
        if generator is None:
            return None
        if self.cfg.export.select == "best":
            from distillkit.engine.evaluate import load_best_into

            best = load_best_into(generator, self.output_dir)
            self.accelerator.print(
                f"exporting the best evaluated generator: step {best['step']}, "
                f"{best['select_by']} {best['score']:.4g}"
            )
        if not all_finite(generator.parameters()):
            raise TrainingDiverged("the generator's weights are not finite; nothing was exported")
        return export_run(
            self.cfg,
            self.teacher,
            generator,
            self.recipe.step_counts,
            smoke=self.smoke,
            say=self.accelerator.print,
        )


def run(
    cfg: RunConfig, *, smoke: bool = False, resume: bool = False, builtin_data: bool = False
) -> RunResult:
    """Check, lock the output directory (main process), train, export, unlock.
    ``builtin_data`` (``--smoke`` only) trains on built-in prompts and images instead of data.*."""
    if builtin_data and not smoke:
        raise ConfigError("--builtin-data only applies to --smoke runs: a real run reads data.*")
    check_runtime(cfg)
    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.collective_timeout_s)
    output_dir = Path(cfg.output_dir)
    lock = RunLock(output_dir)
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, resume)
        if cfg.data.cache_dir:
            writable_dir(Path(cfg.data.cache_dir), "data.cache_dir")
        if resume:
            check_resume_config(output_dir, cfg, smoke)
        lock.acquire()
    try:
        trainer = Trainer(cfg, accelerator, smoke=smoke, resume=resume, builtin_data=builtin_data)
        return trainer.train()
    except (RuntimeError, torch.distributed.DistError) as err:
        if accelerator.num_processes == 1 or not is_collective_failure(err):
            raise
        found = CheckpointDir(output_dir / "checkpoints", 1).latest_good(warn=lambda _: None)
        kept = f"checkpoint {found[0].name}" if found else "no checkpoint yet"
        raise PeerLost(
            f"rank {accelerator.process_index}: a collective with the other processes failed "
            f"({str(err).strip().splitlines()[0][:300]}); another rank stopped (its log says "
            f"why) or hung past train.collective_timeout_s={cfg.train.collective_timeout_s:g}. "
            f"The run holds {kept}: relaunch every rank with --resume"
        ) from None
    finally:
        lock.release()


def is_collective_failure(err: BaseException) -> bool:
    """torch.distributed's own errors, and gloo's / NCCL's plain RuntimeErrors (a closed
    connection, a timeout) that a dead or hung peer causes."""
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err)
    return any(s in text for s in ("gloo", "NCCL", "Connection closed by peer", "Timed out"))
