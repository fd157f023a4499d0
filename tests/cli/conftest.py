"""Fixtures of the CLI tests.

``built_engine``: the tiny ONNX Runtime engine folder (128..192 px) that the
runtime and verify tests build too, under the same name in the session's temp
folder, so it is built once per session.

``tiny_engine_runtime(settings=None)``: a runtime over the tiny U-Net's stage
modules (torch backend), standing in for a loaded engine folder. The stages
are cut once per session; each call gives a fresh Runtime with a real
manifest (tests/factories.py) that names the model and the optimal profile, as
``Runtime.load`` would.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import pytest
import torch

from catome_export.engine.manifest import StageRecord
from catome_export.merging import MergeSettings, parse_schedule
from factories import make_manifest, make_shapes, make_stages

LATENT = 8
"""Latent side of the stand-in engine's optimal profile (64 px images)."""


@lru_cache(maxsize=1)
def _stages() -> tuple[Any, list, list]:
    from catome_export.export.stages import cut_unet
    from catome_export.models import find_merge_sites, load_unet

    unet = load_unet("tiny", "random")
    sites = find_merge_sites(unet)
    return unet, sites, cut_unet(unet, sites)


def make_tiny_runtime(settings: MergeSettings | None = None) -> Any:
    """A Runtime over the tiny stages; ``manifest`` says model tiny, opt latent 8x8."""
    from catome_export.backends.torch_backend import TorchBackend
    from catome_export.runtime.runtime import Runtime

    unet, sites, stages = _stages()
    settings = settings or MergeSettings(threshold=0.7, schedule=parse_schedule("config3"))
    manifest = make_manifest(model="tiny", weights="random", weights_hash=None, merge=settings, sites=sites,
                             shapes=make_shapes((1, 2), (LATENT, LATENT)),
                             stages=make_stages(spec for spec, _ in stages))
    backend = TorchBackend(None, "cpu", stages=stages)
    runners = [backend.load_stage(None, StageRecord(spec, "")) for spec, _ in stages]
    return Runtime.from_parts(runners, sites, settings, unet_config=dict(unet.config), dtype=torch.float32, device="cpu",
                   backend=backend, manifest=manifest)


@pytest.fixture(scope="session")
def tiny_engine_runtime() -> Callable[..., Any]:
    """``tiny_engine_runtime(settings=None)``: a fresh stand-in engine runtime (see the module docstring)."""
    return make_tiny_runtime


@pytest.fixture(scope="session")
def built_engine(tiny_engine):
    """The shared tiny ONNX Runtime engine (tests/conftest.py) the runtime and verify tests use."""
    return tiny_engine
