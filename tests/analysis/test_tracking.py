"""Pair tracking on the tiny U-Net: hooks, determinism, consistency with match_tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catome_export.analysis.inputs import make_latents, random_text_embeddings
from catome_export.analysis.pairs import NOT_MERGED
from catome_export.analysis.result import analyze_pairs
from catome_export.analysis.tracking import TrackingConfig, merged_fraction, track_pairs
from catome_export.errors import CatomeError
from catome_export.merging import match_tokens
from catome_export.models import find_merge_sites

HW = (16, 16)
STEPS = 6


@pytest.fixture(scope="module")
def emb(tiny_unet: torch.nn.Module) -> torch.Tensor:
    return random_text_embeddings(tiny_unet.config.cross_attention_dim, 77, 0)


def _no_hooks_left(unet: torch.nn.Module) -> bool:
    modules = dict(unet.named_modules())
    return all(not modules[s.path]._forward_pre_hooks for s in find_merge_sites(unet))


def test_trace_shapes_counts_and_cleanup(tiny_unet: torch.nn.Module, emb: torch.Tensor) -> None:
    x = torch.randn(2, 4, *HW, generator=torch.Generator().manual_seed(5))
    before = tiny_unet(x, 500, encoder_hidden_states=emb).sample
    trace = track_pairs(tiny_unet, TrackingConfig(steps=STEPS, latent_hw=HW), emb)
    after = tiny_unet(x, 500, encoder_hidden_states=emb).sample
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert _no_hooks_left(tiny_unet)

    assert trace.num_calls == STEPS + 1  # PLMS repeats its second timestep
    assert len(trace.maps) == 5 and trace.merged.shape == (STEPS + 1, 5)
    for s, maps in enumerate(trace.maps):
        assert maps.shape == (STEPS + 1, 2, HW[0] * HW[1])
        per_item = (maps != NOT_MERGED).sum(-1)  # [T, B]
        for i in range(trace.num_calls):  # one r for the whole batch
            assert per_item[i].tolist() == [trace.merged[i, s]] * 2
    assert trace.merged.sum() > 0
    cons = trace.consecutive()
    assert np.isnan(cons[0]).all() and ((cons[1:] >= 0) & (cons[1:] <= 1)).all()


def test_pairs_are_those_of_match_tokens_on_the_block_input(tiny_unet: torch.nn.Module, emb: torch.Tensor) -> None:
    """Call 0 of the trace = match_tokens on the block input of the first U-Net call, captured independently."""
    config = TrackingConfig(steps=2, latent_hw=HW)
    trace = track_pairs(tiny_unet, config, emb)
    site = find_merge_sites(tiny_unet)[3]
    seen: list[torch.Tensor] = []
    module = dict(tiny_unet.named_modules())[site.path]
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        latents = make_latents((1, 4, *HW), "smooth", config.seed)  # PLMS: init sigma 1, no input scaling
        tiny_unet(torch.cat([latents, latents]), trace.timesteps[0], encoder_hidden_states=emb)
    finally:
        handle.remove()
    plan = match_tokens(seen[0], site.grid(HW), threshold=0.7)
    assert plan.num_merged == trace.merged[0, 3]
    expect = torch.full((2, HW[0] * HW[1]), NOT_MERGED, dtype=torch.int64)
    expect.scatter_(1, plan.src_idx, plan.keep_idx.gather(1, plan.slot_idx))
    assert torch.equal(trace.maps[3][0].long(), expect)


def test_tracking_is_deterministic_and_smooth_latents_merge_more(tiny_unet: torch.nn.Module,
                                                                  emb: torch.Tensor) -> None:
    a = track_pairs(tiny_unet, TrackingConfig(steps=2, latent_hw=HW, latents="smooth"), emb)
    b = track_pairs(tiny_unet, TrackingConfig(steps=2, latent_hw=HW, latents="smooth"), emb)
    assert all(torch.equal(x, y) for x, y in zip(a.maps, b.maps))
    noise = track_pairs(tiny_unet, TrackingConfig(steps=2, latent_hw=HW, latents="noise"), emb)
    assert merged_fraction(a) > merged_fraction(noise)


def test_ddim_makes_one_call_per_step(tiny_unet: torch.nn.Module, emb: torch.Tensor) -> None:
    analysis = analyze_pairs(tiny_unet, TrackingConfig(steps=4, latent_hw=HW, scheduler="ddim"))
    assert analysis.num_calls == 4
    assert analysis.distance.shape == (5, 4, 4)
    assert "random text embeddings" in analysis.inputs
    data = analysis.to_dict()
    assert data["per_step"][0]["mean_jaccard_prev"] is None
    assert len(data["per_step"]) == 4 and data["num_calls"] == 4


def test_latents() -> None:
    noise = make_latents((1, 4, 32, 32), "noise", 3)
    smooth = make_latents((1, 4, 32, 32), "smooth", 3)
    assert torch.equal(noise, make_latents((1, 4, 32, 32), "noise", 3))
    assert smooth.std().item() == pytest.approx(1.0, abs=0.05)

    def neighbour_corr(x: torch.Tensor) -> float:
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert neighbour_corr(smooth) > 0.5 > abs(neighbour_corr(noise))
    with pytest.raises(CatomeError):
        make_latents((1, 4, 8, 8), "stripes", 0)


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(threshold=None), dict(threshold=0.7, ratio=0.5),
                                    dict(latents="blur"), dict(scheduler="euler"), dict(latent_hw=(0, 4)),
                                    dict(threshold=1.5), dict(threshold="0.7"), dict(seed=-1),
                                    dict(guidance_scale=float("nan"))])
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(CatomeError):
        TrackingConfig(**kwargs)


def test_text_embeddings_must_be_a_pair(tiny_unet: torch.nn.Module) -> None:
    with pytest.raises(CatomeError):
        track_pairs(tiny_unet, TrackingConfig(steps=1, latent_hw=HW), torch.zeros(1, 77, 32))
