"""The ONNX Runtime stage runner on a small hand-made graph: binding, empty tensors, dtypes, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
onnx = pytest.importorskip("onnx", reason="onnx is not installed")
from onnx import TensorProto, helper  # noqa: E402

from catome_export.backends.ort import (  # noqa: E402
    OrtBackend, OrtOptions, check_gpu_version, physical_cores, session_options, version_tuple,
)
from catome_export.errors import CatomeError  # noqa: E402
from catome_export.engine.manifest import FusedGraph, StageRecord  # noqa: E402
from catome_export.engine.specs import StageSpec, TensorSpec  # noqa: E402

SPEC = StageSpec(
    index=1, site=0, next_site=None,
    inputs=(TensorSpec("x", "float32", ("B", "N")), TensorSpec("idx", "int64", ("B", "R")),
            TensorSpec("w", "float32", ("B", "K")), TensorSpec("h", "float16", ("B", "N"))),
    outputs=(TensorSpec("y", "float32", ("B", "N")), TensorSpec("g", "float32", ("B", "R")),
             TensorSpec("wsum", "float32", ("B", 1)), TensorSpec("h2", "float16", ("B", "N"))),
)


def _graph(path: Path) -> Path:
    """y = 2x, g = gather(x, idx), wsum = sum(w, axis 1), h2 = h + h."""
    vi = helper.make_tensor_value_info
    inputs = [vi("x", TensorProto.FLOAT, ["B", "N"]), vi("idx", TensorProto.INT64, ["B", "R"]),
              vi("w", TensorProto.FLOAT, ["B", "K"]), vi("h", TensorProto.FLOAT16, ["B", "N"])]
    outputs = [vi("y", TensorProto.FLOAT, ["B", "N"]), vi("g", TensorProto.FLOAT, ["B", "R"]),
               vi("wsum", TensorProto.FLOAT, ["B", 1]), vi("h2", TensorProto.FLOAT16, ["B", "N"])]
    inits = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["y"]),
        helper.make_node("GatherElements", ["x", "idx"], ["g"], axis=1),
        helper.make_node("ReduceSum", ["w", "axes"], ["wsum"], keepdims=1),
        helper.make_node("Add", ["h", "h"], ["h2"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "stage", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ort_graph")
    _graph(folder / "stage_1.onnx")
    return folder


def _feeds(b: int, n: int, r: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(b, n, generator=g), "idx": torch.randint(0, n, (b, r), generator=g),
            "w": torch.rand(b, k, generator=g), "h": torch.randn(b, n, generator=g).half()}


def _assert_outputs(out: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Exact, except the sum whose order of additions is ONNX Runtime's own."""
    assert set(out) == set(want)
    for name, tensor in want.items():
        assert out[name].dtype == tensor.dtype, name
        assert tuple(out[name].shape) == tuple(tensor.shape), name
        atol = 1e-6 if name == "wsum" else 0.0
        torch.testing.assert_close(out[name], tensor, rtol=0, atol=atol)


def _expected(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"y": f["x"] * 2, "g": torch.gather(f["x"], 1, f["idx"]), "wsum": f["w"].sum(1, keepdim=True),
            "h2": f["h"] + f["h"]}


@pytest.mark.parametrize("io_binding", [True, False], ids=["bound", "numpy"])
@pytest.mark.parametrize("b,n,r,k", [(1, 6, 3, 4), (2, 5, 0, 5), (2, 4, 2, 0), (3, 7, 7, 1)])
def test_runner_matches_torch_including_empty_tensors(graph_dir, io_binding, b, n, r, k):
    backend = OrtBackend("cpu", OrtOptions(intra_op_threads=1, io_binding=io_binding))
    runner = backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    feeds = _feeds(b, n, r, k)
    _assert_outputs(runner.run(feeds), _expected(feeds))
    backend.close()


def test_runner_shapes_change_between_runs(graph_dir):
    """One session serves different B, N, R, K (the dynamic dims change at every checkpoint)."""
    backend = OrtBackend("cpu", OrtOptions(intra_op_threads=1))
    runner = backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    for i, dims in enumerate([(2, 8, 3, 5), (2, 8, 0, 8), (1, 3, 2, 1), (2, 8, 3, 5)]):
        feeds = _feeds(*dims, seed=i)
        _assert_outputs(runner.run(feeds), _expected(feeds))


