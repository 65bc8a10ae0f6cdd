"""Distillation recipes, one file each; importing this registers them all."""

from distillkit.recipes import (
    apt,  # noqa: F401
    dmd2,  # noqa: F401
    lcm,  # noqa: F401
    sid,  # noqa: F401
    swiftbrush,  # noqa: F401
)
