"""The analytic MAC model against torch's FlopCounterMode (tiny and tiny-xl with real tensors, SD 1.5 and SDXL on
the meta device)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from catome_export.bench.flops import ideal_speedup, merged_for_fraction, site_grids, unet_macs
from catome_export.errors import CatomeError
from catome_export.merging import MergeSettings, parse_schedule
from catome_export.models.registry import bundled_config


def _bmm_attention(unet: torch.nn.Module) -> None:
    """Attention through baddbmm/bmm, which FlopCounterMode counts (CPU SDPA kernels it does not)."""
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())


def _measured_flops(unet: torch.nn.Module, batch: int, hw: tuple[int, int], text_len: int,
                    device: str = "cpu") -> int:
    from catome_export.models.conditioning import random_added_conditioning

    dim = unet.config.cross_attention_dim
    sample = torch.randn(batch, 4, *hw, device=device)
    timestep = torch.full((batch,), 500.0, device=device)
    text = torch.randn(batch, text_len, dim, device=device)
    added = random_added_conditioning(unet, batch, (hw[0] * 8, hw[1] * 8), device=device)  # SDXL-style only
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, timestep, text, added_cond_kwargs=added)
    return int(counter.get_total_flops())


@pytest.fixture
def tiny_xl_unet() -> torch.nn.Module:
    from catome_export.models import load_unet

    return load_unet("tiny-xl", "random")


@pytest.mark.parametrize("batch,hw,text_len", [(2, (8, 8), 77), (1, (13, 21), 5)])
def test_tiny_unmerged_matches_flop_counter(fresh_tiny_unet, batch, hw, text_len):
    _bmm_attention(fresh_tiny_unet)
    measured = _measured_flops(fresh_tiny_unet, batch, hw, text_len)
    model = unet_macs(fresh_tiny_unet.config, hw, batch, text_len=text_len)
    assert model.flops == pytest.approx(measured, rel=0.01)
    assert set(model.by_part) == {"conv", "linear", "attn1", "attn2", "ff"}
    assert all(v > 0 for v in model.by_part.values())


@pytest.mark.parametrize("options", [{}, {"merge_crossattn": True}, {"merge_mlp": True}])
def test_tiny_merged_matches_flop_counter(fresh_tiny_unet, options):
    """Forced merging through the eager patch: cached steps have no matching, checkpoint steps do."""
    from catome_export.eager import apply_merging

    _bmm_attention(fresh_tiny_unet)
    hw, batch, text_len = (13, 21), 1, 5
    settings = MergeSettings(threshold=None, merge_fraction=0.5, schedule=parse_schedule("every_step"), **options)
    with apply_merging(fresh_tiny_unet, settings) as handle:
        measured = _measured_flops(fresh_tiny_unet, batch, hw, text_len)
        merged = dict(handle.history[-1].merged)
    expected = merged_for_fraction(site_grids(fresh_tiny_unet.config, hw), 0.5)
    assert merged == expected and all(r > 0 for r in merged.values())
    with_matching = unet_macs(fresh_tiny_unet.config, hw, batch, text_len=text_len, merged=merged,
                              matching=True, **options)
    assert with_matching.flops == pytest.approx(measured, rel=0.01)
    without = unet_macs(fresh_tiny_unet.config, hw, batch, text_len=text_len, merged=merged, **options)
    assert without.flops == pytest.approx(measured, rel=0.03)
    assert without.total < unet_macs(fresh_tiny_unet.config, hw, batch, text_len=text_len).total


@pytest.mark.parametrize("model,hw,level,sites", [("sd15", (64, 64), 1, [(64, 64)] * 5),
                                                  ("sdxl", (128, 128), 2, [(64, 64)] * 10)])
def test_real_layouts_match_flop_counter_on_meta_device(model, hw, level, sites):
    """SD 1.5 and SDXL at their native latent sizes, built on the meta device (no memory, no init)."""
    from diffusers import UNet2DConditionModel

    cfg = bundled_config(model)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    _bmm_attention(unet)
    measured = _measured_flops(unet, 2, hw, 77, device="meta")
    model_macs = unet_macs(cfg, hw, 2, max_downsample=level)
    assert model_macs.flops == pytest.approx(measured, rel=0.01)
    assert site_grids(cfg, hw, max_downsample=level) == sites


@pytest.mark.parametrize("batch,hw,text_len", [(2, (16, 16), 77), (1, (13, 21), 5)])
def test_tiny_xl_unmerged_matches_flop_counter(tiny_xl_unet, batch, hw, text_len):
    """SDXL's layout: no top-level attention, depth 2, and the added-conditioning embedding (add_embedding)."""
    _bmm_attention(tiny_xl_unet)
    measured = _measured_flops(tiny_xl_unet, batch, hw, text_len)
    model = unet_macs(tiny_xl_unet.config, hw, batch, text_len=text_len, max_downsample=2)
    assert model.flops == measured  # exact: add_embedding is ~0.01% of tiny-xl's work, below any tolerance
    cfg = dict(tiny_xl_unet.config)
    temb = 4 * cfg["block_out_channels"][0]
    add_embedding = batch * (cfg["projection_class_embeddings_input_dim"] * temb + temb * temb)
    plain = unet_macs({**cfg, "addition_embed_type": None}, hw, batch, text_len=text_len, max_downsample=2)
    assert model.total - plain.total == add_embedding > 0


