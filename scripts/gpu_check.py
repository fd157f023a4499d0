"""GPU check: eager fp16 SD 1.5 and the torch-backend stage chain, timed call by call, into one JSON.

Run by ``scripts/gpu_check.sh`` on a machine with one NVIDIA GPU and PyTorch
with CUDA (no TensorRT, no onnxruntime-gpu needed). What it measures, each
part time-boxed and recorded as failed (with its error) rather than stopping
the rest:

- ``eager/<res>/<variant>``: the diffusers U-Net of SD 1.5 with seeded random
  weights (``load_unet("sd15", "random")``), fp16, SDPA attention
  (``AttnProcessor2_0``), batch 2 (one image with classifier-free guidance),
  one generation of ``--steps`` U-Net calls at each resolution. Variants:
  ``plain`` (no merging); ``catome-forced`` (``apply_catome`` with a forced
  merge of half the src tokens at every site, checkpoints config3: merging
  happens whatever the weights); ``catome-t0.7-smooth`` (``apply_catome`` at
  its defaults, threshold 0.7, config3, on a smooth latent: the adaptive
  merge that random weights give on self-similar input).
- ``chain/<res>/<variant>/<graphs>``: the same U-Net cut into stages and run
  by the runtime on the torch stage backend (no export), forced half merge
  or nothing merged (threshold 1: every site feeds the r = 0 self-merge), with
  and without CUDA graphs (cached steps replayed as one captured graph).

The latent is the same every call (only the timestep moves), so the merge
counts and the timings do not drift with what random weights would make of
a real denoising loop. Every call is bracketed by ``torch.cuda.synchronize``;
each call's milliseconds are recorded, with the step's merge counts, and the
median over the calls of a generation (all of them, and the cached steps
alone). Nothing here invents a figure: a part that did not run says why.

``--device cpu --model tiny`` (hidden options) run the same code on the CPU
with the tiny model, which is how the tests check the JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger("gpu_check")

DEFAULT_OUT = Path("benchmarks/results/gpu_check.json")
NO_CUDA_EXIT = 2
BATCH = 2
TEXT_LEN = 77
FORCED_FRACTION = 0.5
SCHEDULE = "config3"
FEATURE_CACHE = (3, 0)
"""Interval and branch of the generation-mode rows (DeepCache's cache_interval, cache_branch_id)."""


@dataclass
class Deadline:
    """A wall-clock budget: ``left()`` seconds remain; ``share(n)`` splits what is left among n parts."""

    end: float

    @classmethod
    def after(cls, seconds: float) -> "Deadline":
        return cls(time.perf_counter() + seconds)

    def left(self) -> float:
        return self.end - time.perf_counter()

    def share(self, parts: int) -> "Deadline":
        return Deadline(time.perf_counter() + max(0.0, self.left()) / max(1, parts))


@dataclass
class Report:
    """The JSON document, written again after every part so a killed run still leaves what it measured."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.data, fh, indent=1)
                fh.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="Time eager fp16 SD 1.5 (random weights, SDPA) with and without CA-ToMe, and the torch-backend "
                    "stage chain with and without CUDA graphs, on one CUDA GPU; write one JSON.")
    p.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT,
                   help=f"JSON file to write (default {DEFAULT_OUT})")
    p.add_argument("--resolutions", default="512,1024",
                   help="image sizes in pixels, comma-separated, each a multiple of 8 (default 512,1024)")
    p.add_argument("--steps", type=int, default=20, help="U-Net calls per timed generation (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before each timed generation (default 2)")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="wall-clock budget of the whole run in seconds; every part gets a share (default 200)")
    p.add_argument("--pytest-log", type=Path, default=None, help="output of `pytest -m gpu` to embed (its tail)")
    p.add_argument("--pytest-rc", type=int, default=None, help="exit code of `pytest -m gpu`")
    p.add_argument("--install-log", type=Path, default=None, help="output of the install step to embed (its tail)")
    p.add_argument("--install-rc", type=int, default=None, help="exit code of the install step")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    p.add_argument("--model", default="sd15", choices=("sd15", "tiny"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.resolutions = [int(v) for v in str(args.resolutions).split(",") if v.strip()]
    except ValueError:
        p.error(f"--resolutions must be integers separated by commas, got {args.resolutions!r}")
    if not args.resolutions or any(r < 8 or r % 8 for r in args.resolutions):
        p.error(f"--resolutions must be positive multiples of 8, got {args.resolutions}")
    if args.steps < 2:
        p.error("--steps must be at least 2 (a first call that matches and at least one cached call)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    return args


# -- device description ---------------------------------------------------------------------------------------------

def _run_text(cmd: list[str], timeout: float = 20.0) -> dict[str, Any]:
    exe = shutil.which(cmd[0])
    if exe is None:
        return {"present": False}
    try:
        done = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"present": True, "error": f"{type(exc).__name__}: {exc}"}
    return {"present": True, "rc": done.returncode, "output": (done.stdout + done.stderr).strip()}


def describe_device(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
        "platform": platform.platform(), "host_cpus": os.cpu_count(), "device": device,
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    from catome_export import __version__

    info["catome_export"] = __version__
    if device == "cuda":
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(
            name=torch.cuda.get_device_name(idx), capability=list(torch.cuda.get_device_capability(idx)),
            total_memory_gib=round(props.total_memory / 2**30, 2), multiprocessors=props.multi_processor_count,
            device_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version(),
        )
        query = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                           "--format=csv,noheader"])
        info["nvidia_smi_query"] = query
        if query.get("rc") == 0 and query.get("output"):
            fields = [f.strip() for f in query["output"].splitlines()[0].split(",")]
            info["driver"] = fields[1] if len(fields) > 1 else None
        info["nvidia_smi"] = _run_text(["nvidia-smi"])
    else:
        info.update(name=platform.processor() or platform.machine(), torch_threads=torch.get_num_threads())
    return info


# -- timing ---------------------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def summarise(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over every timed call; where calls say whether a site matched, also over matched and cached calls."""
    def med(rows: list[dict[str, Any]]) -> float | None:
        return round(statistics.median(r["ms"] for r in rows), 3) if rows else None

    out: dict[str, Any] = {"calls": len(calls), "median_ms": med(calls),
                           "min_ms": min((c["ms"] for c in calls), default=None),
                           "mean_ms": round(statistics.fmean(c["ms"] for c in calls), 3) if calls else None}
    if any("cached_features" in c for c in calls):
        out["median_full_ms"] = med([c for c in calls if not c.get("cached_features")])
        out["median_feature_cached_ms"] = med([c for c in calls if c.get("cached_features")])
    if any("matched" in c for c in calls):
        out["median_matched_ms"] = med([c for c in calls if c.get("matched")])
        out["median_cached_ms"] = med([c for c in calls if "matched" in c and not c["matched"]])
    return out


def timed_generation(call: Callable[[int], dict[str, Any]], steps: int, deadline: Deadline, device: str
                     ) -> tuple[list[dict[str, Any]], bool]:
    """Call ``call(i)`` for i in 0..steps-1, each bracketed by a device sync; stop early past ``deadline``.

    ``call`` returns what to record besides the time (merge counts...).
    Returns (records, truncated).
    """
    records: list[dict[str, Any]] = []
    for i in range(steps):
        if records and deadline.left() <= 0:
            return records, True
        _sync(device)
        t0 = time.perf_counter()
        extra = call(i)
        _sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        records.append({"index": i, "ms": round(ms, 3), **extra})
    return records, False


# -- the model and its inputs ---------------------------------------------------------------------------------------

@dataclass
class Setup:
    """The U-Net (on the device, SDPA attention), its merge sites and fixed inputs per resolution."""

    unet: Any
    sites: list[Any]
    device: str
    dtype: Any
    timesteps: list[float]
    load_s: float

    def inputs(self, resolution: int, smooth: bool) -> tuple[Any, Any]:
        import torch

        from catome_export.latents import make_latents

        lh = lw = resolution // 8
        gen = torch.Generator().manual_seed(resolution)
        if smooth:
            latent = make_latents((BATCH, int(self.unet.config.in_channels), lh, lw), "smooth", resolution)
        else:
            latent = torch.randn(BATCH, int(self.unet.config.in_channels), lh, lw, generator=gen)
        ehs = torch.randn(BATCH, TEXT_LEN, int(self.unet.config.cross_attention_dim), generator=gen)
        return latent.to(self.device, self.dtype), ehs.to(self.device, self.dtype)


def load_setup(model: str, device: str, steps: int) -> Setup:
    import torch
    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from catome_export.models import find_merge_sites, load_unet

    t0 = time.perf_counter()
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = load_unet(model, "random", dtype=dtype).to(device)
    unet.set_attn_processor(AttnProcessor2_0())  # SDPA
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    return Setup(unet, find_merge_sites(unet), device, dtype, timesteps, round(time.perf_counter() - t0, 2))


def _settings(variant: str) -> Any:
    from catome_export.merging import MergeSettings, parse_schedule

    schedule = parse_schedule(SCHEDULE)
    if variant == "catome-forced":
        return MergeSettings(threshold=None, merge_fraction=FORCED_FRACTION, schedule=schedule)
    if variant == "catome-t0.7-smooth":
        return MergeSettings(threshold=0.7, schedule=schedule)
    if variant == "nothing-merged":
        return MergeSettings(threshold=1.0, schedule=schedule)
    raise ValueError(variant)


def eager_part(setup: Setup, resolution: int, variant: str, steps: int, warmup: int,
               deadline: Deadline, cache: bool = False) -> dict[str, Any]:
    import torch

    from catome_export import apply_catome
    from catome_export.eager import apply_deepcache

    latent, ehs = setup.inputs(resolution, smooth=variant == "catome-t0.7-smooth")
    handle = apply_catome(setup.unet, settings=_settings(variant)) if variant != "plain" else None
    caching = (apply_deepcache(setup.unet, FEATURE_CACHE[0], FEATURE_CACHE[1], timesteps=setup.timesteps)
               if cache else None)
    try:
        def call(i: int) -> dict[str, Any]:
            t = torch.full((BATCH,), setup.timesteps[i % len(setup.timesteps)], device=setup.device)
            with torch.no_grad():
                setup.unet(latent, t, encoder_hidden_states=ehs, return_dict=False)
            if handle is None:
                return {}
            last = handle.history[-1]
            return {"matched": any(last.matched.values()), "merged": {str(k): v for k, v in last.merged.items()}}

        for h in (handle, caching):
            if h is not None:
                h.reset()
        timed_generation(call, warmup, deadline, setup.device)  # warm-up: kernels, allocator, autotuning
        for h in (handle, caching):
            if h is not None:
                h.reset()
        calls, truncated = timed_generation(call, steps, deadline, setup.device)
        if caching is not None:
            for rec, kind in zip(calls, caching.history):
                rec["cached_features"] = not kind.full
    finally:
        if caching is not None:
            caching.remove()
        if handle is not None:
            handle.remove()
    return {"calls": calls, "truncated": truncated, "summary": summarise(calls),
            "merge": "none" if handle is None else _merge_note(variant),
            "feature_cache": _cache_note() if cache else None}


def _cache_note() -> str:
    return (f"DeepCache semantics, interval {FEATURE_CACHE[0]}, branch {FEATURE_CACHE[1]}: mean ms per step over the "
            "whole DDIM schedule is the generation figure (summary.mean_ms)")


def _merge_note(variant: str) -> str:
    if variant == "catome-forced":
        return f"forced: round({FORCED_FRACTION} * #src) tokens merged at every site, checkpoints {SCHEDULE}"
    if variant == "catome-t0.7-smooth":
        return f"adaptive: threshold 0.7 on a smooth latent (random weights), checkpoints {SCHEDULE}"
    return f"threshold 1: nothing merged (every site feeds the r = 0 self-merge), checkpoints {SCHEDULE}"


def chain_part(setup: Setup, resolution: int, variant: str, graphs: bool, steps: int, warmup: int,
               deadline: Deadline, cache: bool = False) -> dict[str, Any]:
    import torch

    from catome_export.backends.torch_backend import TorchBackend
    from catome_export.engine.manifest import StageRecord
    from catome_export.export.stages import cut_unet
    from catome_export.runtime.runtime import Runtime

    if graphs and setup.device != "cuda":
        return {"status": "skipped", "reason": "CUDA graphs need a CUDA device"}
    from catome_export.engine.manifest import FeatureCacheRecord
    from catome_export.export.stages import cached_branches
    from catome_export.featurecache import FeatureCacheSettings, UNetLayout

    branches = (FEATURE_CACHE[1],) if cache else ()
    stages = cut_unet(setup.unet, setup.sites, dtype=setup.dtype, cache_branches=branches)  # shares the weights
    backend = TorchBackend(None, setup.device, stages=stages)
    runners = [backend.load_stage(None, StageRecord(spec, "")) for spec, _ in stages]
    record = (FeatureCacheRecord(cached_branches(stages, branches, UNetLayout.of(setup.unet)),
                                 FeatureCacheSettings(*FEATURE_CACHE)) if cache else None)
    runtime = Runtime.from_parts(runners, setup.sites, _settings(variant), unet_config=dict(setup.unet.config),
                      dtype=setup.dtype, device=backend.device, backend=backend, cache_record=record)
    runtime.set_timesteps(setup.timesteps)
    try:
        if graphs:
            runtime.enable_cuda_graphs()
        latent, ehs = setup.inputs(resolution, smooth=False)

        def call(i: int) -> dict[str, Any]:
            t = torch.full((BATCH,), setup.timesteps[i % len(setup.timesteps)], dtype=torch.float32,
                           device=backend.device)
            runtime.step(latent, t, ehs)
            history = runtime.history
            rec = history[-1] if history else None
            if rec is None:
                raise RuntimeError("the runtime kept no record of the call it just ran")
            return {"matched": any(rec.matched.values()), "merged": {str(k): v for k, v in rec.merged.items()},
                    "runtime_step_ms": round(rec.step_ms, 3), "controller_ms": round(rec.controller_ms, 3),
                    "cached_features": rec.cached_features}

        runtime.reset()
        timed_generation(call, warmup, deadline, setup.device)
        runtime.reset()
        calls, truncated = timed_generation(call, steps, deadline, setup.device)
    finally:
        runtime.close()
    return {"calls": calls, "truncated": truncated, "summary": summarise(calls), "merge": _merge_note(variant),
            "cuda_graphs": graphs, "backend": "torch", "feature_cache": _cache_note() if cache else None}


# -- TensorRT, where its wheels are carried in -----------------------------------------------------------------------
TRT_PROMPTS = ("a fox", "a red fox in the snow at dawn, photographed from far away with a long lens, film grain")
"""Two prompts of different token lengths for the CUDA-graph part (the pipeline pads both to the engine's text
length: a graph captured for one must serve the other, or be its own, never fail)."""


def tensorrt_missing() -> str | None:
    """Why the TensorRT part cannot run here (None when ``tensorrt`` and ``polygraphy`` import)."""
    import importlib.util

    missing = [name for name in ("tensorrt", "polygraphy") if importlib.util.find_spec(name) is None]
    if missing:
        return (f"{' and '.join(missing)} not importable: carry their wheels in (GPU_CHECK_WHEELS) to run the "
                "TensorRT build, verify and CUDA-graph part")
    return None


def tensorrt_part(device: str, steps: int, deadline: Deadline, work_dir: Path | None = None) -> dict[str, Any]:
    """Build the tiny engine with TensorRT (fp16), ``verify`` it, and generate two prompts of different token
    lengths through the engine with CUDA graphs on, in ratio mode (the merge counts repeat from step to step, so
    cached steps replay graphs across prompts)."""
    import numpy as np
    import torch

    why = tensorrt_missing()
    if why is not None:
        return {"status": "skipped", "reason": why}
    if device != "cuda":
        return {"status": "skipped", "reason": "TensorRT engines run on a CUDA device"}
    import tensorrt
    import polygraphy

    from catome_export.merging import MergeSettings
    from catome_export.runtime import Runtime
    from catome_export.runtime.embed import attach
    from catome_export.runtime.verify import verify_engine
    from catome_export.workflows.build import build_engine
    from catome_export.workflows.generate import pipeline_for_engine

    result: dict[str, Any] = {"tensorrt": tensorrt.__version__, "polygraphy": polygraphy.__version__}
    own_dir = work_dir is None
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_trt.")) if own_dir else Path(work_dir)  # type: ignore[arg-type]
    try:
        engine_dir = folder / "tiny_trt"
        t0 = time.perf_counter()
        build_engine("tiny", backend="trt", precision="fp16", out_dir=engine_dir, verify=True, force=True)
        result["build_s"] = round(time.perf_counter() - t0, 2)
        if deadline.left() <= 0:
            result["truncated"] = True
            return result
        t0 = time.perf_counter()
        report = verify_engine(engine_dir, steps=steps, backend="trt", device="cuda")
        result["verify"] = {"ok": report.ok, "steps": len(report.rows), "max_abs_diff": report.max_diff,
                            "tolerance": report.tolerance, "failed_steps": report.failed_steps,
                            "merge_mismatch_steps": report.merge_mismatch_steps,
                            "flipped_tokens": report.flipped_tokens, "wall_s": round(time.perf_counter() - t0, 2)}
        if deadline.left() <= 0:
            result["truncated"] = True
            return result
        generations = []
        settings = MergeSettings(threshold=None, ratio=0.5)
        with Runtime.load(engine_dir, backend="trt", device="cuda", cuda_graphs=True, settings=settings) as runtime:
            pipe = pipeline_for_engine(runtime)
            pipe.set_progress_bar_config(disable=True)
            with attach(pipe, runtime):
                for i, prompt in enumerate(TRT_PROMPTS):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        images = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=7.5,
                                      generator=torch.Generator("cpu").manual_seed(100 + i), output_type="np").images
                    torch.cuda.synchronize()
                    runner = runtime.graph_runner
                    generations.append({
                        "prompt_tokens": len(pipe.tokenizer(prompt).input_ids),
                        "wall_s": round(time.perf_counter() - t0, 3),
                        "finite": bool(np.isfinite(np.asarray(images, dtype=np.float64)).all()),
                        "graph_keys": len(runner.cache) if runner is not None else 0,
                        "captures": runner.captures if runner is not None else 0,
                        "capture_failure": runner.capture_failure if runner is not None else None})
        result["cuda_graphs"] = {"merge": "ToMe ratio 0.5 (the same r every step)", "generations": generations}
        failed = (not report.ok or any(not g["finite"] for g in generations)
                  or any(g["capture_failure"] for g in generations))
        result["status"] = "failed" if failed else "ok"
        return result
    finally:
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)


