"""Names of dtypes to torch dtypes, in one place: precisions (``fp32``/``float32``, ``fp16``/``float16``,
``bf16``/``bfloat16``, and ``auto`` for a device's own) and the element types of graph IO (``float32``, ``float16``,
``int64``). :func:`precision_dtype` is the one function that turns a precision into a torch dtype."""

from __future__ import annotations

from typing import Sequence

import torch

from catome_export.errors import CatomeError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Short precision names, as the CLI and the manifest spell them."""

ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
"""torch's spelling of the same precisions."""

ELEMENT_TYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
"""Element types of graph inputs and outputs, as the manifest names them."""


AUTO = "auto"
"""The precision that follows the device: fp16 on a CUDA device, fp32 elsewhere."""


def precision_dtype(name: str | torch.dtype | None, allowed: Sequence[str] = tuple(DTYPES), error: str | None = None,
                    *, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype of ``name``: a short name or torch's spelling (a ``torch.dtype`` is returned as it is).

    ``auto`` (or None), where ``allowed`` has it: float16 when ``device`` is a CUDA device, else float32.
    A name outside ``allowed`` (short names) is a CatomeError: ``error`` when given, else one that lists them.
    """
    if isinstance(name, torch.dtype):
        return name
    if (name is None or name == AUTO) and AUTO in allowed:
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return torch.float16 if on_cuda else torch.float32
    short = ALIASES.get(name, name) if isinstance(name, str) else name
    if isinstance(short, str) and short in allowed and short in DTYPES:
        return DTYPES[short]
    listed = ", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
    raise CatomeError(error or f"unknown dtype {name!r}: use {listed}")
