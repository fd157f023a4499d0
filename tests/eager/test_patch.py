"""The eager CA-ToMe patch on the tiny U-Net (random weights, latent 16x16, batch 2, smooth latents)."""

from __future__ import annotations

import inspect

import pytest
import torch

from catome_export import apply_catome
from catome_export.eager import CatomeHandle, apply_merging, apply_tome
from catome_export.errors import CatomeError
from catome_export.merging import AutoSchedule, MergePlan, MergeSettings, match_tokens, parse_schedule
from catome_export.models import find_merge_sites, load_unet

LATENT = (16, 16)
N = LATENT[0] * LATENT[1]
NUM_SRC = N - (LATENT[0] // 2) * (LATENT[1] // 2)


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    """One tiny U-Net for this module; every test leaves it unpatched (see `clean`)."""
    return load_unet("tiny", "random")


@pytest.fixture(autouse=True)
def clean(unet):
    """Fail loudly, and clean up, if a test leaves a patch behind."""
    before = _state(unet)
    yield
    after = _state(unet)
    if after != before:
        from catome_export.eager.patch import CatomeHandle

        handle = CatomeHandle._registry.get(unet)
        if handle is not None:
            handle.remove()
        pytest.fail("the test left the U-Net patched")


def _state(unet) -> tuple:
    processors = tuple(id(p) for p in unet.attn_processors.values())
    hooks = tuple((name, len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in unet.named_modules()
                  if m._forward_pre_hooks or m._forward_hooks)
    return processors, hooks


@pytest.fixture(scope="module")
def inputs(smooth_latents, text_embeddings):
    return smooth_latents(2, LATENT, seed=0), text_embeddings(2, seed=1)


def call(unet, x, t, emb) -> torch.Tensor:
    with torch.no_grad():
        return unet(x, torch.tensor(float(t)), emb).sample


@pytest.fixture(scope="module")
def reference(unet, inputs):
    x, emb = inputs
    return call(unet, x, 500, emb)


def test_threshold_one_is_bit_identical(unet, inputs, reference):
    x, emb = inputs
    with apply_catome(unet, threshold=1.0, schedule="every_step") as handle:
        out = call(unet, x, 500, emb)
        assert set(handle.last_merged.values()) == {0}
    assert torch.equal(out, reference)


def test_merging_happens_and_stays_close(unet, reference, plain_catome):
    out, merged = plain_catome
    sites = find_merge_sites(unet)
    assert list(merged) == [s.path for s in sites]
    assert all(0 < r <= NUM_SRC for r in merged.values()), merged
    assert not torch.equal(out, reference)
    rel = (out - reference).norm() / reference.norm()
    assert 0 < rel < 0.2, f"merged output too far from the unmerged one: relative L2 {rel:.3f}"


def test_remove_restores_exactly(unet, inputs, reference):
    x, emb = inputs
    before_processors = dict(unet.attn_processors)
    handle = apply_catome(unet, threshold=0.5, merge_crossattn=True, merge_mlp=True)
    patched = dict(unet.attn_processors)
    assert sum(patched[k] is not before_processors[k] for k in patched) == 2 * len(handle.sites)
    assert not torch.equal(call(unet, x, 500, emb), reference)
    handle.remove()
    assert not handle.active
    after = dict(unet.attn_processors)
    assert all(after[k] is before_processors[k] for k in before_processors)
    assert torch.equal(call(unet, x, 500, emb), reference)
    handle.remove()  # a second remove is harmless


def test_wrapped_processor_keeps_the_call_signature(unet):
    sites = find_merge_sites(unet)
    attn = unet.get_submodule(sites[0].path).attn1
    original = attn.processor
    with apply_catome(unet):
        assert attn.processor is not original and attn.processor.inner is original
        assert inspect.signature(attn.processor.__call__) == inspect.signature(original.__call__)
    assert attn.processor is original


def test_cached_steps_reuse_pairs_and_checkpoints_recompute(unet, inputs, smooth_latents, monkeypatch):
    _, emb = inputs
    handle = apply_catome(unet, threshold=0.7, schedule=[0, 3], step_base=1)
    try:
        recorded: dict[tuple[int, int], object] = {}
        block_inputs: dict[tuple[int, int], torch.Tensor] = {}
        original = handle.controller.plan_for

        def spy(site, x, grid):
            plan = original(site, x, grid)
            recorded[(handle.controller.step, site)] = plan
            block_inputs[(handle.controller.step, site)] = x.clone()
            return plan

        monkeypatch.setattr(handle.controller, "plan_for", spy)
        for i, t in enumerate([900, 800, 700, 600]):
            call(unet, smooth_latents(2, LATENT, seed=10 + i), t, emb)
        assert [s.step for s in handle.history] == [0, 1, 2, 3]
        # step_base 1: entry 3 fires at loop index 2; loop index 0 computes because the cache is empty
        assert [all(s.matched.values()) for s in handle.history] == [True, False, True, False]
        assert [any(s.matched.values()) for s in handle.history] == [True, False, True, False]
        for site in range(len(handle.sites)):
            p0, p1, p2, p3 = (recorded[(i, site)] for i in range(4))
            assert p1 is p0 and p3 is p2
            assert handle.history[1].merged[site] == p0.num_merged
            assert p2 is not p0
            fresh = match_tokens(block_inputs[(2, site)], LATENT, threshold=0.7)
            assert p2.num_merged == fresh.num_merged
            assert all(torch.equal(a, b) for a, b in zip(p2.tensors(), fresh.tensors()))
        assert any(recorded[(2, s)].num_merged != recorded[(0, s)].num_merged for s in range(len(handle.sites)))
    finally:
        handle.remove()


def test_apply_tome_merges_a_fixed_ratio(unet, inputs):
    x, emb = inputs
    with apply_tome(unet, ratio=0.5) as handle:
        for t in (900, 800):
            call(unet, x, t, emb)
        assert handle.settings.schedule.checkpoints is None
        assert all(all(s.matched.values()) for s in handle.history)
        assert set(handle.last_merged.values()) == {int(N * 0.5)}
        assert handle.settings.ratio == 0.5 and handle.settings.threshold is None


def _token_counts(module: torch.nn.Module, seen: list[int]):
    return module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))


