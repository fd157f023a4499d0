"""The engine folder build: model -> staged ONNX graphs (+ TensorRT engines) -> audited, verified folder.

:class:`BuildOptions` is the build's only input (validated on construction);
:func:`build_folder` runs it. The verification that decides whether the
folder is installed is passed in (:data:`Verifier`, returning a
:class:`VerifyVerdict`): :mod:`catome_export.workflows.build` gives it the
runtime's, so this module needs neither the backends nor the runtime.

A build never leaves a folder that a later load would trust half-made, and
never damages a previous good build:

1. a lock file ``<parent>/.<name>.lock`` (holding the pid) keeps a second
   build out of the same folder; a lock left by a dead process is taken over;
2. everything is built in ``<parent>/.<name>.tmp-<pid>`` beside the target:
   stage graphs, TensorRT plans where asked, the audit, then ``manifest.json``
   LAST (a folder without a manifest is never loaded);
3. verification runs on that temp folder; only a verified build goes live:
   the old folder is renamed aside, the new one renamed in, the old one
   deleted. A crash between the two renames leaves the old build intact at
   ``.<name>.old-<pid>``, and the next build puts it back first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from catome_export.analysis.calibrate import resolve_schedule
from catome_export.choices import BuildBackend, EngineBackend, Exporter, Precision, Weights
from catome_export.defaults import (
    DEFAULT_BATCH_RANGE, DEFAULT_OPT_MERGE_FRACTION, DEFAULT_VERIFY_STEPS, MAX_BATCH, MAX_RESOLUTION, MIN_RESOLUTION,
)
from catome_export.dtypes import precision_dtype
from catome_export.checks import check_float, check_ints, check_int
from catome_export.errors import CatomeError
from catome_export.export.audit import AuditReport, audit_stages
from catome_export.fsutil import BuildLock, pid_alive
from catome_export.memory import check_available, gb, verify_need
from catome_export.export.controlnet import ControlNetInputs, ControlNetRecord
from catome_export.export.io_names import MODEL_OUTPUT, site_input_name, site_of_input
from catome_export.export.manifest import (
    MANIFEST_FILE, FeatureCacheRecord, Manifest, ModelRecord, build_command, tool_versions,
)
from catome_export.export.onnx_export import (
    OPSET, ExportedStage, example_inputs, export_stage, ort_max_diff, ort_session,
)
from catome_export.export.ort_optimize import OptimizedGraph, optimize_graph
from catome_export.export.profiles import ShapeRanges
from catome_export.export.stages import MAX_STAGE_BYTES, StageSpec, cached_branches, cut_unet
from catome_export.featurecache import FeatureCacheSettings, UNetLayout, parse_feature_cache
from catome_export.featurecache.branches import check_branch
from catome_export.export.trt_build import build_engines
from catome_export.lora.refit import lora_record
from catome_export.merging.schedules import AutoSchedule, ScheduleSpec, parse_schedule_request
from catome_export.merging.settings import MergeSettings
from catome_export.models import MODELS, find_merge_sites, load_unet, model_info, weights_hash
from catome_export.models.registry import (
    BUNDLED_ONLY, ModelInfo, WeightsSpec, parse_weights, resolve_source, unet_config_of,
)
from catome_export.models.sites import MergeSite
from catome_export.lora.files import LoraSpec, load_loras, parse_lora_arg, targets_from_config

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
QUICK_CHECK_TOLERANCE = 1e-4
"""fp32 limit of the per-stage ONNX Runtime check right after export (times max(1, |output|))."""


@dataclass(frozen=True)
class VerifyVerdict:
    """The eager comparison's outcome as a build needs it: only ``ok`` installs a folder.

    A verifier (see :data:`Verifier`) must return one of these (or None when
    it cannot run here); anything else stops the build, so a report without a
    verdict can never install a folder.
    """

    ok: bool
    text: str
    """The comparison's summary (its first line goes into the error of a failed build)."""

    def __post_init__(self) -> None:
        if not isinstance(self.ok, bool):
            raise TypeError(f"VerifyVerdict.ok must be a bool, got {type(self.ok).__name__}")

    def summary(self) -> str:
        return self.text


Verifier = Callable[[Path, "BuildOptions", EngineBackend, list[str], Progress], "VerifyVerdict | None"]
"""``(folder, options, engine backend, notes, progress) -> verdict`` (None: skipped, with a note saying why)."""


