"""The ``catome-export build`` command line that makes an engine folder again, formatted from its typed build
options (:class:`~catome_export.engine.record.BuildRecord`).

The layers below name a folder that must be built again with :class:`~catome_export.engine.record.RebuildNeeded`
(the options, the folder that was loaded, the options to change); this module, the CLI's, turns that into the
command line, and :func:`error_line` is how the CLI prints any :class:`CatomeError`.
"""

from __future__ import annotations

import shlex

from catome_export.engine.record import BuildRecord, RebuildNeeded
from catome_export.errors import CatomeError

FLAG_ORDER = ("model", "weights", "precision", "backend", "resolution", "batch", "threshold", "ratio", "merge_fraction",
              "schedule", "step_base", "r_multiple", "max_downsample", "opt_merge_fraction", "ort_optimize",
              "max_stage_gb", "feature_cache", "cache_branches", "lora", "refittable", "name", "out", "controlnet")
"""The build command's flags in the order a rebuild command gives them."""

FLAG_NAMES = {"backend": "engine-kind"}
"""Build options whose flag is not the key with dashes (``backend`` is recorded, ``--engine-kind`` is the flag)."""


def _number(value: float) -> str:
    """A float as short as it reads back exactly (``0.7``, ``0.004``, ``1e-05``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def build_command(record: BuildRecord) -> str:
    """Format build options as a ``catome-export build`` command line (options not given left out)."""
    parts = ["catome-export", "build"]

    def add(key: str, value: object) -> None:
        flag = f"--{FLAG_NAMES.get(key, key.replace('_', '-'))}"
        parts.extend((flag, shlex.quote(_number(value) if isinstance(value, float) else str(value))))

    for key in FLAG_ORDER:
        value = getattr(record, key)
        if key in ("resolution", "batch"):
            if value is not None and value[0] == value[1]:
                add(key, value[0])
            elif value is not None:
                add(f"min_{key}", value[0])
                add(f"max_{key}", value[1])
        elif key == "ort_optimize":
            if not value:
                add(key, "off")
        elif key == "cache_branches":
            if value:
                add(key, ",".join(map(str, value)))
        elif key == "lora":
            for item in value:  # one --lora per file, in order
                add(key, item)
        elif isinstance(value, bool):  # a switch (--refittable, --controlnet)
            if value:
                parts.append(f"--{key.replace('_', '-')}")
        elif value is not None:
            add(key, value)
    return " ".join(parts)


def rebuild_command(error: RebuildNeeded) -> str:
    """The command that builds the folder ``error`` names again: into the folder that was loaded, with the
    error's overrides."""
    return build_command(error.target())


def error_line(exc: CatomeError) -> str:
    """How the CLI prints a project error: its message, and for a folder to rebuild, the command that does."""
    if isinstance(exc, RebuildNeeded):
        return f"{exc.problem}{exc.lead} {rebuild_command(exc)}{exc.after}"
    return str(exc)
