"""FLUX.1 family: MMDiT on 2x2-packed latents with (text, row, column) position ids, rectified
flow with the resolution-dependent shift (the pipeline's ``mu``), CLIP pooled + T5, and on
FLUX.1-dev a guidance *input*: the teacher was distilled from CFG, so "guidance" is a number the
network reads, not two passes. Recipes' guidance scales reach it through :meth:`predict`.

The guidance modes (``teacher.guidance``): ``embedded`` (dev's default) feeds a recipe's scale
to the guidance input in one pass, and every unguided call (generator, fake score) reads
:attr:`embedded_guidance`, the value the student is exported with; ``cfg`` is true classifier-
free guidance with the empty prompt on top of that fixed input, as FluxPipeline's
``true_cfg_scale``. FLUX.1-schnell has no guidance input: ``auto`` is ``cfg`` there.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchLCMScheduler
from torch import Tensor, nn

from distillkit.diffusion.schedules import FlowSchedule
from distillkit.errors import ConfigError
from distillkit.registry import register_family
from distillkit.teachers.base import Conditioning, TeacherAdapter, cast_floating, compute_dtype
from distillkit.teachers.flow import FlowAdapterMixin, tokens_to_map

_SHIFT_KEYS = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
PIPELINE_GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale default


def dynamic_mu(config: dict, image_seq_len: int) -> float:
    """FluxPipeline's ``calculate_shift``: mu linear in the packed token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return image_seq_len * slope + base - slope * base_len


