"""Generation mode of ``catome-export bench``: the mean U-Net time per step over whole N-step schedules.

Feature caching changes the cost of a step with the step (full calls run the
whole U-Net, cached ones only the shallow branch), so single calls cannot
say what it saves: each row here runs complete denoising loops (a DDIM
schedule of ``steps`` calls, seeded latents and text embeddings, the U-Net
calls timed one by one, the scheduler's own step between them) and reports
the mean per step. Rows are timed in rounds, each round one generation per
row, the row order rotated from round to round.

Rows:

- ``eager``: the diffusers U-Net in PyTorch;
- ``eager-deepcache``: the same U-Net with the DeepCache package's own
  ``DeepCacheSDHelper`` (the external anchor of what feature caching saves);
- ``engine`` at each merge fraction, without and with feature caching (the
  engine's CA-ToMe schedule; r forced per site as elsewhere in ``bench``, so
  the speed does not depend on the weights).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from catome_export.checks import check_float, check_int
from catome_export.bench.device import device_info, load_average
from catome_export.bench.timing import synchronize
from catome_export.errors import CatomeError
from catome_export.featurecache import FeatureCacheSettings

logger = logging.getLogger(__name__)

GENERATION_BACKENDS = ("eager", "eager-deepcache", "engine")


@dataclass(frozen=True)
class GenerationConfig:
    """What generation mode times."""

    model: str = "tiny"
    weights: str = "random"
    engine_dir: Path | None = None
    """A built engine cut for ``feature_cache``'s branch; None builds one under ``workdir`` (reused when it fits)."""
    backends: tuple[str, ...] = GENERATION_BACKENDS
    resolution: int | None = None
    """Image side in pixels (None: the model's default)."""
    batch: int = 2
    steps: int = 50
    """Denoising steps (DDIM: one U-Net call each)."""
    rounds: int = 2
    merge_fractions: tuple[float, ...] = (0.0, 0.75)
    feature_cache: FeatureCacheSettings = field(default_factory=lambda: FeatureCacheSettings(3, 0))
    device: str = "cpu"
    threads: int | None = None
    engine_backend: str = "auto"
    workdir: Path = Path("/tmp/catome-bench-generation")
    seed: int = 0
    latents: str = "smooth"
    text_len: int = 77
    r_multiple: int = 1
    """The engine rows round r down to a multiple of this (``MergeSettings.r_multiple``; 1: off)."""

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in GENERATION_BACKENDS]
        if unknown or not self.backends:
            raise CatomeError(f"generation mode times {', '.join(GENERATION_BACKENDS)}; got {list(self.backends)}")
        for name, v in (("steps", self.steps), ("rounds", self.rounds), ("batch", self.batch)):
            check_int(name, v, 1)
        for f in self.merge_fractions:
            check_float("merge fraction", f, 0, 1)
        if not isinstance(self.feature_cache, FeatureCacheSettings) or not self.feature_cache.caches:
            raise CatomeError("generation mode compares rows with and without feature caching: give a feature cache "
                              "that caches (interval >= 2, e.g. --feature-cache 3,0)")
        check_int("r_multiple", self.r_multiple, 1, hint="1: off")
        if self.resolution is not None and (self.resolution < 16 or self.resolution % 8):
            raise CatomeError(f"resolution must be a multiple of 8 of at least 16 pixels, got {self.resolution}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "weights": self.weights,
                "engine_dir": None if self.engine_dir is None else str(self.engine_dir),
                "backends": list(self.backends), "resolution": self.resolution, "batch": self.batch,
                "steps": self.steps, "rounds": self.rounds, "merge_fractions": list(self.merge_fractions),
                "feature_cache": self.feature_cache.to_dict(), "scheduler": "ddim", "device": self.device,
                "threads": self.threads, "engine_backend": self.engine_backend, "seed": self.seed,
                "latents": self.latents, "text_len": self.text_len, "r_multiple": self.r_multiple}


