"""Feature-cached calls through the CUDA-graph runner (the eager capture stand-in on CPU): the shallow chain
gets graph runners and keys of its own, and the results equal stage-by-stage runs."""

from __future__ import annotations

import torch

from catome_export.backends.torch_backend import TorchBackend
from catome_export.engine.manifest import FeatureCacheRecord, StageRecord
from catome_export.export.stages import cached_branches, cut_unet
from catome_export.featurecache import FeatureCacheSettings, UNetLayout
from catome_export.merging import MergeSettings, parse_schedule
from catome_export.runtime.runtime import Runtime

SETTINGS = MergeSettings(threshold=0.7, schedule=parse_schedule("0,3", step_base=0))
TIMESTEPS = (951, 901, 851, 801, 751, 701)
CACHE = FeatureCacheSettings(2, 0)


def make_runtime(unet, sites) -> Runtime:
    stages = cut_unet(unet, sites, cache_branches=(0,))
    record = FeatureCacheRecord(cached_branches(stages, (0,), UNetLayout.of(unet)), CACHE)
    backend = TorchBackend(None, "cpu", stages=stages)
    runners = [backend.load_stage(None, StageRecord(spec, "")) for spec, _ in stages]
    runtime = Runtime.from_parts(runners, sites, SETTINGS, unet_config=dict(unet.config), dtype=torch.float32, device="cpu",
                      backend=backend, cache_record=record)
    runtime.set_timesteps(TIMESTEPS)
    return runtime


def generation(runtime, latents, ehs):
    runtime.reset()
    return [runtime.unet(latents, t, ehs).sample for t in TIMESTEPS]


def test_cached_calls_replay_the_shallow_chain(tiny_unet, tiny_sites, smooth_latents, text_embeddings,
                                               eager_capture):
    latents, ehs = smooth_latents(2, (16, 16)), text_embeddings(2)
    plain = make_runtime(tiny_unet, tiny_sites)
    want = generation(plain, latents, ehs)
    want_history = [(h.step, h.merged, h.matched, h.cached_features) for h in plain.history]
    assert [h[3] for h in want_history] == [False, True] * 3
    graphed = make_runtime(tiny_unet, tiny_sites)
    graphed.enable_cuda_graphs(capture=eager_capture)
    for _ in range(2):
        got = generation(graphed, latents, ehs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert [(h.step, h.merged, h.matched, h.cached_features) for h in graphed.history] == want_history
    # cached calls 1 and 5 reuse every plan (call 3 is a checkpoint: it matches stage by stage) and replay the
    # shallow chain; full calls 2 and 4 reuse every plan too and replay the whole chain with the deep features among
    # its outputs (call 0 is a checkpoint): 4 replays per generation, each kind on a runner of its own
    shallow, keeping = graphed.shallow_graph_runners[0], graphed.keeping_graph_runners[0]
    assert eager_capture.replays == 8 and shallow.captures >= 1 and keeping.captures >= 1
    assert graphed.graph_runner.captures == 0
    graphed.close()
    assert graphed.shallow_graph_runners == {} and graphed.keeping_graph_runners == {}
