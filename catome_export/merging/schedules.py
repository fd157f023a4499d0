"""Checkpoint schedules: at which steps a merge site recomputes its matching.

A schedule is a set of step numbers. With ``step_base`` 1 (the default, as
the authors' code ran) loop index i is step number i + 1, so an entry k fires
at loop index k - 1 and entry 0 never fires; with ``step_base`` 0 (as the
paper's lists read) entry k fires at loop index k. Either way a site with no
cache yet always computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Union

from catome_export.checks import is_int
from catome_export.errors import CatomeError

NAMED_SCHEDULES: dict[str, tuple[int, ...]] = {
    "config1": (0, 1, 2, 3, 5, 10, 15, 25, 35),
    "config2": (0, 10, 11, 12, 15, 20, 25, 30, 35, 45),
    "config3": (0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49),
    "config4": (0, 9, 13, 14, 15, 28, 29, 32, 36, 45),
    "adaptive": (0, 1, 5, 7, 10, 12, 15, 35, 40, 45, 46, 47, 48, 49, 50, 51),
    "config_five": (0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50),
}
"""The paper's Table II lists and the authors' package's extra lists."""

EVERY_STEP = "every_step"
_ALIASES = {"config_1": "config1", "config_2": "config2", "config_3": "config3", "config_4": "config4",
            "configfive": "config_five", "everystep": EVERY_STEP, "none": EVERY_STEP}

ScheduleSpec = Union[str, Iterable[int], "Schedule"]


@dataclass(frozen=True)
class Schedule:
    """A checkpoint schedule. ``checkpoints`` is None for every step (no caching)."""

    name: str
    """Schedule name (a named list, ``every_step``, or ``custom``)."""
    checkpoints: tuple[int, ...] | None
    """Sorted step numbers at which matching is recomputed; None = every step."""
    step_base: int = 1
    """Step number of loop index 0: 1 as the authors' code ran, 0 as the paper's lists read."""

    def step_number(self, loop_index: int) -> int:
        return loop_index + self.step_base

    def is_checkpoint(self, loop_index: int) -> bool:
        """Whether matching is recomputed at 0-based loop index ``loop_index``."""
        if self.checkpoints is None:
            return True
        return self.step_number(loop_index) in self._set

    @property
    def _set(self) -> frozenset[int]:
        return frozenset(self.checkpoints or ())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoints": list(self.checkpoints) if self.checkpoints is not None else None,
                "step_base": self.step_base}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Schedule":
        cps = data.get("checkpoints")
        return cls(name=str(data["name"]), checkpoints=None if cps is None else tuple(int(c) for c in cps),
                   step_base=int(data.get("step_base", 1)))

    def describe(self) -> str:
        if self.checkpoints is None:
            return f"{self.name} (matching at every step)"
        return f"{self.name} {list(self.checkpoints)} (step_base {self.step_base})"


def _check_step_base(step_base: object) -> int:
    if isinstance(step_base, bool) or step_base not in (0, 1):
        raise CatomeError(f"step_base must be 0 (paper numbering) or 1 (authors' code), got {step_base!r}")
    return int(step_base)


def _check_list(values: Iterable[object], source: str) -> tuple[int, ...]:
    out: list[int] = []
    for v in values:
        if not is_int(v):
            try:
                if isinstance(v, str) and v.strip().lstrip("-").isdigit():
                    v = int(v.strip())
                else:
                    raise ValueError
            except ValueError:
                raise CatomeError(f"schedule {source}: {v!r} is not an integer step number") from None
        if v < 0:
            raise CatomeError(f"schedule {source}: step numbers must be >= 0, got {v}")
        out.append(int(v))
    if not out:
        raise CatomeError(f"schedule {source} is empty: give at least one step number, or 'every_step'")
    dups = sorted({v for v in out if out.count(v) > 1})
    if dups:
        raise CatomeError(f"schedule {source} repeats step numbers {dups}: list each step once")
    return tuple(sorted(out))


