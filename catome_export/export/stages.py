"""Cut a U-Net into stages at its merge sites, with the IO specs of every stage.

Stage 0 runs from the time embedding up to the input ``x0`` of site 0; stage
k (k >= 1) runs site k-1's block (merge -> attn1 -> unmerge, attn2, ff) and
everything up to ``x{k}``; the last stage ends with ``noise_pred``. A stage
whose weights exceed ``max_stage_bytes`` (SDXL's middle, 9.6 GB in fp32) is
cut further, between its steps, into pieces that run no merge site: each
piece is exported, optimized, checked and built on its own, so no step of the
build holds more than a piece's weights beside the U-Net. A stage's
inputs are the names it reads before writing them; its outputs are the names
it writes that a later stage reads (liveness over the flat step list of
:mod:`.unet_steps`). Inputs a stage needs from earlier stages are found by
name among the model inputs and all earlier stages' outputs. The names follow
the IO convention of :mod:`catome_export.engine.io_names` (``x{k}``,
``site{k}_*`` plan tensors, ``skip{i}``, the model inputs and ``noise_pred``).

Symbolic dims (strings in :attr:`TensorSpec.shape`; static dims are ints):

=========  ================================================================
``B``      batch
``H, W``   latent height and width
``Hd, Wd`` latent height / width at downsample d (``H2``, ``W4``, ``H8``...):
           ceil(H / d), the size after log2(d) stride-2 convolutions
``L``      text length (tokens of ``encoder_hidden_states``)
``N{k}``   tokens at site k (H * W at downsample 1)
``K{k}``   tokens kept at site k (N{k} - r, r the merged count)
``R{k}``   rows of src_idx/slot_idx at site k: max(r, 1) .. number of src tokens
           (r = 0 is one exact self-merge row, so no input is ever empty)
=========  ================================================================
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch

from catome_export.engine.specs import DOWNSAMPLES, DTYPE_NAMES, CachedBranch, StageSpec, TensorSpec
from catome_export.errors import CatomeError
from catome_export.export._threads import torch_threads
from catome_export.engine.io_names import (
    MODEL_INPUTS, MODEL_OUTPUT, SAMPLE, TEXT, TEXT_EMBEDS, TIME_IDS, TIMESTEP, is_model_input, plan_names, site_input_name, site_of_input,
)
from catome_export.export.unet_steps import BlockOptions, Step, build_steps
from catome_export.featurecache import UNetLayout, cached_tensors, is_skipped, position_of
from catome_export.featurecache.branches import StepIO as StepIOView, check_branch
from catome_export.merging.plan import MergePlan
from catome_export.models.conditioning import random_added_conditioning
from catome_export.models.sites import MergeSite

logger = logging.getLogger(__name__)



class StageModule(torch.nn.Module):
    """One stage as a module: positional inputs in spec order, a tuple of outputs in spec order.

    It calls the U-Net's own submodules (registered under ``parts``, with
    ``.`` in module paths written as ``__``), so it shares their weights.
    """

    def __init__(self, spec: StageSpec, steps: list[Step]) -> None:
        super().__init__()
        self.spec = spec
        self._steps = list(steps)
        parts: dict[str, torch.nn.Module] = {}
        for step in steps:
            for path, module in step.modules.items():
                parts.setdefault(path.replace(".", "__"), module)
        self.parts = torch.nn.ModuleDict(parts)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        names = self.spec.input_names
        if len(inputs) != len(names):
            raise CatomeError(f"stage {self.spec.index} takes {len(names)} inputs ({', '.join(names)}), "
                              f"got {len(inputs)}")
        env = dict(zip(names, inputs))
        for step in self._steps:
            step.run(env)
        return tuple(env[n] for n in self.spec.output_names)



def _split(steps: list[Step]) -> list[list[Step]]:
    """Cut the step list in front of every site block step."""
    groups: list[list[Step]] = [[]]
    for step in steps:
        if step.site is not None:
            groups.append([])
        groups[-1].append(step)
    return groups


def cut_for_branches(groups: list[list[Step]], steps: list[Step], branches: tuple[int, ...],
                     layout: UNetLayout) -> list[list[Step]]:
    """Cut ``groups`` where a cached call of any of ``branches`` starts or stops skipping steps (feature caching),
    so every stage either runs on a cached call or is skipped whole."""
    cuts: set[int] = set()
    for branch in branches:
        check_branch(branch, layout)
        skipped = [is_skipped(position_of(step.name, layout), branch) for step in steps]
        for before, after, step in zip(skipped, skipped[1:], steps[1:]):
            if before != after:
                cuts.add(id(step))
    out: list[list[Step]] = []
    for group in groups:
        out.append([])
        for step in group:
            if out[-1] and id(step) in cuts:
                out.append([])
            out[-1].append(step)
    return out


def cached_branches(stages: list[tuple[StageSpec, "StageModule"]], branches: tuple[int, ...],
                    layout: UNetLayout) -> tuple[CachedBranch, ...]:
    """The :class:`CachedBranch` of every branch in ``branches`` for a chain cut with :func:`cut_for_branches`."""
    steps = [step for _, module in stages for step in module._steps]
    io = [StepIOView(s.name, s.reads, s.writes) for s in steps]
    out = []
    for branch in branches:
        runs = []
        for spec, module in stages:
            flags = {is_skipped(position_of(step.name, layout), branch) for step in module._steps}
            if len(flags) != 1:
                raise CatomeError(f"internal: stage {spec.index} is only partly skipped by cache branch {branch}")
            if flags == {False}:
                runs.append(spec.index)
        cached = cached_tensors(io, branch, layout)
        outputs = {t.name for spec, _ in stages if spec.index not in runs for t in spec.outputs}
        missing = [n for n in cached if n not in outputs]
        if missing:
            raise CatomeError(f"internal: cache branch {branch} needs {missing}, which no skipped stage returns")
        out.append(CachedBranch(branch, tuple(runs), cached))
    return tuple(out)


def _step_bytes(step: Step, element_size: int, seen: set[int]) -> int:
    """Bytes of the parameters and buffers ``step`` calls that no earlier step (``seen``) counted."""
    total = 0
    for module in step.modules.values():
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * (element_size if t.is_floating_point() else t.element_size())
    return total


def split_by_size(groups: list[list[Step]], max_bytes: int | None, element_size: int) -> list[list[Step]]:
    """Cut every group whose weights exceed ``max_bytes`` into about equal pieces, between steps.

    A piece ends before the step that would take it over ``max_bytes``, or
    once it holds its share (the group's weights over the number of pieces
    needed). A single step larger than ``max_bytes`` is a piece of its own.
    The site block step stays first in its group's first piece.
    """
    if max_bytes is None:
        return groups
    if max_bytes <= 0:
        raise CatomeError(f"max_stage_bytes must be > 0, got {max_bytes}")
    out: list[list[Step]] = []
    for group in groups:
        seen: set[int] = set()
        sizes = [_step_bytes(step, element_size, seen) for step in group]
        total = sum(sizes)
        if total <= max_bytes:
            out.append(group)
            continue
        share = total / -(-total // max_bytes)
        pieces: list[list[Step]] = [[]]
        held = 0
        for step, size in zip(group, sizes):
            if pieces[-1] and (held + size > max_bytes or held >= share):
                pieces.append([])
                held = 0
            pieces[-1].append(step)
            held += size
        logger.info("a stage of %.2f GB of weights is cut into %d pieces (max_stage_bytes %d)", total / 1e9,
                    len(pieces), max_bytes)
        out.extend(pieces)
    return out


def _liveness(groups: list[list[Step]]) -> list[tuple[list[str], list[str]]]:
    """(inputs, outputs) names per group: read-before-written, and written-then-read-later."""
    io = []
    for i, group in enumerate(groups):
        written: list[str] = []
        inputs: list[str] = []
        for step in group:
            for name in step.reads:
                if name not in written and name not in inputs:
                    inputs.append(name)
            written.extend(w for w in step.writes if w not in written)
        later = {n for g in groups[i + 1:] for s in g for n in s.reads}
        outputs = [n for n in written if n in later]
        if i == len(groups) - 1:
            if MODEL_OUTPUT not in written:
                raise CatomeError("the last stage does not compute noise_pred: unsupported layout")
            outputs = [MODEL_OUTPUT]
        io.append((inputs, outputs))
    return io


def _order_inputs(names: list[str], site: int | None) -> list[str]:
    """x{site} first, then the site's plan tensors, then the rest in first-read order."""
    if site is None:
        head: list[str] = [n for n in MODEL_INPUTS if n in names]
    else:
        head = [site_input_name(site), *plan_names(site)]
    return head + [n for n in names if n not in head]


