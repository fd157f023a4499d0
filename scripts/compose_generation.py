"""The N-step generation mean of each row, composed from the per-call times of a shorter generation-mode run.

A 50-step generation of SDXL at 1024 px takes about an hour per row on a
2-core CPU; generation mode (``catome-export bench --generation K``) with a
short schedule still times every row's full and cached U-Net calls. This
script reads such a run's JSON and composes the mean per step of an N-step
schedule from them:

    mean_N = (F_N * full_call_ms + C_N * cached_call_ms) / N

where F_N and C_N are the full and cached calls of an N-step schedule under
the run's feature cache (DeepCache's rule: a call is full when its index is a
multiple of the interval, as ``FeatureCacheSettings.is_full`` decides), and the
call times are the run's medians over all its full (cached) calls. Rows
without caching are their mean per call. Composed figures are labelled as
such; they leave out the scheduler's step between calls (a few ms, measured
in the run's own mean) and assume a call's cost does not depend on its
timestep, which holds for the U-Net (the engine's CA-ToMe rows force r per
site, as every ``bench`` row does).

usage: python scripts/compose_generation.py RUN.json [--steps 50] [--md OUT.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catome_export.featurecache import FeatureCacheSettings


def compose(run: dict, steps: int) -> list[dict]:
    if run.get("mode") != "generation":
        raise SystemExit("compose_generation.py: the file is not a generation-mode result (bench --generation K --json)")
    rows = []
    for row in run["rows"]:
        full, cached = row["full_call_ms"], row["cached_call_ms"]
        fc = row.get("feature_cache")
        if fc is None:
            n_full, n_cached, mean = steps, 0, full
        else:
            settings = FeatureCacheSettings.from_dict(fc)
            n_full = sum(1 for i in range(steps) if settings.is_full(i))
            n_cached = steps - n_full
            if cached is None:
                raise SystemExit(f"row {row['label']}: the run has no cached call to compose from")
            mean = (n_full * full + n_cached * cached) / steps
        rows.append({"label": row["label"], "backend": row["backend"], "merge_fraction": row["merge_fraction"],
                     "feature_cache": fc, "full_call_ms": full, "cached_call_ms": cached, "full_calls": n_full,
                     "cached_calls": n_cached, "composed_mean_ms_per_step": mean,
                     "measured_mean_ms_per_step": row["mean_ms_per_step"], "measured_calls": row["calls"]})
    eager = next((r for r in rows if r["backend"] == "eager" and r["feature_cache"] is None), None)
    for r in rows:
        r["vs_eager"] = None if eager is None else eager["composed_mean_ms_per_step"] / r["composed_mean_ms_per_step"]
        base = None
        if r["feature_cache"] is not None:
            want = "eager" if r["backend"] == "eager-deepcache" else r["backend"]
            base = next((b for b in rows if b["backend"] == want and b["feature_cache"] is None
                         and b["merge_fraction"] == r["merge_fraction"]), None)
        r["vs_no_cache"] = None if base is None else base["composed_mean_ms_per_step"] / r["composed_mean_ms_per_step"]
    return rows


def markdown(run: dict, rows: list[dict], steps: int, source: str) -> str:
    c = run["config"]
    fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
    lines = [f"{steps}-step means **composed** from the per-call medians of a {c['steps']}-step generation-mode run "
             f"({source}: {c['model']}, {run['resolution']} px, batch {c['batch']}, {c['rounds']} round(s)); "
             "mean = (full calls x full call ms + cached calls x cached call ms) / steps", "",
             f"| row | composed mean ms/step ({steps} steps) | full call ms | cached call ms | cached calls | "
             "vs eager | vs no cache | measured mean ms/step (run) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['composed_mean_ms_per_step']:.1f} | {fmt(r['full_call_ms'])} | "
                     f"{fmt(r['cached_call_ms'])} | {r['cached_calls']}/{steps} | {ratio(r['vs_eager'])} | "
                     f"{ratio(r['vs_no_cache'])} | {r['measured_mean_ms_per_step']:.1f} ({r['measured_calls']} calls) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a generation-mode JSON (catome-export bench --generation K --json FILE)")
    p.add_argument("--steps", type=int, default=50, help="the schedule length to compose (default 50)")
    p.add_argument("--md", type=Path, help="also append the table to this markdown file (default: print only)")
    p.add_argument("--json", type=Path, help="also write the composed rows to this JSON file (default: none)")
    args = p.parse_args()
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    run = json.loads(args.run.read_text())
    rows = compose(run, args.steps)
    text = markdown(run, rows, args.steps, args.run.name)
    print(text, end="")
    if args.md:
        with args.md.open("a") as f:
            f.write("\n" + text)
    if args.json:
        args.json.write_text(json.dumps({"source": str(args.run), "steps": args.steps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
