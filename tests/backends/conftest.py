"""Fixtures of the backend tests: the ``tensorrt`` stand-in, playing TensorRT 10.x or 11.x, with real Polygraphy."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

_STANDINS = Path(__file__).resolve().parents[1] / "standins"


def _helper() -> ModuleType:
    """tests/standins/trt_standin.py, loaded by path (the test folders are not packages)."""
    name = "catome_tests_trt_standin"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _STANDINS / "trt_standin.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


@pytest.fixture
def trt_standin_helper() -> ModuleType:
    """The helper module (``activate``, ``deactivate``, ``subprocess_env``, ``VERSIONS``)."""
    return _helper()


@pytest.fixture(params=["10", "11"], ids=["trt10", "trt11"])
def tensorrt_standin(request, monkeypatch) -> Iterator[ModuleType]:
    """The stand-in imported as ``tensorrt``, once playing TensorRT 10.13 and once 11.1."""
    helper = _helper()
    module = helper.activate(monkeypatch, request.param)
    yield module
    helper.deactivate()


@pytest.fixture
def tensorrt10(monkeypatch) -> Iterator[ModuleType]:
    helper = _helper()
    yield helper.activate(monkeypatch, "10")
    helper.deactivate()


@pytest.fixture
def tensorrt11(monkeypatch) -> Iterator[ModuleType]:
    helper = _helper()
    yield helper.activate(monkeypatch, "11")
    helper.deactivate()