def _check_resolution(name: str, value: object) -> int:
    value = check_int(name, value, MIN_RESOLUTION, MAX_RESOLUTION)
    if value % 8:
        raise CatomeError(f"{name} {value} is not a multiple of 8 (the VAE's downsampling): use e.g. "
                          f"{value - value % 8} or {value - value % 8 + 8}")
    return value


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".") \
            or name in ("..",):
        raise CatomeError(f"engine name {name!r} must be a plain folder name (no slashes, not starting with '.')")
    return name


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build needs to know, validated on construction (CatomeError naming the field and the fix).

    Build it from loose arguments (the CLI's flags, ``build_engine``'s keywords)
    with :meth:`create`, which fills in the model's defaults.
    """

    model: str
    """``tiny``, ``sd15`` or a local diffusers folder (the architecture; a checkpoint file given as the model is
    resolved by :meth:`create` into its architecture and ``weights``)."""
    weights: WeightsSpec
    """``pretrained``, ``random``, or the absolute path of a single-file checkpoint of ``model``'s architecture."""
    precision: Precision = Precision.FP32
    backend: BuildBackend = BuildBackend.AUTO
    """``auto`` (TensorRT where it runs, else ONNX Runtime), ``ort`` or ``trt``."""
    resolution: tuple[int, int] = (256, 256)
    """(min, max) image side in pixels, multiples of 8."""
    batch: tuple[int, int] = DEFAULT_BATCH_RANGE
    """(min, max) batch size."""
    settings: MergeSettings = field(default_factory=MergeSettings)
    schedule: AutoSchedule | None = None
    """An ``auto:K`` schedule, calibrated on the model before export (it replaces ``settings.schedule``)."""
    name: str = "tiny"
    out_dir: Path = Path("engines/tiny")
    verify: bool = True
    verify_steps: int = DEFAULT_VERIFY_STEPS
    exporter: Exporter = Exporter.TORCHSCRIPT
    opset: int = OPSET
    default_resolution: int = 256
    """The model's usual resolution (the TensorRT opt shape, clamped into the range)."""
    opt_merge_fraction: float | None = None
    """Share of src tokens TensorRT profiles tune for (None: the merge settings' fraction, else 0.5)."""
    cli: dict[str, Any] = field(default_factory=dict)
    """The flags as given, for the manifest's rebuild command."""
    force: bool = False
    """Replace an existing engine folder even when it holds files no build made (they are removed with it)."""
    ort_optimize: bool = True
    """ONNX Runtime builds: also write each stage in ONNX Runtime's fused form (``stage_<k>.ort.onnx``,
    catome_export.export.ort_optimize), checked like the standard graph and listed in the manifest."""
    feature_cache: FeatureCacheSettings | None = None
    """DeepCache-style feature caching the engine runs by default (None: off; a runtime can still turn on any
    branch in ``cache_branches``). Its branch is always among the branches cut for."""
    cache_branches: tuple[int, ...] = ()
    """More feature-cache branches to cut the stages for (so a runtime may pick them without a rebuild)."""
    max_stage_gb: float | None = None
    """Cut stages whose weights exceed this many GB (1e9 bytes) into pieces (None: 4, :data:`MAX_STAGE_BYTES`):
    lower it to build a large model (SDXL) in less memory."""
    loras: tuple[LoraSpec, ...] = ()
    """Diffusers-format LoRA files fused into the U-Net before export, each with its scale (``--lora FILE[:SCALE]``,
    in order); catome_export.lora."""
    refittable: bool = False
    """TensorRT builds: plans whose weights a refit can replace (``--refittable``: BuilderFlag.REFIT, and
    STRIP_PLAN where the TensorRT version has it), so ``catome-export refit`` swaps LoRAs without a rebuild."""
    controlnet: bool = False
    """Add ControlNet's residuals as inputs of the stages that consume them (``controlnet_down{i}``,
    ``controlnet_mid``), so ``runtime.unet`` takes ``down_block_additional_residuals`` and
    ``mid_block_additional_residual`` (docs/controlnet.md)."""

    @property
    def branches(self) -> tuple[int, ...]:
        """Every feature-cache branch the stages are cut for: ``cache_branches`` and the default's branch."""
        extra = () if self.feature_cache is None else (self.feature_cache.branch,)
        return tuple(sorted(set(self.cache_branches) | set(extra)))

    @property
    def max_stage_bytes(self) -> int:
        return MAX_STAGE_BYTES if self.max_stage_gb is None else int(self.max_stage_gb * 1e9)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise CatomeError("give a model: tiny, sd15, sd21, or a local diffusers folder")
        set_ = object.__setattr__
        set_(self, "weights", parse_weights(self.weights))
        set_(self, "precision", Precision.parse(self.precision, "precision"))
        set_(self, "backend", BuildBackend.parse(self.backend, "backend"))
        set_(self, "exporter", Exporter.parse(self.exporter, "exporter"))
        check_int("opset", self.opset, 17, 21)
        lo, hi = (_check_resolution(f"{end} resolution", v) for end, v in zip(("min", "max"), self.resolution))
        if lo > hi:
            raise CatomeError(f"min resolution {lo} is larger than max resolution {hi}")
        blo, bhi = (check_int(f"{end} batch", v, 1, MAX_BATCH) for end, v in zip(("min", "max"), self.batch))
        if blo > bhi:
            raise CatomeError(f"min batch {blo} is larger than max batch {bhi}")
        set_(self, "resolution", (lo, hi))
        set_(self, "batch", (blo, bhi))
        if not isinstance(self.settings, MergeSettings):
            raise CatomeError(f"settings must be a MergeSettings, got {type(self.settings).__name__}")
        if self.schedule is not None and not isinstance(self.schedule, AutoSchedule):
            raise CatomeError("schedule must be an auto:K request (AutoSchedule); put a ready schedule in settings")
        for flag in ("verify", "force", "controlnet"):
            if not isinstance(getattr(self, flag), bool):
                raise CatomeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if not isinstance(self.ort_optimize, bool):
            raise CatomeError(f"ort_optimize must be true or false (--ort-optimize on|off), got {self.ort_optimize!r}")
        check_int("verify steps", self.verify_steps, 1, 1000)
        if self.opt_merge_fraction is not None:
            check_float("--opt-merge-fraction", self.opt_merge_fraction, 0.0, 1.0)
        if self.max_stage_gb is not None:
            check_float("--max-stage-gb", self.max_stage_gb, 0, 1000, lo_open=True, unit="GB",
                        hint=f"default {MAX_STAGE_BYTES / 1e9:g}; lower builds a large model in less memory")
        _check_name(self.name)
        set_(self, "out_dir", Path(self.out_dir))
        if self.feature_cache is not None and not isinstance(self.feature_cache, FeatureCacheSettings):
            raise CatomeError(f"feature_cache must be a FeatureCacheSettings or None, got "
                              f"{type(self.feature_cache).__name__}")
        branches = check_ints("cache branches", tuple(self.cache_branches), 0)
        set_(self, "cache_branches", tuple(sorted(set(branches))))
        if not isinstance(self.loras, (tuple, list)) or not all(isinstance(x, LoraSpec) for x in self.loras):
            raise CatomeError(f"loras must be LoraSpec values (BuildOptions.create parses FILE[:SCALE]), got "
                              f"{self.loras!r}")
        set_(self, "loras", tuple(self.loras))
        if not isinstance(self.refittable, bool):
            raise CatomeError(f"refittable must be True or False, got {self.refittable!r}")
        _check_resolution("default resolution", self.default_resolution)

    @classmethod
    def create(cls, model: str, weights: str | Path | Weights | None = None, precision: str | Precision = Precision.FP32,
               backend: str | BuildBackend = BuildBackend.AUTO, resolution: int | None = None,
               min_resolution: int | None = None, max_resolution: int | None = None, batch: int | None = None,
               min_batch: int | None = None, max_batch: int | None = None, settings: MergeSettings | None = None,
               schedule: ScheduleSpec | AutoSchedule | None = None, name: str | None = None,
               out_dir: str | Path | None = None, verify: bool = True, verify_steps: int = DEFAULT_VERIFY_STEPS,
               exporter: str | Exporter = Exporter.TORCHSCRIPT, opset: int = OPSET,
               opt_merge_fraction: float | None = None, cli: dict[str, Any] | None = None,
               force: bool = False, ort_optimize: bool = True,
               max_stage_gb: float | None = None, feature_cache: FeatureCacheSettings | str | None = None,
               cache_branches: tuple[int, ...] | list[int] = (), lora: Any = (),
               refittable: bool = False, controlnet: bool = False) -> "BuildOptions":
        """Options from loose arguments, with the model's defaults filled in (CatomeError naming any bad one).

        ``model``: a registry name, a local diffusers folder, or a single-file
        checkpoint (its architecture detected); ``weights``: ``pretrained``,
        ``random`` or a checkpoint file of ``model``'s architecture (the
        engine is then named after the file). ``resolution`` or ``min_resolution``/``max_resolution`` (default: the
        model's); ``batch`` or ``min_batch``/``max_batch`` (default 1..2);
        ``schedule``: any schedule spec, ``auto:K`` included, in place of
        ``settings.schedule``; ``name`` defaults to the model's, ``out_dir``
        to ``engines/<name>``; ``force``: remove files in an existing engine
        folder that no build made (otherwise the build refuses, naming them).
        ``feature_cache``: DeepCache-style caching (a FeatureCacheSettings or
        ``"I,b"``), checked against the model's blocks here, before any work.
        ``lora``: LoRA files to fuse (``"FILE[:SCALE]"`` strings or LoRA specs, one or a list), read and checked
        against the model's layers here, before any work; ``refittable``: TensorRT plans a refit can change.
        ``controlnet``: the engine takes ControlNet residuals (docs/controlnet.md).
        """
        model, given = resolve_source(model, weights)  # a checkpoint file as the model: its architecture, its weights
        info = model_info(model)  # CatomeError for an unknown name or a folder without a U-Net config
        weights = given if given is not None else Weights.RANDOM if model in BUNDLED_ONLY else Weights.PRETRAINED
        if model in BUNDLED_ONLY and weights == Weights.PRETRAINED:
            weights = Weights.RANDOM  # the tiny models exist only with seeded random weights (or a checkpoint's)
        precision = Precision.parse(precision, "precision")
        backend = BuildBackend.parse(backend, "backend")
        exporter = Exporter.parse(exporter, "exporter")
        check_int("opset", opset, 17, 21)
        lo, hi = _resolution_range(resolution, min_resolution, max_resolution, info.default_resolution)
        blo, bhi = _batch_range(batch, min_batch, max_batch)
        settings = settings or MergeSettings(max_downsample=info.max_downsample)
        auto = None
        if schedule is not None:
            request = parse_schedule_request(schedule, settings.schedule.step_base)
            if isinstance(request, AutoSchedule):
                auto = request
            else:
                settings = replace(settings, schedule=request)
        if name is None and isinstance(weights, Path):
            name = weights.stem  # a checkpoint: the file's name (a plain sd15 build keeps engines/sd15)
        if name is None:
            name = model if model in MODELS else (Path(model).resolve().name or "model")
        name = _check_name(name)
        out = Path(out_dir) if out_dir is not None else Path("engines") / name
        if isinstance(feature_cache, str):
            feature_cache = parse_feature_cache(feature_cache)
        layout = UNetLayout.from_config(unet_config_of(model))
        for b in (*cache_branches, *(() if not isinstance(feature_cache, FeatureCacheSettings)
                                     else (feature_cache.branch,))):
            check_branch(b, layout)
        loras = _parse_loras(lora, model)
        return cls(model=model, weights=weights, precision=precision, backend=backend, resolution=(lo, hi),
                   batch=(blo, bhi), settings=settings, schedule=auto, name=name, out_dir=out, verify=verify,
                   verify_steps=verify_steps, exporter=exporter, opset=opset,
                   default_resolution=info.default_resolution, opt_merge_fraction=opt_merge_fraction,
                   cli=dict(cli or {}), force=force, ort_optimize=ort_optimize, max_stage_gb=max_stage_gb,
                   feature_cache=feature_cache, cache_branches=tuple(cache_branches), loras=loras,
                   refittable=refittable, controlnet=controlnet)


