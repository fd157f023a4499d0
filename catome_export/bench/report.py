"""Benchmark results: derived columns, the markdown table, the JSON file and the plot.

Derived columns of a row (same resolution and batch):

- ``speedup_vs_eager``: eager median / this row's median;
- ``speedup_vs_engine0``: the engine's median at merge fraction 0 / this row's;
- ``realised_speedup``: the same backend's median at merge fraction 0 / this row's;
- ``ideal_speedup``: MACs of the U-Net without merging / with this row's r per
  site (the FLOP model of :mod:`.flops`, cached step: no matching);
- ``realised_over_ideal``: realised / ideal.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from catome_export.bench import flops
from catome_export.errors import CatomeError
from catome_export.merging import MergeSettings

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROW_KEYS = ("backend", "resolution", "batch", "merge_fraction", "median_ms", "min_ms", "p90_ms")
"""Keys every row carries (the JSON schema's required part)."""


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return round(num / den, 4)


def derive_columns(rows: list[dict], unet_config: Mapping[str, Any], text_len: int,
                   settings: MergeSettings) -> list[dict]:
    """Add speedups, MACs and the ideal speedup to every row (returns new dicts)."""
    out = []
    base_ms: dict[tuple[str, int, int], float] = {}
    for row in rows:
        if row["merge_fraction"] == 0 and row.get("threshold") is None:
            base_ms.setdefault((row["backend"], row["resolution"], row["batch"]), row["median_ms"])
    macs0: dict[tuple[int, int], int] = {}
    for row in rows:
        r = dict(row)
        key = (r["resolution"], r["batch"])
        hw = tuple(r["latent"])
        if key not in macs0:
            macs0[key] = flops.unet_macs(unet_config, hw, r["batch"], text_len=text_len,
                                         max_downsample=settings.max_downsample,
                                         merge_crossattn=settings.merge_crossattn, merge_mlp=settings.merge_mlp).total
        merged = {int(k): v for k, v in r.get("merged", {}).items()}
        macs = flops.unet_macs(unet_config, hw, r["batch"], text_len=text_len, merged=merged,
                               max_downsample=settings.max_downsample, merge_crossattn=settings.merge_crossattn,
                               merge_mlp=settings.merge_mlp).total
        ideal = macs0[key] / macs
        realised = _ratio(base_ms.get((r["backend"], *key)), r["median_ms"])
        r.update({
            "gmacs": round(macs / 1e9, 3),
            "speedup_vs_eager": _ratio(base_ms.get(("eager", *key)), r["median_ms"]),
            "speedup_vs_engine0": _ratio(base_ms.get(("engine", *key)), r["median_ms"]),
            "realised_speedup": realised,
            "ideal_speedup": round(ideal, 4),
            "realised_over_ideal": None if realised is None else round(realised / ideal, 4),
        })
        out.append(r)
    return out


def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"


@dataclass
class BenchResult:
    """A finished benchmark: what ran where, one row per (backend, shape, merge setting)."""

    config: dict[str, Any]
    device: dict[str, Any]
    rows: list[dict]
    notes: list[str] = field(default_factory=list)
    created: str = ""
    seconds: float = 0.0
    profile: dict[str, Any] | None = None
    """Per-stage, per-op and per-kind-of-work profile (``--profile``), or None."""

    # -- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "created": self.created, "seconds": self.seconds,
                "device": self.device, "config": self.config, "notes": self.notes, "rows": self.rows,
                "profile": self.profile}

    def save_json(self, path: str | Path) -> Path:
        from catome_export.fsutil import atomic_write_json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> "BenchResult":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CatomeError(f"cannot read benchmark results {path}: {exc}") from None
        check_schema(data)
        return cls(config=data.get("config", {}), device=data["device"], rows=data["rows"],
                   notes=data.get("notes", []), created=data.get("created", ""), seconds=data.get("seconds", 0.0),
                   profile=data.get("profile"))

    # -- markdown ---------------------------------------------------------------------
    def markdown(self) -> str:
        """The latency table and the controller-overhead table."""
        lines = [
            "| backend | resolution | batch | merge | median ms | min ms | p90 ms | vs eager | vs engine@0 "
            "| ideal (FLOPs) | realised/ideal |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            merge = f"{r['merge_fraction']:.2f}" + (f" (t={r['threshold']:g})" if r.get("threshold") is not None
                                                    else "")
            lines.append(
                f"| {r['backend']} | {r['resolution']} | {r['batch']} | {merge} | {r['median_ms']:.1f} "
                f"| {r['min_ms']:.1f} | {r['p90_ms']:.1f} | {_fmt(r.get('speedup_vs_eager'), '.2f', 'x')} "
                f"| {_fmt(r.get('speedup_vs_engine0'), '.2f', 'x')} | {_fmt(r.get('ideal_speedup'), '.3f', 'x')} "
                f"| {_fmt(r.get('realised_over_ideal'), '.2f')} |"
            )
        ctrl = [r for r in self.rows if r.get("controller", {}).get("cached_ms") is not None]
        if ctrl:
            lines += [
                "",
                "| backend | resolution | merge | cached step ms | controller ms | share | checkpoint step ms "
                "| controller ms | share | outside stages (cached / checkpoint) |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in ctrl:
                c = r["controller"]
                outside = "-"
                if c.get("outside_stages_cached_share") is not None:
                    outside = f"{100 * c['outside_stages_cached_share']:.2f} % / " + \
                        _fmt(None if c.get("outside_stages_checkpoint_share") is None
                             else 100 * c["outside_stages_checkpoint_share"], ".2f", " %")
                lines.append(
                    f"| {r['backend']} | {r['resolution']} | {r['merge_fraction']:.2f} | {r['median_ms']:.1f} "
                    f"| {c['cached_ms']:.2f} | {_fmt(None if c['cached_share'] is None else 100 * c['cached_share'], '.2f', ' %')} "
                    f"| {_fmt(r.get('checkpoint_median_ms'), '.1f')} | {_fmt(c.get('checkpoint_ms'), '.2f')} "
                    f"| {_fmt(None if c.get('checkpoint_share') is None else 100 * c['checkpoint_share'], '.2f', ' %')} "
                    f"| {outside} |"
                )
        if self.profile:
            from catome_export.bench.profile import profile_markdown

            lines += ["", f"Profile at {self.profile['resolution']} px, batch {self.profile['batch']} "
                      f"(kernel ms per call, {self.profile['calls']} cached calls; profiling adds overhead):", "",
                      profile_markdown(self.profile)]
        return "\n".join(lines) + "\n"

    def header(self) -> str:
        d = self.device
        load = f"load avg {d.get('load_average_1min_before')} -> {d.get('load_average_1min_after')}"
        gpu = f", GPU {d['gpu']['name']}" if d.get("gpu") else ""
        return (f"{d.get('cpu')} ({d.get('physical_cores')} cores), {d.get('threads')} threads{gpu}; "
                f"torch {d.get('torch')}, onnxruntime {d.get('onnxruntime')}; {load}")

    # -- plot -------------------------------------------------------------------------
    def save_plot(self, path: str | Path) -> Path:
        """Latency against merge fraction, one line per backend and resolution (PNG, written atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from catome_export.fsutil import atomic_write_bytes

        path = Path(path)
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
        try:
            resolutions = sorted({r["resolution"] for r in self.rows})
            fractions = sorted({r["merge_fraction"] for r in self.rows}) or [0.0]
            span = (min(fractions), max(max(fractions), 0.05))
            for res in resolutions:
                suffix = f" {res}px" if len(resolutions) > 1 else ""
                by_backend: dict[str, list[dict]] = {}
                for r in self.rows:
                    if r["resolution"] == res and r.get("threshold") is None:
                        by_backend.setdefault(r["backend"], []).append(r)
                for backend, rows in by_backend.items():
                    rows.sort(key=lambda r: r["merge_fraction"])
                    xs = [r["merge_fraction"] for r in rows]
                    ys = [r["median_ms"] for r in rows]
                    if len(rows) == 1:
                        (line,) = ax.plot(span, [ys[0], ys[0]], "--", label=f"{backend}{suffix}")
                        ax.plot(xs, ys, "o", color=line.get_color())
                    else:
                        ax.plot(xs, ys, "o-", label=f"{backend}{suffix}")
                engine0 = [r for r in by_backend.get("engine", []) if r["merge_fraction"] == 0]
                if engine0 and len(by_backend.get("engine", [])) > 1:
                    pts = sorted(by_backend["engine"], key=lambda r: r["merge_fraction"])
                    ax.plot([r["merge_fraction"] for r in pts],
                            [engine0[0]["median_ms"] / r["ideal_speedup"] for r in pts], ":",
                            label=f"engine ideal (FLOPs){suffix}")
                for r in self.rows:
                    if r["resolution"] == res and r.get("threshold") is not None:
                        ax.plot([r["merge_fraction"]], [r["median_ms"]], "x", markersize=9,
                                label=f"{r['backend']} t={r['threshold']:g}{suffix}")
            batch = sorted({r["batch"] for r in self.rows})
            ax.set_xlabel("merge fraction (share of src tokens merged at each site)")
            ax.set_ylabel("median ms per U-Net call (cached step)")
            model = self.config.get("model", "")
            ax.set_title(f"{model} batch {', '.join(map(str, batch))}, {self.config.get('precision', '')}, "
                         f"{self.device.get('threads')} threads", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
        finally:
            plt.close(fig)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
        return path


def check_schema(data: Any) -> None:
    """CatomeError unless ``data`` has the benchmark JSON's required structure."""
    if not isinstance(data, dict) or not isinstance(data.get("device"), dict) or not isinstance(data.get("rows"), list):
        raise CatomeError("benchmark JSON must be an object with a 'device' object and a 'rows' list")
    for i, row in enumerate(data["rows"]):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise CatomeError(f"benchmark row {i} lacks {missing}")