@dataclass(frozen=True)
class GenRow:
    """One row: a backend with its merge fraction and feature cache."""

    backend: str
    fraction: float | None = None
    cache: FeatureCacheSettings | None = None

    @property
    def label(self) -> str:
        merge = "" if self.fraction is None else f" @ {self.fraction:g}"
        cache = "" if self.cache is None else f" + cache {self.cache.interval},{self.cache.branch}"
        return f"{self.backend}{merge}{cache}"


@dataclass
class GenTiming:
    """Every generation of a row: per call, its time and whether it was a cached (shallow) call."""

    row: GenRow
    generations: list[list[tuple[float, bool]]] = field(default_factory=list)

    def per_step(self) -> list[float]:
        """Mean ms per step of each generation."""
        return [sum(ms for ms, _ in g) / len(g) for g in self.generations]

    @property
    def mean_ms(self) -> float:
        """Median over rounds of the mean per step (one generation per round)."""
        return statistics.median(self.per_step())

    def kind_ms(self, cached: bool) -> float | None:
        values = [ms for g in self.generations for ms, c in g if c == cached]
        return statistics.median(values) if values else None

    @property
    def cached_calls(self) -> int:
        return sum(1 for _, c in self.generations[0] if c) if self.generations else 0

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.row.backend, "merge_fraction": self.row.fraction,
                "feature_cache": None if self.row.cache is None else self.row.cache.to_dict(),
                "label": self.row.label, "mean_ms_per_step": self.mean_ms, "per_generation_ms_per_step":
                self.per_step(), "full_call_ms": self.kind_ms(False), "cached_call_ms": self.kind_ms(True),
                "calls": len(self.generations[0]) if self.generations else 0, "cached_calls": self.cached_calls,
                "samples_ms": [[ms for ms, _ in g] for g in self.generations],
                "cached": [[c for _, c in g] for g in self.generations]}


class _Loop:
    """Seeded inputs and a DDIM schedule: one generation of ``steps`` U-Net calls through a callable."""

    def __init__(self, config: GenerationConfig, unet_config: dict[str, Any], resolution: int,
                 device: torch.device) -> None:
        from catome_export.latents import make_latents
        from catome_export.models.conditioning import conditioning_for_config
        from catome_export.models.pipeline import make_scheduler

        self.scheduler = make_scheduler("ddim")
        self.scheduler.set_timesteps(config.steps)
        lat = resolution // 8
        self.latents = make_latents((config.batch, int(unet_config["in_channels"]), lat, lat), config.latents,
                                    config.seed, device=device)
        gen = torch.Generator().manual_seed(config.seed + 1)
        self.text = torch.randn(config.batch, config.text_len, int(unet_config["cross_attention_dim"]),
                                generator=gen).to(device)
        self.added = conditioning_for_config(unet_config, config.batch, (resolution, resolution),
                                             seed=config.seed + 2, device=device)
        self.device = device

    def run(self, call: Callable[..., Any], kind: Callable[[], bool]) -> list[tuple[float, bool]]:
        """One generation; ``kind()`` after a call says whether it was a cached call."""
        latents = self.latents * self.scheduler.init_noise_sigma
        extra = {} if self.added is None else {"added_cond_kwargs": self.added}
        out: list[tuple[float, bool]] = []
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                sample = self.scheduler.scale_model_input(latents, t)
                synchronize(self.device)
                start = time.perf_counter()
                noise = call(sample, t, encoder_hidden_states=self.text, **extra).sample
                synchronize(self.device)
                out.append(((time.perf_counter() - start) * 1e3, kind()))
                latents = self.scheduler.step(noise, t, latents).prev_sample
        if not torch.isfinite(latents).all():
            raise CatomeError("a benchmark generation produced non-finite latents: the timing would be meaningless")
        return out


