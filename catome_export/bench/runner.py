"""``run_bench``: every backend at every shape and merge setting, one row each.

Order of work (memory: an SD 1.5 U-Net is 3.4 GB in fp32, so at most one
copy of it runs at a time besides the one being built from):

1. the torch U-Net is loaded once; the eager rows run on it;
2. the engine is built from it when none is given (or reused from the work
   folder), and the unstaged graph exported from it;
3. the torch U-Net is freed; the engine rows run, then the unstaged rows.

Threads: ``torch.set_num_threads(N)`` for the eager backends and ONNX
Runtime's intra-op threads = N for the engine and the unstaged graph, the
same N for all (default: the physical cores). The 1-minute load average is
recorded before and after, to show a run on a shared machine.
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
from catome_export.bench.config import MERGING_BACKENDS, BenchConfig
from catome_export.bench.device import device_info, load_average, peak_rss_gib, physical_cores, release_memory, rss_gib
from catome_export.bench.measure import BENCH_SCHEDULE, TIMESTEP, Inputs, RowTiming, measure, measure_loop
from catome_export.bench.report import BenchResult, derive_columns
from catome_export.bench.targets import EagerMergeTarget, EagerTarget, EngineTarget, Target, UnstagedTarget
from catome_export.errors import CatomeError
from catome_export.merging import MergeSettings, parse_schedule

logger = logging.getLogger(__name__)

EAGER_BACKENDS = ("eager", "eager-tome", "eager-catome")
PROFILE_CALLS = 2
"""Profiled cached calls per configuration (at most ``repeats``): shares, not headline latencies."""


def _dtype(config: BenchConfig) -> torch.dtype:
    return torch.float16 if config.precision == "fp16" else torch.float32


def make_inputs(unet_config: Any, resolution: int, config: BenchConfig) -> Inputs:
    """Seeded latents (smooth or noise), a constant timestep and random text embeddings at one resolution."""
    from catome_export.analysis.inputs import make_latents

    cfg = dict(unet_config)
    lat = resolution // 8
    device = torch.device(config.device)
    dtype = _dtype(config)
    sample = make_latents((config.batch, int(cfg["in_channels"]), lat, lat), config.latents, config.seed,
                          device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(config.seed + 1)
    text = torch.randn(config.batch, config.text_len, int(cfg["cross_attention_dim"]), generator=gen)
    timestep = torch.full((config.batch,), TIMESTEP, dtype=torch.float32, device=device)
    return Inputs(sample, timestep, text.to(device=device, dtype=dtype))


def _settings_for(backend: str, base: MergeSettings, fraction: float | None, threshold: float | None,
                  loop_schedule: str | None = None) -> MergeSettings | None:
    """Merge settings of a row: forced fraction or threshold; ToMe matches at every step."""
    if backend not in MERGING_BACKENDS:
        return None
    if backend == "eager-tome":
        schedule = parse_schedule("every_step")
    elif loop_schedule is not None:
        schedule = parse_schedule(loop_schedule)
    else:
        schedule = BENCH_SCHEDULE
    if fraction is not None:
        return replace(base, threshold=None, ratio=None, merge_fraction=float(fraction), schedule=schedule)
    return replace(base, threshold=float(threshold), ratio=None, merge_fraction=None, schedule=schedule)  # type: ignore[arg-type]


def _row_settings(config: BenchConfig, backend: str) -> list[tuple[float | None, float | None]]:
    """(fraction, threshold) pairs of a backend's rows."""
    if backend not in MERGING_BACKENDS:
        return [(0.0, None)]
    pairs: list[tuple[float | None, float | None]] = [(f, None) for f in config.merge_fractions]
    if config.threshold is not None:
        pairs.append((None, config.threshold))
    return pairs


