"""`python -m distillkit.cli` (what `accelerate launch -m distillkit.cli` runs)."""

import sys

from distillkit.cli import main

sys.exit(main())
