"""``cut_unet(..., controlnet=True)``: the ControlNet residual inputs, where they are added, and their count.

The residuals are added where ``UNet2DConditionModel.forward`` adds them, so the cut chain with residuals equals
the diffusers U-Net called with ``down_block_additional_residuals`` / ``mid_block_additional_residual`` bit for
bit (fp32, r = 0), also when the chain is cut for feature-cache branches.
"""

from __future__ import annotations

import pytest
import torch

from catome_export.engine.controlnet import ControlNetInputs
from catome_export.export.controlnet import random_residuals, residual_feeds
from catome_export.engine.io_names import CONTROLNET_MID, controlnet_down_name, is_controlnet_input, is_model_input
from catome_export.export.stages import cached_branches, cut_unet, run_stages
from catome_export.export.unet_steps import build_steps
from catome_export.featurecache import UNetLayout
from catome_export.models import bundled_config, default_merge_level, find_merge_sites, load_unet
from catome_export.models.conditioning import random_added_conditioning


def _meta_unet(name: str):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(bundled_config(name))


def _controlnet_outputs(unet) -> int:
    """How many down residuals diffusers' ControlNet made from ``unet`` returns."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        return len(ControlNetModel.from_unet(unet, load_weights_from_unet=False).controlnet_down_blocks)


@pytest.mark.parametrize("model, count", [("sd15", 12), ("sd21", 12), ("sdxl", 9), ("tiny", 12), ("tiny-xl", 9)])
def test_residual_inputs_follow_the_unet(model, count):
    """12 down residuals for SD 1.x/2.x, 9 for SDXL's 3 levels: as many as the U-Net has skip tensors, which is
    what its ControlNet returns (the layouts built on the meta device: no weights)."""
    unet = _meta_unet(model)
    sites = find_merge_sites(unet, default_merge_level(unet))
    steps = build_steps(unet, sites, controlnet=True)
    read = [n for s in steps for n in s.reads if is_controlnet_input(n)]
    assert len(read) == len(set(read)) == count + 1  # each read once, by the step that consumes its sum
    assert set(read) == {*(controlnet_down_name(i) for i in range(count)), CONTROLNET_MID}
    assert _controlnet_outputs(unet) == count
    # without the option nothing reads them
    assert not [n for s in build_steps(unet, sites) for n in s.reads if is_controlnet_input(n)]


def test_io_names():
    assert controlnet_down_name(11) == "controlnet_down11" and is_controlnet_input("controlnet_down11")
    assert is_controlnet_input(CONTROLNET_MID) and is_model_input(CONTROLNET_MID) and is_model_input("sample")
    assert not is_controlnet_input("controlnet_downx") and not is_model_input("skip3") and not is_model_input("x0")


@pytest.fixture(scope="module")
def xl_unet():
    return load_unet("tiny-xl", "random")


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_cut_chain_adds_residuals_as_diffusers_does(model, tiny_unet, xl_unet):
    unet = tiny_unet if model == "tiny" else xl_unet
    sites = find_merge_sites(unet, default_merge_level(unet))
    layout = UNetLayout.of(unet)
    deepest = layout.num_branches - 1
    stages = cut_unet(unet, sites, controlnet=True, cache_branches=(0, deepest))
    specs = [spec for spec, _ in stages]
    cn = ControlNetInputs.of(specs)
    assert cn is not None and len(cn.down) == _controlnet_outputs(unet)
    assert ControlNetInputs.of([spec for spec, _ in cut_unet(unet, sites)]) is None
    # every residual feeds exactly one stage, and none feeds stage 0
    readers = {n: [s.index for s in specs if n in s.input_names] for n in cn.names}
    assert all(len(v) == 1 and v[0] > 0 for v in readers.values()), readers
    # the down residual i has skip i's shape; the mid one the mid block's output (the deepest level)
    b, hw = 2, (16, 24)
    down, mid = random_residuals(cn, b, hw, seed=3)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(b, 4, *hw, generator=gen)
    ehs = torch.randn(b, 5, unet.config.cross_attention_dim, generator=gen)
    t = torch.full((b,), 500.0)
    feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": ehs, **residual_feeds(down, mid)}
    extra = {}
    added = random_added_conditioning(unet, b, (hw[0] * 8, hw[1] * 8))
    if added is not None:
        feeds.update(added)
        extra["added_cond_kwargs"] = added
    with torch.no_grad():
        got = run_stages(stages, feeds)["noise_pred"]
        want = unet(sample, t, ehs, down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid,
                    **extra).sample
        plain = unet(sample, t, ehs, **extra).sample
        zeros = run_stages(stages, {**feeds, **residual_feeds([torch.zeros_like(d) for d in down],
                                                              torch.zeros_like(mid))})["noise_pred"]
    assert torch.equal(got, want)
    assert torch.equal(zeros, plain)  # zero residuals are the U-Net without ControlNet
    assert float((want - plain).abs().max()) > 0.1  # the residuals matter: this test can fail
    # feature caching: a cached call reads the residuals of what it runs, as DeepCache's helper uses them
    branches = {b.branch: b for b in cached_branches(stages, (0, deepest), layout)}
    used = {branch: {n for i in rec.stages for n in specs[i].input_names if is_controlnet_input(n)}
            for branch, rec in branches.items()}
    assert used[0] == {controlnet_down_name(0)}  # the shallowest branch: only conv_in's skip
    # the deepest skips only the mid block: every up block runs, up_blocks.0 on the cached mid output + the residual
    assert used[deepest] == set(cn.names)
