"""CUDA-graph cache of the stage chain: keys, invalidation, and the copy-new-plans-into-static-buffers rule.

The rule is checked on CPU with an eager stand-in for graph capture that, like
a CUDA graph, reads its inputs from the static buffers it was captured with;
the same checks run with real CUDA graphs where a GPU is present.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from catome_export.errors import CatomeError
from catome_export.engine.manifest import StageRecord
from catome_export.merging import MergeSettings, match_tokens, merge_tokens, parse_schedule, unmerge_tokens
from catome_export.runtime.cuda_graphs import (
    ChainGraphCache, ChainGraphRunner, GraphChain, GraphEntry, GraphKey, TorchCudaGraphCapture, graph_chain,
    same_version, stage_chain,
)
from catome_export.engine.io_names import site_of

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


# -- rule 5 with TensorRT stages: the tensorrt stand-in's enqueue record shows which context ran what ---------------

TOKEN_C = 4
"""Channels of the stand-in stages' tokens (the latent's)."""


def _enqueues() -> list[dict]:
    from tensorrt import _runtime

    return _runtime.ENQUEUES


def _model(nodes, inputs, outputs, inits=()) -> bytes:
    model = helper.make_model(helper.make_graph(nodes, "stage", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _stage0_onnx() -> bytes:
    """sample [B, 4, H, W], timestep [B], encoder_hidden_states [B, L, D] -> x0 [B, H*W, 4]."""
    vi, F = helper.make_tensor_value_info, TensorProto.FLOAT
    nodes = [helper.make_node("Reshape", ["sample", "flat"], ["s3"]),
             helper.make_node("Transpose", ["s3"], ["tokens"], perm=[0, 2, 1]),
             helper.make_node("Unsqueeze", ["timestep", "axes12"], ["t3"]),
             helper.make_node("ReduceMean", ["encoder_hidden_states"], ["e3"], axes=[1, 2], keepdims=1),
             helper.make_node("Add", ["tokens", "t3"], ["tt"]),
             helper.make_node("Add", ["tt", "e3"], ["x0"])]
    inits = [helper.make_tensor("flat", TensorProto.INT64, [3], [0, TOKEN_C, -1]),
             helper.make_tensor("axes12", TensorProto.INT64, [2], [1, 2])]
    return _model(nodes, [vi("sample", F, ["B", TOKEN_C, "H", "W"]), vi("timestep", F, ["B"]),
                          vi("encoder_hidden_states", F, ["B", "L", "D"])],
                  [vi("x0", F, ["B", "H*W", TOKEN_C])], inits)


def _stage1_onnx() -> bytes:
    """x0, site 0's plan tensors and sample -> noise_pred [B, 4, H, W] (a merge-shaped scatter-add in between)."""
    vi, F, I = helper.make_tensor_value_info, TensorProto.FLOAT, TensorProto.INT64
    nodes = [helper.make_node("ReduceMean", ["x0"], ["xm"], axes=[2], keepdims=0),
             helper.make_node("GatherElements", ["xm", "site0_keep_idx"], ["kept"], axis=1),
             helper.make_node("Mul", ["kept", "site0_weight"], ["kept_w"]),
             helper.make_node("GatherElements", ["xm", "site0_src_idx"], ["src"], axis=1),
             helper.make_node("ScatterElements", ["kept_w", "site0_slot_idx", "src"], ["merged"], axis=1,
                              reduction="add"),
             helper.make_node("GatherElements", ["merged", "site0_unmerge_idx"], ["back"], axis=1),
             helper.make_node("Shape", ["sample"], ["shape"]),
             helper.make_node("Unsqueeze", ["back", "axis1"], ["back3"]),
             helper.make_node("Expand", ["back3", "shape4"], ["wide"]),
             helper.make_node("Reshape", ["wide", "shape"], ["grid"]),
             helper.make_node("Add", ["sample", "grid"], ["noise_pred"])]
    inits = [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
             helper.make_tensor("shape4", TensorProto.INT64, [3], [1, TOKEN_C, 1])]
    inputs = [vi("x0", F, ["B", "N0", TOKEN_C]), vi("site0_keep_idx", I, ["B", "K0"]),
              vi("site0_src_idx", I, ["B", "R0"]), vi("site0_slot_idx", I, ["B", "R0"]),
              vi("site0_weight", F, ["B", "K0"]), vi("site0_unmerge_idx", I, ["B", "N0"]),
              vi("sample", F, ["B", TOKEN_C, "H", "W"])]
    return _model(nodes, inputs, [vi("noise_pred", F, ["B", TOKEN_C, "H", "W"])], inits)


