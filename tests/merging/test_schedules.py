"""Checkpoint schedules: the named lists, step_base semantics, and malformed input."""

from __future__ import annotations

import pytest

from catome_export.errors import CatomeError
from catome_export.merging import NAMED_SCHEDULES, AutoSchedule, Schedule, parse_schedule, parse_schedule_request

# The lists of catome-semantics.md (paper Table II and the authors' package), typed in again here.
SPEC_LISTS = {
    "config1": [0, 1, 2, 3, 5, 10, 15, 25, 35],
    "config2": [0, 10, 11, 12, 15, 20, 25, 30, 35, 45],
    "config3": [0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49],
    "config4": [0, 9, 13, 14, 15, 28, 29, 32, 36, 45],
    "adaptive": [0, 1, 5, 7, 10, 12, 15, 35, 40, 45, 46, 47, 48, 49, 50, 51],
    "config_five": [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50],
}


@pytest.mark.parametrize("name", sorted(SPEC_LISTS))
def test_named_schedules_equal_the_spec(name):
    assert list(NAMED_SCHEDULES[name]) == SPEC_LISTS[name]
    sched = parse_schedule(name)
    assert sched.name == name and list(sched.checkpoints) == SPEC_LISTS[name]


def test_no_extra_named_schedules():
    assert set(NAMED_SCHEDULES) == set(SPEC_LISTS)


@pytest.mark.parametrize("alias,name", [("CONFIG_3", "config3"), (" Config3 ", "config3"), ("config_1", "config1"),
                                        ("configfive", "config_five")])
def test_aliases(alias, name):
    assert parse_schedule(alias).name == name


@pytest.mark.parametrize("spec", ["every_step", "none", "EVERY_STEP"])
def test_every_step(spec):
    sched = parse_schedule(spec)
    assert sched.checkpoints is None
    assert all(sched.is_checkpoint(i) for i in range(60))


def fired(sched: Schedule, steps: int = 55) -> list[int]:
    return [i for i in range(steps) if sched.is_checkpoint(i)]


def test_step_base_1_fires_entry_k_at_loop_index_k_minus_1():
    sched = parse_schedule("config3", step_base=1)
    assert fired(sched) == [k - 1 for k in SPEC_LISTS["config3"] if k > 0]
    assert not sched.is_checkpoint(0)  # entry 0 never fires (step numbers start at 1)


def test_step_base_0_fires_entry_k_at_loop_index_k():
    sched = parse_schedule("config3", step_base=0)
    assert fired(sched) == SPEC_LISTS["config3"]
    assert sched.is_checkpoint(0)


def test_step_numbers():
    assert parse_schedule("config1", 1).step_number(0) == 1
    assert parse_schedule("config1", 0).step_number(0) == 0


@pytest.mark.parametrize("spec,expected", [
    ("0,10,20", [0, 10, 20]), ("20 10 0", [0, 10, 20]), ("[3, 1]", [1, 3]), ([5, 2], [2, 5]), (range(3), [0, 1, 2]),
    (["4", "2"], [2, 4]),
])
def test_custom_lists(spec, expected):
    sched = parse_schedule(spec)
    assert sched.name == "custom" and list(sched.checkpoints) == expected


@pytest.mark.parametrize("spec,match", [
    ([], "empty"),
    ("", "the schedule is empty"),
    ("   ", "the schedule is empty"),
    ([1, -2], ">= 0"),
    ("1,-2", ">= 0"),
    ([1, 1], "repeats"),
    ("3,3", "repeats"),
    ("config9", "unknown schedule"),
    ("fast", "unknown schedule"),
    ([1.5], "not an integer"),
    (["a"], "not an integer"),
    ([True], "not an integer"),
    ("1.5,2", "unknown schedule"),
    (3, "name or a list"),
    (None, "name or a list"),
])
def test_malformed_schedules_are_rejected(spec, match):
    with pytest.raises(CatomeError, match=match):
        parse_schedule(spec)


@pytest.mark.parametrize("base", [2, -1, "1", True, None])
def test_bad_step_base(base):
    with pytest.raises(CatomeError, match="step_base"):
        parse_schedule("config3", step_base=base)


def test_auto_schedule_needs_calibration():
    with pytest.raises(CatomeError, match="calibration"):
        parse_schedule("auto:4")


def test_schedule_requests_hold_auto_until_calibration():
    """Every spec is parsed in one place: auto:K becomes an AutoSchedule (K and step_base), the rest a Schedule."""
    assert parse_schedule_request(" Auto:4 ", 0) == AutoSchedule(4, step_base=0)
    assert parse_schedule_request(AutoSchedule(2), 1).name == "auto:2"
    assert parse_schedule_request("config3", 0) == parse_schedule("config3", 0)
    assert parse_schedule_request([3, 1], 1) == Schedule("custom", (1, 3), 1)
    for bad in ("auto:", "auto:0", "auto:-2", "auto:x"):
        with pytest.raises(CatomeError, match="auto:K"):
            parse_schedule_request(bad)
    with pytest.raises(CatomeError, match="step_base"):
        parse_schedule_request("auto:3", 2)


def test_round_trip():
    for spec in ("config3", "every_step", [1, 4, 9]):
        for base in (0, 1):
            sched = parse_schedule(spec, base)
            assert Schedule.from_dict(sched.to_dict()) == sched


def test_rebasing_a_schedule():
    sched = parse_schedule("config2", 1)
    rebased = parse_schedule(sched, 0)
    assert rebased.checkpoints == sched.checkpoints and rebased.step_base == 0
