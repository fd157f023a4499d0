"""The evaluation behind ``catome-export eval``: methods x prompts, same seeds, quality against the baseline.

Every method generates one image per prompt; image ``i`` uses seed
``seed + i`` for every method, so the baseline (no merging) and each merged
method start from the same noise. Per method the report holds seconds per
image (whole pipeline call), PSNR and SSIM of each image against the
baseline image of the same prompt, the mean tokens merged, and FID and CLIP
score where their networks are on this machine (see :mod:`.external`).

Methods (``EvalConfig.methods``; ``baseline`` always runs first):

===================  ===========================================================
``baseline``         eager U-Net, no merging: the reference images
``tome``             eager ToMe: fixed ``ratio``, matching at every step
``adaptive``         eager adaptive threshold ``t``, matching at every step
``catome``           eager CA-ToMe: threshold ``t`` + checkpoint ``schedule``
``engine-baseline``  the engine with merging off (t = 1)
``engine``           the engine with its own settings (or ``t`` / ``schedule``)
===================  ===========================================================

Output folder: ``images/<method>/<i>.png``, ``results.json`` and
``results.md`` (the table, shaped like the paper's).
"""

from __future__ import annotations

import dataclasses

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from catome_export.checks import check_int
from catome_export._version import __version__
from catome_export.backends.torch_backend import load_reference_unet
from catome_export.defaults import DEFAULT_RATIO, DEFAULT_SCHEDULE, DEFAULT_THRESHOLD
from catome_export.devices import resolve_device
from catome_export.eager import apply_merging
from catome_export.errors import CatomeError
from catome_export.evaluation.external import (DEFAULT_CLIP_MODEL, Availability, ClipScorer, InceptionFeatures,
                                               clip_availability, fid_availability, frechet_distance)
from catome_export.evaluation.metrics import psnr, ssim
from catome_export.fsutil import atomic_write_text
from catome_export.merging import AutoSchedule, MergeSettings, parse_schedule, parse_schedule_request
from catome_export.merging.steps import StepHistory, StepRecord
from catome_export.models import default_merge_level
from catome_export.runtime import Runtime
from catome_export.eager import apply_deepcache
from catome_export.featurecache import FeatureCacheSettings
from catome_export.workflows.eager import apply_catome
from catome_export.models.checkpoint import is_checkpoint_path
from catome_export.workflows.generate import (
    ImageRequest, check_engine_shapes, check_model_fits, default_resolution, engine_resolution, generate,
    load_pipeline, merge_settings_for_engine, save_png,
)

logger = logging.getLogger(__name__)

