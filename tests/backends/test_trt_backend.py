"""The TensorRT backend against the ``tensorrt`` stand-in (TensorRT 10.13 and 11.1 bindings, CPU), and on a GPU.

Plans are built from small ONNX stages by the stand-in's builder and loaded
by :class:`TrtBackend` as a user's would be. The stand-in's execution
context enforces TensorRT's documented preconditions (non-null, 256-byte
aligned addresses for every I/O tensor, zero-volume ones included; every
input shape set before enqueue; device memory set on a USER_MANAGED context;
no enqueue on the legacy default stream) and records every enqueue it
accepts, so these tests fail where TensorRT would refuse the runner's work.
No kernels run: outputs hold no values here; the ``trt``/``gpu`` tests at
the end check numbers on a real GPU.

On a CPU device the backend has no CUDA stream; its stream handle is an
opaque non-zero token, and tensors are CPU tensors whose addresses the
stand-in checks as integers (the CPU allocator aligns to 64 bytes only, so
the alignment path runs for real here).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from catome_export.backends.base import DeviceStream
from catome_export.backends.trt import ALIGNMENT, SharedDeviceMemory, TrtBackend, aligned, aligned_empty
from catome_export.errors import CatomeError
from catome_export.engine.manifest import EngineFile, StageRecord
from catome_export.engine.specs import StageSpec, TensorSpec
from catome_export.export.stages import plan_specs
from factories import make_manifest

C = 8
"""Channels of the test stage's tokens."""


def _site_spec(index: int = 1) -> StageSpec:
    return StageSpec(index, 0, None, (TensorSpec("x0", "float32", ("B", "N0", C)), *plan_specs(0)),
                     (TensorSpec("noise_pred", "float32", ("B", "N0", C)),))