@pytest.fixture(scope="module")
def plain_catome(unet, inputs) -> tuple[torch.Tensor, dict[str, int]]:
    """Output and r per site of CA-ToMe (t = 0.7) with the default options."""
    x, emb = inputs
    with apply_catome(unet, threshold=0.7) as plain:
        return call(unet, x, 500, emb), plain.last_merged


@pytest.mark.parametrize("crossattn,mlp", [(True, False), (False, True)])
def test_crossattn_and_mlp_options(unet, inputs, reference, plain_catome, crossattn, mlp):
    x, emb = inputs
    site = find_merge_sites(unet)[0]
    block = unet.get_submodule(site.path)
    plain_out, plain_merged = plain_catome
    r_plain = plain_merged[site.path]
    handle = apply_catome(unet, threshold=0.7, merge_crossattn=crossattn, merge_mlp=mlp)
    q_tokens: list[int] = []
    ff_tokens: list[int] = []
    hooks = [_token_counts(block.attn2.to_q, q_tokens), block.ff.register_forward_pre_hook(
        lambda m, args: ff_tokens.append(args[0].shape[1]))]
    try:
        out = call(unet, x, 500, emb)
        r = handle.last_merged[site.path]
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
    assert r == r_plain > 0  # same block inputs, same matching
    assert q_tokens == [N - r if crossattn else N]
    assert ff_tokens == [N - r if mlp else N]
    assert torch.isfinite(out).all()
    assert not torch.equal(out, plain_out) and not torch.equal(out, reference)