def parse_schedule(spec: ScheduleSpec, step_base: int = 1) -> Schedule:
    """A :class:`Schedule` from a name, a comma-separated string, a list of ints, or a Schedule.

    Names: config1, config2, config3, config4, adaptive, config_five, every_step.
    """
    step_base = _check_step_base(step_base)
    if isinstance(spec, Schedule):
        return Schedule(spec.name, spec.checkpoints, step_base)
    if isinstance(spec, str):
        key = spec.strip().lower()
        names = ", ".join([*NAMED_SCHEDULES, EVERY_STEP])
        if not key:
            raise CatomeError(f"the schedule is empty: name one ({names}) or list step numbers like 0,10,20")
        key = _ALIASES.get(key, key)
        if key == EVERY_STEP:
            return Schedule(EVERY_STEP, None, step_base)
        if key in NAMED_SCHEDULES:
            return Schedule(key, NAMED_SCHEDULES[key], step_base)
        if key.startswith(AUTO_PREFIX):
            raise CatomeError(
                f"schedule {spec!r} needs a calibration run: pass it to apply_catome or build, "
                "which calibrate on the model"
            )
        if any(ch.isdigit() for ch in key) and all(ch.isdigit() or ch in ", -[]" for ch in key):
            parts = [p for p in key.strip("[]").replace(" ", ",").split(",") if p]
            return Schedule("custom", _check_list(parts, repr(spec)), step_base)
        raise CatomeError(f"unknown schedule {spec!r}: use one of {names}, or a list of step numbers like 0,10,20")
    if isinstance(spec, (list, tuple, range)):
        return Schedule("custom", _check_list(spec, repr(list(spec))), step_base)
    raise CatomeError(f"schedule must be a name or a list of step numbers, got {type(spec).__name__}")


AUTO_PREFIX = "auto:"
"""Prefix of a calibrated schedule spec: ``auto:K`` with K checkpoints."""


@dataclass(frozen=True)
class AutoSchedule:
    """``auto:K``: a schedule of K checkpoints that is calibrated on the model before use.

    It holds the request until calibration (``catome_export.analysis.calibrate``)
    turns it into a :class:`Schedule`; nothing runs with it directly.
    """

    checkpoints: int
    """K, the number of checkpoints (an int >= 1; checked against the steps at calibration)."""
    step_base: int = 1

    @property
    def name(self) -> str:
        return f"{AUTO_PREFIX}{self.checkpoints}"


ScheduleRequest = Union[Schedule, AutoSchedule]
"""A parsed schedule spec: a ready schedule, or an ``auto:K`` one still to calibrate."""


def parse_auto_spec(spec: object) -> int | None:
    """K of an ``auto:K`` spec, None for any other spec; a malformed ``auto:`` spec is a CatomeError.

    Checks only the form (K an int >= 1); calibration checks K against the steps.
    """
    if isinstance(spec, AutoSchedule):
        return spec.checkpoints
    if not isinstance(spec, str):
        return None
    key = spec.strip().lower()
    if not key.startswith(AUTO_PREFIX):
        return None
    text = key[len(AUTO_PREFIX):].strip()
    if not text.isdigit() or int(text) < 1:
        raise CatomeError(
            f"schedule {spec!r}: write auto:K with K the number of checkpoints, an int >= 1 (e.g. auto:13)"
        )
    return int(text)


def parse_schedule_request(spec: ScheduleSpec | AutoSchedule, step_base: int = 1) -> ScheduleRequest:
    """Any schedule spec: an :class:`AutoSchedule` for ``auto:K``, else what :func:`parse_schedule` gives."""
    k = parse_auto_spec(spec)
    if k is not None:
        return AutoSchedule(k, _check_step_base(step_base))
    return parse_schedule(spec, step_base)  # type: ignore[arg-type]  # an AutoSchedule has returned above
