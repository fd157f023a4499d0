"""Cached steps through the CUDA-graph runner (an eager capture stand-in on CPU; real graphs on a GPU)."""

from __future__ import annotations

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.engine.manifest import StageRecord
from catome_export.merging import MergeSettings, parse_schedule

SETTINGS = MergeSettings(threshold=0.7, schedule=parse_schedule("0,3", step_base=0))
TIMESTEPS = (951, 901, 851, 801, 751, 701)


def _generation(runtime, latents, ehs):
    runtime.reset()
    return [runtime.unet(latents, t, ehs).sample for t in TIMESTEPS]


def test_cached_steps_replay_the_chain_with_the_current_plans(make_runtime, smooth_latents, text_embeddings,
                                                               eager_capture):
    latents, ehs = smooth_latents(2, (16, 16)), text_embeddings(2)
    plain = make_runtime(SETTINGS)
    want = _generation(plain, latents, ehs)
    want_history = [(s.step, s.merged, s.matched) for s in plain.history]

    graphed = make_runtime(SETTINGS)
    capture = eager_capture
    graphed.enable_cuda_graphs(capture=capture)
    for _ in range(2):  # the second generation replays graphs captured in the first
        got = _generation(graphed, latents, ehs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert [(s.step, s.merged, s.matched) for s in graphed.history] == want_history
    # steps 1, 2, 4, 5 are cached (schedule 0,3 from 0): 4 graph runs per generation, the rest stage by stage
    runner = graphed.graph_runner
    assert capture.replays == 8
    assert capture.captures == runner.captures == len({(2, 16, 16, tuple(h[1].values())) for h in want_history})
    assert runner.cache.plan_copies >= 1  # new plans after the checkpoint (or the new generation) were copied in
    graphed.close()
    assert graphed.graph_runner is None


@pytest.mark.parametrize("settings", [SETTINGS, MergeSettings(threshold=None, ratio=0.5,
                                                     schedule=parse_schedule("0,3", step_base=0))],
                         ids=["threshold", "ratio"])
def test_a_prompt_of_another_token_length_gets_graphs_of_its_own(make_runtime, smooth_latents, text_embeddings,
                                                                  eager_capture, settings):
    """Graphs live across generations (reset keeps them) and in ratio mode r repeats: a second prompt whose text has
    another token length runs its cached steps on graphs captured for its own shapes, not the first prompt's."""
    latents = smooth_latents(2, (16, 16))
    prompts = [text_embeddings(2, length=77), text_embeddings(2, length=20, seed=2), text_embeddings(2, length=77)]
    plain = make_runtime(settings)
    want = [_generation(plain, latents, ehs) for ehs in prompts]
    graphed = make_runtime(settings)
    graphed.enable_cuda_graphs(capture=eager_capture)
    for ehs, expected in zip(prompts, want):
        got = _generation(graphed, latents, ehs)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    lengths = {dict(k.inputs)["encoder_hidden_states"][1] for k in graphed.graph_runner.cache.keys()}
    assert lengths == {77, 20} and eager_capture.replays == 12
    graphed.close()


class FailingCapture:
    """A capture whose every attempt fails after the chain ran under capture (an op not permitted while capturing)."""

    def __init__(self) -> None:
        self.attempts = 0

    def capture(self, chain, static_inputs):
        self.attempts += 1
        chain(static_inputs)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    def replay(self, handle) -> None:
        raise AssertionError("nothing was captured")


def test_a_failed_capture_leaves_the_generation_correct(make_runtime, smooth_latents, text_embeddings, caplog):
    """The runtime's cached steps run stage by stage after a capture fails: same results as without graphs, one
    warning, no second attempt in this or the next generation."""
    latents, ehs = smooth_latents(2, (16, 16)), text_embeddings(2)
    want = _generation(make_runtime(SETTINGS), latents, ehs)
    graphed = make_runtime(SETTINGS)
    capture = FailingCapture()
    graphed.enable_cuda_graphs(capture=capture)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            got = _generation(graphed, latents, ehs)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert capture.attempts == 1 and len(warnings) == 1 and "not permitted when stream is capturing" in warnings[0]
    graphed.close()


def test_cuda_graphs_need_a_gpu_and_a_capturable_backend(make_runtime):
    runtime = make_runtime(SETTINGS)
    with pytest.raises(CatomeError, match="CUDA device"):
        runtime.enable_cuda_graphs()


@pytest.mark.gpu
def test_real_cuda_graphs_on_the_torch_backend(tiny_stages, tiny_sites, tiny_unet, smooth_latents, text_embeddings):
    import copy

    from catome_export.backends.torch_backend import TorchBackend
    from catome_export.runtime.runtime import Runtime

    stages = copy.deepcopy(tiny_stages)  # moved to the GPU: leave the shared CPU fixture alone

    def make(graphs: bool) -> Runtime:
        backend = TorchBackend(None, "cuda", stages=stages)
        runners = [backend.load_stage(None, StageRecord(spec, "")) for spec, _ in stages]
        rt = Runtime.from_parts(runners, tiny_sites, SETTINGS, unet_config=dict(tiny_unet.config), dtype=torch.float32,
                     device=backend.device, backend=backend)
        if graphs:
            rt.enable_cuda_graphs()
        return rt

    latents, ehs = smooth_latents(2, (16, 16)).cuda(), text_embeddings(2).cuda()
    want = _generation(make(False), latents, ehs)
    got = _generation(make(True), latents, ehs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
