"""Eager CA-ToMe for a diffusers U-Net or pipeline, without copying any forward.

What :func:`apply_merging` installs, and :meth:`CatomeHandle.remove` undoes:

- a forward pre-hook on the U-Net: reads the latent size and the timestep of
  each call and starts one controller step (one U-Net call = one step);
- per merge site, a forward pre-hook on the ``BasicTransformerBlock`` that
  hands the block input ``x`` (before ``norm1``, the similarity metric) to the
  shared :class:`~catome_export.merging.MergeController` and puts the plan it
  returns in the site's slot, and a forward hook that clears the slot;
- per merge site, a :class:`~catome_export.eager.processors.MergingAttnProcessor`
  around the ``attn1`` processor object the module had (and ``attn2`` with
  ``merge_crossattn``), set with diffusers' own ``set_processor``;
- with ``merge_mlp``, hooks on the block's ``ff`` that merge and unmerge;
- :meth:`CatomeHandle.set_matcher` hands the sites given plans in place of
  their own matching (a reference run on an engine's plans); the caching
  rules stay as they are;
- for a pipeline, a wrapper on the instance's ``progress_bar`` method, which
  diffusers pipelines call exactly once per ``pipe(...)`` call right before the
  denoising loop: it resets the handle, so every generation starts at step 0
  with empty caches, whatever its timesteps.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import torch

from catome_export.checks import check_int
from catome_export.eager._handle import PatchHandle
from catome_export.eager.processors import FeedForwardMerger, MergingAttnProcessor, SiteSlot
from catome_export.defaults import (
    DEFAULT_MERGE_SEED, DEFAULT_R_MULTIPLE, DEFAULT_RATIO, DEFAULT_SCHEDULE, DEFAULT_STEP_BASE, DEFAULT_STRIDE,
    DEFAULT_THRESHOLD,
)
from catome_export.errors import CatomeError
from catome_export.merging import MergeController, MergeSettings, StepRecord, parse_schedule
from catome_export.merging.controller import PlanMatcher
from catome_export.merging.steps import ResetOnCall
from catome_export.models.sites import MergeSite, default_merge_level, find_merge_sites

logger = logging.getLogger(__name__)



def split_target(pipe_or_unet: Any) -> tuple[Any | None, torch.nn.Module]:
    """(pipeline or None, U-Net) of the argument; CatomeError for anything else."""
    from diffusers import UNet2DConditionModel

    if isinstance(pipe_or_unet, UNet2DConditionModel):
        return None, pipe_or_unet
    unet = getattr(pipe_or_unet, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        return pipe_or_unet, unet
    raise CatomeError(
        f"expected a diffusers UNet2DConditionModel or a pipeline with one as .unet, got {type(pipe_or_unet).__name__}"
    )


def _timestep_value(timestep: Any) -> float | None:
    """The scalar timestep of a U-Net call (first element of a batched timestep)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


