"""Feature caching in the engine: a tiny engine cut for two branches, run in a diffusers pipeline on ONNX
Runtime and on the torch backend, against eager CA-ToMe + the DeepCache-semantics patch; verify; errors."""

from __future__ import annotations

import pytest
import torch

from catome_export.cli.rebuild import build_command
from catome_export import MergeSettings, Runtime, build_engine
from catome_export.merging import parse_schedule
from catome_export import apply_catome
from catome_export.eager import apply_deepcache
from catome_export.errors import CatomeError
from catome_export.engine.options import BuildOptions
from catome_export.engine.manifest import Manifest
from catome_export.featurecache import FeatureCacheSettings, parse_feature_cache
from catome_export.models.pipeline import make_scheduler, tiny_pipeline
from catome_export.runtime.verify import verify_engine

SIZE = 64


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("fc") / "tiny-fc"
    build_engine("tiny", out_dir=out, resolution=SIZE, verify=False, ort_optimize=False, feature_cache="3,0",
                 cache_branches=(1,), settings=MergeSettings(threshold=0.5, schedule=parse_schedule("config3")))
    return str(out)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("pndm", with_text_encoder=False)


def generate(pipe, steps: int = 10) -> torch.Tensor:
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    uncond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, height=SIZE,
                    width=SIZE, output_type="latent", generator=torch.Generator().manual_seed(0),
                    guidance_scale=7.5).images


def eager_reference(pipe, settings, cache: FeatureCacheSettings | None) -> tuple[torch.Tensor, list]:
    with apply_catome(pipe, settings=settings) as merge:
        dc = apply_deepcache(pipe, settings=cache) if cache is not None else None
        try:
            out = generate(pipe)
            return out, [dict(s.merged) for s in merge.history]
        finally:
            if dc is not None:
                dc.remove()


def test_manifest_records_the_branches_and_the_default(engine):
    m = Manifest.load(engine)
    fc = m.feature_cache
    assert fc is not None and fc.branch_ids == (0, 1)
    assert fc.settings == FeatureCacheSettings(3, 0)
    for b in fc.branches:
        assert b.stages[0] == 0 and b.stages[-1] == len(m.stages) - 1 and len(b.stages) < len(m.stages)
        skipped_outputs = {t.name for s in m.stages if s.index not in b.stages for t in s.spec.outputs}
        assert set(b.cached) <= skipped_outputs
    command = build_command(m.rebuild_options())
    assert "--feature-cache 3,0" in command and "--cache-branches 1" in command


@pytest.mark.parametrize("backend", ["ort-cpu", "torch"])
def test_engine_in_a_pipeline_equals_eager_catome_with_deepcache(engine, pipe, backend):
    pipe.scheduler = make_scheduler("pndm")  # repeated timestep: positions 0, 1, 1, 3, ...
    with Runtime.load(engine, backend=backend, device="cpu") as rt:
        assert rt.feature_cache == FeatureCacheSettings(3, 0)  # the build's default
        for cache in (FeatureCacheSettings(3, 0), FeatureCacheSettings(2, 1), None):
            rt.set_feature_cache(cache)
            with rt.attach(pipe):
                got = generate(pipe)
                history = rt.history
            want, want_merged = eager_reference(pipe, rt.settings, cache)
            if backend == "torch":
                assert torch.equal(got, want)
            elif cache is not None:
                # ONNX Runtime's kernels round differently; 11 calls of PLMS with CFG 7.5 keep it within 1e-5 of the
                # latents' scale. (Uncached, the engine's own matching can flip a near-tie against eager's: what
                # verify proves call by call, on shared plans, in the test below.)
                assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
            assert [dict(h.merged) for h in history] == want_merged  # the same sites ran, with the same r
            kinds = [h.cached_features for h in history]
            if cache is None:
                assert not any(kinds)
            else:
                assert not kinds[0] and any(kinds)
                assert kinds[:4] == ([False, True, True, False] if cache.interval == 3 else [False, True, True, True])
                for h in history:
                    if h.cached_features:  # only the shallow branch's sites ran
                        assert max(h.merged) == 4 and len(h.merged) < 5


def test_verify_passes_with_caching_and_marks_cached_calls(engine):
    report = verify_engine(engine, steps=8, backend="ort-cpu", device="cpu")
    assert report.ok, report.summary()
    assert [r.cached_engine for r in report.rows] == [False, True, True] * 2 + [False, True]
    assert all(r.same_call_kind for r in report.rows)
    assert "feature cache" in report.schedule and "ran from the feature cache" in report.summary()
    other = verify_engine(engine, steps=6, backend="ort-cpu", device="cpu", feature_cache=FeatureCacheSettings(2, 1))
    assert other.ok and [r.cached_engine for r in other.rows] == [False, True] * 3
    table = other.format_table()
    assert "c" in table.splitlines()[2].split()[0]