def _example_env(unet: torch.nn.Module, dtype: torch.dtype, batch: int, hw: tuple[int, int],
                 text_len: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    cfg = unet.config
    env = {
        SAMPLE: torch.randn(batch, cfg.in_channels, *hw, generator=gen).to(dtype),
        TIMESTEP: torch.full((batch,), 500.0, dtype=torch.float32),
        TEXT: torch.randn(batch, text_len, cfg.cross_attention_dim, generator=gen).to(dtype),
    }
    added = random_added_conditioning(unet, batch, (hw[0] * 8, hw[1] * 8), dtype=dtype)
    if added is not None:
        env[TEXT_EMBEDS], env[TIME_IDS] = added["text_embeds"], added["time_ids"]
    return env


PlanFn = Callable[[int, torch.Tensor], tuple[torch.Tensor, ...]]
"""(site index, site input x) -> the site's plan tensors."""


def identity_plan(site: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The r = 0 plan for x [B, N, C] (a :data:`PlanFn`)."""
    return MergePlan.identity(x.shape[0], x.shape[1], x.device).tensors()


ResidualFn = Callable[[str, torch.Tensor], torch.Tensor]
"""(ControlNet residual input name, the tensor it is added to) -> the residual."""


def zero_residual(name: str, like: torch.Tensor) -> torch.Tensor:
    """A zero ControlNet residual (a :data:`ResidualFn`): what the U-Net computes without ControlNet."""
    return torch.zeros_like(like)


def run_steps(steps: list[Step], env: dict[str, torch.Tensor], plans: PlanFn = identity_plan,
              residuals: ResidualFn = zero_residual) -> dict:
    """Walk ``steps`` over ``env`` (model inputs), asking ``plans`` for each site's plan before its block and
    ``residuals`` for each ControlNet residual that ``env`` lacks (steps built with ``controlnet=True``)."""
    for step in steps:
        if step.site is not None:
            names = plan_names(step.site)
            if names[0] not in env:
                env.update(zip(names, plans(step.site, env[site_input_name(step.site)])))
        for name, like in step.residuals:
            if name not in env:
                env[name] = residuals(name, env[like])
        step.run(env)
    return env


def _symbols(batch: int, hw: tuple[int, int], text_len: int, levels: int = 3) -> dict[str, int]:
    """Symbol values for one example run; ``levels``: number of stride-2 downsamplers of the U-Net."""
    h, w = hw
    table = {"B": batch, "H": h, "W": w, "L": text_len}
    for d in DOWNSAMPLES[:levels]:
        table[f"H{d}"] = -(-h // d)
        table[f"W{d}"] = -(-w // d)
    return table


EXAMPLES = ((1, (8, 16), 4), (3, (16, 24), 5))
"""Two small example shapes (batch, latent hw, text length): every symbolic dim that a U-Net of the
Stable Diffusion layout uses (B, L, H, W, H2..W8, N{k}) takes a different pair of values in the two runs."""


def _num_downsamplers(unet: torch.nn.Module) -> int:
    return sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None) is not None)


def infer_shapes(unet: torch.nn.Module, steps: list[Step], sites: list[MergeSite], dtype: torch.dtype,
                 names: set[str]) -> dict[str, TensorSpec]:
    """Symbolic specs of ``names`` from two eager runs: equal dims are static, others are named by value."""
    runs: list[tuple[dict[str, tuple[int, ...]], dict[str, int], dict[str, torch.dtype]]] = []
    for batch, hw, text_len in EXAMPLES:
        env = _example_env(unet, dtype, batch, hw, text_len)
        with torch.no_grad(), torch_threads(1):
            run_steps(steps, env)
        table = _symbols(batch, hw, text_len, _num_downsamplers(unet))
        for s in sites:
            gh, gw = s.grid(hw)
            table[f"N{s.index}"] = gh * gw
        runs.append(({n: tuple(env[n].shape) for n in names}, table, {n: env[n].dtype for n in names}))
    (shapes_a, sym_a, dtypes), (shapes_b, sym_b, _) = runs
    _check_distinct(sym_a, sym_b)
    specs = {}
    for name in sorted(names):
        a, b = shapes_a[name], shapes_b[name]
        if len(a) != len(b):
            raise CatomeError(f"tensor {name} changes rank with the input size: cannot export it")
        site = site_of_input(name)
        dims: list[str | int] = []
        for da, db in zip(a, b):
            if da == db:
                dims.append(int(da))
                continue
            match = [s for s in sym_a if (sym_a[s], sym_b[s]) == (da, db)
                     and (not s.startswith("N") or s == f"N{site}")]
            match.sort(key=lambda s: (s.startswith("N"), len(s)))
            if not match:
                raise CatomeError(f"tensor {name}: a dim ({da} vs {db} in two example runs) matches no known "
                                  "symbolic dim (B, H, W, L, Hd, Wd, N{k}): unsupported layout")
            dims.append(match[0])
        if dtypes[name] not in DTYPE_NAMES:
            raise CatomeError(f"tensor {name} has unsupported dtype {dtypes[name]}")
        specs[name] = TensorSpec(name, DTYPE_NAMES[dtypes[name]], tuple(dims))
    return specs


def _check_distinct(sym_a: dict[str, int], sym_b: dict[str, int]) -> None:
    """Varying symbols must not share a value pair (sites' N{k} may share one: they are told apart by name)."""
    seen: dict[tuple[int, int], str] = {}
    for name in sym_a:
        pair = (sym_a[name], sym_b[name])
        if pair[0] == pair[1]:
            continue
        other = seen.get(pair)
        if other is not None and not (other.startswith("N") and name.startswith("N")):
            raise CatomeError(f"internal: dims {other} and {name} cannot be told apart by the example shapes")
        seen.setdefault(pair, name)


def plan_specs(site: int) -> tuple[TensorSpec, ...]:
    """The five plan tensor specs of ``site`` (contract shapes and dtypes)."""
    keep, src, slot, weight, unmerge = plan_names(site)
    k, r, n = f"K{site}", f"R{site}", f"N{site}"
    return (TensorSpec(keep, "int64", ("B", k)), TensorSpec(src, "int64", ("B", r)),
            TensorSpec(slot, "int64", ("B", r)), TensorSpec(weight, "float32", ("B", k)),
            TensorSpec(unmerge, "int64", ("B", n)))


def cut_unet(unet: torch.nn.Module, sites: list[MergeSite], dtype: torch.dtype = torch.float32, *,
             merge_crossattn: bool = False, merge_mlp: bool = False,
             max_stage_bytes: int | None = None,
             cache_branches: tuple[int, ...] = (), controlnet: bool = False) -> list[tuple[StageSpec, StageModule]]:
    """Cut ``unet`` at ``sites`` into ``len(sites) + 1`` stages: ``[(spec, module), ...]``.

    The modules share the U-Net's weights (a converted copy when ``dtype``
    differs from the U-Net's). ``merge_crossattn`` / ``merge_mlp`` also merge
    around attn2 / ff with the same plan. ``max_stage_bytes``: cut a stage
    whose weights (in ``dtype``) exceed it into pieces without a merge site
    (:func:`split_by_size`; the build passes :data:`MAX_STAGE_BYTES`); None
    keeps one stage per site. ``cache_branches``: feature-cache branches
    (DeepCache's ``cache_branch_id``) the chain is also cut for, so a cached
    call of each runs whole stages (:func:`cut_for_branches`; what each runs:
    :func:`cached_branches`). ``controlnet``: the stages that consume the skip tensors and the mid block's output
    also take ControlNet's residuals as inputs (``controlnet_down{i}``, ``controlnet_mid``; see
    :mod:`.unet_steps`).
    """
    if not sites:
        raise CatomeError("no merge sites: nothing to cut (find them with find_merge_sites(unet))")
    if dtype not in (torch.float32, torch.float16):
        raise CatomeError(f"stages can be cut in float32 or float16, not {dtype}")
    if unet.dtype != dtype:
        logger.info("converting a copy of the U-Net to %s for export", dtype)
        unet = copy.deepcopy(unet).to(dtype)
    unet = unet.eval()
    steps = build_steps(unet, sites, BlockOptions(merge_crossattn, merge_mlp), controlnet=controlnet)
    groups = _split(steps)
    if cache_branches:
        groups = cut_for_branches(groups, steps, tuple(cache_branches), UNetLayout.of(unet))
    groups = split_by_size(groups, max_stage_bytes, torch.empty((), dtype=dtype).element_size())
    io = _liveness(groups)
    plan_tensors = {n for s in sites for n in plan_names(s.index)}
    carried = {n for ins, outs in io for n in (*ins, *outs)} - plan_tensors
    specs = infer_shapes(unet, steps, sites, dtype, carried)
    for s in sites:
        specs.update({t.name: t for t in plan_specs(s.index)})
    result = []
    for index, (group, (inputs, outputs)) in enumerate(zip(groups, io)):
        site = group[0].site
        next_site = groups[index + 1][0].site if index + 1 < len(groups) else None
        if next_site is not None:
            x_next = site_input_name(next_site)
            if x_next not in outputs:
                raise CatomeError(f"stage {index} does not end with {x_next}: unsupported layout")
            outputs = [x_next] + [n for n in outputs if n != x_next]
        spec = StageSpec(index, site, next_site, tuple(specs[n] for n in _order_inputs(inputs, site)),
                         tuple(specs[n] for n in outputs))
        result.append((spec, StageModule(spec, group)))
    _check_available(result)
    return result


def _check_available(stages: list[tuple[StageSpec, Any]]) -> None:
    """Every stage input is a model input, one of its own plan tensors, or an earlier stage's output."""
    have: set[str] = set()
    for spec, _ in stages:
        own = set(plan_names(spec.site)) if spec.site is not None else set()
        missing = [n for n in spec.input_names if n not in have and n not in own and not is_model_input(n)]
        if missing:
            raise CatomeError(f"stage {spec.index} reads {missing} that no earlier stage makes: unsupported layout")
        have.update(spec.output_names)


def run_stages(stages: list[tuple[StageSpec, Callable[..., tuple[torch.Tensor, ...]]]],
               feeds: dict[str, torch.Tensor], plans: PlanFn = identity_plan) -> dict[str, torch.Tensor]:
    """Walk the stage chain (torch modules or any callables taking positional inputs) over a name environment.

    ``feeds`` holds the model inputs; ``plans(k, x)`` gives site k's plan
    tensors when ``x{k}`` is known. Returns the whole environment (``noise_pred`` included).
    """
    env = dict(feeds)
    for spec, stage in stages:
        if spec.site is not None:
            env.update(zip(plan_names(spec.site), plans(spec.site, env[site_input_name(spec.site)])))
        outs = stage(*(env[n] for n in spec.input_names))
        env.update(zip(spec.output_names, outs))
    return env
