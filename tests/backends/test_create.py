"""``create_backend``: the chosen backend, its device and options, and clear errors."""

from __future__ import annotations

import pytest
import torch

from catome_export.backends import BackendChoice, create_backend
from catome_export.errors import CatomeError
from factories import make_manifest

ORT_MANIFEST = make_manifest()


def test_ort_cpu_backend_with_options():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    backend = create_backend(BackendChoice("ort-cpu", "test"), ORT_MANIFEST, options={"intra_op_threads": 1})
    assert backend.name == "ort-cpu" and backend.device == torch.device("cpu")
    assert backend.options.intra_op_threads == 1
    backend.close()


def test_device_and_option_errors():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    with pytest.raises(CatomeError, match="runs on cpu"):
        create_backend(BackendChoice("ort-cpu", "test"), ORT_MANIFEST, device="cuda")
    with pytest.raises(CatomeError, match="unknown ONNX Runtime options"):
        create_backend(BackendChoice("ort-cpu", "test"), ORT_MANIFEST, options={"threads": 1})
    with pytest.raises(CatomeError, match="takes no options"):
        create_backend(BackendChoice("torch", "test"), ORT_MANIFEST, options={"intra_op_threads": 1})
    with pytest.raises(CatomeError, match="unknown device"):
        create_backend(BackendChoice("torch", "test"), ORT_MANIFEST, device="gpu7")


def test_trt_needs_an_engine_folder_with_plans():
    with pytest.raises(CatomeError, match="no TensorRT plans.*--engine-kind trt"):
        create_backend(BackendChoice("trt", "test"), ORT_MANIFEST)


def test_torch_backend_without_manifest_or_stages_is_refused():
    with pytest.raises(CatomeError, match="needs a manifest"):
        create_backend(BackendChoice("torch", "test"), None, device="cpu")


def test_unknown_backend_name():
    with pytest.raises(CatomeError, match="unknown backend"):
        create_backend(BackendChoice("tvm", "test"), ORT_MANIFEST)
