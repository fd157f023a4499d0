"""A tiny ONNX Runtime engine built with ``--controlnet``: its manifest, the build's and ``verify``'s comparison
with seeded residuals (with and without feature caching), and the engine in ``StableDiffusionControlNetPipeline``
against the same pipeline eager with CA-ToMe."""

from __future__ import annotations

import pytest
import torch

from catome_export.cli.rebuild import build_command
from catome_export.engine.manifest import Manifest
from catome_export.featurecache import FeatureCacheSettings
from catome_export.merging import MergeSettings, parse_schedule

SIZE = 128
SETTINGS = MergeSettings(threshold=0.7, schedule=parse_schedule("0,2", step_base=0))


@pytest.fixture(scope="module")
def controlnet_engine(tmp_path_factory):
    """Built with its verification (4 steps, seeded residuals), cut for feature-cache branch 0 too."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from catome_export.engine.options import make_options
    from catome_export.workflows.build import run_build

    out = tmp_path_factory.mktemp("cn") / "tiny-cn"
    result = run_build(make_options("tiny", out_dir=out, resolution=SIZE, ort_optimize=False, verify_steps=4,
                                    controlnet=True, cache_branches=(0,), settings=SETTINGS))
    return out, result


def test_manifest_records_the_option(controlnet_engine):
    out, result = controlnet_engine
    assert result.verify is not None and result.verify.ok, result.verify
    assert "13 ControlNet residual inputs" in result.verify.summary()
    m = Manifest.load(out)
    assert m.controlnet is not None and m.controlnet.down == tuple(f"controlnet_down{i}" for i in range(12))
    assert m.controlnet.mid == "controlnet_mid"
    assert "--controlnet" in build_command(m.rebuild_options()) and m.build is not None and m.build.controlnet
    taken = {n for s in m.stages for n in s.spec.input_names if n.startswith("controlnet_")}
    assert taken == {*m.controlnet.down, m.controlnet.mid}


@pytest.mark.parametrize("cache", [None, "2,0"])
def test_verify_covers_the_residuals(controlnet_engine, cache):
    from catome_export.runtime.verify import verify_engine

    out, _ = controlnet_engine
    report = verify_engine(out, steps=4, backend="ort-cpu", device="cpu", feature_cache=cache)
    assert report.ok, report.summary()
    assert report.controlnet_inputs == 13 and report.to_dict()["controlnet_inputs"] == 13
    assert any(r.cached_engine for r in report.rows) == (cache is not None)


def test_engine_in_a_controlnet_pipeline_equals_eager_catome(controlnet_engine, tiny_unet, smooth_latents,
                                                             text_embeddings):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from factories import engine_against_eager
    from catome_export.models.pipeline import controlnet_pipeline, tiny_controlnet, tiny_pipeline
    from catome_export.runtime import Runtime

    out, _ = controlnet_engine
    base = tiny_pipeline("ddim", with_text_encoder=False)
    gen = torch.Generator().manual_seed(7)
    images = [torch.rand(1, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
    cond, uncond = text_embeddings(1, seed=1), text_embeddings(1, seed=2)
    controlnets = [tiny_controlnet(tiny_unet, seed=s) for s in (1, 2)]
    with Runtime.load(out, backend="ort-cpu", device="cpu") as runtime:
        for model, image in ((controlnets[0], images[0]), (MultiControlNetModel(controlnets), images)):
            pipe = controlnet_pipeline(base, model)

            def generate():
                with torch.no_grad():
                    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=image, num_inference_steps=3,
                                height=SIZE, width=SIZE, latents=smooth_latents(1, (SIZE // 8, SIZE // 8)),
                                output_type="latent").images

            engine_against_eager(pipe, runtime, generate)


def test_build_flag(tmp_path):
    from catome_export.cli.cmd_build import options_from_args
    from catome_export.cli.main import build_parser

    args = build_parser().parse_args(["build", "--model", "tiny", "--controlnet", "--out", str(tmp_path / "e")])
    assert options_from_args(args).controlnet is True
    args = build_parser().parse_args(["build", "--model", "tiny", "--out", str(tmp_path / "e")])
    assert options_from_args(args).controlnet is False


def test_feature_cache_default_is_off(controlnet_engine):
    from catome_export.runtime import Runtime

    out, _ = controlnet_engine
    with Runtime.load(out, backend="ort-cpu", device="cpu") as runtime:
        assert runtime.feature_cache is None and runtime.controlnet is not None
        runtime.set_feature_cache(FeatureCacheSettings(2, 0))


def test_tensorrt_profiles_size_the_residuals(controlnet_engine):
    from catome_export.export.profiles import compute_profiles

    out, _ = controlnet_engine
    m = Manifest.load(out)
    profiles = {name: corners for profile in compute_profiles(m) for name, corners in profile.items()}
    assert profiles["controlnet_mid"] == ((1, 64, 2, 2), (2, 64, 2, 2), (2, 64, 2, 2))  # 128 px: latent 16 / 8
    assert profiles["controlnet_down0"] == ((1, 32, 16, 16), (2, 32, 16, 16), (2, 32, 16, 16))