def test_a_branch_the_engine_was_not_cut_for_needs_a_rebuild(engine):
    with Runtime.load(engine, backend="ort-cpu", device="cpu") as rt:
        with pytest.raises(CatomeError, match="--cache-branches 2"):
            rt.set_feature_cache(FeatureCacheSettings(3, 2))
        assert rt.feature_cache == FeatureCacheSettings(3, 0)  # unchanged
        rt.set_feature_cache(FeatureCacheSettings(1, 7))  # interval 1 caches nothing: any branch is fine
        assert rt.feature_cache is None
    with pytest.raises(CatomeError, match="--cache-branches 4"):
        Runtime.load(engine, backend="ort-cpu", device="cpu", feature_cache=FeatureCacheSettings(2, 4))


def test_a_new_shape_mid_generation_runs_in_full(engine):
    with Runtime.load(engine, backend="torch", device="cpu") as rt:
        rt.set_feature_cache(FeatureCacheSettings(4, 0))
        text = torch.randn(2, 77, 32)
        with torch.no_grad(), rt.generation():
            for i, t in enumerate([900, 800, 700]):
                rt.set_step(i) if i == 0 else None
                rt.unet(torch.randn(2 if i < 2 else 1, 4, 8, 8), t, encoder_hidden_states=text[: 2 if i < 2 else 1])
        assert [h.cached_features for h in rt.history] == [False, True, False]


@pytest.mark.parametrize("text,match", [
    ("3,12", r"branches 0\.\.11"),
    ("0,0", "interval must be an int >= 1"),
    ("full:2,4;0", "must contain 0"),
    ("three", "INTERVAL,BRANCH"),
])
def test_bad_build_values_fail_before_any_work(text, match, tmp_path):
    with pytest.raises(CatomeError, match=match):
        BuildOptions.create("tiny", out_dir=tmp_path / "x", feature_cache=text)
    assert not (tmp_path / "x").exists()


def test_parse_feature_cache_spellings():
    assert parse_feature_cache("3") == FeatureCacheSettings(3, 0)
    assert parse_feature_cache("5, 2") == FeatureCacheSettings(5, 2)
    assert parse_feature_cache("off") is None
    assert parse_feature_cache("full:0,4,9;1") == FeatureCacheSettings(branch=1, full_steps=(0, 4, 9))
    for s in (FeatureCacheSettings(4, 3), FeatureCacheSettings(branch=2, full_steps=(0, 7))):
        assert parse_feature_cache(s.flag()) == s


@pytest.mark.slow
def test_verify_50_steps_with_caching_on_tiny(engine):
    report = verify_engine(engine, steps=50, backend="ort-cpu", device="cpu")
    assert report.ok, report.summary()
    assert sum(r.cached_engine for r in report.rows) == 33  # interval 3 over 50 DDIM calls: 17 full, 33 cached


@pytest.mark.slow
def test_verify_50_steps_with_caching_on_tiny_xl(tmp_path):
    out = tmp_path / "tiny-xl-fc"
    build_engine("tiny-xl", out_dir=out, resolution=SIZE, verify=False, ort_optimize=False, feature_cache="3,0",
                 cache_branches=(4,))
    report = verify_engine(out, steps=50, backend="ort-cpu", device="cpu")
    assert report.ok, report.summary()
    assert sum(r.cached_engine for r in report.rows) == 33
    # branch 0 skips SDXL's level-2 merge sites on cached calls; branch 4 (block 1, layer 1) keeps some of them
    assert all(not r.merged_engine for r in report.rows if r.cached_engine)
    deeper = verify_engine(out, steps=12, backend="ort-cpu", device="cpu", feature_cache=FeatureCacheSettings(3, 4))
    assert deeper.ok, deeper.summary()
    assert any(r.merged_engine for r in deeper.rows if r.cached_engine)


def test_a_replica_serves_with_the_engines_feature_cache(engine):
    pytest.importorskip("PIL", reason="the service encodes PNGs")
    from catome_export.serve.protocol import ImageJob
    from catome_export.serve.service import ImageService, ServeOptions

    svc = ImageService(ServeOptions(engine, backend="ort", steps=4, threads=1))
    try:
        assert svc.info()["feature_cache"] == {"interval": 3, "branch": 0, "full_steps": None}
        (result,) = svc.run_jobs([ImageJob(prompt="a fox", negative_prompt=None, seed=1, steps=4, guidance=7.5,
                                           height=SIZE, width=SIZE, threshold=None)])
        assert not isinstance(result, Exception), result
        assert any(h.cached_features for h in svc.runtime.history)
    finally:
        svc.close()
    off = ImageService(ServeOptions(engine, backend="ort", steps=4, threads=1, feature_cache="off"))
    try:
        assert off.info()["feature_cache"] is None
    finally:
        off.close()