def test_tiny_xl_merged_matches_flop_counter(tiny_xl_unet):
    """Forced merging at SDXL's merge level (2): ten sites, two per Transformer2DModel."""
    from catome_export.eager import apply_merging

    _bmm_attention(tiny_xl_unet)
    hw, batch, text_len = (16, 24), 1, 5
    settings = MergeSettings(threshold=None, merge_fraction=0.5, schedule=parse_schedule("every_step"),
                             max_downsample=2)
    with apply_merging(tiny_xl_unet, settings) as handle:
        measured = _measured_flops(tiny_xl_unet, batch, hw, text_len)
        merged = dict(handle.history[-1].merged)
    grids = site_grids(tiny_xl_unet.config, hw, max_downsample=2)
    assert grids == [(8, 12)] * 10
    assert merged == merged_for_fraction(grids, 0.5) and all(r > 0 for r in merged.values())
    with_matching = unet_macs(tiny_xl_unet.config, hw, batch, text_len=text_len, merged=merged, matching=True,
                              max_downsample=2)
    assert with_matching.flops == pytest.approx(measured, rel=0.01)


def test_sd15_sites_and_ideal_speedup():
    cfg = bundled_config("sd15")
    grids = site_grids(cfg, (64, 64))
    assert grids == [(64, 64)] * 5
    assert merged_for_fraction(grids, 0.75) == {i: 2304 for i in range(5)}  # 0.75 * (4096 - 1024)
    speedups = [ideal_speedup(cfg, (64, 64), 2, f) for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert speedups[0] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(speedups, speedups[1:]))
    # attn1 at the five full-resolution sites is the only part that shrinks
    base = unet_macs(cfg, (64, 64), 2)
    cut = unet_macs(cfg, (64, 64), 2, merged=merged_for_fraction(grids, 0.75))
    assert {k: base.by_part[k] - cut.by_part[k] for k in base.by_part if k != "attn1"} == \
        {"conv": 0, "linear": 0, "attn2": 0, "ff": 0}
    n, m, c = 4096, 4096 - 2304, 320
    per_site = 2 * ((4 * n * c * c + 2 * n * n * c) - (4 * m * c * c + 2 * m * m * c))
    assert base.total - cut.total == 5 * per_site


def test_ideal_speedup_grows_with_resolution():
    """Attention is quadratic in tokens, so merging pays more at larger latents."""
    cfg = bundled_config("sd15")
    assert ideal_speedup(cfg, (96, 96), 1, 0.75) > ideal_speedup(cfg, (64, 64), 1, 0.75) > \
        ideal_speedup(cfg, (32, 32), 1, 0.75) > 1.0


def test_errors_are_catome_errors():
    cfg = bundled_config("tiny")
    with pytest.raises(CatomeError, match="no merge sites"):
        unet_macs(cfg, (16, 16), 1, merged={7: 3})
    with pytest.raises(CatomeError, match="cannot merge"):
        unet_macs(cfg, (16, 16), 1, merged={0: 256})
    with pytest.raises(CatomeError, match="knows"):
        unet_macs({**cfg, "down_block_types": ["Weird"] * 4}, (16, 16), 1)
    with pytest.raises(CatomeError, match="merge fraction"):
        merged_for_fraction([(4, 4)], 1.5)
    with pytest.raises(CatomeError):
        unet_macs(cfg, (0, 16), 1)
    with pytest.raises(CatomeError, match="addition_embed_type text_time"):
        unet_macs({**cfg, "addition_embed_type": "image"}, (16, 16), 1)
