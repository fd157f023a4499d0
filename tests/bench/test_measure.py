"""The measuring protocol (warm-up, cached and checkpoint calls) and the targets it drives."""

from __future__ import annotations

import pytest
import torch

from catome_export.bench.measure import BENCH_SCHEDULE, Inputs, Job, measure, measure_interleaved, measure_loop
from catome_export.bench.targets import CallStats, EagerMergeTarget, EagerTarget, Target
from catome_export.merging import MergeSettings, parse_schedule


class FakeTarget(Target):
    """Counts calls; 'matches' on the first call of each generation, as a cached schedule does."""

    name = "fake"
    merges = True

    def __init__(self, log: list[str] | None = None, name: str = "") -> None:
        super().__init__(torch.device("cpu"))
        self.log: list[str] = [] if log is None else log
        self.tag = name
        self.since_reset = 0

    def configure(self, settings):
        self.log.append("configure")

    def new_generation(self):
        self.log.append("new")
        self.since_reset = 0

    def __call__(self, sample, timestep, text, added=None):
        self.log.append("call" + self.tag)
        self.since_reset += 1
        return sample

    def last_call(self):
        first = self.since_reset == 1
        return CallStats(controller_ms=5.0 if first else 0.5, merged={0: 3}, matched={0: first},
                         stage_ms=[1.0, 2.0])


def _inputs(batch=2, hw=(16, 16), dim=32) -> Inputs:
    return Inputs(torch.zeros(batch, 4, *hw), torch.full((batch,), 500.0), torch.zeros(batch, 7, dim))


def test_protocol_order_and_phases():
    target = FakeTarget()
    timing = measure(target, MergeSettings(threshold=None, merge_fraction=0.5, schedule=BENCH_SCHEDULE),
                     _inputs(), repeats=3, warmup=2, checkpoint_repeats=2)
    assert target.log == ["configure", "new", "call", "call", "call", "call", "call", "new", "call", "new", "call"]
    assert len(timing.cached.step_ms) == 3 and len(timing.checkpoint.step_ms) == 2
    assert timing.cached.none_matched() and timing.checkpoint.all_matched()
    assert timing.cached.controller_ms() == 0.5 and timing.checkpoint.controller_ms() == 5.0
    assert timing.cached.stage_ms() == [1.0, 2.0]
    assert timing.merged == {0: 3}
    summary = timing.cached.summary
    assert summary is not None and summary.min_ms <= summary.median_ms <= summary.p90_ms


class PlainFake(FakeTarget):
    merges = False


def test_interleaved_rounds_rotate():
    log: list[str] = []
    a, b, plain = FakeTarget(log, "A"), FakeTarget(log, "B"), PlainFake(log, "P")
    settings = MergeSettings(threshold=None, merge_fraction=0.5, schedule=BENCH_SCHEDULE)
    jobs = [Job(a, settings), Job(b, settings), Job(plain, None)]
    timings = measure_interleaved(jobs, _inputs(), repeats=3, warmup=1)
    calls = [entry for entry in log if entry.startswith("call")]
    warm, rounds = calls[:3], calls[3:]
    assert warm == ["callA", "callB", "callP"]
    # each round: a checkpoint call and a cached call per merging job, one call for the plain one; rotated
    assert rounds == ["callA", "callA", "callB", "callB", "callP",
                      "callB", "callB", "callP", "callA", "callA",
                      "callP", "callA", "callA", "callB", "callB"]
    for timing in timings[:2]:
        assert len(timing.cached.step_ms) == 3 and len(timing.checkpoint.step_ms) == 3
        assert timing.cached.none_matched() and timing.checkpoint.all_matched()
        assert timing.merged == {0: 3}
    assert len(timings[2].cached.step_ms) == 3 and not timings[2].checkpoint.step_ms


def test_loop_counts_checkpoints():
    target = FakeTarget()
    loop = measure_loop(target, MergeSettings(threshold=None, merge_fraction=0.5), _inputs(), steps=4)
    assert loop["steps"] == 4 and loop["checkpoint_steps"] == 1 and loop["controller_ms"] == pytest.approx(6.5)


def test_eager_catome_caches_and_tome_matches(fresh_tiny_unet):
    """Timed cached calls reuse the plans; checkpoint calls match; ToMe matches every call."""
    inputs = _inputs(batch=1, hw=(8, 8))
    catome = EagerMergeTarget(fresh_tiny_unet, "eager-catome")
    try:
        timing = measure(catome, MergeSettings(threshold=None, merge_fraction=0.5, schedule=BENCH_SCHEDULE),
                         inputs, repeats=2, warmup=1, checkpoint_repeats=1)
    finally:
        catome.close()
    assert timing.cached.none_matched() and timing.checkpoint.all_matched()
    assert timing.merged == {i: 24 for i in range(5)}  # 8x8: 48 src, half merged
    assert timing.checkpoint.controller_ms() > timing.cached.controller_ms() > 0
    assert not hasattr(fresh_tiny_unet, "_forward_pre_hooks") or not fresh_tiny_unet._forward_pre_hooks

    tome = EagerMergeTarget(fresh_tiny_unet, "eager-tome")
    try:
        timing = measure(tome, MergeSettings(threshold=None, merge_fraction=0.5, schedule=parse_schedule("every_step")),
                         inputs, repeats=2, warmup=1, checkpoint_repeats=0)
    finally:
        tome.close()
    assert all(all(c.matched.values()) for c in timing.cached.calls)


def test_eager_target_matches_the_model(tiny_unet):
    inputs = _inputs(batch=1, hw=(8, 8))
    out = EagerTarget(tiny_unet)(inputs.sample, inputs.timestep, inputs.text)
    with torch.no_grad():
        ref = tiny_unet(inputs.sample, inputs.timestep, inputs.text).sample
    assert torch.equal(out, ref)
