"""attach / detach of a runtime in the offline tiny pipeline (torch-backend runtime over the tiny stages)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.merging import MergeSettings, parse_schedule
from catome_export.runtime.embed import Attachment, attach, detach

SIZE = 64  # pixels: latent 8x8, 64 tokens per site


def _run(pipe, prompt: str = "a red car", seed: int = 0, steps: int = 2) -> np.ndarray:
    out = pipe(prompt, num_inference_steps=steps, height=SIZE, width=SIZE, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def pipe(tiny_unet):
    """The offline tiny pipeline around the session's tiny U-Net (whose weights the stage modules share)."""
    from catome_export.models.pipeline import tiny_pipeline

    return tiny_pipeline(unet=tiny_unet)


@pytest.fixture(scope="module")
def baseline(pipe):
    return _run(pipe)


ATOL = 1e-5
"""Repeated CPU runs of one pipeline agree to float rounding, not always bit for bit (kernel selection)."""


def _no_merge() -> MergeSettings:
    return MergeSettings(threshold=1.0, schedule=parse_schedule("every_step"))


def _catome() -> MergeSettings:
    return MergeSettings(threshold=0.7, schedule=parse_schedule("config3"))


def test_attach_detach_round_trip(pipe, tiny_unet, baseline, make_runtime):
    runtime = make_runtime(MergeSettings(threshold=None, merge_fraction=0.5, schedule=parse_schedule("every_step")))
    attachment = attach(pipe, runtime)
    assert isinstance(attachment, Attachment) and attachment.active
    assert pipe.unet is runtime.unet and attachment.original_unet is tiny_unet
    assert "progress_bar" in pipe.__dict__
    with_engine = _run(pipe)
    assert np.abs(with_engine - baseline).max() > 100 * ATOL  # half the tokens merged: a visibly different image
    steps = [s.step for s in attachment.history]
    assert steps == list(range(len(steps))) and len(steps) >= 2
    assert all(r > 0 for s in attachment.history for r in s.merged.values())

    attachment.detach()
    assert not attachment.active
    assert pipe.unet is tiny_unet
    assert "progress_bar" not in pipe.__dict__  # the class method again
    assert tuple(pipe.config.unet) == ("diffusers", "UNet2DConditionModel")
    assert not runtime.unet._forward_pre_hooks and not runtime.unet._forward_hooks
    attachment.detach()  # twice is fine
    np.testing.assert_allclose(_run(pipe), baseline, rtol=0, atol=ATOL)  # the original U-Net's outputs again


def test_context_manager_and_module_level_detach(pipe, tiny_unet, make_runtime):
    runtime = make_runtime(_no_merge())
    with attach(pipe, runtime) as attached:
        assert pipe.unet is runtime.unet
    assert not attached.active and pipe.unet is tiny_unet
    again = attach(pipe, runtime)  # a detached runtime can be attached again
    detach(pipe)
    assert not again.active and pipe.unet is tiny_unet
    detach(pipe)  # nothing attached: no-op


