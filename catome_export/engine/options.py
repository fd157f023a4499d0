"""The build options of an engine folder: :class:`BuildOptions`, every field checked on construction.

:meth:`BuildOptions.create` makes them from loose arguments (the CLI's flags, ``build_engine``'s keywords),
filling in the model's defaults and reading the LoRA files and feature-cache branches against the model's
config before any work; :func:`catome_export.export.build.build_folder` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from catome_export.choices import BuildBackend, Exporter, Precision, Weights
from catome_export.defaults import (
    DEFAULT_BATCH_RANGE, DEFAULT_R_MULTIPLE, DEFAULT_VERIFY_STEPS, MAX_BATCH, MAX_RESOLUTION, MAX_STAGE_BYTES, MIN_RESOLUTION, OPSET,
)
from catome_export.engine.manifest import schedule_flag
from catome_export.engine.record import BuildRecord
from catome_export.checks import check_float, check_int, check_ints
from catome_export.errors import CatomeError
from catome_export.featurecache import FeatureCacheSettings, UNetLayout, parse_feature_cache
from catome_export.featurecache.branches import check_branch
from catome_export.lora.files import LoraSpec, load_loras, parse_lora_arg, targets_from_config
from catome_export.merging.schedules import AutoSchedule, ScheduleSpec, parse_schedule_request
from catome_export.merging.settings import MergeSettings
from catome_export.models import MODELS, model_info
from catome_export.models.registry import BUNDLED_ONLY, WeightsSpec, parse_weights, resolve_source, unet_config_of


def _check_resolution(name: str, value: Any) -> int:
    side = check_int(name, value, MIN_RESOLUTION, MAX_RESOLUTION)
    if side % 8:
        raise CatomeError(f"{name} {side} is not a multiple of 8 (the VAE's downsampling): use e.g. "
                          f"{side - side % 8} or {side - side % 8 + 8}")
    return side


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

    def record(self) -> BuildRecord:
        """The manifest's ``build`` section for these options (an ``auto:K`` schedule recorded as asked)."""
        s = self.settings
        default = self.feature_cache.branch if self.feature_cache is not None else None
        return BuildRecord(
            model=self.model, weights=str(self.weights), precision=str(self.precision), backend=str(self.backend),
            resolution=self.resolution, batch=self.batch, threshold=s.threshold, ratio=s.ratio,
            merge_fraction=s.merge_fraction,
            schedule=self.schedule.name if self.schedule is not None else schedule_flag(s.schedule),
            step_base=s.schedule.step_base, r_multiple=None if s.r_multiple == DEFAULT_R_MULTIPLE else s.r_multiple,
            max_downsample=s.max_downsample, opt_merge_fraction=self.opt_merge_fraction,
            ort_optimize=self.ort_optimize, max_stage_gb=self.max_stage_gb,
            feature_cache=None if self.feature_cache is None else self.feature_cache.flag(),
            cache_branches=tuple(b for b in self.cache_branches if b != default),
            lora=tuple(spec.flag() for spec in self.loras), refittable=self.refittable, name=self.name,
            out=str(self.out_dir), controlnet=self.controlnet)

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
               opt_merge_fraction: float | None = None,
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
                   force=force, ort_optimize=ort_optimize, max_stage_gb=max_stage_gb,
                   feature_cache=feature_cache, cache_branches=tuple(cache_branches), loras=loras,
                   refittable=refittable, controlnet=controlnet)


CREATE_OPTIONS = frozenset({
    "weights", "precision", "backend", "resolution", "min_resolution", "max_resolution", "batch", "min_batch",
    "max_batch", "settings", "schedule", "name", "out_dir", "verify", "verify_steps", "exporter", "opset",
    "opt_merge_fraction", "force", "ort_optimize", "max_stage_gb", "feature_cache", "cache_branches",
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
