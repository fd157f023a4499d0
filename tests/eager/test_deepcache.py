"""Eager feature caching against the DeepCache package itself (``DeepCacheSDHelper``, a test dependency).

The same final latents, bit for bit, on the tiny SD 1.5-layout and SDXL-layout pipelines, for several
intervals and branches, with PNDM (repeated timesteps), DDIM and Euler and classifier-free guidance; alone
and together with CA-ToMe; removed without a trace.
"""

from __future__ import annotations

import pytest
import torch

from catome_export import apply_catome
from catome_export.eager.deepcache import _CachedForward, apply_deepcache, wrapped_modules
from catome_export.errors import CatomeError
from catome_export.featurecache import FeatureCacheSettings, nonuniform_full_steps
from catome_export.models.pipeline import make_scheduler, tiny_pipeline, tiny_xl_pipeline

DeepCache = pytest.importorskip("DeepCache", reason="the DeepCache package (test extra) is the reference")

SIZE = 64
STEPS = 10


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("pndm", with_text_encoder=False)


@pytest.fixture(scope="module")
def xl_pipe():
    return tiny_xl_pipeline("euler", with_text_encoder=False)


def generate(pipe, steps: int = STEPS, seed: int = 0) -> torch.Tensor:
    dim = pipe.unet.config.cross_attention_dim
    cond = torch.randn(1, 77, dim, generator=torch.Generator().manual_seed(1))
    uncond = torch.randn(1, 77, dim, generator=torch.Generator().manual_seed(2))
    extra = {}
    if pipe.unet.config.get("addition_embed_type") == "text_time":
        proj = pipe.unet.add_embedding.linear_1.in_features - 6 * pipe.unet.config.addition_time_embed_dim
        extra = dict(pooled_prompt_embeds=torch.randn(1, proj, generator=torch.Generator().manual_seed(3)),
                     negative_pooled_prompt_embeds=torch.randn(1, proj, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, height=SIZE,
                    width=SIZE, output_type="latent", generator=torch.Generator().manual_seed(seed),
                    guidance_scale=7.5, **extra).images


def reference(pipe, interval: int, branch: int, **kwargs) -> torch.Tensor:
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return generate(pipe, **kwargs)
    finally:
        helper.disable()


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler"])
@pytest.mark.parametrize("interval,branch", [(2, 0), (3, 0), (3, 1), (3, 2), (4, 3), (5, 5), (3, 11)])
def test_same_latents_as_the_deepcache_package(pipe, scheduler, interval, branch):
    pipe.scheduler = make_scheduler(scheduler)
    plain = generate(pipe)
    want = reference(pipe, interval, branch)
    with apply_deepcache(pipe, interval, branch) as handle:
        got = generate(pipe)
        kinds = [c.full for c in handle.history]
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)  # caching changed the result: the comparison is not vacuous
    assert kinds[0] and not all(kinds)
    assert torch.equal(generate(pipe), plain)  # removed bit for bit


def test_pndm_repeated_timestep_counts_as_deepcache_counts_it(pipe):
    """PLMS repeats its second timestep: both calls sit at position 1 (DeepCache's list.index)."""
    pipe.scheduler = make_scheduler("pndm")
    with apply_deepcache(pipe, 2, 0) as handle:
        generate(pipe, steps=6)
        positions = [c.position for c in handle.history]
        kinds = [c.full for c in handle.history]
    assert positions[:4] == [0, 1, 1, 3]
    assert kinds == [(p % 2) == 0 for p in positions]


@pytest.mark.parametrize("interval,branch", [(2, 0), (3, 1), (3, 4), (3, 8)])
def test_xl_same_latents_as_the_deepcache_package(xl_pipe, interval, branch):
    xl_pipe.scheduler = make_scheduler("euler")
    plain = generate(xl_pipe)
    want = reference(xl_pipe, interval, branch)
    with apply_deepcache(xl_pipe, interval, branch):
        got = generate(xl_pipe)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert torch.equal(generate(xl_pipe), plain)


