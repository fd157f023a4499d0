"""Reading ONNX Runtime traces: only the chosen runs' kernels count, summed per op type."""

from __future__ import annotations

import json

import pytest

from catome_export.bench.profile import profile_markdown, summarise_trace
from catome_export.errors import CatomeError


def _trace(tmp_path):
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 1000},       # warm-up run (index 0)
        {"cat": "Node", "name": "conv_kernel_time", "ts": 100, "dur": 900, "args": {"op_name": "Conv"}},
        {"cat": "Session", "name": "model_run", "ts": 2000, "dur": 500},     # run 1
        {"cat": "Node", "name": "conv_kernel_time", "ts": 2100, "dur": 300, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv_fence_before", "ts": 2100, "dur": 50, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "mm_kernel_time", "ts": 2400, "dur": 100, "args": {"op_name": "MatMul"}},
        {"cat": "Session", "name": "model_run", "ts": 3000, "dur": 700},     # run 2
        {"cat": "Node", "name": "conv_kernel_time", "ts": 3100, "dur": 500, "args": {"op_name": "Conv"}},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(events))
    return path


def test_summarise_selects_runs(tmp_path):
    path = _trace(tmp_path)
    s = summarise_trace(path, [1, 2])
    assert s["runs"] == 2 and s["run_ms"] == pytest.approx(0.6)
    assert s["ops_ms"] == {"Conv": pytest.approx(0.4), "MatMul": pytest.approx(0.05)}
    assert list(s["ops_ms"]) == ["Conv", "MatMul"]
    assert summarise_trace(path, [0])["ops_ms"] == {"Conv": pytest.approx(0.9)}
    assert summarise_trace(path, [7])["runs"] == 0


def test_markdown_and_errors(tmp_path):
    stage = {"run_ms": 2.0, "ops_ms": {"Conv": 1.5}}
    profile = {"engine": {"0": {"stages": [stage, stage], "ops_ms": {"Conv": 3.0}, "stages_ms": 4.0}},
               "unstaged": {"ops_ms": {"Conv": 2.5, "Add": 0.1}}}
    text = profile_markdown(profile)
    assert "| all stages | 4.0 |" in text and "| Conv | 3.0 | 2.5 |" in text and "| Add | - | 0.1 |" in text
    bad = tmp_path / "bad.json"
    bad.write_text("[")
    with pytest.raises(CatomeError, match="cannot read"):
        summarise_trace(bad, [0])


@pytest.mark.parametrize("node,op,group", [
    ("/down_blocks.0/attentions.0/transformer_blocks.0/attn1/MatMul", "MatMul", "self-attention core"),
    ("/attn1/Softmax", "Softmax", "self-attention core"),
    ("/attn1/to_q/MatMul", "MatMul", "other matmul"),
    ("/attn2/MatMul_1", "MatMul", "cross-attention core"),
    ("/conv_in/Conv", "Conv", "conv"),
    ("/ff/net.0/proj/MatMul", "MatMul", "other matmul"),
    ("/ScatterElements", "ScatterElements", "merge/unmerge"),
    ("/norm1/LayerNormalization", "LayerNormalization", "other"),
])
def test_ort_groups(node, op, group):
    from catome_export.bench.profile import ort_group

    assert ort_group(node, op) == group


def test_eager_profile_groups(tiny_unet):
    import torch

    from catome_export.bench.measure import Inputs
    from catome_export.bench.profile import profile_eager

    inputs = Inputs(torch.randn(1, 4, 8, 8), torch.full((1,), 500.0), torch.randn(1, 7, 32))
    prof = profile_eager(tiny_unet, inputs, calls=1)
    groups = prof["groups_ms"]
    assert {"self-attention core", "cross-attention core", "conv", "other matmul"} <= set(groups)
    assert prof["run_ms"] > 0 and all(v > 0 for v in groups.values())