CREATE_OPTIONS = frozenset({
    "weights", "precision", "backend", "resolution", "min_resolution", "max_resolution", "batch", "min_batch",
    "max_batch", "settings", "schedule", "name", "out_dir", "verify", "verify_steps", "exporter", "opset",
    "opt_merge_fraction", "cli", "force", "ort_optimize", "max_stage_gb", "feature_cache", "cache_branches",
    "lora", "refittable", "controlnet",
})
"""The keyword arguments of :meth:`BuildOptions.create`."""


def make_options(model: str, **options: Any) -> BuildOptions:
    """:meth:`BuildOptions.create` (kept under its old name), refusing unknown options with the valid ones."""
    unknown = sorted(set(options) - CREATE_OPTIONS)
    if unknown:
        raise CatomeError(f"unknown build option(s) {', '.join(unknown)}: use {', '.join(sorted(CREATE_OPTIONS))}")
    return BuildOptions.create(model, **options)


def _parse_loras(lora: Any, model: str) -> tuple[LoraSpec, ...]:
    """``--lora`` values as LoraSpecs, every file read and checked against the model's layers (CatomeError naming
    the first key that does not fit)."""
    if lora is None or lora == ():
        return ()
    items = [lora] if isinstance(lora, (str, Path, LoraSpec)) else list(lora)
    specs = tuple(parse_lora_arg(str(x) if isinstance(x, Path) else x) for x in items)
    if specs:
        load_loras(specs, targets_from_config(unet_config_of(model)))
    return specs