def _row(backend: str, resolution: int, inputs: Inputs, fraction: float | None, threshold: float | None,
         timing: RowTiming, grids: list[tuple[int, int]], stride: tuple[int, int], backend_detail: str) -> dict:
    cached = timing.cached.summary
    assert cached is not None
    num_src = {i: h * w - (h // stride[0]) * (w // stride[1]) for i, (h, w) in enumerate(grids)}
    merged = {int(k): int(v) for k, v in sorted(timing.merged.items())}
    realised = (sum(merged.values()) / sum(num_src[k] for k in merged)) if merged else 0.0
    row: dict[str, Any] = {
        "backend": backend, "runs_on": backend_detail, "resolution": resolution,
        "latent": list(inputs.latent_hw), "batch": inputs.batch,
        "merge_fraction": round(realised if fraction is None else fraction, 4),
        "requested_merge_fraction": fraction, "threshold": threshold,
        "merged": {str(k): v for k, v in merged.items()},
        **cached.to_dict(), "repeats": cached.count,
    }
    ck = timing.checkpoint.summary
    row.update({"checkpoint_median_ms": round(ck.median_ms, 3) if ck else None,
                "checkpoint_min_ms": round(ck.min_ms, 3) if ck else None,
                "checkpoint_repeats": ck.count if ck else 0})
    ctrl_cached = timing.cached.controller_ms() if backend in MERGING_BACKENDS else None
    ctrl_ck = timing.checkpoint.controller_ms() if ck else None
    row["controller"] = {
        "cached_ms": None if ctrl_cached is None else round(ctrl_cached, 3),
        "cached_share": None if ctrl_cached is None else round(ctrl_cached / cached.median_ms, 5),
        "checkpoint_ms": None if ctrl_ck is None else round(ctrl_ck, 3),
        "checkpoint_share": None if ctrl_ck is None or not ck else round(ctrl_ck / ck.median_ms, 5),
    }
    outside = timing.cached.outside_stages_ms()
    if outside is not None:
        out_ck = timing.checkpoint.outside_stages_ms()
        row["controller"].update({
            "outside_stages_cached_ms": round(outside, 3),
            "outside_stages_cached_share": round(outside / cached.median_ms, 5),
            "outside_stages_checkpoint_ms": None if out_ck is None else round(out_ck, 3),
            "outside_stages_checkpoint_share": None if out_ck is None or not ck else round(out_ck / ck.median_ms, 5),
        })
    stages = timing.cached.stage_ms()
    if stages is not None:
        row["stage_ms"] = [round(s, 3) for s in stages]
        ck_stages = timing.checkpoint.stage_ms()
        row["checkpoint_stage_ms"] = None if ck_stages is None else [round(s, 3) for s in ck_stages]
    if timing.loop is not None:
        row["loop"] = timing.loop
    return row


class _Session:
    """State of one ``run_bench`` call."""

    def __init__(self, config: BenchConfig, progress: Callable[[str], None]) -> None:
        self.config = config
        self.progress = progress
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.device = torch.device(config.device)
        self.threads = config.threads or physical_cores()
        self.ort_options: dict[str, Any] = {"intra_op_threads": self.threads, **dict(config.ort_options)}
        self.unet_config: dict[str, Any] = {}
        self.base_settings = MergeSettings(threshold=None, merge_fraction=0.0, schedule=BENCH_SCHEDULE)

    def resolutions(self) -> list[int]:
        if self.config.resolutions:
            return list(self.config.resolutions)
        from catome_export.models import model_info

        return [model_info(self.config.model).default_resolution]

    def run_target(self, target: Target, backend: str, resolution: int, detail: str) -> None:
        cfg = self.config
        inputs = make_inputs(self.unet_config, resolution, cfg)
        grids = flops.site_grids(self.unet_config, inputs.latent_hw, self.base_settings.max_downsample)
        for fraction, threshold in _row_settings(cfg, backend):
            what = f"{backend} {resolution}px batch {cfg.batch}" + \
                (f" merge {fraction:g}" if fraction is not None and backend in MERGING_BACKENDS else "") + \
                (f" threshold {threshold:g}" if threshold is not None else "")
            self.progress(f"timing {what} ...")
            settings = _settings_for(backend, self.base_settings, fraction, threshold)
            timing = measure(target, settings, inputs, repeats=cfg.repeats, warmup=cfg.warmup,
                             checkpoint_repeats=cfg.checkpoint_calls)
            if cfg.steps:
                loop_settings = _settings_for(backend, self.base_settings, fraction, threshold, cfg.schedule)
                timing.loop = measure_loop(target, loop_settings, inputs, cfg.steps)
            row = _row(backend, resolution, inputs, fraction, threshold, timing, grids, self.base_settings.stride,
                       detail)
            row["load_average_1min"] = load_average()
            row["rss_gib"] = rss_gib()
            self.rows.append(row)
            self.progress(f"  {what}: median {row['median_ms']:.1f} ms")

    # -- phases -----------------------------------------------------------------------
    def eager_phase(self, unet: torch.nn.Module) -> None:
        for backend in self.config.backends:
            if backend not in EAGER_BACKENDS:
                continue
            target: Target = EagerTarget(unet) if backend == "eager" else EagerMergeTarget(unet, backend)
            try:
                for res in self.resolutions():
                    self.run_target(target, backend, res, f"torch {torch.__version__} on {self.device}")
            finally:
                target.close()

    def engine_phase(self, engine_dir: Path) -> None:
        cfg = self.config
        target = EngineTarget.load(engine_dir, cfg.engine_backend, cfg.device, self.ort_options, cfg.stage_timings)
        try:
            self._adopt_engine_settings(target.base_settings)
            for res in self.resolutions():
                self.run_target(target, "engine", res, target.backend_name)
        finally:
            target.close()

    def _adopt_engine_settings(self, settings: MergeSettings) -> None:
        base = self.base_settings
        if (settings.max_downsample, settings.merge_crossattn, settings.merge_mlp, settings.stride) != \
                (base.max_downsample, base.merge_crossattn, base.merge_mlp, base.stride):
            self.notes.append("the engine was built with other merge options than the eager rows "
                              f"(max_downsample {settings.max_downsample}, merge_crossattn "
                              f"{settings.merge_crossattn}, merge_mlp {settings.merge_mlp}, stride {settings.stride})")
            self.base_settings = replace(settings, threshold=None, ratio=None, merge_fraction=0.0,
                                         schedule=BENCH_SCHEDULE)

    def unstaged_phase(self, graph: Path) -> None:
        from catome_export.bench.unstaged import load_unstaged

        cfg = self.config
        runner, backend = load_unstaged(graph, self.unet_config, "float16" if cfg.precision == "fp16" else "float32",
                                        cfg.device, self.ort_options)
        target = UnstagedTarget(runner, backend)
        try:
            for res in self.resolutions():
                self.run_target(target, "engine-unstaged", res, backend.name)
        finally:
            target.close()


def _check_unstaged_resolutions(config: BenchConfig, resolutions: list[int]) -> None:
    bad = [r for r in resolutions if r % 64]
    if "engine-unstaged" in config.backends and bad:
        raise CatomeError(f"engine-unstaged needs resolutions divisible by 64 (the whole-U-Net graph is traced for "
                          f"latents divisible by 8), got {bad}: pick other resolutions or leave engine-unstaged out")


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run the benchmark ``config`` describes; ``progress`` gets one line per step (default: the log)."""
    from catome_export.models import load_unet, weights_hash

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
    engine_dir = config.engine_dir
    graph: Path | None = None
    try:
        needs_unet = any(b in EAGER_BACKENDS for b in config.backends) or \
            ("engine" in config.backends and engine_dir is None) or "engine-unstaged" in config.backends
        if needs_unet:
            say(f"loading {config.model} ({config.weights} weights, {config.precision}) ...")
            unet = load_unet(config.model, config.weights, _dtype(config)).to(config.device)
            session.unet_config = dict(unet.config)
            session.eager_phase(unet)
            digest = weights_hash(unet) if "engine" in config.backends or "engine-unstaged" in config.backends \
                else None
            if "engine" in config.backends and engine_dir is not None and digest is not None:
                _compare_weights(session, engine_dir, digest)
            if "engine-unstaged" in config.backends:
                from catome_export.bench.engine import work_name
                from catome_export.bench.unstaged import export_unstaged

                folder = config.workdir / work_name(config) / "unstaged"
                say(f"unstaged graph in {folder} ...")
                graph = export_unstaged(unet, folder, digest)
            del unet
            release_memory()
            if "engine" in config.backends and engine_dir is None:
                from catome_export.bench.engine import ensure_engine

                engine_dir = ensure_engine(config, resolutions, digest or "", say)
        if "engine" in config.backends and engine_dir is not None:
            if not session.unet_config:
                session.unet_config = _engine_unet_config(engine_dir)
            session.engine_phase(engine_dir)
            release_memory()
        if graph is not None:
            session.unstaged_phase(graph)
            release_memory()
        profile = _profile(session, engine_dir, graph) if config.ort_profile is not None else None
    finally:
        torch.set_num_threads(previous_threads)
    load_after = load_average()
    device = device_info(session.device, session.threads)
    device.update({"load_average_1min_before": load_before, "load_average_1min_after": load_after,
                   "peak_rss_gib": peak_rss_gib()})
    shared = any(v is not None and v > 1.25 * session.threads for v in (load_before, load_after))
    device["shared_machine"] = shared
    if shared:
        session.notes.append(f"the 1-minute load average ({load_before} before, {load_after} after) exceeded the "
                             f"{session.threads} threads used: other work shared the CPU during the run")
    rows = derive_columns(session.rows, session.unet_config, config.text_len, session.base_settings)
    return BenchResult(
        config=config.to_dict() | {"engine_dir": None if engine_dir is None else str(engine_dir)},
        device=device, rows=rows, notes=session.notes,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - started, 1), profile=profile,
    )


def _profile(session: _Session, engine_dir: Path | None, graph: Path | None) -> dict[str, Any] | None:
    """Per-stage and per-op ONNX Runtime profiles at the first resolution (see :mod:`.profile`)."""
    from catome_export.bench.profile import profile_engine, profile_unstaged

    cfg = session.config
    out_dir = cfg.ort_profile
    assert out_dir is not None
    res = session.resolutions()[0]
    inputs = make_inputs(session.unet_config, res, cfg)
    calls = min(cfg.repeats, PROFILE_CALLS)
    result: dict[str, Any] = {"resolution": res, "batch": cfg.batch, "calls": calls, "folder": str(out_dir)}
    if "engine" in cfg.backends and engine_dir is not None:
        session.progress(f"profiling the engine's stages at {res}px ...")
        fractions = list(cfg.merge_fractions) or [0.0]
        result["engine"] = profile_engine(engine_dir, inputs, fractions, calls, session.ort_options, out_dir)
    if graph is not None:
        session.progress(f"profiling the unstaged graph at {res}px ...")
        result["unstaged"] = profile_unstaged(graph, inputs, calls, session.ort_options, out_dir)
    return result


def _compare_weights(session: _Session, engine_dir: Path, digest: str) -> None:
    from catome_export.export.manifest import Manifest

    built = Manifest.load(engine_dir, check_files=False).model
    if built.get("weights_hash") != digest:
        session.notes.append(f"the engine in {engine_dir} was built from other weights ({built.get('id')}, "
                             f"{built.get('weights')}) than the eager rows ({session.config.model}, "
                             f"{session.config.weights}): the speed comparison holds only for the same architecture")


def _engine_unet_config(engine_dir: Path) -> dict[str, Any]:
    from catome_export.export.manifest import Manifest

    manifest = Manifest.load(engine_dir)
    cfg = manifest.model.get("unet_config") or {}
    if not cfg:
        raise CatomeError(f"the manifest in {engine_dir} has no unet_config: rebuild the engine")
    return dict(cfg)
