"""The merge plan: the index tensors that describe one merge at one site.

A :class:`MergePlan` is data, computed by the controller (``match_tokens``)
and passed in: the eager patch calls :meth:`MergePlan.merge` and
:meth:`MergePlan.unmerge` on it, and every exported stage takes its five
tensors as graph inputs and calls the very same two functions
(:func:`merge_tokens`, :func:`unmerge_tokens`).

Tensor contract (B = batch, N = tokens, r = merged tokens, K = N - r kept,
R = max(r, 1) rows of the src tensors):

==============  =========  =======  ==============================================
tensor          shape      dtype    meaning
==============  =========  =======  ==============================================
``keep_idx``    [B, K]     int64    token rows that form the merged sequence:
                                    unmerged src in edge order, then every dst
``src_idx``     [B, R]     int64    token rows of the merged src tokens
``slot_idx``    [B, R]     int64    slot (0..K-1) of the merged sequence that each
                                    merged src is added into (its dst)
``weight``      [B, K]     float32  1 / (1 + number of src merged into the slot)
``unmerge_idx`` [B, N]     int64    slot of the merged sequence whose output each
                                    token takes on unmerge
==============  =========  =======  ==============================================

merge(x)   = (gather(x, keep_idx) + scatter_add(slot_idx, gather(x, src_idx))) * weight
unmerge(y) = gather(y, unmerge_idx)

r = 0 (nothing merged) is one exact self-merge, so that no plan tensor is
ever empty and every ``R`` dim a compiled graph sees is at least 1:
``keep_idx = unmerge_idx = arange(N)``, ``src_idx = slot_idx = [[0]]`` per
batch item, ``weight`` 1 everywhere but 1/2 on slot 0. Slot 0 is then
``(x0 + x0) * 0.5 = x0``, bit-exact (see :meth:`MergePlan.identity`), so an
unmerged site is exact in the graphs; the eager path skips merge and unmerge
altogether for such a plan (:attr:`MergePlan.is_identity`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from catome_export.errors import CatomeError

PLAN_TENSORS = ("keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx")
"""Names of the plan tensors, in graph-input order."""


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], idx [B, M] -> x[b, idx[b, m], :] as [B, M, C]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def merge_tokens(
    x: torch.Tensor,
    keep_idx: torch.Tensor,
    src_idx: torch.Tensor,
    slot_idx: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Merge [B, N, C] tokens into [B, N - r, C] (mean of each dst and its src)."""
    kept = _gather_rows(x, keep_idx)
    src = _gather_rows(x, src_idx)
    index = slot_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    summed = kept.scatter_add(1, index, src)
    return summed * weight.unsqueeze(-1).to(summed.dtype)


def unmerge_tokens(y: torch.Tensor, unmerge_idx: torch.Tensor) -> torch.Tensor:
    """Unmerge [B, N - r, C] back to [B, N, C]: each token takes its slot's row."""
    return _gather_rows(y, unmerge_idx)


