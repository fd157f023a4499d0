"""MergeController and StepCounter: cache reuse, recompute on checkpoints, resets, step numbering."""

from __future__ import annotations

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.merging import MergeController, MergeSettings, StepCounter, match_tokens, parse_schedule

GRID = (6, 6)


def smooth_x(seed: int, batch: int = 2, channels: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, channels, *GRID, generator=gen)
    img = torch.nn.functional.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=False) + 0.2
    return img.flatten(2).transpose(1, 2).contiguous()


def run_steps(ctrl: MergeController, num_steps: int, sites: int = 2, timesteps=None) -> list[list]:
    """Drive the controller like a U-Net would; returns the plans per step and site."""
    plans = []
    for i in range(num_steps):
        ctrl.begin_step(None if timesteps is None else timesteps[i])
        plans.append([ctrl.plan_for(s, smooth_x(100 * i + s), GRID) for s in range(sites)])
    return plans


def settings(schedule="config3", step_base=1, **kw) -> MergeSettings:
    return MergeSettings(schedule=parse_schedule(schedule, step_base), **kw)


def test_cached_steps_reuse_the_checkpoint_plan():
    ctrl = MergeController(settings([0, 3], step_base=1), num_sites=2)
    plans = run_steps(ctrl, 5)
    # base 1: entry 3 fires at loop index 2; entry 0 never fires but step 0 computes (empty cache)
    assert [h.matched for h in ctrl.history] == [{0: True, 1: True}, {0: False, 1: False}, {0: True, 1: True},
                                                 {0: False, 1: False}, {0: False, 1: False}]
    for site in range(2):
        assert plans[1][site] is plans[0][site]  # same r, same tensors
        assert plans[3][site] is plans[2][site] and plans[4][site] is plans[2][site]
        assert plans[2][site] is not plans[0][site]
        assert torch.equal(plans[1][site].keep_idx, plans[0][site].keep_idx)
    assert [h.merged[0] for h in ctrl.history] == [plans[0][0].num_merged] * 2 + [plans[2][0].num_merged] * 3


def test_checkpoint_recomputes_from_that_steps_input():
    ctrl = MergeController(settings("every_step"), num_sites=1)
    plans = run_steps(ctrl, 3, sites=1)
    for i in range(3):
        expected = match_tokens(smooth_x(100 * i), GRID, threshold=0.7)
        assert plans[i][0].num_merged == expected.num_merged
        assert torch.equal(plans[i][0].unmerge_idx, expected.unmerge_idx)
    assert all(h.matched[0] for h in ctrl.history)


@pytest.mark.parametrize("base,expected", [
    (0, [True, False, False, True, False, True]),
    (1, [True, False, True, False, True, False]),
])
def test_step_base_semantics(base, expected):
    ctrl = MergeController(settings([0, 3, 5], step_base=base), num_sites=1)
    run_steps(ctrl, 6, sites=1)
    assert [h.matched[0] for h in ctrl.history] == expected
    assert [h.step for h in ctrl.history] == list(range(6))


def test_reset_clears_cache_and_history():
    ctrl = MergeController(settings([0]), num_sites=1)
    first = run_steps(ctrl, 2, sites=1)
    ctrl.reset()
    assert ctrl.history == [] and ctrl.last is None
    second = run_steps(ctrl, 2, sites=1)
    assert ctrl.history[0].step == 0 and ctrl.history[0].matched[0]
    assert second[0][0] is not first[0][0]


def test_rising_timestep_starts_a_new_generation():
    ctrl = MergeController(settings([0]), num_sites=1)
    run_steps(ctrl, 3, sites=1, timesteps=[900, 500, 100])
    plan_before = ctrl.plan_for(0, smooth_x(0), GRID)
    ctrl.begin_step(900.0)  # higher than 100: a new generation
    assert ctrl.step == 0 and len(ctrl.history) == 1
    assert ctrl.plan_for(0, smooth_x(7), GRID) is not plan_before
    assert ctrl.history[0].matched[0]


def test_repeated_timestep_counts_as_a_step():
    """PLMS calls the U-Net twice with the same timestep at its start: that is two steps."""
    ctrl = MergeController(settings("every_step"), num_sites=1)
    run_steps(ctrl, 4, sites=1, timesteps=[951, 901, 901, 851])
    assert [h.step for h in ctrl.history] == [0, 1, 2, 3]


