"""ControlNet with the engine: ``runtime.unet`` in ``StableDiffusionControlNetPipeline`` and
``StableDiffusionXLControlNetPipeline`` against the same pipeline eager with CA-ToMe.

The engines here are the tiny U-Nets cut with ``controlnet=True`` on the torch backend (the stage chain of an
engine, without the export; the ONNX Runtime engine is in tests/runtime/test_controlnet_engine.py). The
ControlNets are ``ControlNetModel.from_unet`` with their zero-initialised convolutions given seeded weights, so
their residuals are non-zero and a residual added in the wrong place fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.engine.manifest import FeatureCacheRecord, StageRecord
from catome_export.export.stages import cached_branches, cut_unet
from catome_export.featurecache import FeatureCacheSettings, UNetLayout
from catome_export.merging import MergeSettings, parse_schedule
from catome_export.models import default_merge_level, find_merge_sites, load_unet

STEPS = 3
SIZE = 128
SETTINGS = MergeSettings(threshold=0.7, schedule=parse_schedule("0,2", step_base=0))
XL_SETTINGS = MergeSettings(threshold=0.7, schedule=parse_schedule("0,2", step_base=0), max_downsample=2)
TOLERANCE = 1e-4
"""verify's fp32 tolerance, times max(1, |latents|)."""
BRANCHES = (0, 11)
"""The shallowest feature-cache branch of tiny (only conv_in's skip residual is read on a cached call) and the
deepest (only the mid block is skipped: every residual, the mid one on the cached mid output, is read)."""


def _runtime(unet, sites, stages, settings, *, feature_cache=None, record=None):
    from catome_export.backends.torch_backend import TorchBackend
    from catome_export.runtime.runtime import Runtime

    backend = TorchBackend(None, "cpu", stages=stages)
    runners = [backend.load_stage(None, StageRecord(spec, "")) for spec, _ in stages]
    return Runtime.from_parts(runners, sites, settings, unet_config=dict(unet.config), dtype=torch.float32, device="cpu",
                   backend=backend, feature_cache=feature_cache, cache_record=record)


@pytest.fixture(scope="module")
def cn_stages(tiny_unet):
    sites = find_merge_sites(tiny_unet)
    stages = cut_unet(tiny_unet, sites, controlnet=True, cache_branches=BRANCHES)
    record = FeatureCacheRecord(cached_branches(stages, BRANCHES, UNetLayout.of(tiny_unet)))
    return sites, stages, record


@pytest.fixture(scope="module")
def make_cn_runtime(tiny_unet, cn_stages):
    sites, stages, record = cn_stages

    def make(settings=SETTINGS, feature_cache=None):
        return _runtime(tiny_unet, sites, stages, settings, feature_cache=feature_cache, record=record)

    return make


@pytest.fixture(scope="module")
def controlnets(tiny_unet):
    from catome_export.models.pipeline import tiny_controlnet

    return tiny_controlnet(tiny_unet, seed=1), tiny_controlnet(tiny_unet, seed=2)


@pytest.fixture(scope="module")
def base_pipe(reference_unet):
    from catome_export.models.pipeline import tiny_pipeline

    return tiny_pipeline("ddim", unet=reference_unet, with_text_encoder=False)


def _images(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.rand(1, 3, SIZE, SIZE, generator=gen) for _ in range(n)]


