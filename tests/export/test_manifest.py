"""Manifest: round trip, hash checks (manifest and stage files), schema problems, shape range checks."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import pytest

from catome_export.cli.rebuild import build_command, error_line
from catome_export.errors import CatomeError
from catome_export.engine.manifest import (
    MANIFEST_FILE, BuildRecord, FusedGraph, Manifest, canonical_hash, tool_versions,
)
from catome_export.merging import MergeSettings, parse_schedule
from factories import make_manifest, make_shapes


@pytest.fixture
def engine_dir(tmp_path, exported, export_stages, export_sites):
    """A copy of the shared export with a manifest written for it."""
    folder, items = exported
    target = tmp_path / "tiny"
    target.mkdir()
    for item in items:
        shutil.copy2(folder / item.file, target / item.file)
    settings = MergeSettings(threshold=0.6, schedule=parse_schedule("config2", 0))
    manifest = make_manifest(
        name="tiny", model="tiny", weights="random", unet_config={"a": 1}, merge=settings,
        sites=[replace(s, channels=32) for s in export_sites], shapes=make_shapes((1, 2), (16, 32)),
        stages=[item.record(spec) for item, (spec, _) in zip(items, export_stages)],
        build=BuildRecord.from_dict({"model": "tiny", "weights": "random", "precision": "fp32", "min_resolution": 128,
                                     "max_resolution": 256, "min_batch": 1, "max_batch": 2, "name": "tiny",
                                     "out": str(target)}),
    )
    manifest.tools = tool_versions()
    manifest.save(target)
    return target


def test_round_trip(engine_dir, export_stages):
    loaded = Manifest.load(engine_dir)
    raw = json.loads((engine_dir / MANIFEST_FILE).read_text())
    assert loaded.to_dict() == raw
    assert list(raw)[:13] == ["format_version", "catome_export_version", "name", "model", "precision", "merge",
                              "sites", "shapes", "stages", "engine_backend", "trt", "tools", "created"]
    assert list(raw)[-1] == "manifest_sha256" and raw["manifest_sha256"] == canonical_hash(raw)
    assert loaded.stage_specs() == [spec for spec, _ in export_stages]
    settings = loaded.merge
    assert settings.threshold == 0.6 and settings.schedule.step_base == 0 and settings.schedule.name == "config2"
    assert raw["tools"]["torch"] and raw["engine_backend"] == "ort" and raw["trt"] is None
    assert not [p for p in engine_dir.iterdir() if p.name.endswith(".tmp")]


def test_edited_manifest_is_detected(engine_dir):
    path = engine_dir / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["shapes"]["batch"] = [1, 64]
    path.write_text(json.dumps(data))
    with pytest.raises(CatomeError, match="manifest_sha256.*catome-export build"):
        Manifest.load(engine_dir)


def test_truncated_stage_file_is_detected(engine_dir):
    stage = engine_dir / "stage_2.onnx"
    data = stage.read_bytes()
    stage.write_bytes(data[: len(data) // 2])
    with pytest.raises(CatomeError, match=r"stage_2.onnx has \d+ bytes.*truncated.*catome-export build") as err:
        Manifest.load(engine_dir)
    assert re.search(r"stage_2.onnx has \d+ bytes.*truncated.*catome-export build --model tiny", error_line(err.value))


def test_replaced_stage_file_is_detected(engine_dir):
    stage = engine_dir / "stage_1.onnx"
    data = bytearray(stage.read_bytes())
    data[-1] ^= 0xFF
    stage.write_bytes(bytes(data))
    with pytest.raises(CatomeError, match="sha256"):
        Manifest.load(engine_dir)
    Manifest.load(engine_dir, check_hashes=False)  # sizes still match: only the hash check sees it


def test_missing_pieces(tmp_path, engine_dir):
    with pytest.raises(CatomeError, match="does not exist.*catome-export build"):
        Manifest.load(tmp_path / "nothing")
    (engine_dir / "stage_5.onnx").unlink()
    with pytest.raises(CatomeError, match="stage_5.onnx is missing"):
        Manifest.load(engine_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CatomeError, match="no manifest.json"):
        Manifest.load(empty)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(format_version=2), "format_version 2"),
    (lambda d: d.pop("stages"), "lacks stages"),
    (lambda d: d.update(precision="int3"), "unknown precision"),
    (lambda d: d["merge"].update(threshold=7.0), "merge settings"),
])
def test_schema_problems(engine_dir, edit, match):
    path = engine_dir / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    data["manifest_sha256"] = canonical_hash(data)
    path.write_text(json.dumps(data))
    with pytest.raises(CatomeError, match=match):
        Manifest.load(engine_dir)
    path.write_text("{not json")
    with pytest.raises(CatomeError, match="unreadable"):
        Manifest.load(engine_dir)


def test_check_shapes(engine_dir):
    m = Manifest.load(engine_dir)
    m.check_shapes(2, 16, 32)
    with pytest.raises(CatomeError, match=r"batch 3 is outside the built range 1..2.*batch 1..3") as err:
        m.check_shapes(3, 16, 16)
    assert re.search(r"batch 3 is outside the built range 1..2.*--max-batch 3", error_line(err.value))
    with pytest.raises(CatomeError, match=r"latent width 40 \(320 px\).*16..32") as err:
        m.check_shapes(1, 16, 40)
    assert re.search(r"latent width 40 \(320 px\).*16..32.*--max-resolution 320", error_line(err.value))


def test_rebuild_command_format():
    cmd = build_command(BuildRecord.from_dict({"model": "sd15", "weights": "random", "resolution": 512, "min_resolution": 256,
                         "max_resolution": 768, "name": "my engine", "verify": None}))
    assert cmd == ("catome-export build --model sd15 --weights random --min-resolution 256 --max-resolution 768 "
                   "--name 'my engine'")


def _with_fused_graph(engine_dir, index: int = 1) -> str:
    """List a copy of stage ``index`` as its ONNX Runtime-fused graph in the manifest (as a build does)."""
    from catome_export.fsutil import sha256_file

    manifest = Manifest.load(engine_dir)
    name = f"stage_{index}.ort.onnx"
    shutil.copy2(engine_dir / f"stage_{index}.onnx", engine_dir / name)
    fused = FusedGraph(name, sha256=sha256_file(engine_dir / name), bytes=(engine_dir / name).stat().st_size)
    manifest.stages = tuple(replace(s, ort_optimized=fused) if s.index == index else s for s in manifest.stages)
    manifest.save(engine_dir)
    return name


def test_fused_graphs_are_vouched_for_like_the_stage_files(engine_dir):
    name = _with_fused_graph(engine_dir)
    assert (name, (engine_dir / name).stat().st_size, Manifest.load(engine_dir).stages[1].ort_optimized.sha256) \
        in Manifest.load(engine_dir).files()
    data = bytearray((engine_dir / name).read_bytes())
    data[-1] ^= 0xFF
    (engine_dir / name).write_bytes(bytes(data))
    with pytest.raises(CatomeError, match=r"stage_1.ort.onnx does not match its sha256.*catome-export build"):
        Manifest.load(engine_dir)
    (engine_dir / name).unlink()
    with pytest.raises(CatomeError, match=r"stage_1.ort.onnx is missing.*catome-export build"):
        Manifest.load(engine_dir)


def test_rebuild_command_keeps_ort_optimize_off():
    assert build_command(BuildRecord.from_dict({"model": "tiny", "ort_optimize": "off", "name": "t"})) == \
        "catome-export build --model tiny --ort-optimize off --name t"


def test_r_multiple_is_recorded_and_old_manifests_load_with_q1(engine_dir):
    manifest = Manifest.load(engine_dir)
    data = json.loads((engine_dir / "manifest.json").read_text())
    assert data["merge"]["r_multiple"] == manifest.merge.r_multiple == 1
    # a manifest written before r_multiple existed: the key absent, the hash over what is there
    del data["merge"]["r_multiple"]
    data["manifest_sha256"] = canonical_hash(data)
    (engine_dir / "manifest.json").write_text(json.dumps(data, indent=2))
    assert Manifest.load(engine_dir).merge.r_multiple == 1
    rounded = make_manifest(merge=MergeSettings(r_multiple=64))
    assert Manifest.from_dict(rounded.to_dict()).merge.r_multiple == 64
    assert "--r-multiple 64" in build_command(rounded.rebuild_options())
    assert "--r-multiple" not in build_command(make_manifest().rebuild_options())
    assert "--step-base 1 --r-multiple 64" in build_command(BuildRecord(model="tiny", step_base=1, r_multiple=64))
def test_controlnet_section_is_optional_and_typed():
    from catome_export.engine.controlnet import ControlNetRecord
    from catome_export.engine.specs import TensorSpec
    from factories import make_stages, site_stage_specs

    old = make_manifest()
    data = old.to_dict()
    assert "controlnet" not in data  # an engine without the option writes no section ...
    assert Manifest.from_dict(data).controlnet is None  # ... and folders built before it load as before
    assert "--controlnet" not in build_command(old.rebuild_options())
    specs = site_stage_specs(1)
    names = ("controlnet_down0", "controlnet_down1", "controlnet_mid")
    specs[-1] = replace(specs[-1], inputs=specs[-1].inputs + tuple(TensorSpec(n, "float32", ("B", 8, "H", "W"))
                                                                  for n in names))
    record = ControlNetRecord(down=names[:2])
    m = make_manifest(stages=make_stages(specs), controlnet=record)
    data = m.to_dict()
    assert data["controlnet"] == {"down": list(names[:2]), "mid": "controlnet_mid"}
    back = Manifest.from_dict(data)
    assert back.controlnet == record
    back._validate()
    assert build_command(back.rebuild_options()).endswith("--controlnet")
    assert build_command(BuildRecord.from_dict({"model": "tiny", "controlnet": True, "name": "t"})) == \
        "catome-export build --model tiny --name t --controlnet"
    wrong = Manifest.from_dict({**data, "controlnet": {"down": list(names[:1]), "mid": "controlnet_mid"}})
    with pytest.raises(CatomeError, match="lists 1 down residuals, the stages take 2.*rebuild it with"):
        wrong._validate()
    plain = Manifest.from_dict({**make_manifest().to_dict(), "controlnet": {"down": ["controlnet_down0"]}})
    with pytest.raises(CatomeError, match="no stage takes"):
        plain._validate()
    with pytest.raises(ValueError, match="controlnet section is malformed"):
        Manifest.from_dict({**data, "controlnet": {"down": "controlnet_down0"}})
