"""CUDA-graph cache of the stage chain: keys, invalidation, and the copy-new-plans-into-static-buffers rule.

The rule is checked on CPU with an eager stand-in for graph capture that, like
a CUDA graph, reads its inputs from the static buffers it was captured with;
the same checks run with real CUDA graphs where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.merging import match_tokens, merge_tokens, unmerge_tokens
from catome_export.runtime.cuda_graphs import (
    ChainGraphCache, ChainGraphRunner, GraphChain, GraphEntry, GraphKey, TorchCudaGraphCapture, same_version,
    site_of, stage_chain,
)

GRID = (6, 8)


def chain(inputs):
    """A one-site chain that really uses every plan tensor: merge, a token-wise op, unmerge."""
    x = inputs["sample"]
    y = merge_tokens(x, inputs["site0_keep_idx"], inputs["site0_src_idx"], inputs["site0_slot_idx"],
                     inputs["site0_weight"])
    y = y * 2.0 + inputs["timestep"][:, None, None]
    return {"noise_pred": unmerge_tokens(y, inputs["site0_unmerge_idx"])}


def pure_chain() -> GraphChain:
    """The test chain holds no execution state: every graph may share it."""
    return GraphChain(chain)


def _plan(seed: int, r: int, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, GRID[0] * GRID[1], 8, generator=gen)
    return match_tokens(metric, GRID, num_merged=r).to(device)


def _inputs(seed: int, plan, device="cpu"):
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(2, GRID[0] * GRID[1], 4, generator=gen).to(device)
    inputs = {"sample": x, "timestep": torch.tensor([float(seed), 1.0], device=device)}
    inputs.update(zip((f"site0_{n}" for n in ("keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx")),
                      plan.tensors()))
    return inputs


def _key(plan):
    return ChainGraphCache.key(2, GRID, [plan.num_merged])


def test_key_is_shapes_only():
    assert ChainGraphCache.key(2, (64, 64), [10, 0, 3]) == ChainGraphCache.key(2, (64, 64), {2: 3, 0: 10, 1: 0})
    assert ChainGraphCache.key(2, (64, 64), [10, 0, 3]) != ChainGraphCache.key(2, (64, 64), [10, 0, 4])
    assert ChainGraphCache.key(2, (64, 64), [1]) != ChainGraphCache.key(1, (64, 64), [1])
    assert ChainGraphCache.key(2, (64, 48), [1]) != ChainGraphCache.key(2, (48, 64), [1])
    with pytest.raises(CatomeError):
        ChainGraphCache.key(0, (64, 64), [1])
    with pytest.raises(CatomeError):
        ChainGraphCache.key(1, (64, 64), [-1])


def test_site_of_and_versions():
    assert site_of("site12_keep_idx") == 12 and site_of("sample") is None and site_of("x3") is None
    p = object()
    assert same_version(p, p) and not same_version(p, object())
    assert same_version(7, 7) and not same_version(7, 8) and not same_version(7, "7")


def _entry(key, versions=None):
    return GraphEntry(key, None, {}, {}, dict(versions or {}))


def test_lru_eviction_and_invalidation():
    cache = ChainGraphCache(max_entries=2)
    k1, k2, k3 = (ChainGraphCache.key(1, (8, 8), [r]) for r in (1, 2, 3))
    cache.insert(_entry(k1))
    cache.insert(_entry(k2))
    assert cache.lookup(k1) is not None  # k1 is now the most recently used
    evicted = cache.insert(_entry(k3))
    assert [e.key for e in evicted] == [k2]
    assert cache.keys() == [k1, k3]
    assert cache.lookup(k2) is None and (cache.hits, cache.misses) == (1, 1)
    assert cache.invalidate(k1) == 1 and cache.invalidate(k1) == 0
    cache.insert(_entry(k1))
    assert cache.invalidate(reason="test") == 2 and len(cache) == 0 and cache.invalidations == 3
    with pytest.raises(CatomeError):
        ChainGraphCache(0)


def test_stale_sites():
    plan_a, plan_b = object(), object()
    entry = _entry(GraphKey(1, 8, 8, (1, 1, 1)), {0: plan_a, 1: 5, 2: plan_b})
    assert ChainGraphCache.stale_sites(entry, {0: plan_a, 1: 5, 2: plan_b}) == []
    # new version ids with the same r: stale; an unversioned site: always stale
    assert ChainGraphCache.stale_sites(entry, {0: object(), 1: 6, 2: plan_b}) == [0, 1]
    assert ChainGraphCache.stale_sites(entry, {0: plan_a, 1: 5}) == [2]
    assert ChainGraphCache.stale_sites(entry, {0: plan_a, 1: 5, 2: plan_b}, sites=[0, 3]) == [3]


def _runner_checks(runner: ChainGraphRunner, device: str) -> None:
    plan1 = _plan(0, 9, device)
    in1 = _inputs(1, plan1, device)
    out = runner.run(_key(plan1), in1, {0: plan1})
    torch.testing.assert_close(out["noise_pred"], chain(in1)["noise_pred"])
    assert runner.captures == 1

    # a cached step: new sample and timestep, same plan -> replay, no plan copy
    in2 = _inputs(2, plan1, device)
    out = runner.run(_key(plan1), in2, {0: plan1})
    torch.testing.assert_close(out["noise_pred"], chain(in2)["noise_pred"])
    assert (runner.captures, runner.cache.plan_copies) == (1, 0)

    # a checkpoint made a new plan with the same r: its tensors are copied in, no recapture
    plan2 = _plan(1, 9, device)
    assert not torch.equal(plan1.keep_idx, plan2.keep_idx)
    in3 = _inputs(3, plan2, device)
    out = runner.run(_key(plan2), in3, {0: plan2})
    torch.testing.assert_close(out["noise_pred"], chain(in3)["noise_pred"])
    assert (runner.captures, runner.cache.plan_copies) == (1, 1)

    # r changes: another key, another capture; going back replays the first graph
    plan3 = _plan(2, 4, device)
    in4 = _inputs(4, plan3, device)
    torch.testing.assert_close(runner.run(_key(plan3), in4, {0: plan3})["noise_pred"], chain(in4)["noise_pred"])
    assert runner.captures == 2
    in5 = _inputs(5, plan2, device)
    torch.testing.assert_close(runner.run(_key(plan2), in5, {0: plan2})["noise_pred"], chain(in5)["noise_pred"])
    assert runner.captures == 2


def test_runner_replays_with_current_plans(eager_capture):
    runner = ChainGraphRunner(pure_chain, eager_capture)
    _runner_checks(runner, "cpu")


def test_runner_outputs_are_fresh_tensors(eager_capture):
    runner = ChainGraphRunner(pure_chain, eager_capture)
    plan = _plan(0, 5)
    first = runner.run(_key(plan), _inputs(1, plan), {0: plan})["noise_pred"]
    kept = first.clone()
    runner.run(_key(plan), _inputs(2, plan), {0: plan})
    assert torch.equal(first, kept)  # the next replay did not overwrite what the caller holds


def test_a_reused_version_id_would_replay_stale_plans(eager_capture):
    """The rule rests on versions: reporting an old id for new plan tensors replays the old pairs."""
    runner = ChainGraphRunner(pure_chain, eager_capture)
    plan1, plan2 = _plan(0, 9), _plan(1, 9)
    runner.run(_key(plan1), _inputs(1, plan1), {0: 1})
    in2 = _inputs(2, plan2)
    stale = runner.run(_key(plan2), in2, {0: 1})["noise_pred"]
    assert not torch.allclose(stale, chain(in2)["noise_pred"])
    fresh = runner.run(_key(plan2), in2, {0: 2})["noise_pred"]
    torch.testing.assert_close(fresh, chain(in2)["noise_pred"])


def test_scratch_memory_move_drops_every_graph(eager_capture):
    generation = [0]
    capture = eager_capture
    runner = ChainGraphRunner(pure_chain, capture, memory_generation=lambda: generation[0])
    plan = _plan(0, 5)
    runner.run(_key(plan), _inputs(1, plan), {0: plan})
    runner.run(_key(plan), _inputs(2, plan), {0: plan})
    assert capture.captures == 1
    generation[0] += 1
    in3 = _inputs(3, plan)
    torch.testing.assert_close(runner.run(_key(plan), in3, {0: plan})["noise_pred"], chain(in3)["noise_pred"])
    assert capture.captures == 2 and runner.cache.invalidations == 1


def test_inputs_that_do_not_fit_the_key_raise(eager_capture):
    runner = ChainGraphRunner(pure_chain, eager_capture)
    plan = _plan(0, 5)
    runner.run(_key(plan), _inputs(1, plan), {0: plan})
    other = _plan(1, 6)
    with pytest.raises(CatomeError, match="captured with"):
        runner.run(_key(plan), _inputs(2, other), {0: other})
    extra = dict(_inputs(2, plan), extra=torch.zeros(1))
    with pytest.raises(CatomeError, match="inputs changed"):
        runner.run(_key(plan), extra, {0: plan})


def test_stage_chain_walks_runners_by_name():
    class Spec:
        def __init__(self, inputs):
            self.inputs = [type("T", (), {"name": n})() for n in inputs]

    class Runner:
        def __init__(self, inputs, fn):
            self.spec = Spec(inputs)
            self.fn = fn

        def run(self, feeds):
            return self.fn(feeds)

    runners = [Runner(["sample"], lambda f: {"x0": f["sample"] + 1}),
               Runner(["x0", "timestep"], lambda f: {"noise_pred": f["x0"] * f["timestep"]})]
    out = stage_chain(runners)({"sample": torch.ones(2), "timestep": torch.full((2,), 3.0)})
    assert torch.equal(out["noise_pred"], torch.full((2,), 6.0))


def test_cuda_capture_refuses_cpu():
    with pytest.raises(CatomeError, match="CUDA"):
        TorchCudaGraphCapture("cpu")


@pytest.mark.gpu
def test_real_cuda_graphs_follow_the_rule():
    runner = ChainGraphRunner(pure_chain, TorchCudaGraphCapture("cuda"))
    _runner_checks(runner, "cuda")
