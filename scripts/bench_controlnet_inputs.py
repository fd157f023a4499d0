"""The extra cost of ControlNet's residual inputs on the U-Net engine: a plain engine against the same model built
with ``--controlnet``, interleaved call by call in one run.

Usage:
    python scripts/bench_controlnet_inputs.py --plain ENGINE --controlnet ENGINE [--resolution 512] [--batch 2]
        [--repeats 12] [--warmup 1] [--threads N] [--json OUT.json] [--md OUT.md] [--note TEXT]

Rows (each a cached call at r = 0: merge fraction 0, matching only on the warm-up call, so no row pays for
matching in its timed calls; ONNX Runtime on the CPU, the engines' own fused graphs):

- ``plain``: the engine built without ``--controlnet``;
- ``controlnet``: the ``--controlnet`` engine fed seeded residuals (``down_block_additional_residuals``,
  ``mid_block_additional_residual``, as ``StableDiffusionControlNetPipeline`` passes them; the ControlNet model
  itself is not timed: it runs eagerly where the user has it);
- ``controlnet-zeros``: the ``--controlnet`` engine called without residuals (it feeds zeros).

The rows are timed in rotated rounds (``catome_export.bench.measure.measure_interleaved``): every round times one
call of every row, in an order rotated from round to round, so a change in the machine's load hits every row
alike. The 1-minute load average is recorded before and after (and per round), since the machine may be shared.
The result: per row the median / min / p90 call time, and the ratio to ``plain`` of the medians and of the
per-round pairs (each round's controlnet call over the same round's plain call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _load_average() -> float | None:
    from catome_export.bench.device import load_average

    return load_average()


def make_target(engine: Path, threads: int, residuals: str) -> Any:
    """An engine target whose calls run at r = 0 with no matching, feeding ``residuals`` (``none``, ``seeded``)."""
    from catome_export.bench.measure import BENCH_SCHEDULE
    from catome_export.bench.targets import EngineTarget
    from catome_export.export.controlnet import random_residuals

    class Target(EngineTarget):
        merges = False  # one cached call per round: no checkpoint calls in the timed rounds

        def configure(self, settings: Any) -> None:
            if not self._configured:
                base = self.runtime.settings
                self.runtime.set_settings(replace(base, threshold=None, ratio=None, merge_fraction=0.0,
                                                  schedule=BENCH_SCHEDULE))
                self._configured = True

        def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                     added: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
            kwargs: dict[str, Any] = {}
            if residuals == "seeded":
                key = (int(sample.shape[0]), int(sample.shape[2]), int(sample.shape[3]))
                if self._residuals_key != key:
                    down, mid = random_residuals(self.runtime.controlnet, key[0], key[1:], seed=5,
                                                 dtype=self.runtime.dtype, device=self.runtime.device)
                    self._residuals = (tuple(down), mid)
                    self._residuals_key = key
                kwargs = {"down_block_additional_residuals": self._residuals[0],
                          "mid_block_additional_residual": self._residuals[1]}
            self._stage_ms.clear()
            return self.runtime.unet(sample, timestep, encoder_hidden_states=text, return_dict=False,
                                     **({"added_cond_kwargs": dict(added)} if added else {}), **kwargs)[0]

    target = Target.load(engine, "ort-cpu", "cpu", {"intra_op_threads": threads}, stage_timings=False)
    target._configured = False
    target._residuals_key = None
    if residuals != "none" and target.runtime.controlnet is None:
        raise SystemExit(f"{engine} was built without --controlnet")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", type=Path, required=True, help="engine built without --controlnet")
    parser.add_argument("--controlnet", type=Path, required=True, help="the same model built with --controlnet")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the plain engine's opt size)")
    parser.add_argument("--batch", type=int, default=2, help="U-Net batch (default 2: one image with CFG)")
    parser.add_argument("--repeats", type=int, default=12, help="interleaved rounds (default 12)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per row first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: cores)")
    parser.add_argument("--no-zeros-row", action="store_true", help="leave out the controlnet-zeros row")
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    parser.add_argument("--md", type=Path, default=None, help="write a short table here")
    parser.add_argument("--note", default="", help="free text recorded with the figures")
    args = parser.parse_args(argv)

    from catome_export.bench.device import cpu_model, physical_cores
    from catome_export.bench.measure import Inputs, Job, measure_interleaved
    from catome_export.engine.manifest import Manifest
    from catome_export.latents import make_latents

    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    plain_manifest = Manifest.load(args.plain, check_hashes=False)
    cn_manifest = Manifest.load(args.controlnet, check_hashes=False)
    if plain_manifest.controlnet is not None or cn_manifest.controlnet is None:
        raise SystemExit("--plain must be built without --controlnet and --controlnet with it")
    if plain_manifest.model.weights_hash != cn_manifest.model.weights_hash:
        raise SystemExit("the two engines were built from different weights")
    shapes = plain_manifest.shapes
    latent = (args.resolution // 8,) * 2 if args.resolution else (shapes.opt_height, shapes.opt_width)
    batch = args.batch
    text_len, text_dim = shapes.opt_text_len, shapes.text_dim
    gen = torch.Generator().manual_seed(1)
    inputs = Inputs(make_latents((batch, 4, *latent), "smooth", 0),
                    torch.full((batch,), 500.0), torch.randn(batch, text_len, text_dim, generator=gen))

    load_before = _load_average()
    started = time.time()
    rows = [("plain", args.plain, "none"), ("controlnet", args.controlnet, "seeded")]
    if not args.no_zeros_row:
        rows.append(("controlnet-zeros", args.controlnet, "none"))
    targets = [make_target(path, threads, residuals) for _, path, residuals in rows]
    round_loads: list[float | None] = []

    def tick(note: str, calls: int) -> None:
        round_loads.append(_load_average())
        print(f"{time.time() - started:7.0f} s  {note}  load {round_loads[-1]}", file=sys.stderr, flush=True)

    jobs = [Job(t, None) for t in targets]
    timings = measure_interleaved(jobs, inputs, repeats=args.repeats, warmup=args.warmup, tick=tick)
    load_after = _load_average()
    for t in targets:
        t.close()

    base = timings[0].cached.step_ms
    result: dict[str, Any] = {
        "what": "extra cost of the ControlNet residual inputs on the U-Net engine, cached calls at r = 0",
        "plain_engine": str(args.plain), "controlnet_engine": str(args.controlnet),
        "model": plain_manifest.model.id, "weights": plain_manifest.model.weights,
        "stages": {"plain": len(plain_manifest.stages), "controlnet": len(cn_manifest.stages)},
        "controlnet_inputs": len(cn_manifest.controlnet.down) + 1,
        "resolution": latent[0] * 8, "batch": batch, "repeats": args.repeats, "warmup": args.warmup,
        "backend": "ort-cpu", "threads": threads, "cpu": cpu_model(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "load_average_1min": {"before": load_before, "after": load_after, "per_round": round_loads},
        "seconds": round(time.time() - started, 1), "note": args.note,
        "command": " ".join(["python", "scripts/bench_controlnet_inputs.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": _commit(), "rows": [],
    }
    for (name, path, residuals), timing in zip(rows, timings):
        ms = timing.cached.step_ms
        s = timing.cached.summary
        row = {"row": name, "engine": str(path), "residuals": residuals, "calls_ms": [round(x, 3) for x in ms],
               "median_ms": round(s.median_ms, 3), "min_ms": round(s.min_ms, 3), "p90_ms": round(s.p90_ms, 3)}
        if name != "plain":
            pairs = [c / p for c, p in zip(ms, base)]
            row["ratio_of_medians"] = round(s.median_ms / statistics.median(base), 4)
            row["ratio_of_mins"] = round(s.min_ms / min(base), 4)
            row["median_of_round_ratios"] = round(statistics.median(pairs), 4)
        result["rows"].append(row)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.md:
        lines = [f"# ControlNet inputs on the U-Net engine: {result['model']} ({result['weights']} weights), "
                 f"{result['resolution']} px, batch {batch}, r = 0", "",
                 f"ONNX Runtime CPU, {threads} threads, {result['cpu']} ({result['cpus']} CPUs); {args.repeats} "
                 f"interleaved rounds after {args.warmup} warm-up call(s) per row; load average (1 min) "
                 f"{load_before} before, {load_after} after. {args.note}".rstrip(), "",
                 f"Command: `{result['command']}` (commit {result['commit']}).", "",
                 "| row | median ms | min ms | p90 ms | median / plain | min / plain | median of round ratios |",
                 "|---|---|---|---|---|---|---|"]
        for row in result["rows"]:
            lines.append(f"| {row['row']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['p90_ms']:.1f} | "
                         f"{row.get('ratio_of_medians', 1.0):.4f} | {row.get('ratio_of_mins', 1.0):.4f} | "
                         f"{row.get('median_of_round_ratios', 1.0):.4f} |")
        args.md.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
