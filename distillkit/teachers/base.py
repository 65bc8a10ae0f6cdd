"""The teacher-adapter contract: every recipe talks to a model family only through this.

A family adapter wraps a loaded diffusers pipeline and supplies four things: how prompts become
network keyword arguments (:meth:`encode_prompts`), how a network is called
(:meth:`forward`), which schedule/parameterization it uses (:meth:`build_schedule`) and which
one-step scheduler its export uses (:meth:`export_scheduler`). Everything else (noising,
x0/eps conversions, classifier-free guidance, few-step generation, VAE round trips) is written
once here on top of those.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from torch import Tensor, nn

from distillkit.diffusion.schedules import Schedule
from distillkit.errors import ConfigError

if TYPE_CHECKING:
    from distillkit.teachers.loras import TeacherLoras


def tree_map(fn, tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, Tensor):
        return fn(tree)
    return tree


def tree_cat(trees: list[Any]) -> Any:
    first = trees[0]
    if isinstance(first, dict):
        return {k: tree_cat([t[k] for t in trees]) for k in first}
    if isinstance(first, Tensor):
        return torch.cat(trees, dim=0)
    return first


def compute_dtype(net: nn.Module) -> torch.dtype:
    """The dtype a denoiser computes in: that of its base weights (a LoRA's own weights are fp32
    masters). Wrappers (DDP, the fake score with its GAN head, an adapter on a shared base) say
    it through a ``compute_dtype`` attribute. Not diffusers' ``ModelMixin.dtype``: that walks every
    submodule for casting hooks, milliseconds per call on SDXL."""
    net = getattr(net, "module", net)  # a DDP wrapper
    own = getattr(net, "compute_dtype", None)
    if isinstance(own, torch.dtype):
        return own
    for name, param in net.named_parameters():
        if "lora_" not in name and param.is_floating_point():
            return param.dtype
    return torch.float32


def cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of ``tree`` in ``dtype``; masks and ids keep theirs."""
    return tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


@dataclass
class Conditioning:
    """Per-sample network keyword arguments for the prompts and for the empty prompt (CFG).

    Recipes pass it around without looking inside; only the adapter knows the keys.
    """

    cond: dict[str, Any]
    uncond: dict[str, Any]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Conditioning:
        def move(t: Tensor) -> Tensor:
            cast = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            return t.to(device=device, dtype=cast)

        return Conditioning(tree_map(move, self.cond), tree_map(move, self.uncond))

    def select(self, index: Tensor | slice) -> Conditioning:
        return Conditioning(
            tree_map(lambda t: t[index], self.cond), tree_map(lambda t: t[index], self.uncond)
        )

    def with_empty_prompts(self, mask: Tensor | None = None) -> Conditioning:
        """The empty prompt (the CFG negative) in place of the prompt where ``mask`` is True (all
        samples when None): prompt dropout and text-free networks without knowing the keys."""

        def where(cond: Any, uncond: Any) -> Any:
            if isinstance(cond, dict):
                return {k: where(cond[k], uncond[k]) for k in cond}
            if not isinstance(cond, Tensor):
                return cond
            if mask is None:
                return uncond
            keep = mask.to(cond.device).reshape(-1, *([1] * (cond.ndim - 1)))
            return torch.where(keep, uncond, cond)

        return Conditioning(where(self.cond, self.uncond), self.uncond)


