"""Recording spies for recipe wiring tests: which network a recipe calls, at which timesteps,
with which guidance and text, and whether gradients can flow through the call.

The spy wraps the adapter's own methods on the instance (``monkeypatch`` undoes it), so every
path into a network is seen: ``denoise`` / ``consistency`` / ``generate`` all go through
``predict`` and ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from distillkit.config import load_config
from distillkit.recipes.base import Batch
from distillkit.registry import get_recipe

REPO = Path(__file__).resolve().parents[2]
DIRECT = "direct"  # the guidance of a forward that no predict() made (a raw network call)
PROMPTS = ["a photo of a cat", "a red car", "a bowl of soup", "an old tree"]
CAPTIONS = ["a dog on grass", "a blue boat", "a city at night", "a sand dune"]


@dataclass(repr=False)
class Call:
    """One raw network call, as the adapter's ``forward`` saw it."""

    net: str
    t: Tensor
    x: Tensor
    grad: bool  # grad mode was on
    x_requires_grad: bool
    text: list[str]  # per row: "prompt", "empty", "caption" or "?"
    guidance: object  # the enclosing predict()'s guidance, or DIRECT
    kwargs: dict
    out: Tensor

    def __repr__(self) -> str:  # short: assertion messages print it
        guidance = self.guidance
        if isinstance(guidance, Tensor):
            guidance = [round(g, 3) for g in guidance.tolist()]
        return (
            f"Call({self.net}, t={self.t.tolist()}, guidance={guidance}, grad={self.grad}, "
            f"x_requires_grad={self.x_requires_grad}, text={self.text})"
        )


@dataclass(repr=False)
class NoiseCall:
    x0: Tensor
    eps: Tensor
    t: Tensor
    out: Tensor


def _detach(tree):
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    return tree.detach().clone() if isinstance(tree, Tensor) else tree


@dataclass
class Spy:
    adapter: object
    nets: dict[str, nn.Module]
    refs: dict[str, Tensor]
    calls: list[Call] = field(default_factory=list)
    noise: list[NoiseCall] = field(default_factory=list)
    generated: list[Tensor] = field(default_factory=list)
    _guidance: list = field(default_factory=list)

    def name_of(self, net: nn.Module) -> str:
        names = [name for name, module in self.nets.items() if module is net]
        return names[0] if names else f"unknown:{type(net).__name__}"

    def label(self, row: Tensor) -> str:
        for name, ref in self.refs.items():
            if any(torch.equal(row, r) for r in ref):
                return name
        return "?"

    def of(self, net: str) -> list[Call]:
        return [c for c in self.calls if c.net == net]

    def order(self) -> list[str]:
        return [c.net for c in self.calls]

    def clear(self) -> None:
        self.calls.clear()
        self.noise.clear()
        self.generated.clear()


def spy_on(monkeypatch, adapter, recipe, prompts, captions=None, **extra_nets) -> Spy:
    """Record every network call ``recipe`` makes through ``adapter``."""
    nets = {"teacher": adapter.denoiser, **recipe.roles, **extra_nets}
    target = getattr(recipe, "target", None)
    if target is not None:
        nets["target"] = target
    cond = adapter.encode(list(prompts))
    refs = {
        "prompt": cond.cond["encoder_hidden_states"],
        "empty": cond.uncond["encoder_hidden_states"][:1],
    }
    if captions:
        refs["caption"] = adapter.encode(list(captions)).cond["encoder_hidden_states"]
    spy = Spy(adapter, nets, {k: v.detach().clone() for k, v in refs.items()})
    forward, predict = adapter.forward, adapter.predict
    add_noise, generate = adapter.add_noise, adapter.generate

    def spy_forward(net, x_t, t, kwargs):
        out = forward(net, x_t, t, kwargs)
        h = kwargs["encoder_hidden_states"]
        spy.calls.append(
            Call(
                net=spy.name_of(net),
                t=t.detach().float().clone(),
                x=x_t.detach().clone(),
                grad=torch.is_grad_enabled(),
                x_requires_grad=x_t.requires_grad,
                text=[spy.label(row) for row in h.detach()],
                guidance=spy._guidance[-1] if spy._guidance else DIRECT,
                kwargs=_detach(kwargs),
                out=out.detach().clone(),
            )
        )
        return out

    def spy_predict(net, x_t, t, cond, guidance=None):
        spy._guidance.append(
            guidance.detach().clone() if isinstance(guidance, Tensor) else guidance
        )
        try:
            return predict(net, x_t, t, cond, guidance)
        finally:
            spy._guidance.pop()

    def spy_add_noise(x0, eps, t):
        out = add_noise(x0, eps, t)
        spy.noise.append(NoiseCall(x0.detach().clone(), eps.detach().clone(), t.clone(), out))
        return out

    def spy_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        spy.generated.append(out.detach().clone())
        return out

    monkeypatch.setattr(adapter, "forward", spy_forward)
    monkeypatch.setattr(adapter, "predict", spy_predict)
    monkeypatch.setattr(adapter, "add_noise", spy_add_noise)
    monkeypatch.setattr(adapter, "generate", spy_generate)
    return spy


