"""BenchConfig validation: every wrong input is a CatomeError that says what to do."""

from __future__ import annotations

import pytest

from catome_export.bench.config import BenchConfig
from catome_export.errors import CatomeError


def test_defaults_are_valid():
    cfg = BenchConfig()
    assert cfg.backends == ("eager", "eager-catome", "engine")
    assert cfg.interleave and cfg.checkpoint_calls == cfg.repeats == 5  # one checkpoint call per round
    assert BenchConfig(interleave=False).checkpoint_calls == 3
    assert BenchConfig(interleave=False, repeats=2).checkpoint_calls == 2
    assert BenchConfig(interleave=False, checkpoint_repeats=0).checkpoint_calls == 0
    d = BenchConfig(resolutions=[128], merge_fractions=[0, 1]).to_dict()
    assert d["resolutions"] == [128] and d["merge_fractions"] == [0.0, 1.0]


@pytest.mark.parametrize("kwargs,match", [
    ({"backends": ("eager", "fast")}, "unknown backends"),
    ({"backends": ()}, "at least one backend"),
    ({"backends": ("eager", "eager")}, "twice"),
    ({"resolutions": (100,)}, "multiple of 8"),
    ({"resolutions": (8,)}, "at least 16"),
    ({"merge_fractions": (1.5,)}, r"\[0, 1\]"),
    ({"merge_fractions": ()}, "at least one merge fraction"),
    ({"threshold": 2.0}, "threshold"),
    ({"weights": "imagenet"}, "weights"),
    ({"latents": "zeros"}, "latents"),
    ({"precision": "fp16"}, "CUDA device"),
    ({"precision": "int8"}, "fp32 or fp16"),
    ({"device": "tpu"}, "cpu, cuda or cuda:N"),
    ({"batch": 0}, "batch"),
    ({"repeats": 0}, "repeats"),
    ({"threads": 0}, "threads"),
    ({"steps": -1}, "steps"),
    ({"ort_options": (("intra_op_threads", 4),)}, "--threads"),
    ({"ort_options": (("warp_speed", True),)}, "unknown ONNX Runtime options"),
    ({"profile_dir": "/tmp/p", "device": "cuda"}, "--device cpu"),
])
def test_bad_values(kwargs, match):
    with pytest.raises(CatomeError, match=match):
        BenchConfig(**kwargs)


def test_threshold_alone_is_enough():
    cfg = BenchConfig(merge_fractions=(), threshold=0.7)
    assert cfg.merge_fractions == () and cfg.threshold == 0.7


def test_r_multiple():
    assert BenchConfig().r_multiple == 1 and BenchConfig(r_multiple=64).to_dict()["r_multiple"] == 64
    for bad in (0, 1.5, True):
        with pytest.raises(CatomeError, match="r_multiple must be an int >= 1"):
            BenchConfig(r_multiple=bad)
