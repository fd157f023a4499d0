"""The r = 0 plan is one exact self-merge: no empty tensor for a graph, and bit-exact through merge and unmerge.

Exactness is checked bit for bit (integer views of the floats), in float32,
float16 and bfloat16, on random values and on the extremes (largest values
that do not overflow, subnormals, signed zeros, infinities), through
:func:`merge_tokens` / :func:`unmerge_tokens` and through ONNX graphs run by
ONNX Runtime on the CPU: the shared merge/unmerge code exported on its own,
and a whole site stage of the tiny U-Net.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.merging import MergePlan, match_tokens, merge_tokens, unmerge_tokens

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def _through_plan(x: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged, merged then unmerged) computed by the shared functions, no identity short-cut."""
    keep, src, slot, weight, unmerge = plan.tensors()
    merged = merge_tokens(x, keep, src, slot, weight)
    return merged, unmerge_tokens(merged, unmerge)


def _extremes(dtype: torch.dtype) -> torch.Tensor:
    """Values at the edges of ``dtype`` whose doubling does not overflow (and infinities)."""
    info = torch.finfo(dtype)
    half_max = torch.tensor(info.max, dtype=dtype) / 2  # exact: only the exponent changes
    vals = [0.0, -0.0, info.tiny, -info.tiny, info.smallest_normal / 4, -info.smallest_normal / 4, info.eps,
            1.0, -1.0, float(half_max), -float(half_max), float("inf"), float("-inf")]
    t = torch.tensor(vals, dtype=torch.float64).to(dtype)
    assert torch.isfinite(t[:-2]).all() and (t[4] != 0) and t[4].abs() < info.smallest_normal  # a real subnormal
    return t


def _token_rows(values: torch.Tensor, batch: int, tokens: int, channels: int) -> torch.Tensor:
    """x [B, N, C] whose token 0 (the self-merged one) runs through every value, the rest random."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, tokens, channels, generator=gen, dtype=torch.float32).to(values.dtype)
    reps = -(-channels // values.numel())
    x[:, 0] = values.repeat(reps)[:channels]
    x[:, 1] = values.flip(0).repeat(reps)[:channels]
    return x


# -- the plan itself ----------------------------------------------------------------------
def test_identity_is_one_self_merge() -> None:
    plan = MergePlan.identity(3, 10)
    plan.validate(3, 10)
    assert plan.num_merged == 0 and plan.is_identity and plan.num_kept == 10 and plan.num_src_rows == 1
    assert all(t.numel() > 0 for t in plan.tensors())
    assert plan.src_idx.tolist() == plan.slot_idx.tolist() == [[0]] * 3
    assert torch.equal(plan.keep_idx, torch.arange(10).expand(3, -1))
    assert torch.equal(plan.unmerge_idx, torch.arange(10).expand(3, -1))
    want_weight = torch.ones(3, 10)
    want_weight[:, 0] = 0.5
    assert torch.equal(plan.weight, want_weight)


def test_single_token_identity() -> None:
    plan = MergePlan.identity(1, 1)
    plan.validate(1, 1)
    x = torch.randn(1, 1, 4)
    assert torch.equal(_through_plan(x, plan)[1], x)


def test_identity_rejects_empty_sizes() -> None:
    with pytest.raises(CatomeError, match="batch >= 1"):
        MergePlan.identity(0, 4)
    with pytest.raises(CatomeError, match="tokens >= 1"):
        MergePlan.identity(1, 0)


def test_matching_that_merges_nothing_gives_the_self_merge() -> None:
    metric = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(1))
    for plan in (match_tokens(metric, (8, 8), threshold=1.0), match_tokens(metric, (8, 8), num_merged=0),
                 match_tokens(metric, (8, 8), ratio=0.0), match_tokens(torch.randn(1, 1, 4), (1, 1), threshold=0.5)):
        plan.validate()
        assert plan.num_merged == 0 and plan.src_idx.shape[1] == 1 and plan.keep_idx.shape[1] == plan.num_tokens


def test_identity_moves_to_another_device_unchanged() -> None:
    plan = MergePlan.identity(2, 5).to("cpu")
    plan.validate(2, 5)
    assert plan.weight[:, 0].tolist() == [0.5, 0.5]


# -- validation of r = 0 ------------------------------------------------------------------
def _with(plan: MergePlan, **changes) -> MergePlan:
    fields = {name: getattr(plan, name) for name in ("keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx",
                                                      "num_merged")}
    fields.update(changes)
    return MergePlan(**fields)


def test_validate_accepts_a_self_merge_on_any_slot() -> None:
    """The self-merge may sit on another slot (a permuted keep_idx), as long as src is that slot's own token."""
    base = MergePlan.identity(2, 6)
    perm = torch.tensor([3, 0, 5, 1, 2, 4]).expand(2, -1).contiguous()
    unmerge = torch.empty_like(perm).scatter_(1, perm, torch.arange(6).expand(2, -1))
    weight = torch.ones(2, 6)
    weight[:, 2] = 0.5
    plan = _with(base, keep_idx=perm, unmerge_idx=unmerge, src_idx=perm[:, 2:3].clone(),
                 slot_idx=torch.full((2, 1), 2), weight=weight)
    plan.validate(2, 6)
    x = torch.randn(2, 6, 3)
    assert torch.equal(_through_plan(x, plan)[1], x)


