"""The stand-in's serialized plans and timing caches: a magic tag, then JSON of what was built.

Not part of TensorRT's API. Tests read a plan with :func:`describe_plan` to
assert on what a build produced (profiles, flags, typing, version), never on
the calls that produced it.
"""

from __future__ import annotations

import json
from typing import Any

PLAN_MAGIC = b"trt-standin-plan\x00"
CACHE_MAGIC = b"trt-standin-timing-cache\x00"


def _encode(magic: bytes, payload: dict[str, Any]) -> bytes:
    return magic + json.dumps(payload, sort_keys=True).encode()


def _decode(magic: bytes, data: Any) -> dict[str, Any] | None:
    raw = bytes(memoryview(data))
    if not raw.startswith(magic):
        return None
    try:
        payload = json.loads(raw[len(magic):].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def encode_plan(payload: dict[str, Any]) -> bytes:
    return _encode(PLAN_MAGIC, payload)


def decode_plan(data: Any) -> dict[str, Any] | None:
    return _decode(PLAN_MAGIC, data)


def encode_cache(payload: dict[str, Any]) -> bytes:
    return _encode(CACHE_MAGIC, payload)


def decode_cache(data: Any) -> dict[str, Any] | None:
    return _decode(CACHE_MAGIC, data)


def describe_plan(data: Any) -> dict[str, Any]:
    """What a stand-in plan holds: ``version``, ``device``, ``strongly_typed``, ``builder_flags``, ``io``,
    ``profiles``, ``plugins``, ``fp16_kernels``, ... Raises ValueError for bytes that are not a stand-in plan."""
    payload = decode_plan(data)
    if payload is None:
        raise ValueError("not a plan of the TensorRT stand-in")
    return payload


def describe_timing_cache(data: Any) -> dict[str, Any]:
    """``version``, ``device`` and ``entries`` of a serialized stand-in timing cache (ValueError otherwise)."""
    payload = decode_cache(data)
    if payload is None:
        raise ValueError("not a timing cache of the TensorRT stand-in")
    return payload
