"""Distillation recipes, one file each; importing this registers them all."""

from distillkit.recipes import dmd2  # noqa: F401
