"""``verify_engine`` on a real tiny build, and the report's verdict, table and JSON."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.runtime.runtime import Runtime
from catome_export.runtime.chain import StageChain
from catome_export.runtime.verify import PlanDifference, VerifyReport, VerifyRow, verify_engine

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


def test_report_near_tie_flips_and_unexplained_plan_differences():
    flip = PlanDifference(site=1, step=1, batch=0, token=550, kind="dst", explained=True, gap=6e-8, bound=4e-5,
                          detail="src 550 goes to dst 0 on the engine and 2 on eager (a near-tie)")
    flipped = replace(_row(1, 1e-6), plan_flips={1: 1}, plan_differences=(flip,))
    report = _report([_row(0, 1e-6), flipped])
    assert report.ok and report.flip_steps == [1] and report.flipped_tokens == 1 and report.plan_failure_steps == []
    assert "near-tie flips (1 tokens) at steps [1]" in report.summary()
    table = report.format_table().splitlines()
    assert table[2].split()[4:6] == ["5*", "7*~1"] and table[2].endswith(" ok") and "~" not in table[1]
    assert "near-tie: site 1, step 1, batch item 0, token 550" in report.format_differences()
    data = json.loads(json.dumps(report.to_dict()))
    assert data["flip_steps"] == [1] and data["rows"][1]["plan_flips"] == {"1": 1}
    assert data["rows"][1]["plan_differences"][0]["token"] == 550

    wrong = replace(flip, explained=False, gap=0.4, detail="src 550 goes to dst 0 on the engine and 2 on eager "
                                                           "(not a near-tie)")
    failing = replace(_row(2, 1e-6), plan_unexplained={1: 1}, plan_differences=(wrong,))
    report = _report([_row(0, 1e-6), failing])
    assert not report.ok and report.plan_failure_steps == [2]
    first_line = report.summary().splitlines()[0]
    assert "verify FAILED" in first_line and "site 1, step 1, batch item 0, token 550" in first_line
    assert "NOT a near-tie: site 1" in report.format_differences()
    assert report.format_table().splitlines()[2].split()[4:6] == ["5*", "7*?"]
    # r differing by an explained near-tie at the threshold passes; the same difference unexplained fails
    assert _report([replace(_row(0, 0.0, merged={0: 5}, eager={0: 6}), r_near_tie=frozenset({0}))]).ok


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


def _perturb_engine_matching(monkeypatch, relative: float) -> None:
    """The engine's sites match on their block input plus seeded noise of ``relative`` size.

    The stages themselves run on the true inputs; only the matching sees the nudged ones.
    """
    original = StageChain.run

    def run(self, env, plan_hook):
        def hook(site, x):
            gen = torch.Generator().manual_seed(1000 + site)
            noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
            return plan_hook(site, x + relative * x.abs().amax() * noise)
        return original(self, env, hook)

    monkeypatch.setattr(StageChain, "run", run)


def test_slightly_perturbed_engine_inputs_flip_near_ties_and_pass(tiny_engine, monkeypatch):
    _perturb_engine_matching(monkeypatch, 1e-4)
    report = verify_engine(tiny_engine, steps=3, schedule="every_step", backend="ort", batch=2, resolution=128,
                           backend_options=ORT_OPTIONS)
    assert report.ok, report.summary() + "\n" + report.format_differences()
    assert report.flipped_tokens > 0 and report.flip_steps, report.format_table()
    assert "near-tie flips" in report.summary() and "near-tie: site" in report.format_differences()
    # the outputs are compared on the engine's plans: within the usual tolerance although the plans flipped
    assert report.max_diff <= 1e-4 * max(1.0, max(r.scale for r in report.rows))


def plant_wrong_plan(monkeypatch, step: int = 1) -> list[tuple[int, int]]:
    """At loop index ``step``, the runtime's first merging site sends its first merged src to its worst dst.

    Returns the (token, dst) planted, once it has been. Only the runtime's controller (the one that
    validates its plans) is affected; eager's matching stays its own.
    """
    from catome_export.merging import MergeController, MergePlan, partition

    original = MergeController.compute_plan
    planted: list[tuple[int, int]] = []

    def compute_plan(self, x, grid):
        plan = original(self, x, grid)
        if self.validate and self.step == step and not planted and plan.num_merged:
            _, dst = partition(grid, self.settings.stride, None, x.device)
            tok = int(plan.src_idx[0, 0])
            u = x[0] / x[0].norm(dim=-1, keepdim=True)
            worst = int(dst[(u[dst] @ u[tok]).argmin()])
            slot = int((plan.keep_idx[0] == worst).nonzero())
            slot_idx = plan.slot_idx.clone()
            slot_idx[0, 0] = slot
            counts = torch.ones_like(plan.weight)
            counts.scatter_add_(1, slot_idx, torch.ones_like(slot_idx, dtype=counts.dtype))
            unmerge = plan.unmerge_idx.clone()
            unmerge[0, tok] = slot
            planted.append((tok, worst))
            plan = MergePlan(plan.keep_idx, plan.src_idx, slot_idx, 1.0 / counts, unmerge, plan.num_merged)
        return plan

    monkeypatch.setattr(MergeController, "compute_plan", compute_plan)
    return planted


def test_a_planted_wrong_plan_fails_naming_site_step_and_token(tiny_engine, monkeypatch):
    planted = plant_wrong_plan(monkeypatch)
    report = verify_engine(tiny_engine, steps=2, schedule="every_step", backend="ort", batch=1, resolution=128,
                           backend_options=ORT_OPTIONS)
    assert planted
    tok, worst = planted[0]
    # eager ran on the engine's (planted) plans, so the outputs agree; only the plan comparison fails
    assert not report.ok and report.plan_failure_steps == [1] and report.failed_steps == []
    bad = report.unexplained[0]
    assert (bad.step, bad.site, bad.token, bad.kind) == (1, 0, tok, "dst") and f"dst {worst}" in bad.detail
    assert f"site 0, step 1, batch item 0, token {tok}" in report.summary().splitlines()[0]
    assert report.to_dict()["plan_failure_steps"] == [1]


@pytest.mark.slow
def test_build_verification_fails_on_a_planted_wrong_plan_and_keeps_the_old_build(tmp_path, monkeypatch):
    from catome_export.engine.options import make_options
    from catome_export.workflows.build import run_build
    from catome_export.engine.manifest import MANIFEST_FILE

    target = tmp_path / "e"
    target.mkdir()
    (target / MANIFEST_FILE).write_text("old")
    planted = plant_wrong_plan(monkeypatch, step=0)  # the build verifies with config3: loop index 0 matches
    with pytest.raises(CatomeError, match="does not match eager CA-ToMe") as info:
        run_build(make_options("tiny", resolution=128, batch=1, out_dir=target, verify=True, verify_steps=2,
                              ort_optimize=False))
    tok, _ = planted[0]
    assert f"beyond a near-tie at steps [0] (1 step), first at site 0, step 0, batch item 0, token {tok}" \
        in str(info.value)
    assert (target / MANIFEST_FILE).read_text() == "old"


@pytest.mark.slow
def test_fifty_steps_of_config3_pass_and_list_their_flips(tiny_engine):
    """The README's check at the tiny engine's largest size: 50 DDIM steps with the manifest's schedule (config3)."""
    report = verify_engine(tiny_engine, steps=50, backend="ort", batch=2, resolution=192, backend_options=ORT_OPTIONS)
    assert report.schedule.startswith("config3") and len(report.rows) == 50
    assert report.ok, report.summary() + "\n" + report.format_differences()
    matched_steps = [r.step for r in report.rows if any(r.matched_engine.values())]
    assert set(report.flip_steps) <= set(matched_steps)  # plans are compared where sites match
    summary = report.summary()
    if report.flip_steps:
        assert f"near-tie flips ({report.flipped_tokens} tokens)" in summary
    else:
        assert "plans equal to eager's own at every match" in summary


