"""ONNX export: checker, graph IO, and ONNX Runtime parity per stage over batch, resolution and r = 0 .. all src."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.export import external_data, onnx_export
from catome_export.export.external_data import gather_weights, needs_external_data, tensor_nbytes, weights_bytes
from catome_export.fsutil import sha256_file
from catome_export.export.onnx_export import (
    check_stage_file, example_inputs, export_stage, ort_max_diff, ort_session,
)
from catome_export.export.stages import cut_unet, run_stages
from catome_export.merging import match_tokens, partition

if TYPE_CHECKING:
    import onnx

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
    entry = item.record(spec).to_dict()
    assert entry["external_data"] == item.external_data
    assert entry["external_data_sha256"] == item.external_data_sha256 == sha256_file(data)
    assert entry["sha256"] == sha256_file(tmp_path / item.file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage_5.onnx", "stage_5.onnx.data"]
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


@pytest.mark.slow
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


def _model(arrays: dict) -> "onnx.ModelProto":
    """A small graph z = a @ b + c whose initializers are ``arrays``."""
    import onnx
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"]), helper.make_node("Add", ["y", "c"], ["z"])], "g", [],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [20, 30])],
        initializer=[numpy_helper.from_array(v, k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _arrays() -> dict:
    import numpy as np

    return {"a": np.arange(600, dtype=np.float32).reshape(20, 30),
            "b": np.linspace(0, 1, 900, dtype=np.float32).reshape(30, 30), "c": np.ones(3, dtype=np.float32)}


def _write_like_torchscript(model, folder) -> None:
    """Move every initializer to a file of its own named after it, with a ``location`` entry only.

    This is what torch's TorchScript exporter writes for a graph over 2 GB
    (no ``offset``, no ``length``); the sizes must not depend on those entries.
    """
    import onnx

    for t in model.graph.initializer:
        (folder / t.name).write_bytes(t.raw_data)
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", t.name


def test_external_files_without_length_are_counted_at_their_true_size(tmp_path):
    arrays = _arrays()
    model = _model(arrays)
    true_size = sum(v.nbytes for v in arrays.values())
    assert weights_bytes(model) == true_size  # inline
    _write_like_torchscript(model, tmp_path)
    assert all("length" not in {e.key for e in t.external_data} for t in model.graph.initializer)
    assert weights_bytes(model, tmp_path) == true_size
    assert weights_bytes(model) == true_size  # from dims x dtype: the files are not needed
    assert [tensor_nbytes(t) for t in model.graph.initializer] == [v.nbytes for v in arrays.values()]


def test_the_exporter_having_gone_external_takes_the_external_path_whatever_the_threshold(tmp_path):
    model = _model(_arrays())
    _write_like_torchscript(model, tmp_path)
    assert needs_external_data(model, tmp_path, threshold=10 ** 12)


def test_external_data_threshold(tmp_path, monkeypatch):
    model = _model(_arrays())
    size = weights_bytes(model)
    assert needs_external_data(model, tmp_path, threshold=size - 1)
    assert not needs_external_data(model, tmp_path, threshold=size)
    # A graph that would come near protobuf's limit goes external even under a threshold set above it.
    monkeypatch.setattr(external_data, "PROTO_LIMIT", model.ByteSize() + external_data.PROTO_MARGIN - 1)
    assert needs_external_data(model, tmp_path, threshold=10 ** 12)


def test_weights_in_files_without_length_are_gathered_into_one(tmp_path):
    """The external path copies the exporter's per-tensor files into one file with offsets, lengths and a hash."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    arrays = _arrays()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    model = _model(arrays)
    _write_like_torchscript(model, scratch)
    out = tmp_path / "out"
    out.mkdir()
    written = gather_weights(model, scratch, out / "m.onnx.data")
    onnx.save_model(model, str(out / "m.onnx"))
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    total = sum(v.nbytes for v in arrays.values())
    assert written.bytes == (out / "m.onnx.data").stat().st_size == total
    assert written.sha256 == sha256_file(out / "m.onnx.data")
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "m.onnx.data" and int(info["length"]) == arrays[t.name].nbytes
    again = onnx.load(str(out / "m.onnx"))
    got = {t.name: numpy_helper.to_array(t) for t in again.graph.initializer}
    assert all(np.array_equal(got[k], v) for k, v in arrays.items())


