"""Derived columns, the markdown table, the JSON schema and the plot of a benchmark result."""

from __future__ import annotations

import json

import pytest

from catome_export.bench.flops import ideal_speedup
from catome_export.bench.measure import BENCH_SCHEDULE
from catome_export.bench.report import BenchResult, check_schema, derive_columns
from catome_export.errors import CatomeError
from catome_export.merging import MergeSettings
from catome_export.models.registry import bundled_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(backend: str, fraction: float, ms: float, merged: int = 0, threshold: float | None = None) -> dict:
    return {"backend": backend, "resolution": 128, "latent": [16, 16], "batch": 2, "merge_fraction": fraction,
            "threshold": threshold, "merged": {str(i): merged for i in range(5)} if merged else {},
            "median_ms": ms, "min_ms": ms * 0.9, "p90_ms": ms * 1.1,
            "controller": {"cached_ms": 0.1 if backend != "eager" else None, "cached_share": 0.001,
                           "checkpoint_ms": 2.0, "checkpoint_share": 0.02}}


def _rows() -> list[dict]:
    # 16x16 grid, 2x2 cells: 64 dst, 192 src; f = 0.5 -> r = 96
    return [_row("eager", 0.0, 200.0), _row("engine", 0.0, 100.0), _row("engine", 0.5, 80.0, merged=96),
            _row("eager-catome", 0.5, 150.0, merged=96), _row("engine", 0.4, 90.0, merged=77, threshold=0.7)]


def _derived() -> list[dict]:
    settings = MergeSettings(threshold=None, merge_fraction=0.0, schedule=BENCH_SCHEDULE)
    return derive_columns(_rows(), bundled_config("tiny"), 77, settings)


def test_derived_columns():
    rows = _derived()
    eager, engine0, engine5, catome5, adaptive = rows
    assert eager["speedup_vs_eager"] == 1.0 and eager["ideal_speedup"] == 1.0
    assert engine0["speedup_vs_eager"] == 2.0 and engine0["speedup_vs_engine0"] == 1.0
    assert engine5["speedup_vs_eager"] == 2.5 and engine5["speedup_vs_engine0"] == 1.25
    ideal = ideal_speedup(bundled_config("tiny"), (16, 16), 2, 0.5)
    assert engine5["ideal_speedup"] == pytest.approx(ideal, abs=1e-4)
    assert engine5["realised_speedup"] == 1.25
    assert engine5["realised_over_ideal"] == pytest.approx(1.25 / ideal, abs=1e-3)
    # no eager-catome row at fraction 0: no realised speedup of its own, but one against eager
    assert catome5["realised_speedup"] is None and catome5["speedup_vs_eager"] == pytest.approx(200 / 150, abs=1e-4)
    # a threshold row is never the fraction-0 reference, and its ideal comes from its own r
    assert 1.0 < adaptive["ideal_speedup"] < engine5["ideal_speedup"]
    assert engine5["gmacs"] < engine0["gmacs"]


def test_markdown_lists_every_row():
    result = BenchResult(config={"model": "tiny"}, device={"cpu": "x", "threads": 1}, rows=_derived())
    text = result.markdown()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert sum(line.startswith("| engine |") for line in table) == 3 + 3  # latency + controller tables
    assert "| eager | 128 | 2 | 0.00 | 200.0 |" in text
    assert "0.40 (t=0.7)" in text
    assert "2.50x" in text and "1.25x" in text


def test_json_round_trip_and_plot(tmp_path):
    result = BenchResult(config={"model": "tiny", "precision": "fp32"}, device={"cpu": "x", "threads": 1},
                         rows=_derived(), notes=["n"])
    path = result.save_json(tmp_path / "sub" / "r.json")
    data = json.loads(path.read_text())
    check_schema(data)
    assert data["rows"][2]["speedup_vs_engine0"] == 1.25
    again = BenchResult.load_json(path)
    assert again.rows == result.rows and again.notes == ["n"]
    png = result.save_plot(tmp_path / "r.png")
    blob = png.read_bytes()
    assert blob.startswith(PNG_SIGNATURE) and len(blob) > 5000
    assert not list(tmp_path.glob(".*.tmp"))


def test_schema_errors(tmp_path):
    with pytest.raises(CatomeError, match="rows"):
        check_schema({"device": {}})
    with pytest.raises(CatomeError, match="lacks"):
        check_schema({"device": {}, "rows": [{"backend": "eager"}]})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(CatomeError, match="cannot read"):
        BenchResult.load_json(bad)