def test_outputs_survive_the_next_run(graph_dir):
    """Outputs are views of ONNX Runtime memory: they must stay valid after later runs."""
    backend = OrtBackend("cpu", OrtOptions(intra_op_threads=1))
    runner = backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    first_feeds = _feeds(2, 6, 2, 3, seed=1)
    first = {k: v.clone() for k, v in runner.run(first_feeds).items()}
    kept = runner.run(first_feeds)
    for i in range(3):
        runner.run(_feeds(2, 6, 2, 3, seed=10 + i))
    for name in first:
        assert torch.equal(kept[name], first[name])


def test_wrong_dtype_and_missing_input_are_catome_errors(graph_dir):
    backend = OrtBackend("cpu", OrtOptions(intra_op_threads=1))
    runner = backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    feeds = _feeds(1, 4, 1, 2)
    bad = dict(feeds, idx=feeds["idx"].int())
    with pytest.raises(CatomeError, match="idx.*int64"):
        runner.run(bad)
    missing = {k: v for k, v in feeds.items() if k != "w"}
    with pytest.raises(CatomeError, match="missing inputs.*'w'"):
        runner.run(missing)


def test_non_contiguous_inputs_are_handled(graph_dir):
    backend = OrtBackend("cpu", OrtOptions(intra_op_threads=1))
    runner = backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    feeds = _feeds(4, 6, 2, 3)
    feeds["x"] = torch.randn(6, 4).t()  # a transposed view
    out = runner.run(feeds)
    torch.testing.assert_close(out["y"], feeds["x"] * 2, rtol=0, atol=0)


