"""Time ``match_tokens`` on an SD 1.5-sized merge site (default [2, 4096, 320], a 64x64 grid).

Two modes, as in the paper's comparison: CA-ToMe threshold 0.7 on a smooth
metric (blurred random features, so about three quarters of the src tokens
clear the threshold, as with real SD block inputs) and the ToMe baseline at
ratio 0.5. Prints the median over ``--repeats`` timed calls after
``--warmup`` untimed ones, and r of each mode.

    python scripts/bench_matching.py [--batch 2] [--grid 64] [--channels 320] [--device cpu|cuda] [--json FILE]

``--json`` also writes the timings and the machine (CPU, threads, versions,
load average) to FILE.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from catome_export.merging import match_tokens
from catome_export.merging.matching import partition


def smooth_metric(batch: int, grid: int, channels: int, device: str, seed: int = 0) -> torch.Tensor:
    """[B, grid*grid, C] features that vary smoothly over the grid."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, channels, grid, grid, generator=gen)
    img = torch.nn.functional.avg_pool2d(img, 5, stride=1, padding=2, count_include_pad=False)
    return img.flatten(2).transpose(1, 2).contiguous().to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, warmup: int, repeats: int, device: str) -> tuple[float, object]:
    """Median milliseconds of ``fn()`` and its last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--grid", type=int, default=64, help="grid side (64 = 512 px SD 1.5)")
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results and the machine to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    metric = smooth_metric(args.batch, args.grid, args.channels, args.device)
    grid = (args.grid, args.grid)
    print(f"match_tokens on [{args.batch}, {args.grid * args.grid}, {args.channels}] ({args.device}, "
          f"{torch.get_num_threads()} threads), median of {args.repeats} after {args.warmup} warm-up calls")
    from catome_export.bench.device import device_info, load_average

    device = device_info(torch.device(args.device), torch.get_num_threads())
    device["load_average_1min_before"] = load_average()
    rows = []
    for label, kwargs in (("threshold 0.7", dict(threshold=0.7)), ("ratio 0.5", dict(ratio=0.5))):
        ms, plan = time_call(lambda: match_tokens(metric, grid, **kwargs), args.warmup, args.repeats, args.device)
        print(f"  {label:<14} {ms:8.2f} ms   r = {plan.num_merged}")
        rows.append({"mode": label, **kwargs, "median_ms": round(ms, 2), "num_merged": plan.num_merged})
    # The one step that dominates: every src against every dst, on the normalised metric.
    m = metric / metric.norm(dim=-1, keepdim=True)
    src_ids, dst_ids = partition(grid, device=args.device)
    src, dst = m.index_select(1, src_ids), m.index_select(1, dst_ids)
    ms, _ = time_call(lambda: src @ dst.transpose(-1, -2), args.warmup, args.repeats, args.device)
    gflops = 2 * src.shape[0] * src.shape[1] * dst.shape[1] * src.shape[2] / (ms * 1e6)
    print(f"  {'score matmul':<14} {ms:8.2f} ms   [{src.shape[1]} x {src.shape[2]}] @ [{src.shape[2]} x "
          f"{dst.shape[1]}] per batch item, {gflops:.0f} GFLOP/s")
    rows.append({"mode": "score matmul only", "median_ms": round(ms, 2), "gflop_per_s": round(gflops, 1)})
    device["load_average_1min_after"] = load_average()
    if args.json:
        config = {"batch": args.batch, "grid": args.grid, "channels": args.channels, "warmup": args.warmup,
                  "repeats": args.repeats}
        with open(args.json, "w") as f:
            json.dump({"device": device, "config": config, "rows": rows}, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
