"""Name -> recipe / teacher family. Decorators register them so the CLI and config can list them.

Adding a recipe is one file in distillkit/recipes/ that calls :func:`register_recipe`.
"""

from __future__ import annotations

import importlib
from typing import Any, Union

RECIPES: dict[str, type] = {}
FAMILIES: dict[str, type] = {}


def register_recipe(cls: type) -> type:
    """Register a Recipe subclass under ``cls.config_class``'s ``name`` literal."""
    name = cls.config_class.model_fields["name"].default
    RECIPES[name] = cls
    return cls


def register_family(name: str):
    def wrap(cls: type) -> type:
        cls.family = name
        FAMILIES[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    importlib.import_module("distillkit.recipes")
    importlib.import_module("distillkit.teachers")


def recipe_config_union() -> Any:
    _load_all()
    classes = tuple(r.config_class for r in RECIPES.values())
    return classes[0] if len(classes) == 1 else Union[classes]  # noqa: UP007


def get_recipe(name: str) -> type:
    _load_all()
    return RECIPES[name]


def get_family(name: str) -> type:
    _load_all()
    return FAMILIES[name]
