"""Stage cutting: the staged chain reproduces unet.forward, specs follow the IO contract, layouts are checked."""

from __future__ import annotations

import copy

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.engine.specs import StageSpec, TensorSpec
from catome_export.export.stages import cut_unet, run_stages
from catome_export.export.unet_steps import BlockOptions, site_block_forward
from catome_export.merging import PLAN_TENSORS, MergeController, MergePlan, MergeSettings, match_tokens
from catome_export.merging.schedules import parse_schedule


def _feeds(batch: int, hw: tuple[int, int], seed: int = 0, text_len: int = 9, smooth: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *hw, generator=gen)
    if smooth:
        sample = torch.nn.functional.avg_pool2d(sample, 5, stride=1, padding=2, count_include_pad=False) * 3
    return {"sample": sample, "timestep": torch.linspace(980.0, 20.0, batch),
            "encoder_hidden_states": torch.randn(batch, text_len, 32, generator=gen)}


@pytest.mark.parametrize("batch,hw", [(2, (16, 16)), (1, (20, 28)), (2, (33, 17))])
def test_identity_plans_reproduce_unet_forward(tiny_unet, export_stages, batch, hw):
    feeds = _feeds(batch, hw)
    with torch.no_grad():
        want = tiny_unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"]).sample
        got = run_stages(export_stages, feeds)["noise_pred"]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_stage_layout_follows_the_contract(export_stages, export_sites):
    specs = [spec for spec, _ in export_stages]
    assert len(specs) == len(export_sites) + 1 == 6
    assert [s.site for s in specs] == [None, 0, 1, 2, 3, 4]
    assert [s.next_site for s in specs] == [0, 1, 2, 3, 4, None]
    assert specs[0].input_names[:2] == ("sample", "timestep")
    assert specs[-1].output_names == ("noise_pred",)
    assert specs[-1].outputs[0].shape == ("B", 4, "H", "W")
    for spec in specs:
        if spec.next_site is not None:
            x = spec.outputs[0]
            assert x.name == f"x{spec.next_site}" and x.shape == ("B", f"N{spec.next_site}", 32)
        if spec.site is not None:
            k = spec.site
            assert spec.input_names[:6] == (f"x{k}", *(f"site{k}_{n}" for n in PLAN_TENSORS))
            dims = {t.name: t.shape for t in spec.inputs}
            assert dims[f"site{k}_keep_idx"] == ("B", f"K{k}") and dims[f"site{k}_src_idx"] == ("B", f"R{k}")
            assert dims[f"site{k}_weight"] == ("B", f"K{k}") and dims[f"site{k}_unmerge_idx"] == ("B", f"N{k}")
            assert {t.dtype for t in spec.inputs if t.name.startswith(f"site{k}_") and "idx" in t.name} == {"int64"}
    # Carried tensors are named by role and read later; the skip of the lowest levels have their own dims.
    stage2 = {t.name: t.shape for t in specs[2].outputs}
    assert set(stage2) == {"x2", "site2_residual"}
    carried = {t.name for s in specs for t in s.outputs}
    assert {"emb", "skip0", "skip1", "site0_residual"} <= carried


def test_inputs_come_from_earlier_stages(export_stages):
    have = {"sample", "timestep", "encoder_hidden_states"}
    for spec, _ in export_stages:
        own = {f"site{spec.site}_{n}" for n in PLAN_TENSORS} if spec.site is not None else set()
        assert set(spec.input_names) <= have | own, spec.index
        have |= set(spec.output_names)


def test_spec_round_trip(export_stages):
    for spec, _ in export_stages:
        again = StageSpec.from_dict(spec.to_dict())
        assert again == spec
    with pytest.raises(CatomeError):
        TensorSpec("x", "float64", ("B",))