@pytest.mark.parametrize("order", ["catome_first", "deepcache_first"])
def test_together_with_catome_equals_the_package_with_catome(pipe, order):
    """CA-ToMe merges where its sites run: on cached calls only the shallow branch's sites (branch 0 keeps the
    last up-block's last transformer, which holds a merge site)."""
    pipe.scheduler = make_scheduler("ddim")
    with apply_catome(pipe, threshold=0.5, schedule="config3") as merge:
        want = reference(pipe, 3, 0)
        want_history = [dict(s.merged) for s in merge.history]
    first, second = (apply_catome, apply_deepcache) if order == "catome_first" else (apply_deepcache, apply_catome)
    args = ({"threshold": 0.5, "schedule": "config3"}, {"interval": 3, "branch": 0})
    if order == "deepcache_first":
        args = args[::-1]
    a = first(pipe, **args[0])
    b = second(pipe, **args[1])
    try:
        got = generate(pipe)
        merge_handle = a if order == "catome_first" else b
        cache_handle = b if order == "catome_first" else a
        history = [dict(s.merged) for s in merge_handle.history]
        kinds = [c.full for c in cache_handle.history]
    finally:
        b.remove()
        a.remove()
    assert torch.equal(got, want)
    assert history == want_history
    last_site = max(history[0])
    for full, merged in zip(kinds, history):
        # a cached call runs only the shallow branch: the deepest merge sites do not run at all
        assert set(merged) == (set(history[0]) if full else {last_site})
    assert any(r > 0 for m in history for r in m.values())


def test_full_step_list_and_nonuniform_schedule(pipe):
    pipe.scheduler = make_scheduler("ddim")
    steps = nonuniform_full_steps(STEPS, 3, center=4, power=1.4)
    with apply_deepcache(pipe, full_steps=steps) as handle:
        generate(pipe)
        full = [i for i, c in enumerate(handle.history) if c.full]
    assert full == list(steps)
    with apply_deepcache(pipe, full_steps=[0, 3, 6, 9]) as handle:
        a = generate(pipe)
    assert torch.equal(a, reference(pipe, 3, 0))  # DDIM, 10 steps: the same full calls as interval 3


def test_every_pipe_call_starts_full_and_a_second_apply_is_refused(pipe):
    pipe.scheduler = make_scheduler("ddim")
    with apply_deepcache(pipe, 3, 0) as handle:
        first = generate(pipe, steps=4)
        assert [c.full for c in handle.history] == [True, False, False, True]
        second = generate(pipe, steps=4)
        assert [c.full for c in handle.history] == [True, False, False, True]
        with pytest.raises(CatomeError, match="already applied"):
            apply_deepcache(pipe, 2, 0)
    assert torch.equal(first, second)


def test_bare_unet_numbers_calls_by_loop_index_or_given_timesteps(pipe):
    unet = pipe.unet
    sched = make_scheduler("ddim")
    sched.set_timesteps(6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), apply_deepcache(unet, 2, 0, timesteps=sched.timesteps) as handle:
        for t in sched.timesteps:
            unet(x, t, encoder_hidden_states=text)
        assert [c.full for c in handle.history] == [True, False] * 3
        with pytest.raises(CatomeError, match="not among the scheduler's timesteps"):
            unet(x, 3, encoder_hidden_states=text)
    with torch.no_grad(), apply_deepcache(unet, 2, 0) as handle:
        for t in sched.timesteps[:3]:
            unet(x, t, encoder_hidden_states=text)
        unet(x[:1], sched.timesteps[3], encoder_hidden_states=text[:1])  # new shape: nothing cached for it
        assert [c.full for c in handle.history] == [True, False, True, True]


@pytest.mark.parametrize("kwargs,match", [
    ({"interval": 0}, "interval must be an int >= 1"),
    ({"branch": -1}, "branch must be an int >= 0"),
    ({"branch": 12}, r"branches 0\.\.11"),
    ({"full_steps": [2, 4]}, "must contain 0"),
])
def test_bad_settings_are_one_line_errors(pipe, kwargs, match):
    with pytest.raises(CatomeError, match=match):
        apply_deepcache(pipe, **kwargs)
    assert not any(isinstance(m.forward, _CachedForward) for _, m in wrapped_modules(pipe.unet))  # nothing left


def test_settings_round_trip():
    s = FeatureCacheSettings(interval=4, branch=2)
    assert FeatureCacheSettings.from_dict(s.to_dict()) == s
    f = FeatureCacheSettings(full_steps=(0, 5, 2))
    assert f.full_steps == (0, 2, 5) and FeatureCacheSettings.from_dict(f.to_dict()) == f
