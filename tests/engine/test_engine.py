"""``Engine.open``: an engine folder read and checked once, and passed on without checking it again."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

import catome_export.engine.manifest as manifest_module
from catome_export.engine.engine import Engine
from catome_export.errors import CatomeError


@pytest.fixture
def hashed(monkeypatch) -> Counter:
    """File name -> how many times its sha256 was computed (the manifest's checks hash through sha256_file)."""
    counts: Counter = Counter()
    real = manifest_module.sha256_file

    def counting(path):
        counts[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(manifest_module, "sha256_file", counting)
    return counts


def test_open_reads_and_checks_the_folder_once(tiny_engine, hashed):
    engine = Engine.open(tiny_engine)
    assert engine.path == Path(tiny_engine) and engine.manifest.engine_dir == Path(tiny_engine)
    listed = {name for name, _, digest in engine.manifest.files() if digest}
    assert listed and set(hashed) == listed and set(hashed.values()) == {1}
    assert Engine.open(engine) is engine and sum(hashed.values()) == len(listed)  # passed on: not checked again


def test_open_names_what_is_wrong(tmp_path, tiny_engine):
    with pytest.raises(CatomeError, match="does not exist: build it with catome-export build"):
        Engine.open(tmp_path / "nowhere")
    with pytest.raises(CatomeError, match="expected an engine folder .*got NoneType"):
        Engine.open(None)  # type: ignore[arg-type]
    copy = tmp_path / "copy"
    shutil.copytree(tiny_engine, copy)
    stage = copy / "stage_1.onnx"
    data = bytearray(stage.read_bytes())
    data[-1] ^= 0xFF
    stage.write_bytes(bytes(data))
    with pytest.raises(CatomeError, match="stage_1.onnx does not match its sha256"):
        Engine.open(copy)


def test_runtime_load_takes_an_engine_or_a_path(tiny_engine, hashed):
    from catome_export.runtime import Runtime

    engine = Engine.open(tiny_engine)
    opened = sum(hashed.values())
    with Runtime.load(engine, backend="ort-cpu") as runtime:
        assert runtime.manifest is engine.manifest and runtime.engine_dir == engine.path
    assert sum(hashed.values()) == opened  # the Engine was checked when it was opened
    with Runtime.load(str(tiny_engine), backend="ort-cpu") as runtime:  # a path is opened at the edge
        assert runtime.engine_dir == Path(tiny_engine)
    assert sum(hashed.values()) == 2 * opened


def test_verify_hashes_every_file_once(tiny_engine, hashed):
    """verify_engine used to check the folder, then have Runtime.load check it again: every file hashed twice."""
    from catome_export.runtime.verify import verify_engine

    listed = {name for name, _, digest in
              manifest_module.Manifest.load(tiny_engine, check_hashes=False).files() if digest}
    assert not hashed
    report = verify_engine(tiny_engine, steps=2, backend="ort-cpu", resolution=128, batch=1)
    assert report.ok, report.summary()
    assert set(hashed) == listed and set(hashed.values()) == {1}
