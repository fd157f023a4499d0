"""The stage chain on fake stages: consistency checks, plan feeding, and tensors dropped after their last use."""

from __future__ import annotations

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.engine.specs import StageSpec, TensorSpec
from catome_export.merging import MergePlan
from catome_export.engine.io_names import plan_names
from catome_export.runtime.chain import StageChain


def _t(name: str, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, dtype, ("B", "N"))


def _plan_specs(site: int) -> tuple[TensorSpec, ...]:
    return tuple(_t(n, "float32" if n.endswith("weight") else "int64") for n in plan_names(site))


class FakeRunner:
    """Records the names it was fed; returns fixed tensors for its outputs."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.fed: list[dict[str, torch.Tensor]] = []
        self.closed = False

    def run(self, feeds):
        self.fed.append(dict(feeds))
        base = sum(float(v.float().sum()) for v in feeds.values() if v.is_floating_point())
        return {t.name: torch.full((1, 4, 3), base + i) for i, t in enumerate(self.spec.outputs)}

    def close(self) -> None:
        self.closed = True


def _good_specs() -> list[StageSpec]:
    return [
        StageSpec(0, None, 0, (_t("sample"), _t("timestep")), (_t("x0"), _t("emb"), _t("skip"))),
        StageSpec(1, 0, 1, (_t("x0"), *_plan_specs(0), _t("emb")), (_t("x1"),)),
        StageSpec(2, 1, None, (_t("x1"), *_plan_specs(1), _t("emb"), _t("skip"), _t("encoder_hidden_states")),
                  (_t("noise_pred"),)),
    ]


def test_walk_feeds_plans_and_drops_dead_tensors():
    runners = [FakeRunner(s) for s in _good_specs()]
    chain = StageChain(runners)
    assert chain.sites == [0, 1]
    seen_sites = []

    def plan_hook(site, x):
        seen_sites.append((site, tuple(x.shape)))
        return MergePlan.identity(x.shape[0], x.shape[1])

    env = {"sample": torch.ones(1, 4), "timestep": torch.ones(1), "encoder_hidden_states": torch.ones(1, 2, 3)}
    out = chain.run(env, plan_hook)
    assert seen_sites == [(0, (1, 4, 3)), (1, (1, 4, 3))]
    assert set(runners[1].fed[0]) == {"x0", "emb", *plan_names(0)}
    assert torch.equal(runners[1].fed[0]["site0_keep_idx"], torch.arange(4).expand(1, -1))
    assert set(runners[2].fed[0]) == {"x1", "emb", "skip", "encoder_hidden_states", *plan_names(1)}
    assert out.shape == (1, 4, 3)
    # only what no stage reads any more is left: the output
    assert set(env) == {"noise_pred"}
    chain.close()
    assert all(r.closed for r in runners)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: [s[0], s[2], s[1]], "index"),
    (lambda s: [s[0], StageSpec(1, 0, 1, (_t("x0"), *_plan_specs(0), _t("nowhere")), (_t("x1"),)), s[2]],
     "nowhere"),
    (lambda s: [StageSpec(0, None, 0, (_t("sample"),), (_t("emb"), _t("skip"))), s[1], s[2]], "return x0"),
    (lambda s: [s[0], s[1], StageSpec(2, 1, None, s[2].inputs, (_t("other"),))], "noise_pred"),
    (lambda s: [s[0], StageSpec(1, 3, 1, s[1].inputs, s[1].outputs), s[2]], "site 3"),
    (lambda s: [], "no stages"),
])
def test_inconsistent_chains_are_refused(mutate, message):
    specs = mutate(_good_specs())
    with pytest.raises(CatomeError, match=message) as info:
        StageChain([FakeRunner(s) for s in specs])
    assert "rebuild" in str(info.value)
