"""Teacher adapters, one module per family; importing this registers them all."""

from distillkit.teachers import flux, sana, sd3, sd15, sdxl, zimage  # noqa: F401
