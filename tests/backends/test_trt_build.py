"""TensorRT engine builds: plugin-op detection, the errors without TensorRT, and (with TensorRT) the build itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from catome_export.backends import select
from catome_export.errors import CatomeError
from catome_export.export.profiles import num_src
from catome_export.export.trt_build import build_engines, plan_file, scan_onnx_ops

REPO = Path(__file__).resolve().parents[2]


def _scatter_model(path: Path, reduction: str | None, op: str = "ScatterElements") -> Path:
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, [2, 4, 3])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [2, "R", 3])
    upd = helper.make_tensor_value_info("upd", TensorProto.FLOAT, [2, "R", 3])
    attrs = {"axis": 1} if op == "ScatterElements" else {}
    if reduction is not None:
        attrs["reduction"] = reduction
    node = helper.make_node(op, ["data", "idx", "upd"], ["out"], **attrs)
    norm = helper.make_node("InstanceNormalization", ["out", "scale", "bias"], ["normed"])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [4], [1.0] * 4)
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [4], [0.0] * 4)
    normed = helper.make_tensor_value_info("normed", TensorProto.FLOAT, [2, 4, 3])
    graph = helper.make_graph([node, norm], "g", [data, idx, upd], [normed], initializer=[scale, bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("reduction, plugins", [
    ("add", ["ScatterElements(reduction=add)"]),
    ("mul", ["ScatterElements(reduction=mul)"]),
    ("none", []),
    (None, []),
])
def test_scan_finds_reducing_scatter(tmp_path, reduction, plugins):
    ops = scan_onnx_ops(_scatter_model(tmp_path / "m.onnx", reduction))
    assert ops["plugins"] == plugins
    assert ops["instance_norm"] is True and ops["custom_domains"] == []


def test_scan_of_exported_merge_finds_the_plugin_op(tmp_path):
    """The merge's scatter_add exports as ScatterElements(reduction=add): the op that needs libnvinfer_plugin."""
    import torch

    from catome_export.merging import match_tokens, merge_tokens

    class Merge(torch.nn.Module):
        def forward(self, x, keep, src, slot, weight):
            return merge_tokens(x, keep, src, slot, weight)

    x = torch.randn(1, 16, 4)
    plan = match_tokens(x, (4, 4), num_merged=3)
    path = tmp_path / "merge.onnx"
    torch.onnx.export(Merge().eval(), (x, *plan.tensors()[:4]), str(path), dynamo=True)
    assert scan_onnx_ops(path)["plugins"] == ["ScatterElements(reduction=add)"]


def test_scan_damaged_file(tmp_path):
    bad = tmp_path / "stage_0.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(CatomeError, match="damaged"):
        scan_onnx_ops(bad)


def test_build_without_tensorrt_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(select, "_has", lambda module: module != "tensorrt")
    with pytest.raises(CatomeError) as err:
        build_engines(tmp_path, {"stages": []}, fp16=False)
    assert "TensorRT" in str(err.value) and "pip install" in str(err.value)


def test_build_rejects_bad_optimisation_level(tmp_path):
    with pytest.raises(CatomeError, match="0..5"):
        build_engines(tmp_path, {"stages": []}, fp16=False, builder_optimization_level=7)


def test_plan_file_name():
    assert plan_file(3) == "stage_3.plan"


def _has_build_command() -> bool:
    return (REPO / "catome_export" / "cli" / "cmd_build.py").is_file()


