"""Shared fixtures and marker handling for the whole test suite.

- ``gpu``-marked tests skip with a reason where CUDA is missing, ``trt``-marked
  ones where ``tensorrt`` is not importable.
- ``tiny_unet``: the bundled tiny U-Net (SD 1.5 layout) with seeded random
  weights, loaded once per session. Treat it as read-only: tests that patch
  a model use ``fresh_tiny_unet`` (or remove their patch in a ``finally``).
- ``smooth_latents(...)`` / ``text_embeddings(...)``: fixtures that return
  the seeded input builders below (the suite runs in importlib mode, so test
  modules use the fixtures rather than importing this file). Smooth
  (blurred) latents make block inputs self-similar, so a random-weight U-Net
  really merges at t = 0.7; white noise gives almost no pairs above 0.7.
- ``tensorrt_standin`` (once playing TensorRT 10.13, once 11.1),
  ``tensorrt10``, ``tensorrt11``: the ``tensorrt`` stand-in of
  tests/standins imported as ``tensorrt`` for one test, its record of
  enqueues cleared; ``trt_standin_helper``: tests/standins/trt_standin.py
  (``activate``, ``deactivate``, ``subprocess_env``, ``build_plan``,
  ``VERSIONS``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import pytest
import torch


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


SLOW_FIXTURES = frozenset({"tiny_engine", "built_engine", "reliability_engine", "engine_copy", "ort_runtime",
                           "exported", "ort_sessions", "built", "auto3", "cli_process", "child_env",
                           "ray_isolation", "ray_env", "ray_temp_dir", "xl_engine", "xl_bench", "tiny_onnx_fp32",
                           "tiny_onnx_fp16", "lora_engines", "lora_ort_engine", "controlnet_engine"})
"""Fixtures that build or export an engine, calibrate a schedule, or start a Python process or a Ray cluster: a
test using one (directly or through another fixture) is marked ``slow`` (``pytest -m "not slow"`` leaves it out; the default run keeps it)."""


LONGEST_FILES = ("tests/export/test_sd21_real_size_fp16.py", "tests/export/test_sd15_real_size.py",
                 "tests/serve/test_serve_ray.py", "tests/export/test_build_folder.py", "tests/cli/test_bench.py",
                 "tests/backends/test_trt_build.py", "tests/lora/test_lora_engine.py")
"""The test files that take longest (minutes each on 2 cores), longest first: collected first, so that the parallel
run (pytest-xdist, a file per worker at a time) starts them at once instead of leaving one to run alone at the end."""


def _longest_first(items: list[pytest.Item]) -> None:
    """Stable reorder of ``items``: the files of LONGEST_FILES first, in its order; the rest keep theirs."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    root = Path(__file__).resolve().parent.parent

    def key(item: pytest.Item) -> int:
        try:
            rel = Path(str(item.path)).resolve().relative_to(root).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(rel, len(rank))

    items.sort(key=key)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _longest_first(items)
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    skip_gpu = None if _cuda_available() else pytest.mark.skip(reason="needs a CUDA device; none is present")
    skip_trt = None if _tensorrt_available() else pytest.mark.skip(
        reason="needs TensorRT; `tensorrt` is not importable here (pip install 'catome-export[trt]' on a GPU machine)")
    for item in items:
        if skip_gpu is not None and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
        if skip_trt is not None and item.get_closest_marker("trt") is not None:
            item.add_marker(skip_trt)


def _load_helper(name: str) -> ModuleType:
    """tests/<name>.py as the module ``name`` (``from factories import make_manifest``, ``from checkpoints import
    ldm_unet_state_dict`` in any test)."""
    if name not in sys.modules:
        path = Path(__file__).resolve().parent / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


_load_helper("factories")
_load_helper("checkpoints")


def _trt_standin_helper() -> ModuleType:
    """tests/standins/trt_standin.py, loaded once by path (the test folders are not packages)."""
    name = "catome_tests_trt_standin"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent / "standins" / "trt_standin.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