def test_parity_with_a_hand_written_block_reference(unet, inputs):
    """The patched block equals x + unmerge(attn1(merge(norm1 x))), then attn2 and ff on all tokens."""
    x, emb = inputs
    site = find_merge_sites(unet)[1]
    block = unet.get_submodule(site.path)
    captured: dict[str, torch.Tensor] = {}
    hook_in = block.register_forward_pre_hook(lambda m, args, kwargs: captured.update(x=args[0].clone()),
                                              with_kwargs=True)
    hook_out = block.register_forward_hook(lambda m, args, out: captured.update(out=out.clone()))
    try:
        with apply_catome(unet, threshold=0.7) as handle:
            call(unet, x, 500, emb)
            r = handle.history[-1].merged[site.index]
    finally:
        hook_in.remove()
        hook_out.remove()
    bx = captured["x"]
    plan = match_tokens(bx, site.grid(LATENT), threshold=0.7)
    assert plan.num_merged == r > 0
    with torch.no_grad():
        h = bx + plan.unmerge(block.attn1(plan.merge(block.norm1(bx))))
        h = h + block.attn2(block.norm2(h), encoder_hidden_states=emb)
        expected = h + block.ff(block.norm3(h))
    torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=1e-5)


def test_set_step_for_custom_loops(unet, inputs):
    x, emb = inputs
    with apply_catome(unet, threshold=0.7, schedule=[0, 6], step_base=0) as handle:
        call(unet, x, 900, emb)
        handle.set_step(6)
        call(unet, x, 800, emb)
        assert handle.history[-1].step == 6 and all(handle.history[-1].matched.values())
        call(unet, x, 700, emb)
        assert handle.history[-1].step == 7 and not any(handle.history[-1].matched.values())
        handle.reset()
        assert handle.history == [] and handle.last_merged == {}


def test_rising_timestep_starts_a_new_generation(unet, inputs):
    x, emb = inputs
    with apply_catome(unet, threshold=0.7, schedule="config3") as handle:
        for t in (500, 900):
            call(unet, x, t, emb)
        assert [s.step for s in handle.history] == [0]
        assert all(handle.history[0].matched.values())


def test_settings_keyword_builds_the_same_patch(unet, inputs):
    x, emb = inputs
    s = MergeSettings(threshold=0.7, schedule=parse_schedule("config1", 0))
    with apply_merging(unet, s) as a:
        out_a = call(unet, x, 500, emb)
        assert a.settings is s
    with apply_catome(unet, settings=s) as b:
        out_b = call(unet, x, 500, emb)
        assert b.settings is s
    with apply_catome(unet, threshold=0.7, schedule="config1", step_base=0) as c:
        assert c.settings == s
    assert torch.equal(out_a, out_b)
    with pytest.raises(CatomeError, match="not both"):
        apply_catome(unet, threshold=0.5, settings=s)
    with pytest.raises(CatomeError, match="not both"):
        apply_tome(unet, ratio=0.3, settings=s)


def test_random_dst_is_reproducible(unet, inputs):
    x, emb = inputs
    outs = []
    for _ in range(2):
        with apply_catome(unet, threshold=0.7, random_dst=True, seed=5) as handle:
            outs.append(call(unet, x, 500, emb))
            assert handle.settings.random_dst
    assert torch.equal(outs[0], outs[1])


def test_applying_twice_is_refused(unet):
    with apply_catome(unet):
        with pytest.raises(CatomeError, match="already applied"):
            apply_tome(unet)
    apply_catome(unet).remove()  # after removal it applies again


def test_a_block_called_outside_the_unet_is_refused(unet):
    site = find_merge_sites(unet)[0]
    block = unet.get_submodule(site.path)
    with apply_catome(unet):
        with pytest.raises(CatomeError, match="outside a U-Net call"):
            with torch.no_grad():
                block(torch.randn(1, N, 32))