@pytest.mark.parametrize("crossattn,mlp", [(False, False), (True, True)])
def test_real_plans_match_the_eager_patch(fresh_tiny_unet, crossattn, mlp):
    """Staged chain + controller == eager CA-ToMe (the shared merge functions, the same plans)."""
    from catome_export.eager import apply_merging
    from catome_export.models import find_merge_sites

    settings = MergeSettings(threshold=None, merge_fraction=0.6, schedule=parse_schedule("every_step"),
                             merge_crossattn=crossattn, merge_mlp=mlp)
    sites = find_merge_sites(fresh_tiny_unet)
    stages = cut_unet(copy.deepcopy(fresh_tiny_unet), sites, merge_crossattn=crossattn, merge_mlp=mlp)
    feeds = _feeds(2, (16, 24), smooth=True)
    controller = MergeController(settings, len(sites))
    controller.begin_step(float(feeds["timestep"][0]))
    by_index = {s.index: s for s in sites}

    def plans(k, x):
        return controller.plan_for(k, x, by_index[k].grid((16, 24))).tensors()

    with torch.no_grad():
        got = run_stages(stages, feeds, plans)["noise_pred"]
        plain = fresh_tiny_unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"]).sample
        handle = apply_merging(fresh_tiny_unet, settings)
        try:
            want = fresh_tiny_unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"]).sample
            eager_r = dict(handle.history[-1].merged)
        finally:
            handle.remove()
    assert all(r > 0 for r in controller.last.merged.values())
    assert dict(controller.last.merged) == eager_r
    assert (got - plain).abs().max() > 1e-3  # merging really changed the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_site_block_with_identity_plan_is_the_block(tiny_unet, export_sites):
    block = tiny_unet.get_submodule(export_sites[0].path)
    gen = torch.Generator().manual_seed(3)
    x, ehs = torch.randn(2, 64, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        want = block(x, encoder_hidden_states=ehs)
        got = site_block_forward(block, x, ehs, MergePlan.identity(2, 64).tensors(),
                                 BlockOptions(merge_crossattn=True, merge_mlp=True))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_site_block_merges_around_attn1_only_by_default(tiny_unet, export_sites):
    """Hand-rolled reference: norm1 -> merge -> attn1 -> unmerge + x, then attn2 and ff on all tokens."""
    block = tiny_unet.get_submodule(export_sites[0].path)
    gen = torch.Generator().manual_seed(4)
    x, ehs = torch.randn(2, 64, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    plan = match_tokens(x, (8, 8), num_merged=20)
    with torch.no_grad():
        h = plan.unmerge(block.attn1(plan.merge(block.norm1(x)))) + x
        h = block.attn2(block.norm2(h), encoder_hidden_states=ehs) + h
        want = block.ff(block.norm3(h)) + h
        got = site_block_forward(block, x, ehs, plan.tensors())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_unsupported_layouts_are_named(fresh_tiny_unet, export_sites):
    class FancyDownBlock(torch.nn.Module):
        pass

    unet = fresh_tiny_unet
    saved = unet.down_blocks[1]
    unet.down_blocks[1] = FancyDownBlock()
    with pytest.raises(CatomeError, match="FancyDownBlock at down_blocks.1"):
        cut_unet(unet, export_sites)
    unet.down_blocks[1] = saved
    unet.get_submodule(export_sites[0].path).norm_type = "ada_norm"
    with pytest.raises(CatomeError, match="norm_type"):
        cut_unet(unet, export_sites)


def test_bad_sites_and_dtype(tiny_unet, export_sites):
    from catome_export.models import MergeSite

    with pytest.raises(CatomeError, match="no merge sites"):
        cut_unet(tiny_unet, [])
    with pytest.raises(CatomeError, match="not a module"):
        cut_unet(tiny_unet, [MergeSite(0, "down_blocks.0.nothing", 1)])
    with pytest.raises(CatomeError, match="order"):
        cut_unet(tiny_unet, [MergeSite(i, s.path, 1) for i, s in zip((1, 0), export_sites[:2])])
    with pytest.raises(CatomeError, match="float32 or float16"):
        cut_unet(tiny_unet, export_sites, torch.bfloat16)
