"""The eager patch on SDXL and SD 2.x layouts: offline StableDiffusionXLPipeline around tiny-xl, an SD 2.x-style
tiny U-Net (linear proj_in, heads per level, v-prediction) in a StableDiffusionPipeline.

Same step numbering and reset as SD 1.5 (tests/eager/test_pipeline.py): one
U-Net call is one loop index, classifier-free guidance batches both halves,
every pipe(...) call starts at loop index 0 with empty caches. tiny-xl merges
at its own level (downsample 2: 10 sites, two per Transformer2DModel).
"""

from __future__ import annotations

import pytest
import torch

from catome_export import apply_catome
from catome_export.eager import apply_tome
from catome_export.models import bundled_config, find_merge_sites, load_unet
from catome_export.models.conditioning import random_added_conditioning
from catome_export.models.pipeline import tiny_pipeline, tiny_xl_pipeline
from catome_export.models.registry import random_unet

SIZE = 64  # pixels: latent 8x8, merge grid 4x4 at downsample 2
XL_SITES = 10


@pytest.fixture(scope="module")
def xl_pipe():
    return tiny_xl_pipeline("euler", with_text_encoder=False)


def embeddings(seed: int) -> dict[str, torch.Tensor]:
    """Seeded prompt_embeds [1, 77, 64] and pooled_prompt_embeds [1, 32] (and the negative ones) for tiny-xl."""
    gen = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, 77, 64, generator=gen),
                negative_prompt_embeds=torch.randn(1, 77, 64, generator=gen),
                pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                negative_pooled_prompt_embeds=torch.randn(1, 32, generator=gen))


def generate(pipe, steps: int, seed: int = 0, **extra) -> torch.Tensor:
    return pipe(**embeddings(seed + 100), num_inference_steps=steps, height=SIZE, width=SIZE, output_type="latent",
                generator=torch.Generator().manual_seed(seed), guidance_scale=5.0, **extra).images


def record_calls(unet: torch.nn.Module, calls: list[tuple[int, dict]]):
    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        calls.append((int(sample.shape[0]), dict(kwargs.get("added_cond_kwargs") or {})))

    return unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_xl_steps_are_numbered_per_unet_call_and_reset_at_every_call(xl_pipe):
    calls: list[tuple[int, dict]] = []
    hook = record_calls(xl_pipe.unet, calls)
    try:
        with apply_catome(xl_pipe, threshold=0.7, schedule="config3") as handle:
            assert handle.settings.max_downsample == 2 and len(handle.sites) == XL_SITES
            generate(xl_pipe, steps=3)
            first = [(s.step, dict(s.matched), dict(s.merged)) for s in handle.history]
            generate(xl_pipe, steps=3, seed=1)
            second = [(s.step, dict(s.matched)) for s in handle.history]
    finally:
        hook.remove()
    assert len(calls) == 6 and all(batch == 2 for batch, _ in calls)  # CFG halves in one call
    assert all(added["text_embeds"].shape == (2, 32) and added["time_ids"].shape == (2, 6) for _, added in calls)
    assert [s for s, _, _ in first] == [0, 1, 2] and [s for s, _ in second] == [0, 1, 2]
    assert all(second[0][1].values()) and len(second[0][1]) == XL_SITES  # fresh matching after the reset
    assert [any(m.values()) for _, m, _ in first] == [True, False, False]  # config3, step_base 1
    assert all(merged == first[0][2] for _, _, merged in first)  # cached: same r at every step


@pytest.mark.parametrize("step_base", [0, 1])
def test_xl_checkpoints_fire_at_the_right_loop_indices(xl_pipe, step_base):
    schedule = [0, 2, 3]
    with apply_catome(xl_pipe, threshold=0.7, schedule=schedule, step_base=step_base) as handle:
        generate(xl_pipe, steps=5)
        matched = [all(s.matched.values()) for s in handle.history]
        assert [s.step for s in handle.history] == list(range(5))
    fire = {k - step_base for k in schedule if k - step_base >= 0}
    assert matched == [i == 0 or i in fire for i in range(5)]


