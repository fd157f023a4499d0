"""Defaults shared by the API and the command line.

This module imports nothing heavy, so the CLI can show them in ``--help``
without importing torch.
"""

from __future__ import annotations

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_SEED = 0
DEFAULT_THRESHOLD = 0.7
DEFAULT_SCHEDULE = "config3"
