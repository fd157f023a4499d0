"""The whole-U-Net ONNX graph: same outputs as the torch U-Net, reused when the weights match."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the unstaged baseline runs in ONNX Runtime")

from catome_export.bench.unstaged import META_FILE, cached_graph, export_unstaged, load_unstaged
from catome_export.models import weights_hash


def test_export_run_and_reuse(tiny_unet, tmp_path):
    folder = tmp_path / "unstaged"
    digest = weights_hash(tiny_unet)
    graph = export_unstaged(tiny_unet, folder, digest)
    assert graph.is_file() and json.loads((folder / META_FILE).read_text())["weights_hash"] == digest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    runner, backend = load_unstaged(graph, tiny_unet.config, "float32", "cpu", {"intra_op_threads": 1})
    try:
        for batch, hw, text_len in ((1, (16, 16), 77), (2, (8, 24), 5)):
            gen = torch.Generator().manual_seed(batch)
            sample = torch.randn(batch, 4, *hw, generator=gen)
            timestep = torch.full((batch,), 321.0)
            text = torch.randn(batch, text_len, 32, generator=gen)
            got = runner.run({"sample": sample, "timestep": timestep, "encoder_hidden_states": text})["noise_pred"]
            with torch.no_grad():
                want = tiny_unet(sample, timestep, text).sample
            assert got.shape == want.shape
            assert float((got - want).abs().max()) < 1e-4
    finally:
        backend.close()
    mtime = graph.stat().st_mtime_ns
    assert export_unstaged(tiny_unet, folder, digest) == graph and graph.stat().st_mtime_ns == mtime
    assert cached_graph(folder, "other-weights", "float32") is None
    assert cached_graph(folder, digest, "float16") is None