def test_repr_and_properties(unet):
    handle = apply_catome(unet)
    try:
        assert isinstance(handle, CatomeHandle) and handle.unet is unet
        assert "active" in repr(handle) and "config3" in repr(handle)
        assert [s.index for s in handle.sites] == list(range(5))
        assert handle.settings.schedule.step_base == 1 and handle.settings.threshold == 0.7
    finally:
        handle.remove()
    assert "removed" in repr(handle)


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=1.5), "threshold"),
    (dict(threshold="high"), "threshold"),
    (dict(threshold=None), "apply_tome"),
    (dict(schedule="fastest"), "unknown schedule"),
    (dict(schedule=[3, 3]), "repeats"),
    (dict(schedule=[]), "empty"),
    (dict(step_base=2), "step_base"),
    (dict(max_downsample=3), "max_downsample"),
    (dict(stride=2), "stride"),
    (dict(stride=(0, 2)), "stride"),
    (dict(stride=(1, 1)), "stride"),
    (dict(random_dst="yes"), "random_dst"),
    (dict(merge_mlp=1), "merge_mlp"),
    (dict(seed=-1), "seed"),
    (dict(r_multiple=0), "r_multiple"),
    (dict(r_multiple=8.0), "r_multiple"),
])
def test_bad_catome_options(unet, kwargs, match):
    with pytest.raises(CatomeError, match=match):
        apply_catome(unet, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=1.0), "ratio"),
    (dict(ratio=-0.5), "ratio"),
    (dict(ratio=None), "apply_catome"),
    (dict(stride="2x2"), "stride"),
])
def test_bad_tome_options(unet, kwargs, match):
    with pytest.raises(CatomeError, match=match):
        apply_tome(unet, **kwargs)


@pytest.mark.parametrize("target", [None, "unet", torch.nn.Linear(2, 2), object()])
def test_non_unet_arguments(target):
    with pytest.raises(CatomeError, match="UNet2DConditionModel"):
        apply_catome(target)


def test_settings_must_be_merge_settings(unet):
    with pytest.raises(CatomeError, match="MergeSettings"):
        apply_merging(unet, {"threshold": 0.7})


def test_one_apply_catome_checks_every_option_before_calibrating(unet, monkeypatch):
    """``catome_export.apply_catome`` is the one implementation (the eager layer has none of its own): a bad
    option fails before an ``auto:K`` calibration starts, and leaves nothing patched."""
    import catome_export
    import catome_export.eager
    from catome_export.analysis import calibrate

    assert not hasattr(catome_export.eager, "apply_catome") and apply_catome is catome_export.apply_catome
    calls = []
    monkeypatch.setattr(calibrate, "resolve_schedule", lambda *a, **k: calls.append(a))
    with pytest.raises(CatomeError, match="stride"):
        apply_catome(unet, schedule="auto:4", stride=(1, 1))
    assert calls == []
    with apply_catome(unet, schedule="config3"):  # nothing was patched by the refused call
        pass


def test_auto_schedule_is_calibrated_with_the_same_settings(unet, monkeypatch):
    import catome_export
    from catome_export.analysis import calibrate

    seen = {}

    def fake_resolve(spec, model, step_base, **calib):
        seen.update(spec=spec, model=model, step_base=step_base, **calib)
        return parse_schedule([1, 7], step_base)

    monkeypatch.setattr(calibrate, "resolve_schedule", fake_resolve)
    with catome_export.apply_catome(unet, threshold=0.6, schedule="auto:2", step_base=0, stride=(3, 2)) as handle:
        assert handle.settings.schedule.checkpoints == (1, 7) and handle.settings.schedule.step_base == 0
    assert seen == dict(spec=AutoSchedule(2, step_base=0), model=unet, step_base=0, threshold=0.6, max_downsample=1,
                        stride=(3, 2))


@pytest.mark.gpu
def test_cuda_patch_matches_cpu(inputs):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; none is present")
    x, emb = inputs
    cpu = load_unet("tiny", "random")
    gpu = load_unet("tiny", "random").cuda()
    with apply_catome(cpu, threshold=0.7) as hc, apply_catome(gpu, threshold=0.7) as hg:
        out_c = call(cpu, x, 500, emb)
        out_g = call(gpu, x.cuda(), 500, emb.cuda())
        assert hc.last_merged == hg.last_merged
    torch.testing.assert_close(out_g.cpu(), out_c, atol=1e-3, rtol=1e-3)


