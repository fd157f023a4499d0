"""``Runtime.load`` on a real tiny build: ONNX Runtime (and the torch backend) against eager CA-ToMe."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.merging import MergeSettings, parse_schedule
from catome_export.merging.matching import partition
from catome_export.runtime.runtime import Runtime

ORT_OPTIONS = {"intra_op_threads": 1}
SCHEDULE = parse_schedule("0,2", step_base=0)
TIMESTEPS = (901, 801, 701, 601)


def _run_both(runtime, handle, ref_unet, latents, ehs, timesteps=TIMESTEPS, atol=1e-4):
    runtime.reset()
    handle.reset()
    rows = []
    for t in timesteps:
        got = runtime.unet(latents, t, encoder_hidden_states=ehs).sample
        with torch.no_grad():
            want = ref_unet(latents, t, encoder_hidden_states=ehs).sample
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
        mine, theirs = runtime.history[-1], handle.history[-1]
        assert (mine.step, mine.merged, mine.matched) == (theirs.step, theirs.merged, theirs.matched)
        rows.append(mine)
    return rows


def test_ort_runtime_matches_eager_across_shapes_and_cached_steps(tiny_engine, eager, reference_unet, smooth_latents,
                                                                  text_embeddings):
    settings = MergeSettings(threshold=0.7, schedule=SCHEDULE)
    with Runtime.load(tiny_engine, backend="ort", settings=settings, backend_options=ORT_OPTIONS) as runtime, \
            eager(settings) as handle:
        assert runtime.backend.name == "ort-cpu" and len(runtime.chain.runners) == 6
        for batch, hw in ((2, (16, 16)), (1, (24, 16)), (1, (16, 16))):
            rows = _run_both(runtime, handle, reference_unet, smooth_latents(batch, hw, seed=batch),
                             text_embeddings(batch))
            assert [all(r.matched.values()) for r in rows] == [True, False, True, False]
            assert all(v > 0 for v in rows[0].merged.values())


@pytest.mark.parametrize("settings", [
    MergeSettings(threshold=1.0, schedule=SCHEDULE),
    MergeSettings(threshold=None, merge_fraction=1.0, schedule=SCHEDULE),
], ids=["r=0", "r=all-src"])
def test_ort_runtime_extreme_merge_counts(tiny_engine, eager, reference_unet, smooth_latents, text_embeddings,
                                          tiny_sites, settings):
    with Runtime.load(tiny_engine, backend="ort", settings=settings, backend_options=ORT_OPTIONS) as runtime, \
            eager(settings) as handle:
        rows = _run_both(runtime, handle, reference_unet, smooth_latents(2, (16, 16)), text_embeddings(2),
                         timesteps=TIMESTEPS[:2])
    num_src = partition(tiny_sites[0].grid((16, 16)))[0].numel()
    expected = 0 if settings.threshold == 1.0 else num_src
    assert all(set(r.merged.values()) == {expected} for r in rows)


def test_torch_backend_from_the_manifest_matches_ort(tiny_engine, smooth_latents, text_embeddings):
    latents, ehs = smooth_latents(2, (16, 16)), text_embeddings(2)
    outs = {}
    for backend, options in (("torch", None), ("ort-cpu", ORT_OPTIONS)):
        with Runtime.load(tiny_engine, backend=backend, device="cpu", backend_options=options) as runtime:
            outs[backend] = [runtime.unet(latents, t, ehs).sample for t in TIMESTEPS[:2]]
            assert runtime.settings.schedule.name == "config3"  # the manifest's settings
    for a, b in zip(outs["torch"], outs["ort-cpu"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_out_of_range_shapes_name_the_build_range(tiny_engine, smooth_latents, text_embeddings):
    with Runtime.load(tiny_engine, backend="ort", backend_options=ORT_OPTIONS) as runtime:
        with pytest.raises(CatomeError, match=r"batch 3 is outside the built range 1..2.*catome-export build"):
            runtime.unet(smooth_latents(3, (16, 16)), 1, text_embeddings(3))
        with pytest.raises(CatomeError, match=r"latent height 32 .*16..24.*catome-export build"):
            runtime.unet(smooth_latents(1, (32, 16)), 1, text_embeddings(1))
        with pytest.raises(CatomeError, match="engine runs in torch.float32"):
            runtime.unet(smooth_latents(1, (16, 16)).half(), 1, text_embeddings(1).half())


def test_load_errors(tiny_engine, tmp_path):
    with pytest.raises(CatomeError, match="unknown backend"):
        Runtime.load(tiny_engine, backend="tvm")
    with pytest.raises(CatomeError, match="does not exist"):
        Runtime.load(tmp_path / "nowhere")
    with pytest.raises(CatomeError, match="merge_mlp False -> True.*rebuild"):
        Runtime.load(tiny_engine, backend="ort", settings=MergeSettings(threshold=0.7, merge_mlp=True))
    if not torch.cuda.is_available():
        with pytest.raises(CatomeError, match="TensorRT"):
            Runtime.load(tiny_engine, backend="trt")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_engine, damaged)
    stage = damaged / "stage_3.onnx"
    data = bytearray(stage.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stage.write_bytes(bytes(data))
    with pytest.raises(CatomeError, match="stage_3.onnx.*sha256.*catome-export build"):
        Runtime.load(damaged, backend="ort")


def test_weights_that_differ_from_the_build_are_refused(tiny_engine, tmp_path):
    from catome_export.engine.manifest import Manifest

    other = tmp_path / "other-weights"
    shutil.copytree(tiny_engine, other)
    manifest = Manifest.load(other)
    manifest.model = replace(manifest.model, weights_hash="0" * 64)
    manifest.save(other)
    assert json.loads((other / "manifest.json").read_text())["model"]["weights_hash"] == "0" * 64
    with pytest.raises(CatomeError, match="weights .* do not match"):
        Runtime.load(other, backend="torch", device="cpu")


def test_ort_engine_as_a_pipeline_unet(tiny_engine, reference_unet, smooth_latents, text_embeddings):
    from catome_export.eager import apply_merging
    from catome_export.models.pipeline import tiny_pipeline

    pipe = tiny_pipeline("ddim", unet=reference_unet, with_text_encoder=False)
    settings = MergeSettings(threshold=0.7, schedule=SCHEDULE)

    def generate():
        return pipe(prompt_embeds=text_embeddings(1, seed=1), negative_prompt_embeds=text_embeddings(1, seed=2),
                    num_inference_steps=3, height=128, width=128, latents=smooth_latents(1, (16, 16)),
                    output_type="latent").images

    with apply_merging(pipe, settings) as handle:
        want = generate()
        eager_steps = [(s.step, s.merged) for s in handle.history]
    with Runtime.load(tiny_engine, backend="ort", settings=settings, backend_options=ORT_OPTIONS) as runtime:
        with runtime.attach(pipe):
            got = generate()
            assert [(s.step, s.merged) for s in runtime.history] == eager_steps == \
                [(i, eager_steps[i][1]) for i in range(3)]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert pipe.unet is reference_unet


def test_auto_backend_falls_back_for_onnx_only_folders_and_cpu_devices(tiny_engine, monkeypatch):
    """With TensorRT and ORT CUDA seemingly there: an ONNX-only folder never goes to TensorRT; device=cpu is ORT CPU."""
    import catome_export.backends.select as select

    real_has = select._has
    monkeypatch.setattr(select, "_cuda_available", lambda: True)
    monkeypatch.setattr(select, "_ort_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(select, "_has", lambda module: module == "tensorrt" or real_has(module))
    assert select.choose_backend("auto").name == "trt"
    with Runtime.load(tiny_engine, backend="auto", device="cpu", backend_options=ORT_OPTIONS) as runtime:
        assert runtime.backend.name == "ort-cpu"
    with Runtime.load(tiny_engine, backend="ort", device="cpu", backend_options=ORT_OPTIONS) as runtime:
        assert runtime.backend.name == "ort-cpu"
    if not torch.cuda.is_available():
        with pytest.raises(CatomeError, match="CUDA provider is not usable"):
            Runtime.load(tiny_engine, backend="auto")  # no plans: ORT CUDA, which cannot start here
