"""TensorRT engine builds: plugin-op detection, the errors without TensorRT, and the build itself through the real
Polygraphy package against the ``tensorrt`` stand-in playing TensorRT 10.13 and 11.1 (and, marked ``trt``, real TensorRT)."""

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
from catome_export.export.trt_build import TrtBuild, build_engines, plan_file, scan_onnx_ops
from factories import make_manifest

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
        build_engines(tmp_path, make_manifest(), fp16=False)
    assert "TensorRT" in str(err.value) and "pip install" in str(err.value)


def test_build_rejects_bad_optimisation_level(tmp_path):
    with pytest.raises(CatomeError, match="0..5"):
        build_engines(tmp_path, make_manifest(), fp16=False, builder_optimization_level=7)


def test_plan_file_name():
    assert plan_file(3) == "stage_3.plan"


def _has_build_command() -> bool:
    return (REPO / "catome_export" / "cli" / "cmd_build.py").is_file()


@pytest.mark.skipif(select._has("tensorrt"), reason="TensorRT is installed here: the missing-TensorRT path cannot run")
def test_cli_build_trt_without_tensorrt_exits_1(tmp_path):
    if not _has_build_command():
        pytest.skip("the build command is not part of this checkout")
    proc = subprocess.run(
        [sys.executable, "-m", "catome_export.cli", "build", "--model", "tiny", "--engine-kind", "trt",
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
    from catome_export.engine.manifest import Manifest

    out = tmp_path / "tiny"
    assert main(["build", "--model", "tiny", "--engine-kind", "trt", "--out", str(out)]) == 0
    manifest = Manifest.load(out)
    section = manifest.trt
    assert section.version and section.gpu and section.compute_capability
    assert section.plugins == ("ScatterElements(reduction=add)",)
    assert len(section.profiles) == len(manifest.stages)
    cache = out / "timing.cache"
    assert cache.is_file() and cache.stat().st_size > 0
    again = build_engines(out, manifest, fp16=False)
    assert [e.file for e in again.engines] == [plan_file(i) for i in range(len(manifest.stages))]
    for e in again.engines:
        assert (out / e.file).stat().st_size == e.bytes
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.lock"))
    json.dumps(again.record.to_dict())  # the section is JSON-ready


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


# -- real Polygraphy, the tensorrt stand-in (10.x and 11.x), the tiny model's stages --------------------------------

def _build_tiny(out: Path, precision: str) -> Path:
    """The tiny model's stages exported to ONNX (ORT build, no verification): what a TensorRT build starts from."""
    from catome_export.cli.main import main

    assert main(["build", "--model", "tiny", "--engine-kind", "ort", "--precision", precision, "--no-verify",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_onnx_fp32(tmp_path_factory) -> Path:
    return _build_tiny(tmp_path_factory.mktemp("tiny32") / "tiny", "fp32")


@pytest.fixture(scope="session")
def tiny_onnx_fp16(tmp_path_factory) -> Path:
    return _build_tiny(tmp_path_factory.mktemp("tiny16") / "tiny", "fp16")


def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def _plans(folder: Path, built: TrtBuild) -> list[dict]:
    from tensorrt._formats import describe_plan

    return [describe_plan((folder / e.file).read_bytes()) for e in built.engines]


def _no_lock_or_temp_files(*folders: Path) -> None:
    for folder in folders:
        left = [p.name for p in folder.rglob("*") if p.name.endswith((".lock", ".tmp"))]
        assert not left, left


def _float_io(plan: dict) -> set[str]:
    return {t["dtype"] for t in plan["io"] if t["dtype"] in ("FLOAT", "HALF", "BF16")}


def test_fp32_build_of_tiny_through_polygraphy(trt_machine, tiny_onnx_fp32, tmp_path):
    """Every stage builds; each plan has the manifest's I/O and the computed profiles, is strongly typed, fp32,
    made by this exact TensorRT, and loads in the runtime with the same profile."""
    from catome_export.engine.manifest import Manifest
    from catome_export.export.profiles import compute_profiles, profiles_to_json

    trt = trt_machine
    folder = _copy(tiny_onnx_fp32, tmp_path)
    manifest = Manifest.load(folder)
    built = build_engines(folder, manifest, fp16=False, builder_optimization_level=2)
    section = built.record
    plans = _plans(folder, built)
    assert len(plans) == len(manifest.stages) == len(built.engines)
    expected = compute_profiles(manifest, None, None)
    assert list(section.profiles) == profiles_to_json(expected)
    assert (section.version, section.fp16, section.strongly_typed) == (trt.__version__, False, True)
    trt.init_libnvinfer_plugins(None, "")
    runtime = trt.Runtime(trt.Logger())
    for stage, plan, profile, entry in zip(manifest.stages, plans, expected, built.engines):
        stage = stage.to_dict()
        assert plan["version"] == trt.__version__ and plan["strongly_typed"] is True
        assert not any(f in plan["builder_flags"] for f in ("FP16", "BF16", "INT8", "FP8"))
        assert _float_io(plan) == {"FLOAT"} and plan["fp16_kernels"] is False
        assert plan["builder_optimization_level"] == 2
        names = {t["name"] for t in plan["io"]}
        assert names == {t["name"] for t in stage["inputs"]} | {t["name"] for t in stage["outputs"]}
        assert plan["profiles"] == [{k: [list(v) for v in shapes] for k, shapes in profile.items()}]
        engine = runtime.deserialize_cuda_engine((folder / entry.file).read_bytes())
        assert engine is not None and engine.num_optimization_profiles == 1
        for name, shapes in profile.items():
            assert [tuple(d) for d in engine.get_tensor_profile_shape(name, 0)] == [tuple(v) for v in shapes]
    merging = [p for p in plans if any(t["name"].endswith("_src_idx") for t in p["io"])]
    assert merging and all(p["plugins"] == ["ScatterElements"] for p in merging)
    assert section.plugins == ("ScatterElements(reduction=add)",)
    _no_lock_or_temp_files(folder, tmp_path / "user-cache")
    json.dumps(section.to_dict())


def test_fp16_build_is_strongly_typed_from_the_fp16_export(trt_machine, tiny_onnx_fp16, tmp_path):
    """fp16 engines on both majors: the fp16 graphs parsed strongly typed; no precision builder flag is set (11.x has
    none, and Polygraphy would raise if the build asked for one)."""
    from catome_export.engine.manifest import Manifest

    trt = trt_machine
    folder = _copy(tiny_onnx_fp16, tmp_path)
    manifest = Manifest.load(folder)
    assert manifest.precision == "fp16"
    built = build_engines(folder, manifest, fp16=True)
    assert built.record.fp16 is True and built.record.strongly_typed is True
    for plan in _plans(folder, built):
        assert plan["strongly_typed"] and plan["fp16_kernels"] and "HALF" in _float_io(plan)
        assert "FP16" not in plan["builder_flags"]
    if trt.__version__.startswith("11."):
        assert not hasattr(trt.BuilderFlag, "FP16")


def test_fp16_engines_need_the_fp16_export(trt_machine, tiny_onnx_fp32, tmp_path):
    from catome_export.engine.manifest import Manifest

    folder = _copy(tiny_onnx_fp32, tmp_path)
    with pytest.raises(CatomeError, match="--precision fp16"):
        build_engines(folder, Manifest.load(folder), fp16=True)
    assert not list(folder.glob("*.plan"))


def _cache_entries(path: Path) -> set[str]:
    from tensorrt._formats import describe_timing_cache

    return set(describe_timing_cache(path.read_bytes())["entries"])


def test_timing_cache_seeded_grown_and_saved_without_lock_files(trt_machine, tiny_onnx_fp32, tmp_path):
    """First build: a new cache, saved in the folder and the per-user copy. Second build in a new folder: seeded
    from the per-user copy, every earlier entry kept, nothing new needed; no .lock file anywhere."""
    from catome_export.engine.manifest import Manifest
    from catome_export.export.trt_build import shared_timing_cache

    trt = trt_machine
    first = _copy(tiny_onnx_fp32, tmp_path / "a")
    build_engines(first, Manifest.load(first), fp16=False)
    shared = shared_timing_cache(trt.__version__, "Stand-in GPU (sm90)", "9.0")
    grown = _cache_entries(first / "timing.cache")
    assert grown and _cache_entries(shared) == grown
    second = _copy(tiny_onnx_fp32, tmp_path / "b")
    build_engines(second, Manifest.load(second), fp16=False, opt_merge_fraction=0.25)
    again = _cache_entries(second / "timing.cache")
    assert grown < again  # seeded with the first build's entries, grown by the new profiles' tactics
    assert _cache_entries(shared) == again
    _no_lock_or_temp_files(first, second, shared.parent)


@pytest.mark.parametrize("what", ["damaged", "other-version"])
def test_unusable_timing_cache_is_replaced(trt_machine, tiny_onnx_fp32, tmp_path, caplog, what):
    from tensorrt import _formats

    from catome_export.engine.manifest import Manifest

    trt = trt_machine
    folder = _copy(tiny_onnx_fp32, tmp_path)
    cache = folder / "timing.cache"
    other = "10.12.0.36" if trt.__version__.startswith("11.") else "11.0.0.114"
    cache.write_bytes(b"not a cache" if what == "damaged" else
                      _formats.encode_cache({"version": other, "device": "Stand-in GPU (sm90)", "entries": ["x"]}))
    with caplog.at_level("WARNING"):
        build_engines(folder, Manifest.load(folder), fp16=False)
    assert "cannot be used here" in caplog.text
    assert _formats.describe_timing_cache(cache.read_bytes())["version"] == trt.__version__
    assert "x" not in _cache_entries(cache)


def _int32_scatter(path: Path) -> None:
    """A graph TensorRT's parser refuses: ScatterElements with a reduction and INT32 indices."""
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, [2, 4, 3])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT32, [2, 2, 3])
    upd = helper.make_tensor_value_info("upd", TensorProto.FLOAT, [2, 2, 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 3])
    node = helper.make_node("ScatterElements", ["data", "idx", "upd"], ["out"], axis=1, reduction="add")
    onnx.save(helper.make_model(helper.make_graph([node], "g", [data, idx, upd], [out]),
                                opset_imports=[helper.make_opsetid("", 18)]), path)


def test_parser_refusal_is_a_catome_error_and_keeps_old_plans(trt_machine, tiny_onnx_fp32, tmp_path):
    from catome_export.engine.manifest import Manifest

    trt = trt_machine
    folder = _copy(tiny_onnx_fp32, tmp_path)
    manifest = Manifest.load(folder)
    last = len(manifest.stages) - 1
    (folder / plan_file(last)).write_bytes(b"previous")
    _int32_scatter(folder / f"stage_{last}.onnx")
    with pytest.raises(CatomeError) as err:
        build_engines(folder, manifest, fp16=False)
    msg = str(err.value)
    assert f"stage {last}" in msg and trt.__version__ in msg and "Traceback" not in msg
    assert (folder / plan_file(last)).read_bytes() == b"previous"


def _fails_on_11_builds_on_10(trt, folder, manifest, *expected: str) -> None:
    """With TensorRT 11 the build fails in one line holding ``expected`` (the TensorRT version too) and leaves no
    plan; with 10.x (which still has the members 0.49 reads, deprecated) it builds every stage."""
    if trt.__version__.startswith("11."):
        with pytest.raises(CatomeError) as err:
            build_engines(folder, manifest, fp16=False)
        msg = str(err.value)
        assert all(part in msg for part in (*expected, trt.__version__)) and "\n" not in msg, msg
        assert not list(folder.glob("*.plan"))
    else:
        assert len(build_engines(folder, manifest, fp16=False).engines) == len(manifest.stages)


def test_polygraphy_049_is_refused_up_front_for_tensorrt_11(trt_machine, tiny_onnx_fp32, tmp_path, monkeypatch):
    """Polygraphy 0.49.x reads every layer's ``precision_is_set``, which TensorRT 11 removed: with 11 the build stops
    before parsing anything, in one line naming the upgrade; with 10 that Polygraphy builds as before."""
    import polygraphy

    from catome_export.engine.manifest import Manifest

    trt = trt_machine
    monkeypatch.setattr(polygraphy, "__version__", "0.49.9")
    folder = _copy(tiny_onnx_fp32, tmp_path)
    manifest = Manifest.load(folder)
    _fails_on_11_builds_on_10(trt, folder, manifest, "0.49.9", "pip install 'polygraphy>=0.50'")
    assert trt.__version__.startswith("10.") or not (folder / "timing.cache").exists()


def test_attribute_error_inside_polygraphy_is_a_catome_error(trt_machine, tiny_onnx_fp32, tmp_path, monkeypatch):
    """A Polygraphy that reads a TensorRT member the installed TensorRT lacks (0.49's unguarded
    ``layer.precision_is_set``, played here on top of the installed release) fails the build with a CatomeError
    naming the fix, never a raw AttributeError."""
    import polygraphy.backend.trt as poly_trt

    from catome_export.engine.manifest import Manifest

    trt = trt_machine
    real = poly_trt.CreateConfig

    class UnguardedCreateConfig:
        """``CreateConfig`` as Polygraphy 0.49.x runs it: the layers' precisions are read without a guard."""

        def __init__(self, **kwargs):
            self.inner = real(**kwargs)

        def __call__(self, builder, network):
            _ = {layer.name: layer.precision.name for layer in network
                 if layer.precision_is_set and not layer.type == trt.LayerType.SHAPE}
            return self.inner(builder, network)

    monkeypatch.setattr(poly_trt, "CreateConfig", UnguardedCreateConfig)
    folder = _copy(tiny_onnx_fp32, tmp_path)
    manifest = Manifest.load(folder)
    _fails_on_11_builds_on_10(trt, folder, manifest, "stage 0", "precision_is_set", "polygraphy>=0.50")


def test_build_missing_onnx(trt_machine, tiny_onnx_fp32, tmp_path):
    from catome_export.engine.manifest import Manifest

    folder = _copy(tiny_onnx_fp32, tmp_path)
    (folder / "stage_1.onnx").unlink()
    with pytest.raises(CatomeError, match="stage_1.onnx is missing"):
        build_engines(folder, Manifest.load(folder), fp16=False)


def test_plans_load_only_under_the_exact_version_that_built_them(trt_machine, trt_standin_helper, tiny_onnx_fp32,
                                                                 tmp_path, monkeypatch):
    """The stand-in follows deserialize_cuda_engine's contract (None under another build), and the compatibility
    check refuses the folder before that, naming both versions and the rebuild command."""
    from catome_export.backends.trt_compat import TrtRuntimeInfo, check_trt_compat
    from catome_export.engine.manifest import Manifest

    trt = trt_machine
    folder = _copy(tiny_onnx_fp32, tmp_path)
    manifest = Manifest.load(folder)
    build_engines(folder, manifest, fp16=False).apply(manifest)
    built = trt.__version__
    major, minor, patch, build = built.split(".")
    later = f"{major}.{minor}.{int(patch) + 1}.{build}"
    other = trt_standin_helper.activate(monkeypatch, later)
    other.init_libnvinfer_plugins(None, "")
    assert other.Runtime(other.Logger()).deserialize_cuda_engine((folder / plan_file(0)).read_bytes()) is None
    check_trt_compat(manifest, TrtRuntimeInfo(built, "Stand-in GPU (sm90)", "9.0"))
    with pytest.raises(CatomeError) as err:
        check_trt_compat(manifest, TrtRuntimeInfo(later, "Stand-in GPU (sm90)", "9.0"))
    from catome_export.cli.rebuild import error_line

    msg = error_line(err.value)  # as the command line prints it
    assert built in msg and later in msg and "exact" in msg and "--engine-kind trt" in msg


def test_cli_build_trt_with_standin_but_no_gpu_exits_1(trt_standin_helper, tmp_path):
    """The real command with the stand-in importable: TensorRT is found, the missing CUDA device is named."""
    proc = subprocess.run(
        [sys.executable, "-m", "catome_export.cli", "build", "--model", "tiny", "--engine-kind", "trt",
         "--out", str(tmp_path / "tiny")],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=trt_standin_helper.subprocess_env("11"),
    )
    if proc.returncode == 0:
        pytest.skip("a CUDA device is present: the no-GPU path cannot run")
    assert proc.returncode == 1, proc.stderr
    assert "CUDA device" in proc.stderr and "not installed" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("major", ["10", "11"])
def test_doctor_reports_the_standin_version_as_supported(trt_standin_helper, major):
    proc = subprocess.run([sys.executable, "-m", "catome_export.cli", "doctor"], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=trt_standin_helper.subprocess_env(major))
    line = next(x for x in proc.stdout.splitlines() if " tensorrt " in f" {x} ")
    assert line.startswith("ok") and trt_standin_helper.VERSIONS[major] in line, proc.stdout