@pytest.mark.parametrize("name,make,match", [
    ("empty src tensors", lambda p: _with(p, src_idx=p.src_idx[:, :0], slot_idx=p.slot_idx[:, :0],
                                          weight=torch.ones_like(p.weight)), "self-merge"),
    ("src is another token", lambda p: _with(p, src_idx=torch.full_like(p.src_idx, 3)), "own slot"),
    ("src adds into another slot", lambda p: _with(p, slot_idx=torch.full_like(p.slot_idx, 2)), "own slot"),
    ("weight 1 on the self-merged slot", lambda p: _with(p, weight=torch.ones_like(p.weight)), "weight"),
    ("weight 1/2 on the wrong slot", lambda p: _with(p, weight=p.weight.roll(1, dims=1)), "weight"),
    ("two src rows", lambda p: _with(p, src_idx=torch.zeros(2, 2, dtype=torch.int64),
                                     slot_idx=torch.zeros(2, 2, dtype=torch.int64)), "src_idx"),
    ("token kept twice", lambda p: _with(p, keep_idx=p.keep_idx.clone().index_fill_(1, torch.tensor([1]), 0)),
     "exactly once"),
])
def test_validate_rejects_other_r_zero_forms(name, make, match) -> None:
    with pytest.raises(CatomeError, match=match):
        make(MergePlan.identity(2, 8)).validate(2, 8)


def test_validate_still_rejects_double_coverage_when_merging() -> None:
    """With r > 0 a token that is both kept and merged is an error, even if it adds into its own slot."""
    metric = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(2))
    plan = match_tokens(metric, (4, 4), num_merged=2)
    plan.validate(1, 16)
    own = plan.keep_idx.gather(1, plan.slot_idx)  # each merged src replaced by its dst: a self-merge shape
    with pytest.raises(CatomeError, match="exactly once"):
        _with(plan, src_idx=own).validate(1, 16)


# -- exactness in torch -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_self_merge_is_bit_exact_on_random_values(dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    for scale in (1e-3, 1.0, 1e3):
        x = (torch.randn(3, 40, 16, generator=gen) * scale).to(dtype)
        merged, back = _through_plan(x, MergePlan.identity(3, 40))
        assert merged.dtype == dtype and torch.equal(_bits(merged), _bits(x)) and torch.equal(_bits(back), _bits(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_self_merge_is_bit_exact_on_extreme_values(dtype) -> None:
    x = _token_rows(_extremes(dtype), 2, 5, 13)
    merged, back = _through_plan(x, MergePlan.identity(2, 5))
    assert torch.equal(_bits(merged), _bits(x)) and torch.equal(_bits(back), _bits(x))
    assert torch.signbit(merged[0, 0, 1]) and merged[0, 0, 1] == 0  # -0.0 stays -0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_stays_nan(dtype) -> None:
    x = torch.full((1, 2, 3), float("nan"), dtype=dtype)
    assert torch.isnan(_through_plan(x, MergePlan.identity(1, 2))[1]).all()


def test_float16_overflow_is_the_documented_limit() -> None:
    """Doubling overflows fp16 just above 32752 (half of 65504): the one documented exception."""
    plan = MergePlan.identity(1, 2)
    ok = torch.tensor([[[32752.0], [1.0]]], dtype=torch.float16)
    assert torch.equal(_bits(_through_plan(ok, plan)[0]), _bits(ok))
    above = torch.tensor([[[32768.0], [1.0]]], dtype=torch.float16)  # the next fp16 value
    assert torch.isinf(_through_plan(above, plan)[0][0, 0]).all()
    # the eager path never computes it: is_identity short-cuts merge and unmerge
    assert plan.merge(above) is above and plan.unmerge(above) is above


# -- exactness through ONNX Runtime -------------------------------------------------------
class _MergeUnmerge(torch.nn.Module):
    """The shared merge and unmerge, as a stage calls them, followed by nothing else."""

    def forward(self, x, keep, src, slot, weight, unmerge):
        merged = merge_tokens(x, keep, src, slot, weight)
        return merged, unmerge_tokens(merged, unmerge)


@pytest.fixture(scope="module")
def merge_graph(tmp_path_factory):
    """ONNX Runtime CPU session of merge/unmerge, exported with a real merge (r = 3) and dynamic K, R, N."""
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'catome-export[ort]')")
    from catome_export.defaults import OPSET

    metric = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(5))
    plan = match_tokens(metric, (4, 4), num_merged=3)
    names = ["x", "keep", "src", "slot", "weight", "unmerge"]
    axes = {"x": {0: "B", 1: "N", 2: "C"}, "keep": {0: "B", 1: "K"}, "src": {0: "B", 1: "R"}, "slot": {0: "B", 1: "R"},
            "weight": {0: "B", 1: "K"}, "unmerge": {0: "B", 1: "N"}, "merged": {0: "B", 1: "K", 2: "C"},
            "out": {0: "B", 1: "N", 2: "C"}}
    path = tmp_path_factory.mktemp("merge_graph") / "merge.onnx"
    torch.onnx.export(_MergeUnmerge(), (metric, *plan.tensors()), str(path), dynamo=False, opset_version=OPSET,
                      input_names=names, output_names=["merged", "out"], dynamic_axes=axes)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), names