@register_family("flux")
class FluxAdapter(FlowAdapterMixin, TeacherAdapter):
    pipeline_class = "FluxPipeline"

    def __init__(self, pipe, resolution: int, device: torch.device) -> None:
        packed = 2 * pipe.vae_scale_factor
        if resolution % packed:
            raise ValueError(
                f"teacher.resolution={resolution}: FLUX packs 2x2 latents, so the resolution must "
                f"be a multiple of {packed}"
            )
        super().__init__(pipe, resolution, device)
        self.guidance_mode = "embedded" if self.has_guidance_input else "cfg"

    # ------------------------------------------------------------------ schedule and grid
    @property
    def image_seq_len(self) -> int:
        return (self.resolution // (2 * self.pipe.vae_scale_factor)) ** 2

    def build_schedule(self, scheduler_config: dict) -> FlowSchedule:
        self._scheduler_config = scheduler_config
        if not scheduler_config.get("use_dynamic_shifting"):
            return super().build_schedule(scheduler_config)
        # exp(mu) as a plain shift: exponential time shift with exponent 1 is s u / (1 + (s-1) u)
        shift = math.exp(dynamic_mu(scheduler_config, self.image_seq_len))
        return FlowSchedule("flow", int(scheduler_config.get("num_train_timesteps", 1000)), shift)

    @property
    def _dynamic(self) -> bool:
        return bool(self._scheduler_config.get("use_dynamic_shifting"))

    def export_scheduler(self) -> FlowMatchLCMScheduler:
        """Dynamic shifting kept, as the teacher's: FluxPipeline computes ``mu`` from the size it
        samples, so the student shifts its grid at other resolutions as the teacher does."""
        if not self._dynamic:
            return super().export_scheduler()
        extra = {k: self._scheduler_config[k] for k in _SHIFT_KEYS if k in self._scheduler_config}
        return FlowMatchLCMScheduler(
            num_train_timesteps=self.schedule.num_train_timesteps,
            use_dynamic_shifting=True,
            **extra,
        )

    def scheduler_grid_kwargs(self) -> dict:
        if not self._dynamic:
            return {}
        return {"mu": dynamic_mu(self._scheduler_config, self.image_seq_len)}

    # ------------------------------------------------------------------ text and network
    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        length = self.text_length()

        def encode(texts: list[str]) -> dict:
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=texts, prompt_2=None, device=self.text_device, max_sequence_length=length
            )
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

        return encode(prompts), encode([""] * len(prompts))

    @property
    def has_guidance_input(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def embedded_guidance(self) -> float:
        """The guidance input of unguided calls (generator, fake score) and of the export."""
        return float(self.default_guidance or PIPELINE_GUIDANCE)

    def use_guidance(self, mode: str) -> None:
        if mode == "auto":
            return
        if mode == "embedded" and not self.has_guidance_input:
            raise ConfigError(
                "teacher.guidance=embedded: this FLUX transformer has no guidance input "
                "(guidance_embeds is false, e.g. FLUX.1-schnell); use auto or cfg"
            )
        self.guidance_mode = mode

    def student_guidance_scale(self) -> float:
        return self.embedded_guidance if self.has_guidance_input else 0.0

    def predict(
        self,
        net: nn.Module,
        x_t: Tensor,
        t: Tensor,
        cond: Conditioning,
        guidance: float | Tensor | None = None,
    ) -> Tensor:
        if self.guidance_mode != "embedded" or guidance is None:
            return super().predict(net, x_t, t, cond, guidance)
        scale = torch.as_tensor(guidance, dtype=torch.float32, device=x_t.device)
        kwargs = {**cond.cond, "guidance": scale.expand(x_t.shape[0])}
        return self.forward(net, x_t, t, kwargs)

    def forward(self, net: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        # the guidance input stays fp32, as FluxPipeline passes it; the rest follows the net
        guidance = kwargs.get("guidance")
        dtype = compute_dtype(net)
        rest = cast_floating({k: v for k, v in kwargs.items() if k != "guidance"}, dtype)
        return self.call_network(net, x_t.to(dtype), t, {**rest, "guidance": guidance}).float()

    def call_network(self, net: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        n, c, h, w = x_t.shape
        config = getattr(net, "module", net).config
        guidance = kwargs.pop("guidance", None)
        if config.guidance_embeds and guidance is None:
            guidance = torch.full((n,), self.embedded_guidance, device=x_t.device)
        elif not config.guidance_embeds:
            guidance = None
        text = kwargs["encoder_hidden_states"]
        out = net(
            self.pipe._pack_latents(x_t, n, c, h, w),
            # FluxPipeline rounds the timestep to the latents' dtype, then divides by 1000
            timestep=t.to(x_t.dtype) / 1000,
            guidance=guidance,
            img_ids=self.pipe._prepare_latent_image_ids(n, h // 2, w // 2, x_t.device, x_t.dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            return_dict=False,
            **kwargs,
        )[0]
        return self._unpack(out, h, w)

    def _unpack(self, packed: Tensor, h: int, w: int) -> Tensor:
        factor = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(packed, h * factor, w * factor, factor)

    # ------------------------------------------------------------------ pipeline I/O
    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4

    def pipeline_latents(self, noise: Tensor) -> Tensor:
        n, c, h, w = noise.shape
        return self.pipe._pack_latents(noise, n, c, h, w)

    def latents_from_pipeline(self, latents: Tensor) -> Tensor:
        size = self.resolution // self.pipe.vae_scale_factor
        return self._unpack(latents, size, size)

    # ------------------------------------------------------------------ features
    def _width(self, net: nn.Module) -> int:
        return int(net.config.num_attention_heads * net.config.attention_head_dim)

    def _blocks(self, net: nn.Module) -> list[nn.Module]:
        return [*net.transformer_blocks, *net.single_transformer_blocks]

    def feature_module(self, net: nn.Module) -> tuple[nn.Module, int]:
        blocks = self._blocks(net)
        return blocks[len(blocks) // 2], self._width(net)

    def feature_blocks(self, net: nn.Module) -> list[tuple[nn.Module, int]]:
        return [(block, self._width(net)) for block in self._blocks(net)]

    def features_to_map(self, feats) -> Tensor:
        # both block kinds return (text tokens, image tokens)
        return tokens_to_map(feats[1])
