"""ONNX export: checker, graph IO, and ONNX Runtime parity per stage over batch, resolution and r = 0 .. all src."""

from __future__ import annotations

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.export.onnx_export import (
    check_stage_file, example_inputs, export_stage, ort_max_diff, ort_session,
)
from catome_export.export.stages import cut_unet, run_stages
from catome_export.merging import match_tokens, partition

ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'catome-export[ort]')")


def _feeds(batch: int, hw: tuple[int, int], seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, *hw, generator=gen), "timestep": torch.linspace(900.0, 100.0, batch),
            "encoder_hidden_states": torch.randn(batch, 6 + seed, 32, generator=gen)}


def test_every_stage_passes_the_checker_with_the_spec_io(exported, export_stages):
    import onnx

    folder, items = exported
    for (spec, _), item in zip(export_stages, items):
        path = folder / item.file
        check_stage_file(path)
        assert item.external_data is None and item.bytes == path.stat().st_size
        model = onnx.load(str(path), load_external_data=False)
        assert max(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) == 17
        graph_in = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                    for i in model.graph.input}
        assert list(graph_in) == list(spec.input_names)
        for t in spec.inputs:
            assert tuple(graph_in[t.name]) == t.shape, t.name
        assert [o.name for o in model.graph.output] == list(spec.output_names)


CASES = [  # (batch, latent hw, r: 0 | "all" | "half")
    (1, (16, 16), 0),
    (2, (16, 16), "all"),
    (2, (24, 24), 0),
    (1, (24, 16), "all"),
    (2, (20, 28), "half"),
]


