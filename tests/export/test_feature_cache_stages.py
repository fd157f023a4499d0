"""The stage cuts of feature caching: every stage runs whole or is skipped whole on a cached call, and the
shallow walk on the kept tensors computes, bit for bit, what eager DeepCache semantics compute."""

from __future__ import annotations

import pytest
import torch

from catome_export.eager.deepcache import apply_deepcache
from catome_export.errors import CatomeError
from catome_export.engine.io_names import MODEL_OUTPUT
from catome_export.export.stages import cached_branches, cut_unet, run_stages
from catome_export.featurecache import UNetLayout, is_skipped, position_of
from catome_export.models import bundled_config, find_merge_sites, load_unet
from catome_export.models.registry import random_unet
from catome_export.models.conditioning import random_added_conditioning


@pytest.fixture(scope="module", params=["tiny", "tiny-sd2", "tiny-xl"])
def model(request):
    if request.param == "tiny-sd2":  # SD 2.x's differences: linear projections, heads per level, upcast attention
        config = {**bundled_config("tiny"), "use_linear_projection": True, "attention_head_dim": [1, 2, 2, 2],
                  "upcast_attention": True}
        unet = random_unet(config).eval().requires_grad_(False)
    else:
        unet = load_unet(request.param, "random")
    return unet, find_merge_sites(unet, 2 if request.param == "tiny-xl" else 1)


def feeds(unet, t: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.full((2,), t),
           "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)}
    added = random_added_conditioning(unet, 2, (64, 64), seed=seed)
    if added is not None:
        out.update(added)
    return out


def eager(unet, f):
    kw = {}
    if "text_embeds" in f:
        kw["added_cond_kwargs"] = {"text_embeds": f["text_embeds"], "time_ids": f["time_ids"]}
    return unet(f["sample"], f["timestep"], encoder_hidden_states=f["encoder_hidden_states"], **kw).sample


def test_every_branch_cuts_into_whole_stages(model):
    unet, sites = model
    layout = UNetLayout.of(unet)
    for branch in range(layout.num_branches):
        stages = cut_unet(unet, sites, cache_branches=(branch,))
        (record,) = cached_branches(stages, (branch,), layout)
        assert record.stages[0] == 0 and record.stages[-1] == len(stages) - 1
        for spec, module in stages:
            skipped = {is_skipped(position_of(s.name, layout), branch) for s in module._steps}
            assert skipped == ({False} if spec.index in record.stages else {True})
        assert record.cached  # the shallow branch reads at least one deep output
        plain = cut_unet(unet, sites)
        assert len(stages) >= len(plain)  # the cuts only add boundaries


@pytest.mark.parametrize("branch", [0, 1, 2, 3, 5])
def test_shallow_walk_on_kept_tensors_equals_eager_deepcache(model, branch):
    unet, sites = model
    layout = UNetLayout.of(unet)
    stages = cut_unet(unet, sites, cache_branches=(branch,))
    (record,) = cached_branches(stages, (branch,), layout)
    first, second = feeds(unet, 800.0, 1), feeds(unet, 600.0, 2)
    with torch.no_grad():
        full = run_stages(stages, first)
        kept = {n: full[n] for n in record.cached}
        shallow = [stages[i] for i in record.stages]
        cached_out = run_stages(shallow, {**second, **kept})[MODEL_OUTPUT]
        with apply_deepcache(unet, 2, branch, timesteps=[800.0, 600.0]) as handle:
            want_full = eager(unet, first)
            want_cached = eager(unet, second)
            assert [c.full for c in handle.history] == [True, False]
        uncached = eager(unet, second)
    assert torch.equal(full[MODEL_OUTPUT], want_full)
    assert torch.equal(cached_out, want_cached)
    assert not torch.equal(cached_out, uncached)  # the cached call really differs from a full one


def test_a_branch_the_model_does_not_have_is_refused(model):
    unet, sites = model
    n = UNetLayout.of(unet).num_branches
    with pytest.raises(CatomeError, match=rf"branches 0\.\.{n - 1}"):
        cut_unet(unet, sites, cache_branches=(n,))


def test_tensors_across_the_cache_cuts_are_named_by_the_module_that_made_them(model):
    import re

    from catome_export.engine.io_names import EMB, is_model_input, site_of

    unet, sites = model
    layout = UNetLayout.of(unet)
    modules = {path for path, _ in unet.named_modules()}
    stages = cut_unet(unet, sites, cache_branches=tuple(range(layout.num_branches)))
    (record,) = cached_branches(stages, (0,), layout)
    crossing = {t.name for spec, _ in stages for t in spec.inputs} - {EMB}
    crossing = {n for n in crossing if not is_model_input(n) and site_of(n) is None
                and not re.fullmatch(r"(skip|x)\d+", n)}
    assert crossing and set(record.cached) <= crossing | {n for n in record.cached if n.startswith("skip")}
    for name in crossing:
        assert name.endswith(".out"), name  # no anonymous h{n}
        path = name[:-len(".out")]
        assert path in modules or re.fullmatch(r"up_blocks\.\d+\.cat\d+", path), name
