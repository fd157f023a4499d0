"""Stage cutting of SDXL's layout (tiny-xl): added conditioning inputs, two merge sites per Transformer2DModel,
linear proj_in, merge level 2. Walking the stages is the U-Net's forward (identity plans) and the eager patch
(real plans)."""

from __future__ import annotations

import copy

import pytest
import torch

from catome_export.export.stages import cut_unet, run_stages
from catome_export.merging import MergeController, MergeSettings
from catome_export.merging.schedules import parse_schedule
from catome_export.models import find_merge_sites, load_unet
from catome_export.models.conditioning import random_added_conditioning


@pytest.fixture(scope="module")
def xl_unet():
    return load_unet("tiny-xl", "random")


@pytest.fixture(scope="module")
def xl_sites(xl_unet):
    return find_merge_sites(xl_unet, 2)


@pytest.fixture(scope="module")
def xl_stages(xl_unet, xl_sites):
    return cut_unet(xl_unet, xl_sites)


def feeds(unet, batch: int, hw: tuple[int, int], seed: int = 0, smooth: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *hw, generator=gen)
    if smooth:
        sample = torch.nn.functional.avg_pool2d(sample, 5, stride=1, padding=2, count_include_pad=False) * 3
    out = {"sample": sample, "timestep": torch.linspace(980.0, 20.0, batch),
           "encoder_hidden_states": torch.randn(batch, 9, 64, generator=gen)}
    out.update(random_added_conditioning(unet, batch, (hw[0] * 8, hw[1] * 8), seed=seed + 1))
    return out


def forward(unet, f: dict) -> torch.Tensor:
    added = {"text_embeds": f["text_embeds"], "time_ids": f["time_ids"]}
    return unet(f["sample"], f["timestep"], f["encoder_hidden_states"], added_cond_kwargs=added).sample


@pytest.mark.parametrize("batch,hw", [(2, (16, 16)), (1, (12, 20)), (2, (18, 14))])
def test_identity_plans_reproduce_the_xl_forward(xl_unet, xl_stages, batch, hw):
    f = feeds(xl_unet, batch, hw)
    with torch.no_grad():
        want = forward(xl_unet, f)
        got = run_stages(xl_stages, f)["noise_pred"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_xl_stage_layout(xl_stages, xl_sites):
    specs = [spec for spec, _ in xl_stages]
    assert len(specs) == len(xl_sites) + 1 == 11
    assert specs[0].input_names == ("sample", "timestep", "text_embeds", "time_ids")
    dims = {t.name: t.shape for t in specs[0].inputs}
    assert dims["text_embeds"] == ("B", 32) and dims["time_ids"] == ("B", 6)
    assert not any(n in ("text_embeds", "time_ids") for s in specs[1:] for n in s.input_names)
    # sites 0 and 1 share down_blocks.1.attentions.0: stage 1 runs block 0 and hands block 1's input on
    assert specs[1].output_names == ("x1",)
    assert specs[1].outputs[0].shape == ("B", "N1", 64)
    assert "site0_residual" in specs[2].input_names  # the Transformer2DModel's residual skips a stage


def test_xl_real_plans_match_the_eager_patch(xl_unet, xl_sites):
    from catome_export.eager import apply_merging

    unet = copy.deepcopy(xl_unet)
    settings = MergeSettings(threshold=None, merge_fraction=0.6, schedule=parse_schedule("every_step"),
                             max_downsample=2)
    stages = cut_unet(copy.deepcopy(unet), xl_sites)
    f = feeds(unet, 2, (16, 24), smooth=True)
    controller = MergeController(settings, len(xl_sites))
    controller.begin_step(float(f["timestep"][0]))
    by_index = {s.index: s for s in xl_sites}

    def plans(k, x):
        return controller.plan_for(k, x, by_index[k].grid((16, 24))).tensors()

    with torch.no_grad():
        got = run_stages(stages, f, plans)["noise_pred"]
        plain = forward(unet, f)
        handle = apply_merging(unet, settings)
        try:
            want = forward(unet, f)
            eager_r = dict(handle.history[-1].merged)
        finally:
            handle.remove()
    assert all(r > 0 for r in controller.last.merged.values()) and len(eager_r) == 10
    assert dict(controller.last.merged) == eager_r
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_sd2_style_layout_cuts_and_reproduces_its_forward():
    """SD 2.x's differences (linear proj_in/proj_out, heads per level, upcast attention) at tiny width."""
    from catome_export.models import bundled_config
    from catome_export.models.registry import random_unet

    unet = random_unet({**bundled_config("tiny"), "use_linear_projection": True, "attention_head_dim": [1, 2, 2, 2],
                        "upcast_attention": True}).eval()
    sites = find_merge_sites(unet)
    stages = cut_unet(unet, sites)
    assert len(stages) == 6 and isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    gen = torch.Generator().manual_seed(0)
    f = {"sample": torch.randn(2, 4, 16, 24, generator=gen), "timestep": torch.tensor([800.0, 800.0]),
         "encoder_hidden_states": torch.randn(2, 9, 32, generator=gen)}
    with torch.no_grad():
        want = unet(f["sample"], f["timestep"], f["encoder_hidden_states"]).sample
        got = run_stages(stages, f)["noise_pred"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
