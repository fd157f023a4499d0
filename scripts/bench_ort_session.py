"""Measure ONNX Runtime session settings on an engine folder: step time of the runtime per setting.

Usage:
    python scripts/bench_ort_session.py ENGINE_DIR [--steps 12] [--rounds 3] [--batch 2] [--resolution 256]

Each setting runs a whole generation (``--steps`` U-Net calls, CA-ToMe with
the manifest's settings on smooth latents, so K and R change at checkpoints
as in real use); settings are interleaved round by round and the best median
step time per setting is reported, which damps the noise of a shared CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS: dict[str, dict] = {
    "default (all, binding, no mem pattern, shared arena, spin stop)": {},
    "numpy feeds (session.run)": {"io_binding": False},
    "mem pattern on": {"mem_pattern": True},
    "optimization extended": {"optimization": "extended"},
    "optimization basic": {"optimization": "basic"},
    "no cpu arena": {"cpu_mem_arena": False},
    "no spinning": {"allow_spinning": False},
    "spinning on after each run": {"stop_spinning_after_run": False},
    "1 intra-op thread": {"intra_op_threads": 1},
    "2 intra-op threads": {"intra_op_threads": 2},
}


def one_generation(engine_dir: Path, options: dict, steps: int, batch: int, latent_hw: tuple[int, int]) -> float:
    from catome_export.runtime import Runtime
    from catome_export.latents import make_latents

    with Runtime.load(engine_dir, backend="ort-cpu", backend_options=options) as runtime:
        text_len, text_dim = runtime.manifest.shapes.opt_text_len, runtime.manifest.shapes.text_dim
        latents = make_latents((batch, 4, *latent_hw), "smooth", 0)
        ehs = torch.randn(batch, text_len, text_dim, generator=torch.Generator().manual_seed(1))
        runtime.unet(latents, 999, ehs)  # warm-up call: session initialisation, first allocations
        runtime.reset()
        for i in range(steps):
            runtime.unet(latents, 999 - i * (999 // steps), ehs)
        return statistics.median(s.step_ms for s in runtime.history)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the build's opt size)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of every variant (default: physical cores); on a busy shared CPU "
                             "compare at 1, where other processes disturb the threads least")
    parser.add_argument("--only", default=None,
                        help="comma-separated words: run the default and the variants whose name contains one")
    args = parser.parse_args(argv)
    variants = dict(VARIANTS)
    if args.only:
        words = [w.strip() for w in args.only.split(",") if w.strip()]
        first = next(iter(VARIANTS))
        variants = {n: o for n, o in VARIANTS.items() if n == first or any(w in n for w in words)}

    from catome_export.engine.manifest import Manifest

    manifest = Manifest.load(args.engine_dir)
    opt = manifest.shapes
    hw = (args.resolution // 8,) * 2 if args.resolution else (opt.opt_height, opt.opt_width)
    manifest.check_shapes(args.batch, *hw)
    print(f"engine {args.engine_dir} ({manifest.model.id}), batch {args.batch}, latent {hw[0]}x{hw[1]}, "
          f"{args.steps} steps x {args.rounds} rounds, torch threads {torch.get_num_threads()}")
    best: dict[str, float] = {}
    start = time.perf_counter()
    for _ in range(args.rounds):
        for name, options in variants.items():
            if args.threads:
                options = {"intra_op_threads": args.threads, **options}
            ms = one_generation(args.engine_dir, options, args.steps, args.batch, hw)
            best[name] = min(best.get(name, float("inf")), ms)
    base = best[next(iter(variants))]
    width = max(len(name) for name in best)
    for name, ms in best.items():
        print(f"{name:<{width}} {ms:8.1f} ms/step  ({ms / base:5.2f}x default)")
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
