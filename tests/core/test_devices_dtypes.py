"""The one device resolver and the one precision table."""

from __future__ import annotations

import pytest
import torch

from catome_export.devices import parse_device, resolve_device
from catome_export.dtypes import ELEMENT_TYPES, precision_dtype
from catome_export.errors import CatomeError


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CatomeError, match="unknown device 'gpu0': use auto, cpu or cuda"):
        resolve_device("gpu0")
    with pytest.raises(CatomeError, match="unsupported device 'meta'"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(CatomeError, match="no CUDA device is usable here.*--device cpu"):
            resolve_device("cuda:0")
    assert parse_device("cuda:1") == torch.device("cuda", 1)  # parsing alone does not need the device


def test_precision_dtype():
    assert precision_dtype("fp32") is precision_dtype("float32") is torch.float32
    assert precision_dtype("fp16") is precision_dtype("float16") is torch.float16
    assert precision_dtype("bf16") is precision_dtype("bfloat16") is torch.bfloat16
    assert precision_dtype(torch.float64) is torch.float64  # a dtype passes through
    with pytest.raises(CatomeError, match=r"unknown dtype 'int8': use fp32, fp16 or bf16"):
        precision_dtype("int8")
    with pytest.raises(CatomeError, match=r"use fp32 or fp16"):
        precision_dtype("bf16", ("fp32", "fp16"))
    with pytest.raises(CatomeError, match="rebuild"):
        precision_dtype("fp8", ("fp32", "fp16"), "unknown engine precision 'fp8': rebuild")
    assert precision_dtype("auto", ("auto", "fp32"), device="cpu") is torch.float32
    assert precision_dtype(None, ("auto", "fp32"), device=torch.device("cpu")) is torch.float32
    assert precision_dtype("auto", ("auto", "fp16"), device="cuda:1") is torch.float16  # named, not used: no GPU needed
    with pytest.raises(CatomeError, match=r"use fp32, fp16 or bf16"):
        precision_dtype("auto", device="cuda")  # auto only where the caller allows it
    assert ELEMENT_TYPES == {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