class CatomeHandle(PatchHandle):
    """A live CA-ToMe (or ToMe) patch on one U-Net; ``remove()`` restores the model exactly.

    Use it as a context manager to remove the patch on exit::

        with apply_catome(pipe, threshold=0.7) as handle:
            image = pipe(prompt).images[0]
        print(handle.history[-1].merged)
    """

    _what = "token merging"

    def __init__(self, unet: torch.nn.Module, settings: MergeSettings, sites: Sequence[MergeSite],
                 pipeline: Any | None = None) -> None:
        super().__init__(unet)
        self._settings = settings
        self._sites = tuple(sites)
        self._pipeline = pipeline
        self.controller = MergeController(settings, len(self._sites))
        """The shared per-site plan caches and step numbering."""
        self._slots = [SiteSlot(site, on_missing_plan=self._check_intact) for site in self._sites]
        self._latent_hw: tuple[int, int] | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._hook_places: list[str] = []
        """Where each of ``_hooks`` sits (for the message when one was removed by someone else)."""
        self._processors: list[tuple[torch.nn.Module, Any, MergingAttnProcessor]] = []
        self._progress_bar: ResetOnCall | None = None

    # -- installation -----------------------------------------------------------------
    def _install(self) -> None:
        unet = self._unet
        try:
            self._hook("the U-Net", unet.register_forward_pre_hook(self._unet_pre_hook, with_kwargs=True))
            self._hook("the U-Net", unet.register_forward_hook(self._unet_hook))
            for slot in self._slots:
                block = unet.get_submodule(slot.site.path)
                self._hook(slot.site.path, block.register_forward_pre_hook(_BlockPreHook(self, slot), with_kwargs=True))
                self._hook(slot.site.path, block.register_forward_hook(_BlockHook(slot)))
                self._wrap_processor(block, "attn1", slot)
                if self._settings.merge_crossattn:
                    self._wrap_processor(block, "attn2", slot)
                if self._settings.merge_mlp:
                    ff = getattr(block, "ff", None)
                    if not isinstance(ff, torch.nn.Module):
                        raise CatomeError(f"{slot.site.path} has no feed-forward module: apply without merge_mlp")
                    merger = FeedForwardMerger(slot)
                    where = f"{slot.site.path}.ff"
                    self._hook(where, ff.register_forward_pre_hook(merger.pre_hook, with_kwargs=True))
                    self._hook(where, ff.register_forward_hook(merger.hook, with_kwargs=True))
            if self._pipeline is not None:
                self._wrap_progress_bar(self._pipeline)
        except BaseException:
            self._uninstall()
            raise
        self._register()

    def _hook(self, where: str, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append(handle)
        self._hook_places.append(where)

    def _check_intact(self) -> None:
        """CatomeError, before the call starts a step, when someone else replaced a merging attention processor
        or removed a hook since the patch was applied: merging would be off there while the history said
        otherwise."""
        replaced = [f"{path}.{wrapper.role} (now {type(attn.processor).__name__})"
                    for attn, _, wrapper in self._processors
                    for path in (wrapper.slot.site.path,) if attn.processor is not wrapper]
        removed = sorted({where for where, hook in zip(self._hook_places, self._hooks) if not _hook_present(hook)})
        if not replaced and not removed:
            return
        what = []
        if replaced:
            what.append(f"the merging attention processors of {replaced[0]}"
                        f"{f' and {len(replaced) - 1} more' if len(replaced) > 1 else ''} were replaced")
        if removed:
            what.append(f"the merge hooks on {removed[0]}"
                        f"{f' and {len(removed) - 1} more' if len(removed) > 1 else ''} were removed")
        raise CatomeError(
            f"{' and '.join(what)} after token merging was applied (enable_attention_slicing, set_attn_processor, "
            "fuse_qkv_projections or hook removal do that), so merging would not run there: call handle.remove(), "
            "make the change, then apply merging again")

    def _wrap_processor(self, block: torch.nn.Module, name: str, slot: SiteSlot) -> None:
        attn = getattr(block, name, None)
        if attn is None or not hasattr(attn, "set_processor") or not hasattr(attn, "processor"):
            what = "cross-attention (attn2)" if name == "attn2" else "self-attention (attn1)"
            hint = ": apply without merge_crossattn" if name == "attn2" else ""
            raise CatomeError(f"{slot.site.path} has no {what} with an attention processor{hint}")
        original = attn.processor
        wrapper = MergingAttnProcessor(original, slot, name)
        attn.set_processor(wrapper)
        self._processors.append((attn, original, wrapper))

    def _wrap_progress_bar(self, pipe: Any) -> None:
        self._progress_bar = ResetOnCall.install(pipe, self)
        if self._progress_bar is None:
            logger.warning("%s has no progress_bar method: generations are told apart by rising timesteps only; "
                           "call handle.reset() before each generation", type(pipe).__name__)

    def _uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._hook_places.clear()
        for attn, original, wrapper in reversed(self._processors):
            if attn.processor is wrapper:
                attn.set_processor(original)
            else:
                logger.warning("the attention processor of %s was replaced while merging was applied; "
                               "leaving the new one in place", type(attn).__name__)
        self._processors.clear()
        if self._progress_bar is not None:
            self._progress_bar.remove()
            self._progress_bar = None
        for slot in self._slots:
            slot.plan = None

    # -- hooks ------------------------------------------------------------------------
    def _unet_pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._check_intact()
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
            raise CatomeError("the U-Net was called without a [B, C, H, W] sample: cannot size the merge grids")
        self._latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        self.controller.begin_step(_timestep_value(timestep))

    def _unet_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._latent_hw = None

    def _plan_for_block(self, slot: SiteSlot, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CatomeError(f"{slot.site.path} got hidden states {shape}, expected [B, N, C] tokens")
        if self._latent_hw is None:
            self._check_intact()  # the U-Net's own hook may be gone
            raise CatomeError(f"{slot.site.path} was called outside a U-Net call: call the U-Net itself, "
                              "merging needs the latent size")
        grid = slot.site.grid(self._latent_hw)
        if grid[0] * grid[1] != x.shape[1]:
            raise CatomeError(
                f"{slot.site.path}: the grid {grid[0]}x{grid[1]} of latent {self._latent_hw[0]}x{self._latent_hw[1]} "
                f"does not cover its {x.shape[1]} tokens; this U-Net's layout is not supported by the merge patch"
            )
        slot.plan = self.controller.plan_for(slot.site.index, x, grid)

    # -- public API -------------------------------------------------------------------
    @property
    def settings(self) -> MergeSettings:
        return self._settings

    @property
    def sites(self) -> tuple[MergeSite, ...]:
        return self._sites

    @property
    def unet(self) -> torch.nn.Module:
        return self._unet

    @property
    def history(self) -> list[StepRecord]:
        """Per U-Net call of the current generation: loop index, r per site index, matched flags."""
        return self.controller.history

    @property
    def last_merged(self) -> dict[str, int]:
        """Site module path -> r of the last U-Net call (empty before the first call)."""
        last = self.controller.last
        if last is None:
            return {}
        return {self._sites[i].path: r for i, r in sorted(last.merged.items())}

    def reset(self) -> None:
        """Start a new generation: empty caches, the next U-Net call is loop index 0."""
        self.controller.reset()

    def set_step(self, index: int) -> None:
        """Pin the 0-based loop index of the next U-Net call (custom loops); 0 also starts a new generation."""
        self.controller.set_step(index)

    def set_matcher(self, matcher: PlanMatcher | None) -> None:
        """Give the plans sites use where they match: ``matcher(site_index, x, grid) -> MergePlan``.

        ``x`` is the block input (the metric the site would match on), ``grid``
        the site's token grid at this call. The plan is cached and reused on
        the steps that follow like a matched one; None restores the handle's
        own matching. This is how a reference runs on given plans (e.g. an
        engine's) while still seeing its own block inputs.
        """
        self.controller.set_matcher(matcher)

    def remove(self) -> None:
        """Undo the patch: hooks, processors and wrapped methods as they were. Safe to call twice."""
        was_active = self._active
        super().remove()
        if was_active:
            logger.debug("token merging removed from %d sites", len(self._sites))

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"CatomeHandle({state}, {len(self._sites)} sites, {self._settings.mode}, {self._settings.schedule.describe()})"


def _hook_present(hook: torch.utils.hooks.RemovableHandle) -> bool:
    """Whether a hook is still registered on its module (False once someone removed it or cleared the hooks)."""
    ref = getattr(hook, "hooks_dict_ref", None)
    hooks = ref() if callable(ref) else None
    return hooks is not None and getattr(hook, "id", None) in hooks


class _BlockPreHook:
    """Forward pre-hook of a merge site's block: fills the site's slot with this step's plan."""

    def __init__(self, handle: CatomeHandle, slot: SiteSlot) -> None:
        self.handle = handle
        self.slot = slot

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.handle._plan_for_block(self.slot, args, kwargs)


class _BlockHook:
    """Forward hook of a merge site's block: empties the slot once the block is done."""

    def __init__(self, slot: SiteSlot) -> None:
        self.slot = slot

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.slot.plan = None


# -- entry points ------------------------------------------------------------------------
def refuse_if_patched(unet: torch.nn.Module) -> None:
    CatomeHandle.refuse_if_patched(unet)


def apply_merging(pipe_or_unet: Any, settings: MergeSettings) -> CatomeHandle:
    """Patch a U-Net (or a pipeline's ``.unet``) with token merging as ``settings`` say.

    The common core of :func:`catome_export.apply_catome` and :func:`apply_tome`, and the way
    to build an eager reference with the exact settings of an engine's
    manifest. Applying to a U-Net that already carries a patch raises
    :class:`CatomeError` (remove the first handle before applying again).
    """
    if not isinstance(settings, MergeSettings):
        raise CatomeError(f"settings must be a MergeSettings, got {type(settings).__name__}")
    pipeline, unet = split_target(pipe_or_unet)
    refuse_if_patched(unet)
    sites = find_merge_sites(unet, settings.max_downsample)
    handle = CatomeHandle(unet, settings, sites, pipeline)
    handle._install()
    logger.debug("token merging applied at %d sites: %s, %s", len(sites), settings.mode, settings.schedule.describe())
    return handle


def _merge_level(unet: torch.nn.Module, max_downsample: int | None) -> int:
    """``max_downsample`` as given, or the U-Net's own merge level for None (see :func:`default_merge_level`)."""
    return default_merge_level(unet) if max_downsample is None else max_downsample


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise CatomeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_seed(seed: object) -> int:
    return check_int("seed", seed, 0)


def _check_stride(stride: object) -> tuple[int, int]:
    if isinstance(stride, (str, bytes)) or not isinstance(stride, Iterable):
        raise CatomeError(f"stride must be two positive ints like (2, 2), got {stride!r}")
    return tuple(stride)  # type: ignore[return-value]  # MergeSettings checks the values


def catome_settings(unet: torch.nn.Module, threshold: float, step_base: int = DEFAULT_STEP_BASE,
                    max_downsample: int | None = None, stride: tuple[int, int] = DEFAULT_STRIDE,
                    random_dst: bool = False, merge_crossattn: bool = False, merge_mlp: bool = False,
                    seed: int = DEFAULT_MERGE_SEED, r_multiple: int = DEFAULT_R_MULTIPLE) -> MergeSettings:
    """CA-ToMe settings from :func:`catome_export.apply_catome`'s options, every one checked, with an every-step schedule.

    ``max_downsample`` None: the U-Net's own merge level. (The schedule is
    replaced by the caller's; checking the rest first means a bad option fails
    before a possibly long schedule calibration.)
    """
    if threshold is None:
        raise CatomeError("threshold must be a number in [-1, 1] (1 merges nothing); for a fixed ratio use apply_tome")
    return MergeSettings(
        threshold=threshold, ratio=None, merge_fraction=None, schedule=parse_schedule("every_step", step_base),
        max_downsample=_merge_level(unet, max_downsample), stride=_check_stride(stride),
        random_dst=_check_flag("random_dst", random_dst), seed=_check_seed(seed),
        merge_crossattn=_check_flag("merge_crossattn", merge_crossattn),
        merge_mlp=_check_flag("merge_mlp", merge_mlp), r_multiple=r_multiple,
    )


def refuse_options_with_settings(given: dict[str, Any], defaults: dict[str, Any]) -> None:
    changed = sorted(k for k, v in given.items() if v is not defaults[k] and v != defaults[k])
    if changed:
        raise CatomeError(f"pass either settings= or individual options, not both (got settings and {changed})")


CATOME_DEFAULTS: dict[str, Any] = dict(threshold=DEFAULT_THRESHOLD, schedule=DEFAULT_SCHEDULE, max_downsample=None,
                                       step_base=DEFAULT_STEP_BASE, stride=DEFAULT_STRIDE, random_dst=False,
                                       merge_crossattn=False, merge_mlp=False, seed=DEFAULT_MERGE_SEED,
                                       r_multiple=DEFAULT_R_MULTIPLE)
"""Defaults of :func:`catome_export.apply_catome`'s options (a ``settings=`` call must leave them all as they are)."""
_TOME_DEFAULTS: dict[str, Any] = dict(ratio=DEFAULT_RATIO, max_downsample=None, stride=DEFAULT_STRIDE, random_dst=False,
                                      merge_crossattn=False, merge_mlp=False, seed=DEFAULT_MERGE_SEED,
                                      r_multiple=DEFAULT_R_MULTIPLE)


def apply_tome(
    pipe_or_unet: Any,
    ratio: float = DEFAULT_RATIO,
    max_downsample: int | None = None,
    stride: tuple[int, int] = DEFAULT_STRIDE,
    random_dst: bool = False,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    *,
    seed: int = DEFAULT_MERGE_SEED,
    r_multiple: int = DEFAULT_R_MULTIPLE,
    settings: MergeSettings | None = None,
) -> CatomeHandle:
    """Apply the ToMe baseline: a fixed ratio, matching at every step (no cache).

    r = min(int(N * ratio), number of src tokens) at every merge site and step
    (rounded down to a multiple of ``r_multiple``). Other options as in
    :func:`catome_export.apply_catome`.
    """
    given = dict(ratio=ratio, max_downsample=max_downsample, stride=stride, random_dst=random_dst,
                 merge_crossattn=merge_crossattn, merge_mlp=merge_mlp, seed=seed, r_multiple=r_multiple)
    if settings is not None:
        refuse_options_with_settings(given, _TOME_DEFAULTS)
        return apply_merging(pipe_or_unet, settings)
    if ratio is None:
        raise CatomeError("ratio must be a number in [0, 1); for an adaptive threshold use apply_catome")
    _, unet = split_target(pipe_or_unet)
    built = MergeSettings(
        threshold=None, ratio=ratio, merge_fraction=None, schedule=parse_schedule("every_step"),
        max_downsample=_merge_level(unet, max_downsample), stride=_check_stride(stride),
        random_dst=_check_flag("random_dst", random_dst), seed=_check_seed(seed),
        merge_crossattn=_check_flag("merge_crossattn", merge_crossattn),
        merge_mlp=_check_flag("merge_mlp", merge_mlp), r_multiple=r_multiple,
    )
    return apply_merging(pipe_or_unet, built)
