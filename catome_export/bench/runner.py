"""``run_bench``: every backend at every shape and merge setting, one row each.

Interleaved (the default): the torch U-Net is loaded; the unstaged graph is
exported from it and the engine built (or both reused from the work folder);
then every backend is loaded at once and all rows of a shape are timed in
rotated rounds (:func:`~catome_export.bench.measure.measure_interleaved`), so
a change in the machine's load hits every row alike. Memory: the torch U-Net,
the engine and the unstaged graph are resident together (about 11 GB for
SD 1.5 in fp32, plus one call's activations).

Sequential (``interleave=False``): one backend at a time, all its rows in a
row (eager rows on the torch U-Net, which is then freed; the engine's; the
unstaged graph's): less memory, but rows timed minutes apart see different
loads on a shared machine.

One at a time (``one_at_a_time=True``, with ``interleave``): backends are
loaded one after the other as in the sequential mode, but each backend's own
rows (its merge fractions) are timed in rotated rounds, so the ratios between
them come from one interleaved run; only rows of different backends are
minutes apart. For models whose backends do not fit in memory together
(SDXL in fp32 holds 10.3 GB of weights in torch and as much again in the engine).

Threads: ``torch.set_num_threads(N)`` for the eager backends and ONNX
Runtime's intra-op threads = N for the engine and the unstaged graph, the
same N for all (default: the physical cores). The 1-minute load average is
recorded before, per row and after, to show a run on a shared machine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from catome_export.bench import flops
from catome_export.bench.config import UNFUSED_BACKENDS, BenchConfig
from catome_export.bench.device import device_info, load_average, peak_rss_gib, physical_cores, release_memory, rss_gib
from catome_export.bench.measure import (
    BENCH_SCHEDULE, Inputs, Job, RowTiming, interleaved_calls, measure, measure_interleaved, measure_loop,
)
from catome_export.bench.report import BenchResult, derive_columns
from catome_export.bench.rows import build_row, describe, make_inputs, model_dtype, row_settings, settings_for
from catome_export.bench.targets import EagerMergeTarget, EagerTarget, EngineTarget, Target, UnstagedTarget
from catome_export.engine.engine import Engine
from catome_export.errors import CatomeError
from catome_export.merging import MergeSettings
from catome_export.progress import Progress

logger = logging.getLogger(__name__)

EAGER_BACKENDS = ("eager", "eager-tome", "eager-catome")
PROFILE_CALLS = 2
"""Profiled cached calls per configuration (at most ``repeats``): shares, not headline latencies."""

Named = tuple[str, Target, str]
"""(backend name, target, what it runs on)."""


class _Session:
    """State of one ``run_bench`` call."""

    def __init__(self, config: BenchConfig, progress: Callable[[str], None]) -> None:
        self.config = config
        self.progress = progress
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.device = torch.device(config.device)
        self.threads = config.threads or physical_cores()
        self.ort_options: dict[str, Any] = {"intra_op_threads": self.threads, **dict(config.ort_options),
                                            "fused_graphs": config.ort_optimize}
        self.unet_config: dict[str, Any] = {}
        self.base_settings = MergeSettings(threshold=None, merge_fraction=0.0, schedule=BENCH_SCHEDULE,
                                           r_multiple=config.r_multiple)
        """Merge options of every merging row: the defaults at the model's own merge level (set with the U-Net
        config, :meth:`set_unet_config`); replaced by the engine's when it was built with others."""
        self.engine_dir: Path | None = config.engine_dir
        self._engine: Engine | None = None
        self.graph: Path | None = None
        """The unstaged graph: standard ONNX."""
        self.fused_graph: Path | None = None
        """The unstaged graph with ONNX Runtime's fusions (``--ort-optimize on`` with engine-unstaged)."""
        self.eager_profile: dict[str, Any] | None = None

    def engine(self) -> Engine:
        """The engine in :attr:`engine_dir`, opened (its files checked) on first use and reused after."""
        if self.engine_dir is None:
            raise CatomeError("internal: the bench asked for its engine before it had one")
        if self._engine is None or self._engine.path != self.engine_dir:
            self._engine = Engine.open(self.engine_dir)
        return self._engine

    def set_unet_config(self, unet_config: dict[str, Any]) -> None:
        """The U-Net config of the rows, and its merge level: the highest-resolution transformer level (1 for
        SD 1.x/2.x, 2 for SDXL-style U-Nets, whose top level has no attention), as each model's registry entry
        and ``build`` take it."""
        from catome_export.models.registry import top_attention_level

        self.unet_config = unet_config
        self.base_settings = replace(self.base_settings, max_downsample=top_attention_level(unet_config))

    def profile_eager(self, unet: torch.nn.Module) -> None:
        """torch.profiler summary of the eager U-Net at the first resolution (with ``profile_dir``)."""
        cfg = self.config
        if cfg.profile_dir is None or "eager" not in cfg.backends:
            return
        from catome_export.bench.profile import profile_eager

        res = self.resolutions()[0]
        self.progress(f"profiling eager at {res}px ...")
        inputs = make_inputs(self.unet_config, res, cfg)
        self.eager_profile = profile_eager(unet, inputs, min(cfg.repeats, PROFILE_CALLS))

    def resolutions(self) -> list[int]:
        if self.config.resolutions:
            return list(self.config.resolutions)
        from catome_export.models import model_info

        return [model_info(self.config.model).default_resolution]

    # -- rows -------------------------------------------------------------------------
    def add_row(self, backend: str, resolution: int, inputs: Inputs, fraction: float | None,
                threshold: float | None, timing: RowTiming, detail: str) -> None:
        grids = flops.site_grids(self.unet_config, inputs.latent_hw, self.base_settings.max_downsample)
        row = build_row(backend, resolution, inputs, fraction, threshold, timing, grids, self.base_settings.stride,
                        detail, r_multiple=self.base_settings.r_multiple)
        row["load_average_1min"] = load_average()
        row["rss_gib"] = rss_gib()
        self.rows.append(row)
        what = describe(backend, resolution, self.config.batch, fraction, threshold)
        self.progress(f"  {what}: median {row['median_ms']:.1f} ms")

    def _loop(self, target: Target, backend: str, fraction: float | None, threshold: float | None,
              inputs: Inputs, timing: RowTiming) -> None:
        cfg = self.config
        if cfg.steps:
            loop_settings = settings_for(backend, self.base_settings, fraction, threshold, cfg.schedule)
            timing.loop = measure_loop(target, loop_settings, inputs, cfg.steps)
            target.suspend()

    def run_sequential(self, named: Named, resolution: int) -> None:
        """All rows of one target at one resolution, one after the other."""
        backend, target, detail = named
        cfg = self.config
        inputs = make_inputs(self.unet_config, resolution, cfg)
        rows = list(row_settings(cfg, backend))
        bar = Progress(len(rows), f"bench {backend} at {resolution}px", emit=self.progress)
        for fraction, threshold in rows:
            self.progress(f"timing {describe(backend, resolution, cfg.batch, fraction, threshold)} ...")
            settings = settings_for(backend, self.base_settings, fraction, threshold)
            timing = measure(target, settings, inputs, repeats=cfg.repeats, warmup=cfg.warmup,
                             checkpoint_repeats=cfg.checkpoint_calls)
            target.suspend()
            self._loop(target, backend, fraction, threshold, inputs, timing)
            self.add_row(backend, resolution, inputs, fraction, threshold, timing, detail)
            bar.update(note=describe(backend, resolution, cfg.batch, fraction, threshold))

    def run_interleaved(self, targets: list[Named], resolution: int) -> None:
        """All rows of all ``targets`` at one resolution, in rotated rounds."""
        cfg = self.config
        inputs = make_inputs(self.unet_config, resolution, cfg)
        jobs: list[Job] = []
        meta: list[tuple[str, str, float | None, float | None]] = []
        for backend, target, detail in targets:
            for fraction, threshold in row_settings(cfg, backend):
                jobs.append(Job(target, settings_for(backend, self.base_settings, fraction, threshold)))
                meta.append((backend, detail, fraction, threshold))
        self.progress(f"timing {len(jobs)} rows at {resolution}px batch {cfg.batch}: {cfg.warmup} warm-up call(s) "
                      f"each, then {cfg.repeats} interleaved rounds ...")
        bar = Progress(interleaved_calls(jobs, cfg.repeats, cfg.warmup), f"bench calls at {resolution}px",
                       emit=self.progress)
        timings = measure_interleaved(jobs, inputs, repeats=cfg.repeats, warmup=cfg.warmup,
                                      tick=lambda note, calls: bar.update(calls, note=note))
        for job, (backend, detail, fraction, threshold), timing in zip(jobs, meta, timings):
            self._loop(job.target, backend, fraction, threshold, inputs, timing)
            self.add_row(backend, resolution, inputs, fraction, threshold, timing, detail)

    # -- targets ----------------------------------------------------------------------
    def eager_target(self, backend: str, unet: torch.nn.Module) -> Named:
        target: Target = EagerTarget(unet) if backend == "eager" else EagerMergeTarget(unet, backend)
        return backend, target, f"torch {torch.__version__} on {self.device}"

    def engine_target(self, backend: str = "engine") -> Named:
        """``engine`` (fused graphs as ``--ort-optimize`` says) or ``engine-unfused`` (standard graphs)."""
        cfg = self.config
        options = dict(self.ort_options, fused_graphs=self.ort_options["fused_graphs"] and backend == "engine")
        target = EngineTarget.load(self.engine(), cfg.engine_backend, cfg.device, options, cfg.stage_timings)
        if options["fused_graphs"] and target.backend_name.startswith("ort") and not _has_fused_graphs(target):
            target.close()
            raise CatomeError(f"the engine {self.engine_dir} has no ONNX Runtime fused graphs (built with "
                              "--ort-optimize off, or before they existed): rebuild it with catome-export build "
                              "--backend ort, or bench with --ort-optimize off")
        self._adopt_engine_settings(target.base_settings)
        return backend, target, target.backend_name + _fusion_note(target.backend_name, options["fused_graphs"])

    def unstaged_target(self, backend: str = "engine-unstaged") -> Named:
        """``engine-unstaged`` (fused as ``--ort-optimize`` says) or ``engine-unstaged-unfused`` (standard graph)."""
        from catome_export.bench.unstaged import load_unstaged

        cfg = self.config
        assert self.graph is not None
        fused = backend == "engine-unstaged" and self.fused_graph is not None
        graph = self.fused_graph if fused and self.fused_graph is not None else self.graph
        dtype = "float16" if cfg.precision == "fp16" else "float32"
        runner, ort_backend = load_unstaged(graph, self.unet_config, dtype, cfg.device, self.ort_options)
        return backend, UnstagedTarget(runner, ort_backend), ort_backend.name + _fusion_note(ort_backend.name, fused)

    def make_target(self, backend: str) -> Named | None:
        """The engine-side target of ``backend`` where its engine or graph is ready, else None."""
        base = UNFUSED_BACKENDS.get(backend, backend)
        if base == "engine" and self.engine_dir is not None:
            return self.engine_target(backend)
        if base == "engine-unstaged" and self.graph is not None:
            return self.unstaged_target(backend)
        return None

    def _adopt_engine_settings(self, settings: MergeSettings) -> None:
        base = self.base_settings
        if (settings.max_downsample, settings.merge_crossattn, settings.merge_mlp, settings.stride) != \
                (base.max_downsample, base.merge_crossattn, base.merge_mlp, base.stride):
            self.notes.append("the engine was built with other merge options than the default "
                              f"(max_downsample {settings.max_downsample}, merge_crossattn "
                              f"{settings.merge_crossattn}, merge_mlp {settings.merge_mlp}, stride {settings.stride}); "
                              "rows timed after loading it use them")
            self.base_settings = replace(settings, threshold=None, ratio=None, merge_fraction=0.0,
                                         schedule=BENCH_SCHEDULE, r_multiple=base.r_multiple)


