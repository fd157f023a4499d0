"""The stage chain: checks that the stages fit together and walks them over a name -> tensor environment.

Stage k's inputs come from the model inputs, from the outputs of earlier
stages, and from the plan tensors of its merge site (``site{k}_*``), which
the controller supplies right after the stage that outputs ``x{k}``. Every
tensor leaves the environment after the last stage that reads it, so
skip tensors do not outlive their use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Collection, Sequence

import torch

from catome_export.backends.base import StageRunner
from catome_export.errors import CatomeError
from catome_export.engine.io_names import MODEL_OUTPUT, is_model_input, plan_names, site_input_name
from catome_export.merging.plan import MergePlan

if TYPE_CHECKING:
    from catome_export.engine.specs import TensorSpec

PlanHook = Callable[[int, torch.Tensor], MergePlan]
"""``(site, x) -> plan``: called after the stage that outputs ``x{site}``."""


def _broken(detail: str) -> CatomeError:
    return CatomeError(f"the engine's stage chain is inconsistent ({detail}): rebuild it with catome-export build")


class StageChain:
    """Loaded stage runners in execution order, checked once, walked at every U-Net call."""

    def __init__(self, runners: Sequence[StageRunner]) -> None:
        if not runners:
            raise _broken("no stages")
        self.runners = list(runners)
        self.specs = [r.spec for r in self.runners]
        self._check()
        self._free_after = self._liveness(range(len(self.specs)))
        self._subsets: dict[tuple[int, ...], list[tuple[str, ...]]] = {}

    @property
    def sites(self) -> list[int]:
        """Merge sites in the order the chain reaches them."""
        return [s.next_site for s in self.specs if s.next_site is not None]

    def input_spec(self, name: str) -> TensorSpec | None:
        """The first TensorSpec named ``name`` among the stages' inputs, or None."""
        for spec in self.specs:
            for t in spec.inputs:
                if t.name == name:
                    return t
        return None

    def _check(self) -> None:
        available: set[str] = set()
        seen_sites: set[int] = set()
        for pos, spec in enumerate(self.specs):
            if spec.index != pos:
                raise _broken(f"stage at position {pos} has index {spec.index}")
            if spec.site is not None and spec.site not in seen_sites:
                raise _broken(f"stage {pos} runs site {spec.site} before any stage returns x{spec.site}")
            missing = [t.name for t in spec.inputs if t.name not in available and not is_model_input(t.name)]
            if missing:
                raise _broken(f"stage {pos} reads {missing}, which no earlier stage returns")
            outputs = {t.name for t in spec.outputs}
            available |= outputs
            if spec.next_site is not None:
                if site_input_name(spec.next_site) not in outputs:
                    raise _broken(f"stage {pos} should return x{spec.next_site}")
                if spec.next_site in seen_sites:
                    raise _broken(f"site {spec.next_site} is reached twice")
                seen_sites.add(spec.next_site)
                available |= set(plan_names(spec.next_site))
        last = self.specs[-1]
        if last.next_site is not None or MODEL_OUTPUT not in {t.name for t in last.outputs}:
            raise _broken(f"the last stage must return {MODEL_OUTPUT}")
        ran = {s.site for s in self.specs if s.site is not None}
        if ran != seen_sites:
            raise _broken(f"sites {sorted(seen_sites - ran)} get a plan but no stage runs them")

    def _liveness(self, order: Sequence[int]) -> list[tuple[str, ...]]:
        """Per stage of ``order``, the names no later stage of ``order`` reads (dropped after it)."""
        last_read: dict[str, int] = {}
        for pos, index in enumerate(order):
            for t in self.specs[index].inputs:
                last_read[t.name] = pos
        free: list[list[str]] = [[] for _ in order]
        for name, pos in last_read.items():
            free[pos].append(name)
        return [tuple(names) for names in free]

    def external_inputs(self, stages: Sequence[int]) -> list[str]:
        """Names the walk of ``stages`` reads that none of them returns (model inputs, kept tensors, plans)."""
        made: set[str] = set()
        out: list[str] = []
        for index in stages:
            spec = self.specs[index]
            for t in spec.inputs:
                if t.name not in made and t.name not in out:
                    out.append(t.name)
            made |= {t.name for t in spec.outputs}
        return out

    def check_subset(self, stages: Sequence[int], provided: Collection[str]) -> None:
        """CatomeError unless walking only ``stages`` (in chain order) works from the model inputs and
        ``provided`` (tensors kept from a full walk): what a cached feature-cache call runs."""
        if list(stages) != sorted(set(stages)) or not stages or stages[-1] != len(self.specs) - 1:
            raise _broken(f"a feature-cache walk lists stages {list(stages)}")
        available = set(provided)
        for index in stages:
            spec = self.specs[index]
            if spec.site is not None and site_input_name(spec.site) not in available:
                raise _broken(f"a feature-cache walk runs site {spec.site} without its input")
            missing = [t.name for t in spec.inputs if t.name not in available and not is_model_input(t.name)
                       and (spec.site is None or t.name not in plan_names(spec.site))]
            if missing:
                raise _broken(f"a feature-cache walk reaches stage {index} without {missing}")
            available |= {t.name for t in spec.outputs}

    def run(self, env: dict[str, torch.Tensor], plan_hook: PlanHook, *, stages: Sequence[int] | None = None,
            keep: Collection[str] = (), kept: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Walk every stage (or only ``stages``, in chain order: a cached feature-cache call); ``env`` starts with
        the model inputs (and, for a partial walk, the kept tensors it reads). Outputs named in ``keep`` are also
        put in ``kept`` (what the next cached call reads). Returns ``noise_pred``."""
        if stages is None:
            order: Sequence[int] = range(len(self.specs))
            frees = self._free_after
        else:
            order = tuple(stages)
            frees = self._subsets.get(order) or self._subsets.setdefault(order, self._liveness(order))
        for index, free in zip(order, frees):
            runner, spec = self.runners[index], self.specs[index]
            outputs = runner.run({t.name: env[t.name] for t in spec.inputs})
            for name in free:
                env.pop(name, None)
            for t in spec.outputs:
                env[t.name] = outputs[t.name]
                if kept is not None and t.name in keep:
                    kept[t.name] = outputs[t.name]
            if spec.next_site is not None:
                site = spec.next_site
                plan = plan_hook(site, env[site_input_name(site)])
                env.update(zip(plan_names(site), plan.tensors()))
        return env[MODEL_OUTPUT]

    def close(self) -> None:
        for runner in self.runners:
            runner.close()
