"""Recipes declare their footprint (``Recipe.footprint``, what `distillkit plan` reads): for every
shipped YAML the declared networks equal the ones the constructed recipe really holds: names and
order, full or LoRA (rank, alpha, targets), on the shared base or a copy, its GAN heads, and
the frozen copies it checkpoints (``state_modules``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distillkit.config import load_config
from distillkit.recipes.gan import TappedBackbone
from distillkit.registry import get_recipe
from distillkit.students import ADAPTER, AdapterView
from distillkit.teachers.load import load_teacher

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def _built(name: str, module, teacher) -> dict:
    """What the constructed role is, read from the modules themselves."""
    tapped = isinstance(module, TappedBackbone)
    net = module.net if tapped else module
    heads = list(module.heads) if tapped else []
    out = {"name": name, "heads": len(heads)}
    out["head_width"] = heads[0].body[0].out_channels if heads else None
    if isinstance(net, AdapterView):
        owner, adapter = net.shared.base, net.adapter_name
        out["shared_base"] = owner is teacher.denoiser
    elif getattr(net, "peft_config", None):
        owner, adapter = net, ADAPTER
        out["shared_base"] = False
    else:
        trainable = [p.requires_grad for p in net.parameters()]
        out.update(kind="full" if all(trainable) else "partly frozen", shared_base=False)
        out["shared_base"] = any(
            p.data_ptr() == q.data_ptr()
            for p, q in zip(net.parameters(), teacher.denoiser.parameters())
        )
        return out
    peft = owner.peft_config[adapter]
    out.update(kind="lora", lora=(peft.r, peft.lora_alpha, sorted(peft.target_modules)))
    return out


def _declared(fp) -> dict:
    out = {"name": fp.name, "kind": fp.kind, "shared_base": fp.shared_base}
    out.update(heads=fp.heads, head_width=fp.head_width if fp.heads else None)
    if fp.kind == "lora":
        out["lora"] = (fp.lora.rank, fp.lora.alpha, sorted(fp.lora.target_modules))
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_declared_footprint_is_what_the_recipe_builds(name: str) -> None:
    cfg = load_config(REPO / "recipes" / f"{name}.yaml")
    teacher = load_teacher(cfg.teacher, torch.device("cpu"), smoke=True)  # fresh: shared bases
    recipe_class = get_recipe(cfg.recipe.name)
    recipe = recipe_class(cfg, teacher)
    declared = recipe_class.footprint(cfg)
    trainable = [_declared(fp) for fp in declared if fp.kind != "frozen"]
    built = [_built(role, module, teacher) for role, module in recipe.roles.items()]
    for have, want in zip(built, trainable):
        # APT's head count is an upper bound: depths that fall on one block of a shallow network
        # (as the tiny teachers are) share a head
        if cfg.recipe.name == "apt" and 0 < have["heads"] < want["heads"]:
            have["heads"] = want["heads"]
    assert built == trainable, name
    frozen = [fp.name for fp in declared if fp.kind == "frozen"]
    assert frozen == list(recipe.state_modules()), name