def test_batch_change_forces_recompute():
    ctrl = MergeController(settings([0]), num_sites=1)
    ctrl.begin_step()
    p2 = ctrl.plan_for(0, smooth_x(1, batch=2), GRID)
    ctrl.begin_step()
    p1 = ctrl.plan_for(0, smooth_x(1, batch=1), GRID)
    assert p1 is not p2 and p1.batch_size == 1 and ctrl.last.matched[0]


def test_set_step_pins_the_next_index():
    ctrl = MergeController(settings([0, 5], step_base=0), num_sites=1)
    run_steps(ctrl, 2, sites=1)
    ctrl.set_step(5)
    ctrl.begin_step()
    ctrl.plan_for(0, smooth_x(3), GRID)
    assert ctrl.step == 5 and ctrl.last.matched[0]
    ctrl.begin_step()
    assert ctrl.step == 6
    ctrl.set_step(0)
    ctrl.begin_step()
    assert ctrl.step == 0 and len(ctrl.history) == 1  # index 0 starts a new generation


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_set_step_rejects_bad_values(bad):
    with pytest.raises(CatomeError):
        StepCounter().set_step(bad)


def test_ratio_mode_and_forced_fraction():
    ctrl = MergeController(MergeSettings(threshold=None, ratio=0.5, schedule=parse_schedule("every_step")), 1)
    ctrl.begin_step()
    assert ctrl.plan_for(0, smooth_x(0), GRID).num_merged == 18
    ctrl = MergeController(MergeSettings(threshold=None, merge_fraction=1.0), 1)
    ctrl.begin_step()
    assert ctrl.plan_for(0, smooth_x(0), GRID).num_merged == 36 - 9  # all src


def test_random_dst_is_reseeded_at_reset():
    s = settings("every_step", random_dst=True, seed=3)
    ctrl = MergeController(s, 1)
    first = run_steps(ctrl, 2, sites=1)
    ctrl.reset()
    second = run_steps(ctrl, 2, sites=1)
    for a, b in zip(first, second):
        assert torch.equal(a[0].keep_idx, b[0].keep_idx)
    deterministic = MergeController(settings("every_step"), 1)
    plain = run_steps(deterministic, 2, sites=1)
    assert any(not torch.equal(a[0].keep_idx, p[0].keep_idx) for a, p in zip(first, plain))


def test_validate_option_checks_new_plans():
    ctrl = MergeController(settings("every_step"), 1, validate=True)
    ctrl.begin_step()
    ctrl.plan_for(0, smooth_x(0), GRID)  # a good plan passes


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=None), "exactly one"),
    (dict(threshold=0.7, ratio=0.5), "exactly one"),
    (dict(threshold=1.2), "threshold"),
    (dict(threshold="0.7"), "threshold"),
    (dict(threshold=None, ratio=1.0), "ratio"),
    (dict(max_downsample=3), "max_downsample"),
    (dict(stride=(1, 1)), "stride"),
    (dict(stride=(2, 0)), "stride"),
    (dict(schedule="config3"), "Schedule"),
])
def test_settings_validation(kwargs, match):
    with pytest.raises(CatomeError, match=match):
        MergeSettings(**kwargs)


def test_settings_round_trip():
    s = settings([1, 4], step_base=0, random_dst=True, merge_mlp=True, stride=(3, 2))
    assert MergeSettings.from_dict(s.to_dict()) == s


def test_cached_plan_without_block_input():
    ctrl = MergeController(settings([0, 3], step_base=1), num_sites=1)
    ctrl.begin_step()
    assert ctrl.cached_plan(0, 2, GRID, torch.device("cpu")) is None  # empty cache: the site must match
    first = ctrl.plan_for(0, smooth_x(1), GRID)
    ctrl.begin_step()
    assert ctrl.cached_plan(0, 2, GRID, torch.device("cpu")) is first
    assert ctrl.history[-1].matched == {0: False} and ctrl.history[-1].merged == {0: first.num_merged}
    assert ctrl.cached_plan(0, 1, GRID, torch.device("cpu")) is None  # another batch: no usable cache
    assert ctrl.cached_plan(0, 2, (4, 9), torch.device("cpu")) is None  # same N, another grid
    ctrl.begin_step()  # loop index 2 = step number 3: a checkpoint
    assert ctrl.cached_plan(0, 2, GRID, torch.device("cpu")) is None
