"""Which TensorRT release the stand-in plays: ``$CATOME_TENSORRT_STANDIN`` (e.g. ``10.13.0.35`` or ``11.1.0.106``).

Without that variable the package refuses to import, so it can never stand in
for TensorRT by accident (a stray ``sys.path`` entry outside the tests).
"""

from __future__ import annotations

import os

ENV = "CATOME_TENSORRT_STANDIN"

VERSION = os.environ.get(ENV, "")
if not VERSION:
    raise ImportError(f"tests/standins/tensorrt is a test stand-in for NVIDIA TensorRT; it imports only with ${ENV} "
                      "set to the TensorRT version it should play (e.g. 10.13.0.35 or 11.1.0.106)")
try:
    MAJOR = int(VERSION.split(".")[0])
except ValueError:
    raise ImportError(f"${ENV}={VERSION!r} is not a TensorRT version") from None
if MAJOR not in (10, 11):
    raise ImportError(f"the stand-in plays TensorRT 10.x and 11.x, not {VERSION}")

DEVICE = "Stand-in GPU (sm90)"
"""The device the stand-in builds for and runs on (plans and timing caches record it)."""