def _trt_stages(trt, helper, folder: Path):
    """The two stand-in stages loaded by a TrtBackend on the CPU: (backend, runners, sites)."""
    from catome_export.backends.trt import TrtBackend
    from catome_export.engine.specs import StageSpec, TensorSpec
    from catome_export.export.stages import plan_specs
    from catome_export.models.sites import MergeSite

    sample = TensorSpec("sample", "float32", ("B", TOKEN_C, "H", "W"))
    x0 = TensorSpec("x0", "float32", ("B", "N0", TOKEN_C))
    specs = [StageSpec(0, None, 0, (sample, TensorSpec("timestep", "float32", ("B",)),
                                    TensorSpec("encoder_hidden_states", "float32", ("B", "L", "D"))), (x0,)),
             StageSpec(1, 0, None, (x0, *plan_specs(0), sample), (TensorSpec("noise_pred", "float32", sample.shape),))]
    n = 8 * 8
    lat = ((1, TOKEN_C, 4, 4), (2, TOKEN_C, 8, 8), (2, TOKEN_C, 8, 8))
    p0 = {"sample": lat, "timestep": ((1,), (2,), (2,)), "encoder_hidden_states": ((1, 1, 8), (2, 77, 8), (2, 77, 8))}
    tok = ((1, 1), (2, n // 2), (2, n))
    p1 = {"x0": ((1, 1, TOKEN_C), (2, n // 2, TOKEN_C), (2, n, TOKEN_C)), "sample": lat,
          "site0_keep_idx": tok, "site0_weight": tok, "site0_src_idx": tok, "site0_slot_idx": tok,
          "site0_unmerge_idx": tok}
    backend = TrtBackend(None, "cpu", trt_module=trt)
    runners = []
    for spec, model, profiles in zip(specs, (_stage0_onnx(), _stage1_onnx()), (p0, p1)):
        (folder / f"stage_{spec.index}.plan").write_bytes(helper.build_plan(trt, model, profiles))
        runners.append(backend.load_stage(folder, StageRecord(spec, f"stage_{spec.index}.onnx")))
    return backend, runners, [MergeSite(0, "down_blocks.0.attentions.0.transformer_blocks.0", 1)]


class ContextGuardCapture:
    """A capture stand-in that checks rule 5 against the tensorrt stand-in's enqueue record.

    Like a CUDA graph's, a replay here recomputes the captured chain from its
    static buffers (re-running it stands in for replaying the frozen work).
    Before each replay it records a violation if any execution context the
    graph was captured on was enqueued by anything else since the capture or
    the graph's last replay (on a GPU, that is a replay on a context that was
    re-shaped or re-bound since its capture), and it checks that the re-run
    used only the graph's contexts, with the captured shapes.
    """

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0
        self.violations: list[str] = []

    def capture(self, chain, static_inputs):
        self.captures += 1
        start = len(_enqueues())
        outputs = {k: torch.empty_like(v) for k, v in chain(static_inputs).items()}
        own = {e["context"]: e["shapes"] for e in _enqueues()[start:]}
        assert own, "the captured chain enqueued nothing on TensorRT"
        return [chain, static_inputs, outputs, own, len(_enqueues())], outputs

    def replay(self, handle) -> None:
        self.replays += 1
        chain, static_inputs, outputs, own, mark = handle
        self.violations += [f"context {e['context']:#x} of a captured graph was enqueued with {e['shapes']} "
                            f"before replay {self.replays}" for e in _enqueues()[mark:] if e["context"] in own]
        start = len(_enqueues())
        for k, v in chain(static_inputs).items():
            outputs[k].copy_(v)
        ran = _enqueues()[start:]
        assert ran and all(e["context"] in own and e["shapes"] == own[e["context"]] for e in ran)
        handle[4] = len(_enqueues())


def _stage_inputs(seed: int, r: int, hw=(8, 8)) -> tuple[dict[str, torch.Tensor], object]:
    gen = torch.Generator().manual_seed(seed)
    plan = match_tokens(torch.randn(2, hw[0] * hw[1], TOKEN_C, generator=gen), hw, num_merged=r)
    inputs = {"sample": torch.randn(2, TOKEN_C, *hw, generator=gen), "timestep": torch.full((2,), 500.0),
              "encoder_hidden_states": torch.randn(2, 77, 8, generator=gen)}
    inputs.update(zip((f"site0_{n}" for n in ("keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx")),
                      plan.tensors()))
    return inputs, plan


def _interleave(graphs: ChainGraphRunner, eager) -> None:
    """Cached steps through ``graphs`` with eager runs (checkpoints, other shapes) of the stages in between."""
    for step, (seed, r, eager_first) in enumerate([(0, 8, True), (1, 8, False), (2, 8, True), (3, 16, True),
                                                  (4, 8, True), (5, 16, False)]):
        inputs, plan = _stage_inputs(seed, r)
        if eager_first:  # a checkpoint at another r re-shapes the eager contexts
            other, _ = _stage_inputs(100 + seed, r + 4, hw=(6, 8) if step % 2 else (8, 8))
            eager(other)
        key = ChainGraphCache.key(2, (8, 8), [plan.num_merged])
        graphs.run(key, inputs, {0: plan})


def test_a_graph_owns_its_tensorrt_contexts_and_eager_steps_never_touch_them(tensorrt_standin, trt_standin_helper, tmp_path):
    backend, runners, _ = _trt_stages(tensorrt_standin, trt_standin_helper, tmp_path)
    guard = ContextGuardCapture()
    graphs = ChainGraphRunner(lambda: graph_chain(runners), guard, max_graphs=1,
                              memory_generation=lambda: backend.memory.generation)
    _interleave(graphs, stage_chain(runners))
    assert guard.violations == []
    assert (guard.captures, guard.replays) == (4, 6)  # one graph kept: each change of r evicts and recaptures
    eager_contexts = {id(r.context) for r in runners}
    graph_contexts = {e["context"] for e in _enqueues()} - eager_contexts
    assert len(graph_contexts) >= 2  # the live graph's two forks (evicted graphs' contexts were closed)
    assert len(backend.forks) == 2 and all(f.parent in runners for f in backend.forks)  # only the live graph's
    graphs.invalidate("test")
    assert backend.forks == []


def test_sharing_the_eager_contexts_with_a_graph_is_caught(tensorrt_standin, trt_standin_helper, tmp_path):
    """The check above can fail: a graph captured on the eager runners' own contexts is replayed after a
    checkpoint re-shaped them."""
    backend, runners, _ = _trt_stages(tensorrt_standin, trt_standin_helper, tmp_path)
    guard = ContextGuardCapture()
    shared = ChainGraphRunner(lambda: GraphChain(stage_chain(runners)), guard, max_graphs=1)
    _interleave(shared, stage_chain(runners))
    assert guard.violations and "before replay" in guard.violations[0]


def test_runtime_checkpoints_run_on_contexts_no_graph_was_captured_on(tensorrt_standin, trt_standin_helper, tmp_path):
    """A Runtime over TensorRT stages with CUDA graphs: checkpoint steps (schedule 0,3) run on the loaded runners,
    cached steps replay graphs captured on forks, and closing the runtime closes the forks."""
    from catome_export.runtime.runtime import Runtime

    backend, runners, sites = _trt_stages(tensorrt_standin, trt_standin_helper, tmp_path)
    settings = MergeSettings(threshold=1.0, schedule=parse_schedule("0,3", step_base=0))  # t = 1 merges nothing
    runtime = Runtime.from_parts(runners, sites, settings, unet_config={}, dtype=torch.float32, device="cpu", backend=backend)
    guard = ContextGuardCapture()
    runtime.enable_cuda_graphs(capture=guard)
    eager_contexts = {id(r.context) for r in runners}
    gen = torch.Generator().manual_seed(0)
    sample, ehs = torch.randn(2, TOKEN_C, 8, 8, generator=gen), torch.randn(2, 77, 8, generator=gen)
    for _ in range(2):
        runtime.reset()
        for t in (951, 901, 851, 801, 751, 701):
            mark = len(_enqueues())
            runtime.step(sample, torch.full((2,), float(t)), ehs)
            used = {e["context"] for e in _enqueues()[mark:]}
            cached = runtime.history[-1].step not in (0, 3)
            assert (used & eager_contexts == set()) if cached else (used == eager_contexts)
    assert guard.violations == [] and guard.replays == 8 and guard.captures == 1
    assert len(backend.forks) == 2
    runtime.close()
    assert backend.forks == [] and all(r.context is None for r in runners)


# -- the key covers every input shape: the text length (and any added conditioning) can change between prompts --------

def text_chain(inputs):
    """The one-site chain, conditioned on text of any length (mean over tokens) and on an added embedding."""
    out = chain(inputs)["noise_pred"]
    cond = inputs["encoder_hidden_states"].mean(dim=(1, 2)) + inputs["text_embeds"].sum(dim=1)
    return {"noise_pred": out + cond[:, None, None]}


def _text_inputs(seed: int, plan, length: int, added: int = 3):
    gen = torch.Generator().manual_seed(200 + seed)
    inputs = _inputs(seed, plan)
    inputs["encoder_hidden_states"] = torch.randn(2, length, 8, generator=gen)
    inputs["text_embeds"] = torch.randn(2, added, generator=gen)
    return inputs


def test_key_includes_every_input_shape():
    plan = _plan(0, 5)
    a, b = _text_inputs(1, plan, 77), _text_inputs(1, plan, 154)
    key_a, key_b = (ChainGraphCache.key(2, GRID, [5], inputs=x) for x in (a, b))
    assert key_a != key_b and key_a == ChainGraphCache.key(2, GRID, [5], inputs=_text_inputs(2, plan, 77))
    assert ChainGraphCache.key(2, GRID, [5], inputs=_text_inputs(1, plan, 77, added=4)) != key_a
    assert dict(key_a.inputs)["encoder_hidden_states"] == (2, 77, 8)
    # a key made without the inputs is completed from them; a key made with other inputs does not fit
    assert _key(plan).with_inputs(a) == key_a
    with pytest.raises(CatomeError, match="does not describe"):
        key_a.with_inputs(b)


def test_another_text_length_with_the_same_r_captures_another_graph(eager_capture):
    """Graphs outlive a generation and, in ratio mode, r repeats: a second prompt of another token length (or
    another added-conditioning shape) must not replay a graph captured for the first one's shapes."""
    runner = ChainGraphRunner(lambda: GraphChain(text_chain), eager_capture)
    plan = _plan(0, 5)
    for seed, length, added in ((1, 77, 3), (2, 77, 3), (3, 154, 3), (4, 77, 3), (5, 154, 3), (6, 154, 5)):
        inputs = _text_inputs(seed, plan, length, added)
        out = runner.run(_key(plan), inputs, {0: plan})  # the caller's key knows nothing of the text
        torch.testing.assert_close(out["noise_pred"], text_chain(inputs)["noise_pred"])
    assert (eager_capture.captures, eager_capture.replays) == (3, 6)
    assert sorted(dict(k.inputs)["encoder_hidden_states"][1] for k in runner.cache.keys()) == [77, 154, 154]


def test_tensorrt_graphs_of_two_text_lengths_keep_their_own_contexts(tensorrt_standin, trt_standin_helper, tmp_path):
    """With TensorRT stages, prompts of 77 and 20 tokens at the same r alternate: each length replays a graph
    captured on contexts of its own, with the shapes it was captured with (the guard checks every replay)."""
    backend, runners, _ = _trt_stages(tensorrt_standin, trt_standin_helper, tmp_path)
    guard = ContextGuardCapture()
    graphs = ChainGraphRunner(lambda: graph_chain(runners), guard, memory_generation=lambda: backend.memory.generation)
    for seed, length in enumerate((77, 20, 77, 20, 20)):
        inputs, plan = _stage_inputs(seed, 8)
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :length]
        graphs.run(ChainGraphCache.key(2, (8, 8), [plan.num_merged]), inputs, {0: plan})
    assert guard.violations == [] and (guard.captures, guard.replays) == (2, 5)
    assert len(backend.forks) == 4  # two stages for each of the two graphs
    graphs.invalidate("test")
    assert backend.forks == []


# -- a failed capture falls back to plain runs; nothing is freed before the streams are synchronised -----------------

class ClosingRunner:
    """Stands for a forked runner of a graph's chain: records when it is closed."""

    def __init__(self, events: list[str], name: str) -> None:
        self.events, self.name = events, name

    def close(self) -> None:
        self.events.append(f"close {self.name}")


class RecordingChains:
    """A chain factory whose chains each own one :class:`ClosingRunner` and count their runs."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.made = 0
        self.runs: list[int] = []

    def __call__(self) -> GraphChain:
        index = self.made
        self.made += 1

        def run(inputs):
            self.runs.append(index)
            return chain(inputs)

        return GraphChain(run, (ClosingRunner(self.events, f"chain{index}"),))


class SynchronizingCapture:
    """The eager capture double plus the optional ``synchronize()``; ``fail``: captures end with a CUDA error after
    the chain ran under capture, as a capture whose stage did something not permitted while capturing does."""

    def __init__(self, events: list[str], fail: bool = False) -> None:
        self.events, self.fail = events, fail
        self.captures = self.replays = 0

    def capture(self, chain_fn, static_inputs):
        self.captures += 1
        outputs = {k: torch.empty_like(v) for k, v in chain_fn(static_inputs).items()}
        if self.fail:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return (chain_fn, static_inputs, outputs), outputs

    def replay(self, handle) -> None:
        self.replays += 1
        chain_fn, static_inputs, outputs = handle
        for k, v in chain_fn(static_inputs).items():
            outputs[k].copy_(v)

    def synchronize(self) -> None:
        self.events.append("synchronize")


def test_a_failed_capture_falls_back_to_stage_by_stage_with_one_warning(caplog):
    """As trtexec does when a capture fails: the step still runs (plain enqueues), one warning names the real error,
    no capture is tried again, and every later cached step runs stage by stage, on every key."""
    events: list[str] = []
    chains = RecordingChains(events)
    capture = SynchronizingCapture(events, fail=True)
    runner = ChainGraphRunner(chains, capture)
    with caplog.at_level("WARNING", logger="catome_export.runtime.cuda_graphs"):
        for seed, r in ((0, 9), (1, 9), (2, 4), (3, 9)):
            plan = _plan(seed, r)
            inputs = _inputs(seed, plan)
            out = runner.run(_key(plan), inputs, {0: plan})
            torch.testing.assert_close(out["noise_pred"], chain(inputs)["noise_pred"])
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "operation not permitted when stream is capturing" in warnings[0].getMessage()
    assert "stage by stage" in warnings[0].getMessage()
    assert capture.captures == 1 and capture.replays == 0 and runner.captures == 0 and len(runner.cache) == 0
    assert "operation not permitted" in runner.capture_failure
    # the failed capture's chain was closed after a synchronize; one chain of its own runs every later step
    assert chains.made == 2 and chains.runs == [0, 1, 1, 1, 1]
    assert events == ["synchronize", "close chain0"]
    runner.invalidate("closing")
    assert events[2:] == ["synchronize", "close chain1"] and runner.plain_chain is None


def test_capture_failure_names_the_error_raised_under_capture():
    """torch.cuda.graph's exit ends the capture and raises its own error after a failure inside it; the error
    reported is the one the chain raised (here TensorRT's refused enqueue), chained as the cause."""
    from catome_export.runtime.cuda_graphs import GraphCaptureError, capture_chain

    class GraphContext:
        """Like ``torch.cuda.graph``: ``capture_end`` in ``__exit__`` fails once the capture was invalidated."""

        def __init__(self, end_fails: bool) -> None:
            self.end_fails = end_fails

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            if self.end_fails:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def refused(inputs):
        raise CatomeError("TensorRT failed to run stage 2 (stage_2.plan): see the TensorRT log above")

    with pytest.raises(GraphCaptureError) as err:
        capture_chain(GraphContext(end_fails=True), refused, {})
    assert "TensorRT failed to run stage 2" in str(err.value) and "capture failed" in str(err.value)
    assert isinstance(err.value.__cause__, CatomeError)
    with pytest.raises(GraphCaptureError, match="previous error during capture"):  # the chain ran; the end failed
        capture_chain(GraphContext(end_fails=True), chain, _inputs(0, _plan(0, 3)))
    plan = _plan(0, 3)
    out = capture_chain(GraphContext(end_fails=False), chain, _inputs(0, plan))
    torch.testing.assert_close(out["noise_pred"], chain(_inputs(0, plan))["noise_pred"])


def test_graphs_are_freed_only_after_their_streams_are_synchronised():
    """Before an evicted or invalidated graph's runners are closed, the capture's streams are synchronised: a replay
    still in flight never runs on freed contexts, activations or scratch memory."""
    events: list[str] = []
    chains = RecordingChains(events)
    runner = ChainGraphRunner(chains, SynchronizingCapture(events), max_graphs=1)
    for seed, r in ((0, 9), (1, 4), (2, 4)):
        plan = _plan(seed, r)
        runner.run(_key(plan), _inputs(seed, plan), {0: plan})
    assert events == ["synchronize", "close chain0"]  # r 9 -> 4 evicted the first graph
    runner.invalidate("test")
    assert events == ["synchronize", "close chain0", "synchronize", "close chain1"]


def test_a_stage_error_outside_the_capture_is_raised_and_graphs_stay_on(caplog):
    """A CatomeError from the capture implementation that is not a GraphCaptureError (a stage failing in the warm-up,
    as it would without graphs) reaches the caller unchanged; the next run captures as usual."""
    events: list[str] = []

    class WarmupFails(SynchronizingCapture):
        def capture(self, chain_fn, static_inputs):
            if not self.captures:
                self.captures += 1
                raise CatomeError("stage 1: input 'x0' of shape [2, 99, 4] lies outside the engine's profile")
            return super().capture(chain_fn, static_inputs)

    capture = WarmupFails(events)
    runner = ChainGraphRunner(RecordingChains(events), capture)
    plan = _plan(0, 5)
    with caplog.at_level("WARNING"), pytest.raises(CatomeError, match="outside the engine's profile"):
        runner.run(_key(plan), _inputs(1, plan), {0: plan})
    assert runner.capture_failure is None and not [r for r in caplog.records if r.levelname == "WARNING"]
    assert events == ["synchronize", "close chain0"]
    inputs = _inputs(2, plan)
    torch.testing.assert_close(runner.run(_key(plan), inputs, {0: plan})["noise_pred"], chain(inputs)["noise_pred"])
    assert runner.captures == 1 and capture.replays == 1