# -- running the parts ----------------------------------------------------------------------------------------------

def run_part(report: Report, name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one part; record its result, or its failure with the error, and write the JSON either way."""
    t0 = time.perf_counter()
    try:
        result = fn()
        result.setdefault("status", "ok")
    except Exception as exc:  # a failed part is recorded, the others still run
        logger.error("%s failed: %s: %s", name, type(exc).__name__, exc)
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=8)}
    finally:
        _free_memory()
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    report.data["parts"][name] = result
    report.write()
    summary = result.get("summary") or {}
    logger.info("%-40s %-8s median %s ms over %s calls", name, result["status"], summary.get("median_ms"),
                summary.get("calls"))


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tail(path: Path | None, chars: int = 6000) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(could not read {path}: {exc})"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to PyTorch (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). Run this on a machine with an NVIDIA GPU and "
              "a CUDA build of PyTorch. Nothing was written.", file=sys.stderr)
        return NO_CUDA_EXIT
    start = time.perf_counter()
    deadline = Deadline.after(args.budget_s)
    report = Report(args.out, {
        "kind": "gpu_check", "status": "running",
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {"model": args.model, "weights": "random (seeded, catome_export.models.load_unet)",
                   "dtype": "fp16" if args.device == "cuda" else "fp32", "attention": "SDPA (AttnProcessor2_0)",
                   "batch": BATCH, "text_len": TEXT_LEN, "resolutions": args.resolutions, "steps": args.steps,
                   "warmup": args.warmup, "schedule": SCHEDULE, "forced_fraction": FORCED_FRACTION,
                   "budget_s": args.budget_s,
                   "timing": "perf_counter around each U-Net call, torch.cuda.synchronize before and after"},
        "device": describe_device(args.device),
        "install": {"rc": args.install_rc, "log_tail": _tail(args.install_log)},
        "pytest_gpu": {"rc": args.pytest_rc, "log_tail": _tail(args.pytest_log)},
        "parts": {},
    })
    report.write()

    try:
        setup = load_setup(args.model, args.device, args.steps)
    except Exception as exc:
        report.data["status"] = "failed"
        report.data["error"] = f"loading the model failed: {type(exc).__name__}: {exc}"
        report.write()
        logger.error(report.data["error"])
        return 1
    report.data["config"]["model_load_s"] = setup.load_s
    report.data["config"]["merge_sites"] = [s.path for s in setup.sites]

    plan: list[tuple[str, Callable[[Deadline], dict[str, Any]]]] = []
    for res in args.resolutions:  # one resolution complete before the next, if the budget runs short
        for variant in ("plain", "catome-forced", "catome-t0.7-smooth"):
            plan.append((f"eager/{res}/{variant}",
                         lambda d, res=res, v=variant: eager_part(setup, res, v, args.steps, args.warmup, d)))
        for variant in ("catome-forced", "nothing-merged"):
            for graphs in (False, True):
                plan.append((f"chain/{res}/{variant}/{'cuda-graphs' if graphs else 'no-graphs'}",
                             lambda d, res=res, v=variant, g=graphs: chain_part(setup, res, v, g, args.steps,
                                                                                   args.warmup, d)))
    for res in args.resolutions[:1]:  # generation mode: whole DDIM schedules with DeepCache-style feature caching
        plan.append((f"generation/{res}/eager/plain",
                     lambda d, res=res: eager_part(setup, res, "plain", args.steps, args.warmup, d)))
        plan.append((f"generation/{res}/eager/deepcache",
                     lambda d, res=res: eager_part(setup, res, "plain", args.steps, args.warmup, d, cache=True)))
        for variant in ("nothing-merged", "catome-forced"):
            for cache in (False, True):
                plan.append((f"generation/{res}/chain/{variant}/{'cache' if cache else 'no-cache'}",
                             lambda d, res=res, v=variant, c=cache: chain_part(setup, res, v, False, args.steps,
                                                                               args.warmup, d, cache=c)))
    plan.append(("tensorrt/tiny", lambda d: tensorrt_part(args.device, args.steps, d)))
    for i, (name, fn) in enumerate(plan):
        if deadline.left() <= 0:
            report.data["parts"][name] = {"status": "skipped", "reason": "the run's time budget was spent"}
            continue
        part_deadline = deadline.share(len(plan) - i)
        run_part(report, name, lambda fn=fn, d=part_deadline: fn(d))

    statuses = [p["status"] for p in report.data["parts"].values()]
    over_budget = any(p.get("reason") == "the run's time budget was spent" or p.get("truncated")
                      for p in report.data["parts"].values())
    report.data["status"] = ("some parts failed" if "failed" in statuses
                             else "ok, cut short by the time budget" if over_budget else "ok")
    report.data["wall_s"] = round(time.perf_counter() - start, 2)
    report.write()
    logger.info("wrote %s (%s)", args.out, report.data["status"])
    return 1 if "failed" in statuses else 0


if __name__ == "__main__":
    sys.exit(main())
