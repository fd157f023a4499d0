"""``pipe.unet = runtime.unet`` in an offline tiny StableDiffusionPipeline: same latents as eager CA-ToMe."""

from __future__ import annotations

import pytest
import torch

from catome_export.merging import MergeSettings, parse_schedule

STEPS = 4
SETTINGS = MergeSettings(threshold=0.7, schedule=parse_schedule("0,2", step_base=0))


@pytest.fixture(scope="module")
def pipe(reference_unet):
    from catome_export.models.pipeline import tiny_pipeline

    return tiny_pipeline("pndm", unet=reference_unet, with_text_encoder=False)


def _generate(pipe, smooth_latents, text_embeddings) -> torch.Tensor:
    cond, uncond = text_embeddings(1, seed=1), text_embeddings(1, seed=2)
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS, height=128, width=128,
               latents=smooth_latents(1, (16, 16)), guidance_scale=7.5, output_type="latent")
    return out.images


def test_runtime_in_a_pipeline_matches_eager(pipe, reference_unet, make_runtime, smooth_latents, text_embeddings):
    from catome_export.eager import apply_merging

    with apply_merging(pipe, SETTINGS) as handle:
        want = _generate(pipe, smooth_latents, text_embeddings)
        eager_history = [(s.step, s.merged, s.matched) for s in handle.history]
    assert pipe.unet is reference_unet
    runtime = make_runtime(SETTINGS)
    with runtime.attach(pipe):
        assert pipe.unet is runtime.unet
        assert pipe._execution_device == torch.device("cpu")
        got = _generate(pipe, smooth_latents, text_embeddings)
        history = [(s.step, s.merged, s.matched) for s in runtime.history]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert history == eager_history
        calls = len(pipe.scheduler.timesteps)  # PLMS calls the U-Net once more than its step count
        assert calls == STEPS + 1
        assert [h[0] for h in history] == list(range(calls))
        assert [all(h[2].values()) for h in history] == [True, False, True, False, False]
        assert all(h[1][0] > 0 for h in history)  # merging really happened (CFG batch of 2)
        # a second call starts again at step 0 with fresh matching, even with the same timesteps
        again = _generate(pipe, smooth_latents, text_embeddings)
        assert [s.step for s in runtime.history] == list(range(calls))
        assert torch.equal(again, got)
    assert pipe.unet is reference_unet and "progress_bar" not in pipe.__dict__
    runtime.close()


def test_plain_assignment_numbers_generations_by_timestep(pipe, reference_unet, make_runtime, smooth_latents,
                                                          text_embeddings):
    runtime = make_runtime(SETTINGS)
    try:
        pipe.unet = runtime.unet
        for _ in range(2):
            _generate(pipe, smooth_latents, text_embeddings)
            assert [s.step for s in runtime.history] == list(range(len(pipe.scheduler.timesteps)))
            assert all(runtime.history[0].matched.values())
    finally:
        pipe.unet = reference_unet
        runtime.close()
