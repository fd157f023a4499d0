"""The manifest's typed ``build`` section: written from the build options, read back typed, and manifests
written before it was typed (``data/manifest_main_58044bb.json``, written by the build of commit 58044bb:
``build --model tiny --resolution 128 --min-batch 1 --max-batch 3 --threshold 0.6 --schedule 0,3 --step-base 0
--feature-cache 3,0 --controlnet --ort-optimize off --no-verify``) or before it existed still load."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from catome_export.cli.rebuild import build_command, error_line, rebuild_command
from catome_export.engine.manifest import MANIFEST_FILE, Manifest, canonical_hash
from catome_export.engine.record import BuildRecord, RebuildNeeded
from catome_export.engine.options import make_options

OLD = Path(__file__).parent / "data" / "manifest_main_58044bb.json"


def _old_data() -> dict:
    return json.loads(OLD.read_text())


def _folder(tmp_path: Path, data: dict) -> Path:
    folder = tmp_path / "tiny-main"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=2))
    return folder


def test_a_manifest_written_by_the_previous_format_loads_typed(tmp_path):
    data = _old_data()
    assert canonical_hash(data) == data["manifest_sha256"]  # the fixture is untouched
    m = Manifest.load(_folder(tmp_path, data), check_files=False)
    b = m.build
    assert b is not None and "build" not in m.extra
    assert (b.model, b.weights, b.precision, b.backend) == ("tiny", "random", "fp32", "auto")
    assert (b.resolution, b.batch) == ((128, 128), (1, 3))
    assert (b.threshold, b.schedule, b.step_base, b.r_multiple) == (0.6, "0,3", 0, None)
    assert (b.feature_cache, b.cache_branches, b.ort_optimize, b.controlnet) == ("3,0", (), False, True)
    assert (b.lora, b.refittable, b.name) == ((), False, "tiny-main")
    assert b.to_dict() == data["build"]  # the section reads back as it was written
    assert build_command(m.rebuild_options()) == data["build_command"]  # the command that build wrote beside it


def test_a_manifest_from_before_the_build_section_rebuilds_from_its_parts(tmp_path):
    data = _old_data()
    del data["build"], data["build_command"]
    data["manifest_sha256"] = canonical_hash(data)
    folder = _folder(tmp_path, data)
    m = Manifest.load(folder, check_files=False)
    assert m.build is None
    b = m.build_record()
    assert (b.model, b.resolution, b.batch, b.threshold, b.schedule, b.step_base) == \
        ("tiny", (128, 128), (1, 3), 0.6, "0,3", 0)
    assert b.controlnet and b.out == str(folder)


def test_the_build_writes_its_options_and_the_rebuild_command_gives_them_back(tmp_path):
    """BuildOptions -> the manifest's section -> the command line -> the CLI's options: the same options."""
    from catome_export.cli.cmd_build import options_from_args
    from catome_export.cli.main import build_parser

    opts = make_options("tiny", min_resolution=64, max_resolution=128, batch=2, schedule="auto:3",
                        feature_cache="3,0", cache_branches=(1,), ort_optimize=False, max_stage_gb=0.5,
                        opt_merge_fraction=0.25, controlnet=True, name="t e", out_dir=tmp_path / "t e")
    record = opts.record()
    assert BuildRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert (record.schedule, record.cache_branches, record.feature_cache) == ("auto:3", (1,), "3,0")
    args = build_parser().parse_args(shlex.split(build_command(record))[1:])
    again = options_from_args(args)
    assert again.record() == record
    assert replace(again, verify=opts.verify) == opts


def test_rebuild_overrides_are_typed_fields():
    record = BuildRecord(model="tiny", weights="random", resolution=(128, 128), batch=(1, 2), name="t")
    m_cmd = build_command(replace(record, batch=(1, 4), resolution=(128, 256)))
    assert m_cmd == "catome-export build --model tiny --weights random --min-resolution 128 --max-resolution 256 " \
                    "--min-batch 1 --max-batch 4 --name t"
    with pytest.raises(TypeError):
        replace(record, max_batch=4)  # type: ignore[call-arg]


def test_a_malformed_build_section_is_a_load_error_naming_the_rebuild(tmp_path):
    data = _old_data()
    data["build"] = {"model": "tiny", "min_batch": "many"}
    data["manifest_sha256"] = canonical_hash(data)
    with pytest.raises(RebuildNeeded, match="malformed.*rebuild with catome-export build, naming the model") as err:
        Manifest.load(_folder(tmp_path, data), check_files=False)
    assert not err.value.recorded  # the section that would say how it was built is the damaged one
    assert "rebuild with catome-export build --model tiny --weights random --precision fp32 " in error_line(err.value)


def test_the_rebuild_of_a_copied_engine_rebuilds_the_copy(tmp_path, capsys):
    """The folder an engine was built into (recorded as --out) is not the one to rebuild when a copy is loaded."""
    from catome_export.cli.main import main

    data = _old_data()
    built_into = data["build"]["out"]
    copy = _folder(tmp_path, data)  # the manifest alone: its stage files are missing here
    with pytest.raises(RebuildNeeded, match=f"stage_0.onnx is missing: rebuild it with catome-export build with the "
                                            f"options the folder was built with, into {copy}") as err:
        Manifest.load(copy)
    assert err.value.engine_dir == copy and err.value.options.out == built_into
    command = shlex.split(rebuild_command(err.value))
    assert command[command.index("--out") + 1] == str(copy) and built_into not in command
    assert main(["verify", "--engine", str(copy)]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: engine {copy}: stage_0.onnx is missing: rebuild it with catome-export build "
                           "--model tiny --weights random") and line.endswith(f"--out {copy} --controlnet"), line

