"""A context manager that runs torch on fewer intra-op threads for a while.

Tracing and shape inference run many tiny ops at small example shapes; with
several OpenMP threads each op pays for waking and spinning them, which made
a stage export about four times slower on a 2-core machine than with one
thread (and far worse when the CPU is shared).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """Use ``count`` torch intra-op threads inside the block, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
