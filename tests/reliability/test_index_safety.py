"""Index safety on a real engine: a bad plan is a CatomeError in Python, never an input of a graph.

The runtime's only source of plans is its own controller, built with
``validate=True``: every plan it makes is checked (shapes, dtypes, ranges,
coverage, unmerge and weight consistency) before the stage that merges
with it runs, and a cached plan is reused only on inputs of the batch,
token count and grid it was matched on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.merging import MergePlan, MergeSettings, parse_schedule

TEXT = (77, 32)


class RecordingRunner:
    """Wraps a stage runner and notes which stages ran."""

    def __init__(self, inner: Any, ran: list[int]) -> None:
        self._inner = inner
        self.spec = inner.spec
        self._ran = ran

    def run(self, feeds):
        self._ran.append(self.spec.index)
        return self._inner.run(feeds)

    def close(self) -> None:
        self._inner.close()


def smooth(batch: int, latent: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blurred latents (self-similar tokens, so the tiny model really merges) and text embeddings."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, *latent, generator=gen)
    sample = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False) * 3
    return sample, torch.randn(batch, *TEXT, generator=gen)


@pytest.fixture
def runtime(ort_runtime, monkeypatch):
    """The module's ORT runtime with fresh caches and recording runners (``runtime.ran``: stage indices)."""
    ran: list[int] = []
    monkeypatch.setattr(ort_runtime.chain, "runners", [RecordingRunner(r, ran) for r in ort_runtime.chain.runners])
    monkeypatch.setattr(ort_runtime, "ran", ran, raising=False)
    ort_runtime.set_settings(replace(ort_runtime.settings, threshold=0.7, ratio=None, merge_fraction=None,
                                     schedule=parse_schedule([0], 0)))
    yield ort_runtime
    ort_runtime.reset()


def _corrupt(plan: MergePlan, **changes: Any) -> MergePlan:
    fields = {n: getattr(plan, n) for n in ("keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx", "num_merged")}
    fields.update(changes)
    return MergePlan(**fields)


CORRUPTIONS: dict[str, Callable[[MergePlan], MergePlan]] = {
    "index-out-of-range": lambda p: _corrupt(p, unmerge_idx=p.unmerge_idx + p.num_kept),
    "negative-index": lambda p: _corrupt(p, keep_idx=p.keep_idx - 1),
    "wrong-dtype": lambda p: _corrupt(p, slot_idx=p.slot_idx.to(torch.int32)),
    "wrong-shape": lambda p: _corrupt(p, weight=p.weight[:, 1:]),
    "duplicated-token": lambda p: _corrupt(p, src_idx=p.keep_idx[:, : p.num_merged].clone()),
    "wrong-count": lambda p: _corrupt(p, num_merged=p.num_merged + 1),
}


def test_the_runtime_controller_validates(runtime):
    assert runtime.controller.validate is True
    step_base = runtime.settings.schedule.step_base
    runtime.set_settings(replace(runtime.settings, schedule=parse_schedule("config3", step_base)))
    assert runtime.controller.validate is True


@pytest.mark.parametrize("site", [0, 3])
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_bad_plan_never_reaches_a_graph(runtime, monkeypatch, site, kind):
    controller = runtime.controller
    real = controller.compute_plan
    made: list[MergePlan] = []

    def bad_for_site(x: torch.Tensor, grid: tuple[int, int]) -> MergePlan:
        plan = real(x, grid)
        if len(made) == site:  # sites are matched in order on a checkpoint step
            assert plan.num_merged > 0, "the smooth latents should merge at t = 0.7"
            plan = CORRUPTIONS[kind](plan)
        made.append(plan)
        return plan

    monkeypatch.setattr(controller, "compute_plan", bad_for_site)
    sample, text = smooth(2, (16, 16))
    with pytest.raises(CatomeError, match="merge plan"):
        runtime.unet(sample, torch.tensor(999.0), encoder_hidden_states=text)
    consumer = next(s.index for s in runtime.chain.specs if s.site == site)
    assert runtime.ran == list(range(consumer))  # stopped before the stage that would merge with it


def test_cached_plans_are_matched_again_when_the_input_changes(runtime):
    """Schedule [0]: only loop index 0 is a checkpoint; a cache that does not fit the input is never reused."""
    steps = [((2, (16, 24)), 999.0), ((2, (16, 24)), 979.0), ((1, (16, 24)), 959.0), ((1, (24, 16)), 939.0),
             ((1, (24, 16)), 919.0)]
    for (batch, latent), t in steps:
        sample, text = smooth(batch, latent)
        out = runtime.unet(sample, torch.tensor(t), encoder_hidden_states=text, return_dict=False)[0]
        assert out.shape == sample.shape and bool(torch.isfinite(out).all())
    matched = [all(rec.matched.values()) for rec in runtime.history]
    reused = [not any(rec.matched.values()) for rec in runtime.history]
    assert [rec.step for rec in runtime.history] == [0, 1, 2, 3, 4]
    # step 1 reuses; step 2 changes the batch and step 3 the grid (same token count): both match again
    assert matched == [True, False, True, True, False] and reused == [False, True, False, False, True]


def test_forced_merge_fractions_give_valid_plans_at_every_shape(runtime):
    """r from 0 to every src token, at the smallest and largest built sizes: every plan validates and runs."""
    for fraction in (0.0, 1.0):
        runtime.set_settings(MergeSettings(threshold=None, merge_fraction=fraction, schedule=parse_schedule([0], 0)))
        for batch, latent in ((1, (16, 16)), (2, (24, 24)), (1, (16, 24))):
            runtime.reset()
            sample, text = smooth(batch, latent)
            out = runtime.unet(sample, torch.tensor(999.0), encoder_hidden_states=text, return_dict=False)[0]
            assert bool(torch.isfinite(out).all())
            merged = runtime.history[-1].merged
            assert (max(merged.values()) > 0) == (fraction > 0)


def test_controller_cannot_be_swapped_for_one_without_validation(runtime):
    from catome_export.merging import MergeController

    assert runtime.controller.validate
    with pytest.raises(AttributeError):
        runtime.controller = MergeController(runtime.settings, len(runtime.sites), validate=False)
    runtime.set_settings(runtime.settings)
    assert runtime.controller.validate
