"""An SDXL-style engine (tiny-xl, ONNX Runtime): ``runtime.unet`` as a drop-in for StableDiffusionXLPipeline.unet.

The engine takes ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) as
graph inputs of stage 0; missing or wrongly shaped conditioning is a
CatomeError that says what to pass.
"""

from __future__ import annotations

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.models import load_unet
from catome_export.models.conditioning import random_added_conditioning

SIZE = 128  # pixels: latent 16x16, inside the built range


@pytest.fixture(scope="module")
def xl_engine(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from catome_export.workflows.build import build_engine

    folder = tmp_path_factory.getbasetemp() / "tiny-xl-engine-128-192"
    if not (folder / "manifest.json").is_file():
        build_engine("tiny-xl", backend="ort", min_resolution=128, max_resolution=192, min_batch=1, max_batch=2,
                     out_dir=folder, verify=False)
    return folder


@pytest.fixture(scope="module")
def xl_runtime(xl_engine):
    from catome_export.runtime import Runtime

    runtime = Runtime.load(xl_engine, backend="ort", device="cpu")
    yield runtime
    runtime.close()


def inputs(batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, SIZE // 8, SIZE // 8, generator=gen)
    text = torch.randn(batch, 77, 64, generator=gen)
    added = random_added_conditioning(load_unet("tiny-xl", "random"), batch, (SIZE, SIZE), seed=seed + 1)
    return sample, text, added


def test_manifest_records_the_model_merge_level(xl_runtime):
    assert xl_runtime.settings.max_downsample == 2 and len(xl_runtime.sites) == 10
    spec = xl_runtime.chain.input_spec("text_embeds")
    assert spec is not None and spec.shape == ("B", 32)
    assert xl_runtime.chain.input_spec("time_ids").shape == ("B", 6)


def test_engine_equals_the_unet_without_merging(xl_runtime):
    from catome_export.merging import MergeSettings, parse_schedule

    unet = load_unet("tiny-xl", "random")
    sample, text, added = inputs()
    xl_runtime.set_settings(MergeSettings(threshold=1.0, schedule=parse_schedule("every_step"), max_downsample=2))
    try:
        xl_runtime.reset()
        with torch.no_grad():
            got = xl_runtime.unet(sample, 700, encoder_hidden_states=text, added_cond_kwargs=added).sample
            want = unet(sample, 700, encoder_hidden_states=text, added_cond_kwargs=added).sample
    finally:
        xl_runtime.set_settings(MergeSettings(threshold=0.7, schedule=parse_schedule("config3"), max_downsample=2))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("added,match", [
    (None, r"SDXL-style U-Net: pass added_cond_kwargs with text_embeds \[B, 32\], time_ids \[B, 6\]"),
    ({"text_embeds": torch.zeros(2, 32)}, r"pass added_cond_kwargs with .*got \['text_embeds'\]"),
    ({"text_embeds": torch.zeros(2, 1280), "time_ids": torch.zeros(2, 6)}, r"\['text_embeds'\] must be \[2, 32\]"),
    ({"text_embeds": torch.zeros(2, 32), "time_ids": torch.zeros(1, 6)}, r"\['time_ids'\] must be \[2, 6\]"),
    ({"text_embeds": torch.zeros(2, 32), "time_ids": torch.zeros(2, 6), "image_embeds": torch.zeros(2, 4)},
     r"holds \['image_embeds'\], which the engine does not take"),
])
def test_missing_or_wrong_sdxl_conditioning_is_a_clear_error(xl_runtime, added, match):
    sample, text, _ = inputs()
    before = len(xl_runtime.history)
    with pytest.raises(CatomeError, match=match):
        xl_runtime.unet(sample, 700, encoder_hidden_states=text, added_cond_kwargs=added)
    assert len(xl_runtime.history) == before  # refused before the step started
    with pytest.raises(CatomeError, match=r"needs \['text_embeds', 'time_ids'\]"):
        xl_runtime.step(sample, torch.full((2,), 700.0), text)


def test_runtime_unet_is_a_drop_in_for_the_xl_pipeline(xl_runtime):
    """StableDiffusionXLPipeline with the engine attached: every pipe(...) call starts at step 0."""
    from catome_export.models.pipeline import tiny_xl_pipeline
    from catome_export.runtime.embed import attach

    pipe = tiny_xl_pipeline("euler")
    with attach(pipe, xl_runtime):
        for _ in range(2):
            out = pipe("a red fox", num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
            assert [s.step for s in xl_runtime.history] == [0, 1, 2]
    assert out.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(out).all()


def test_verify_on_the_xl_engine(xl_engine):
    """The engine against eager CA-ToMe with the same text_embeds/time_ids, step by step (the full 50-step run
    is in benchmarks/results/verify_tiny_xl_50_cpu.*)."""
    from catome_export.runtime.verify import verify_engine

    report = verify_engine(xl_engine, steps=6, schedule="0,2,4", backend="ort", batch=2, resolution=128)
    assert report.ok, report
    assert report.max_diff < 1e-4