R_MULTIPLE = 16
"""q for the tiny engine at 128 px: 256 tokens (192 src) per top-level site, so at most 13 values of r."""


def test_r_multiple_engine_equals_eager_through_verify(tiny_engine):
    common = dict(steps=3, schedule="every_step", backend="ort", batch=2, resolution=128,
                  backend_options=ORT_OPTIONS)
    raw = verify_engine(tiny_engine, **common)
    report = verify_engine(tiny_engine, r_multiple=R_MULTIPLE, **common)
    assert report.ok, report.summary() + "\n" + report.format_differences()
    assert report.r_multiple == R_MULTIPLE and report.to_dict()["r_multiple"] == R_MULTIPLE
    assert f"r rounded down to multiples of {R_MULTIPLE}" in report.summary()
    rounded = [r for row in report.rows for r in row.merged_engine.values()]
    assert all(r % R_MULTIPLE == 0 for r in rounded) and any(rounded)
    counted = [r for row in raw.rows for r in row.merged_engine.values()]
    assert any(r % R_MULTIPLE for r in counted)  # the rounding really changed r at these inputs
    # eager's own matching rounds alike: the r columns agree site by site and step by step
    assert all(row.merged_engine == row.merged_eager for row in report.rows)
    assert raw.r_multiple == 1 and "rounded" not in raw.summary()


def test_r_multiple_a_difference_that_is_no_near_tie_still_fails(tiny_engine, monkeypatch):
    """The engine's controller merges one multiple of q fewer at loop index 1: rounded alike on both sides,
    the difference is still no near-tie, and verify names it."""
    from catome_export.merging import MergeController, match_tokens

    original = MergeController.compute_plan
    lowered: list[tuple[int, int]] = []

    def compute_plan(self, x, grid):
        plan = original(self, x, grid)
        if self.validate and self.step == 1 and plan.num_merged >= R_MULTIPLE:
            lowered.append((plan.num_merged, plan.num_merged - R_MULTIPLE))
            return match_tokens(x, grid, num_merged=plan.num_merged - R_MULTIPLE, stride=self.settings.stride)
        return plan

    monkeypatch.setattr(MergeController, "compute_plan", compute_plan)
    report = verify_engine(tiny_engine, steps=2, schedule="every_step", backend="ort", batch=1, resolution=128,
                           backend_options=ORT_OPTIONS, r_multiple=R_MULTIPLE)
    assert lowered
    assert not report.ok and report.merge_mismatch_steps == [1] and report.failed_steps == []
    r_diffs = [d for d in report.rows[1].plan_differences if d.kind == "r"]
    assert r_diffs and not any(d.explained for d in r_diffs)
    assert "not a near-tie" in r_diffs[0].detail and f"multiples of {R_MULTIPLE}" in r_diffs[0].detail
    assert "r or matching differ from eager at steps [1]" in report.summary()