@pytest.mark.parametrize("values", ["random", "extreme"])
def test_self_merge_is_bit_exact_in_onnx_runtime(merge_graph, values) -> None:
    session, names = merge_graph
    b, n, c = 2, 37, 13
    if values == "random":
        x = torch.randn(b, n, c, generator=torch.Generator().manual_seed(6)) * 100
    else:
        x = _token_rows(_extremes(torch.float32), b, n, c)
    plan = MergePlan.identity(b, n)
    feeds = {name: t.numpy() for name, t in zip(names, (x, *plan.tensors()))}
    merged, out = (torch.from_numpy(a) for a in session.run(["merged", "out"], feeds))
    want = plan.merge(x)  # the eager identity: x itself
    assert want is x
    assert torch.equal(_bits(merged), _bits(want)) and torch.equal(_bits(out), _bits(want))


def test_onnx_graph_really_merges(merge_graph) -> None:
    """The same graph merges for r > 0 (so the exactness above is not a graph that ignores its plan)."""
    session, names = merge_graph
    x = torch.randn(1, 16, 5, generator=torch.Generator().manual_seed(8))
    plan = match_tokens(x, (4, 4), num_merged=6)
    feeds = {name: t.numpy() for name, t in zip(names, (x, *plan.tensors()))}
    merged, _ = session.run(["merged", "out"], feeds)
    assert merged.shape == (1, 10, 5)
    torch.testing.assert_close(torch.from_numpy(merged), plan.merge(x), rtol=0, atol=1e-6)


def test_site_stage_with_self_merge_is_bit_exact_in_onnx_runtime(tiny_unet, tmp_path) -> None:
    """A whole exported site stage of the tiny U-Net (fp32, ONNX Runtime CPU).

    With the self-merge plan the stage's output equals, bit for bit, the
    same graph run with nothing merged at all (empty src tensors, the form
    the self-merge replaces); the torch stage module gives identical bits
    for both forms too, and agrees with the graph to float32 rounding.
    """
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'catome-export[ort]')")
    from catome_export.export.onnx_export import example_inputs, export_stage, ort_session
    from catome_export.export.stages import cut_unet
    from catome_export.engine.io_names import plan_names as plan_input_names
    from catome_export.models import find_merge_sites

    sites = find_merge_sites(tiny_unet)
    stages = cut_unet(tiny_unet, sites)
    spec, module = stages[1]
    assert spec.site is not None
    examples = example_inputs(stages, sites, tiny_unet.config, torch.float32)
    item = export_stage(spec, module, examples[spec.index], tmp_path)
    session = ort_session(tmp_path / item.file)

    inputs = dict(zip(spec.input_names, examples[spec.index]))
    x = inputs[f"x{spec.site}"]
    b, n = x.shape[:2]
    plan = MergePlan.identity(b, n)
    self_merge = {**inputs, **dict(zip(plan_input_names(spec.site), plan.tensors()))}
    empty = torch.zeros(b, 0, dtype=torch.int64)
    nothing = {**self_merge, f"site{spec.site}_src_idx": empty, f"site{spec.site}_slot_idx": empty,
               f"site{spec.site}_weight": torch.ones(b, n)}

    def run(feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [torch.from_numpy(a) for a in session.run(None, {k: v.numpy() for k, v in feeds.items()})]

    got, ref = run(self_merge), run(nothing)
    with torch.no_grad():
        eager = module(*(self_merge[name] for name in spec.input_names))
        eager_nothing = module(*(nothing[name] for name in spec.input_names))
    assert len(got) == len(ref) == len(eager) == len(eager_nothing)
    for g, r, e, e0 in zip(got, ref, eager, eager_nothing):
        assert torch.equal(_bits(g), _bits(r))
        assert torch.equal(_bits(e), _bits(e0))
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field", ["keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx"])
def test_validate_refuses_a_flat_tensor_with_a_clear_error(field):
    """Found by the property test: a 1-D plan tensor used to raise IndexError before any check ran."""
    good = MergePlan.identity(1, 1)
    bad = replace(good, **{field: getattr(good, field).flatten()})
    with pytest.raises(CatomeError, match=f"{field} must be a 2-D"):
        bad.validate(1, 1)
