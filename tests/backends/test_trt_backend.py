"""The TensorRT backend's binding logic against a stand-in ``tensorrt`` module (CPU), and on a GPU with TensorRT.

The stand-in records every call the backend makes (shapes, addresses, device
memory, enqueue), so the rules are checked here without TensorRT: shapes are
set only when they change, empty tensors get valid addresses of their own,
every context points at one shared scratch buffer as large as the largest
stage needs, outputs are sized from ``get_tensor_shape``.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from catome_export.backends.trt import SharedDeviceMemory, TrtBackend
from catome_export.errors import CatomeError
from catome_export.export.stages import StageSpec, TensorSpec, plan_specs


class FakeTrt:
    """Just enough of the tensorrt module for TrtBackend."""

    class DataType(enum.Enum):
        FLOAT = 0
        HALF = 1
        INT8 = 2
        INT32 = 3
        BOOL = 4
        UINT8 = 5
        BF16 = 7
        INT64 = 8

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class ExecutionContextAllocationStrategy(enum.Enum):
        STATIC = 0
        ON_PROFILE_CHANGE = 1
        USER_MANAGED = 2

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    def __init__(self) -> None:
        self.engines: dict[bytes, "FakeEngine"] = {}
        self.plugin_inits = 0
        fake = self

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def deserialize_cuda_engine(self, data):
                return fake.engines.get(bytes(data))

        self.Runtime = Runtime

    def init_libnvinfer_plugins(self, logger, namespace):
        self.plugin_inits += 1
        return True


class LegacyContext:
    """A TensorRT 10.0 context: scratch memory through the ``device_memory`` attribute only."""

    def __init__(self, engine: "FakeEngine", strategy) -> None:
        self.engine = engine
        self.strategy = strategy
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shape_calls: list[tuple[str, tuple[int, ...]]] = []
        self.memory_calls: list[tuple[int, int]] = []
        self.enqueued: list[int] = []
        self.fail_execute = False

    @property
    def device_memory(self):
        return self.memory_calls[-1][0] if self.memory_calls else 0

    @device_memory.setter
    def device_memory(self, address):
        self.memory_calls.append((address, -1))

    def set_input_shape(self, name, shape):
        self.shape_calls.append((name, tuple(shape)))
        lo, _, hi = self.engine.profiles[name]
        if any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.engine.output_shape(name, self.shapes)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream):
        self.enqueued.append(stream)
        return not self.fail_execute


class FakeContext(LegacyContext):
    """A TensorRT >= 10.1 context: ``set_device_memory(address, size)``."""

    def set_device_memory(self, address, size):
        self.memory_calls.append((address, size))


class FakeEngine:
    def __init__(self, spec: StageSpec, memory: int, profiles: dict, output_shape, dtypes=None,
                 context_cls=FakeContext, drop_inputs=()) -> None:
        self.spec = spec
        self.device_memory_size_v2 = memory
        self.profiles = profiles
        self._output_shape = output_shape
        self.io = [(t.name, FakeTrt.TensorIOMode.INPUT, t.dtype) for t in spec.inputs if t.name not in drop_inputs]
        self.io += [(t.name, FakeTrt.TensorIOMode.OUTPUT, t.dtype) for t in spec.outputs]
        self.dtypes = dtypes or {}
        self.context_cls = context_cls
        self.contexts: list[FakeContext] = []

    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return next(m for n, m, _ in self.io if n == name)

    def get_tensor_dtype(self, name):
        given = self.dtypes.get(name) or next(d for n, _, d in self.io if n == name)
        return {"float32": FakeTrt.DataType.FLOAT, "float16": FakeTrt.DataType.HALF,
                "int64": FakeTrt.DataType.INT64}[given]

    def get_tensor_profile_shape(self, name, profile):
        return [list(s) for s in self.profiles[name]]

    def output_shape(self, name, shapes):
        return self._output_shape(name, shapes)

    def create_execution_context(self, strategy):
        ctx = self.context_cls(self, strategy)
        self.contexts.append(ctx)
        return ctx


def _site_spec() -> StageSpec:
    return StageSpec(1, 0, None, (TensorSpec("x0", "float32", ("B", "N0", 8)), *plan_specs(0)),
                     (TensorSpec("noise_pred", "float32", ("B", "N0", 8)),))


def _site_engine(memory=1000, **kw) -> FakeEngine:
    spec = _site_spec()
    profiles = {t.name: ((1,) + (0,) * (len(t.shape) - 1), (2,) + (32,) * (len(t.shape) - 1),
                         (2,) + (64,) * (len(t.shape) - 1)) for t in spec.inputs}
    profiles["x0"] = ((1, 1, 8), (2, 32, 8), (2, 64, 8))
    return FakeEngine(spec, memory, profiles, lambda name, s: s["x0"], **kw)


def _feeds(r: int, n: int = 16, batch: int = 2) -> dict[str, torch.Tensor]:
    k = n - r
    return {"x0": torch.randn(batch, n, 8), "site0_keep_idx": torch.zeros(batch, k, dtype=torch.int64),
            "site0_src_idx": torch.zeros(batch, r, dtype=torch.int64),
            "site0_slot_idx": torch.zeros(batch, r, dtype=torch.int64),
            "site0_weight": torch.ones(batch, k), "site0_unmerge_idx": torch.zeros(batch, n, dtype=torch.int64)}


@pytest.fixture
def fake():
    return FakeTrt()


def _load(fake: FakeTrt, tmp_path: Path, engine: FakeEngine, name: str = "stage_1.plan",
          backend: TrtBackend | None = None):
    blob = name.encode() + b"-plan"
    fake.engines[blob] = engine
    (tmp_path / name).write_bytes(blob)
    backend = backend or TrtBackend(None, "cpu", trt_module=fake)
    runner = backend.load_stage(tmp_path, {"index": engine.spec.index, "engine": {"file": name}}, engine.spec)
    return backend, runner


def test_contexts_are_user_managed_and_plugins_registered(fake, tmp_path):
    engine = _site_engine()
    backend, runner = _load(fake, tmp_path, engine)
    assert engine.contexts[0].strategy is FakeTrt.ExecutionContextAllocationStrategy.USER_MANAGED
    assert fake.plugin_inits == 1
    assert backend.name == "trt" and backend.runners == [runner]


def test_shapes_set_only_when_they_change(fake, tmp_path):
    engine = _site_engine()
    _, runner = _load(fake, tmp_path, engine)
    ctx = engine.contexts[0]
    runner.run(_feeds(r=4))
    assert len(ctx.shape_calls) == 6
    runner.run(_feeds(r=4))
    assert len(ctx.shape_calls) == 6  # same shapes: no call
    runner.run(_feeds(r=6))
    changed = {name for name, _ in ctx.shape_calls[6:]}
    assert changed == {"site0_keep_idx", "site0_src_idx", "site0_slot_idx", "site0_weight"}
    assert len(ctx.enqueued) == 3 and ctx.enqueued == [0, 0, 0]


def test_outputs_sized_from_get_tensor_shape(fake, tmp_path):
    engine = _site_engine()
    _, runner = _load(fake, tmp_path, engine)
    out = runner.run(_feeds(r=3, n=20))
    assert set(out) == {"noise_pred"}
    assert out["noise_pred"].shape == (2, 20, 8) and out["noise_pred"].dtype == torch.float32
    assert engine.contexts[0].addresses["noise_pred"] == out["noise_pred"].data_ptr()


def test_empty_tensors_get_valid_distinct_addresses(fake, tmp_path):
    engine = _site_engine()
    _, runner = _load(fake, tmp_path, engine)
    feeds = _feeds(r=0)
    assert feeds["site0_src_idx"].numel() == 0
    runner.run(feeds)
    addr = engine.contexts[0].addresses
    src, slot = addr["site0_src_idx"], addr["site0_slot_idx"]
    assert src != 0 and slot != 0 and src != slot
    base = runner._dummy.data_ptr()
    assert base <= src < base + runner._dummy.numel() and base <= slot < base + runner._dummy.numel()
    assert addr["x0"] == feeds["x0"].data_ptr()


def test_shape_outside_profile_names_input_and_range(fake, tmp_path):
    _, runner = _load(fake, tmp_path, _site_engine())
    with pytest.raises(CatomeError, match=r"'x0'.*\[3, 16, 8\].*min \[1, 1, 8\], max \[2, 64, 8\]"):
        runner.run(_feeds(r=2, batch=3))


def test_one_shared_scratch_buffer_as_large_as_the_largest_stage(fake, tmp_path):
    small, big = _site_engine(memory=1000), _site_engine(memory=5000)
    backend, r1 = _load(fake, tmp_path, small, "stage_1.plan")
    _, r2 = _load(fake, tmp_path, big, "stage_2.plan", backend)
    assert backend.memory.nbytes == 5000
    r1.run(_feeds(2))
    r2.run(_feeds(2))
    address = backend.memory.address
    assert small.contexts[0].memory_calls == [(address, 5000)]
    assert big.contexts[0].memory_calls == [(address, 5000)]
    r1.run(_feeds(2))
    assert len(small.contexts[0].memory_calls) == 1  # bound once
    # a later, larger stage moves the buffer: every context rebinds on its next run
    bigger = _site_engine(memory=9000)
    _load(fake, tmp_path, bigger, "stage_3.plan", backend)
    r1.run(_feeds(2))
    assert small.contexts[0].memory_calls[-1] == (backend.memory.address, 9000)


def test_tensorrt_10_0_memory_api(fake, tmp_path):
    engine = _site_engine(context_cls=LegacyContext)
    del engine.device_memory_size_v2
    engine.device_memory_size = 777
    backend, runner = _load(fake, tmp_path, engine)
    runner.run(_feeds(1))
    assert backend.memory.nbytes == 777
    assert engine.contexts[0].memory_calls == [(backend.memory.address, -1)]


def test_inputs_converted_to_engine_dtype(fake, tmp_path):
    engine = _site_engine(dtypes={"x0": "float16"})
    _, runner = _load(fake, tmp_path, engine)
    feeds = _feeds(2)
    runner.run(feeds)
    bound = engine.contexts[0].addresses["x0"]
    assert bound != feeds["x0"].data_ptr()
    assert any(t.dtype == torch.float16 and t.data_ptr() == bound for t in runner._keep)


def test_dropped_unused_input_is_fine_but_unknown_io_is_not(fake, tmp_path):
    _, runner = _load(fake, tmp_path, _site_engine(drop_inputs=("site0_weight",)))
    runner.run(_feeds(2))
    bad = _site_engine()
    bad.io.append(("mystery", FakeTrt.TensorIOMode.INPUT, "float32"))
    with pytest.raises(CatomeError, match="stale"):
        _load(fake, tmp_path, bad, "stage_9.plan")


def test_missing_or_unloadable_plan(fake, tmp_path):
    backend = TrtBackend(None, "cpu", trt_module=fake)
    spec = _site_spec()
    with pytest.raises(CatomeError, match="--backend trt"):
        backend.load_stage(tmp_path, {"index": 1, "engine": None}, spec)
    (tmp_path / "stage_1.plan").write_bytes(b"garbage")
    with pytest.raises(CatomeError, match="could not load"):
        backend.load_stage(tmp_path, {"index": 1, "engine": None}, spec)


def test_failed_enqueue_raises(fake, tmp_path):
    engine = _site_engine()
    _, runner = _load(fake, tmp_path, engine)
    engine.contexts[0].fail_execute = True
    with pytest.raises(CatomeError, match="failed to run stage 1"):
        runner.run(_feeds(2))


def test_missing_feed_raises(fake, tmp_path):
    _, runner = _load(fake, tmp_path, _site_engine())
    feeds = _feeds(2)
    del feeds["site0_weight"]
    with pytest.raises(CatomeError, match="site0_weight"):
        runner.run(feeds)


def test_close_releases(fake, tmp_path):
    backend, runner = _load(fake, tmp_path, _site_engine())
    backend.close()
    assert backend.runners == [] and backend.memory.nbytes == 0 and runner.context is None


def test_shared_memory_generation():
    mem = SharedDeviceMemory(torch.device("cpu"))
    mem.reserve(10)
    g = mem.generation
    mem.reserve(5)
    assert mem.generation == g and mem.nbytes == 10
    mem.reserve(20)
    assert mem.generation == g + 1 and mem.nbytes == 20


def test_without_tensorrt_the_backend_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(CatomeError, match="TensorRT is not installed.*pip install"):
        TrtBackend(None)


def test_create_backend_refuses_folder_without_plans():
    from catome_export.backends import create_backend
    from catome_export.backends.select import BackendChoice

    with pytest.raises(CatomeError, match="no TensorRT plans"):
        create_backend(BackendChoice("trt", "test"), SimpleNamespace(engine_backend="ort"))


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
    assert main(["build", "--model", "tiny", "--backend", "trt", "--out", str(out), "--min-resolution", "192",
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
    assert main(["build", "--model", "tiny", "--backend", "trt", "--out", str(out), "--no-verify"]) == 0
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
    """Graphs of two shape keys, replayed interleaved with new plans, give what the chain gives run directly."""
    from catome_export.cli.main import main
    from catome_export.runtime.cuda_graphs import ChainGraphCache, ChainGraphRunner, TorchCudaGraphCapture, stage_chain
    from catome_export.runtime.runtime import Runtime

    out = tmp_path / "tiny"
    assert main(["build", "--model", "tiny", "--backend", "trt", "--out", str(out)]) == 0
    with Runtime.load(out, backend="trt") as rt:
        runners = rt.chain.runners
        sites = sorted(rt.sites)
        chain = stage_chain(runners)
        graphs = ChainGraphRunner(chain, TorchCudaGraphCapture(rt.device),
                                  memory_generation=lambda: rt.backend.memory.generation)

        def inputs(fraction, seed):
            return _plan_feeds(sites, 2, (32, 32), fraction, seed, "cuda")

        for fraction, seed in ((0.5, 0), (0.0, 10), (0.5, 20), (0.0, 30), (0.5, 20)):
            feeds, plans = inputs(fraction, seed)
            key = ChainGraphCache.key(2, (32, 32), [plans[k].num_merged for k in sites])
            got = graphs.run(key, feeds, {k: seed for k in sites})["noise_pred"]
            want = chain(feeds)["noise_pred"]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert graphs.captures == 2