def test_load_errors(graph_dir, tmp_path):
    backend = OrtBackend("cpu")
    with pytest.raises(CatomeError, match="missing.*rebuild"):
        backend.load_stage(tmp_path, StageRecord(SPEC, "stage_9.onnx"))
    (tmp_path / "stage_1.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(CatomeError, match="cannot load.*rebuild"):
        backend.load_stage(tmp_path, StageRecord(SPEC, "stage_1.onnx"))
    other = StageSpec(1, 0, None, SPEC.inputs[:3] + (TensorSpec("other", "float32", ("B",)),), SPEC.outputs)
    with pytest.raises(CatomeError, match="do not match the manifest"):
        backend.load_stage(graph_dir, StageRecord(other, "stage_1.onnx"))


def test_options_are_validated_and_applied():
    import onnxruntime as ort

    with pytest.raises(CatomeError, match="optimization"):
        OrtOptions(optimization="max")
    with pytest.raises(CatomeError, match="intra-op"):
        OrtOptions(intra_op_threads=0)
    with pytest.raises(CatomeError, match="unknown ONNX Runtime options"):
        OrtOptions.from_mapping({"threads": 2})
    for name in ("cpu_mem_arena", "shared_arena", "allow_spinning", "stop_spinning_after_run", "io_binding"):
        with pytest.raises(CatomeError, match=f"ORT option {name} must be true or false, got 'yes'"):
            OrtOptions.from_mapping({name: "yes"})
    so = session_options(OrtOptions(intra_op_threads=3, optimization="extended", mem_pattern=True))
    assert so.intra_op_num_threads == 3
    assert so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert so.enable_mem_pattern is True
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    default = session_options(OrtOptions())
    assert default.intra_op_num_threads == physical_cores() >= 1
    assert default.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert default.get_session_config_entry("session.use_env_allocators") == "1"  # the shared CPU arena
    assert default.get_session_config_entry("session.force_spinning_stop") == "1"
    quiet = session_options(OrtOptions(allow_spinning=False))
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("options", [dict(shared_arena=False), dict(cpu_mem_arena=False, shared_arena=True)],
                         ids=["per-session-arena", "no-arena"])
def test_shared_arena_only_when_asked_and_arena_on(options):
    so = session_options(OrtOptions(**options))
    with pytest.raises(Exception):  # noqa: B017 - ORT raises its own error for an entry that was never set
        so.get_session_config_entry("session.use_env_allocators")


def test_shared_arena_is_for_cpu_sessions_only():
    so = session_options(OrtOptions(), "cuda")
    with pytest.raises(Exception):  # noqa: B017 - ORT raises its own error for an entry that was never set
        so.get_session_config_entry("session.use_env_allocators")


def test_shared_and_per_session_arenas_give_the_same_outputs(graph_dir):
    spec_feeds = _feeds(2, 6, 3, 4, seed=3)
    outs = []
    for shared in (True, False):
        backend = OrtBackend("cpu", OrtOptions(shared_arena=shared))
        runner = backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
        outs.append([runner.run(_feeds(2, 6, 3, 4, seed=s)) for s in (3, 4, 3)])
        backend.close()
    for got in outs:
        _assert_outputs(got[0], _expected(spec_feeds))
        _assert_outputs(got[2], _expected(spec_feeds))  # buffers reused across runs leave no trace


def test_cuda_backend_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal path cannot be exercised")
    with pytest.raises(CatomeError, match="CUDA provider is not usable"):
        OrtBackend("cuda")


def test_version_parsing():
    assert version_tuple("1.20.1") == (1, 20, 1)
    assert version_tuple("1.21.0.dev20250101") == (1, 21, 0)
    assert version_tuple("1.22rc1") == (1, 22)
    assert version_tuple("unknown") == ()
    check_gpu_version("1.21.0")
    check_gpu_version("1.32.0")
    check_gpu_version("2.0")
    for old in ("1.20.1", "1.18.0", "0.9", "unknown"):
        with pytest.raises(CatomeError, match=r'pip install "onnxruntime-gpu>=1\.21"'):
            check_gpu_version(old)


@pytest.mark.parametrize("version", ["1.18.1", "1.20.2"])
def test_cuda_backend_refuses_an_onnxruntime_without_dlpack_outputs(monkeypatch, version):
    """onnxruntime-gpu before 1.21 has no ``OrtValue._get_c_value().__dlpack__``: asking for the CUDA provider with
    such a release fails at once with the install command, before any session is made."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "__version__", version)
    with pytest.raises(CatomeError, match=rf'this is {version}: pip install "onnxruntime-gpu>=1\.21"'):
        OrtBackend("cuda")


def test_cpu_backend_does_not_check_the_gpu_release(monkeypatch, graph_dir):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "__version__", "1.18.0")
    backend = OrtBackend("cpu", OrtOptions(intra_op_threads=1))
    assert backend.stream.stream is None and backend.providers() == ["CPUExecutionProvider"]
    runner = backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    feeds = _feeds(2, 5, 1, 3)
    _assert_outputs(runner.run(feeds), _expected(feeds))


def _cuda_backend():
    import onnxruntime as ort

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA device and onnxruntime-gpu")
    return OrtBackend("cuda")


@pytest.mark.gpu
def test_cuda_runner_matches_torch(graph_dir):
    backend = _cuda_backend()
    runner = backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    for dims in [(2, 8, 3, 5), (2, 8, 0, 8)]:
        feeds = {k: v.cuda() for k, v in _feeds(*dims).items()}
        out = runner.run(feeds)
        assert all(t.device.type == "cuda" for t in out.values())
        _assert_outputs({k: v.cpu() for k, v in out.items()}, {k: v.cpu() for k, v in _expected(feeds).items()})


@pytest.mark.gpu
def test_cuda_sessions_compute_on_the_backends_own_stream(graph_dir):
    """Every session gets the backend's stream (not the legacy default stream 0, which ONNX Runtime would take
    as "none given") as its ``user_compute_stream``."""
    backend = _cuda_backend()
    runner = backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    handle = backend.stream.handle
    assert handle not in (0, torch.cuda.default_stream().cuda_stream)
    options = runner.session.get_provider_options()["CUDAExecutionProvider"]
    assert options["user_compute_stream"] == str(handle)


@pytest.mark.gpu
@pytest.mark.parametrize("synchronize", [True, False], ids=["sync", "no-sync"])
def test_cuda_inputs_from_another_stream_are_waited_for(graph_dir, synchronize):
    """Inputs written by a long kernel on the caller's stream are read only after it; the outputs are ready for
    the caller's stream (with and without ONNX Runtime's own synchronisation)."""
    import onnxruntime as ort

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA device and onnxruntime-gpu")
    backend = OrtBackend("cuda", OrtOptions(synchronize=synchronize))
    runner = backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    caller = torch.cuda.Stream()
    big = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(caller):
        feeds = {k: v.cuda() for k, v in _feeds(2, 8, 3, 5).items()}
        slow = big
        for _ in range(20):  # keep the caller's stream busy before the input is written
            slow = slow @ big / 64.0
        feeds["x"] = feeds["x"] + slow[:2, :8] * 0.0
        out = runner.run(feeds)
        got = {k: v.clone() for k, v in out.items()}  # read on the caller's stream
    torch.cuda.synchronize()
    _assert_outputs({k: v.cpu() for k, v in got.items()}, {k: v.cpu() for k, v in _expected(feeds).items()})


def test_fused_graphs_are_loaded_where_the_manifest_lists_them(tmp_path):
    """``fused_graphs`` (default on) picks the stage's ``ort_optimized`` file; off, or none listed: the standard one."""
    from catome_export.backends.ort import stage_graph_file

    _graph(tmp_path / "stage_1.onnx")
    fused = tmp_path / "stage_1.ort.onnx"
    model = onnx.load(str(tmp_path / "stage_1.onnx"))
    model.graph.node[0].input[1] = "three"  # y = 3x: tells the two files apart
    model.graph.initializer.append(helper.make_tensor("three", TensorProto.FLOAT, [], [3.0]))
    onnx.save(model, str(fused))
    entry = StageRecord(SPEC, "stage_1.onnx", ort_optimized=FusedGraph(fused.name))
    f = _feeds(2, 5, 3, 4)
    for options, listed, factor in ((OrtOptions(), True, 3), (OrtOptions(fused_graphs=False), True, 2),
                                    (OrtOptions(), False, 2)):
        item = entry if listed else StageRecord(SPEC, "stage_1.onnx")
        assert stage_graph_file(item, options) == ("stage_1.ort.onnx" if factor == 3 else "stage_1.onnx")
        backend = OrtBackend("cpu", options)
        try:
            out = backend.load_stage(tmp_path, item).run(f)
        finally:
            backend.close()
        torch.testing.assert_close(out["y"], f["x"] * factor, rtol=0, atol=0)
    with pytest.raises(CatomeError, match="fused_graphs must be true or false"):
        OrtOptions(fused_graphs="yes")