def _fusion_note(backend_name: str, fused: bool) -> str:
    """What an ONNX Runtime row ran: ONNX Runtime's fused graphs or the standard ones."""
    if not backend_name.startswith("ort"):
        return ""
    return ", ORT-fused graphs" if fused else ", standard graphs"


def _has_fused_graphs(target: EngineTarget) -> bool:
    stages = target.runtime.manifest.stages
    return bool(stages) and all(s.ort_optimized is not None for s in stages)


def _check_unstaged_resolutions(config: BenchConfig, resolutions: list[int]) -> None:
    bad = [r for r in resolutions if r % 64]
    if bad and ("engine-unstaged" in config.backends or "engine-unstaged-unfused" in config.backends):
        raise CatomeError(f"engine-unstaged needs resolutions divisible by 64 (the whole-U-Net graph is traced for "
                          f"latents divisible by 8), got {bad}: pick other resolutions or leave engine-unstaged out")


def _load_unet(session: _Session) -> torch.nn.Module | None:
    """The torch U-Net, where an eager row, the unstaged export or an engine build needs it."""
    from catome_export.models import load_unet

    config = session.config
    wanted = {UNFUSED_BACKENDS.get(b, b) for b in config.backends}
    needs = any(b in EAGER_BACKENDS for b in config.backends) or "engine-unstaged" in wanted or \
        ("engine" in wanted and config.engine_dir is None)
    if not needs:
        if session.engine_dir is not None:
            session.set_unet_config(_engine_unet_config(session.engine_dir))
        return None
    session.progress(f"loading {config.model} ({config.weights} weights, {config.precision}) ...")
    unet = load_unet(config.model, config.weights, model_dtype(config)).to(config.device)
    session.set_unet_config(dict(unet.config))
    return unet