def _engine_for(config: GenerationConfig, resolution: int, progress: Callable[[str], None]) -> Path:
    """The engine folder: the given one, or one built under the work folder (reused when it fits)."""
    from catome_export.engine.manifest import Manifest

    if config.engine_dir is not None:
        folder = config.engine_dir
    else:
        folder = config.workdir / f"{config.model}-gen-{resolution}-b{config.batch}-fc{config.feature_cache.branch}"
        try:
            m = Manifest.load(folder, check_hashes=False)
            m.check_shapes(config.batch, resolution // 8, resolution // 8)
            fits = m.feature_cache is not None and config.feature_cache.branch in m.feature_cache.branch_ids
        except CatomeError:
            fits = False
        if not fits:
            from catome_export.workflows.build import build_engine

            progress(f"building an engine for {config.model} at {resolution} px, batch {config.batch}, cut for "
                     f"feature-cache branch {config.feature_cache.branch} in {folder}")
            build_engine(config.model, weights=config.weights, out_dir=folder, resolution=resolution,
                         batch=config.batch, verify=False, force=True, feature_cache=config.feature_cache,
                         backend="ort" if config.device == "cpu" else "auto", progress=progress)
    return folder


def run_generation_bench(config: GenerationConfig, progress: Callable[[str], None] | None = None) -> "GenerationResult":
    """Time whole generations of every row (see the module docstring)."""
    from catome_export.backends.select import choose_backend
    from catome_export.engine.engine import Engine
    from catome_export.models import load_unet, model_info
    from catome_export.runtime import Runtime

    say = progress or (lambda line: logger.info("%s", line))
    device = torch.device(config.device)
    threads = config.threads or max(1, (torch.get_num_threads()))
    torch.set_num_threads(threads)
    resolution = config.resolution or model_info(config.model).default_resolution
    rows: list[GenRow] = []
    if "eager" in config.backends:
        rows.append(GenRow("eager"))
    if "eager-deepcache" in config.backends:
        rows.append(GenRow("eager-deepcache", cache=config.feature_cache))
    if "engine" in config.backends:
        rows += [GenRow("engine", f) for f in config.merge_fractions]
        rows += [GenRow("engine", f, config.feature_cache) for f in config.merge_fractions]
    notes: list[str] = []
    runtime = None
    unet = None
    helper = None
    if "engine" in config.backends:
        folder = _engine_for(config, resolution, say)
        engine = Engine.open(folder)
        manifest = engine.manifest
        manifest.check_shapes(config.batch, resolution // 8, resolution // 8)
        choice = choose_backend(config.engine_backend, engine_backend=manifest.engine_backend, device=device).name
        runtime = Runtime.load(engine, backend=choice, device=device, feature_cache=None,
                               backend_options={"intra_op_threads": threads} if choice == "ort-cpu" else None)
        unet_config = dict(manifest.model.unet_config)
    if any(r.backend.startswith("eager") for r in rows):
        unet = load_unet(config.model, weights=config.weights).to(device)
        unet_config = dict(unet.config)
    loop = _Loop(config, unet_config, resolution, device)
    if runtime is not None:
        runtime.set_timesteps(loop.scheduler.timesteps)
    if "eager-deepcache" in config.backends:
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError:
            raise CatomeError("the eager-deepcache row runs the DeepCache package's own helper: pip install "
                              "DeepCache==0.1.1, or leave eager-deepcache out of --backends") from None
        helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=loop.scheduler))
        helper.set_params(cache_interval=config.feature_cache.interval, cache_branch_id=config.feature_cache.branch)

    timings = {row: GenTiming(row) for row in rows}
    total = len(rows) * config.rounds
    done = 0
    started = time.perf_counter()
    try:
        for k in range(config.rounds):
            order = rows[k % len(rows):] + rows[:k % len(rows)]
            for row in order:
                timings[row].generations.append(_time_row(row, loop, unet, runtime, helper, config))
                done += 1
                spent = time.perf_counter() - started
                say(f"round {k + 1}/{config.rounds}: {row.label}: {timings[row].per_step()[-1]:.1f} ms/step "
                    f"({done}/{total} generations, about {spent / done * (total - done) / 60:.0f} min left)")
    finally:
        if runtime is not None:
            runtime.close()
    load = load_average()
    cpus = os.cpu_count() or 1
    if load is not None and load > cpus + 0.5:
        notes.append(f"the machine was busy (1-minute load average {load:.1f} on {cpus} CPUs)")
    return GenerationResult(config=config, resolution=resolution, timings=[timings[r] for r in rows],
                            device=device_info(device, threads), notes=notes, load_avg=load)


