"""`python -m sandbox_lab`: the same as `sandbox-lab` (and how the lab starts its own helpers)."""

import sys

from sandbox_lab import main

sys.exit(main())