def _prepare(session: _Session, unet: torch.nn.Module, resolutions: list[int]) -> None:
    """Export the unstaged graph and build the engine where asked (both reused from the work folder)."""
    from catome_export.models import weights_hash

    config, say = session.config, session.progress
    wanted = {UNFUSED_BACKENDS.get(b, b) for b in config.backends}
    if "engine" not in wanted and "engine-unstaged" not in wanted:
        return
    digest = weights_hash(unet)
    if "engine" in wanted and session.engine_dir is not None:
        _compare_weights(session, session.engine_dir, digest)
    if "engine-unstaged" in wanted:
        from catome_export.bench.engine import work_name
        from catome_export.bench.unstaged import export_unstaged, fused_unstaged

        folder = config.workdir / work_name(config) / "unstaged"
        say(f"unstaged graph in {folder} ...")
        session.graph = export_unstaged(unet, folder, digest)
        if config.ort_optimize and "engine-unstaged" in config.backends:
            say("ONNX Runtime's fusions on the unstaged graph ...")
            session.fused_graph = fused_unstaged(session.graph)
    if "engine" in wanted and session.engine_dir is None:
        from catome_export.bench.engine import ensure_engine

        session.engine_dir = ensure_engine(config, resolutions, digest, say)


def _run_sequential(session: _Session, resolutions: list[int]) -> None:
    """One backend at a time (see the module docstring)."""
    config = session.config
    unet = _load_unet(session)
    if unet is not None:
        for backend in config.backends:
            if backend in EAGER_BACKENDS:
                named = session.eager_target(backend, unet)
                try:
                    for res in resolutions:
                        _time_rows(session, named, res)
                finally:
                    named[1].close()
        session.profile_eager(unet)
        _prepare(session, unet, resolutions)
        del unet
        release_memory()
    for backend in config.backends:
        if backend in EAGER_BACKENDS:
            continue
        loaded = session.make_target(backend)
        if loaded is None:
            continue
        try:
            for res in resolutions:
                _time_rows(session, loaded, res)
        finally:
            loaded[1].close()
            release_memory()