@pytest.fixture
def trt_standin_helper() -> ModuleType:
    """The stand-in's helper module (``activate``, ``deactivate``, ``subprocess_env``, ``build_plan``, ``VERSIONS``)."""
    return _trt_standin_helper()


def _standin(monkeypatch: pytest.MonkeyPatch, major: str) -> Iterator[ModuleType]:
    helper = _trt_standin_helper()
    trt = helper.activate(monkeypatch, major)
    from tensorrt import _runtime

    _runtime.ENQUEUES.clear()
    yield trt
    helper.deactivate()


@pytest.fixture(params=["10", "11"], ids=["trt10", "trt11"])
def tensorrt_standin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The stand-in imported as ``tensorrt``, once playing TensorRT 10.13 and once 11.1."""
    yield from _standin(monkeypatch, request.param)


@pytest.fixture
def trt_machine(tensorrt_standin: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    """A machine with the stand-in TensorRT (10 and 11) and its one GPU (CUDA presence faked: no GPU here); per-user
    cache in tmp."""
    from catome_export.backends import select
    from catome_export.export import trt_build

    monkeypatch.setattr(select, "_cuda_available", lambda: True)
    monkeypatch.setattr(trt_build, "gpu_info", lambda: ("Stand-in GPU (sm90)", "9.0"))
    monkeypatch.setenv("CATOME_EXPORT_CACHE", str(tmp_path / "user-cache"))
    return tensorrt_standin


@pytest.fixture
def tensorrt10(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield from _standin(monkeypatch, "10")


@pytest.fixture
def tensorrt11(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield from _standin(monkeypatch, "11")


@pytest.fixture(scope="session")
def tiny_unet() -> torch.nn.Module:
    """The tiny U-Net with seeded random weights (session-wide; do not leave it patched)."""
    from catome_export.models import load_unet

    return load_unet("tiny", "random")


@pytest.fixture
def fresh_tiny_unet() -> torch.nn.Module:
    """A tiny U-Net of its own for a test that changes the model."""
    from catome_export.models import load_unet

    return load_unet("tiny", "random")


def make_smooth_latents(batch: int = 2, size: tuple[int, int] = (16, 16), seed: int = 0, kernel: int = 5,
                        scale: float = 3.0) -> torch.Tensor:
    """Seeded blurred random latents [batch, 4, h, w] (box blur of ``kernel``, rescaled by ``scale``)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, size[0], size[1], generator=gen)
    blurred = torch.nn.functional.avg_pool2d(noise, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return blurred * scale


def make_text_embeddings(batch: int = 2, length: int = 77, dim: int = 32, seed: int = 1) -> torch.Tensor:
    """Seeded random text embeddings [batch, length, dim]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, dim, generator=gen)


@pytest.fixture(scope="session")
def smooth_latents() -> Callable[..., torch.Tensor]:
    """``make_smooth_latents(batch=2, size=(16, 16), seed=0, kernel=5, scale=3.0)``."""
    return make_smooth_latents


@pytest.fixture(scope="session")
def text_embeddings() -> Callable[..., torch.Tensor]:
    """``make_text_embeddings(batch=2, length=77, dim=32, seed=1)``."""
    return make_text_embeddings


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The whole session on one torch thread, set before any fixture computes a reference.

    The tiny model gains nothing from more threads, ONNX Runtime sessions add
    their own, and bit-exact comparisons need the same thread count on both sides.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """The tiny ONNX Runtime engine (128..192 px, batch 1..2, built without verification), once per session.

    Read-only for tests: those that damage an engine work on a copy.
    """
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from catome_export.workflows.build import build_engine

    folder = tmp_path_factory.getbasetemp() / "tiny-engine-128-192"
    if not (folder / "manifest.json").is_file():
        build_engine("tiny", backend="ort", min_resolution=128, max_resolution=192, min_batch=1, max_batch=2,
                     out_dir=folder, verify=False)
    return folder
