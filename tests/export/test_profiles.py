"""TensorRT optimisation profiles from the stage specs: ranges, ordering, the formulas of every symbolic dim."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from catome_export.errors import CatomeError
from catome_export.engine.shapes import ShapeRanges
from catome_export.export.profiles import (
    SiteGeometry, calibrate_opt_fraction, compute_profiles, num_dst, num_src, profiles_from_json, profiles_to_json,
)
from catome_export.engine.specs import StageSpec, TensorSpec
from catome_export.export.stages import plan_specs
from catome_export.latents import make_latents
from catome_export.merging import MergePlan, MergeSettings, match_tokens, partition
from catome_export.models.sites import MergeSite
from factories import make_manifest, make_stages


def _site_stage_specs(num_sites: int, channels: int, text_dim: int) -> list[StageSpec]:
    """Specs shaped like cut_unet's for a U-Net whose sites all sit at full resolution."""
    specs = [StageSpec(0, None, 0, (TensorSpec("sample", "float32", ("B", 4, "H", "W")),
                                    TensorSpec("timestep", "float32", ("B",))),
                       (TensorSpec("x0", "float32", ("B", "N0", channels)),))]
    for k in range(num_sites):
        nxt = k + 1 if k + 1 < num_sites else None
        out = (TensorSpec(f"x{nxt}", "float32", ("B", f"N{nxt}", channels)) if nxt is not None
               else TensorSpec("noise_pred", "float32", ("B", 4, "H", "W")))
        inputs = (TensorSpec(f"x{k}", "float32", ("B", f"N{k}", channels)), *plan_specs(k),
                  TensorSpec("encoder_hidden_states", "float32", ("B", "L", text_dim)),
                  TensorSpec(f"site{k}_residual", "float32", ("B", channels, "H", "W")))
        specs.append(StageSpec(k + 1, k, nxt, inputs, (out,)))
    return specs


@pytest.fixture(scope="module")
def sd15_sites():
    """The SD 1.5 merge sites, found on a U-Net built on the meta device (no weights in memory)."""
    from diffusers import UNet2DConditionModel

    from catome_export.models import bundled_config, find_merge_sites

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(bundled_config("sd15"))
    return find_merge_sites(unet)


@pytest.fixture(scope="module")
def tiny_specs(tiny_unet):
    from catome_export.export.stages import cut_unet
    from catome_export.models import find_merge_sites

    sites = find_merge_sites(tiny_unet)
    return [spec for spec, _ in cut_unet(tiny_unet, sites)], sites


def _shapes(batch=(1, 2), lh=(32, 64), lw=(32, 64), opt=(2, 64, 64), text_len=77, fraction=None) -> dict:
    d = {"batch": list(batch), "latent_height": list(lh), "latent_width": list(lw), "text_len": text_len,
         "text_dim": 768, "opt": {"batch": opt[0], "latent_height": opt[1], "latent_width": opt[2]}}
    if fraction is not None:
        d["opt"]["merge_fraction"] = fraction
    return d


