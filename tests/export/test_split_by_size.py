"""A stage over ``max_stage_bytes`` is cut into pieces without a merge site (SDXL's 9.5 GB middle, in fp32).

On the tiny models the middle stage (12 MB) is cut with a small limit: the
pieces compute exactly what the uncut chain does, and a build with them
loads and verifies like any other, on ONNX Runtime and on the torch backend.
"""

from __future__ import annotations

import pytest
import torch

from catome_export.cli.rebuild import build_command
from catome_export.errors import CatomeError
from catome_export.export.stages import _split, _step_bytes, cut_unet, run_stages, split_by_size
from catome_export.export.unet_steps import build_steps
from catome_export.merging.matching import match_tokens
from catome_export.models import find_merge_sites, load_unet
from catome_export.models.sites import default_merge_level

LIMIT = 4_000_000
"""Bytes: the tiny U-Net's middle stage holds 12.0 MB of fp32 weights, the others under 0.3 MB."""


def _feeds(unet, hw=(16, 16), batch=2, text_len=5) -> dict[str, torch.Tensor]:
    from catome_export.models.conditioning import random_added_conditioning

    gen = torch.Generator().manual_seed(3)
    feeds = {"sample": torch.randn(batch, unet.config.in_channels, *hw, generator=gen),
             "timestep": torch.tensor([700.0, 20.0][:batch]),
             "encoder_hidden_states": torch.randn(batch, text_len, unet.config.cross_attention_dim, generator=gen)}
    added = random_added_conditioning(unet, batch, (hw[0] * 8, hw[1] * 8))
    if added is not None:
        feeds.update(added)
    return feeds


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_pieces_compute_what_the_uncut_chain_computes(name):
    unet = load_unet(name, "random")
    sites = find_merge_sites(unet, default_merge_level(unet))
    whole = cut_unet(unet, sites)
    cut = cut_unet(unet, sites, max_stage_bytes=LIMIT)
    assert len(whole) == len(sites) + 1 and len(cut) > len(whole)
    assert [s.site for s, _ in cut if s.site is not None] == [s.index for s in sites]
    assert [s.next_site for s, _ in cut if s.next_site is not None] == [s.index for s in sites]
    pieces = [spec for spec, _ in cut if spec.site is None and spec.index > 0]  # no site block inside
    assert pieces and all(spec.index > 1 for spec in pieces)
    for spec, module in cut:  # every stage is under the limit, unless it is a single step
        size = sum(p.numel() * 4 for p in {id(p): p for p in module.parameters()}.values())
        assert size <= LIMIT or len(module._steps) == 1, (spec.index, size)
    by_index = {s.index: s for s in sites}

    def plans(k: int, x: torch.Tensor):  # real merges: a third of the src tokens
        grid = by_index[k].grid((16, 16))
        return match_tokens(x.float(), grid, num_merged=grid[0] * grid[1] // 12).tensors()

    with torch.no_grad():
        want = run_stages(whole, _feeds(unet), plans)["noise_pred"]
        got = run_stages(cut, _feeds(unet), plans)["noise_pred"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("value", [0, -1, True, "2", float("nan"), 1001])
def test_max_stage_gb_must_be_a_positive_number(value):
    from catome_export.engine.options import make_options

    with pytest.raises(CatomeError, match=r"--max-stage-gb must be a number of GB in \(0, 1000\]"):
        make_options("tiny", max_stage_gb=value)


def test_max_stage_gb_reaches_the_cut():
    from catome_export.defaults import MAX_STAGE_BYTES
    from catome_export.engine.options import make_options

    assert make_options("tiny").max_stage_bytes == MAX_STAGE_BYTES == 4_000_000_000
    assert make_options("sdxl", weights="random", max_stage_gb=2).max_stage_bytes == 2_000_000_000


def test_split_keeps_each_site_block_first_and_balances_the_pieces():
    unet = load_unet("tiny", "random")
    groups = _split(build_steps(unet, find_merge_sites(unet)))
    out = split_by_size(groups, LIMIT, 4)
    assert [g[0].site for g in out if g[0].site is not None] == [g[0].site for g in groups if g[0].site is not None]
    assert sum(len(g) for g in out) == sum(len(g) for g in groups)
    sizes = [sum(_step_bytes(s, 4, set()) for s in g) for g in out if g[0].site is None]
    middle = [n for n in sizes if n > 1_000_000]
    assert len(middle) >= 3 and max(middle) <= LIMIT
    assert split_by_size(groups, None, 4) is groups and split_by_size(groups, 10 ** 12, 4) == groups
    with pytest.raises(CatomeError, match="max_stage_bytes must be > 0"):
        split_by_size(groups, 0, 4)


@pytest.mark.slow
def test_a_build_with_pieces_verifies_and_runs_on_every_backend(tmp_path):
    """--max-stage-gb 0.004: the build's checks, its verification, the manifest's rebuild command, and the runtime on
    ONNX Runtime and on the torch backend (which cuts the U-Net again, as the manifest records)."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'catome-export[ort]')")
    from catome_export.engine.options import make_options
    from catome_export.engine.manifest import Manifest
    from catome_export.runtime import Runtime
    from catome_export.workflows.build import run_build

    out = tmp_path / "tiny"
    result = run_build(make_options("tiny", resolution=128, batch=2, out_dir=out, verify=True, verify_steps=3,
                                    ort_optimize=False, max_stage_gb=LIMIT / 1e9))
    assert result.verify is not None and result.verify.ok, result.verify.summary()
    manifest = Manifest.load(out)
    assert len(manifest.stages) > len(manifest.sites) + 1
    assert manifest.extra["export"]["max_stage_bytes"] == LIMIT
    assert "--max-stage-gb 0.004 " in build_command(manifest.rebuild_options())
    assert max(result.quick_check.values()) <= 1e-4 and result.audit.passed
    unet = load_unet("tiny", "random")
    feeds = _feeds(unet)
    outs = {}
    for backend in ("ort", "torch"):
        runtime = Runtime.load(out, backend=backend)
        try:
            runtime.reset()
            runtime.set_step(0)
            with torch.no_grad():
                outs[backend] = runtime.unet(feeds["sample"], feeds["timestep"],
                                             encoder_hidden_states=feeds["encoder_hidden_states"]).sample
            assert len(runtime.chain.runners) == len(manifest.stages)
        finally:
            runtime.close()
    assert float((outs["ort"] - outs["torch"]).abs().max()) <= 1e-4