def test_given_plans_replace_matching_and_are_cached(unet, inputs, reference):
    x, emb = inputs
    seen: list[tuple[int, int, tuple[int, int]]] = []
    given = {}

    def matcher(site, metric, grid):
        seen.append((handle.controller.step, site, tuple(grid)))
        assert metric.shape == (2, grid[0] * grid[1], metric.shape[-1])
        given[site] = MergePlan.identity(2, grid[0] * grid[1])
        return given[site]

    with apply_catome(unet, threshold=0.5, schedule=[0, 3], step_base=1) as handle:
        handle.set_matcher(matcher)
        out = call(unet, x, 500, emb)
        # identity plans given at every site: exactly the unmerged U-Net, whatever threshold 0.5 would merge
        assert torch.equal(out, reference)
        assert set(handle.last_merged.values()) == {0}
        call(unet, x, 400, emb)  # loop index 1: no checkpoint, the given plans are reused, the matcher is not asked
        assert [s for s, _, _ in seen] == [0] * len(handle.sites)
        assert handle.history[1].matched == {k: False for k in range(len(handle.sites))}
        handle.set_matcher(None)
        handle.reset()
        assert not torch.equal(call(unet, x, 500, emb), reference)  # its own matching again
        assert any(r > 0 for r in handle.last_merged.values())


def test_partition_for_describes_the_next_match_without_advancing(unet, inputs):
    x, emb = inputs
    settings = MergeSettings(threshold=0.5, schedule=parse_schedule("every_step"), random_dst=True, seed=3)
    plans, partitions = [], []
    with apply_merging(unet, settings) as handle:
        def matcher(site, metric, grid):
            partitions.append(handle.controller.partition_for(metric, grid))
            partitions.append(handle.controller.partition_for(metric, grid))  # asking twice changes nothing
            plans.append(handle.controller.compute_plan(metric, grid))
            return plans[-1]

        handle.set_matcher(matcher)
        with_probe = call(unet, x, 500, emb)
        handle.set_matcher(None)
        handle.reset()
        without = call(unet, x, 500, emb)
    assert torch.equal(with_probe, without)
    for k, plan in enumerate(plans):
        src, dst = partitions[2 * k]
        assert torch.equal(src, partitions[2 * k + 1][0]) and torch.equal(dst, partitions[2 * k + 1][1])
        if plan.num_merged:
            assert torch.equal(plan.keep_idx[0, -dst.numel():], dst)  # the dst tokens the match used
            assert bool(torch.isin(plan.src_idx, src).all())


def test_r_multiple_rounds_r_in_the_eager_patch(unet, inputs):
    x, emb = inputs
    with apply_catome(unet, threshold=0.7, schedule="every_step") as raw:
        call(unet, x, 500, emb)
        counted = dict(raw.last_merged)
    q = 16
    assert any(r % q for r in counted.values())  # the rounding has something to change here
    with apply_catome(unet, threshold=0.7, schedule="every_step", r_multiple=q) as rounded:
        out = call(unet, x, 500, emb)
        assert rounded.settings.r_multiple == q
        assert rounded.last_merged == {k: q * (r // q) for k, r in counted.items()}
    with apply_tome(unet, ratio=0.3, r_multiple=q) as tome:
        call(unet, x, 500, emb)
        assert tome.settings.r_multiple == q and all(r % q == 0 for r in tome.last_merged.values())
    s = MergeSettings(threshold=0.7, schedule=parse_schedule("every_step"), r_multiple=q)
    with apply_catome(unet, settings=s):
        assert torch.equal(call(unet, x, 500, emb), out)
    with pytest.raises(CatomeError, match="not both"):
        apply_catome(unet, r_multiple=q, settings=s)