def test_every_pipe_call_starts_at_step_zero_with_empty_caches(pipe, make_runtime, smooth_latents, text_embeddings):
    runtime = make_runtime(_catome())
    with attach(pipe, runtime) as attached:
        # A call at a higher timestep than the pipeline's first one: without the reset on each pipe(...) call,
        # the pipeline's first step would count as step 1 and reuse this call's plans.
        runtime.unet(smooth_latents(2, (SIZE // 8, SIZE // 8)), 999, text_embeddings(2))
        assert [s.step for s in runtime.history] == [0]
        first = _run(pipe, seed=3)
        hist_first = [(s.step, s.merged, s.matched) for s in attached.history]
        assert [h[0] for h in hist_first] == list(range(len(hist_first)))
        assert all(hist_first[0][2].values()), "step 0 must match (empty cache)"
        assert not any(hist_first[1][2].values()), "config3 (step_base 1) reuses the plans at loop index 1"
        second = _run(pipe, seed=3)
        hist_second = [(s.step, s.merged, s.matched) for s in attached.history]
    np.testing.assert_allclose(first, second, rtol=0, atol=ATOL)
    assert hist_first == hist_second


def test_a_pipeline_built_without_a_unet_runs_the_engine_at_its_default_size(pipe, make_runtime):
    from diffusers import StableDiffusionPipeline

    bare = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=None,
                                   scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    bare.set_progress_bar_config(disable=True)
    runtime = make_runtime(_no_merge())
    with attach(bare, runtime) as attached:
        image = bare("a red car", num_inference_steps=1, guidance_scale=1.0,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        assert attached.original_unet is None
    side = runtime.unet.config.sample_size * 8
    assert image.shape == (side, side, 3)  # no height/width given: the engine's config sets them
    assert bare.unet is None and bare._is_unet_config_sample_size_int is False  # put back as it was


def test_custom_loop_drives_the_runtime_with_set_step(pipe, make_runtime, smooth_latents, text_embeddings):
    runtime = make_runtime(MergeSettings(threshold=0.7, schedule=parse_schedule("0,2", step_base=0)))
    latents, ehs = smooth_latents(2, (SIZE // 8, SIZE // 8)), text_embeddings(2)
    with attach(pipe, runtime) as attached:
        for i in range(4):
            attached.set_step(i)
            pipe.unet(latents, 500, ehs)  # the same timestep every call: only set_step numbers the steps
        assert [s.step for s in runtime.history] == [0, 1, 2, 3]
        assert [all(s.matched.values()) for s in runtime.history] == [True, False, True, False]
        attached.set_step(0)  # 0 starts a new generation
        pipe.unet(latents, 500, ehs)
        assert [s.step for s in runtime.history] == [0]


def test_two_runtimes_in_two_threads_equal_one_after_the_other(tiny_unet, make_runtime):
    from catome_export.models.pipeline import tiny_pipeline

    jobs = [("a red car", 1), ("a lighthouse at dusk", 2)]
    pipes = [tiny_pipeline(unet=tiny_unet) for _ in jobs]
    runtimes = [make_runtime(_catome()) for _ in jobs]
    attachments = [attach(p, r) for p, r in zip(pipes, runtimes)]
    try:
        sequential = []
        for (prompt, seed), p, a in zip(jobs, pipes, attachments):
            sequential.append((_run(p, prompt, seed), [(s.step, s.merged) for s in a.history]))

        results: dict[int, tuple] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(jobs))

        def work(i: int) -> None:
            try:
                barrier.wait()
                prompt, seed = jobs[i]
                image = _run(pipes[i], prompt, seed)
                results[i] = (image, [(s.step, s.merged) for s in attachments[i].history])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i, (image, hist) in enumerate(sequential):
            np.testing.assert_allclose(results[i][0], image, rtol=0, atol=ATOL)
            assert results[i][1] == hist
        assert np.abs(sequential[0][0] - sequential[1][0]).max() > 100 * ATOL  # the two jobs really differ
    finally:
        for a in attachments:
            a.detach()


def test_a_second_threads_call_during_a_manual_generation_is_refused(pipe, make_runtime, smooth_latents,
                                                                     text_embeddings):
    runtime = make_runtime(_no_merge())
    latents, ehs = smooth_latents(1, (SIZE // 8, SIZE // 8)), text_embeddings(1)
    inside, release = threading.Event(), threading.Event()
    real_chain = runtime._run_chain

    def slow_chain(*args, **kwargs):
        inside.set()
        release.wait(timeout=60)
        return real_chain(*args, **kwargs)

    runtime._run_chain = slow_chain  # instance attribute: the first caller waits inside the U-Net call
    outcome: list = []
    with attach(pipe, runtime):
        worker = threading.Thread(target=lambda: outcome.append(pipe.unet(latents, 500, ehs).sample.shape))
        worker.start()
        assert inside.wait(timeout=60)
        for call in (lambda: pipe.unet(latents, 500, ehs), runtime.reset, lambda: runtime.set_step(0)):
            with pytest.raises(CatomeError, match="middle of a generation"):
                call()
        release.set()
        worker.join()
        assert outcome == [latents.shape]
        assert [s.step for s in runtime.history] == [0]  # the refused calls changed nothing
        pipe.unet(latents, 400, ehs)  # the worker has ended, and its generation with it: this thread may call now
        assert [s.step for s in runtime.history] == [0]  # a new generation: nobody continues another thread's


class _StubPipe:
    """A pipeline-shaped object (weak-referenceable, unlike SimpleNamespace)."""

    unet = None


def test_attach_refuses_what_it_cannot_serve(pipe, tiny_unet, make_runtime):
    runtime = make_runtime(_no_merge())
    with pytest.raises(CatomeError, match="pipeline"):
        attach(object(), runtime)
    with pytest.raises(CatomeError, match="Runtime"):
        attach(pipe, object())
    stub = SimpleNamespace(unet=SimpleNamespace(config={"cross_attention_dim": 768, "in_channels": 4}))
    with pytest.raises(CatomeError, match="cross_attention_dim"):
        attach(stub, runtime)
    with attach(pipe, runtime):
        other = _StubPipe()
        attach(other, runtime).detach()  # a runtime may serve several pipelines: their generations take turns
        with pytest.raises(CatomeError, match="already carries"):
            attach(pipe, make_runtime(_no_merge()))
    assert pipe.unet is tiny_unet
    closed = make_runtime(_no_merge())
    closed.close()
    with pytest.raises(CatomeError, match="closed"):
        attach(pipe, closed)


def test_attach_on_top_of_an_eager_patch_restores_both(pipe, tiny_unet, make_runtime):
    from catome_export import apply_catome

    handle = apply_catome(pipe, threshold=0.7)
    eager_wrapper = pipe.__dict__["progress_bar"]
    try:
        runtime = make_runtime(_no_merge())
        with attach(pipe, runtime):
            assert pipe.__dict__["progress_bar"] is not eager_wrapper
        assert pipe.__dict__["progress_bar"] is eager_wrapper and pipe.unet is tiny_unet
    finally:
        handle.remove()
    assert "progress_bar" not in pipe.__dict__


def test_a_built_engine_in_the_tiny_pipeline(tiny_engine):
    """The real thing: an ONNX Runtime engine folder loaded, attached, run twice, detached."""
    from catome_export.models.pipeline import tiny_pipeline
    from catome_export.runtime import Runtime

    pipe = tiny_pipeline()
    own_unet = pipe.unet
    with Runtime.load(tiny_engine, backend="ort") as runtime, attach(pipe, runtime) as attached:
        images, histories = [], []
        for _ in range(2):
            out = pipe("a red car", num_inference_steps=2, height=128, width=128,
                       generator=torch.Generator().manual_seed(0), output_type="np")
            images.append(out.images[0])
            histories.append([(s.step, s.merged, s.matched) for s in attached.history])
    assert pipe.unet is own_unet
    assert images[0].shape == (128, 128, 3)
    np.testing.assert_allclose(images[0], images[1], rtol=0, atol=ATOL)
    assert histories[0] == histories[1]
    assert [h[0] for h in histories[0]] == list(range(len(histories[0])))
    assert all(histories[0][0][2].values())


def test_unet_features_the_engine_cannot_honour_say_so(make_runtime):
    """A diffusers U-Net method the engine lacks is a CatomeError naming it (and still an AttributeError, so
    pipelines' hasattr/getattr checks work); an attribute no U-Net has stays a plain AttributeError."""
    from catome_export.runtime.unet import EngineFeatureError

    runtime = make_runtime(MergeSettings())
    with pytest.raises(CatomeError, match=r"runtime\.unet\.enable_freeu: the engine runs fixed compiled graphs"):
        runtime.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(EngineFeatureError, match="set_attn_processor"):
        runtime.unet.set_attn_processor(None)
    assert not hasattr(runtime.unet, "fuse_qkv_projections")
    assert getattr(runtime.unet, "enable_freeu", None) is None
    with pytest.raises(AttributeError) as info:
        runtime.unet.no_such_attribute
    assert not isinstance(info.value, CatomeError)
    assert runtime.unet.config.in_channels == 4 and runtime.unet.dtype == torch.float32  # still readable
