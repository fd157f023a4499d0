"""Defaults shared by the API and the command line.

This module imports nothing heavy, so the CLI can show them in ``--help``
without importing torch.
"""

from __future__ import annotations

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_SEED = 0
DEFAULT_THRESHOLD = 0.7
"""CA-ToMe's similarity threshold t (the paper's)."""
DEFAULT_SCHEDULE = "config3"
"""The checkpoint schedule of CA-ToMe (the paper's best)."""
DEFAULT_RATIO = 0.5
"""ToMe's fixed merge ratio."""
DEFAULT_STEP_BASE = 1
"""Step number of loop index 0 (1 as the authors' code ran)."""
DEFAULT_MAX_DOWNSAMPLE = 1
DEFAULT_STRIDE = (2, 2)
DEFAULT_MERGE_SEED = 42
DEFAULT_R_MULTIPLE = 1
"""r is rounded down to a multiple of this at every site (1: off, r as counted)."""

DEFAULT_BATCH_RANGE = (1, 2)
"""The batch range an engine is built for when none is given."""
MAX_BATCH = 256
MIN_RESOLUTION = 64
MAX_RESOLUTION = 4096
"""Image sides (pixels) a build accepts."""
DEFAULT_VERIFY_STEPS = 10
"""Steps of the eager comparison after a build."""
DEFAULT_OPT_MERGE_FRACTION = 0.5
"""Share of src tokens TensorRT profiles tune for when neither the flag nor the manifest gives one."""
DEFAULT_TEXT_LEN = 77

OPSET = 17
"""ONNX opset of the exported graphs (ScatterElements with a reduction needs >= 16; LayerNormalization 17)."""
MAX_STAGE_BYTES = 4_000_000_000
"""Default weight size above which a stage is cut into pieces (SD 1.x/2.x's largest stage, 3.3 GB in fp32, stays
whole; SDXL's 9.6 GB middle becomes three pieces)."""
