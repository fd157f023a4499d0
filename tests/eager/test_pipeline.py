"""The eager patch inside a real diffusers StableDiffusionPipeline (offline tiny pipeline).

Proves the step numbering of a plain ``pipe(...)`` call (one U-Net call = one
loop index, CFG halves batched), the reset at every call, and where schedule
checkpoints fire for step_base 0 and 1.
"""

from __future__ import annotations

import pytest
import torch

from catome_export import apply_catome
from catome_export.models.pipeline import make_scheduler, tiny_pipeline

SIZE = 64  # pixels: latent 8x8 (the step bookkeeping does not depend on the size)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("pndm", with_text_encoder=False)


def make_text_embeddings(batch: int, seed: int) -> torch.Tensor:
    """Seeded random text embeddings [batch, 77, 32] for the tiny U-Net."""
    return torch.randn(batch, 77, 32, generator=torch.Generator().manual_seed(seed))


def generate(pipe, steps: int, seed: int = 0) -> torch.Tensor:
    cond = make_text_embeddings(1, seed=1)
    uncond = make_text_embeddings(1, seed=2)
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, height=SIZE,
                width=SIZE, output_type="latent", generator=torch.Generator().manual_seed(seed),
                guidance_scale=7.5).images


class UNetCalls:
    """Records timestep and batch of every U-Net call."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[tuple[float, int]] = []
        self._hook = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.calls.append((float(torch.as_tensor(t).reshape(-1)[0]), int(sample.shape[0])))

    def remove(self) -> None:
        self._hook.remove()


def test_steps_are_numbered_per_unet_call_and_reset_at_every_call(pipe):
    calls = UNetCalls(pipe.unet)
    try:
        with apply_catome(pipe, threshold=0.7, schedule="config3") as handle:
            generate(pipe, steps=3)
            first = [(s.step, dict(s.matched), dict(s.merged)) for s in handle.history]
            n_calls = len(calls.calls)
            # the same timesteps again: without a reset the counter would run on (3, 4, ...)
            generate(pipe, steps=3, seed=1)
            second = [(s.step, dict(s.matched)) for s in handle.history]
    finally:
        calls.remove()
    assert n_calls == len(pipe.scheduler.timesteps) >= 3  # PLMS: one more call than steps
    assert all(batch == 2 for _, batch in calls.calls)  # CFG halves in one call
    assert [s for s, _, _ in first] == list(range(n_calls))
    assert [s for s, _ in second] == list(range(n_calls))
    assert all(second[0][1].values())  # fresh matching at the start of the second call (empty cache)
    # config3 with step_base 1 fires no entry within the first 3 loop indices: only step 0 matches
    assert [any(m.values()) for _, m, _ in first] == [True] + [False] * (n_calls - 1)
    r0 = first[0][2]
    assert all(merged == r0 for _, _, merged in first)  # cached: same r at every step


def test_reset_comes_from_the_pipeline_call_not_only_from_rising_timesteps(pipe):
    """An interrupted call ends at the first timestep; the next call starts at that same timestep.

    Rising-timestep detection cannot see the new generation here, so only the
    reset at the start of every pipe(...) call numbers the next call from 0.
    """

    def stop_after_first_step(p, i, t, kwargs):
        p._interrupt = True
        return kwargs

    with apply_catome(pipe, threshold=0.7, schedule="config3") as handle:
        cond, uncond = make_text_embeddings(1, seed=1), make_text_embeddings(1, seed=2)
        pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=3, height=SIZE, width=SIZE,
             output_type="latent", callback_on_step_end=stop_after_first_step)
        assert [s.step for s in handle.history] == [0]
        generate(pipe, steps=3)
        assert handle.history[0].step == 0 and all(handle.history[0].matched.values())
        assert [s.step for s in handle.history] == list(range(len(pipe.scheduler.timesteps)))


def test_patch_leaves_no_trace_on_the_pipeline(pipe):
    baseline = generate(pipe, steps=2)
    own_attrs = dict(vars(pipe))
    with apply_catome(pipe, threshold=0.5):
        assert "progress_bar" in vars(pipe)
        merged = generate(pipe, steps=2)
    assert dict(vars(pipe)).keys() == own_attrs.keys()
    assert not torch.equal(merged, baseline)
    assert torch.equal(generate(pipe, steps=2), baseline)


@pytest.mark.parametrize("scheduler,step_base", [("ddim", 0), ("ddim", 1), ("pndm", 0)])
def test_checkpoints_fire_at_the_right_loop_indices(scheduler, step_base):
    pipe = tiny_pipeline(scheduler, with_text_encoder=False)
    schedule = [0, 2, 3]
    with apply_catome(pipe, threshold=0.7, schedule=schedule, step_base=step_base) as handle:
        generate(pipe, steps=4)
        matched = [all(s.matched.values()) for s in handle.history]
        steps = [s.step for s in handle.history]
    n = len(pipe.scheduler.timesteps)
    assert steps == list(range(n))
    fire = {k - step_base for k in schedule if k - step_base >= 0}
    expected = [i == 0 or i in fire for i in range(n)]
    assert matched == expected, (scheduler, step_base, matched)


def test_a_prompt_pipeline_with_the_tiny_text_encoder():
    pipe = tiny_pipeline("ddim")
    with apply_catome(pipe, threshold=0.7, schedule="every_step") as handle:
        out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
        assert len(handle.history) == 2
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_make_scheduler_rejects_unknown_names():
    from catome_export.errors import CatomeError

    with pytest.raises(CatomeError, match="unknown scheduler"):
        make_scheduler("heun")