def test_xl_fifty_steps_with_config3(xl_pipe):
    """A whole 50-step generation: the paper's best schedule fires exactly where the authors' numbering says."""
    with apply_catome(xl_pipe, threshold=0.7, schedule="config3") as handle:
        out = generate(xl_pipe, steps=50)
        history = list(handle.history)
    assert [s.step for s in history] == list(range(50)) and torch.isfinite(out).all()
    # CONFIG_3 [0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49], entry k at loop index k - 1; 0: empty cache
    checkpoints = {0, 7, 10, 12, 19, 24, 29, 34, 44, 45, 46, 47, 48}
    assert [i for i, s in enumerate(history) if all(s.matched.values())] == sorted(checkpoints)
    assert all(not any(s.matched.values()) for i, s in enumerate(history) if i not in checkpoints)
    assert all(set(s.merged) == set(range(XL_SITES)) for s in history)


def test_xl_threshold_one_is_the_unpatched_pipeline_and_minus_one_is_not(xl_pipe):
    baseline = generate(xl_pipe, steps=3)
    with apply_catome(xl_pipe, threshold=1.0, schedule="every_step") as handle:
        assert torch.equal(generate(xl_pipe, steps=3), baseline)
        assert all(r == 0 for s in handle.history for r in s.merged.values())
    with apply_catome(xl_pipe, threshold=-1.0, schedule="every_step") as handle:
        merged = generate(xl_pipe, steps=3)
        # every src token of a 4x4 grid with 2x2 cells merges: 16 - 4 dst = 12 per site
        assert all(r == 12 for s in handle.history for r in s.merged.values())
    assert not torch.equal(merged, baseline)
    assert torch.equal(generate(xl_pipe, steps=3), baseline)  # removed without a trace


def test_xl_pipeline_with_prompts_and_both_text_encoders():
    pipe = tiny_xl_pipeline("ddim")
    with apply_catome(pipe, threshold=0.7, schedule="every_step") as handle:
        out = pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=2, height=SIZE, width=SIZE,
                   output_type="pt", generator=torch.Generator().manual_seed(0)).images
        assert len(handle.history) == 2 and handle.settings.max_downsample == 2
    assert out.shape == (1, 3, SIZE, SIZE) and torch.isfinite(out).all()


def test_tome_on_the_xl_unet_called_directly():
    unet = load_unet("tiny-xl", "random")
    added = random_added_conditioning(unet, 2, (SIZE, SIZE), seed=3)
    text = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(4))
    sample = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = unet(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample
        with apply_tome(unet, ratio=0.5) as handle:
            merged = unet(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample
            assert handle.last_merged == {s.path: 8 for s in handle.sites}  # int(16 * 0.5)
            assert [s.path for s in handle.sites] == [s.path for s in find_merge_sites(unet, 2)]
        with apply_tome(unet, ratio=0.5, max_downsample=4) as handle:  # still settable: mid block too
            unet(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added)
            assert len(handle.sites) > XL_SITES and {s.downsample for s in handle.sites} == {2, 4}
        assert torch.equal(unet(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample, plain)
    assert not torch.equal(merged, plain)


def sd2_style_unet() -> torch.nn.Module:
    """The tiny U-Net with SD 2.x's differences: linear proj_in, attention heads per level, upcast attention."""
    config = {**bundled_config("tiny"), "use_linear_projection": True, "attention_head_dim": [1, 2, 2, 2],
              "upcast_attention": True}
    return random_unet(config).eval().requires_grad_(False)


def test_sd2_style_pipeline_with_v_prediction():
    unet = sd2_style_unet()
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    pipe = tiny_pipeline("ddim", unet=unet, with_text_encoder=False, prediction_type="v_prediction")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    gen = torch.Generator().manual_seed(7)
    embs = dict(prompt_embeds=torch.randn(1, 77, 32, generator=gen), negative_prompt_embeds=torch.randn(1, 77, 32,
                                                                                                       generator=gen))

    def run() -> torch.Tensor:
        return pipe(**embs, num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    baseline = run()
    with apply_catome(pipe, threshold=-1.0, schedule="config3") as handle:
        assert handle.settings.max_downsample == 1 and len(handle.sites) == 5
        merged = run()
        assert [s.step for s in handle.history] == [0, 1, 2]
        assert [any(s.matched.values()) for s in handle.history] == [True, False, False]
        assert all(r == 48 for s in handle.history for r in s.merged.values())  # 8x8 grid: 64 - 16 dst
    assert not torch.equal(merged, baseline) and torch.equal(run(), baseline)