def _stage_onnx(x_dtype: int = TensorProto.FLOAT, drop: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> bytes:
    """A merge-shaped stage: a scatter-add of src tokens into their slots (the ScatterElements plugin),
    gathers, and an output the shape of ``x0``. ``drop``: plan inputs the graph does not take; ``extra``: more
    float inputs [B, N0] added to the output."""
    vi = helper.make_tensor_value_info
    plan = {"site0_keep_idx": (TensorProto.INT64, ["B", "K0"]), "site0_src_idx": (TensorProto.INT64, ["B", "R0"]),
            "site0_slot_idx": (TensorProto.INT64, ["B", "R0"]), "site0_weight": (TensorProto.FLOAT, ["B", "K0"]),
            "site0_unmerge_idx": (TensorProto.INT64, ["B", "N0"])}
    inputs = [vi("x0", x_dtype, ["B", "N0", C])]
    inputs += [vi(n, t, s) for n, (t, s) in plan.items() if n not in drop]
    inputs += [vi(n, TensorProto.FLOAT, ["B", "N0"]) for n in extra]
    nodes = [helper.make_node("ReduceMean", ["x0"], ["xm"], axes=[2], keepdims=0)]
    if x_dtype != TensorProto.FLOAT:
        nodes = [helper.make_node("Cast", ["x0"], ["x32"], to=TensorProto.FLOAT),
                 helper.make_node("ReduceMean", ["x32"], ["xm"], axes=[2], keepdims=0)]
    w = "site0_weight" if "site0_weight" not in drop else "ones"
    inits = [helper.make_tensor("ones", TensorProto.FLOAT, [1, 1], [1.0])]
    nodes += [
        helper.make_node("GatherElements", ["xm", "site0_keep_idx"], ["kept"], axis=1),
        helper.make_node("Mul", ["kept", w], ["kept_w"]),
        helper.make_node("GatherElements", ["xm", "site0_src_idx"], ["src"], axis=1),
        helper.make_node("ScatterElements", ["kept_w", "site0_slot_idx", "src"], ["merged"], axis=1,
                         reduction="add"),
        helper.make_node("GatherElements", ["merged", "site0_unmerge_idx"], ["back"], axis=1),
    ]
    last = "back"
    for k, name in enumerate(extra):
        nodes.append(helper.make_node("Add", [last, name], [f"extra{k}"]))
        last = f"extra{k}"
    nodes += [helper.make_node("Unsqueeze", [last, "axis2"], ["back3"]),
              helper.make_node("Add", ["x0" if x_dtype == TensorProto.FLOAT else "x32", "back3"], ["noise_pred"])]
    inits.append(helper.make_tensor("axis2", TensorProto.INT64, [1], [2]))
    graph = helper.make_graph(nodes, "stage", inputs, [vi("noise_pred", TensorProto.FLOAT, ["B", "N0", C])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _profiles(max_tokens: int = 64, r_min: int = 0) -> dict[str, tuple[tuple[int, ...], ...]]:
    n = (1, 1, max_tokens // 2, max_tokens)
    return {"x0": ((1, n[1], C), (2, n[2], C), (2, n[3], C)),
            "site0_keep_idx": ((1, 1), (2, n[2]), (2, n[3])), "site0_weight": ((1, 1), (2, n[2]), (2, n[3])),
            "site0_src_idx": ((1, r_min), (2, n[2] // 2), (2, n[3])),
            "site0_slot_idx": ((1, r_min), (2, n[2] // 2), (2, n[3])),
            "site0_unmerge_idx": ((1, 1), (2, n[2]), (2, n[3]))}


def _load(trt: ModuleType, tmp_path: Path, plan: bytes, spec: StageSpec | None = None, name: str = "stage_1.plan",
          backend: TrtBackend | None = None):
    spec = spec or _site_spec()
    (tmp_path / name).write_bytes(plan)
    backend = backend or TrtBackend(None, "cpu", trt_module=trt)
    runner = backend.load_stage(tmp_path, StageRecord(spec, "stage.onnx", engine=EngineFile(name)))
    return backend, runner


def _feeds(r: int, n: int = 16, batch: int = 2) -> dict[str, torch.Tensor]:
    k = n - r
    return {"x0": torch.randn(batch, n, C), "site0_keep_idx": torch.zeros(batch, k, dtype=torch.int64),
            "site0_src_idx": torch.zeros(batch, r, dtype=torch.int64),
            "site0_slot_idx": torch.zeros(batch, r, dtype=torch.int64),
            "site0_weight": torch.ones(batch, k), "site0_unmerge_idx": torch.zeros(batch, n, dtype=torch.int64)}


@pytest.fixture
def trt(tensorrt_standin) -> ModuleType:
    """The stand-in as ``tensorrt`` (once as 10.13, once as 11.1), with its enqueue record emptied."""
    from tensorrt import _runtime

    _runtime.ENQUEUES.clear()
    return tensorrt_standin


@pytest.fixture
def build_plan(trt_standin_helper):
    """``build_plan(trt, model, profiles)``: a plan from the stand-in's builder (TensorRT's builder API)."""
    return trt_standin_helper.build_plan


@pytest.fixture
def plan(trt, build_plan) -> bytes:
    return build_plan(trt, _stage_onnx(), _profiles())


def _enqueues() -> list[dict]:
    from tensorrt import _runtime

    return _runtime.ENQUEUES


def test_a_run_meets_every_enqueue_precondition(trt, plan, tmp_path):
    """Shapes set, every address non-null and aligned, scratch memory set, the backend's own stream."""
    backend, runner = _load(trt, tmp_path, plan)
    for r in (4, 6, 4):
        feeds = _feeds(r)
        out = runner.run(feeds)
        assert out["noise_pred"].shape == (2, 16, C) and out["noise_pred"].dtype == torch.float32
        done = _enqueues()[-1]
        assert done["context"] == id(runner.context)
        assert done["stream"] == backend.stream.handle != 0
        assert done["shapes"] == {**{k: tuple(v.shape) for k, v in feeds.items()}, "noise_pred": (2, 16, C)}
        assert all(a and a % ALIGNMENT == 0 for a in done["addresses"].values())
        assert done["addresses"]["noise_pred"] == out["noise_pred"].data_ptr()
    assert len(_enqueues()) == 3


def test_misaligned_inputs_are_copied_to_an_aligned_buffer(trt, plan, tmp_path):
    _, runner = _load(trt, tmp_path, plan)
    feeds = _feeds(3)
    base = torch.randn(2 * 16 * C + 1)
    feeds["x0"] = base[1:].view(2, 16, C)  # a view 4 bytes into its storage: never 256-byte aligned
    assert feeds["x0"].data_ptr() % ALIGNMENT
    runner.run(feeds)
    bound = _enqueues()[-1]["addresses"]["x0"]
    assert bound % ALIGNMENT == 0 and bound != feeds["x0"].data_ptr()
    copy = next(t for t in runner._keep if t.data_ptr() == bound)
    assert torch.equal(copy, feeds["x0"])


def test_a_refused_address_names_tensor_and_stage(trt, plan, tmp_path, monkeypatch):
    """set_tensor_address's False (here: TensorRT's refusal of a misaligned address) becomes a CatomeError."""
    import catome_export.backends.trt as trt_backend

    _, runner = _load(trt, tmp_path, plan)
    monkeypatch.setattr(trt_backend, "aligned", lambda t: t)  # let a misaligned view through
    feeds = _feeds(3)
    feeds["x0"] = torch.randn(2 * 16 * C + 1)[1:].view(2, 16, C)
    with pytest.raises(CatomeError, match=r"refused address 0x[0-9a-f]+ for tensor 'x0' of stage 1 .*aligned"):
        runner.run(feeds)
    assert _enqueues() == []


def test_zero_volume_tensors_get_aligned_addresses_of_their_own(trt, plan, tmp_path):
    """A profile that admits R = 0 (older builds): empty src/slot tensors still get non-null, distinct addresses."""
    _, runner = _load(trt, tmp_path, plan)
    feeds = _feeds(r=0)
    assert feeds["site0_src_idx"].numel() == 0 and feeds["site0_src_idx"].data_ptr() == 0
    runner.run(feeds)
    addr = _enqueues()[-1]["addresses"]
    src, slot = addr["site0_src_idx"], addr["site0_slot_idx"]
    assert src and slot and src != slot and src % ALIGNMENT == 0 and slot % ALIGNMENT == 0
    assert _enqueues()[-1]["shapes"]["site0_src_idx"] == (2, 0)


def test_shape_outside_profile_names_input_and_range(trt, plan, tmp_path):
    _, runner = _load(trt, tmp_path, plan)
    with pytest.raises(CatomeError, match=r"'x0'.*\[3, 16, 8\].*min \[1, 1, 8\], max \[2, 64, 8\]"):
        runner.run(_feeds(r=2, batch=3))


def test_one_shared_scratch_buffer_as_large_as_the_largest_stage(trt, tmp_path, build_plan):
    small = build_plan(trt, _stage_onnx(), _profiles(64))
    big = build_plan(trt, _stage_onnx(), _profiles(256))
    need = [trt.Runtime(trt.Logger()).deserialize_cuda_engine(p).device_memory_size_v2 for p in (small, big)]
    assert need[0] < need[1]
    backend, r1 = _load(trt, tmp_path, small, name="stage_1.plan")
    _, r2 = _load(trt, tmp_path, big, _site_spec(2), "stage_2.plan", backend)
    assert backend.memory.nbytes == need[1] and backend.memory.address % ALIGNMENT == 0
    r1.run(_feeds(2))
    r2.run(_feeds(2))
    assert [e["context"] for e in _enqueues()] == [id(r1.context), id(r2.context)]
    # a later, larger stage moves the buffer: every context binds the new one before its next enqueue
    bigger = build_plan(trt, _stage_onnx(), _profiles(512))
    before = backend.memory.generation
    _load(trt, tmp_path, bigger, _site_spec(3), "stage_3.plan", backend)
    assert backend.memory.generation == before + 1
    r1.run(_feeds(2))
    assert r1._memory_generation == backend.memory.generation and len(_enqueues()) == 3


def test_inputs_converted_to_engine_dtype(trt, tmp_path, build_plan):
    plan = build_plan(trt, _stage_onnx(x_dtype=TensorProto.FLOAT16), _profiles())
    spec = StageSpec(1, 0, None, (TensorSpec("x0", "float16", ("B", "N0", C)), *plan_specs(0)),
                     _site_spec().outputs)
    _, runner = _load(trt, tmp_path, plan, spec)
    feeds = _feeds(2)
    runner.run(feeds)
    bound = _enqueues()[-1]["addresses"]["x0"]
    assert bound != feeds["x0"].data_ptr()
    assert any(t.dtype == torch.float16 and t.data_ptr() == bound for t in runner._keep)


def test_dropped_unused_input_is_fine_but_unknown_io_is_not(trt, tmp_path, build_plan):
    dropped = build_plan(trt, _stage_onnx(drop=("site0_weight",)),
                         {k: v for k, v in _profiles().items() if k != "site0_weight"})
    _, runner = _load(trt, tmp_path, dropped)
    runner.run(_feeds(2))
    assert "site0_weight" not in _enqueues()[-1]["addresses"]
    extra = build_plan(trt, _stage_onnx(extra=("mystery",)),
                       {**_profiles(), "mystery": ((1, 1), (2, 32), (2, 64))})
    with pytest.raises(CatomeError, match="stale"):
        _load(trt, tmp_path, extra, name="stage_9.plan")


def test_missing_or_unloadable_plan(trt, tmp_path):
    backend = TrtBackend(None, "cpu", trt_module=trt)
    spec = _site_spec()
    with pytest.raises(CatomeError, match="--engine-kind trt"):
        backend.load_stage(tmp_path, StageRecord(spec, "stage_1.onnx"))
    (tmp_path / "stage_1.plan").write_bytes(b"garbage")
    with pytest.raises(CatomeError, match="could not load"):
        backend.load_stage(tmp_path, StageRecord(spec, "stage_1.onnx"))


def test_enqueue_on_the_default_stream_is_refused_and_reported(trt, plan, tmp_path, monkeypatch):
    """The backend never hands TensorRT stream 0; if it did, the stand-in refuses and the runner says so."""
    _, runner = _load(trt, tmp_path, plan)
    monkeypatch.setattr(DeviceStream, "handle", property(lambda self: 0))
    with pytest.raises(CatomeError, match="failed to run stage 1"):
        runner.run(_feeds(2))
    assert _enqueues() == []


def test_missing_feed_raises(trt, plan, tmp_path):
    _, runner = _load(trt, tmp_path, plan)
    feeds = _feeds(2)
    del feeds["site0_weight"]
    with pytest.raises(CatomeError, match="site0_weight"):
        runner.run(feeds)


def test_forks_have_contexts_of_their_own_on_the_shared_memory(trt, plan, tmp_path):
    backend, runner = _load(trt, tmp_path, plan)
    fork = runner.fork()
    assert fork.context is not runner.context and fork.engine is runner.engine
    assert backend.runners == [runner] and backend.forks == [fork]
    fork.run(_feeds(4))
    runner.run(_feeds(6))
    fork.run(_feeds(4))
    runs = _enqueues()
    assert [e["context"] for e in runs] == [id(fork.context), id(runner.context), id(fork.context)]
    assert runs[0]["shapes"] == runs[2]["shapes"] != runs[1]["shapes"]  # the eager run left the fork's shapes alone
    assert len(backend.memory.buffer.untyped_storage()) >= runner.memory_bytes
    fork.close()
    assert backend.forks == [] and fork.context is None and runner.context is not None
    again = runner.fork()
    runner.close()  # closing the stage closes its forks
    assert again.context is None and backend.forks == []


def test_close_releases(trt, plan, tmp_path):
    backend, runner = _load(trt, tmp_path, plan)
    fork = runner.fork()
    backend.close()
    assert backend.runners == [] and backend.forks == [] and backend.memory.nbytes == 0
    assert runner.context is None and fork.context is None
    with pytest.raises(CatomeError, match="closed"):
        runner.run(_feeds(2))


def test_shared_memory_generation():
    mem = SharedDeviceMemory(torch.device("cpu"))
    mem.reserve(10)
    g = mem.generation
    mem.reserve(5)
    assert mem.generation == g and mem.nbytes == 10
    mem.reserve(20)
    assert mem.generation == g + 1 and mem.nbytes == 20 and mem.address % ALIGNMENT == 0


class RecordingStream(DeviceStream):
    """A CPU DeviceStream that records each synchronize (with what the backend still held at that moment)."""

    def __init__(self, events: list, held) -> None:
        super().__init__(torch.device("cpu"))
        self.events, self.held = events, held

    def synchronize(self) -> None:
        self.events.append(("synchronize", self.held()))


def test_scratch_memory_is_dropped_only_after_its_stream_finished():
    """The old scratch buffer (grown, or released) is dropped only after the stream that uses it was synchronised."""
    events: list = []
    mem = SharedDeviceMemory(torch.device("cpu"))
    mem.stream = RecordingStream(events, lambda: mem.address)
    mem.reserve(512)
    assert events == []  # nothing to free yet
    first = mem.address
    mem.reserve(4096)
    assert events == [("synchronize", first)]  # the old buffer was still held when the stream was waited for
    second = mem.address
    mem.release()
    assert events[1:] == [("synchronize", second)] and mem.nbytes == 0


def test_contexts_are_destroyed_only_after_the_backends_stream_finished(trt, plan, tmp_path):
    backend, runner = _load(trt, tmp_path, plan)
    fork = runner.fork()
    events: list = []
    backend.stream = RecordingStream(events, lambda: (runner.context is not None, fork.context is not None))
    fork.close()
    assert events == [("synchronize", (True, True))]
    runner.close()
    assert events[1:] == [("synchronize", (True, False))]
    backend.close()
    assert len(events) == 2  # every context was closed already


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (2, 7, 9), (0, 4)])
def test_aligned_allocation(dtype, shape):
    for _ in range(8):  # the CPU allocator aligns to 64 bytes: some of these land off 256
        t = aligned_empty(shape, dtype, torch.device("cpu"))
        assert tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous()
        if t.numel():
            assert t.data_ptr() % ALIGNMENT == 0
            t.fill_(1)
            assert bool((t == 1).all())
    src = torch.arange(41, dtype=torch.float32)[1:].view(5, 8)
    copy = aligned(src)
    assert copy.data_ptr() % ALIGNMENT == 0 and torch.equal(copy, src)
    ok = aligned_empty((4, 4), torch.float32, torch.device("cpu"))
    assert aligned(ok) is ok


def test_without_tensorrt_the_backend_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(CatomeError, match="TensorRT is not installed.*pip install"):
        TrtBackend(None)


def test_create_backend_refuses_folder_without_plans():
    from catome_export.backends import create_backend
    from catome_export.backends.select import BackendChoice
    from catome_export.engine.engine import Engine

    with pytest.raises(CatomeError, match="no TensorRT plans"):
        create_backend(BackendChoice("trt", "test"), Engine(Path("engines/tiny"), make_manifest()))


@pytest.mark.gpu
def test_device_stream_orders_with_the_callers_stream():
    """Work in ``ordered()`` runs after what the caller enqueued before, and the caller's later work after it."""
    device = torch.device("cuda", torch.cuda.current_device())
    stream = DeviceStream(device)
    assert stream.handle not in (0, torch.cuda.default_stream(device).cuda_stream)
    big = torch.randn(4096, 4096, device=device)
    caller = torch.cuda.Stream(device)
    torch.cuda.synchronize(device)
    with torch.cuda.stream(caller):
        x = big
        for _ in range(20):
            x = x @ big / 64.0  # keeps the caller's stream busy
        src = x[:4, :4] * 0.0 + 3.0
        with stream.ordered():
            with torch.cuda.stream(stream.stream):
                out = src * 2.0
        seen = out + 0.0  # read back on the caller's stream
    torch.cuda.synchronize(device)
    assert torch.equal(seen.cpu(), torch.full((4, 4), 6.0))


# -- TensorRT proper: build the tiny model's engines, run them, compare with ONNX Runtime --------------------------

def _plan_feeds(sites, batch, hw, fraction, seed, device, text_dim=32):
    """Model inputs and forced plans of every site (same values for every backend)."""
    from catome_export.merging import forced_plan

    gen = torch.Generator().manual_seed(seed)
    feeds = {"sample": torch.randn(batch, 4, *hw, generator=gen).to(device),
             "timestep": torch.full((batch,), 500.0).to(device),
             "encoder_hidden_states": torch.randn(batch, 77, text_dim, generator=gen).to(device)}
    plans = {k: forced_plan(batch, hw, fraction, device=device, seed=seed + k) for k in sites}
    for k, plan in plans.items():
        feeds.update(zip((f"site{k}_{n}" for n in ("keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx")),
                         plan.tensors()))
    return feeds, plans


@pytest.mark.trt
@pytest.mark.gpu
def test_tiny_engines_match_onnx_runtime(tmp_path):
    """Build tiny with TensorRT (fp32); the stage chain on identical inputs and plans matches ONNX Runtime.

    r = 0 (empty src/slot tensors), a half merge, a full merge, two batch sizes and a non-square latent.
    """
    from catome_export.cli.main import main
    from catome_export.runtime.cuda_graphs import stage_chain
    from catome_export.runtime.runtime import Runtime

    out = tmp_path / "tiny"
    assert main(["build", "--model", "tiny", "--engine-kind", "trt", "--out", str(out), "--min-resolution", "192",
                 "--max-resolution", "320"]) == 0
    with Runtime.load(out, backend="trt") as trt_rt, Runtime.load(out, backend="ort-cpu") as ort_rt:
        sites = sorted(trt_rt.sites)
        trt_chain, ort_chain = stage_chain(trt_rt.chain.runners), stage_chain(ort_rt.chain.runners)
        for batch, hw, fraction in ((2, (32, 32), 0.0), (2, (32, 32), 0.5), (1, (24, 40), 1.0)):
            feeds, _ = _plan_feeds(sites, batch, hw, fraction, seed=batch, device="cuda")
            got = trt_chain(feeds)["noise_pred"].float().cpu()
            want = ort_chain({k: v.cpu() for k, v in feeds.items()})["noise_pred"].float()
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.trt
@pytest.mark.gpu
def test_tiny_trt_runtime_merges_on_smooth_latents(tmp_path):
    """The controller-driven TensorRT runtime: steps run, tokens merge, outputs are finite."""
    from catome_export.cli.main import main
    from catome_export.merging import MergeSettings
    from catome_export.runtime.runtime import Runtime

    out = tmp_path / "tiny"
    assert main(["build", "--model", "tiny", "--engine-kind", "trt", "--out", str(out), "--no-verify"]) == 0
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(2, 4, 8, 8, generator=gen)
    latent = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear").cuda()
    ehs = torch.randn(2, 77, 32, generator=gen).cuda()
    with Runtime.load(out, backend="trt", settings=MergeSettings(threshold=0.7)) as rt:
        rt.reset()
        for t in (900, 700, 500):
            pred = rt.unet(latent, torch.tensor(t), ehs).sample
            assert pred.shape == latent.shape and torch.isfinite(pred).all()
        assert any(r > 0 for rec in rt.history for r in rec.merged.values())


@pytest.mark.trt
@pytest.mark.gpu
def test_cuda_graph_replay_of_trt_chain_matches_direct_runs(tmp_path):
    """Graphs of two shape keys, replayed interleaved with new plans and with direct runs of the loaded contexts
    (as checkpoint steps do), give what the chain gives run directly; each graph runs on contexts of its own."""
    from catome_export.cli.main import main
    from catome_export.runtime.cuda_graphs import (
        ChainGraphCache, ChainGraphRunner, TorchCudaGraphCapture, graph_chain, stage_chain,
    )
    from catome_export.runtime.runtime import Runtime

    out = tmp_path / "tiny"
    assert main(["build", "--model", "tiny", "--engine-kind", "trt", "--out", str(out)]) == 0
    with Runtime.load(out, backend="trt") as rt:
        runners = rt.chain.runners
        sites = sorted(rt.sites)
        chain = stage_chain(runners)
        stream = rt.backend.stream.stream
        graphs = ChainGraphRunner(lambda: graph_chain(runners), TorchCudaGraphCapture(rt.device, stream=stream),
                                  memory_generation=lambda: rt.backend.memory.generation)

        def inputs(fraction, seed):
            return _plan_feeds(sites, 2, (32, 32), fraction, seed, "cuda")

        for fraction, seed in ((0.5, 0), (0.0, 10), (0.5, 20), (0.0, 30), (0.5, 20)):
            feeds, plans = inputs(fraction, seed)
            key = ChainGraphCache.key(2, (32, 32), [plans[k].num_merged for k in sites])
            got = graphs.run(key, feeds, {k: seed for k in sites})["noise_pred"]
            want = chain(feeds)["noise_pred"]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert graphs.captures == 2 and len(rt.backend.forks) == 2 * len(runners)