def _resolution_range(resolution: int | None, min_resolution: int | None, max_resolution: int | None,
                      default: int) -> tuple[int, int]:
    if resolution is not None:
        if min_resolution is not None or max_resolution is not None:
            raise CatomeError("give either --resolution or --min-resolution/--max-resolution, not both")
        value = _check_resolution("resolution", resolution)
        return value, value
    lo = _check_resolution("min resolution", min_resolution) if min_resolution is not None else None
    hi = _check_resolution("max resolution", max_resolution) if max_resolution is not None else None
    if lo is None and hi is not None:
        return min(default, hi), hi
    if hi is None and lo is not None:
        return lo, max(default, lo)
    if lo is None or hi is None:
        return default, default
    if lo > hi:
        raise CatomeError(f"min resolution {lo} is larger than max resolution {hi}")
    return lo, hi


def _batch_range(batch: int | None, min_batch: int | None, max_batch: int | None) -> tuple[int, int]:
    if batch is not None:
        if min_batch is not None or max_batch is not None:
            raise CatomeError("give either --batch or --min-batch/--max-batch, not both")
        value = check_int("batch", batch, 1, MAX_BATCH)
        return value, value
    blo = check_int("min batch", DEFAULT_BATCH_RANGE[0] if min_batch is None else min_batch, 1, MAX_BATCH)
    bhi = check_int("max batch", max(DEFAULT_BATCH_RANGE[1], blo) if max_batch is None else max_batch, 1, MAX_BATCH)
    if blo > bhi:
        raise CatomeError(f"min batch {blo} is larger than max batch {bhi}")
    return blo, bhi


@dataclass
class BuildResult:
    """What a build made and measured."""

    manifest: Manifest
    engine_dir: Path
    stages: list[ExportedStage]
    audit: AuditReport
    quick_check: dict[int, float] | None
    """Per stage, max |ONNX Runtime - torch| at the example shape (None where skipped)."""
    verify: VerifyVerdict | None
    """The eager comparison's verdict (None when skipped)."""
    backend: EngineBackend
    """``ort`` or ``trt``: which engines the folder holds."""
    seconds: float
    notes: list[str] = field(default_factory=list)
    """Things skipped and why."""


