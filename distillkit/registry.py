"""Name -> recipe / teacher family. Decorators register them so the CLI and config can list them.

Adding a recipe is one file in distillkit/recipes/ that calls :func:`register_recipe`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

RECIPES: dict[str, type] = {}
FAMILIES: dict[str, type] = {}
SOURCES: dict[str, Callable[[str], Path]] = {}  # model_id prefix -> local pipeline directory
# packages whose modules register model sources (the digits teachers: "digits:<family>")
SOURCE_PACKAGES = ("distillkit.benchmark.teachers", "distillkit.benchmark.compose_teachers")


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


def register_source(prefix: str):
    """Register a resolver for ``teacher.model_id`` values starting with ``prefix`` (e.g.
    ``digits:sd15``): it maps the rest to a local diffusers pipeline directory, building or
    training it on first use. Teacher loading resolves through this, never by importing the
    provider."""

    def wrap(fn: Callable[[str], Path]) -> Callable[[str], Path]:
        SOURCES[prefix] = fn
        return fn

    return wrap


def resolve_source(model_id: str) -> str:
    """``model_id`` itself, or the directory a registered source resolves it to."""
    if ":" not in model_id:
        return model_id
    for package in SOURCE_PACKAGES:
        importlib.import_module(package)
    for prefix, resolver in SOURCES.items():
        if model_id.startswith(prefix):
            return str(resolver(model_id.removeprefix(prefix)))
    return model_id


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