# -- the CUDA provider: refused when it did not load, TF32 off for fp32 stages (CPU machine playing a CUDA one) ------

FP32_SPEC = StageSpec(
    index=1, site=0, next_site=None,
    inputs=SPEC.inputs[:3] + (TensorSpec("h", "float32", ("B", "N")),),
    outputs=SPEC.outputs[:3] + (TensorSpec("h2", "float32", ("B", "N")),),
)


def _fp32_graph(path: Path) -> Path:
    """The test graph with ``h`` and ``h2`` in fp32: a stage of an fp32 export."""
    _graph(path)
    model = onnx.load(str(path))
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name in ("h", "h2"):
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.save(model, str(path))
    return path


class _HostStream:
    """Stands for the backend's CUDA stream on a machine without one."""

    def __init__(self, device) -> None:
        self.device, self.stream = device, None

    @property
    def handle(self) -> int:
        return 0x7F00

    def ordered(self):
        from contextlib import nullcontext

        return nullcontext()


@pytest.fixture
def cuda_machine(monkeypatch):
    """onnxruntime-gpu as seen on a CUDA machine: torch has a GPU, the CUDA provider is listed as available."""
    import onnxruntime as ort

    from catome_export.backends import ort as ort_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "__version__", "1.22.0")
    monkeypatch.setattr(ort_backend, "DeviceStream", _HostStream)
    return ort