def _time_row(row: GenRow, loop: _Loop, unet: Any, runtime: Any, helper: Any,
              config: GenerationConfig) -> list[tuple[float, bool]]:
    if row.backend == "eager":
        return loop.run(unet, lambda: False)
    if row.backend == "eager-deepcache":
        helper.enable()
        try:
            calls = loop.run(unet, lambda: False)
        finally:
            helper.disable()
        # DDIM timesteps do not repeat: a call's position is its loop index, the first call the start
        return [(ms, not config.feature_cache.is_full(i)) for i, (ms, _) in enumerate(calls)]
    settings = replace(runtime.settings, threshold=None, ratio=None, merge_fraction=float(row.fraction or 0.0),
                       r_multiple=config.r_multiple)
    runtime.set_settings(settings, feature_cache=row.cache)
    runtime.reset()
    calls = loop.run(runtime.unet, lambda: runtime.history[-1].cached_features)
    runtime.release()
    return calls


@dataclass
class GenerationResult:
    config: GenerationConfig
    resolution: int
    timings: list[GenTiming]
    device: dict[str, Any]
    notes: list[str]
    load_avg: float | None = None

    def _find(self, backend: str, fraction: float | None, cached: bool) -> GenTiming | None:
        for t in self.timings:
            if t.row.backend == backend and t.row.fraction == fraction and (t.row.cache is not None) == cached:
                return t
        return None

    def ratios(self, t: GenTiming) -> tuple[float | None, float | None]:
        """(vs eager, vs the same row without feature caching)."""
        eager = self._find("eager", None, False)
        base = None
        if t.row.cache is not None:
            base = self._find("eager" if t.row.backend == "eager-deepcache" else t.row.backend, t.row.fraction, False)
        return (None if eager is None else eager.mean_ms / t.mean_ms,
                None if base is None else base.mean_ms / t.mean_ms)

    def markdown(self) -> str:
        c = self.config
        lines = [f"generation mode: {c.model} ({c.weights} weights), {self.resolution} px, batch {c.batch}, "
                 f"{c.steps} DDIM steps, {c.rounds} round(s), {c.feature_cache.describe()}", "",
                 "| row | mean ms/step | full call ms | cached call ms | cached calls | vs eager | vs no cache |",
                 "|---|---|---|---|---|---|---|"]
        for t in self.timings:
            vs_eager, vs_base = self.ratios(t)
            full, cached = t.kind_ms(False), t.kind_ms(True)
            lines.append(f"| {t.row.label} | {t.mean_ms:.1f} | {_num(full)} | {_num(cached)} | "
                         f"{t.cached_calls}/{len(t.generations[0])} | {_ratio(vs_eager)} | {_ratio(vs_base)} |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for t in self.timings:
            vs_eager, vs_base = self.ratios(t)
            rows.append({**t.to_dict(), "vs_eager": vs_eager, "vs_no_cache": vs_base})
        return {"mode": "generation", "config": self.config.to_dict(), "resolution": self.resolution,
                "device": self.device, "platform": platform.platform(), "load_avg_1min_end": self.load_avg,
                "notes": self.notes, "rows": rows}

    def save_json(self, path: str | Path) -> None:
        from catome_export.fsutil import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def _num(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.1f}"


def _ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"
