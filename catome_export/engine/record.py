"""The build options an engine folder records (the manifest's ``build`` section), and the error that names a
folder to build again with them.

Nothing here needs torch: the CLI's error path reads :class:`RebuildNeeded` without loading the engine modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from catome_export.errors import CatomeError


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _range(data: Mapping[str, Any], key: str) -> tuple[int, int] | None:
    """``min_<key>``/``max_<key>`` (either may be absent: the other end) or ``<key>``, as (min, max)."""
    ends = [data.get(f"min_{key}"), data.get(f"max_{key}")]
    given = [int(v) for v in ends if v is not None]
    if given:
        return given[0], given[-1]
    one = data.get(key)
    return None if one is None else (int(one), int(one))


@dataclass(frozen=True)
class BuildRecord:
    """The manifest's ``build`` section: the options a folder was built with, in the build command's terms.

    Written by the build from its :class:`~catome_export.engine.options.BuildOptions`; a rebuild command is
    formatted from it (``catome_export.cli.rebuild``). ``None`` or an empty value: not given (the build's
    default). On disk the keys are the build command's flags with underscores (``min_resolution``...), as
    manifests have had them since the section was added.
    """

    model: str
    """``tiny``, ``sd15``, ... or a local diffusers folder."""
    weights: str | None = None
    """``pretrained``, ``random`` or a checkpoint file."""
    precision: str | None = None
    backend: str | None = None
    """The build's ``--engine-kind``: ``auto``, ``ort`` or ``trt``."""
    resolution: tuple[int, int] | None = None
    """(min, max) image side in pixels."""
    batch: tuple[int, int] | None = None
    """(min, max) batch size."""
    threshold: float | None = None
    ratio: float | None = None
    merge_fraction: float | None = None
    schedule: str | None = None
    """A schedule name, ``auto:K``, or comma-separated checkpoint steps."""
    step_base: int | None = None
    r_multiple: int | None = None
    """None: 1 (r as counted)."""
    max_downsample: int | None = None
    opt_merge_fraction: float | None = None
    ort_optimize: bool = True
    max_stage_gb: float | None = None
    feature_cache: str | None = None
    """``I,b`` (``--feature-cache``)."""
    cache_branches: tuple[int, ...] = ()
    """Feature-cache branches cut for besides ``feature_cache``'s."""
    lora: tuple[str, ...] = ()
    """``FILE:SCALE`` per LoRA fused at build, in order."""
    refittable: bool = False
    name: str | None = None
    out: str | None = None
    """The folder the build wrote (a copy of it is rebuilt where it was loaded from)."""
    controlnet: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "weights": self.weights, "precision": self.precision,
                             "backend": self.backend, "name": self.name, "out": self.out}
        for key in ("threshold", "ratio", "merge_fraction", "schedule", "step_base", "r_multiple", "max_downsample",
                    "opt_merge_fraction", "max_stage_gb", "feature_cache"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        if not self.ort_optimize:
            d["ort_optimize"] = "off"
        d["cache_branches"] = ",".join(map(str, self.cache_branches)) or None
        d["lora"] = list(self.lora) or None
        d["refittable"] = self.refittable or None
        if self.controlnet:
            d["controlnet"] = True
        for key, pair in (("resolution", self.resolution), ("batch", self.batch)):
            if pair is not None and pair[0] == pair[1]:
                d[key] = pair[0]
            elif pair is not None:
                d.update({f"min_{key}": pair[0], f"max_{key}": pair[1]})
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BuildRecord":
        """Parse a ``build`` section (ValueError, TypeError or KeyError on a malformed one)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("model"), str):
            raise ValueError("the build section is malformed")
        branches = data.get("cache_branches")
        if isinstance(branches, str):
            branches = [b for b in branches.split(",") if b.strip()]
        lora = data.get("lora")
        if isinstance(lora, str):
            lora = [lora]
        optimize = data.get("ort_optimize", True)
        text = {key: None if data.get(key) is None else str(data[key])
                for key in ("weights", "precision", "backend", "schedule", "feature_cache", "name", "out")}
        return cls(model=data["model"], resolution=_range(data, "resolution"), batch=_range(data, "batch"),
                   threshold=_opt_float(data.get("threshold")), ratio=_opt_float(data.get("ratio")),
                   merge_fraction=_opt_float(data.get("merge_fraction")), step_base=_opt_int(data.get("step_base")),
                   r_multiple=_opt_int(data.get("r_multiple")), max_downsample=_opt_int(data.get("max_downsample")),
                   opt_merge_fraction=_opt_float(data.get("opt_merge_fraction")),
                   ort_optimize=optimize not in (False, "off"), max_stage_gb=_opt_float(data.get("max_stage_gb")),
                   cache_branches=tuple(int(b) for b in branches or ()), lora=tuple(str(x) for x in lora or ()),
                   refittable=bool(data.get("refittable")), controlnet=bool(data.get("controlnet")), **text)


class RebuildNeeded(CatomeError):
    """An engine folder that has to be built again (damaged, from another version, built for other shapes,
    another GPU or TensorRT version...).

    It carries what the rebuild needs, and the layer that talks to the user formats it (the CLI prints the
    ``catome-export build`` line, :mod:`catome_export.cli.rebuild`): :attr:`options`, how the folder was
    built (its active LoRAs included); :attr:`engine_dir`, the folder that was loaded, where the rebuild
    goes (None where no folder is known); :attr:`overrides`, options to change (``batch=(1, 4)``).
    """

    def __init__(self, problem: str, options: BuildRecord, engine_dir: Path | None = None,
                 overrides: Mapping[str, Any] | None = None, *, lead: str = ": rebuild it with", after: str = "",
                 recorded: bool = True) -> None:
        self.problem = problem
        """What is wrong (the message up to the advice)."""
        self.lead = lead
        """What joins :attr:`problem` to the build command, punctuation included (``": rebuild it with"``)."""
        self.after = after
        """Words after the build command (another way out)."""
        self.options = options
        self.engine_dir = None if engine_dir is None else Path(engine_dir)
        self.overrides = dict(overrides or {})
        self.recorded = recorded
        """``options`` are the ones the folder was built with (False: only its model and place are known)."""
        target = self.target()
        where = f"into {target.out}" if target.out else "again"
        if recorded:
            changes = "".join(f", {key.replace('_', ' ')} {_describe(value)}" for key, value in self.overrides.items())
            words = f"catome-export build with the options the folder was built with{changes}, {where}"
        else:
            words = f"catome-export build, naming the model, {where}"
        super().__init__(f"{problem}{lead} {words}{after}")

    def target(self) -> BuildRecord:
        """The options of the rebuild: the recorded ones with the overrides, into the folder that was loaded."""
        record = replace(self.options, **self.overrides)
        return record if self.engine_dir is None else replace(record, out=str(self.engine_dir))


def _describe(value: object) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}..{value[1]}"
    if value is True:
        return "on"
    return str(value)
