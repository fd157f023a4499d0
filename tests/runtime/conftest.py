"""Fixtures of the runtime tests: the tiny U-Net cut into stages, runtimes over them, an eager reference."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
import torch

from catome_export.engine.manifest import StageRecord
from catome_export.merging import MergeSettings


@pytest.fixture(scope="session")
def tiny_sites(tiny_unet):
    from catome_export.models import find_merge_sites

    return find_merge_sites(tiny_unet)


@pytest.fixture(scope="session")
def tiny_stages(tiny_unet, tiny_sites):
    """``cut_unet`` of the tiny U-Net (fp32); the stage modules share the fixture's weights."""
    from catome_export.export.stages import cut_unet

    return cut_unet(tiny_unet, tiny_sites)  # one torch thread: the session-wide fixture in tests/conftest.py


@pytest.fixture(scope="session")
def make_runtime(tiny_unet, tiny_sites, tiny_stages) -> Callable[..., "object"]:
    """``make_runtime(settings, shape_check=None)``: a Runtime over the tiny stages on the torch backend."""
    from catome_export.backends.torch_backend import TorchBackend
    from catome_export.runtime.runtime import Runtime

    def make(settings: MergeSettings, shape_check=None):
        backend = TorchBackend(None, "cpu", stages=tiny_stages)
        runners = [backend.load_stage(None, StageRecord(spec, "")) for spec, _ in tiny_stages]
        return Runtime.from_parts(runners, tiny_sites, settings, unet_config=dict(tiny_unet.config), dtype=torch.float32,
                       device="cpu", backend=backend, shape_check=shape_check)

    return make


@pytest.fixture(scope="session")
def reference_unet(tiny_unet) -> torch.nn.Module:
    """A copy of the tiny U-Net for the eager reference (patched and unpatched by the tests)."""
    return copy.deepcopy(tiny_unet)


@pytest.fixture(scope="session")
def eager(reference_unet) -> Callable[[MergeSettings], "object"]:
    """``with eager(settings) as handle:`` the reference U-Net patched with eager CA-ToMe."""
    from catome_export.eager import apply_merging

    @contextmanager
    def patched(settings: MergeSettings) -> Iterator[object]:
        handle = apply_merging(reference_unet, settings)
        try:
            yield handle
        finally:
            handle.remove()

    return patched


class EagerCapture:
    """CUDA-graph capture stand-in for CPU tests: like a CUDA graph, a replay recomputes the chain from the
    static input buffers it was captured with and writes into the outputs it handed out at capture."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, chain, static_inputs):
        self.captures += 1
        outputs = {k: torch.empty_like(v) for k, v in chain(static_inputs).items()}
        return (chain, static_inputs, outputs), outputs

    def replay(self, handle) -> None:
        self.replays += 1
        chain, static_inputs, outputs = handle
        for k, v in chain(static_inputs).items():
            outputs[k].copy_(v)


@pytest.fixture
def eager_capture() -> EagerCapture:
    """A fresh :class:`EagerCapture` (counts captures and replays)."""
    return EagerCapture()
