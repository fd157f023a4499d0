"""SD 1.5 at its real size (seeded random weights): ``catome-export build`` end to end, at 64 px.

The weights, not the resolution, make this model hard to export: stage 2
holds 3.3 GB of fp32 weights, over protobuf's 2 GB limit, so the exporter
writes them to external files and the build must keep them there. The
resolution is the smallest the CLI accepts (64 px, an 8 x 8 latent), which
changes nothing in the graphs and keeps the runs short.

- fp32 with the ONNX Runtime backend, through the CLI: the folder holds one
  external weights file for stage 2 whose size and hash the manifest
  records; ``Runtime.load`` runs it, compared with the torch stages on the
  engine's own plans (so a near-tie in matching cannot hide or fake a
  difference) and, with merging off, with the diffusers U-Net itself.
- fp16: SD 2.1's architecture (the same size, SD 2.x's layout) in
  test_sd21_real_size_fp16.py, a file of its own, so that the two builds can
  run on two test workers at once.

Cost (``/usr/bin/time -v python -m pytest -q -p no:cacheprovider
tests/export/test_sd15_real_size.py`` on a 2-core x86-64 CPU with 24 GiB,
shared with other work; the process averaged 0.96 of a core): 7 min 12 s
wall (297 s user + 121 s system), peak RSS 10.4 GB. Of that, the fp32 build
took 101 s, the fp32 runtime checks 49 s and the fp16 build 255 s; the fp32
build alone peaks at 4.6 GB.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from catome_export.export.external_data import PROTO_LIMIT
from catome_export.fsutil import sha256_file
from catome_export.engine.manifest import MANIFEST_FILE, Manifest

pytestmark = pytest.mark.slow
ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'catome-export[ort]')")

RESOLUTION = 64
"""Image side in pixels: the CLI's minimum, as the build_sd15 fixture (tests/export/conftest.py) builds."""
TOLERANCE = 1e-4
"""The build's fp32 limit (times max(1, max |reference|)), as in its verification."""


@pytest.fixture(scope="module")
def sd15_fp32(tmp_path_factory, build_sd15) -> tuple[Path, str]:
    """(folder, build output) of ``catome-export build --model sd15 --weights random --engine-kind ort`` at 64 px."""
    out = tmp_path_factory.mktemp("sd15_fp32") / "sd15"
    return out, build_sd15(out)


def test_fp32_build_keeps_the_large_stage_in_one_external_file(sd15_fp32, sd15_parameters, weight_bytes):
    import onnx

    out, stdout = sd15_fp32
    manifest = Manifest.load(out, check_files=True, check_hashes=True)  # sizes and hashes as recorded
    assert len(manifest.stages) == 6 and len(manifest.sites) == 5
    external = {e.index: e for e in manifest.stages if e.external_data}
    assert list(external) == [2], "only stage 2 (90 % of the weights) is over the threshold"
    entry = external[2]
    data = out / entry.external_data
    assert entry.external_data == "stage_2.onnx.data"
    assert entry.external_data_bytes == data.stat().st_size > PROTO_LIMIT
    assert entry.external_data_sha256 == sha256_file(data)
    assert (out / entry.file).stat().st_size < 50_000_000  # the graph alone
    weights = weight_bytes(out, manifest)
    # Every weight once. Not exactly: the exporter keeps one copy of identical initializers, and freshly
    # initialised norm layers are all ones and zeros (0.02 % of the bytes here).
    assert 0.999 < weights[onnx.TensorProto.FLOAT] / (4 * sd15_parameters) < 1.001
    names = sorted(p.name for p in out.iterdir())
    # the standard graphs and, as an ONNX Runtime build writes by default, ONNX Runtime's fused form of each
    assert [s.ort_optimized.file if s.ort_optimized else None for s in manifest.stages] == [
        f"stage_{k}.ort.onnx" for k in range(6)]
    fused = [name for s in manifest.stages if s.ort_optimized for name, _, _ in s.ort_optimized.files()]
    assert names == sorted([MANIFEST_FILE, "stage_2.onnx.data", "lora_map.json"] + [f"stage_{k}.onnx" for k in range(6)]
                           + fused)
    assert "TensorRT operator audit: pass" in stdout


def _record_plans(runtime) -> dict[int, list]:
    """Site -> the plans the runtime used, call by call (the controller's own method, observed)."""
    seen: dict[int, list] = {}
    controller = runtime.controller
    plan_for = controller.plan_for

    def recording(site, x, grid):
        plan = plan_for(site, x, grid)
        seen.setdefault(site, []).append(plan)
        return plan

    controller.plan_for = recording
    return seen


def _inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hw = RESOLUTION // 8
    return (torch.randn(batch, 4, hw, hw, generator=gen), torch.full((batch,), 901.0),
            torch.randn(batch, 77, 768, generator=gen))


def test_fp32_engine_runs_and_matches_eager(sd15_fp32):
    from catome_export.export.stages import cut_unet, run_stages
    from catome_export.models import find_merge_sites, load_unet
    from catome_export.runtime.runtime import Runtime

    out, _ = sd15_fp32
    unet = load_unet("sd15", weights="random")
    sites = find_merge_sites(unet)
    stages = cut_unet(unet, sites)
    built = Manifest.load(out, check_hashes=False).merge
    sample, timestep, text = _inputs(batch=2, seed=0)

    # Half of every site's src tokens merged, two calls: the first matches, the second may reuse the cache.
    with Runtime.load(out, backend="ort", device="cpu",
                      settings=replace(built, threshold=None, merge_fraction=0.5)) as runtime:
        plans = _record_plans(runtime)
        got = [runtime.step(sample, timestep, text), runtime.step(sample * 0.9, timestep - 20.0, text)]
    assert sorted(plans) == [s.index for s in sites]
    assert all(p.num_merged > 0 for calls in plans.values() for p in calls)
    for call, (x, t) in enumerate([(sample, timestep), (sample * 0.9, timestep - 20.0)]):
        with torch.no_grad():
            want = run_stages(stages, {"sample": x, "timestep": t, "encoder_hidden_states": text},
                              lambda k, _x: plans[k][call].tensors())["noise_pred"]
        limit = TOLERANCE * max(1.0, float(want.abs().max()))
        assert float((got[call] - want).abs().max()) <= limit, f"call {call}"

    # Merging off (t = 1 merges nothing): the engine is the diffusers U-Net itself.
    with Runtime.load(out, backend="ort", device="cpu", settings=replace(built, threshold=1.0)) as runtime:
        got = runtime.step(sample, timestep, text)
        assert all(r == 0 for r in runtime.history[-1].merged.values())
    with torch.no_grad():
        want = unet(sample, timestep, encoder_hidden_states=text).sample
    assert float((got - want).abs().max()) <= TOLERANCE * max(1.0, float(want.abs().max()))
