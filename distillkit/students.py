"""Trainable networks initialised from the teacher's denoiser: LoRA adapters or a full copy."""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint
from peft import LoraConfig
from torch import nn

from distillkit.errors import ConfigError
from distillkit.teachers.base import compute_dtype

if TYPE_CHECKING:
    from distillkit.config import LoraConfigSection

ADAPTER = "default"


def lora_config(section: LoraConfigSection) -> LoraConfig:
    return LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
    )


def add_lora(net: nn.Module, section: LoraConfigSection, adapter_name: str, role: str) -> None:
    """peft's ``add_adapter``; target modules that match nothing (or a layer peft cannot wrap)
    are the user's to fix: a ConfigError naming the field and some names that would match."""
    try:
        net.add_adapter(lora_config(section), adapter_name=adapter_name)
    except ValueError as err:  # peft's NoMatchingPeftModuleError is one
        leaf_names = sorted(
            {
                ".".join(name.split(".")[-2:] if name.split(".")[-1].isdigit() else [leaf])
                for name, module in net.named_modules()
                if isinstance(module, nn.Linear | nn.Conv2d) and (leaf := name.split(".")[-1])
            }
        )
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"student.lora.target_modules={list(section.target_modules)} (the {role}'s LoRA) "
            f"cannot be applied to {type(net).__name__}: {reason}\n"
            f"its Linear/Conv2d layer names include: {', '.join(leaf_names[:24])}"
        ) from None


def trainable_copy(
    denoiser: nn.Module,
    kind: str,
    lora: LoraConfigSection | None = None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """A copy of ``denoiser`` whose trainable part is LoRA (peft) or every weight.

    Trained weights are fp32 masters, so small updates do not vanish (mixed precision happens in
    autocast); a LoRA student's frozen base stays in the teacher's dtype.
    """
    net = copy.deepcopy(denoiser)
    net.requires_grad_(False)
    if kind == "lora":
        assert lora is not None
        add_lora(net, lora, ADAPTER, "student")
        for name, param in net.named_parameters():  # the frozen base keeps the teacher's dtype
            if "lora_" in name:
                param.data = param.data.float()
    elif kind == "full":
        net.to(torch.float32).requires_grad_(True)
    else:
        raise ValueError(f"unknown student type {kind!r}")
    if gradient_checkpointing:
        net.enable_gradient_checkpointing()
    net.train()
    return net


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def is_lora(net: nn.Module) -> bool:
    return isinstance(net, AdapterView) or bool(getattr(net, "peft_config", None))


def lora_owner(net: nn.Module) -> tuple[nn.Module, str]:
    """The peft-carrying model behind a student and the adapter name that is the student."""
    if isinstance(net, AdapterView):
        return net.shared.base, net.adapter_name
    return net, ADAPTER


def merged_copy(net: nn.Module) -> nn.Module:
    """A plain diffusers model with the student's LoRA folded into the base weights (for the
    pipeline export); other adapters on a shared base are dropped from the copy."""
    owner, name = lora_owner(net)
    merged = copy.deepcopy(owner)
    if is_lora(net):
        for layer in merged.modules():
            if hasattr(layer, "_disable_adapters"):
                layer._disable_adapters = False
        others = [a for a in merged.peft_config if a != name]
        if others:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                merged.delete_adapters(others)
        merged.fuse_lora(adapter_names=[name])
        merged.unload_lora()
    merged.requires_grad_(False)
    return merged.eval()


# ----------------------------------------------------------------------------- shared base


class SharedBase:
    """One frozen denoiser carrying several LoRA adapters (generator, fake score, ...).

    With no adapter selected it *is* the teacher, so DMD2/SiD/SwiftBrush with LoRA roles keep a
    single copy of the base weights instead of three. Selecting an adapter flips peft's
    per-layer switches directly: peft's ``set_adapter`` would also rewrite ``requires_grad``,
    which the engine owns.
    """

    def __init__(self, denoiser: nn.Module, adapters: dict[str, LoraConfigSection]) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.base = denoiser
        with warnings.catch_warnings():  # "multiple adapters": exactly what we want here
            warnings.simplefilter("ignore", UserWarning)
            for name, section in adapters.items():
                add_lora(denoiser, section, name, name)
        self.layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
        for name, param in denoiser.named_parameters():
            is_lora = "lora_" in name
            param.requires_grad_(is_lora)
            if is_lora:
                param.data = param.data.float()  # fp32 master weights for the adapters
        self.select(None)

    def select(self, name: str | None) -> None:
        self.current = name
        for layer in self.layers:
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = [name]

    @contextlib.contextmanager
    def using(self, name: str):
        self.select(name)
        try:
            yield
        finally:
            self.select(None)

    def checkpoint_function(self, block, *args):
        """Gradient checkpointing that recomputes a block with the adapter that was active in
        its forward: by backward time another role (or the teacher) may be selected."""
        active = self.current

        def run(*inputs):
            previous = self.current
            self.select(active)
            try:
                return block(*inputs)
            finally:
                self.select(previous)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.base.named_parameters() if "lora_" in n and f".{name}." in n}


class AdapterView(nn.Module):
    """One adapter of a :class:`SharedBase` as a module: its parameters are that adapter's LoRA
    weights only (so optimisers, DDP and checkpoints see just them), its forward runs the
    shared base with that adapter switched on, and other attributes come from the base."""

    def __init__(self, shared: SharedBase, name: str) -> None:
        super().__init__()
        self._shared = (shared,)  # a tuple: not a registered submodule
        self.adapter_name = name
        self.lora = nn.ParameterDict(
            {n.replace(".", "__"): p for n, p in shared.adapter_parameters(name).items()}
        )

    @property
    def shared(self) -> SharedBase:
        return self._shared[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.shared.base)  # its own parameters are the fp32 LoRA masters

    def forward(self, *args, **kwargs):
        with self.shared.using(self.adapter_name):
            return self.shared.base(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._shared[0].base, name)


def role_networks(
    denoiser: nn.Module,
    kinds: dict[str, tuple[str, LoraConfigSection]],
    *,
    shared_base: bool = False,
    gradient_checkpointing: bool = False,
) -> dict[str, nn.Module]:
    """The trainable networks of a recipe's roles, e.g. {"generator": ("lora", cfg), ...}.

    ``shared_base`` puts every role as a LoRA adapter on the teacher's own (frozen) denoiser;
    otherwise each role gets its own copy.
    """
    if not shared_base:
        return {
            role: trainable_copy(denoiser, kind, lora, gradient_checkpointing)
            for role, (kind, lora) in kinds.items()
        }
    full = [role for role, (kind, _) in kinds.items() if kind != "lora"]
    if full:
        raise ConfigError(
            f"student.shared_base=true needs every trained network to be LoRA, but {full} "
            "would be full copies; set them to lora or turn student.shared_base off"
        )
    shared = SharedBase(denoiser, {role: lora for role, (_, lora) in kinds.items()})
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing(shared.checkpoint_function)
    return {role: AdapterView(shared, role) for role in kinds}


def plain_copy(denoiser: nn.Module) -> nn.Module:
    """A copy of the teacher's denoiser without any adapters (a shared base carries some)."""
    clean = copy.deepcopy(denoiser)
    if getattr(clean, "peft_config", None):
        for layer in clean.modules():
            if hasattr(layer, "_disable_adapters"):
                layer._disable_adapters = False
        clean.delete_adapters(list(clean.peft_config))
    return clean