@pytest.mark.skipif(select._has("tensorrt"), reason="TensorRT is installed here: the missing-TensorRT path cannot run")
def test_cli_build_trt_without_tensorrt_exits_1(tmp_path):
    if not _has_build_command():
        pytest.skip("the build command is not part of this checkout")
    proc = subprocess.run(
        [sys.executable, "-m", "catome_export.cli", "build", "--model", "tiny", "--backend", "trt",
         "--out", str(tmp_path / "tiny")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 1, proc.stderr
    assert "TensorRT" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")


@pytest.mark.trt
@pytest.mark.gpu
def test_build_writes_plans_cache_and_trt_section(tmp_path):
    """Build tiny's engines twice: plans and the timing cache are written, the second build reuses the cache."""
    from catome_export.cli.main import main
    from catome_export.export.manifest import Manifest

    out = tmp_path / "tiny"
    assert main(["build", "--model", "tiny", "--backend", "trt", "--out", str(out)]) == 0
    manifest = Manifest.load(out)
    section = manifest.trt
    assert section["version"] and section["gpu"] and section["compute_capability"]
    assert section["plugins"] == ["ScatterElements(reduction=add)"]
    assert len(section["profiles"]) == len(manifest.stages)
    cache = out / "timing.cache"
    assert cache.is_file() and cache.stat().st_size > 0
    again = build_engines(out, manifest, fp16=False)
    assert [e["file"] for e in again["engines"]] == [plan_file(i) for i in range(len(manifest.stages))]
    for e in again["engines"]:
        assert (out / e["file"]).stat().st_size == e["bytes"]
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.lock"))
    json.dumps(again)  # the section is JSON-ready


def test_shared_timing_cache_is_per_version_and_gpu(monkeypatch, tmp_path):
    from catome_export.export.trt_build import shared_timing_cache

    monkeypatch.setenv("CATOME_EXPORT_CACHE", str(tmp_path))
    path = shared_timing_cache("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert path == tmp_path / "trt-timing" / "trt10.3.0-sm90-nvidia-h100-80gb-hbm3.cache"
    assert shared_timing_cache("10.4.0", "NVIDIA H100 80GB HBM3", "9.0") != path
    assert shared_timing_cache("10.3.0", "NVIDIA L40S", "8.9") != path
    monkeypatch.delenv("CATOME_EXPORT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert shared_timing_cache("10.3.0", "X", "9.0").parent == tmp_path / "xdg" / "catome-export" / "trt-timing"


# -- the build orchestration, against stand-ins for tensorrt and Polygraphy's loaders ---------------------------------

class _Recorder:
    def __init__(self) -> None:
        self.networks: list[tuple[str, list]] = []
        self.configs: list[dict] = []
        self.built: list[str] = []
        self.plugin_inits = 0
        self.fail_on: str | None = None


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """Patch tensorrt, the GPU query and Polygraphy's loaders; returns the call recorder."""
    import io
    from types import SimpleNamespace

    import polygraphy.backend.trt as poly_trt
    from polygraphy.backend.trt import util as poly_util
    from polygraphy.exception import PolygraphyException

    from catome_export.export import trt_build

    rec = _Recorder()

    def init_plugins(logger, namespace):
        rec.plugin_inits += 1
        return True

    fake_trt = SimpleNamespace(__version__="10.3.0", OnnxParserFlag=SimpleNamespace(NATIVE_INSTANCENORM="NATIVE_IN"),
                               init_libnvinfer_plugins=init_plugins)
    monkeypatch.setattr(trt_build, "_import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(trt_build, "gpu_info", lambda: ("Fake GPU 80GB", "9.0"))
    monkeypatch.setattr(poly_util, "get_trt_logger", lambda: "logger")
    monkeypatch.setenv("CATOME_EXPORT_CACHE", str(tmp_path / "user-cache"))

    class Network:
        def __init__(self, path, flags=None):
            self.path = path
            rec.networks.append((path, flags))

        def __call__(self):
            return ("builder", self.path, "parser")

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data

    class Config:
        def __init__(self, **kwargs):
            loaded = kwargs.get("load_timing_cache")
            kwargs["loaded_cache"] = loaded.read() if isinstance(loaded, io.BytesIO) else loaded
            rec.configs.append(kwargs)
            self.kwargs = kwargs

        def __call__(self, builder, network):
            prior = self.kwargs["loaded_cache"] or b""
            return SimpleNamespace(get_timing_cache=lambda: Cache(prior + f"|{Path(network).name}".encode()),
                                   network=network)

    def build(network_tuple, config):
        path = network_tuple[1]
        if rec.fail_on and path.endswith(rec.fail_on):
            raise PolygraphyException("Invalid Engine")
        rec.built.append(path)
        return f"PLAN:{Path(path).name}".encode()

    monkeypatch.setattr(poly_trt, "NetworkFromOnnxPath", Network)
    monkeypatch.setattr(poly_trt, "CreateConfig", Config)
    monkeypatch.setattr(poly_trt, "engine_bytes_from_network", build)
    return rec


class _FolderManifest:
    """What build_engines reads from a Manifest: stages, specs, shapes, sites, merge settings, precision."""

    def __init__(self, folder: Path, precision: str = "fp32") -> None:
        from catome_export.export.stages import StageSpec, TensorSpec, plan_specs

        self.precision = precision
        self.shapes = {"batch": [1, 2], "latent_height": [8, 16], "latent_width": [8, 16], "text_len": 77,
                       "opt": {"batch": 2, "latent_height": 16, "latent_width": 16, "merge_fraction": 0.5}}
        self.sites = [{"index": 0, "path": "p", "downsample": 1, "channels": 3}]
        self.merge = {"stride": [2, 2]}
        self._specs = [
            StageSpec(0, None, 0, (TensorSpec("sample", "float32", ("B", 4, "H", "W")),),
                      (TensorSpec("x0", "float32", ("B", "N0", 3)),)),
            StageSpec(1, 0, None, (TensorSpec("x0", "float32", ("B", "N0", 3)), *plan_specs(0)),
                      (TensorSpec("noise_pred", "float32", ("B", 4, "H", "W")),)),
        ]
        self.stages = [{"index": s.index, "file": f"stage_{s.index}.onnx", **s.to_dict()} for s in self._specs]
        _scatter_model(folder / "stage_0.onnx", None)
        _scatter_model(folder / "stage_1.onnx", "add")

    def stage_specs(self):
        return self._specs


def test_build_orchestration(fake_build, tmp_path):
    from catome_export.export.profiles import compute_profiles, profiles_to_json
    from catome_export.export.trt_build import shared_timing_cache

    folder = tmp_path / "engine"
    folder.mkdir()
    manifest = _FolderManifest(folder)
    shared = shared_timing_cache("10.3.0", "Fake GPU 80GB", "9.0")
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"OLD")
    calls = []
    section = build_engines(folder, manifest, fp16=False, builder_optimization_level=4,
                            progress=lambda k, n, msg: calls.append((k, n, msg)))
    # plans written, hashed, no temp files left
    assert (folder / "stage_0.plan").read_bytes() == b"PLAN:stage_0.onnx"
    assert [e["file"] for e in section["engines"]] == ["stage_0.plan", "stage_1.plan"]
    assert section["engines"][1]["bytes"] == len(b"PLAN:stage_1.onnx")
    assert not list(folder.glob(".*.tmp"))
    # the timing cache: seeded from the user cache, grown stage by stage, saved in the folder and the user cache
    assert [c["loaded_cache"] for c in fake_build.configs] == [b"OLD", b"OLD|stage_0.onnx"]
    assert (folder / "timing.cache").read_bytes() == b"OLD|stage_0.onnx|stage_1.onnx"
    assert shared.read_bytes() == b"OLD|stage_0.onnx|stage_1.onnx"
    # config: profiles of compute_profiles, fp16 off for fp32 graphs, the optimisation level
    expected = compute_profiles(manifest, None, None)
    for cfg, prof in zip(fake_build.configs, expected):
        assert cfg["fp16"] is False and cfg["builder_optimization_level"] == 4
        (poly_profile,) = cfg["profiles"]
        assert {name: tuple(tuple(v) for v in shapes) for name, shapes in poly_profile.items()} == prof
    assert all(flags == ["NATIVE_IN"] for _, flags in fake_build.networks)
    # plugins registered once, for the stage with the reducing scatter
    assert fake_build.plugin_inits == 1
    assert section["plugins"] == ["ScatterElements(reduction=add)"]
    assert (section["version"], section["gpu"], section["compute_capability"]) == ("10.3.0", "Fake GPU 80GB", "9.0")
    assert section["profiles"] == profiles_to_json(expected) and section["opt_merge_fraction"] == 0.5
    assert section["timing_cache"] == "timing.cache"
    assert [c[:2] for c in calls] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    json.dumps(section)


def test_build_fp16_graphs_always_enable_fp16_and_opt_fraction_override(fake_build, tmp_path):
    folder = tmp_path / "engine"
    folder.mkdir()
    section = build_engines(folder, _FolderManifest(folder, precision="fp16"), fp16=False, opt_merge_fraction=0.8)
    assert all(cfg["fp16"] is True for cfg in fake_build.configs)
    assert section["fp16"] is True and section["opt_merge_fraction"] == 0.8
    assert section["profiles"][1]["site0_src_idx"]["opt"] == [2, round(0.8 * num_src((16, 16)))]


def test_build_failure_is_a_catome_error_and_keeps_old_plans(fake_build, tmp_path):
    folder = tmp_path / "engine"
    folder.mkdir()
    manifest = _FolderManifest(folder)
    (folder / "stage_1.plan").write_bytes(b"previous")
    fake_build.fail_on = "stage_1.onnx"
    with pytest.raises(CatomeError, match="could not build stage_1.onnx"):
        build_engines(folder, manifest, fp16=False)
    assert (folder / "stage_1.plan").read_bytes() == b"previous"


def test_build_missing_onnx(fake_build, tmp_path):
    folder = tmp_path / "engine"
    folder.mkdir()
    manifest = _FolderManifest(folder)
    (folder / "stage_1.onnx").unlink()
    with pytest.raises(CatomeError, match="stage_1.onnx is missing"):
        build_engines(folder, manifest, fp16=False)
