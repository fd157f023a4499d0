"""The pieces the eager patch installs around a merge site's attention and MLP.

The plan of the U-Net call in progress travels as data: each merge site has
a :class:`SiteSlot` that the block's forward pre-hook fills with the
controller's :class:`~catome_export.merging.MergePlan` and clears after the
block. :class:`MergingAttnProcessor` wraps the attention processor object the
module already had (so the attention implementation stays the user's) and
merges the query tokens before it and unmerges its output after it.
:class:`FeedForwardMerger` does the same around the feed-forward module with
a forward pre-hook and a forward hook.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from catome_export.errors import CatomeError
from catome_export.merging import MergePlan
from catome_export.models.sites import MergeSite


@dataclass
class SiteSlot:
    """The plan of one merge site for the block call in progress (None outside a block call)."""

    site: MergeSite
    """The merge site this slot belongs to."""
    plan: MergePlan | None = None
    """Filled by the block's forward pre-hook, cleared by its forward hook."""
    on_missing_plan: Callable[[], None] | None = None
    """Called when a processor or hook finds no plan (its block's pre-hook did not run): raises when the patch
    was taken apart by someone else."""

    def take(self) -> MergePlan | None:
        if self.plan is None and self.on_missing_plan is not None:
            self.on_missing_plan()
        return self.plan


def _check_tokens(plan: MergePlan, hidden_states: torch.Tensor, where: str) -> None:
    if hidden_states.ndim != 3 or hidden_states.shape[0] != plan.batch_size or hidden_states.shape[1] != plan.num_tokens:
        raise CatomeError(
            f"{where} received hidden states of shape {tuple(hidden_states.shape)}, but the merge plan is for "
            f"[{plan.batch_size}, {plan.num_tokens}, C]. Token merging needs the whole token sequence in one call: "
            "disable feed-forward chunking (unet.disable_forward_chunking()) or apply merging without merge_mlp"
        )


class _SignatureOf:
    """A callable that reports another callable's signature.

    diffusers' ``Attention.forward`` inspects ``processor.__call__`` to decide
    which ``cross_attention_kwargs`` to pass on. Exposing the wrapped
    processor's own signature keeps that filtering exactly as it was.
    """

    def __init__(self, fn: Callable[..., Any], signature: inspect.Signature) -> None:
        self._fn = fn
        self.__signature__ = signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


class MergingAttnProcessor:
    """Wraps an attention processor: ``unmerge(inner(attn, merge(hidden_states), ...))``.

    ``role`` is ``"attn1"`` (self-attention: queries, keys and values are the
    merged tokens) or ``"attn2"`` (cross-attention: only the queries are
    merged; ``encoder_hidden_states`` pass unchanged). With no plan in the
    slot, or an identity plan, the call goes to the wrapped processor as is.
    """

    def __init__(self, inner: Any, slot: SiteSlot, role: str) -> None:
        if role not in ("attn1", "attn2"):
            raise ValueError(f"role must be attn1 or attn2, got {role!r}")
        self.inner = inner
        self.slot = slot
        self.role = role
        try:
            signature = inspect.signature(inner.__call__)
        except (TypeError, ValueError):  # a builtin without a signature: fall back to ours
            signature = inspect.signature(self._merged_call)
        # Instance attribute: what `processor.__call__` (and so diffusers' kwargs filter) sees.
        self.__call__ = _SignatureOf(self._merged_call, signature)

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._merged_call(attn, hidden_states, *args, **kwargs)

    def _merged_call(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        plan = self.slot.take()
        if plan is None or plan.is_identity:
            return self.inner(attn, hidden_states, *args, **kwargs)
        _check_tokens(plan, hidden_states, f"{self.slot.site.path}.{self.role}")
        if self.role == "attn1":
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            if mask is not None:
                raise CatomeError(
                    f"{self.slot.site.path}.attn1 got an attention mask over image tokens, which token merging "
                    "cannot follow: run without the mask or without merging"
                )
        out = self.inner(attn, plan.merge(hidden_states), *args, **kwargs)
        return plan.unmerge(out)

    def __repr__(self) -> str:
        return f"MergingAttnProcessor({self.slot.site.path}.{self.role}, inner={self.inner!r})"


class FeedForwardMerger:
    """Forward pre-hook and hook for a block's feed-forward module: merge its input, unmerge its output."""

    def __init__(self, slot: SiteSlot) -> None:
        self.slot = slot

    def pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan = self.slot.take()
        if plan is None or plan.is_identity:
            return None
        if args:
            hidden_states, rest = args[0], args[1:]
            _check_tokens(plan, hidden_states, f"{self.slot.site.path}.ff")
            return (plan.merge(hidden_states), *rest), kwargs
        if "hidden_states" in kwargs:
            _check_tokens(plan, kwargs["hidden_states"], f"{self.slot.site.path}.ff")
            return args, {**kwargs, "hidden_states": plan.merge(kwargs["hidden_states"])}
        raise CatomeError(f"{self.slot.site.path}.ff was called without hidden states: cannot merge its tokens")

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        plan = self.slot.plan
        if plan is None or plan.is_identity:
            return None
        return plan.unmerge(output)
