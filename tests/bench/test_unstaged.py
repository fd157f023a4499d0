"""The whole-U-Net ONNX graph: same outputs as the torch U-Net, reused when the weights match."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the unstaged baseline runs in ONNX Runtime")

from catome_export.bench.unstaged import META_FILE, cached_graph, export_unstaged, load_unstaged
from catome_export.models import weights_hash


@pytest.mark.slow
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


@pytest.mark.slow
def test_sdxl_style_export_takes_the_added_conditioning(tmp_path):
    """tiny-xl: text_embeds and time_ids are graph inputs, and the graph matches the torch U-Net given them."""
    from catome_export.models import load_unet
    from catome_export.models.conditioning import random_added_conditioning

    unet = load_unet("tiny-xl", "random")
    graph = export_unstaged(unet, tmp_path / "unstaged")
    runner, backend = load_unstaged(graph, unet.config, "float32", "cpu", {"intra_op_threads": 1})
    try:
        assert [t.name for t in runner.spec.inputs][3:] == ["text_embeds", "time_ids"]
        for batch, hw in ((1, (16, 16)), (2, (8, 24))):
            gen = torch.Generator().manual_seed(batch)
            sample = torch.randn(batch, 4, *hw, generator=gen)
            timestep = torch.full((batch,), 321.0)
            text = torch.randn(batch, 5, 64, generator=gen)
            added = random_added_conditioning(unet, batch, (hw[0] * 8, hw[1] * 8), seed=batch)
            bigger = {**added, "time_ids": added["time_ids"] * 2}  # another image size
            feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text}
            got = runner.run({**feeds, **added})["noise_pred"]
            got_bigger = runner.run({**feeds, **bigger})["noise_pred"]
            with torch.no_grad():
                want = unet(sample, timestep, text, added_cond_kwargs=added).sample
                want_bigger = unet(sample, timestep, text, added_cond_kwargs=bigger).sample
            assert float((got - want).abs().max()) < 1e-4
            assert float((got_bigger - want_bigger).abs().max()) < 1e-4
            assert float((got_bigger - got).abs().max()) > 1e-3  # the graph reads time_ids
    finally:
        backend.close()


@pytest.mark.slow
def test_weights_are_gathered_one_tensor_at_a_time(tiny_unet, tmp_path, monkeypatch):
    """The > 2 GB layout (the exporter's one file per tensor) ends as unet.onnx + unet.onnx.data, same outputs."""
    import onnx

    from catome_export.bench import unstaged

    graph = export_unstaged(tiny_unet, tmp_path / "inline")
    folder = tmp_path / "split"
    folder.mkdir()
    onnx.save_model(onnx.load(str(graph)), str(folder / "unet.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)
    assert len(list(folder.iterdir())) > 10
    loaded: list[bool] = []
    real_load = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *a, **kw: loaded.append(kw.get("load_external_data", True)) or
                        real_load(*a, **kw))
    unstaged._consolidate(folder / "unet.onnx")
    monkeypatch.undo()
    assert loaded == [False]
    assert sorted(p.name for p in folder.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    gen = torch.Generator().manual_seed(3)
    feeds = {"sample": torch.randn(1, 4, 16, 16, generator=gen), "timestep": torch.full((1,), 321.0),
             "encoder_hidden_states": torch.randn(1, 5, 32, generator=gen)}
    outs = []
    for path in (graph, folder / "unet.onnx"):
        runner, backend = load_unstaged(path, tiny_unet.config, "float32", "cpu", {"intra_op_threads": 1})
        try:
            outs.append(runner.run(feeds)["noise_pred"])
        finally:
            backend.close()
    assert torch.equal(outs[0], outs[1])
