"""Teacher adapters, one module per family; importing this registers them all."""

from distillkit.teachers import sana, sd15, sdxl  # noqa: F401