def test_sd15_at_512_site0_ranges(sd15_sites):
    assert len(sd15_sites) == 5 and all(s.downsample == 1 for s in sd15_sites)
    specs = _site_stage_specs(len(sd15_sites), 320, 768)
    prof = compute_profiles(specs, _shapes(lh=(64, 64), lw=(64, 64)), 0.5, sites=sd15_sites)
    site0 = prof[1]
    assert site0["x0"] == ((1, 4096, 320), (2, 4096, 320), (2, 4096, 320))
    keep_min, keep_opt, keep_max = site0["site0_keep_idx"]
    assert (keep_min[1], keep_max[1]) == (1024, 4096)
    src_min, src_opt, src_max = site0["site0_src_idx"]
    assert (src_min[1], src_max[1]) == (1, 3072)  # r = 0 is one self-merge: never an empty src tensor
    assert src_opt[1] == 1536 and keep_opt[1] == 4096 - 1536
    assert site0["site0_slot_idx"] == site0["site0_src_idx"]
    assert site0["site0_weight"] == site0["site0_keep_idx"]
    assert site0["site0_unmerge_idx"] == ((1, 4096), (2, 4096), (2, 4096))
    assert site0["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (2, 77, 768))
    # the merge code agrees on #src at 64x64
    assert partition((64, 64), (2, 2))[0].numel() == 3072


def test_sd15_resolution_range(sd15_sites):
    """256..768 px: N from 1024 to 9216; K down to #dst at 32x32 = 256; R up to #src at 96x96 = 6912."""
    specs = _site_stage_specs(len(sd15_sites), 320, 768)
    prof = compute_profiles(specs, _shapes(lh=(32, 96), lw=(32, 96), opt=(2, 64, 64)), 0.75, sites=sd15_sites)
    for k in range(5):
        p = prof[k + 1]
        assert [s[1] for s in p[f"site{k}_unmerge_idx"]] == [1024, 4096, 9216]
        assert [s[1] for s in p[f"site{k}_keep_idx"]] == [256, 4096 - 2304, 9216]
        assert [s[1] for s in p[f"site{k}_src_idx"]] == [1, 2304, 6912]
        assert p[f"site{k}_residual"] == ((1, 320, 32, 32), (2, 320, 64, 64), (2, 320, 96, 96))


def test_tiny_real_specs_every_dim_resolves(tiny_specs):
    specs, sites = tiny_specs
    shapes = _shapes(lh=(8, 24), lw=(8, 40), opt=(2, 16, 24), fraction=0.25)
    prof = compute_profiles(specs, shapes, None, sites=sites)
    assert len(prof) == len(specs) == len(sites) + 1
    for spec, p in zip(specs, prof):
        assert set(p) == {t.name for t in spec.inputs}
        for name, (mn, opt, mx) in p.items():
            assert all(a <= b <= c for a, b, c in zip(mn, opt, mx)), name
    # opt r = round(0.25 * #src) at the opt grid 16x24, K = N - r
    src_opt = num_src((16, 24))
    for k in range(len(sites)):
        p = prof[k + 1]
        assert p[f"site{k}_src_idx"][1][1] == round(0.25 * src_opt)
        assert p[f"site{k}_keep_idx"][1][1] + p[f"site{k}_src_idx"][1][1] == 16 * 24
        assert p[f"site{k}_keep_idx"][0][1] == num_dst((8, 8))
        assert p[f"site{k}_src_idx"][2][1] == num_src((24, 40))


def test_manifest_supplies_specs_shapes_sites_and_stride():
    manifest = make_manifest(shapes=ShapeRanges.from_dict(_shapes(lh=(10, 10), lw=(10, 10), opt=(1, 10, 10),
                                                                  fraction=1.0)),
                             sites=[MergeSite(0, "p", 1, channels=8)],
                             merge=MergeSettings(threshold=0.7, stride=(1, 2)),
                             stages=make_stages(_site_stage_specs(1, 8, 32)))
    prof = compute_profiles(manifest)
    # stride (1, 2) on 10x10: 50 dst, 50 src
    assert prof[1]["site0_keep_idx"] == ((1, 50), (1, 50), (2, 100))
    assert prof[1]["site0_src_idx"] == ((1, 1), (1, 50), (2, 50))


def test_lower_level_dims_use_ceil_division():
    spec = StageSpec(0, None, None, (TensorSpec("skip", "float32", ("B", 64, "H2", "W4")),
                                     TensorSpec("deep", "float32", ("B", 64, "H8", "W8"))), ())
    prof = compute_profiles([spec], _shapes(lh=(9, 33), lw=(9, 33), opt=(1, 17, 17)), 0.5)[0]
    assert prof["skip"] == ((1, 64, 5, 3), (1, 64, 9, 5), (2, 64, 17, 9))
    assert prof["deep"] == ((1, 64, 2, 2), (1, 64, 3, 3), (2, 64, 5, 5))


def test_downsampled_site_grid():
    spec = StageSpec(1, 0, None, tuple(plan_specs(0)), ())
    prof = compute_profiles([spec], _shapes(lh=(9, 9), lw=(9, 9), opt=(1, 9, 9)), 0.0,
                            sites=[SiteGeometry(0, 2)])[0]
    # grid ceil(9/2) = 5x5 = 25 tokens, 4 dst, 21 src
    assert prof["site0_unmerge_idx"][2] == (2, 25)
    assert prof["site0_keep_idx"] == ((1, 4), (1, 25), (2, 25))
    # opt fraction 0: r = 0 at opt, fed as the one self-merge row
    assert prof["site0_src_idx"] == ((1, 1), (1, 1), (2, 21))


@pytest.mark.parametrize("bad, match", [
    (_shapes(opt=(3, 64, 64)), "opt batch"),
    (_shapes(lh=(64, 32)), "latent_height"),
    (_shapes(batch=(0, 2)), "batch"),
])
def test_bad_ranges_raise(bad, match):
    with pytest.raises(CatomeError, match=match):
        compute_profiles(_site_stage_specs(1, 8, 32), bad, 0.5)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_bad_fraction_raises(fraction):
    with pytest.raises(CatomeError, match="merge-fraction"):
        compute_profiles(_site_stage_specs(1, 8, 32), _shapes(), fraction)


def test_unknown_symbolic_dim_raises():
    spec = StageSpec(0, None, None, (TensorSpec("odd", "float32", ("B", "Q")),), ())
    with pytest.raises(CatomeError, match="'Q'"):
        compute_profiles([spec], _shapes(), 0.5)
    prof = compute_profiles([spec], _shapes(), 0.5, extra_dims={"Q": lambda env: env.batch * 3})
    assert prof[0]["odd"] == ((1, 3), (2, 6), (2, 6))


def test_zero_sized_dims_are_refused():
    """No profile may let an empty tensor reach an engine: a dim rule that gives 0 is an error."""
    spec = StageSpec(0, None, None, (TensorSpec("odd", "float32", ("B", "Q")),), ())
    with pytest.raises(CatomeError, match="at least 1"):
        compute_profiles([spec], _shapes(), 0.5, extra_dims={"Q": lambda env: 0 if env.corner == "min" else 4})


def test_site_dim_of_unknown_site_raises():
    spec = StageSpec(1, 0, None, tuple(plan_specs(7)), ())
    with pytest.raises(CatomeError, match="site 7"):
        compute_profiles([spec], _shapes(), 0.5, sites=[SiteGeometry(0, 1)])


def test_json_round_trip():
    prof = compute_profiles(_site_stage_specs(2, 8, 32), _shapes(), 0.3)
    data = profiles_to_json(prof)
    assert data[1]["site0_src_idx"] == {"min": [1, 1], "opt": [2, round(0.3 * 3072)], "max": [2, 3072]}
    assert profiles_from_json(data) == prof


def test_shape_ranges_accept_single_ints():
    r = ShapeRanges.from_dict({"batch": 2, "latent_height": 64, "latent_width": [32, 64]})
    assert r.batch == (2, 2) and r.latent_height == (64, 64) and r.opt_width == 64 and r.text_len == (77, 77)


@settings(max_examples=60, deadline=None)
@given(
    b=st.tuples(st.integers(1, 4), st.integers(0, 4)),
    h=st.tuples(st.integers(1, 40), st.integers(0, 40)),
    w=st.tuples(st.integers(1, 40), st.integers(0, 40)),
    opt=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
    fraction=st.floats(0, 1),
    stride=st.sampled_from([(2, 2), (1, 2), (3, 2), (4, 4)]),
    ds=st.sampled_from([1, 2, 4]),
)
def test_min_opt_max_ordered_and_consistent(b, h, w, opt, fraction, stride, ds):
    """For any ranges, opt point and fraction: 1 <= min <= opt <= max, K + r = N at opt, R <= #src, K >= #dst."""
    def rng(lo_extra):
        lo, extra = lo_extra
        return lo, lo + extra

    (b0, b1), (h0, h1), (w0, w1) = rng(b), rng(h), rng(w)
    ob = b0 + round(opt[0] * (b1 - b0))
    oh = h0 + round(opt[1] * (h1 - h0))
    ow = w0 + round(opt[2] * (w1 - w0))
    specs = _site_stage_specs(1, 8, 32)
    site = SiteGeometry(0, ds)
    prof = compute_profiles(specs, _shapes((b0, b1), (h0, h1), (w0, w1), (ob, oh, ow)), fraction,
                            sites=[site], stride=stride)[1]
    for name, (mn, op, mx) in prof.items():
        assert all(1 <= a <= o <= c for a, o, c in zip(mn, op, mx)), (name, mn, op, mx)
    grid_opt = site.grid(oh, ow)
    n_opt = grid_opt[0] * grid_opt[1]
    mergeable = num_src(grid_opt, stride) if num_dst(grid_opt, stride) else 0  # no dst: nothing merges
    r_opt = round(fraction * mergeable)
    k_opt, rows_opt = prof["site0_keep_idx"][1][1], prof["site0_src_idx"][1][1]
    assert k_opt + r_opt == n_opt and rows_opt == max(r_opt, 1)
    assert prof["site0_src_idx"][0][1] == 1
    grid_max = site.grid(h1, w1)
    assert prof["site0_src_idx"][2][1] == max(1, num_src(grid_max, stride) if num_dst(grid_max, stride) else 0)
    assert prof["site0_keep_idx"][0][1] == max(1, num_dst(site.grid(h0, w0), stride))
    assert prof["site0_keep_idx"][2][1] == prof["site0_unmerge_idx"][2][1] == grid_max[0] * grid_max[1]
    # the profile's #src is what the matching code partitions
    assert num_src(grid_opt, stride) == partition(grid_opt, stride)[0].numel()


def _plan_fits(plan: MergePlan, profile: dict, site: int = 0) -> bool:
    names = dict(zip(("keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx"), plan.tensors()))
    return all(all(lo <= d <= hi for lo, d, hi in zip(profile[f"site{site}_{name}"][0], t.shape,
                                                     profile[f"site{site}_{name}"][2]))
               for name, t in names.items())


@settings(max_examples=40, deadline=None)
@given(
    h=st.tuples(st.integers(1, 12), st.integers(0, 6)),
    w=st.tuples(st.integers(1, 12), st.integers(0, 6)),
    stride=st.sampled_from([(2, 2), (1, 2), (3, 2), (4, 4)]),
    pick=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
)
def test_every_plan_the_matching_makes_fits_the_profile(h, w, stride, pick):
    """Plans at any size in the range, from r = 0 (the self-merge) to every src merged, lie inside the profile."""
    (h0, dh), (w0, dw) = h, w
    specs = _site_stage_specs(1, 8, 32)
    prof = compute_profiles(specs, _shapes((1, 2), (h0, h0 + dh), (w0, w0 + dw), (1, h0, w0)), 0.5,
                            sites=[SiteGeometry(0, 1)], stride=stride)[1]
    gh, gw = h0 + round(pick[0] * dh), w0 + round(pick[1] * dw)
    metric = torch.randn(2, gh * gw, 4, generator=torch.Generator().manual_seed(gh * 100 + gw))
    src = partition((gh, gw), stride)[0].numel()
    for r in sorted({0, 1, round(pick[2] * src), src}):
        plan = match_tokens(metric, (gh, gw), num_merged=r, stride=stride)
        assert all(t.numel() > 0 for t in plan.tensors())
        assert _plan_fits(plan, prof), (gh, gw, r, prof)


def test_calibrate_opt_fraction(tiny_unet):
    latent = make_latents((1, 4, 8, 8), "smooth", 3)
    forced = calibrate_opt_fraction(tiny_unet, MergeSettings(threshold=None, merge_fraction=0.5), latent, steps=2)
    src = num_src((8, 8))
    assert forced == pytest.approx(round(0.5 * src) / src)
    nothing = calibrate_opt_fraction(tiny_unet, MergeSettings(threshold=1.0), latent, steps=2)
    assert nothing == 0.0
    adaptive = calibrate_opt_fraction(tiny_unet, MergeSettings(threshold=0.7), latent, steps=2)
    assert 0.0 <= adaptive <= 1.0 and math.isfinite(adaptive)
    # the patch is gone afterwards: a second patch can be applied
    from catome_export.eager import apply_merging

    with apply_merging(tiny_unet, MergeSettings()):
        pass


def test_calibrate_rejects_bad_input(tiny_unet):
    with pytest.raises(CatomeError, match="steps"):
        calibrate_opt_fraction(tiny_unet, MergeSettings(), make_latents((1, 4, 8, 8), "smooth", 0), steps=0)
    with pytest.raises(CatomeError, match=r"\[B, 4, H, W\]"):
        calibrate_opt_fraction(tiny_unet, MergeSettings(), torch.zeros(4, 8, 8), steps=1)