def _time_rows(session: _Session, named: Named, resolution: int) -> None:
    """One backend's rows: in rotated rounds (one at a time) or one after the other (sequential)."""
    if session.config.interleave:
        session.run_interleaved([named], resolution)
    else:
        session.run_sequential(named, resolution)


def _run_interleaved(session: _Session, resolutions: list[int]) -> None:
    """Every backend loaded at once, rows timed in rotated rounds (see the module docstring)."""
    config = session.config
    unet = _load_unet(session)
    targets: list[Named] = []
    try:
        if unet is not None:
            _prepare(session, unet, resolutions)
        for backend in config.backends:
            if backend in EAGER_BACKENDS and unet is not None:
                targets.append(session.eager_target(backend, unet))
            elif backend not in EAGER_BACKENDS:
                named = session.make_target(backend)
                if named is not None:
                    targets.append(named)
        for res in resolutions:
            session.run_interleaved(targets, res)
        for _, target, _ in targets:
            target.suspend()
        if unet is not None:
            session.profile_eager(unet)
    finally:
        for _, target, _ in targets:
            target.close()
        targets.clear()
        del unet
        release_memory()


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run the benchmark ``config`` describes; ``progress`` gets one line per step (default: the log)."""
    say = progress or logger.info
    session = _Session(config, say)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise CatomeError("--device cuda needs a CUDA device and a CUDA build of torch; none is present here")
    resolutions = session.resolutions()
    _check_unstaged_resolutions(config, resolutions)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(session.threads)
    load_before = load_average()
    started = time.perf_counter()
    try:
        if config.interleave and not config.one_at_a_time:
            _run_interleaved(session, resolutions)
        else:
            _run_sequential(session, resolutions)
        profile = _profile(session) if config.profile_dir is not None else None
    finally:
        torch.set_num_threads(previous_threads)
    load_after = load_average()
    device = device_info(session.device, session.threads)
    device.update({"load_average_1min_before": load_before, "load_average_1min_after": load_after,
                   "peak_rss_gib": peak_rss_gib()})
    loads = [v for v in (load_before, load_after, *(r.get("load_average_1min") for r in session.rows))
             if v is not None]
    shared = any(v > 1.25 * session.threads for v in loads)
    device["shared_machine"] = shared
    if shared:
        session.notes.append(f"the 1-minute load average reached {max(loads)} (before {load_before}, after "
                             f"{load_after}) with {session.threads} threads in use: other work shared the CPU")
    rows = derive_columns(session.rows, session.unet_config, config.text_len, session.base_settings)
    engine_dir = session.engine_dir
    return BenchResult(
        config=config.to_dict() | {"engine_dir": None if engine_dir is None else str(engine_dir)},
        device=device, rows=rows, notes=session.notes,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - started, 1), profile=profile,
    )


def _profile(session: _Session) -> dict[str, Any] | None:
    """Per-stage, per-op and per-kind-of-work profiles at the first resolution (see :mod:`.profile`)."""
    from catome_export.bench.profile import profile_engine, profile_unstaged

    cfg = session.config
    out_dir = cfg.profile_dir
    assert out_dir is not None
    res = session.resolutions()[0]
    inputs = make_inputs(session.unet_config, res, cfg)
    calls = min(cfg.repeats, PROFILE_CALLS)
    result: dict[str, Any] = {"resolution": res, "batch": cfg.batch, "calls": calls, "folder": str(out_dir)}
    if session.eager_profile is not None:
        result["eager"] = session.eager_profile
    if "engine" in cfg.backends and session.engine_dir is not None:
        session.progress(f"profiling the engine's stages at {res}px ...")
        fractions = list(cfg.merge_fractions) or [0.0]
        result["engine"] = profile_engine(session.engine(), inputs, fractions, calls, session.ort_options, out_dir)
        release_memory()
    if session.graph is not None:
        session.progress(f"profiling the unstaged graph at {res}px ...")
        graph = session.fused_graph if session.fused_graph is not None else session.graph
        result["unstaged"] = profile_unstaged(graph, inputs, calls, session.ort_options, out_dir)
        release_memory()
    return result


def _compare_weights(session: _Session, engine_dir: Path, digest: str) -> None:
    from catome_export.engine.manifest import Manifest

    built = Manifest.load(engine_dir, check_files=False).model
    if built.weights_hash != digest:
        session.notes.append(f"the engine in {engine_dir} was built from other weights ({built.id}, "
                             f"{built.weights}) than the eager rows ({session.config.model}, "
                             f"{session.config.weights}): the speed comparison holds only for the same architecture")


def _engine_unet_config(engine_dir: Path) -> dict[str, Any]:
    from catome_export.engine.manifest import Manifest

    manifest = Manifest.load(engine_dir, check_files=False)
    cfg = manifest.model.unet_config
    if not cfg:
        raise CatomeError(f"the manifest in {engine_dir} has no unet_config: rebuild the engine")
    return dict(cfg)
