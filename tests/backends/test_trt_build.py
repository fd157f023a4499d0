"""TensorRT engine builds: plugin-op detection, the errors without TensorRT, and (with TensorRT) the build itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from catome_export.backends import select
from catome_export.errors import CatomeError
from catome_export.export.trt_build import build_engines, plan_file, scan_onnx_ops

REPO = Path(__file__).resolve().parents[2]


def _scatter_model(path: Path, reduction: str | None, op: str = "ScatterElements") -> Path:
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, [2, 4, 3])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [2, "R", 3])
    upd = helper.make_tensor_value_info("upd", TensorProto.FLOAT, [2, "R", 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 3])
    attrs = {"axis": 1} if op == "ScatterElements" else {}
    if reduction is not None:
        attrs["reduction"] = reduction
    node = helper.make_node(op, ["data", "idx", "upd"], ["out"], **attrs)
    norm = helper.make_node("InstanceNormalization", ["out", "scale", "bias"], ["normed"])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [4], [1.0] * 4)
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [4], [0.0] * 4)
    normed = helper.make_tensor_value_info("normed", TensorProto.FLOAT, [2, 4, 3])
    graph = helper.make_graph([node, norm], "g", [data, idx, upd], [normed], initializer=[scale, bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("reduction, plugins", [
    ("add", ["ScatterElements(reduction=add)"]),
    ("mul", ["ScatterElements(reduction=mul)"]),
    ("none", []),
    (None, []),
])
def test_scan_finds_reducing_scatter(tmp_path, reduction, plugins):
    ops = scan_onnx_ops(_scatter_model(tmp_path / "m.onnx", reduction))
    assert ops["plugins"] == plugins
    assert ops["instance_norm"] is True and ops["custom_domains"] == []


def test_scan_of_exported_merge_finds_the_plugin_op(tmp_path):
    """The merge's scatter_add exports as ScatterElements(reduction=add): the op that needs libnvinfer_plugin."""
    import torch

    from catome_export.merging import match_tokens, merge_tokens

    class Merge(torch.nn.Module):
        def forward(self, x, keep, src, slot, weight):
            return merge_tokens(x, keep, src, slot, weight)

    x = torch.randn(1, 16, 4)
    plan = match_tokens(x, (4, 4), num_merged=3)
    path = tmp_path / "merge.onnx"
    torch.onnx.export(Merge().eval(), (x, *plan.tensors()[:4]), str(path), dynamo=True)
    assert scan_onnx_ops(path)["plugins"] == ["ScatterElements(reduction=add)"]


def test_scan_damaged_file(tmp_path):
    bad = tmp_path / "stage_0.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(CatomeError, match="damaged"):
        scan_onnx_ops(bad)


def test_build_without_tensorrt_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(select, "_has", lambda module: module != "tensorrt")
    with pytest.raises(CatomeError) as err:
        build_engines(tmp_path, {"stages": []}, fp16=False)
    assert "TensorRT" in str(err.value) and "pip install" in str(err.value)


def test_build_rejects_bad_optimisation_level(tmp_path):
    with pytest.raises(CatomeError, match="0..5"):
        build_engines(tmp_path, {"stages": []}, fp16=False, builder_optimization_level=7)


def test_plan_file_name():
    assert plan_file(3) == "stage_3.plan"


def _has_build_command() -> bool:
    return (REPO / "catome_export" / "cli" / "cmd_build.py").is_file()


@pytest.mark.skipif(select._has("tensorrt"), reason="TensorRT is installed here: the missing-TensorRT path cannot run")
def test_cli_build_trt_without_tensorrt_exits_1(tmp_path):
    if not _has_build_command():
        pytest.skip("the build command is not part of this checkout")
    proc = subprocess.run(
        [sys.executable, "-m", "catome_export.cli", "build", "--model", "tiny", "--backend", "trt",
         "--out", str(tmp_path / "tiny")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 1, proc.stderr
    assert "TensorRT" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")


@pytest.mark.trt
@pytest.mark.gpu
def test_build_writes_plans_cache_and_trt_section(tmp_path):
    """Build tiny's engines twice: plans and the timing cache are written, the second build reuses the cache."""
    from catome_export.cli.main import main
    from catome_export.export.manifest import Manifest

    out = tmp_path / "tiny"
    assert main(["build", "--model", "tiny", "--backend", "trt", "--out", str(out)]) == 0
    manifest = Manifest.load(out)
    section = manifest.trt
    assert section["version"] and section["gpu"] and section["compute_capability"]
    assert section["plugins"] == ["ScatterElements(reduction=add)"]
    assert len(section["profiles"]) == len(manifest.stages)
    cache = out / "timing.cache"
    assert cache.is_file() and cache.stat().st_size > 0
    again = build_engines(out, manifest, fp16=False)
    assert [e["file"] for e in again["engines"]] == [plan_file(i) for i in range(len(manifest.stages))]
    for e in again["engines"]:
        assert (out / e["file"]).stat().st_size == e["bytes"]
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.lock"))
    json.dumps(again)  # the section is JSON-ready


def test_shared_timing_cache_is_per_version_and_gpu(monkeypatch, tmp_path):
    from catome_export.export.trt_build import shared_timing_cache

    monkeypatch.setenv("CATOME_EXPORT_CACHE", str(tmp_path))
    path = shared_timing_cache("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert path == tmp_path / "trt-timing" / "trt10.3.0-sm90-nvidia-h100-80gb-hbm3.cache"
    assert shared_timing_cache("10.4.0", "NVIDIA H100 80GB HBM3", "9.0") != path
    assert shared_timing_cache("10.3.0", "NVIDIA L40S", "8.9") != path
    monkeypatch.delenv("CATOME_EXPORT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert shared_timing_cache("10.3.0", "X", "9.0").parent == tmp_path / "xdg" / "catome-export" / "trt-timing"
