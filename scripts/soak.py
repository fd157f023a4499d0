"""Soak test: many U-Net steps through an engine, with checkpoints and resolution changes; memory must stay flat.

Usage:
    python scripts/soak.py [--engine DIR] [--steps 1000] [--resolutions 64,96,128] [--change-every 100]
                           [--checkpoint-every 10] [--batch 1] [--threads 1] [--json FILE] [--max-growth 5]

Without ``--engine`` it first builds the tiny model for the range of
``--resolutions`` (ONNX Runtime, no verification) into ``--build-dir`` (a
temp folder by default). Then it loads the engine on ONNX Runtime CPU and
runs ``--steps`` U-Net calls of CA-ToMe (t = ``--threshold`` on smooth
latents, so tokens really merge) with the checkpoint schedule
0, E, 2E, ... (E = ``--checkpoint-every``, step_base 0). Every
``--change-every`` steps the resolution moves to the next of
``--resolutions`` and a new generation starts (caches reset), so the graphs
see new shapes and new merge counts all the time.

Resident memory (VmRSS from /proc/self/status) is read after a warm-up
generation at every resolution and at the end; the run fails (exit 1) when
it grew by ``--max-growth`` percent or more, or when a step returned a
non-finite value. A summary is printed; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from catome_export.errors import CatomeError

TEXT_SEED = 1


def rss_mib() -> tuple[float, float | None]:
    """(resident memory, peak resident memory) of this process in MiB, from /proc (psutil where /proc is absent)."""
    status = Path("/proc/self/status")
    if status.is_file():
        fields = {}
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024.0  # kB
        if "VmRSS" in fields:
            return fields["VmRSS"], fields.get("VmHWM")
    try:
        import psutil  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit("error: cannot read resident memory: /proc/self/status is missing and psutil is not "
                         "installed") from None
    return psutil.Process().memory_info().rss / 2**20, None


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{what} is empty")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, default=None, help="engine folder (default: build the tiny model first)")
    p.add_argument("--build-dir", type=Path, default=None, help="where to build without --engine (default: a temp dir)")
    p.add_argument("--steps", type=int, default=1000, help="U-Net calls measured (default 1000)")
    p.add_argument("--resolutions", type=lambda t: _ints(t, "--resolutions"), default=[64, 96, 128],
                   help="image sides in pixels, visited in turn (default 64,96,128)")
    p.add_argument("--change-every", type=int, default=100,
                   help="steps per resolution; each change starts a new generation (default 100)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="checkpoint schedule 0,E,2E,... (default 10)")
    p.add_argument("--warmup-steps", type=int, default=20,
                   help="steps of the warm-up generation at every resolution, before the first reading (default 20)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--threshold", type=float, default=0.7, help="CA-ToMe threshold (default 0.7)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op and torch threads (default 1)")
    p.add_argument("--max-growth", type=float, default=5.0, help="failing RSS growth in percent (default 5)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the figures as JSON")
    args = p.parse_args(argv)
    for name in ("steps", "change_every", "checkpoint_every", "batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    bad = [r for r in args.resolutions if r < 8 or r % 8]
    if bad:
        p.error(f"--resolutions must be positive multiples of 8, got {bad}")
    return args


def build_tiny(args: argparse.Namespace) -> tuple[Path, float]:
    """Build the tiny engine for the resolution and batch range in a child process (folder, seconds).

    A child process, so that the build's own memory never counts in the readings of this one.
    """
    import subprocess

    base = args.build_dir or Path(tempfile.mkdtemp(prefix="catome-soak-"))
    out = base / f"tiny-{min(args.resolutions)}-{max(args.resolutions)}"
    cmd = [sys.executable, "-m", "catome_export.cli", "build", "--model", "tiny", "--engine-kind", "ort", "--no-verify",
           "--min-resolution", str(min(args.resolutions)), "--max-resolution", str(max(args.resolutions)),
           "--min-batch", "1", "--max-batch", str(max(args.batch, 2)), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise CatomeError(f"the tiny engine build failed ({tail[0]}): build one with catome-export build and "
                          "pass it with --engine")
    return out, time.perf_counter() - start


class Soak:
    """One runtime driven through generations at changing resolutions."""

    def __init__(self, runtime: Any, args: argparse.Namespace) -> None:
        from catome_export.merging import parse_schedule

        self.runtime = runtime
        self.args = args
        total = args.steps + args.warmup_steps
        schedule = parse_schedule(list(range(0, max(total, 1), args.checkpoint_every)), step_base=0)
        runtime.set_settings(replace(runtime.settings, threshold=args.threshold, ratio=None, merge_fraction=None,
                                     schedule=schedule))
        shapes = runtime.manifest.shapes
        if shapes.text_dim is None:
            raise CatomeError("the engine's manifest has no text_dim: rebuild it with catome-export build")
        self.text_shape = (shapes.opt_text_len, shapes.text_dim)
        self.nonfinite = 0
        self.step_ms: list[float] = []
        self.per_resolution: dict[int, dict[str, list[float]]] = {}
        self.checkpoint_steps = 0

    def generation(self, resolution: int, steps: int, seed: int, record: bool) -> None:
        """``steps`` U-Net calls of one generation at ``resolution`` (a new generation: caches reset)."""
        from catome_export.latents import make_latents

        batch, latent = self.args.batch, resolution // 8
        sample = make_latents((batch, 4, latent, latent), "smooth", seed)
        text = torch.randn(batch, *self.text_shape, generator=torch.Generator().manual_seed(TEXT_SEED + seed))
        self.runtime.reset()
        stride = max(1, 999 // max(steps, 1))
        for i in range(steps):
            out = self.runtime.unet(sample, 999 - i * stride, encoder_hidden_states=text, return_dict=False)[0]
            if not bool(torch.isfinite(out).all()):
                self.nonfinite += 1
            # a bounded stand-in for a sampler step: the next input depends on this output
            sample = (0.98 * sample - 0.02 * out.clamp(-5.0, 5.0)).contiguous()
            if record:
                rec = self.runtime.history[-1]
                self.step_ms.append(rec.step_ms)
                row = self.per_resolution.setdefault(resolution, {"ms": [], "merged": []})
                row["ms"].append(rec.step_ms)
                row["merged"].append(float(sum(rec.merged.values())))
                self.checkpoint_steps += int(any(rec.matched.values()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from catome_export.engine.manifest import tool_versions
    from catome_export.runtime import Runtime

    torch.set_num_threads(args.threads)
    build_seconds = None
    engine = args.engine
    if engine is None:
        print(f"building the tiny engine for {min(args.resolutions)}..{max(args.resolutions)} px ...", flush=True)
        engine, build_seconds = build_tiny(args)
    runtime = Runtime.load(engine, backend="ort", backend_options={"intra_op_threads": args.threads})
    try:
        for res in args.resolutions:
            runtime.manifest.check_shapes(args.batch, res // 8, res // 8)
        soak = Soak(runtime, args)
        print(f"soak: {args.steps} steps on {runtime.backend.name} ({engine}), resolutions {args.resolutions} "
              f"changing every {args.change_every} steps, checkpoint every {args.checkpoint_every}, "
              f"batch {args.batch}", flush=True)
        for k, res in enumerate(args.resolutions):  # warm-up: every shape family once, not measured
            soak.generation(res, args.warmup_steps, seed=1000 + k, record=False)
        gc.collect()
        rss_start, _ = rss_mib()
        samples = [{"step": 0, "rss_mib": round(rss_start, 2)}]
        start = time.perf_counter()
        done, segment = 0, 0
        while done < args.steps:
            steps = min(args.change_every, args.steps - done)
            res = args.resolutions[segment % len(args.resolutions)]
            soak.generation(res, steps, seed=segment, record=True)
            done += steps
            segment += 1
            gc.collect()
            samples.append({"step": done, "resolution": res, "rss_mib": round(rss_mib()[0], 2)})
        seconds = time.perf_counter() - start
        gc.collect()
        rss_end, peak = rss_mib()
    finally:
        runtime.close()
    growth = (rss_end - rss_start) / rss_start * 100.0
    ms = sorted(soak.step_ms)
    result = {
        "script": "scripts/soak.py",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "engine": str(engine),
        "model": runtime.manifest.model.id,
        "backend": runtime.backend.name if runtime.backend is not None else None,
        "device": str(runtime.device),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "build_seconds": None if build_seconds is None else round(build_seconds, 1),
        "steps": args.steps,
        "warmup_steps_per_resolution": args.warmup_steps,
        "resolutions": list(args.resolutions),
        "change_every": args.change_every,
        "checkpoint_every": args.checkpoint_every,
        "batch": args.batch,
        "threshold": args.threshold,
        "generations": segment,
        "checkpoint_steps": soak.checkpoint_steps,
        "nonfinite_steps": soak.nonfinite,
        "seconds": round(seconds, 2),
        "step_ms": {"median": round(statistics.median(ms), 3), "p95": round(ms[int(0.95 * (len(ms) - 1))], 3),
                    "max": round(ms[-1], 3)},
        "per_resolution": {
            str(res): {"steps": len(row["ms"]), "median_ms": round(statistics.median(row["ms"]), 3),
                       "mean_merged_tokens": round(statistics.fmean(row["merged"]), 2)}
            for res, row in sorted(soak.per_resolution.items())
        },
        "rss_mib": {"start": round(rss_start, 2), "end": round(rss_end, 2),
                    "peak": None if peak is None else round(peak, 2), "samples": samples},
        "growth_pct": round(growth, 3),
        "max_growth_pct": args.max_growth,
        "passed": bool(growth < args.max_growth and soak.nonfinite == 0),
        "tools": tool_versions(),
    }
    return result


def summary(result: dict[str, Any]) -> str:
    rss = result["rss_mib"]
    lines = [
        f"{result['steps']} steps in {result['seconds']:.1f} s ({result['generations']} generations, "
        f"{result['checkpoint_steps']} checkpoint steps, median step {result['step_ms']['median']:.1f} ms)",
        f"RSS after warm-up {rss['start']:.1f} MiB, at the end {rss['end']:.1f} MiB: growth {result['growth_pct']:+.2f} % "
        f"(limit {result['max_growth_pct']:g} %)" + (f", peak {rss['peak']:.1f} MiB" if rss["peak"] else ""),
    ]
    for res, row in result["per_resolution"].items():
        lines.append(f"  {res} px: {row['steps']} steps, median {row['median_ms']:.1f} ms, "
                     f"{row['mean_merged_tokens']:.1f} tokens merged per step (all sites)")
    if result["nonfinite_steps"]:
        lines.append(f"{result['nonfinite_steps']} steps returned non-finite values")
    lines.append("PASS" if result["passed"] else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from catome_export.errors import CatomeError
    from catome_export.fsutil import atomic_write_json

    args = parse_args(argv)
    try:
        result = run(args)
    except CatomeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