class TeacherAdapter:
    """Base adapter; subclasses are registered per family in distillkit/teachers/<family>.py."""

    family: ClassVar[str]
    pipeline_class: ClassVar[str]
    denoiser_attr: ClassVar[str] = "unet"
    export_scheduler_name: ClassVar[str]  # the class export_scheduler() returns (for cards)
    embedding_cache_size: ClassVar[int] = 4096

    def __init__(self, pipe: DiffusionPipeline, resolution: int, device: torch.device) -> None:
        if type(pipe).__name__ != self.pipeline_class:
            raise TypeError(
                f"family {self.family!r} expects a {self.pipeline_class}, got {type(pipe).__name__}"
            )
        self.pipe = pipe
        self.resolution = resolution
        self.device = device
        self.text_device = device  # where the text encoders run (the CPU once offloaded)
        self.start_timestep: int | None = None  # see use_start_timestep
        self.grid_steps: int | None = None  # see use_sampling_grid
        self.loras: TeacherLoras | None = None  # teacher.loras, fused in (teachers/loras.py)
        self.default_guidance: float | None = None  # teacher.default_guidance (the card's)
        self.max_sequence_length: int | None = None  # teacher.max_sequence_length (the card's)
        self.schedule: Schedule = self.build_schedule(dict(pipe.scheduler.config))
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
                module.eval()
        pipe.to(device)
        self._cache: OrderedDict[str, tuple[dict, dict]] = OrderedDict()
        factor = pipe.vae_scale_factor
        if resolution % factor:
            raise ValueError(
                f"teacher.resolution={resolution} is not divisible by the VAE's downsampling "
                f"factor {factor}; use a multiple of {factor}"
            )

    # ------------------------------------------------------------------ family specifics
    def build_schedule(self, scheduler_config: dict) -> Schedule:
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        """Network kwargs for ``prompts`` and for the empty prompt, batched like the input."""
        raise NotImplementedError

    def forward(self, net: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        """One raw network call in the family's own parameterization, as fp32. The input and the
        conditioning follow ``net``'s dtype, whatever the text encoders computed in (a bf16
        teacher's embeddings reach an fp32 student), as the family's pipeline casts them."""
        dtype = compute_dtype(net)
        return self.call_network(net, x_t.to(dtype), t, cast_floating(kwargs, dtype)).float()

    def call_network(self, net: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        """The family's network call on inputs already in the network's dtype."""
        raise NotImplementedError

    def export_scheduler(self):
        """A scheduler whose k-step trajectory is exactly :meth:`generate`'s."""
        raise NotImplementedError

    def use_start_timestep(self, t: int | None) -> None:
        """Start generators (training and export) at timestep ``t`` instead of T-1.

        The export scheduler must carry it in its own config, so plain diffusers samples the same
        trajectory; families whose scheduler cannot say it refuse here with the field name.
        """
        if t is None:
            return
        self.check_start_timestep(t)
        self.start_timestep = t

    def use_sampling_grid(self, steps: int | None) -> None:
        """Sample few-step trajectories from a ``steps``-point solver grid (LCM's distillation grid,
        diffusers' ``original_inference_steps``): k-step sampling picks k of its points by
        LCMScheduler's rule, in training and in the export alike. None: the family's default."""
        self.grid_steps = steps

    def check_start_timestep(self, t: int) -> None:
        raise ConfigError(
            f"student.start_timestep: the {self.family} family starts its generators at the "
            "export scheduler's first step; remove the setting"
        )

    def use_guidance(self, mode: str) -> None:
        """``teacher.guidance``: ``auto`` / ``cfg`` is classifier-free guidance for every family
        but those whose network reads the scale as an input (FLUX.1-dev), which override this."""
        if mode == "embedded":
            raise ConfigError(
                f"teacher.guidance=embedded: the {self.family} family's network has no guidance "
                "input; use auto (classifier-free guidance)"
            )

    def student_guidance_scale(self) -> float:
        """The ``guidance_scale`` an exported student is called with: 0 (guidance is distilled
        in, no CFG pass) unless the network reads guidance as an input (FLUX.1-dev)."""
        return 0.0

    def scheduler_grid_kwargs(self) -> dict:
        """What ``set_timesteps`` needs beyond the grid that the pipeline computes itself (FLUX's
        resolution-dependent ``mu``); none by default."""
        return {}

    def pipeline_latents(self, noise: Tensor) -> Tensor:
        """``noise`` (N, C, h, w) in the form the pipeline's ``latents=`` takes (default: as is;
        FLUX packs 2x2 patches into tokens)."""
        return noise

    def latents_from_pipeline(self, latents: Tensor) -> Tensor:
        """The pipeline's ``output_type="latent"`` result back as (N, C, h, w)."""
        return latents

    def pipeline_call_kwargs(self) -> dict:
        """Extra arguments the family's pipeline needs to reproduce training-time sampling."""
        return {}

    def call_default(self, name: str) -> Any:
        """A default of the family pipeline's ``__call__`` (e.g. SANA's complex instruction)."""
        return inspect.signature(type(self.pipe).__call__).parameters[name].default

    def text_length(self) -> int:
        """Tokens per prompt for the pipelines that take ``max_sequence_length``: the card's,
        else the pipeline's own default (SD3 256, FLUX 512, SANA 300)."""
        return self.max_sequence_length or int(self.call_default("max_sequence_length"))

    def prompt_call_kwargs(self) -> dict:
        """Pipeline-call arguments that decide how prompts are encoded: a card's
        ``max_sequence_length``, which every call must repeat to see the prompts training saw
        (FLUX has no text mask, so padding tokens change its output)."""
        if self.max_sequence_length is None:
            return {}
        return {"max_sequence_length": self.max_sequence_length}

    def sampling_call_kwargs(self, steps: int) -> dict:
        """Pipeline-call arguments beyond ``num_inference_steps`` that make the exported pipeline
        sample the ``steps``-step training grid (exports store them for users). None by default:
        the export scheduler's own ``steps``-step grid is the training grid."""
        return {}

    def feature_module(self, net: nn.Module) -> tuple[nn.Module, int]:
        """The block whose output serves as GAN features, and its channel count."""
        raise NotImplementedError

    def features_to_map(self, feats: Any) -> Tensor:
        """A feature block's output, as the block returns it, shaped (N, C, h, w) for a
        convolutional head (default: the first element of a tuple, as is)."""
        return feats[0] if isinstance(feats, tuple) else feats

    def feature_blocks(self, net: nn.Module) -> list[tuple[nn.Module, int]]:
        """The denoiser's main blocks in forward order with their output channels, for
        discriminators that read several depths (default: only :meth:`feature_module`)."""
        return [self.feature_module(net)]

    def boundary_scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out) that the export scheduler's step applies: its output is
        ``c_skip * x_t + c_out * x0``. Default: none, the network's x0 as is."""
        return torch.zeros_like(t, dtype=torch.float32), torch.ones_like(t, dtype=torch.float32)

    def solver_timesteps(self, n: int) -> Tensor:
        """An ``n``-step ODE-solver grid, descending from t_max (default: the export
        scheduler's own ``n``-step grid). Consistency distillation steps between neighbours."""
        return self.generator_timesteps(n)

    # ------------------------------------------------------------------ shared machinery
    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def latent_shape(self) -> tuple[int, int, int]:
        size = self.resolution // self.pipe.vae_scale_factor
        return (self.latent_channels, size, size)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    def use_precomputed(self, encodings) -> None:
        """Answer ``encode`` from precomputed embeddings (distillkit.data.cache). On an
        accelerator the text encoders then move to the CPU (they still answer the few prompts the
        cache lacks: sample grids, the export check), and so does the VAE encoder when the cache
        holds the images' latents (recipes read them through ``Batch.real_latents``)."""
        self._precomputed = encodings
        if self.device.type == "cpu":
            return
        offload = [m for n, m in self.pipe.components.items() if n.startswith("text_encoder")]
        self.text_device = torch.device("cpu")
        vae = self.pipe.vae
        if encodings.latents is not None:  # the decoder stays: sample grids, CLIP terms
            offload += [getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)]
        for module in offload:
            if isinstance(module, nn.Module):
                module.to("cpu")

    def forget_embeddings(self) -> None:
        """Drop the per-prompt cache of :meth:`encode`: call it when the text encoders' weights
        change (a teacher that trains them), or it returns the old encoders' embeddings."""
        self._cache.clear()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """Frozen text encoders: cache per prompt so repeated prompts cost nothing."""
        pre = getattr(self, "_precomputed", None)
        if pre is not None and all(p in pre._rows for p in prompts):
            return pre.encode(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            # outside autocast: cached embeddings must equal what the exported pipeline computes
            with torch.autocast(self.text_device.type, enabled=False):
                cond, uncond = self.encode_prompts(missing)
            if self.text_device != self.device:
                move = lambda t: t.to(self.device)  # noqa: E731
                cond, uncond = tree_map(move, cond), tree_map(move, uncond)
            for i, prompt in enumerate(missing):
                pick = lambda t, i=i: t[i : i + 1].detach()  # noqa: E731
                self._cache[prompt] = (tree_map(pick, cond), tree_map(pick, uncond))
        for p in prompts:
            self._cache.move_to_end(p)
        parts = [self._cache[p] for p in prompts]
        while len(self._cache) > self.embedding_cache_size:
            self._cache.popitem(last=False)
        return Conditioning(tree_cat([c for c, _ in parts]), tree_cat([u for _, u in parts]))

    def sample_t(
        self, n: int, generator: torch.Generator | None, lo: float = 0.0, hi: float = 1.0
    ) -> Tensor:
        return self.schedule.sample_t(n, generator, lo, hi).to(self.device)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.schedule.add_noise(x0, eps, t)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample (alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t eps, for loss weightings."""
        return self.schedule.alpha_sigma(t)

    def to_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.schedule.to_x0(out, x_t, t)

    def to_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.schedule.to_eps(out, x_t, t)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.schedule.target(x0, eps, t)

    def predict(
        self,
        net: nn.Module,
        x_t: Tensor,
        t: Tensor,
        cond: Conditioning,
        guidance: float | Tensor | None = None,
    ) -> Tensor:
        """Network output with classifier-free guidance (``None`` or 1 = conditional only);
        ``guidance`` may be a per-sample tensor of shape (N,)."""
        per_sample = isinstance(guidance, Tensor)
        if guidance is None or (not per_sample and guidance == 1.0):
            return self.forward(net, x_t, t, cond.cond)
        kwargs = tree_cat([cond.uncond, cond.cond])
        out = self.forward(net, torch.cat([x_t, x_t]), torch.cat([t, t]), kwargs)
        out_uncond, out_cond = out.chunk(2)
        if per_sample:
            shape = (-1, *([1] * (out_cond.ndim - 1)))
            guidance = guidance.to(out_cond.device, out_cond.dtype).reshape(shape)
        return out_uncond + guidance * (out_cond - out_uncond)

    def denoise(
        self,
        net: nn.Module,
        x_t: Tensor,
        t: Tensor,
        cond: Conditioning,
        guidance: float | Tensor | None = None,
    ) -> Tensor:
        """x0 estimate; guidance is linear in the output, so it is the guided x0 as well."""
        return self.to_x0(self.predict(net, x_t, t, cond, guidance), x_t, t)

    def consistency(
        self,
        net: nn.Module,
        x_t: Tensor,
        t: Tensor,
        cond: Conditioning,
        guidance: float | Tensor | None = None,
    ) -> Tensor:
        """What one export-scheduler step returns as its clean sample: c_skip x_t + c_out x0.

        This is LCM's consistency function f(x, t) (c_skip(0) = 1, c_out(0) = 0 make
        f(x, 0) = x), and :meth:`generate` uses it so training-time samples equal the exported
        pipeline's. Far from t = 0 it is x0 up to float rounding.
        """
        c_skip, c_out = self.boundary_scalings(t)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        x0 = self.denoise(net, x_t, t, cond, guidance)
        return c_skip.to(x0).reshape(shape) * x_t + c_out.to(x0).reshape(shape) * x0

    def generator_timesteps(self, steps: int) -> Tensor:
        """The ``steps``-step grid, as the exported scheduler samples it."""
        return self.set_grid(self.export_scheduler(), steps)

    def set_grid(self, scheduler, steps: int) -> Tensor:
        """Set ``scheduler`` up for a ``steps``-step call with the arguments exports ship, as the
        pipeline's ``retrieve_timesteps`` does (explicit sigmas win over the step count)."""
        extra = self.sampling_call_kwargs(steps)
        shift = self.scheduler_grid_kwargs()
        if extra:
            scheduler.set_timesteps(device=self.device, **extra, **shift)
        else:
            scheduler.set_timesteps(steps, device=self.device, **shift)
        return scheduler.timesteps.float()

    def generate(
        self,
        net: nn.Module,
        noise: Tensor,
        cond: Conditioning,
        steps: int = 1,
        last: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Few-step sampling as the exported scheduler does it: predict x0, re-noise, repeat.

        With ``last`` < steps-1 this is DMD2's backward simulation: the trajectory up to step
        ``last`` runs without gradients and only the final prediction carries them.
        """
        timesteps = self.generator_timesteps(steps)
        last = steps - 1 if last is None else last
        x = noise
        for i in range(last + 1):
            t = timesteps[i].expand(noise.shape[0])
            if i < last:
                with torch.no_grad():
                    x0 = self.consistency(net, x, t, cond)
                fresh = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
                x = self.add_noise(x0, fresh.to(x0.device), timesteps[i + 1].expand(x.shape[0]))
            else:
                x0 = self.consistency(net, x, t, cond)
        return x0

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> latents in the denoiser's space (scaled and shifted)."""
        vae = self.pipe.vae
        out = vae.encode(images.to(self.device, vae.dtype))
        latents = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents.float() - shift) * vae.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents / vae.config.scaling_factor + shift
        return vae.decode(z.to(vae.dtype)).sample.float().clamp(-1, 1)

    def pipeline_for_export(self, denoiser: nn.Module) -> DiffusionPipeline:
        """The teacher's pipeline with ``denoiser`` swapped in and the few-step scheduler."""
        components = dict(self.pipe.components)
        components[self.denoiser_attr] = denoiser
        components["scheduler"] = self.export_scheduler()
        return type(self.pipe)(**components)

    def fresh_copy_of_denoiser(self) -> nn.Module:
        return copy.deepcopy(self.denoiser)
