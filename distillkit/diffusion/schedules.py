"""Noise schedules and network parameterizations as pure math (no weights).

Every family is written as x_t = alpha(t) * x0 + sigma(t) * eps, with ``t`` in the units the
family's scheduler hands to its network (VP: a DDPM index in [0, T-1]; rectified flow:
sigma * T). Recipes convert network outputs with :meth:`Schedule.to_x0` / :meth:`to_eps`, so
a recipe written once works for epsilon, v and flow-velocity teachers alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Prediction = Literal["epsilon", "v_prediction", "sample", "flow"]


def _bcast(coef: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample coefficient (N,) so it broadcasts over (N, C, H, W) or (N, L, D)."""
    return coef.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class Schedule:
    """Base: subclasses define alpha/sigma; conversions below are shared by all of them."""

    prediction: Prediction
    num_train_timesteps: int

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sample_t(
        self, n: int, generator: torch.Generator | None, lo: float = 0.0, hi: float = 1.0
    ) -> Tensor:
        """Training timesteps drawn uniformly from the fraction [lo, hi] of the schedule."""
        raise NotImplementedError

    @property
    def t_max(self) -> float:
        raise NotImplementedError

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t)
        return _bcast(a, x0) * x0 + _bcast(s, x0) * eps

    def to_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = (_bcast(c, x_t) for c in self.alpha_sigma(t))
        if self.prediction == "epsilon":
            return (x_t - s * out) / a
        if self.prediction == "v_prediction":
            return a * x_t - s * out
        if self.prediction == "sample":
            return out
        return x_t - s * out  # flow velocity v = eps - x0 with alpha = 1 - sigma

    def to_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = (_bcast(c, x_t) for c in self.alpha_sigma(t))
        if self.prediction == "epsilon":
            return out
        if self.prediction == "v_prediction":
            return s * x_t + a * out
        if self.prediction == "sample":
            return (x_t - a * out) / s
        return x_t + a * out

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The network output that would denoise ``x_t`` to ``x0`` (inverse of :meth:`to_x0`)."""
        a, s = (_bcast(c, x_t) for c in self.alpha_sigma(t))
        eps = (x_t - a * x0) / s
        return self.target(x0, eps, t)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output for a clean ``x0`` noised with ``eps``."""
        if self.prediction == "epsilon":
            return eps
        if self.prediction == "sample":
            return x0
        a, s = (_bcast(c, x0) for c in self.alpha_sigma(t))
        if self.prediction == "v_prediction":
            return a * eps - s * x0
        return eps - x0


@dataclass
class VPSchedule(Schedule):
    """Discrete variance-preserving schedule of SD1.5 / SDXL (DDPM alphas_cumprod)."""

    alphas_cumprod: Tensor | None = None

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ac = self.alphas_cumprod.to(t.device)
        idx = t.round().long().clamp(0, len(ac) - 1)
        abar = ac[idx].float()
        return abar.sqrt(), (1 - abar).sqrt()

    def sample_t(self, n, generator, lo=0.0, hi=1.0):
        low = int(lo * self.num_train_timesteps)
        high = max(int(hi * self.num_train_timesteps), low + 1)
        return torch.randint(low, high, (n,), generator=generator).float()

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> VPSchedule:
        """Rebuild alphas_cumprod exactly as diffusers' DDPM-family schedulers do."""
        n = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "linear")
        b0, b1 = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 2e-2))
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float32)
        else:
            raise ValueError(f"beta_schedule {kind!r} is not supported (scaled_linear, linear)")
        prediction = config.get("prediction_type", "epsilon")
        return cls(prediction, n, torch.cumprod(1.0 - betas, dim=0))


@dataclass
class FlowSchedule(Schedule):
    """Rectified flow (SANA): x_t = (1 - s) x0 + s eps, s = t / T, optionally time-shifted."""

    shift: float = 1.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s = (t.float() / self.num_train_timesteps).clamp(0.0, 1.0)
        return 1 - s, s

    def shifted(self, u: Tensor) -> Tensor:
        """The shift that SANA's schedulers apply: more time at high noise for larger images."""
        return self.shift * u / (1 + (self.shift - 1) * u)

    def sample_t(self, n, generator, lo=0.0, hi=1.0):
        u = lo + (hi - lo) * torch.rand(n, generator=generator)
        return self.shifted(u).clamp(1e-3, 1.0) * self.num_train_timesteps

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps)