@pytest.mark.parametrize("batch,hw,r", CASES)
def test_ort_matches_torch_stage_by_stage(ort_sessions, export_stages, export_sites, batch, hw, r):
    """One export serves every batch / resolution / merged count: each stage's ORT outputs match torch's."""
    sessions = ort_sessions
    num_src = partition(hw)[0].numel()
    count = {0: 0, "all": num_src, "half": num_src // 2}[r]
    by_index = {s.index: s for s in export_sites}
    env = dict(_feeds(batch, hw, seed=len(hw) + batch))
    seen_r = []
    for spec, module in export_stages:
        if spec.site is not None:
            plan = match_tokens(env[f"x{spec.site}"], by_index[spec.site].grid(hw), num_merged=count)
            seen_r.append(plan.num_merged)
            env.update(zip((f"site{spec.site}_{n}" for n in ("keep_idx", "src_idx", "slot_idx", "weight",
                                                             "unmerge_idx")), plan.tensors()))
        args = tuple(env[n] for n in spec.input_names)
        assert ort_max_diff(sessions[spec.index], spec, module, args) <= 1e-4
        with torch.no_grad():
            env.update(zip(spec.output_names, module(*args)))
    assert seen_r == [count] * len(export_sites)
    assert env["noise_pred"].shape == (batch, 4, *hw)


def test_ort_chain_end_to_end_with_merging(ort_sessions, export_stages, export_sites):
    sessions = [ort_sessions[spec.index] for spec, _ in export_stages]

    def ort_stage(session, spec):
        def call(*args):
            outs = session.run(list(spec.output_names), {n: a.numpy() for n, a in zip(spec.input_names, args)})
            return tuple(torch.from_numpy(o) for o in outs)
        return call

    hw = (16, 24)

    def plans(k, x):
        return match_tokens(x, export_sites[k].grid(hw), num_merged=100).tensors()

    feeds = _feeds(2, hw, seed=5)
    with torch.no_grad():
        want = run_stages(export_stages, feeds, plans)["noise_pred"]
    got = run_stages([(spec, ort_stage(s, spec)) for (spec, _), s in zip(export_stages, sessions)], feeds,
                     plans)["noise_pred"]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_external_data(tmp_path, exported, export_stages, tiny_unet, export_sites):
    import onnx

    spec, module = export_stages[-1]
    examples = example_inputs(export_stages, export_sites, tiny_unet.config, torch.float32)
    item = export_stage(spec, module, examples[spec.index], tmp_path, external_data_threshold=0)
    assert item.external_data == "stage_5.onnx.data"
    data = tmp_path / item.external_data
    assert data.stat().st_size == item.external_data_bytes > 0
    assert (tmp_path / item.file).stat().st_size < item.external_data_bytes
    entry = item.entry(spec)
    assert entry["external_data"] == item.external_data and entry["external_data_sha256"]
    check_stage_file(tmp_path / item.file)
    graph = onnx.load(str(tmp_path / item.file), load_external_data=False).graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    assert ort_max_diff(ort_session(tmp_path / item.file), spec, module, examples[spec.index]) <= 1e-4


def test_fp16_export(tmp_path, tiny_unet, export_sites):
    """fp16 graphs export and check; ORT CPU runs the merge-free stage 0 (it has no fp16 scatter-add kernel)."""
    from catome_export.export.audit import audit_stages

    stages = cut_unet(tiny_unet, export_sites, torch.float16)[:2]
    assert tiny_unet.dtype == torch.float32  # the cut converted a copy
    assert stages[1][0].inputs[0].dtype == "float16"
    assert {t.dtype for t in stages[1][0].inputs if t.name.endswith("_weight")} == {"float32"}
    examples = example_inputs(stages, export_sites, tiny_unet.config, torch.float16)
    items = [export_stage(spec, m, examples[spec.index], tmp_path) for spec, m in stages]
    for item in items:
        check_stage_file(tmp_path / item.file)
    spec, module = stages[0]
    assert ort_max_diff(ort_session(tmp_path / items[0].file), spec, module, examples[0]) <= 1e-2
    assert audit_stages(tmp_path).passed


def test_dynamo_exporter(tmp_path, tiny_unet, export_stages, export_sites):
    """The dynamo exporter gives the same results (last stage: merge site 4 with r = 0 and r = all)."""
    spec, module = export_stages[-1]
    examples = example_inputs(export_stages, export_sites, tiny_unet.config, torch.float32)
    item = export_stage(spec, module, examples[spec.index], tmp_path, exporter="dynamo")
    session = ort_session(tmp_path / item.file)
    x = examples[spec.index][0]
    for r in (0, partition((16, 16))[0].numel()):
        plan = match_tokens(x, (16, 16), num_merged=r)
        args = (x, *plan.tensors(), *examples[spec.index][6:])
        assert ort_max_diff(session, spec, module, args) <= 1e-4


def test_bad_export_arguments(tmp_path, export_stages, tiny_unet, export_sites):
    spec, module = export_stages[0]
    with pytest.raises(CatomeError, match="unknown exporter"):
        export_stage(spec, module, (), tmp_path, exporter="magic")
    with pytest.raises(CatomeError, match="opset"):
        export_stage(spec, module, (), tmp_path, opset=13)
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    with pytest.raises(CatomeError, match="checker"):
        check_stage_file(tmp_path / "broken.onnx")


def test_weights_already_in_external_files_are_gathered_into_one(tmp_path):
    """Above 2 GB the exporter writes a file per tensor; the export gathers them into stage_<k>.onnx.data."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from catome_export.export.onnx_export import _move_weights_out, _weights_bytes

    a = np.arange(600, dtype=np.float32).reshape(20, 30)
    b = np.linspace(0, 1, 900, dtype=np.float32).reshape(30, 30)
    small = np.ones(3, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"]), helper.make_node("Add", ["y", "c"], ["z"])], "g", [],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [20, 30])],
        initializer=[numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b"),
                     numpy_helper.from_array(small, "c")])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    onnx.save_model(helper.make_model(graph), str(scratch / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)
    model = onnx.load(str(scratch / "m.onnx"), load_external_data=False)
    assert _weights_bytes(model) == a.nbytes + b.nbytes + small.nbytes
    out = tmp_path / "out"
    out.mkdir()
    _move_weights_out(model, scratch, out / "m.onnx.data", "m.onnx.data")
    onnx.save_model(model, str(out / "m.onnx"))
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (out / "m.onnx.data").stat().st_size == a.nbytes + b.nbytes
    again = onnx.load(str(out / "m.onnx"))
    arrays = {t.name: numpy_helper.to_array(t) for t in again.graph.initializer}
    assert np.array_equal(arrays["a"], a) and np.array_equal(arrays["b"], b) and np.array_equal(arrays["c"], small)