def test_gathering_with_consume_deletes_each_scratch_file_after_its_last_tensor(tmp_path):
    """The build gathers the exporter's per-tensor files with consume=True: the weights are on disk once. A file two
    tensors share goes only after the second is copied; without consume nothing is deleted."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    arrays = _arrays()
    for consume in (False, True):
        scratch = tmp_path / f"scratch-{consume}"
        scratch.mkdir()
        model = _model(arrays)
        _write_like_torchscript(model, scratch)
        b = next(t for t in model.graph.initializer if t.name == "b")
        ab = arrays["a"].tobytes() + arrays["b"].tobytes()
        (scratch / "ab").write_bytes(ab)  # "a" and "b" both in one file, at offsets
        for t, offset in ((model.graph.initializer[0], 0), (b, arrays["a"].nbytes)):
            del t.external_data[:]
            for key, value in (("location", "ab"), ("offset", str(offset)), ("length", str(arrays[t.name].nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
        (scratch / "a").unlink()
        (scratch / "b").unlink()
        out = tmp_path / f"out-{consume}"
        out.mkdir()
        written = gather_weights(model, scratch, out / "m.onnx.data", consume=consume)
        left = sorted(p.name for p in scratch.iterdir())
        assert left == ([] if consume else ["ab", "c"]), consume
        assert written.bytes == len(ab) + arrays["c"].nbytes
        onnx.save_model(model, str(out / "m.onnx"))
        got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "m.onnx")).graph.initializer}
        assert all(np.array_equal(got[k], v) for k, v in arrays.items())


def test_inline_weights_below_the_size_threshold_stay_in_the_graph(tmp_path):
    import onnx

    model = _model(_arrays())
    written = gather_weights(model, tmp_path, tmp_path / "m.onnx.data", size_threshold=1024)
    by_name = {t.name: t for t in model.graph.initializer}
    assert by_name["c"].data_location == onnx.TensorProto.DEFAULT and len(by_name["c"].raw_data) == 12
    assert by_name["a"].data_location == by_name["b"].data_location == onnx.TensorProto.EXTERNAL
    assert written.bytes == 600 * 4 + 900 * 4


def test_broken_external_references_are_refused(tmp_path):
    model = _model(_arrays())
    _write_like_torchscript(model, tmp_path)
    a = model.graph.initializer[0]
    entry = a.external_data.add()
    entry.key, entry.value = "length", "100"
    with pytest.raises(CatomeError, match="differs from its shape"):
        weights_bytes(model, tmp_path)
    del a.external_data[1:]
    (tmp_path / "a").write_bytes(b"\0" * 10)  # truncated
    with pytest.raises(CatomeError, match="incomplete"):
        gather_weights(model, tmp_path, tmp_path / "m.onnx.data")
    assert not (tmp_path / "m.onnx.data").exists() and not list(tmp_path.glob(".m.onnx.data.*"))
    a.external_data[0].value = "../outside"
    with pytest.raises(CatomeError, match="outside"):
        gather_weights(model, tmp_path, tmp_path / "m.onnx.data")


def test_export_takes_the_external_path_when_the_exporter_wrote_files_without_length(
        tmp_path, monkeypatch, export_stages, tiny_unet, export_sites):
    """A stage far under the threshold whose weights the exporter wrote externally (as it does over 2 GB) is
    exported with one weights file, never loaded back into the graph; ONNX Runtime runs it."""
    import onnx

    real_export = onnx_export._torch_export

    def export_then_write_externally(spec, module, args, path, opset, exporter):
        real_export(spec, module, args, path, opset, exporter)
        model = onnx.load(str(path))
        _write_like_torchscript(model, path.parent)
        onnx.save_model(model, str(path))

    monkeypatch.setattr(onnx_export, "_torch_export", export_then_write_externally)
    spec, module = export_stages[-1]
    examples = example_inputs(export_stages, export_sites, tiny_unet.config, torch.float32)
    item = export_stage(spec, module, examples[spec.index], tmp_path)
    assert item.external_data == "stage_5.onnx.data"
    assert item.external_data_bytes == (tmp_path / item.external_data).stat().st_size > 0
    assert item.external_data_sha256 == sha256_file(tmp_path / item.external_data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage_5.onnx", "stage_5.onnx.data"]
    assert ort_max_diff(ort_session(tmp_path / item.file), spec, module, examples[spec.index]) <= 1e-4