@dataclass(frozen=True)
class MergePlan:
    """Index tensors of one merge (see the module docstring for the contract)."""

    keep_idx: torch.Tensor
    """[B, N - r] int64: rows of x that form the merged sequence, in order."""
    src_idx: torch.Tensor
    """[B, r] int64: rows of x merged into a dst."""
    slot_idx: torch.Tensor
    """[B, r] int64: the merged-sequence slot each merged src adds into."""
    weight: torch.Tensor
    """[B, N - r] float32: 1 / (1 + count) per slot (1 for unmerged src)."""
    unmerge_idx: torch.Tensor
    """[B, N] int64: the merged-sequence slot each token reads on unmerge."""
    num_merged: int
    """r, the number of tokens merged away (same for every batch item)."""

    @property
    def batch_size(self) -> int:
        return int(self.unmerge_idx.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.unmerge_idx.shape[1])

    @property
    def num_kept(self) -> int:
        return self.num_tokens - self.num_merged

    @property
    def is_identity(self) -> bool:
        """True for r = 0: merge and unmerge leave the tokens as they are."""
        return self.num_merged == 0

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The plan tensors in :data:`PLAN_TENSORS` order (graph-input order)."""
        return tuple(getattr(self, name) for name in PLAN_TENSORS)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N - r, C]."""
        if self.is_identity:
            return x
        return merge_tokens(x, self.keep_idx, self.src_idx, self.slot_idx, self.weight)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, N - r, C] -> [B, N, C]."""
        if self.is_identity:
            return y
        return unmerge_tokens(y, self.unmerge_idx)

    def to(self, device: torch.device | str) -> "MergePlan":
        """The same plan with its tensors on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in PLAN_TENSORS:
            moved[name] = moved[name].to(device)
        return MergePlan(**moved)

    @property
    def num_src_rows(self) -> int:
        """R, the rows of ``src_idx`` / ``slot_idx``: r, or 1 for the r = 0 self-merge."""
        return max(self.num_merged, 1)

    @classmethod
    def identity(cls, batch_size: int, num_tokens: int, device: torch.device | str = "cpu") -> "MergePlan":
        """The r = 0 plan: nothing merged, written as one exact self-merge.

        Token 0 is kept in slot 0 and also added into that slot as the only
        "merged" src, with weight 1/2 there and 1 elsewhere; ``num_merged`` is
        0, ``keep_idx`` and ``unmerge_idx`` are ``arange(N)``. No tensor is
        empty, so a compiled graph never sees a zero-sized binding (every
        ``R`` dim is at least 1), and merge is still exact: slot 0 becomes
        ``(x0 + x0) * 0.5``, which equals ``x0`` bit for bit in float32,
        float16 and bfloat16 (doubling and halving only change the exponent;
        signed zeros, subnormals and infinities come back bit for bit, a NaN
        stays a NaN). The one exception is overflow of ``x0 + x0``: ``|x0| > 32752``
        in float16 (half its largest finite value, 65504), above about
        1.70e38 in float32 and 1.69e38 in bfloat16, where slot 0 becomes
        infinite. The eager path does not compute this at all
        (:attr:`is_identity` short-cuts merge and unmerge).
        """
        if batch_size < 1 or num_tokens < 1:
            raise CatomeError(f"identity plan needs batch >= 1 and tokens >= 1, got {batch_size} and {num_tokens}")
        ar = torch.arange(num_tokens, device=device, dtype=torch.int64).expand(batch_size, -1).contiguous()
        first = torch.zeros(batch_size, 1, dtype=torch.int64, device=device)
        weight = torch.ones(batch_size, num_tokens, dtype=torch.float32, device=device)
        weight[:, 0] = 0.5
        return cls(
            keep_idx=ar,
            src_idx=first,
            slot_idx=first.clone(),
            weight=weight,
            unmerge_idx=ar.clone(),
            num_merged=0,
        )

    def validate(self, batch_size: int | None = None, num_tokens: int | None = None) -> None:
        """Check shapes, dtypes, ranges and counts; raise :class:`CatomeError` if any is off.

        This is what stands between a plan and a compiled graph: a plan that
        passes cannot make a graph read out of bounds. It reads a few scalars
        back from the device, so the controller runs it when a plan is made
        (checkpoint steps), not on steps that reuse a cached plan.
        """
        name = "merge plan"
        for field_name in PLAN_TENSORS:
            t = getattr(self, field_name)
            if not isinstance(t, torch.Tensor) or t.ndim != 2:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CatomeError(f"{name}: {field_name} must be a 2-D [batch, count] tensor, got {shape}")
        b, n, r = self.batch_size, self.num_tokens, self.num_merged
        if batch_size is not None and b != batch_size:
            raise CatomeError(f"{name}: batch {b} does not match the input batch {batch_size}")
        if num_tokens is not None and n != num_tokens:
            raise CatomeError(f"{name}: {n} tokens does not match the input's {num_tokens} tokens")
        if not 0 <= r < n or n <= 0:
            raise CatomeError(f"{name}: merged count r={r} must be in [0, {n}) for {n} tokens")
        k, rows = n - r, max(r, 1)
        expect = {
            "keep_idx": ((b, k), torch.int64),
            "src_idx": ((b, rows), torch.int64),
            "slot_idx": ((b, rows), torch.int64),
            "weight": ((b, k), torch.float32),
            "unmerge_idx": ((b, n), torch.int64),
        }
        device = self.unmerge_idx.device
        for field_name, (shape, dtype) in expect.items():
            t = getattr(self, field_name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                hint = (" (r = 0 is one self-merge with [B, 1] src tensors: build it with MergePlan.identity)"
                        if r == 0 and field_name in ("src_idx", "slot_idx") else "")
                raise CatomeError(
                    f"{name}: {field_name} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}{hint}"
                )
            if t.device != device:
                raise CatomeError(f"{name}: {field_name} is on {t.device}, the plan is on {device}")
        checks = torch.stack(
            [
                ((self.keep_idx < 0) | (self.keep_idx >= n)).any(),
                ((self.src_idx < 0) | (self.src_idx >= n)).any(),
                ((self.slot_idx < 0) | (self.slot_idx >= k)).any(),
                ((self.unmerge_idx < 0) | (self.unmerge_idx >= k)).any(),
                ~torch.isfinite(self.weight).all() | (self.weight <= 0).any() | (self.weight > 1).any(),
            ]
        ).tolist()
        labels = ("keep_idx out of [0, N)", "src_idx out of [0, N)", "slot_idx out of [0, N-r)",
                  "unmerge_idx out of [0, N-r)", "weight outside (0, 1]")
        for bad, label in zip(checks, labels):
            if bad:
                raise CatomeError(f"{name}: {label}")
        seen = torch.zeros(b, n, dtype=torch.int64, device=device)
        seen.scatter_add_(1, self.keep_idx, torch.ones_like(self.keep_idx))
        if r == 0:
            # The self-merge: every token kept once, and the one src row is the kept token of its own slot.
            if not bool((seen == 1).all()):
                raise CatomeError(f"{name}: keep_idx must hold every token exactly once when r = 0")
            if not bool((self.src_idx == self.keep_idx.gather(1, self.slot_idx)).all()):
                raise CatomeError(f"{name}: with r = 0 the one src row must be the kept token of its own slot "
                                  "(a self-merge, as MergePlan.identity builds it), not a second copy of "
                                  "another token")
        else:
            # Every token is either kept or merged, exactly once.
            seen.scatter_add_(1, self.src_idx, torch.ones_like(self.src_idx))
            if not bool((seen == 1).all()):
                raise CatomeError(f"{name}: keep_idx and src_idx must cover every token exactly once")
        # Unmerge reads back what merge wrote: a kept token its own slot, a merged src its dst's slot.
        own_slot = torch.arange(k, device=device).expand(b, -1)
        if not bool((self.unmerge_idx.gather(1, self.keep_idx) == own_slot).all()) or \
                not bool((self.unmerge_idx.gather(1, self.src_idx) == self.slot_idx).all()):
            raise CatomeError(f"{name}: unmerge_idx does not send every token back to the slot it was merged into")
        # Each slot is the mean of its token and the src added into it.
        counts = torch.ones(b, k, dtype=torch.float32, device=device)
        counts.scatter_add_(1, self.slot_idx, torch.ones(b, rows, dtype=torch.float32, device=device))
        if not torch.allclose(self.weight * counts, torch.ones_like(counts), rtol=0.0, atol=1e-5):
            raise CatomeError(f"{name}: weight is not 1 / (1 + number of src merged into the slot)")
