"""ONNX Runtime's own fusions on the stage graphs (catome_export.export.ort_optimize), on the tiny U-Net."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.fsutil import sha256_file
from catome_export.export.onnx_export import example_inputs, export_stage, ort_max_diff, ort_session
from catome_export.merging.matching import match_tokens, partition
from catome_export.merging.plan import MergePlan

pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'catome-export[ort]')")
pytest.importorskip("onnxruntime.transformers.optimizer", reason="onnxruntime without its transformer optimizer")

from catome_export.export.ort_optimize import (
    _remove_useless_div, _unfold_key_transposes, optimize_graph, optimized_name,
)


@pytest.fixture(scope="module")
def fused(exported, tmp_path_factory) -> dict:
    """Stage index -> OptimizedGraph of the shared export, written into a folder of their own."""
    folder, items = exported
    out = tmp_path_factory.mktemp("fused")
    before = {item.index: sha256_file(folder / item.file) for item in items}
    graphs = {item.index: optimize_graph(folder / item.file, out) for item in items}
    after = {item.index: sha256_file(folder / item.file) for item in items}
    assert before == after  # the standard graphs are not touched
    return {"folder": out, "graphs": graphs}


def _ops(path) -> Counter:
    import onnx

    return Counter((n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_every_attention_is_fused_including_the_merged_sites(fused, export_stages):
    for spec, _ in export_stages:
        graph = fused["graphs"][spec.index]
        assert graph.file == optimized_name(f"stage_{spec.index}.onnx") == f"stage_{spec.index}.ort.onnx"
        ops = _ops(fused["folder"] / graph.file)
        assert graph.attention_left == ops[("", "Softmax")] == 0
        attention = ops[("com.microsoft", "MultiHeadAttention")] + ops[("com.microsoft", "Attention")]
        if spec.site is not None:  # every stage after the first starts with a merged site's transformer block
            assert ops[("com.microsoft", "MultiHeadAttention")] >= 2, ops  # merged self- and cross-attention
            assert attention == graph.fused.get("MultiHeadAttention", 0) + graph.fused.get("Attention", 0)


def test_fused_attention_nodes_are_named_after_the_attention_they_replace(fused):
    import onnx

    graph = onnx.load(str(fused["folder"] / fused["graphs"][1].file), load_external_data=False).graph
    names = [n.name for n in graph.node if n.op_type == "MultiHeadAttention"]
    assert any("attn1/" in n for n in names) and any("attn2/" in n for n in names), names


def _feeds(batch: int, hw: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, *hw, generator=gen),
            "timestep": torch.linspace(999.0, 1.0, batch),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=gen)}


@pytest.mark.parametrize("batch,hw,r", [(2, (16, 16), "half"), (1, (24, 16), 0), (2, (20, 28), "all")])
def test_fused_graphs_match_torch_at_any_k(fused, export_stages, export_sites, batch, hw, r):
    """The merged attention takes [B, K, C] with K = N - r: one fused graph serves r = 0 (identity plan) to all."""
    sessions = {i: ort_session(fused["folder"] / g.file) for i, g in fused["graphs"].items()}
    by_index = {s.index: s for s in export_sites}
    num_src = partition(hw)[0].numel()
    env = dict(_feeds(batch, hw, seed=batch + hw[0]))
    for spec, module in export_stages:
        if spec.site is not None:
            x = env[f"x{spec.site}"]
            plan = MergePlan.identity(batch, x.shape[1]) if r == 0 else match_tokens(
                x, by_index[spec.site].grid(hw), num_merged={"half": num_src // 2, "all": num_src}[r])
            env.update(zip((f"site{spec.site}_{n}" for n in ("keep_idx", "src_idx", "slot_idx", "weight",
                                                             "unmerge_idx")), plan.tensors()))
        args = tuple(env[n] for n in spec.input_names)
        with torch.no_grad():
            outputs = module(*args)
        scale = max(1.0, max(float(t.abs().max()) for t in outputs))
        assert ort_max_diff(sessions[spec.index], spec, module, args) <= 1e-4 * scale
        env.update(zip(spec.output_names, outputs))


def test_external_weights_stay_external_and_large_ones_are_never_loaded(tmp_path, export_stages, export_sites,
                                                                        tiny_unet, monkeypatch):
    import onnx

    from catome_export.export import ort_optimize

    spec, module = export_stages[1]
    examples = example_inputs(export_stages, export_sites, tiny_unet.config, torch.float32)
    item = export_stage(spec, module, examples[spec.index], tmp_path, external_data_threshold=0)
    assert item.external_data is not None
    read: list[int] = []
    real = ort_optimize._load_small_weights

    def counting(model, base, limit=ort_optimize.SMALL_WEIGHT_BYTES):
        read.append(real(model, base, limit=4096))  # "large" = over 4 kB here
        big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert big, "the tiny stage should have weights over 4 kB"
        return read[-1]

    monkeypatch.setattr(ort_optimize, "_load_small_weights", counting)
    out = tmp_path / "out"
    out.mkdir()
    graph = optimize_graph(tmp_path / item.file, out)
    assert read and read[0] > 0
    assert graph.external_data == "stage_1.ort.onnx.data"
    assert sorted(p.name for p in out.iterdir()) == ["stage_1.ort.onnx", "stage_1.ort.onnx.data"]
    assert graph.external_data_sha256 == sha256_file(out / graph.external_data)
    assert graph.external_data_bytes == (out / graph.external_data).stat().st_size > 0
    entry = graph.entry()
    assert entry["external_data"] == graph.external_data and entry["sha256"] == sha256_file(out / graph.file)
    model = onnx.load(str(out / graph.file), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"stage_1.ort.onnx.data"}  # nothing points back at the source's data file
    assert graph.attention_left == 0
    assert ort_max_diff(ort_session(out / graph.file), spec, module, examples[spec.index]) <= 1e-4


def test_fp16_graphs_keep_their_dtypes(tmp_path, tiny_unet, export_sites):
    """fp16 stages go through the same passes; every graph input and output and every fused op stays fp16.

    ONNX Runtime's attention passes do not match the fp16 export's attention (its casts around the scores), so the
    fp16 graphs keep the unfused attention core, which ``attention_left`` reports.
    """
    import onnx

    from catome_export.export.stages import cut_unet

    stages = cut_unet(tiny_unet, export_sites, torch.float16)[:2]
    examples = example_inputs(stages, export_sites, tiny_unet.config, torch.float16)
    spec, module = stages[1]
    item = export_stage(spec, module, examples[1], tmp_path)
    graph = optimize_graph(tmp_path / item.file)
    src = onnx.load(str(tmp_path / item.file)).graph
    out = onnx.load(str(tmp_path / graph.file))

    def io(g):
        return [(v.name, v.type.tensor_type.elem_type) for v in (*g.input, *g.output)]

    assert io(out.graph) == io(src)
    assert graph.fused and graph.attention_left == sum(n.op_type == "Softmax" for n in out.graph.node)
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(out, auto_merge=True)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    contrib = [n for n in inferred.graph.node if n.domain == "com.microsoft"]
    assert contrib
    for node in contrib:
        assert types[node.output[0]] == onnx.TensorProto.FLOAT16, node.name


def test_key_transpose_unfolding_is_exact():
    """perm (0,2,3,1) == (0,2,1,3) then (0,1,3,2): the rewrite the merged-site fusion relies on changes nothing."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((2, 5, 3, 4))
    assert np.array_equal(x.transpose(0, 2, 3, 1), x.transpose(0, 2, 1, 3).transpose(0, 1, 3, 2))