class _RecordingSessions:
    """Replaces ``onnxruntime.InferenceSession``: records the providers each session was asked for and makes a
    real (CPU) session; ``cuda_loads`` says whether the session then reports the CUDA provider as active, with
    the options it was given, as a real one does."""

    def __init__(self, real, cuda_loads: bool) -> None:
        self.real, self.cuda_loads = real, cuda_loads
        self.asked: list[list] = []

    def __call__(self, path, sess_options=None, providers=None, **kwargs):
        self.asked.append(list(providers or []))
        session = self.real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        if not self.cuda_loads:
            return session
        cuda = dict(next(p[1] for p in providers if isinstance(p, tuple) and p[0] == "CUDAExecutionProvider"))
        session.get_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
        session.get_provider_options = lambda: {"CUDAExecutionProvider": cuda, "CPUExecutionProvider": {}}
        return session


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_a_cuda_session_whose_provider_did_not_load_is_refused(cuda_machine, graph_dir, monkeypatch):
    """ONNX Runtime only warns when the CUDA provider cannot load and makes a CPU session (the real
    InferenceSession does exactly that here): the backend refuses it at load, in one line naming the fix, instead of
    failing at the first bound input."""
    ort = cuda_machine
    backend = OrtBackend("cuda:0", OrtOptions(intra_op_threads=1))
    with pytest.raises(CatomeError) as err:
        backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    msg = str(err.value)
    assert "could not load its CUDA provider for stage_1.onnx" in msg and "CPUExecutionProvider" in msg
    assert "CUDA and cuDNN" in msg and "onnxruntime-gpu 1.22.0" in msg and "--backend ort-cpu" in msg
    assert "onnxruntime.preload_dlls()" in msg and "\n" not in msg
    monkeypatch.delattr(ort, "preload_dlls", raising=False)  # older releases have no preload_dlls
    with pytest.raises(CatomeError) as err:
        backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    assert "preload_dlls" not in str(err.value) and "CUDA and cuDNN" in str(err.value)


def test_fp32_cuda_sessions_run_with_tf32_off_and_fp16_ones_as_they_are(cuda_machine, graph_dir, tmp_path,
                                                                       monkeypatch):
    """The providers reaching InferenceSession: an fp32 stage's CUDA options turn TF32 off (use_tf32=0), next to
    the backend's stream and device; an fp16 stage's leave TF32 to the provider; the active session reports them."""
    ort = cuda_machine
    sessions = _RecordingSessions(ort.InferenceSession, cuda_loads=True)
    monkeypatch.setattr(ort, "InferenceSession", sessions)
    _fp32_graph(tmp_path / "stage_1.onnx")
    backend = OrtBackend("cuda:0", OrtOptions(intra_op_threads=1))
    fp32 = backend.load_stage(tmp_path, StageRecord(FP32_SPEC, "stage_1.onnx"))
    fp16 = backend.load_stage(graph_dir, StageRecord(SPEC, "stage_1.onnx"))
    (name32, opts32), cpu32 = sessions.asked[0]
    (name16, opts16), cpu16 = sessions.asked[1]
    assert name32 == name16 == "CUDAExecutionProvider" and cpu32 == cpu16 == "CPUExecutionProvider"
    assert opts32["use_tf32"] == "0" and "use_tf32" not in opts16
    for opts in (opts32, opts16):
        assert opts["device_id"] == "0" and opts["user_compute_stream"] == str(0x7F00)
    assert fp32.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"
    assert "use_tf32" not in fp16.session.get_provider_options()["CUDAExecutionProvider"]
    assert backend.providers() == backend.providers(fp32=True) and backend.providers(fp32=False) != backend.providers()


@pytest.mark.gpu
def test_real_fp32_cuda_session_has_tf32_off(tmp_path):
    backend = _cuda_backend()
    runner = backend.load_stage(_fp32_graph(tmp_path / "stage_1.onnx").parent, StageRecord(FP32_SPEC, "stage_1.onnx"))
    assert "CUDAExecutionProvider" in runner.session.get_providers()
    assert runner.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"
