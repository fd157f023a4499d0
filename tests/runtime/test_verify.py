"""``verify_engine`` on a real tiny build, and the report's verdict, table and JSON."""

from __future__ import annotations

import json

import pytest

from catome_export.errors import CatomeError
from catome_export.runtime.runtime import Runtime
from catome_export.runtime.verify import VerifyReport, VerifyRow, verify_engine

ORT_OPTIONS = {"intra_op_threads": 1}


def _row(step: int, diff: float, merged=None, eager=None, matched=True, slack=None) -> VerifyRow:
    merged = {0: 5, 1: 7} if merged is None else merged
    eager = merged if eager is None else eager
    flags = {k: matched for k in merged}
    return VerifyRow(step=step, timestep=900 - step, max_abs_diff=diff, scale=2.0, limit=2e-4,
                     merged_engine=merged, merged_eager=eager, matched_engine=flags, matched_eager=dict(flags),
                     engine_ms=10.0 + step, eager_ms=20.0 + step, r_slack=slack or {})


def _report(rows) -> VerifyReport:
    return VerifyReport(engine_dir="e", backend="ort-cpu", precision="fp32", batch=2, latent_hw=(16, 16),
                        schedule="config3", tolerance=1e-4, rows=tuple(rows))


def test_report_verdicts():
    good = _report([_row(0, 1e-6), _row(1, 1.5e-4, matched=False)])  # 1.5e-4 <= 1e-4 * max(1, scale 2)
    assert good.ok and good.failed_steps == [] and good.merge_mismatch_steps == []
    assert good.engine_ms == pytest.approx(10.5) and good.eager_ms == pytest.approx(20.5)
    assert good.speedup == pytest.approx(20.5 / 10.5)
    assert "verify OK" in good.summary() and "r per site equal" in good.summary()
    too_far = _report([_row(0, 1e-6), _row(1, 3e-4)])
    assert not too_far.ok and too_far.failed_steps == [1]
    assert "above the limit at steps [1]" in too_far.summary()
    other_r = _report([_row(0, 0.0, merged={0: 5}, eager={0: 6})])
    assert not other_r.ok and other_r.merge_mismatch_steps == [0]
    assert "5*!6*" in other_r.format_table()
    within_slack = _report([_row(0, 0.0, merged={0: 5}, eager={0: 6}, slack={0: 1})])
    assert within_slack.ok and "within" in within_slack.summary()
    beyond_slack = _report([_row(0, 0.0, merged={0: 5}, eager={0: 7}, slack={0: 1})])
    assert not beyond_slack.ok
    flags_differ = VerifyRow(0, 900, 0.0, 1.0, 1e-4, {0: 5}, {0: 5}, {0: True}, {0: False})
    assert not flags_differ.ok
    nan = _report([_row(0, float("nan"))])
    assert not nan.ok
    assert not _report([]).ok


def test_verify_a_good_engine(tiny_engine):
    report = verify_engine(tiny_engine, steps=4, schedule="0,2", backend="ort", batch=1, resolution=128,
                           backend_options=ORT_OPTIONS)
    assert report.ok, report.format_table()
    assert len(report.rows) == 4 and report.batch == 1 and report.latent_hw == (16, 16)
    assert report.tolerance == 1e-4 and report.precision == "fp32" and report.backend == "ort-cpu"
    assert 0 < report.max_diff <= 1e-4 * max(1.0, max(r.scale for r in report.rows))
    # schedule 0,2 with the manifest's step_base (1): matching at loop index 0 (empty cache) and 1 (step 2)
    assert [all(r.matched_engine.values()) for r in report.rows] == [True, True, False, False]
    assert any(v > 0 for v in report.rows[0].merged_engine.values())
    assert all(r.engine_ms > 0 and r.eager_ms > 0 for r in report.rows)
    table = report.format_table()
    assert len(table.splitlines()) == 4 + 2 and "r0" in table and "r4" in table
    json.dumps(report.to_dict())


def test_a_drifting_engine_fails(tiny_engine, monkeypatch):
    original = Runtime.step

    def drifting(self, *args, **kwargs):
        return original(self, *args, **kwargs) + 1e-3

    monkeypatch.setattr(Runtime, "step", drifting)
    report = verify_engine(tiny_engine, steps=2, backend="ort", batch=1, resolution=128,
                           backend_options=ORT_OPTIONS)
    assert not report.ok and report.failed_steps == [0, 1]
    assert all(r.max_abs_diff == pytest.approx(1e-3, rel=1e-2) for r in report.rows)
    assert "verify FAILED" in report.summary()


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps"),
    ({"tolerance": -1.0}, "tolerance"),
    ({"merge_tolerance": 2.0}, "merge tolerance"),
    ({"resolution": 100}, "multiples of 8"),
    ({"batch": 3}, "batch 3 is outside the built range"),
    ({"resolution": 512}, "outside the built range"),
    ({"schedule": "config9"}, "unknown schedule"),
])
def test_bad_arguments(tiny_engine, kwargs, message):
    with pytest.raises(CatomeError, match=message):
        verify_engine(tiny_engine, backend="ort", **kwargs)