def test_unfolding_touches_only_attention_key_transposes():
    from onnx import TensorProto, helper

    from catome_export.export.ort_optimize import _import_optimizer

    _import_optimizer()
    from onnx_model import OnnxModel

    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),  # not under a Softmax
             helper.make_node("Relu", ["t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 2])])
    model = OnnxModel(helper.make_model(graph))
    assert _unfold_key_transposes(model) == 0
    assert [n.op_type for n in model.model.graph.node] == ["Transpose", "Relu"]


def test_a_divide_by_one_that_is_a_graph_output_is_kept():
    """onnxruntime 1.32's U-Net pass drops it and leaves the output unproduced; the fixed pass keeps it."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    from catome_export.export.ort_optimize import _import_optimizer

    _import_optimizer()
    from onnx_model_unet import UnetOnnxModel

    one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
    nodes = [helper.make_node("Div", ["x", "one"], ["out"]), helper.make_node("Div", ["x", "one"], ["mid"]),
             helper.make_node("Relu", ["mid"], ["y"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "out", "y")]
    model = UnetOnnxModel(helper.make_model(helper.make_graph(nodes, "g", vi[:1], vi[1:], [one])))
    _remove_useless_div(model)
    ops = [(n.op_type, list(n.input), list(n.output)) for n in model.model.graph.node]
    assert ("Div", ["x", "one"], ["out"]) in ops  # a graph output: kept
    assert ("Relu", ["x"], ["y"]) in ops and len(ops) == 2  # the inner one: removed, its reader rewired


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    with pytest.raises(CatomeError, match="not an .onnx file"):
        optimized_name("stage_0.plan")
    bad = tmp_path / "stage_0.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(CatomeError, match="optimizer failed on stage_0.onnx"):
        optimize_graph(bad)
