"""The tensorrt stand-in keeps the published contracts it claims: the 10.x / 11.x API differences, profile checks,
the parser's refusals, and the runtime's preconditions (deserialisation, addresses, shapes, memory, stream)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

@pytest.fixture
def trt(tensorrt_standin):
    return tensorrt_standin


def test_not_importable_without_being_asked_for(trt_standin_helper):
    env = {k: v for k, v in trt_standin_helper.subprocess_env("10").items() if k != trt_standin_helper.ENV}
    proc = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "test stand-in" in proc.stderr


def test_api_differences_between_majors(trt):
    eleven = trt.__version__.startswith("11.")
    for flag in ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                 "PREFER_PRECISION_CONSTRAINTS"):
        assert hasattr(trt.BuilderFlag, flag) is not eleven, flag
    assert hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") is not eleven
    assert hasattr(trt.Builder, "platform_has_fast_fp16") is not eleven
    assert hasattr(trt.ICudaEngine, "device_memory_size") is not eleven
    assert hasattr(trt.ICudaEngine, "device_memory_size_v2") and hasattr(trt.IExecutionContext, "set_device_memory")
    network = trt.Builder(trt.Logger()).create_network(0)
    assert network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) is eleven  # always on in 11
    assert int(trt.OnnxParserFlag.NATIVE_INSTANCENORM) == 0 and trt.Logger.WARNING == trt.ILogger.Severity.WARNING


def test_profile_set_shape_checks_min_opt_max(trt):
    profile = trt.Builder(trt.Logger()).create_optimization_profile()
    profile.set_shape("x", (1, 0), (2, 3), (2, 4))
    assert [tuple(d) for d in profile.get_shape("x")] == [(1, 0), (2, 3), (2, 4)]
    with pytest.raises(RuntimeError, match="opt"):
        profile.set_shape("y", (2, 3), (1, 3), (2, 3))
    with pytest.raises(RuntimeError, match="max"):
        profile.set_shape("z", (1, 3), (2, 3), (2,))
    with pytest.raises(RuntimeError, match="min"):
        profile.set_shape("w", (-1, 3), (2, 3), (2, 3))


def _model(path: Path, index_type: int = TensorProto.INT64) -> Path:
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["B", 4, 3])
    idx = helper.make_tensor_value_info("idx", index_type, ["B", "R", 3])
    upd = helper.make_tensor_value_info("upd", TensorProto.FLOAT, ["B", "R", 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 4, 3])
    node = helper.make_node("ScatterElements", ["data", "idx", "upd"], ["out"], axis=1, reduction="add")
    onnx.save(helper.make_model(helper.make_graph([node], "g", [data, idx, upd], [out]),
                                opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _build(trt, path: Path, plugins: bool = True):
    logger = trt.Logger(trt.Logger.ERROR)
    if plugins:
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("data", (1, 4, 3), (2, 4, 3), (2, 4, 3))
    for name in ("idx", "upd"):
        profile.set_shape(name, (1, 0, 3), (2, 2, 3), (2, 4, 3))
    assert config.add_optimization_profile(profile) == 0
    return ok, parser, builder, network, config


def test_parser_reads_the_graph_and_refuses_what_tensorrt_refuses(trt, tmp_path):
    ok, parser, builder, network, config = _build(trt, _model(tmp_path / "m.onnx"))
    assert ok and parser.num_errors == 0
    assert [network.get_input(i).name for i in range(network.num_inputs)] == ["data", "idx", "upd"]
    assert tuple(network.get_input(1).shape) == (-1, -1, 3) and network.get_input(1).dtype == trt.int64
    ok, parser, *_ = _build(trt, _model(tmp_path / "i32.onnx", TensorProto.INT32))
    assert not ok and "INT64" in str(parser.get_error(0))


_LAYER_PRECISION_MEMBERS = ("precision", "precision_is_set", "reset_precision", "set_output_type",
                            "output_type_is_set", "reset_output_type")


def test_layers_have_no_precision_members_in_11(trt, tmp_path):
    """TensorRT 11 removed ILayer's per-layer precision members (pyGraph.cpp, v11.1); 10.x has them (deprecated in
    10.12). Polygraphy 0.49 reads ``layer.precision_is_set`` for every layer, which raises on 11."""
    eleven = trt.__version__.startswith("11.")
    _, _, _, network, _ = _build(trt, _model(tmp_path / "m.onnx"))
    layers = list(network)
    assert layers and all(isinstance(layer, trt.ILayer) for layer in layers)
    for name in _LAYER_PRECISION_MEMBERS:
        assert hasattr(trt.ILayer, name) is not eleven, name
        assert all(hasattr(layer, name) is not eleven for layer in layers), name
    for name in ("name", "type", "metadata", "num_inputs", "num_outputs", "get_output_type"):
        assert all(hasattr(layer, name) for layer in layers), name
    if eleven:
        with pytest.raises(AttributeError):
            [layer.name for layer in network if layer.precision_is_set]  # what Polygraphy 0.49's CreateConfig does
    else:
        layer = layers[0]
        assert layer.precision_is_set is False
        layer.precision = trt.float16
        assert layer.precision_is_set and layer.precision == trt.float16
        layer.reset_precision()
        assert not layer.precision_is_set


def test_build_without_profile_for_a_dynamic_input_fails(trt, tmp_path):
    _, _, builder, network, _ = _build(trt, _model(tmp_path / "m.onnx"))
    assert builder.build_serialized_network(network, builder.create_builder_config()) is None


@pytest.fixture
def engine(trt, tmp_path):
    _, _, builder, network, config = _build(trt, _model(tmp_path / "m.onnx"))
    plan = builder.build_serialized_network(network, config)
    return trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(plan)


def test_deserialize_needs_the_exact_version_and_the_plugins(trt, trt_standin_helper, tmp_path, monkeypatch):
    _, _, builder, network, config = _build(trt, _model(tmp_path / "m.onnx"))
    plan = bytes(builder.build_serialized_network(network, config))
    assert trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan) is not None
    assert trt.Runtime(trt.Logger()).deserialize_cuda_engine(b"garbage") is None
    major, minor, patch, build = trt.__version__.split(".")
    other = trt_standin_helper.activate(monkeypatch, f"{major}.{minor}.{patch}.{int(build) + 1}")
    other.init_libnvinfer_plugins(None, "")
    assert other.Runtime(other.Logger()).deserialize_cuda_engine(plan) is None
    same = trt_standin_helper.activate(monkeypatch, trt.__version__)  # fresh registry: no plugins registered yet
    assert same.Runtime(same.Logger()).deserialize_cuda_engine(plan) is None


def test_execution_preconditions(trt, engine):
    ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    assert tuple(ctx.get_tensor_shape("out")) == (-1, 4, 3)  # unknown until every input shape is set
    assert not ctx.set_input_shape("idx", (2, 5, 3))  # outside the profile
    for name, shape in (("data", (2, 4, 3)), ("idx", (2, 0, 3)), ("upd", (2, 0, 3))):
        assert ctx.set_input_shape(name, shape)
    assert tuple(ctx.get_tensor_shape("out")) == (2, 4, 3)
    assert not ctx.set_tensor_address("data", 4096 + 64)  # not 256-byte aligned
    for k, name in enumerate(("data", "upd", "out")):
        assert ctx.set_tensor_address(name, 4096 * (k + 1))
    ctx.set_device_memory(1 << 20, engine.device_memory_size_v2)
    assert not ctx.execute_async_v3(7)  # idx holds no elements but still needs an address
    assert ctx.set_tensor_address("idx", 1 << 16)
    assert not ctx.execute_async_v3(0)  # the legacy default stream is refused
    assert not ctx.execute_async_v3(1)  # ... also as cudaStreamLegacy
    assert ctx.execute_async_v3(7)
    assert ctx.set_tensor_address("idx", 0)  # resets to null ...
    assert not ctx.execute_async_v3(7)  # ... which enqueue refuses


def test_user_managed_context_needs_device_memory(trt, engine):
    ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    for name, shape in (("data", (1, 4, 3)), ("idx", (1, 1, 3)), ("upd", (1, 1, 3))):
        ctx.set_input_shape(name, shape)
    for k, name in enumerate(("data", "idx", "upd", "out")):
        ctx.set_tensor_address(name, 256 * (k + 1))
    assert not ctx.execute_async_v3(7)
    needed = ctx.update_device_memory_size_for_shapes()
    assert 0 < needed < engine.device_memory_size_v2  # the engine's size is an upper bound over the profile
    ctx.set_device_memory(1 << 20, needed - 1)  # too small for these shapes: enqueue refuses
    assert not ctx.execute_async_v3(7)
    ctx.set_device_memory(1 << 20, needed)  # enough for these shapes, below the upper bound: accepted
    assert ctx.execute_async_v3(7)
    for name, shape in (("data", (2, 4, 3)), ("idx", (2, 4, 3)), ("upd", (2, 4, 3))):
        ctx.set_input_shape(name, shape)
    assert ctx.update_device_memory_size_for_shapes() > needed
    assert not ctx.execute_async_v3(7)  # larger shapes need more than was set
    ctx.set_device_memory(1 << 20, engine.device_memory_size_v2)
    assert ctx.execute_async_v3(7)
    static = engine.create_execution_context()
    for name, shape in (("data", (1, 4, 3)), ("idx", (1, 1, 3)), ("upd", (1, 1, 3))):
        static.set_input_shape(name, shape)
    for k, name in enumerate(("data", "idx", "upd", "out")):
        static.set_tensor_address(name, 256 * (k + 1))
    assert static.execute_async_v3(7)


def test_engine_members_follow_the_bindings(trt, engine):
    """11.1 keeps the tensor-format queries (pyCore.cpp) and drops the v1 memory queries; 10.x has both."""
    eleven = trt.__version__.startswith("11.")
    for name in ("get_tensor_format", "get_tensor_components_per_element", "get_tensor_format_desc",
                 "get_tensor_vectorized_dim", "get_tensor_bytes_per_component", "device_memory_size_v2",
                 "get_device_memory_size_for_profile_v2"):
        assert hasattr(trt.ICudaEngine, name), name
    for name in ("device_memory_size", "get_device_memory_size_for_profile"):
        assert hasattr(trt.ICudaEngine, name) is not eleven, name
    assert engine.get_tensor_format("data") == trt.TensorFormat.LINEAR
    assert engine.get_tensor_format("data", 0) == trt.TensorFormat.LINEAR
    assert engine.get_tensor_components_per_element("data") == 1 and engine.get_tensor_vectorized_dim("data") == -1
    assert engine.get_device_memory_size_for_profile_v2(0) <= engine.device_memory_size_v2
    if not eleven:
        assert engine.get_device_memory_size_for_profile(0) == engine.get_device_memory_size_for_profile_v2(0)


# -- refitting (python/src/infer/pyCore.cpp py::class_<IRefitter>, parsers/pyOnnx.cpp OnnxParserRefitter) ----------
def _matmul_model(path: Path, weight) -> Path:
    import numpy as np

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 2], np.asarray(weight, dtype=np.float32).ravel().tolist())
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 2])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["y"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=[w, shape]),
                                opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _engine(trt, model: Path, *flags: str):
    builder = trt.Builder(trt.Logger())
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt.Logger())
    assert parser.parse_from_file(str(model))
    config = builder.create_builder_config()
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 3), (2, 3), (4, 3))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    return trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan), plan


def test_refitter_follows_the_bindings(trt, tmp_path):
    import numpy as np
    from tensorrt._formats import describe_plan

    eleven = trt.__version__.startswith("11.")
    model = _matmul_model(tmp_path / "m.onnx", np.arange(6).reshape(3, 2))
    plain, _ = _engine(trt, model)
    assert plain.refittable is False
    with pytest.raises(TypeError, match="nullptr"):
        trt.Refitter(plain, trt.Logger())  # createInferRefitter returns null for an engine built without REFIT
    engine, plan = _engine(trt, model, "REFIT")
    assert engine.refittable and describe_plan(plan)["refit"]["stripped"] is False
    refitter = trt.Refitter(engine, trt.Logger())
    assert refitter.get_all_weights() == ["w"]  # the float initializers, named after them; int64 shapes are not
    assert refitter.get_missing_weights() == [] and refitter.get_all()[1] == [trt.WeightsRole.CONSTANT]
    proto = refitter.get_weights_prototype("w")
    assert (proto.dtype, proto.size) == (trt.DataType.FLOAT, 6) and refitter.get_weights_prototype("nope").size == -1
    assert not refitter.set_named_weights("nope", np.zeros(6, dtype=np.float32))
    assert not refitter.set_named_weights("w", np.zeros(5, dtype=np.float32))  # size differs from the prototype
    assert not refitter.set_named_weights("w", np.zeros(6, dtype=np.float16))  # dtype differs
    new = np.full((3, 2), 2.0, dtype=np.float32)
    assert refitter.set_named_weights("w", trt.Weights(new))
    assert refitter.get_named_weights("w").numpy() is new and refitter.get_weights_location("w") == trt.TensorLocation.HOST
    assert refitter.refit_cuda_engine()
    refit = describe_plan(engine.serialize())["refit"]["weights"]["w"]["digest"]
    assert refit != describe_plan(plan)["refit"]["weights"]["w"]["digest"]
    assert refitter.unset_named_weights("w") and not refitter.unset_named_weights("w")
    assert hasattr(refitter, "get_dynamic_range") is not eleven  # deprecated in 10.1, removed in 11
    assert refitter.max_threads >= 1 and refitter.weights_validation is True
    bad = np.full((3, 2), np.nan, dtype=np.float32)
    assert refitter.set_named_weights("w", bad) and not refitter.refit_cuda_engine()  # validation rejects NaN


def test_weight_stripped_engine_needs_a_refit_before_it_runs(trt, tmp_path):
    import numpy as np
    from tensorrt._formats import describe_plan

    model = _matmul_model(tmp_path / "m.onnx", np.arange(6).reshape(3, 2))
    engine, plan = _engine(trt, model, "REFIT", "STRIP_PLAN")
    assert describe_plan(plan)["refit"]["stripped"] is True
    assert describe_plan(plan)["refit"]["weights"]["w"]["digest"] is None  # no weights in the plan
    context = engine.create_execution_context()
    context.set_input_shape("x", (2, 3))
    for name in ("x", "y"):
        context.set_tensor_address(name, 4096)
    assert not context.execute_async_v3(7)  # never refit: the stand-in refuses
    refitter = trt.Refitter(engine, trt.Logger())
    assert refitter.get_missing_weights() == ["w"]
    assert not refitter.refit_cuda_engine()  # get_missing_weights() != 0 before the call
    parser = trt.OnnxParserRefitter(refitter, trt.Logger())
    assert parser.refit_from_file(str(model)) and parser.num_errors == 0
    assert refitter.get_missing_weights() == [] and refitter.refit_cuda_engine()
    assert context.execute_async_v3(7)
    assert describe_plan(engine.serialize())["refit"]["weights"]["w"]["digest"] is None  # serialized stripped again
    other = _matmul_model(tmp_path / "other.onnx", np.zeros((3, 2)))
    onnx_model = onnx.load(str(other))
    del onnx_model.graph.initializer[0]
    onnx.save(onnx_model, str(other))
    parser2 = trt.OnnxParserRefitter(trt.Refitter(engine, trt.Logger()), trt.Logger())
    assert not parser2.refit_from_file(str(other)) and parser2.num_errors == 1
    parser2.clear_errors()
    assert parser2.num_errors == 0
