"""LoRA refit of TensorRT engines, built refittable through the real Polygraphy against the ``tensorrt`` stand-in
(TensorRT 10.13 and 11.1): weight-stripped plans refit at every load from the stage graphs and the overrides; plans
that keep their weights refit on disk under new names; ``set_lora`` refits the loaded engines in place."""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from catome_export.cli.rebuild import error_line
from catome_export.errors import CatomeError


@pytest.fixture(scope="module")
def lora_ort_engine(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from catome_export.workflows.build import build_engine

    folder = tmp_path_factory.mktemp("lora-trt") / "base"
    build_engine("tiny", backend="ort", resolution=128, min_batch=1, max_batch=2, out_dir=folder, verify=False,
                 ort_optimize=False)
    return folder


def _trt_folder(lora_ort_engine: Path, tmp_path: Path, *, refittable: bool = True) -> Path:
    """The ORT engine's graphs with TensorRT plans built as ``build --backend trt [--refittable]`` builds them."""
    from catome_export.engine.manifest import Manifest
    from catome_export.export.trt_build import build_engines

    folder = tmp_path / "engine"
    shutil.copytree(lora_ort_engine, folder)
    manifest = Manifest.load(folder)
    built = build_engines(folder, manifest, fp16=False, refittable=refittable)
    built.apply(manifest)
    manifest.lora = replace(manifest.lora, refittable=refittable,
                            stripped=bool(built.record.extra.get("strip_plan", False)))
    manifest.save(folder)
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _graph_digests(folder: Path, file: str) -> dict[str, str]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / file))
    return {t.name: _digest(numpy_helper.to_array(t)) for t in model.graph.initializer if t.data_type == 1}


def _load(trt, folder: Path):
    """The stand-in TensorRT backend with every stage loaded, as Runtime.load does it."""
    from catome_export.backends.trt import TrtBackend
    from catome_export.engine.manifest import Manifest
    from catome_export.lora.refit import InitializerOverrides

    manifest = Manifest.load(folder)
    backend = TrtBackend(manifest, "cpu", trt_module=trt, check_compat=False)
    backend.initializer_overrides = InitializerOverrides.of(folder, manifest)
    runners = [backend.load_stage(folder, stage) for stage in manifest.stages]
    return manifest, backend, runners


def _held(runners) -> list[dict[str, str | None]]:
    return [{n: w["digest"] for n, w in r.engine._weights.items()} for r in runners]


def test_refittable_build_strips_and_every_load_refits_from_the_graphs(trt_machine, lora_ort_engine, tmp_path,
                                                                       lora_files):
    from tensorrt._formats import describe_plan

    from catome_export.lora.refit import InitializerOverrides, refit_engine

    trt = trt_machine
    folder = _trt_folder(lora_ort_engine, tmp_path)
    manifest, backend, runners = _load(trt, folder)
    assert manifest.lora.refittable and manifest.lora.stripped
    for stage, runner in zip(manifest.stages, runners):
        plan = describe_plan((folder / stage.engine.file).read_bytes())
        assert plan["refit"]["refittable"] and plan["refit"]["stripped"]
        flags = set(plan["builder_flags"])
        assert "REFIT" in flags and flags & {"STRIP_PLAN", "WEIGHTLESS"}  # 10.x: WEIGHTLESS is STRIP_PLAN's alias
        assert _held([runner])[0] == _graph_digests(folder, stage.file)  # refit from the graph at load
    backend.close()
    plans = {s.engine.file: s.engine.sha256 for s in manifest.stages}
    new = refit_engine(folder, f"{lora_files['a']}:0.8")
    assert {s.engine.file: s.engine.sha256 for s in new.stages} == plans  # stripped plans hold no weights
    overrides = InitializerOverrides.of(folder, new)
    manifest, backend, runners = _load(trt, folder)
    changed = 0
    for stage, held in zip(manifest.stages, _held(runners)):
        want = _graph_digests(folder, stage.file)
        for name, array in overrides.for_file(stage.file).items():
            want[name] = _digest(array)
            changed += 1
        assert held == want
    assert changed == 128  # the LoRA's q, k, v and out projections
    backend.close()
    refit_engine(folder, None)
    manifest, backend, runners = _load(trt, folder)
    assert _held(runners) == [_graph_digests(folder, s.file) for s in manifest.stages]
    backend.close()


