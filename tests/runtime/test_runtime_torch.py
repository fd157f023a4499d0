"""The runtime over the tiny U-Net's stage modules (torch backend) against eager CA-ToMe."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.merging import MergeSettings, StepRecord, parse_schedule
from catome_export.merging.matching import partition

TIMESTEPS = (901, 801, 701, 601, 501)


def _settings(**kw) -> MergeSettings:
    kw.setdefault("schedule", parse_schedule("0,2", step_base=0))
    return MergeSettings(**kw)


def _compare(runtime, handle, ref_unet, latents, ehs, timesteps=TIMESTEPS, atol=1e-5):
    """Run both sides on the same inputs; return the per-step (runtime, eager) stats after checking outputs."""
    rows = []
    for t in timesteps:
        got = runtime.unet(latents, torch.tensor(t), ehs).sample
        with torch.no_grad():
            want = ref_unet(latents, torch.tensor(t), ehs).sample
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
        rows.append((runtime.history[-1], handle.history[-1]))
    return rows


def test_runtime_matches_eager_over_checkpoint_and_cached_steps(make_runtime, eager, reference_unet, smooth_latents,
                                                                 text_embeddings):
    settings = _settings(threshold=0.7)
    runtime = make_runtime(settings)
    latents, ehs = smooth_latents(2, (16, 16)), text_embeddings(2)
    with eager(settings) as handle:
        rows = _compare(runtime, handle, reference_unet, latents, ehs)
    for step, (mine, theirs) in enumerate(rows):
        assert mine.step == theirs.step == step
        assert mine.merged == theirs.merged
        assert mine.matched == theirs.matched
        assert mine.step_ms > 0 and mine.controller_ms >= 0
    matched = [all(m.matched.values()) for m, _ in rows]
    assert matched == [True, False, True, False, False]  # schedule 0,2 with step_base 0
    assert any(r > 0 for r in rows[0][0].merged.values()), "smooth latents must merge at t=0.7"
    # cached steps reuse the checkpoint's r
    assert rows[1][0].merged == rows[0][0].merged and rows[4][0].merged == rows[2][0].merged
    # one record type on both sides; the eager patch times nothing
    assert all(type(m) is type(t) is StepRecord and t.step_ms == t.controller_ms == 0.0 for m, t in rows)
    assert rows[0][0].to_dict()["merged"] == {str(k): r for k, r in sorted(rows[0][0].merged.items())}
    assert len(runtime.history) == len(TIMESTEPS)


def test_threshold_one_merges_nothing_and_equals_the_plain_unet(make_runtime, reference_unet, smooth_latents,
                                                               text_embeddings):
    runtime = make_runtime(_settings(threshold=1.0))
    latents, ehs = smooth_latents(2, (16, 16)), text_embeddings(2)
    for t in TIMESTEPS[:2]:
        got = runtime.unet(latents, t, ehs).sample
        with torch.no_grad():
            want = reference_unet(latents, t, ehs).sample
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert set(runtime.history[-1].merged.values()) == {0}


def test_all_src_merged(make_runtime, eager, reference_unet, smooth_latents, text_embeddings, tiny_sites):
    settings = _settings(threshold=None, merge_fraction=1.0)
    runtime = make_runtime(settings)
    latents, ehs = smooth_latents(1, (16, 16)), text_embeddings(1)
    with eager(settings) as handle:
        rows = _compare(runtime, handle, reference_unet, latents, ehs, timesteps=TIMESTEPS[:2])
    num_src = partition(tiny_sites[0].grid((16, 16)))[0].numel()
    for mine, theirs in rows:
        assert mine.merged == theirs.merged == {s.index: num_src for s in tiny_sites}


def test_one_runtime_serves_two_resolutions_and_batches(make_runtime, eager, reference_unet, smooth_latents,
                                                        text_embeddings):
    settings = _settings(threshold=0.7, schedule=parse_schedule("config3"))
    runtime = make_runtime(settings)
    with eager(settings) as handle:
        for batch, hw in ((1, (16, 16)), (2, (24, 16)), (1, (16, 24))):
            runtime.reset()
            handle.reset()
            latents, ehs = smooth_latents(batch, hw, seed=batch), text_embeddings(batch)
            rows = _compare(runtime, handle, reference_unet, latents, ehs, timesteps=TIMESTEPS[:2])
            assert rows[0][0].merged == rows[0][1].merged
            assert runtime.history[-1].step == 1


def test_timestep_forms_and_return_dict(make_runtime, smooth_latents, text_embeddings):
    runtime = make_runtime(_settings(threshold=0.7))
    latents, ehs = smooth_latents(2, (16, 16)), text_embeddings(2)
    outs = []
    for t in (500, 500.0, torch.tensor(500), torch.tensor([500]), torch.tensor([500.0, 500.0]),
              torch.tensor(500, dtype=torch.int64)):
        runtime.reset()
        outs.append(runtime.unet(latents, t, ehs, return_dict=False)[0])
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert outs[0].shape == latents.shape


def test_step_numbering_reset_and_set_step(make_runtime, smooth_latents, text_embeddings):
    runtime = make_runtime(_settings(threshold=0.7, schedule=parse_schedule("3", step_base=0)))
    latents, ehs = smooth_latents(1, (16, 16)), text_embeddings(1)
    for t in (900, 800):
        runtime.unet(latents, t, ehs)
    assert [s.step for s in runtime.history] == [0, 1]
    runtime.unet(latents, 950, ehs)  # the timestep rose: a new generation
    assert [s.step for s in runtime.history] == [0]
    runtime.set_step(3)
    runtime.unet(latents, 700, ehs)
    assert runtime.history[-1].step == 3 and all(runtime.history[-1].matched.values())  # step 3 is a checkpoint
    runtime.unet(latents, 600, ehs)
    assert runtime.history[-1].step == 4 and not any(runtime.history[-1].matched.values())
    runtime.reset()
    assert runtime.history == []
    runtime.unet(latents, 100, ehs)
    assert runtime.history[-1].step == 0 and all(runtime.history[-1].matched.values())


def test_schedule_override_needs_no_rebuild(make_runtime, smooth_latents, text_embeddings):
    runtime = make_runtime(_settings(threshold=0.7))
    step_base = runtime.settings.schedule.step_base
    runtime.set_settings(replace(runtime.settings, schedule=parse_schedule("every_step", step_base)))
    latents, ehs = smooth_latents(1, (16, 16)), text_embeddings(1)
    for t in (900, 800):
        runtime.unet(latents, t, ehs)
    assert all(all(s.matched.values()) for s in runtime.history)
    with pytest.raises(CatomeError, match="rebuild"):
        runtime.set_settings(MergeSettings(threshold=0.7, merge_mlp=True))


def test_input_validation(make_runtime, smooth_latents, text_embeddings):
    calls = []

    def shape_check(b, h, w):
        calls.append((b, h, w))
        if h > 24:
            raise CatomeError(f"latent height {h} is outside the built range 16..24")

    runtime = make_runtime(_settings(threshold=0.7), shape_check=shape_check)
    unet = runtime.unet
    lat, ehs = smooth_latents(2, (16, 16)), text_embeddings(2)
    cases = [
        ((lat.double(), 1, ehs), {}, "float64.*float32"),
        ((lat[:, :3], 1, ehs), {}, r"\[B, 4, H, W\]"),
        ((lat[0], 1, ehs), {}, r"\[B, 4, H, W\]"),
        ((lat, 1, ehs[:1]), {}, "batch 1, sample has 2"),
        ((lat, 1, ehs[..., :16]), {}, "width 16.*32"),
        ((lat, 1, None), {}, r"\[B, L, D\]"),
        ((lat, torch.ones(3), ehs), {}, "timestep"),
        ((lat, "one", ehs), {}, "timestep must be a number"),
        ((lat, 1, ehs), {"down_block_additional_residuals": (lat,)}, "ControlNet"),
        ((lat, 1, ehs), {"cross_attention_kwargs": {"scale": 0.5}}, "cross_attention_kwargs"),
        ((lat, 1, ehs), {"mystery": 1}, "mystery"),
        ((smooth_latents(2, (32, 16)), 1, ehs), {}, "outside the built range"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(CatomeError, match=message):
            unet(*args, **kwargs)
    assert (2, 32, 16) in calls
    # what a diffusers pipeline passes as None/empty is accepted
    out = unet(lat, 1, encoder_hidden_states=ehs, timestep_cond=None, cross_attention_kwargs=None,
               added_cond_kwargs={}, return_dict=False)
    assert out[0].shape == lat.shape


def test_unet_looks_like_a_diffusers_unet(make_runtime, tiny_unet):
    runtime = make_runtime(_settings(threshold=0.7))
    unet = runtime.unet
    assert isinstance(unet, torch.nn.Module)
    assert unet.config.sample_size == tiny_unet.config.sample_size
    assert unet.config["in_channels"] == 4 and unet.in_channels == 4
    assert unet.config.time_cond_proj_dim is None  # a default the bundled config does not spell out
    assert unet.dtype == torch.float32 and unet.device == torch.device("cpu")
    assert list(unet.parameters()) == [] and [b.device for b in unet.buffers()] == [torch.device("cpu")]
    assert unet.to("cpu") is unet and unet.to(torch.float16) is unet and unet.half() is unet
    assert unet.dtype == torch.float32  # the engine's precision is fixed at build time


def test_close_and_context_manager(make_runtime, smooth_latents, text_embeddings):
    with make_runtime(_settings(threshold=0.7)) as runtime:
        pass
    with pytest.raises(CatomeError, match="closed"):
        runtime.unet(smooth_latents(1, (16, 16)), 1, text_embeddings(1))
    runtime.close()  # twice is fine


def test_a_failed_call_keeps_the_records_aligned(make_runtime, smooth_latents, text_embeddings):
    import math

    runtime = make_runtime(_settings(threshold=0.7))
    latents, ehs = smooth_latents(1, (16, 16)), text_embeddings(1)
    runtime.unet(latents, 900, ehs)
    runner = runtime.chain.runners[3]
    original = runner.run

    def failing(feeds):
        raise CatomeError("stage failed")

    runner.run = failing
    with pytest.raises(CatomeError, match="stage failed"):
        runtime.unet(latents, 800, ehs)
    runner.run = original
    runtime.unet(latents, 700, ehs)
    assert [s.step for s in runtime.history] == [0, 1, 2]
    assert math.isnan(runtime.history[1].step_ms) and runtime.history[2].step_ms > 0


def test_the_schedule_changes_through_set_settings_and_the_last_step_is_history(make_runtime, smooth_latents,
                                                                               text_embeddings):
    runtime = make_runtime(_settings(threshold=0.7))
    runtime.unet(smooth_latents(1, (16, 16)), 900, text_embeddings(1))
    assert runtime.history[-1].step == 0 and runtime.history[-1].matched
    every = parse_schedule("every_step", runtime.settings.schedule.step_base)
    runtime.set_settings(replace(runtime.settings, schedule=every))
    assert runtime.settings.schedule == every
    assert not hasattr(runtime, "with_schedule") and not hasattr(type(runtime), "last_stats")  # 0.1.0 shims, removed


def test_r_multiple_runtime_equals_eager_and_bounds_the_shapes_over_generations(make_runtime, eager, reference_unet,
                                                                                smooth_latents, text_embeddings,
                                                                                tiny_sites):
    """Several generations with other latents each (r varies): the runtime's r are the eager patch's, rounded
    alike, and the distinct (site, r) shapes stay within sum over sites of #src // q + 1 (<= N / q per site)."""
    q = 16
    hw = (16, 16)
    shapes: dict[int, set[tuple[int, int]]] = {1: set(), q: set()}
    for multiple in shapes:
        settings = _settings(threshold=0.7, schedule=parse_schedule("every_step"), r_multiple=multiple)
        runtime = make_runtime(settings)
        with eager(settings) as handle:
            for generation in range(4):
                latents = smooth_latents(2, hw, seed=generation, kernel=1 + 2 * generation)
                runtime.reset()
                handle.reset()
                for mine, theirs in _compare(runtime, handle, reference_unet, latents, text_embeddings(2),
                                             timesteps=(901, 701, 501)):
                    assert mine.merged == theirs.merged
                    shapes[multiple] |= set(mine.merged.items())
    assert all(r % q == 0 for _, r in shapes[q])
    num_src = {s.index: partition(s.grid(hw))[0].numel() for s in tiny_sites}
    bound = sum(n // q + 1 for n in num_src.values())
    tokens = sum(s.grid(hw)[0] * s.grid(hw)[1] for s in tiny_sites)
    assert len(shapes[q]) <= bound <= tokens // q
    assert len(shapes[1]) > len(shapes[q])  # the same inputs met more shapes without rounding