# -- folder handling ----------------------------------------------------------------------------------------
def _recover_leftovers(target: Path) -> None:
    """Put back an old build a crashed swap left aside; remove temp folders of dead builds."""
    parent = target.parent
    for path in sorted(parent.glob(f".{target.name}.old-*")):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        if not target.exists() and (path / MANIFEST_FILE).is_file():
            logger.info("restoring the previous build from %s (a build was interrupted while swapping)", path)
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in parent.glob(f".{target.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise CatomeError(f"{target} exists and is not a folder: choose another --out")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_FILE).is_file():
        raise CatomeError(f"{target} exists and is not an engine folder (no {MANIFEST_FILE}): choose another --out, "
                          "or remove it")


BUILD_FILES = (MANIFEST_FILE, "timing.cache")
"""Files a build writes into the folder besides those its manifest lists."""
_BUILD_NAME = re.compile(r"^(stage_\d+\.(onnx|plan|ort\.onnx)([._-][\w.-]*)?|lora_[\w.-]+)$")
"""Names a build gives its stage files (graphs, external data, TensorRT plans), for a manifest it cannot read."""


def foreign_files(target: Path) -> list[str]:
    """Files in an existing engine folder that no build made: neither listed by its manifest nor written by a
    build beside them (paths relative to the folder, sorted). A rebuild would replace the folder with them."""
    if not target.is_dir():
        return []
    ours = set(BUILD_FILES)
    try:
        manifest: Manifest | None = Manifest.load(target, check_files=False)
    except CatomeError:  # missing, damaged, edited or from another version: judge the stage files by name
        manifest = None
    if manifest is not None:
        ours.update(name for name, _, _ in manifest.files())
    found = []
    for path in sorted(target.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(target).as_posix()
        if rel in ours or (manifest is None and _BUILD_NAME.match(rel)):
            continue
        found.append(rel)
    return found


def _check_foreign(target: Path, force: bool) -> None:
    """CatomeError naming the files of someone else's in the engine folder, unless ``force``."""
    found = foreign_files(target)
    if not found:
        return
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    if force:
        logger.warning("--force: the rebuild of %s removes files no build made: %s", target, shown)
        return
    raise CatomeError(f"{target} holds files no build made ({shown}); a rebuild replaces the whole folder: move "
                      "them out, build into another --out, or pass --force to remove them")


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished build in; the old one goes aside first and is deleted after.

    A file-system error on the way (permissions, a folder held open elsewhere) ends in
    :class:`CatomeError` with the old build back in place.
    """
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(target, old)
        except OSError as exc:
            raise CatomeError(f"cannot move the old build {target} aside to install the new one "
                              f"({exc.strerror or exc}): check the permissions of {target.parent} and that no "
                              f"program holds {target} open; {target} was not changed") from None
    try:
        os.rename(tmp, target)
    except BaseException as exc:
        restored = old is None
        if old is not None:
            try:
                os.rename(old, target)
                restored = True
            except OSError:
                pass
        if not isinstance(exc, OSError):
            raise
        where = f"{target} was not changed" if restored else f"the previous build is in {old}: rename it back"
        raise CatomeError(f"cannot move the finished build into {target} ({exc.strerror or exc}): check the "
                          f"permissions of {target.parent}; {where}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _keep_unplaced(tmp: Path, target: Path) -> Path:
    """A finished build that could not be swapped in: renamed to ``<target>.new`` (which no later build
    cleans up), or left where it is when even that fails."""
    kept = target.parent / f"{target.name}.new"
    if kept.exists():
        return tmp
    try:
        os.rename(tmp, kept)
    except OSError:
        return tmp
    return kept


# -- the build ----------------------------------------------------------------------------------------------
def _opt_latent(opts: BuildOptions) -> int:
    lo, hi = opts.resolution
    return min(max(opts.default_resolution, lo), hi) // 8


def _calibrate_schedule(opts: BuildOptions, schedule: AutoSchedule, unet: torch.nn.Module,
                        progress: Progress) -> MergeSettings:
    s = opts.settings
    progress(f"calibrating schedule {schedule.name} on the model")
    resolved = resolve_schedule(schedule, unet, schedule.step_base, threshold=s.threshold, ratio=s.ratio,
                                latent_hw=(_opt_latent(opts),) * 2, max_downsample=s.max_downsample,
                                stride=s.stride)
    return replace(s, schedule=resolved)


def build_folder(opts: BuildOptions, progress: Progress | None = None, *,
                 engine_backend: EngineBackend = EngineBackend.ORT,
                 verifier: Verifier | None = None) -> BuildResult:
    """Build the engine folder ``opts.out_dir`` (see the module docstring for the steps and atomicity).

    ``engine_backend``: the engines to make (``trt``: TensorRT plans too);
    ``verifier``: the eager comparison that decides whether the folder is
    installed (:func:`catome_export.workflows.build.run_build` passes the
    runtime's); without one, a build asked to verify records that it was not.
    An existing folder is replaced only when every file in it was made by a
    build (its manifest lists them); other files are refused before any work
    starts, unless ``opts.force`` (then they are removed with the old build).
    """
    say = progress or logger.info
    start = time.perf_counter()
    backend = EngineBackend.parse(engine_backend, "engine backend")
    target = opts.out_dir
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CatomeError(f"cannot create the folder {target.parent} for --out {target} ({exc.strerror or exc}): "
                          "choose an --out in a writable folder") from None
    with BuildLock(target.parent / f".{target.name}.lock", str(target)):
        _recover_leftovers(target)
        _check_target(target)
        _check_foreign(target, opts.force)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        keep_tmp = False  # True once tmp is the installed build, or a failed one kept for inspection
        try:
            try:
                tmp.mkdir()
                result = _build_into(opts, tmp, backend, say, verifier)
            except OSError as exc:
                raise CatomeError(f"the build failed on a file operation ({exc}): check the free space and "
                                  f"permissions of {target.parent}; {target} was not changed") from exc
            if result.verify is not None and not result.verify.ok:
                failed = target.parent / f".{target.name}.failed"
                shutil.rmtree(failed, ignore_errors=True)
                try:
                    os.rename(tmp, failed)
                except OSError:
                    failed = tmp
                    keep_tmp = True
                summary = result.verify.summary()
                raise CatomeError(f"the engine does not match eager CA-ToMe ({summary.splitlines()[0] if summary else ''})"
                                  f"; it was not installed: {target} is unchanged, the failed build is in {failed} "
                                  f"(inspect it with catome-export verify {failed})")
            if not opts.force:
                _check_foreign(target, False)  # put there while this build ran
            try:
                _swap_into_place(tmp, target)
            except CatomeError as exc:  # the finished build is kept, and the message says where
                keep_tmp = True
                kept = _keep_unplaced(tmp, target)
                raise CatomeError(f"{exc}; the finished build is kept in {kept} (move it to {target} yourself, "
                                  f"or build again)") from None
            keep_tmp = True
        finally:
            if not keep_tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    result.manifest.engine_dir = target
    result.engine_dir = target
    result.seconds = time.perf_counter() - start
    say(f"built {target} in {result.seconds:.1f} s")
    return result


def _build_into(opts: BuildOptions, folder: Path, backend: EngineBackend, say: Progress,
                verifier: Verifier | None) -> BuildResult:
    notes: list[str] = []
    dtype = precision_dtype(opts.precision)
    say(f"loading {opts.model} ({opts.weights} weights, {opts.precision})")
    unet = load_unet(opts.model, weights=opts.weights, dtype=dtype)
    base_hash = weights_hash(unet)
    lora_files = _fuse_loras(unet, opts, folder, say)
    weights = sum(p.numel() for p in unet.parameters()) * torch.empty((), dtype=dtype).element_size()
    _check_free_space(folder, weights, fused=backend == EngineBackend.ORT and opts.ort_optimize,
                      trt=backend == EngineBackend.TRT)
    if opts.verify and verifier is not None and backend == EngineBackend.ORT and not torch.cuda.is_available():
        # the eager reference and the engine, both on the CPU, after the export
        check_available(verify_need(weights), f"verifying this build on the CPU (the eager U-Net, {gb(weights)}, and "
                        "the engine in ONNX Runtime at once)", "build with --no-verify here and check the engine with "
                        "catome-export verify on a machine with more memory, or close other programs", held=weights)
    settings = opts.settings
    if opts.schedule is not None:
        settings = _calibrate_schedule(opts, opts.schedule, unet, say)
    sites = find_merge_sites(unet, settings.max_downsample)
    stages = cut_unet(unet, sites, dtype, merge_crossattn=settings.merge_crossattn, merge_mlp=settings.merge_mlp,
                      max_stage_bytes=opts.max_stage_bytes, cache_branches=opts.branches, controlnet=opts.controlnet)
    examples = example_inputs(stages, sites, unet.config, dtype, stride=settings.stride)
    check_ort = opts.verify and opts.precision == Precision.FP32
    if opts.verify and not check_ort:
        notes.append("per-stage ONNX Runtime check skipped: ONNX Runtime's CPU kernels lack fp16 ScatterElements "
                     "(add); fp16 graphs run on TensorRT or ONNX Runtime CUDA")
    quick: dict[int, float] | None = {} if check_ort else None
    exported: list[ExportedStage] = []
    fused: dict[int, OptimizedGraph] = {}
    fuse = backend == EngineBackend.ORT and opts.ort_optimize
    n = len(stages)
    for spec, module in stages:
        say(f"exporting stage {spec.index + 1}/{n} ({_describe(spec)})")
        item = export_stage(spec, module, examples[spec.index], folder, opset=opts.opset, exporter=opts.exporter)
        line = f"  stage {spec.index + 1}/{n}: {item.file}, {item.seconds:.1f} s, {_mb(item.total_bytes)}"
        graphs = [(item.file, "the export is broken (try --exporter dynamo)")]
        if fuse:
            fused[spec.index] = optimize_graph(folder / item.file)
            graphs.append((fused[spec.index].file, "ONNX Runtime's fusions changed it (build with --ort-optimize off)"))
            line += f"; {fused[spec.index].file}: {_describe_fused(fused[spec.index])}"
        if quick is not None:
            try:
                diffs = [ort_max_diff(ort_session(folder / file), spec, module, examples[spec.index])
                         for file, _ in graphs]
            except CatomeError as exc:
                notes.append(f"per-stage ONNX Runtime check skipped ({exc})")
                quick = None
            else:
                quick[spec.index] = max(diffs)
                line += ", ORT max |diff| " + " / ".join(f"{d:.1e}" for d in diffs)
                with torch.no_grad():
                    scale = max(float(t.abs().max()) for t in module(*examples[spec.index]))
                for (file, fix), diff in zip(graphs, diffs):
                    if not diff <= QUICK_CHECK_TOLERANCE * max(1.0, scale):
                        raise CatomeError(f"stage {spec.index}'s ONNX graph {file} differs from the torch stage by "
                                          f"{diff:.2e} in ONNX Runtime: {fix}")
        say(line)
        exported.append(item)
    audit = audit_stages([folder / e.file for e in exported])
    say(audit.summary())
    for finding in audit.errors[:10]:
        say(f"  {finding}")
    if not audit.passed:
        if backend == EngineBackend.TRT:
            raise CatomeError(f"the stage graphs use ops TensorRT cannot parse ({len(audit.errors)} errors, first: "
                              f"{audit.errors[0]}); build with --engine-kind ort, or report the model layout")
        notes.append("the graphs would not parse in TensorRT (see the audit); ONNX Runtime can still run them")
    info = model_info(opts.model)
    manifest = _make_manifest(opts, unet, sites, stages, exported, settings, backend, audit, info,
                              base_hash=base_hash)
    graph_files = [e.file for e in exported] + [g.file for g in fused.values()]
    manifest.lora = lora_record(unet, folder, graph_files, lora_files, refittable=opts.refittable
                                and backend == EngineBackend.TRT)
    manifest.stages = tuple(replace(s, ort_optimized=fused[s.index].record()) if s.index in fused else s
                            for s in manifest.stages)
    del unet, stages, examples
    if backend == EngineBackend.TRT:
        _build_trt(folder, manifest, opts, say)
    manifest.save(folder)  # LAST: a folder without a manifest is never loaded
    verdict = None
    if opts.verify:
        if verifier is None:
            notes.append("verification skipped: this build was given no verifier (catome_export.workflows.build "
                         "verifies); check it with catome-export verify")
            say(notes[-1])
        else:
            verdict = verifier(folder, opts, backend, notes, say)
            if verdict is not None and not isinstance(verdict, VerifyVerdict):
                raise CatomeError(f"internal: the verifier returned a {type(verdict).__name__}, not a "
                                  "VerifyVerdict, so the build cannot tell whether it passed; it was not installed")
    return BuildResult(manifest=manifest, engine_dir=folder, stages=exported, audit=audit, quick_check=quick,
                       verify=verdict, backend=backend, seconds=0.0, notes=notes)


FREE_SPACE_MARGIN = 1.05, 256 << 20
"""(factor, bytes) over the estimated size of a build that the folder's disk must have free."""


def _check_free_space(folder: Path, weights: int, *, fused: bool, trt: bool) -> None:
    """Refuse, before the export, a build that cannot fit on the disk it is written to.

    The build writes the weights once as the stage graphs, once more as ONNX
    Runtime's fused copies (``--ort-optimize on``), or once more as TensorRT
    plans (about the weights' size); an existing build in the target folder
    stays until the new one replaces it. ``weights``: bytes of the U-Net's weights at the build's precision.
    """
    parts = [("the stage graphs", weights)]
    if fused:
        parts.append(("ONNX Runtime's fused copies", weights))
    if trt:
        parts.append(("TensorRT plans, about", weights))
    need = int(sum(n for _, n in parts) * FREE_SPACE_MARGIN[0]) + FREE_SPACE_MARGIN[1]
    free = shutil.disk_usage(folder).free
    if free < need:
        hint = "; --ort-optimize off writes the weights once (the ONNX Runtime backend then runs the standard " \
               "graphs)" if fused else ""
        detail = ", ".join(f"{what} {gb(n)}" for what, n in parts)
        raise CatomeError(f"this build writes about {gb(need)} ({detail}, and a margin) but {folder.parent} has "
                          f"{gb(free)} free: free some space or choose an --out on a larger disk{hint}")


def _describe_fused(graph: OptimizedGraph) -> str:
    ops = ", ".join(f"{count} {op}" for op, count in graph.fused.items()) or "no fused operators"
    left = f", {graph.attention_left} attention(s) left unfused" if graph.attention_left else ""
    return f"{ops}{left}, {graph.seconds:.1f} s"


def _describe(spec: StageSpec) -> str:
    parts = []
    if spec.site is not None:
        parts.append(f"site {spec.site}")
    if spec.next_site is not None:
        parts.append(f"-> {site_input_name(spec.next_site)}")
    elif MODEL_OUTPUT in spec.output_names:
        parts.append(f"-> {MODEL_OUTPUT}")
    else:
        parts.append("a piece without a merge site (cut for the feature cache or by size)")
    return ", ".join(parts)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _opt_fraction(opts: BuildOptions, settings: MergeSettings) -> float:
    if opts.opt_merge_fraction is not None:
        return float(opts.opt_merge_fraction)
    return settings.merge_fraction if settings.merge_fraction is not None else DEFAULT_OPT_MERGE_FRACTION


def _make_manifest(opts: BuildOptions, unet: torch.nn.Module, sites: list[MergeSite],
                   stages: list[tuple[StageSpec, torch.nn.Module]], exported: list[ExportedStage],
                   settings: MergeSettings, backend: EngineBackend, audit: AuditReport, info: ModelInfo, *,
                   base_hash: str | None = None) -> Manifest:
    channels = {}
    for spec, _ in stages:
        for t in spec.outputs:
            site = site_of_input(t.name)
            if site is not None:
                channels[site] = int(t.shape[-1])
    lo, hi = opts.resolution
    config = json.loads(json.dumps(dict(unet.config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    opt_latent = _opt_latent(opts)
    shapes = ShapeRanges(batch=opts.batch, latent_height=(lo // 8, hi // 8), latent_width=(lo // 8, hi // 8),
                         text_len=(info.text_len, info.text_len), opt_batch=opts.batch[1], opt_height=opt_latent,
                         opt_width=opt_latent, opt_text_len=info.text_len,
                         opt_merge_fraction=_opt_fraction(opts, settings),
                         text_dim=int(unet.config.cross_attention_dim))
    shapes.validate()
    cli: dict[str, Any] = {"model": opts.model, "weights": str(opts.weights), "precision": str(opts.precision),
                           "backend": str(opts.backend), "name": opts.name, "out": str(opts.out_dir)}
    cli.update({k: v for k, v in opts.cli.items() if v is not None})
    if not opts.ort_optimize:
        cli["ort_optimize"] = "off"
    if opts.feature_cache is not None:
        cli["feature_cache"] = opts.feature_cache.flag()
    extra_branches = [b for b in opts.cache_branches if opts.feature_cache is None or b != opts.feature_cache.branch]
    cli["cache_branches"] = ",".join(map(str, extra_branches)) or None
    cli["lora"] = [spec.flag() for spec in opts.loras] or None
    cli["refittable"] = opts.refittable or None
    if opts.controlnet:
        cli["controlnet"] = True
    if lo == hi and "min_resolution" not in cli:
        cli["resolution"] = lo
    else:
        cli.update(min_resolution=lo, max_resolution=hi)
    if opts.batch[0] == opts.batch[1] and "min_batch" not in cli:
        cli["batch"] = opts.batch[0]
    else:
        cli.update(min_batch=opts.batch[0], max_batch=opts.batch[1])
    return Manifest(
        name=opts.name,
        model=ModelRecord(id=opts.model, weights=str(opts.weights),
                          weights_hash=base_hash if base_hash is not None else weights_hash(unet),
                          unet_config=config),
        precision=str(opts.precision), merge=settings,
        sites=tuple(replace(s, channels=channels.get(s.index)) for s in sites),
        shapes=shapes, stages=tuple(e.record(spec) for e, (spec, _) in zip(exported, stages)),
        engine_backend=str(EngineBackend.ORT), trt=None, tools=tool_versions(),
        feature_cache=None if not opts.branches else FeatureCacheRecord(
            cached_branches(stages, opts.branches, UNetLayout.of(unet)), opts.feature_cache),
        controlnet=_controlnet_record(stages) if opts.controlnet else None,
        extra={"build": cli, "build_command": build_command(cli), "audit": audit.to_dict(),
               "export": {"exporter": str(opts.exporter), "opset": opts.opset,
                          "ort_optimize": backend == EngineBackend.ORT and opts.ort_optimize,
                          "max_stage_bytes": opts.max_stage_bytes}},
    )


def _fuse_loras(unet: torch.nn.Module, opts: BuildOptions, folder: Path, say: Progress) -> Any:
    """Fuse ``opts.loras`` into the U-Net (catome_export.lora), keeping the base values of the weights they change
    and a copy of each file in the folder; None without LoRAs."""
    if not opts.loras:
        return None
    from catome_export.lora.refit import fuse_for_build

    say("fusing LoRA " + " + ".join(f"{s.path.name}:{s.scale:g}" for s in opts.loras) + " into the U-Net")
    return fuse_for_build(unet, opts.loras, folder)


def _controlnet_record(stages: list[tuple[StageSpec, torch.nn.Module]]) -> ControlNetRecord:
    found = ControlNetInputs.of([spec for spec, _ in stages])
    if found is None:
        raise CatomeError("internal: a --controlnet build cut stages without ControlNet residual inputs")
    return found.record()


def _build_trt(folder: Path, manifest: Manifest, opts: BuildOptions, say: Progress) -> None:
    """TensorRT engines for every stage (catome_export.export.trt_build), recorded in the manifest."""
    manifest.engine_dir = folder
    built = build_engines(folder, manifest, fp16=opts.precision == Precision.FP16, refittable=opts.refittable,
                          progress=lambda k, n, msg: say(f"  stage {k + 1}/{n}: {msg}"))
    built.apply(manifest)
    if manifest.lora is not None and opts.refittable:
        manifest.lora = replace(manifest.lora, refittable=True,
                                stripped=bool(built.record.extra.get("strip_plan", False)))
    manifest.tools = tool_versions()
