"""``create_backend``: the chosen backend, its device and options, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from catome_export.backends import BackendChoice, create_backend
from catome_export.errors import CatomeError
from catome_export.engine.engine import Engine
from factories import make_manifest

ORT_ENGINE = Engine(Path("engines/tiny"), make_manifest())


def test_ort_cpu_backend_with_options():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    backend = create_backend(BackendChoice("ort-cpu", "test"), ORT_ENGINE, options={"intra_op_threads": 1})
    assert backend.name == "ort-cpu" and backend.device == torch.device("cpu")
    assert backend.options.intra_op_threads == 1
    backend.close()


def test_device_and_option_errors():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    with pytest.raises(CatomeError, match="runs on cpu"):
        create_backend(BackendChoice("ort-cpu", "test"), ORT_ENGINE, device="cuda")
    with pytest.raises(CatomeError, match="unknown ONNX Runtime options"):
        create_backend(BackendChoice("ort-cpu", "test"), ORT_ENGINE, options={"threads": 1})
    with pytest.raises(CatomeError, match="takes no options"):
        create_backend(BackendChoice("torch", "test"), ORT_ENGINE, options={"intra_op_threads": 1})
    with pytest.raises(CatomeError, match="unknown device"):
        create_backend(BackendChoice("torch", "test"), ORT_ENGINE, device="gpu7")


def test_trt_needs_an_engine_folder_with_plans():
    with pytest.raises(CatomeError, match="no TensorRT plans.*--engine-kind trt"):
        create_backend(BackendChoice("trt", "test"), ORT_ENGINE)


def test_backend_without_an_engine_is_refused():
    with pytest.raises(CatomeError, match="expected an engine folder"):
        create_backend(BackendChoice("torch", "test"), None, device="cpu")


def test_unknown_backend_name():
    with pytest.raises(CatomeError, match="unknown backend"):
        create_backend(BackendChoice("tvm", "test"), ORT_ENGINE)