def test_plans_with_weights_are_refit_on_disk_under_new_names(trt_machine, lora_ort_engine, tmp_path, lora_files,
                                                              monkeypatch):
    from tensorrt._formats import describe_plan

    from catome_export.export import trt_build
    from catome_export.engine.manifest import Manifest
    from catome_export.lora.refit import InitializerOverrides, refit_engine

    monkeypatch.setattr(trt_build, "strip_plan_supported", lambda trt: False)
    folder = _trt_folder(lora_ort_engine, tmp_path)
    before = Manifest.load(folder)
    assert before.lora.refittable and not before.lora.stripped
    new = refit_engine(folder, f"{lora_files['b']}:1.5")
    overrides = InitializerOverrides.of(folder, new)
    renamed = 0
    for old, stage in zip(before.stages, new.stages):
        weights = overrides.for_file(stage.file)
        if weights:
            renamed += 1
            assert stage.engine.file.startswith(f"stage_{stage.index}.plan-") and stage.engine.file != old.engine.file
            assert not (folder / old.engine.file).exists()
        else:
            assert stage.engine == old.engine
        held = describe_plan((folder / stage.engine.file).read_bytes())["refit"]["weights"]
        for name, array in weights.items():
            assert held[name]["digest"] == _digest(array)
    assert renamed >= 2
    manifest, backend, runners = _load(trt_machine, folder)  # loads as it is: no refit needed at load
    backend.close()


def test_engine_built_without_refittable_is_refused_unchanged(trt_machine, lora_ort_engine, tmp_path, lora_files):
    from catome_export.lora.refit import refit_engine

    folder = _trt_folder(lora_ort_engine, tmp_path, refittable=False)
    before = _snapshot(folder)
    with pytest.raises(CatomeError, match="built without --refittable: rebuild with catome-export build") as err:
        refit_engine(folder, f"{lora_files['a']}:0.8")
    assert re.search("built without --refittable: rebuild with catome-export build .*--refittable",
                     error_line(err.value))
    assert _snapshot(folder) == before


def test_set_lora_refits_the_loaded_engines_and_rolls_back_on_failure(trt_machine, lora_ort_engine, tmp_path,
                                                                      lora_files, monkeypatch):
    import torch

    from catome_export.runtime.runtime import Runtime

    folder = _trt_folder(lora_ort_engine, tmp_path)
    manifest, backend, runners = _load(trt_machine, folder)
    runtime = Runtime.from_parts(runners, manifest.sites, manifest.merge, unet_config=manifest.model.unet_config,
                      dtype=torch.float32, device=backend.device, backend=backend, manifest=manifest,
                      engine_dir=folder)
    base = _held(runners)
    before = _snapshot(folder)
    assert runtime.set_lora(f"{lora_files['a']}:0.8") == "a.safetensors:0.8"
    with_a = _held(runtime.chain.runners)
    assert with_a != base and _snapshot(folder) == before
    real = backend.refit_stage
    calls = []

    def failing(runner, weights, **kwargs):
        calls.append(runner.spec.index)
        if len(calls) == 3:
            raise CatomeError("injected refit failure")
        return real(runner, weights, **kwargs)

    monkeypatch.setattr(backend, "refit_stage", failing)
    with pytest.raises(CatomeError, match="injected"):
        runtime.set_lora(f"{lora_files['b']}:1.2")
    assert _held(runtime.chain.runners) == with_a and runtime.lora == "a.safetensors:0.8"
    monkeypatch.setattr(backend, "refit_stage", real)
    runtime.set_lora(None)
    assert _held(runtime.chain.runners) == base
    runtime.close()