METHODS = ("baseline", "tome", "adaptive", "catome", "deepcache", "catome-deepcache", "engine-baseline", "engine")
EAGER_METHODS = ("baseline", "tome", "adaptive", "catome", "deepcache", "catome-deepcache")
CACHING_METHODS = ("deepcache", "catome-deepcache")
"""Eager methods with DeepCache-style feature caching (``EvalConfig.feature_cache``)."""
ENGINE_METHODS = ("engine-baseline", "engine")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FID_SIZE = 299
"""Side every image is resized to before the Inception network (its native input size)."""


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how (the command line's options)."""

    prompts: tuple[str, ...]
    """One image per prompt and method."""
    out: Path
    """Output folder (created; files in it are replaced)."""
    model: str | None = None
    """Pipeline source: tiny, tiny-xl, sd15, sd21, sdxl, a local pipeline folder or a single-file checkpoint (default:
    tiny, or with an engine the engine's model)."""
    weights: str | None = None
    """``pretrained`` (None: the default) or a single-file checkpoint of ``model``'s architecture (its U-Net, and its
    VAE and text encoders where it has them)."""
    engine: Path | None = None
    """Engine folder for the engine methods."""
    methods: tuple[str, ...] = ()
    """Methods to run; empty: baseline + catome, or baseline + engine-baseline + engine with an engine."""
    threshold: float | None = None
    """CA-ToMe threshold (default 0.7 for eager methods, the engine's own for engine methods)."""
    schedule: str | None = None
    """Checkpoint schedule (default config3 for eager CA-ToMe, the engine's own for the engine)."""
    step_base: int = 1
    ratio: float = DEFAULT_RATIO
    """ToMe's fixed ratio."""
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    """Image i uses seed + i."""
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    warmup: int = 1
    """Untimed generations per method before the timed ones (at most 3 steps each)."""
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    clip_model: str = DEFAULT_CLIP_MODEL
    fid_reference: Path | None = None
    """Folder of real images for FID; without it FID is measured against the baseline images."""
    feature_cache: FeatureCacheSettings | None | str = "engine"
    """Feature caching of the deepcache methods (default interval 3, branch 0) and of the engine methods (default
    ``"engine"``: the engine's own); None turns it off for the engine, and refuses the deepcache methods."""
    r_multiple: int | None = None
    """Round each site's r down to a multiple of this (``MergeSettings.r_multiple``); None: 1 (off) for the eager
    methods, the engine's own for the engine methods."""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise CatomeError("no prompts to evaluate: pass --prompts FILE or --imagenet N")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise CatomeError(f"unknown methods {unknown}: use {', '.join(METHODS)}")
        check_int("warmup", self.warmup, 0)
        if self.weights is not None and self.model is None:
            raise CatomeError("--weights names the weights of --model's architecture: give --model too (e.g. "
                              "--model sd15 --weights model.safetensors)")
        caching = [m for m in self.methods if m in CACHING_METHODS]
        if self.feature_cache is None and caching:
            raise CatomeError(f"feature caching is off (--feature-cache off), but the methods {', '.join(caching)} "
                              "are feature caching: drop them from --methods, or give their cache as I,b")
        # Checked here, before any pipeline is loaded, so a typo fails in a second, not after a model load.
        if self.threshold is not None:
            MergeSettings(threshold=self.threshold)
        MergeSettings(threshold=None, ratio=self.ratio)
        if self.r_multiple is not None:
            MergeSettings(r_multiple=self.r_multiple)

    def method_list(self, with_engine: bool | None = None) -> list[str]:
        """The methods to run, baseline first, each once."""
        engine = self.engine is not None if with_engine is None else with_engine
        chosen = list(self.methods) or (["baseline", "engine-baseline", "engine"] if engine else
                                        ["baseline", "catome"])
        ordered = ["baseline"] + [m for m in chosen if m != "baseline"]
        return list(dict.fromkeys(ordered))


@dataclass
class MethodResult:
    """One method's images and numbers."""

    method: str
    setting: str
    images: list[str] = field(default_factory=list)
    """Image paths relative to the output folder."""
    seconds: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    merged_fraction: list[float] = field(default_factory=list)
    """Per image: mean over steps and sites of r / N (tokens merged away over tokens at the site)."""
    fid: float | None = None
    clip: float | None = None
    settings: dict[str, Any] | None = None

    @property
    def seconds_per_image(self) -> float:
        return float(np.mean(self.seconds)) if self.seconds else math.nan

    def summary(self, baseline_seconds: float | None) -> dict[str, Any]:
        speedup = (baseline_seconds / self.seconds_per_image
                   if baseline_seconds and self.seconds_per_image > 0 else None)
        return {
            "method": self.method, "setting": self.setting, "seconds_per_image": self.seconds_per_image,
            "speedup": speedup, "psnr": _mean_finite(self.psnr) if self.method != "baseline" else None,
            "ssim": float(np.mean(self.ssim)) if self.ssim and self.method != "baseline" else None,
            "fid": self.fid, "clip": self.clip,
            "merged_fraction": float(np.mean(self.merged_fraction)) if self.merged_fraction else 0.0,
            "settings": self.settings,
        }


def _mean_finite(values: Sequence[float]) -> float | None:
    """Mean PSNR; identical images (inf) count as 100 dB so one of them does not make the mean infinite."""
    if not values:
        return None
    return float(np.mean([min(v, 100.0) for v in values]))


@dataclass
class EvalReport:
    """Everything ``eval`` measured."""

    config: EvalConfig
    results: list[MethodResult]
    availability: list[Availability]
    resolution: tuple[int, int]

    def rows(self) -> list[dict[str, Any]]:
        base = next((r for r in self.results if r.method == "baseline"), None)
        base_s = base.seconds_per_image if base is not None else None
        return [r.summary(base_s) for r in self.results]

    def table(self) -> str:
        """The Markdown table: method | setting | s/image | PSNR | SSIM | FID | CLIP."""
        lines = ["| method | setting | s/image | PSNR (dB) | SSIM | FID | CLIP |", "|---|---|---|---|---|---|---|"]
        for row in self.rows():
            sec = f"{row['seconds_per_image']:.3f}"
            if row["speedup"] is not None and row["method"] != "baseline":
                sec += f" ({row['speedup']:.2f}x)"
            lines.append("| " + " | ".join([
                row["method"], row["setting"], sec, _fmt(row["psnr"], ".2f"), _fmt(row["ssim"], ".4f"),
                _fmt(row["fid"], ".2f"), _fmt(row["clip"], ".2f"),
            ]) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "catome_export_version": __version__,
            "model": cfg.model, "engine": str(cfg.engine) if cfg.engine else None,
            "steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed,
            "height": self.resolution[0], "width": self.resolution[1], "negative_prompt": cfg.negative_prompt,
            "prompts": list(cfg.prompts),
            "metrics": {a.metric: a.to_dict() for a in self.availability},
            "summary": self.rows(),
            "per_image": {
                r.method: [
                    {"index": i, "prompt": cfg.prompts[i], "seed": cfg.seed + i, "image": r.images[i],
                     "seconds": r.seconds[i],
                     "psnr": _json_float(r.psnr[i]) if r.psnr else None,
                     "ssim": r.ssim[i] if r.ssim else None,
                     "merged_fraction": r.merged_fraction[i] if r.merged_fraction else 0.0}
                    for i in range(len(r.images))
                ] for r in self.results
            },
        }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


# -- method setup ------------------------------------------------------------------------
def short_setting(settings: Any) -> str:
    """``t=0.7, config3`` / ``ratio 0.5, no cache`` / ``-`` for the table's setting column."""
    if settings is None:
        return "-"
    sched = settings.schedule
    cache = "no cache" if sched.checkpoints is None else (sched.name if sched.name != "custom"
                                                           else ",".join(map(str, sched.checkpoints)))
    if settings.mode == "threshold":
        return "-" if settings.threshold >= 1 else f"t={settings.threshold:g}, {cache}"
    if settings.mode == "ratio":
        return f"ratio {settings.ratio:g}, {cache}"
    return f"fraction {settings.merge_fraction:g}, {cache}"


@dataclass(frozen=True)
class CalibratedCatome:
    """CA-ToMe with an ``auto:K`` schedule: calibrated on the pipeline's U-Net when the method is applied."""

    threshold: float
    schedule: AutoSchedule


def eager_settings(method: str, config: EvalConfig) -> MergeSettings | CalibratedCatome | None:
    """The merge settings of an eager method (None for the baseline; an ``auto:K`` schedule still to calibrate)."""
    settings = _eager_settings(method, config)
    if isinstance(settings, MergeSettings) and config.r_multiple is not None:
        return dataclasses.replace(settings, r_multiple=config.r_multiple)
    return settings


def _eager_settings(method: str, config: EvalConfig) -> MergeSettings | CalibratedCatome | None:
    threshold = DEFAULT_THRESHOLD if config.threshold is None else config.threshold
    if method == "baseline":
        return None
    if method == "tome":
        return MergeSettings(threshold=None, ratio=config.ratio, schedule=parse_schedule("every_step"))
    if method == "adaptive":
        return MergeSettings(threshold=threshold, schedule=parse_schedule("every_step", config.step_base))
    if method == "deepcache":
        return None
    if method in ("catome", "catome-deepcache"):
        request = parse_schedule_request(config.schedule or DEFAULT_SCHEDULE, config.step_base)
        if isinstance(request, AutoSchedule):
            return CalibratedCatome(threshold, request)
        return MergeSettings(threshold=threshold, schedule=request)
    raise CatomeError(f"{method} is not an eager method")


def eager_feature_cache(config: EvalConfig) -> FeatureCacheSettings:
    """The feature cache of the eager deepcache methods: the configured one, else interval 3, branch 0."""
    cache = config.feature_cache
    return cache if isinstance(cache, FeatureCacheSettings) else FeatureCacheSettings(3, 0)


class _Context:
    """The pipeline(s) and the engine runtime shared by every method of one evaluation."""

    def __init__(self, config: EvalConfig, runtime: Any = None) -> None:
        self.config = config
        self.runtime: Any = runtime
        self._owns_runtime = runtime is None
        self.pipe: Any = None
        methods = config.method_list(with_engine=config.engine is not None or runtime is not None)
        if runtime is None and config.engine is None and any(m in ENGINE_METHODS for m in methods):
            raise CatomeError("the engine methods need --engine <engine folder>")
        if runtime is None and config.engine is not None:
            if not Path(config.engine).is_dir():
                raise CatomeError(f"engine folder {str(config.engine)!r} does not exist: build one with "
                                  "catome-export build --model tiny (or pass the folder the build wrote)")
            device = None if config.device == "auto" else config.device
            self.runtime = Runtime.load(config.engine, backend=config.backend, device=device)
        try:
            if self.runtime is not None:
                manifest = self.runtime.manifest
                manifest_model = manifest.model.id or None  # empty: made from ready runners, no model named
                source = config.model or manifest_model
                if source is None:
                    raise CatomeError("the engine's manifest names no model: pass --model")
                eager = any(m in EAGER_METHODS for m in methods)
                reference = eager and bool(manifest.model.weights_hash)
                weights = config.weights
                if config.model is not None:
                    check_model_fits(dict(self.runtime.unet.config), manifest_model or "the engine's model",
                                     config.model, weights)
                elif is_checkpoint_path(manifest.model.weights):
                    weights = manifest.model.weights  # the text encoder and VAE of the file it was built from
                self.pipe = load_pipeline(source, weights=weights, device=self.runtime.device,
                                          dtype=self.runtime.dtype, with_unet=eager and not reference)
                if reference:
                    # The eager methods run the very U-Net the engine was built from (weights hash checked).
                    self.pipe.unet = load_reference_unet(manifest, self.runtime.device)
                self.source = source
            else:
                self.pipe = load_pipeline(config.model or "tiny", weights=config.weights,
                                          device=resolve_device(config.device), dtype=config.dtype)
                self.source = config.model or "tiny"
        except BaseException:
            self.close()
            raise
        self.methods = methods
        self.engine_settings = self.runtime.settings if self.runtime is not None else None
        """The engine's own settings, before any method changed them."""

    def resolution(self) -> tuple[int, int]:
        cfg = self.config
        default = engine_resolution(self.runtime) if self.runtime is not None else None
        if default is None:
            res = default_resolution(self.source)
            default = (res, res)
        height = cfg.height or default[0]
        width = cfg.width or (cfg.height if cfg.height else default[1])
        return height, width

    def method(self, name: str) -> "_MethodSession":
        return _MethodSession(self, name)

    def close(self) -> None:
        if self.runtime is not None and self._owns_runtime:
            self.runtime.close()
        self.runtime = None


class _MethodSession:
    """Sets one method up on the shared pipeline (patch or attach) and tears it down."""

    def __init__(self, ctx: _Context, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.stats: StepHistory | None = None
        self.settings: Any = None
        self.sites: list[Any] = []
        self._undo: Callable[[], None] = lambda: None

    def __enter__(self) -> "_MethodSession":
        cfg, pipe = self.ctx.config, self.ctx.pipe
        if self.name in EAGER_METHODS:
            settings = eager_settings(self.name, cfg)
            if isinstance(settings, CalibratedCatome):
                handle = apply_catome(pipe, threshold=settings.threshold, schedule=settings.schedule,
                                      step_base=cfg.step_base, r_multiple=cfg.r_multiple or 1)
            elif settings is not None:
                # eval has no merge-level option: the model's own (SD 1.x/2.x: 1, SDXL: 2)
                settings = dataclasses.replace(settings, max_downsample=default_merge_level(pipe.unet))
                handle = apply_merging(pipe, settings)
            else:
                handle = None
            if handle is not None:
                self.stats, self.settings, self.sites = handle, handle.settings, list(handle.sites)
                self._undo = handle.remove
            if self.name in CACHING_METHODS:
                cache = eager_feature_cache(cfg)
                try:
                    caching = apply_deepcache(pipe, settings=cache)
                except BaseException:
                    self._undo()
                    raise
                undo_merge = self._undo

                def undo() -> None:
                    caching.remove()
                    undo_merge()
                self._undo = undo
            return self
        from catome_export.runtime.embed import attach

        runtime = self.ctx.runtime
        settings = merge_settings_for_engine(self.ctx.engine_settings, cfg.threshold, cfg.schedule, cfg.step_base,
                                             no_merge=self.name == "engine-baseline", r_multiple=cfg.r_multiple)
        runtime.set_settings(settings, feature_cache="keep" if cfg.feature_cache == "engine" else cfg.feature_cache)
        attachment = attach(pipe, runtime)
        self.stats, self.settings = attachment, settings
        self.sites = sorted(runtime.sites.values(), key=lambda s: s.index)
        self._undo = attachment.detach
        return self

    def __exit__(self, *exc: object) -> None:
        self._undo()

    def merged_fraction(self, history: Sequence[StepRecord], latent_hw: tuple[int, int]) -> float:
        """Mean over steps and sites of r / N."""
        if not history or not self.sites:
            return 0.0
        tokens = {s.index: s.grid(latent_hw)[0] * s.grid(latent_hw)[1] for s in self.sites}
        values = [r / tokens[k] for rec in history for k, r in rec.merged.items() if k in tokens and tokens[k]]
        return float(np.mean(values)) if values else 0.0


# -- running -----------------------------------------------------------------------------
def run_eval(config: EvalConfig, log: Callable[[str], None] = logger.info, runtime: Any = None,
             progress: bool = False) -> EvalReport:
    """Generate every method's images, measure them, and write the report into ``config.out``.

    ``runtime``: an already loaded :class:`~catome_export.runtime.Runtime` for
    the engine methods, used instead of loading ``config.engine`` (left open;
    its merge settings are restored at the end). ``progress``: one tick per image on stderr, with an ETA
    (tqdm on a terminal).
    """
    out = Path(config.out)
    _prepare_out(out)
    availability = [fid_availability(), clip_availability(config.clip_model)]
    ctx = _Context(config, runtime)
    results: list[MethodResult] = []
    try:
        height, width = ctx.resolution()
        requests = [ImageRequest(p, config.negative_prompt, config.steps, config.guidance, config.seed + i,
                                 height, width) for i, p in enumerate(config.prompts)]
        latent_hw = (height // 8, width // 8)
        if ctx.runtime is not None and any(m in ENGINE_METHODS for m in ctx.methods):
            check_engine_shapes(ctx.runtime, requests[0])
        baseline_images: list[np.ndarray] = []
        from catome_export.progress import Progress

        bar = Progress(len(ctx.methods) * (config.warmup + len(requests)), "eval") if progress else None
        for name in ctx.methods:
            with ctx.method(name) as session:
                result = MethodResult(name, short_setting(session.settings),
                                      settings=session.settings.to_dict() if session.settings is not None else None)
                if config.warmup:
                    warm = replace(requests[0], steps=min(config.steps, 3))
                    for _ in range(config.warmup):
                        generate(ctx.pipe, warm, stats=session.stats)
                        if bar is not None:
                            bar.update(note=f"{name} warm-up")
                folder = out / "images" / name
                for i, request in enumerate(requests):
                    gen = generate(ctx.pipe, request, stats=session.stats)
                    rel = Path("images") / name / f"{i:04d}.png"
                    save_png(gen.image, out / rel)
                    result.images.append(rel.as_posix())
                    result.seconds.append(gen.seconds)
                    history = list(session.stats.history) if session.stats is not None else []
                    result.merged_fraction.append(session.merged_fraction(history, latent_hw))
                    if bar is not None:
                        bar.update(note=f"{name} image {i + 1}/{len(requests)}")
                    if name == "baseline":
                        baseline_images.append(gen.image)
                    else:
                        result.psnr.append(psnr(gen.image, baseline_images[i], data_range=255.0))
                        result.ssim.append(ssim(gen.image, baseline_images[i], data_range=255.0))
                log(f"{name}: {len(requests)} images, {result.seconds_per_image:.3f} s/image -> {folder}")
            results.append(result)
        if bar is not None:
            bar.close()
        report = EvalReport(config, results, availability, (height, width))
        _external_metrics(report, out, ctx, log)
    finally:
        if runtime is not None and ctx.engine_settings is not None:
            runtime.set_settings(ctx.engine_settings)
        ctx.close()
    from catome_export.fsutil import Outputs

    outputs = Outputs()  # a folder that became unwritable during the run: the results are kept elsewhere
    text = json.dumps(report.to_dict(), indent=2) + "\n"
    outputs.save(out / "results.json", lambda path: _write_text(path, text), "--out")
    outputs.save(out / "results.md", lambda path: _write_text(path, report.table() + "\n"), "--out")
    outputs.finish()
    return report


def _external_metrics(report: EvalReport, out: Path, ctx: _Context, log: Callable[[str], None]) -> None:
    fid_status, clip_status = report.availability
    device = str(ctx.runtime.device) if ctx.runtime is not None else str(getattr(ctx.pipe, "device", "cpu"))
    if fid_status.available:
        extractor = InceptionFeatures(device)
        feats = {r.method: extractor(_load_images(out, r.images)) for r in report.results}
        reference = report.config.fid_reference
        ref_feats = extractor(_load_folder(reference)) if reference is not None else feats.get("baseline")
        for r in report.results:
            if reference is None and r.method == "baseline":
                continue
            try:
                r.fid = frechet_distance(feats[r.method], ref_feats)
            except CatomeError as exc:
                log(f"FID of {r.method}: {exc}")
    if clip_status.available:
        scorer = ClipScorer(report.config.clip_model, device)
        for r in report.results:
            r.clip = float(np.mean(scorer(_load_images(out, r.images, resize=False), report.config.prompts)))


def _load_images(out: Path, rel_paths: Sequence[str], resize: bool = True) -> np.ndarray | list[np.ndarray]:
    from PIL import Image

    images = []
    for rel in rel_paths:
        with Image.open(out / rel) as im:
            im = im.convert("RGB")
            images.append(np.asarray(im.resize((FID_SIZE, FID_SIZE), Image.BICUBIC) if resize else im))
    return np.stack(images) if resize else images


def _load_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    path = Path(folder)
    if not path.is_dir():
        raise CatomeError(f"FID reference folder {str(path)!r} does not exist: pass a folder of real images")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < 2:
        raise CatomeError(f"FID reference folder {str(path)!r} holds {len(files)} images: FID needs at least 2 "
                          "(thousands for a meaningful value)")
    arrays = []
    for f in files:
        with Image.open(f) as im:
            arrays.append(np.asarray(im.convert("RGB").resize((FID_SIZE, FID_SIZE), Image.BICUBIC)))
    return np.stack(arrays)


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CatomeError(f"--out {str(out)!r} is a file: pass a folder for the images and results")
    from catome_export.fsutil import check_writable_dir

    check_writable_dir(out, "--out")  # before any model is loaded: images are written from the first one on
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CatomeError(f"cannot create the output folder {str(out)!r}: {exc}") from None


def _write_text(path: Path, text: str) -> None:
    """Atomic text write (temp file + rename)."""
    atomic_write_text(path, text)