# ----------------------------------------------------------------------------- building


def build(name: str, family: str, adapter, *overrides: str, monkeypatch=None, yaml=None):
    """The real recipe from its shipped YAML on a tiny teacher (adapter state it sets, such as
    LCM's sampling grid, is restored by ``monkeypatch`` after the test)."""
    if monkeypatch is not None:
        for attr in ("grid_steps", "start_timestep"):
            monkeypatch.setattr(adapter, attr, getattr(adapter, attr))
    path = REPO / "recipes" / f"{yaml or f'{name}_{family}'}.yaml"
    if not any(o.startswith("student.shared_base=") for o in overrides):
        # separate copies unless asked: a shared base puts adapters on the teacher's own
        # denoiser, so those tests build on a fresh adapter (fresh_adapter), never the session's
        overrides = ("student.shared_base=false", *overrides)
    cfg = load_config(path, ["train.gradient_checkpointing=false", *overrides])
    return get_recipe(name)(cfg, adapter)


def make_batch(adapter, seed: int = 0, n: int = 2, images: bool = False) -> Batch:
    """``n`` prompts (and, with ``images``, real images in [-1, 1] with their captions)."""
    gen = torch.Generator().manual_seed(seed)
    imgs, caps = None, None
    if images:
        size = adapter.resolution
        imgs = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed + 99))
        imgs, caps = imgs * 2 - 1, CAPTIONS[:n]
    return Batch(PROMPTS[:n], imgs, caps, gen)


def all_parameters(recipe, adapter) -> dict[int, nn.Parameter]:
    """Every parameter a recipe can reach: its roles, its other modules, the teacher's pipeline."""
    modules = list(recipe.roles.values())
    modules += [m for m in vars(recipe).values() if isinstance(m, nn.Module)]
    modules += [m for m in adapter.pipe.components.values() if isinstance(m, nn.Module)]
    return {id(p): p for m in modules for p in m.parameters()}


def run_role(recipe, role: str, batch: Batch, step: int = 0, backward: bool = True):
    """``recipe.loss(role, ...)`` as the engine loop runs it: only ``role``'s trainable
    parameters require grad (the loop's rule), then backward. Returns (loss, logs, names of the
    networks whose parameters received a nonzero gradient)."""
    trainable = getattr(recipe, "_wiring_trainable", None)
    if trainable is None:
        trainable = {
            n: [p for p in m.parameters() if p.requires_grad] for n, m in recipe.roles.items()
        }
        recipe._wiring_trainable = trainable
    everything = all_parameters(recipe, recipe.teacher)
    for p in everything.values():
        p.grad = None
    for name, params in trainable.items():
        for p in params:
            p.requires_grad_(name == role)
    try:
        loss, logs = recipe.loss(role, batch, step)
        if backward:
            loss.backward()
    finally:
        for params in trainable.values():
            for p in params:
                p.requires_grad_(True)
    owners = {id(p): n for n, params in trainable.items() for p in params}
    reached = set()
    for key, p in everything.items():
        if p.grad is not None and p.grad.abs().sum() > 0:
            reached.add(owners.get(key, "outside the roles"))
    return loss, logs, reached


def within(t: Tensor, lo: float, hi: float, closed: bool = False) -> bool:
    """Every value in [lo, hi) ([lo, hi] when ``closed``)."""
    upper = t <= hi if closed else t < hi
    return bool(((t >= lo) & upper).all())


def grads_of(module: nn.Module) -> list[Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]