def _generate(pipe, smooth_latents, text_embeddings, **kwargs) -> torch.Tensor:
    cond, uncond = text_embeddings(1, seed=1), text_embeddings(1, seed=2)
    with torch.no_grad():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS, height=SIZE,
                    width=SIZE, latents=smooth_latents(1, (SIZE // 8, SIZE // 8)), guidance_scale=7.5,
                    output_type="latent", **kwargs).images


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    diff = float((got - want).abs().max())
    assert diff <= TOLERANCE * max(1.0, float(want.abs().max())), diff


CASES = {
    "one": dict(controlnets=1, controlnet_conditioning_scale=0.8),
    "two": dict(controlnets=2, controlnet_conditioning_scale=[0.7, 0.5]),
    "guess-mode": dict(controlnets=1, guess_mode=True),
    "guidance-window": dict(controlnets=2, control_guidance_start=[0.0, 0.3], control_guidance_end=[0.5, 1.0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_pipeline_with_the_engine_equals_eager_catome(case, base_pipe, controlnets, make_cn_runtime,
                                                                 smooth_latents, text_embeddings):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from catome_export.eager import apply_merging
    from catome_export.models.pipeline import controlnet_pipeline

    kwargs = dict(CASES[case])
    n = kwargs.pop("controlnets")
    model = controlnets[0] if n == 1 else MultiControlNetModel(list(controlnets[:n]))
    pipe = controlnet_pipeline(base_pipe, model)
    images = _images(n)
    kwargs["image"] = images[0] if n == 1 else images
    with apply_merging(pipe, SETTINGS) as handle:
        want = _generate(pipe, smooth_latents, text_embeddings, **kwargs)
        eager_history = [(s.merged, s.matched) for s in handle.history]
    runtime = make_cn_runtime()
    try:
        with runtime.attach(pipe):
            got = _generate(pipe, smooth_latents, text_embeddings, **kwargs)
            history = [(s.merged, s.matched) for s in runtime.history]
    finally:
        runtime.close()
    _close(got, want)
    assert history == eager_history and any(m[0] > 0 for m, _ in history)  # CA-ToMe merged as before


def test_the_residuals_change_the_result(base_pipe, controlnets, make_cn_runtime, smooth_latents, text_embeddings):
    """A control image changes the engine's latents as much as eager's: the residuals are really added (at
    conditioning scale 0 the ControlNet pipeline feeds zero residuals, which is the plain U-Net)."""
    from catome_export.models.pipeline import controlnet_pipeline

    pipe = controlnet_pipeline(base_pipe, controlnets[0])
    runtime = make_cn_runtime()
    try:
        with runtime.attach(pipe):
            on = _generate(pipe, smooth_latents, text_embeddings, image=_images(1)[0])
            off = _generate(pipe, smooth_latents, text_embeddings, image=_images(1)[0],
                            controlnet_conditioning_scale=0.0)
        with runtime.attach(base_pipe):  # the plain pipeline: no residuals given, the engine feeds zeros
            plain = _generate(base_pipe, smooth_latents, text_embeddings)
    finally:
        runtime.close()
    assert float((on - off).abs().max()) > 0.05
    _close(off, plain)


def test_feature_cache_with_controlnet_equals_eager_deepcache(base_pipe, controlnets, make_cn_runtime,
                                                              smooth_latents, text_embeddings):
    """DeepCache with ControlNet: a cached call adds the residuals its shallow branch reads (the rest belong to
    skipped blocks), as diffusers' U-Net under DeepCacheSDHelper (and our eager patch) does."""
    from catome_export.eager import apply_deepcache, apply_merging
    from catome_export.models.pipeline import controlnet_pipeline

    pipe = controlnet_pipeline(base_pipe, controlnets[0])
    image = _images(1)[0]
    for branch in BRANCHES:
        cache = FeatureCacheSettings(2, branch)
        with apply_merging(pipe, SETTINGS) as handle:
            with apply_deepcache(pipe, settings=cache):
                want = _generate(pipe, smooth_latents, text_embeddings, image=image)
            eager_merged = [s.merged for s in handle.history]
        runtime = make_cn_runtime(feature_cache=cache)
        try:
            with runtime.attach(pipe):
                got = _generate(pipe, smooth_latents, text_embeddings, image=image)
                history = runtime.history
        finally:
            runtime.close()
        _close(got, want)
        assert [h.cached_features for h in history] == [False, True, False]
        assert [h.merged for h in history] == eager_merged


def test_our_eager_deepcache_with_controlnet_equals_the_deepcache_package(base_pipe, controlnets, smooth_latents,
                                                                          text_embeddings):
    """DeepCacheSDHelper knows nothing of ControlNet, and needs not: it wraps the U-Net's blocks, and the U-Net's
    forward adds the residuals (a skipped block returns its cached output, the residuals are added to what the
    blocks return). The eager patch the engine is compared with does the same, bit for bit."""
    pytest.importorskip("DeepCache")
    from DeepCache import DeepCacheSDHelper

    from catome_export.eager import apply_deepcache
    from catome_export.models.pipeline import controlnet_pipeline

    pipe = controlnet_pipeline(base_pipe, controlnets[0])
    image = _images(1)[0]
    for branch in BRANCHES:
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=2, cache_branch_id=branch)
        helper.enable()
        try:
            theirs = _generate(pipe, smooth_latents, text_embeddings, image=image)
        finally:
            helper.disable()
        with apply_deepcache(pipe, 2, branch):
            ours = _generate(pipe, smooth_latents, text_embeddings, image=image)
        assert torch.equal(ours, theirs)


def _unet_inputs(batch=2, hw=(16, 16)):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, *hw, generator=gen), torch.randn(batch, 77, 32, generator=gen)


def test_runtime_unet_checks_the_residuals(make_cn_runtime, controlnets):
    from catome_export.export.controlnet import random_residuals

    runtime = make_cn_runtime()
    try:
        unet = runtime.unet
        sample, ehs = _unet_inputs()
        down, mid = random_residuals(runtime.controlnet, 2, (16, 16), seed=1)
        assert len(down) == 12 and tuple(mid.shape) == (2, 64, 2, 2)
        cases = [
            ({"down_block_additional_residuals": tuple(down)}, "T2I-Adapter"),
            ({"mid_block_additional_residual": mid}, "without down_block_additional_residuals"),
            ({"down_block_additional_residuals": tuple(down[:-1]), "mid_block_additional_residual": mid},
             "tuple of 12 tensors"),
            ({"down_block_additional_residuals": down[0], "mid_block_additional_residual": mid}, "tuple of 12"),
            ({"down_block_additional_residuals": (*down[:-1], down[-1][:1]), "mid_block_additional_residual": mid},
             r"down_block_additional_residuals\[11\] must be a \[2, 64, 2, 2\] tensor"),
            ({"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid.long()},
             "floating-point"),
            ({"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid[..., :1]},
             "mid_block_additional_residual must be"),
            ({"down_intrablock_additional_residuals": tuple(down)}, "cannot take"),
        ]
        for kwargs, message in cases:
            with pytest.raises(CatomeError, match=message):
                unet(sample, 1, encoder_hidden_states=ehs, **kwargs)
        # a diffusers ControlNet's own outputs are accepted as they come (a tuple, float64 cast to the engine's dtype)
        res_down, res_mid = controlnets[0](sample, 1, encoder_hidden_states=ehs,
                                           controlnet_cond=torch.rand(2, 3, 128, 128), return_dict=False)
        a = unet(sample, 1, encoder_hidden_states=ehs, down_block_additional_residuals=res_down,
                 mid_block_additional_residual=res_mid).sample
        b = unet(sample, 1, encoder_hidden_states=ehs, down_block_additional_residuals=[d.double() for d in res_down],
                 mid_block_additional_residual=res_mid.double()).sample
        assert torch.equal(a, b)
    finally:
        runtime.close()


def test_engine_without_controlnet_refuses_them(make_runtime, base_pipe, controlnets):
    """An engine built without the option keeps its clear refusal, at the call and when attached."""
    from catome_export.models.pipeline import controlnet_pipeline

    runtime = make_runtime(SETTINGS)
    try:
        assert runtime.controlnet is None
        sample, ehs = _unet_inputs()
        with pytest.raises(CatomeError, match=r"cannot take \['down_block_additional_residuals', "
                                              r"'mid_block_additional_residual'\].*--controlnet"):
            runtime.unet(sample, 1, encoder_hidden_states=ehs, down_block_additional_residuals=(sample,),
                         mid_block_additional_residual=sample)
        with pytest.raises(CatomeError, match="rebuild it with catome-export build ... --controlnet"):
            runtime.attach(controlnet_pipeline(base_pipe, controlnets[0]))
    finally:
        runtime.close()


def test_cuda_graph_keys_hold_the_residual_shapes(make_cn_runtime, eager_capture):
    """Graph keys are made from the bound inputs, residuals included: another residual shape is another key."""
    runtime = make_cn_runtime()
    try:
        runtime.enable_cuda_graphs(capture=eager_capture)
        sample, ehs = _unet_inputs()
        for t in (999, 900):  # checkpoint, then a cached step: replayed from a graph
            runtime.unet(sample, t, encoder_hidden_states=ehs)
        keys = runtime.graph_runner.cache.keys()
        assert len(keys) == 1
        names = {name for name, _ in keys[0].inputs}
        assert set(runtime.controlnet.names) <= names
        assert dict(keys[0].inputs)["controlnet_mid"] == (2, 64, 2, 2)
    finally:
        runtime.close()


# -- SDXL's layout ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xl():
    from catome_export.models.pipeline import tiny_controlnet, tiny_xl_pipeline

    unet = load_unet("tiny-xl", "random")
    sites = find_merge_sites(unet, default_merge_level(unet))
    stages = cut_unet(copy_of(unet), sites, controlnet=True)
    return unet, sites, stages, tiny_xl_pipeline("euler", unet=unet), (tiny_controlnet(unet, seed=1),
                                                                       tiny_controlnet(unet, seed=2))


def copy_of(module):
    import copy

    return copy.deepcopy(module)


@pytest.mark.parametrize("case", ["one", "two", "guess-mode"])
def test_xl_controlnet_pipeline_with_the_engine_equals_eager_catome(case, xl):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from catome_export.eager import apply_merging
    from catome_export.models.pipeline import controlnet_pipeline

    unet, sites, stages, base, controlnets = xl
    kwargs = dict(CASES[case])
    n = kwargs.pop("controlnets")
    pipe = controlnet_pipeline(base, controlnets[0] if n == 1 else MultiControlNetModel(list(controlnets[:n])))
    images = _images(n)
    kwargs["image"] = images[0] if n == 1 else images

    def generate():
        with torch.no_grad():
            return pipe(prompt="a tiny cat", num_inference_steps=STEPS, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images

    with apply_merging(pipe, XL_SETTINGS) as handle:
        want = generate()
        eager_history = [(s.merged, s.matched) for s in handle.history]
    runtime = _runtime(unet, sites, stages, XL_SETTINGS)
    try:
        assert len(runtime.controlnet.down) == 9
        with runtime.attach(pipe):
            got = generate()
            history = [(s.merged, s.matched) for s in runtime.history]
    finally:
        runtime.close()
    _close(got, want)
    assert history == eager_history
