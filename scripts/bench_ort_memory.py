"""Step time and memory of an engine under ONNX Runtime's three CPU memory settings.

Usage:
    python scripts/bench_ort_memory.py ENGINE_DIR [--resolution 512] [--batch 2] [--calls 3] [--json FILE]

Settings: one arena shared by every session of the process (the default),
one arena per session (``shared_arena=False``), and no arena
(``cpu_mem_arena=False``). An ONNX Runtime arena never shrinks and the
shared one is registered once per process, so each setting runs in its own
child process: it loads the engine, makes one warm-up call and ``--calls``
timed calls with r = 0 at every site (threshold 1), and reports the median
step, the minor page faults per timed call (memory the kernel had to hand
out afresh), the resident memory after loading and the peak resident memory.
The settings run one after another, never side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS: dict[str, dict] = {
    "shared arena (default)": {},
    "arena per session": {"shared_arena": False},
    "no arena": {"cpu_mem_arena": False},
}


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(engine_dir: Path, setting: str, resolution: int, batch: int, calls: int) -> dict:
    import torch

    from catome_export.bench.device import peak_rss_gib, rss_gib
    from catome_export.merging.settings import MergeSettings
    from catome_export.runtime import Runtime
    from catome_export.latents import make_latents

    options = SETTINGS[setting]
    with Runtime.load(engine_dir, backend="ort-cpu", settings=MergeSettings(threshold=1.0),
                      backend_options=options) as runtime:
        loaded = rss_gib()
        hw = (resolution // 8, resolution // 8)
        shapes = runtime.manifest.shapes
        latents = make_latents((batch, 4, *hw), "smooth", 0)
        ehs = torch.randn(batch, shapes.opt_text_len, shapes.text_dim, generator=torch.Generator().manual_seed(1))
        times = []
        faults = 0
        for i in range(calls + 1):
            before = _minor_faults()
            start = time.perf_counter()
            runtime.unet(latents, 999 - i, ehs)
            times.append((time.perf_counter() - start) * 1e3)
            if i:  # the warm-up call is not counted
                faults += _minor_faults() - before
    return {"setting": setting, "options": options, "warmup_ms": round(times[0], 1),
            "median_ms": round(statistics.median(times[1:]), 1), "min_ms": round(min(times[1:]), 1),
            "minor_page_faults_per_call": faults // calls,
            "rss_after_load_gib": loaded, "peak_rss_gib": peak_rss_gib()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--resolution", type=int, default=512, help="pixels (a multiple of 8 the engine accepts)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3, help="timed calls after one warm-up call")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the machine to this file")
    parser.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.engine_dir, args.child, args.resolution, args.batch, args.calls)))
        return 0

    import torch

    from catome_export.bench.device import device_info, load_average
    from catome_export.engine.manifest import Manifest

    manifest = Manifest.load(args.engine_dir)  # a clear error for a folder that is not an engine
    manifest.check_shapes(args.batch, args.resolution // 8, args.resolution // 8)
    device = device_info(torch.device("cpu"), torch.get_num_threads())
    device["load_average_1min_before"] = load_average()
    print(f"engine {args.engine_dir} ({manifest.model.id}), {args.resolution} px, batch {args.batch}, "
          f"r = 0, {args.calls} timed calls per setting")
    print("| setting | median ms | min ms | minor page faults per call | RSS after load GiB | peak RSS GiB |\n"
          "|---|---|---|---|---|---|")
    rows = []
    for setting in SETTINGS:
        cmd = [sys.executable, __file__, str(args.engine_dir), "--child", setting, "--resolution",
               str(args.resolution), "--batch", str(args.batch), "--calls", str(args.calls)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: the run of {setting!r} failed:\n{proc.stderr.strip()[-2000:]}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"| {setting} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['minor_page_faults_per_call']} "
              f"| {row['rss_after_load_gib']} | {row['peak_rss_gib']} |", flush=True)
    device["load_average_1min_after"] = load_average()
    if args.json:
        config = {"engine_dir": str(args.engine_dir), "model": manifest.model.id,
                  "resolution": args.resolution, "batch": args.batch, "calls": args.calls}
        args.json.write_text(json.dumps({"device": device, "config": config, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
