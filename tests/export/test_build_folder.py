"""Build internals: option checks, the build lock, the atomic swap and its recovery, and a verified build."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from catome_export.errors import CatomeError
from catome_export.export.build import VerifyVerdict, build_folder
from catome_export.engine.folder import BuildLock, recover_leftovers, swap_into_place
from catome_export.engine.options import make_options
from catome_export.engine.manifest import MANIFEST_FILE, Manifest
from catome_export.workflows.build import run_build


def test_options_defaults():
    tiny = make_options("tiny")
    assert (tiny.weights, tiny.resolution, tiny.batch, tiny.name) == ("random", (256, 256), (1, 2), "tiny")
    assert str(tiny.out_dir) == os.path.join("engines", "tiny")
    sd = make_options("sd15", min_resolution=512, max_resolution=768, max_batch=4)
    assert (sd.weights, sd.resolution, sd.batch) == ("pretrained", (512, 768), (1, 4))
    assert make_options("sd15", max_resolution=384).resolution == (384, 384)
    assert make_options("tiny", weights="pretrained").weights == "random"
    sd21 = make_options("sd21", weights="random")
    assert sd21.resolution == (768, 768) and sd21.settings.max_downsample == 1  # the model's own merge level


@pytest.mark.parametrize("kwargs,match", [
    ({"resolution": 100}, "not a multiple of 8"),
    ({"resolution": 32}, "resolution must be an int in"),
    ({"resolution": 256, "min_resolution": 128}, "either --resolution"),
    ({"min_resolution": 512, "max_resolution": 256}, "larger than max"),
    ({"min_batch": 3, "max_batch": 2}, "min batch 3 is larger"),
    ({"precision": "int8"}, "precision"),
    ({"backend": "ort-cuda"}, "backend must be one of"),
    ({"name": "../x"}, "plain folder name"),
    ({"exporter": "magic"}, "exporter"),
    ({"opt_merge_fraction": 1.5}, "opt-merge-fraction"),
])
def test_options_are_checked(kwargs, match):
    with pytest.raises(CatomeError, match=match):
        make_options("tiny", **kwargs)


def test_unknown_model():
    with pytest.raises(CatomeError, match="unknown model"):
        make_options("/no/such/folder")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_build_lock(tmp_path):
    path = tmp_path / ".x.lock"
    with BuildLock(path, "x"):
        assert path.read_text().strip() == str(os.getpid())
        path.write_text(f"{os.getppid()}\n")  # pretend another live process holds it
        with pytest.raises(CatomeError, match=f"another build into x is running \\(pid {os.getppid()}\\)"):
            BuildLock(path, "x").acquire()
        path.write_text(f"{os.getpid()}\n")
    assert not path.exists()
    path.write_text(f"{_dead_pid()}\n")  # stale: its process is gone
    with BuildLock(path, "x"):
        assert path.read_text().strip() == str(os.getpid())
    assert not path.exists()


def test_build_lock_waits_for_a_young_empty_lock_to_get_its_owner(tmp_path):
    # Without hard links a lock is created empty and its pid written just after: a second build that reads it
    # in between must not take it over as stale.
    import threading

    path = tmp_path / ".x.lock"
    path.write_text("")
    writer = threading.Timer(0.2, lambda: path.write_text(f"{os.getppid()}\n"))  # a live "other" process
    writer.start()
    try:
        with pytest.raises(CatomeError, match="another build into x is running"):
            BuildLock(path, "x").acquire()
    finally:
        writer.join()
    # An empty lock left long ago by a writer that died is taken over.
    path.write_text("")
    old = time.time() - 60
    os.utime(path, (old, old))
    with BuildLock(path, "x"):
        assert path.read_text().strip() == str(os.getpid())


def _folder(path, marker: str):
    path.mkdir()
    (path / MANIFEST_FILE).write_text(marker)
    return path


def test_swap_replaces_the_old_build(tmp_path):
    target = _folder(tmp_path / "e", "old")
    new = _folder(tmp_path / ".e.tmp-1", "new")
    swap_into_place(new, target)
    assert (target / MANIFEST_FILE).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


@pytest.mark.parametrize("failing", ["aside", "in"])
def test_file_error_during_swap_is_a_clear_error_and_keeps_the_old_build(tmp_path, monkeypatch, failing):
    target = _folder(tmp_path / "e", "old")
    new = _folder(tmp_path / ".e.tmp-1", "new")
    real_rename = os.rename

    def rename(src, dst):
        moving_in = os.fspath(src) == os.fspath(new)
        if (failing == "in") == moving_in:
            raise PermissionError(13, "Permission denied")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CatomeError, match="was not changed"):
        swap_into_place(new, target)
    assert (target / MANIFEST_FILE).read_text() == "old"


def test_crash_during_swap_is_recovered(tmp_path):
    # A build died after moving the old folder aside and before moving its own in.
    pid = _dead_pid()
    _folder(tmp_path / f".e.old-{pid}", "old")
    _folder(tmp_path / f".e.tmp-{pid}", "half")
    target = tmp_path / "e"
    recover_leftovers(target)
    assert (target / MANIFEST_FILE).read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_refuses_a_folder_that_is_not_an_engine(tmp_path):
    target = tmp_path / "stuff"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(CatomeError, match="not an engine folder"):
        run_build(make_options("tiny", resolution=128, out_dir=target, verify=False, ort_optimize=False))
    assert (target / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_verified_build(tmp_path):
    """A build with the per-stage ONNX Runtime check and the runtime's eager comparison (2 steps)."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'catome-export[ort]')")
    pytest.importorskip("catome_export.runtime.verify", reason="the runtime's verify module is not available")
    out = tmp_path / "tiny"
    opts = make_options("tiny", resolution=128, batch=2, out_dir=out, verify=True, verify_steps=2)
    result = run_build(opts)
    assert result.backend == "ort"
    assert set(result.quick_check) == set(range(6)) and max(result.quick_check.values()) <= 1e-4
    assert result.verify is not None and result.verify.ok, result.verify.summary()
    assert result.audit.passed
    assert Manifest.load(out).manifest_sha256 == result.manifest.manifest_sha256


@pytest.mark.slow
@pytest.mark.parametrize("rename_fails", [False, True], ids=["moved-aside", "kept-in-place"])
def test_failed_verification_keeps_the_old_build_and_the_failed_one(tmp_path, monkeypatch, rename_fails):
    target = _folder(tmp_path / "e", "old")
    failed = VerifyVerdict(ok=False, text="step 3: max |diff| 1.0 over the tolerance")
    real_rename = os.rename

    def rename(src, dst):
        if rename_fails and os.fspath(dst).endswith(".failed"):
            raise PermissionError(13, "Permission denied")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CatomeError, match="does not match eager CA-ToMe") as info:
        build_folder(make_options("tiny", resolution=128, out_dir=target, verify=True, ort_optimize=False),
                     verifier=lambda *args: failed)
    assert "step 3: max |diff| 1.0" in str(info.value)
    assert (target / MANIFEST_FILE).read_text() == "old"  # the installed build is untouched
    kept = next(tmp_path.glob(".e.tmp-*")) if rename_fails else tmp_path / ".e.failed"
    assert str(kept) in str(info.value) and Manifest.load(kept).stages  # the failed build stays for inspection


@pytest.mark.slow
def test_a_verify_report_without_a_verdict_never_installs(tmp_path):
    """Fail closed: a verifier whose report is not a VerifyVerdict (here: no ``ok`` at all) stops the build, and
    neither the new build nor a failed folder is installed; the old build stays."""
    target = _folder(tmp_path / "e", "old")
    opts = make_options("tiny", resolution=128, batch=1, out_dir=target, verify=True, ort_optimize=False)

    class Report:  # what a verifier that forgot the verdict might hand back
        def summary(self) -> str:
            return "all steps within the tolerance"

    with pytest.raises(CatomeError, match="not a VerifyVerdict.*not installed"):
        build_folder(opts, verifier=lambda *args: Report())
    assert (target / MANIFEST_FILE).read_text() == "old"
    assert not list(tmp_path.glob(".e.tmp-*")) and not (tmp_path / ".e.failed").exists()


def test_a_verdict_is_a_bool():
    assert VerifyVerdict(ok=True, text="fine").summary() == "fine"
    with pytest.raises(TypeError, match="bool"):
        VerifyVerdict(ok="yes", text="fine")  # type: ignore[arg-type]


def _user_files(folder) -> None:
    (folder / "my_notes.txt").write_text("mine")
    (folder / "calib").mkdir()
    (folder / "calib" / "data.bin").write_bytes(b"\x01\x02")


def test_foreign_files_are_what_no_build_made(tmp_path, tiny_engine):
    import shutil

    from catome_export.engine.folder import foreign_files

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_engine, folder)
    assert foreign_files(folder) == []  # a clean build: every file is listed by its manifest
    (folder / "timing.cache").write_bytes(b"")  # a TensorRT build's own cache
    assert foreign_files(folder) == []
    _user_files(folder)
    assert foreign_files(folder) == ["calib/data.bin", "my_notes.txt"]
    (folder / MANIFEST_FILE).write_text("{not json")  # a manifest it cannot read: stage names count as ours
    assert foreign_files(folder) == ["calib/data.bin", "my_notes.txt"]
    assert foreign_files(tmp_path / "absent") == []


def test_rebuild_keeps_files_it_did_not_make_unless_forced(tmp_path, tiny_engine):
    """The user's files in an engine folder: the rebuild refuses before any work and names them; --force
    removes them with the old build."""
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_engine, folder)
    _user_files(folder)
    before = (folder / MANIFEST_FILE).read_bytes()
    opts = make_options("tiny", resolution=128, out_dir=folder, verify=False, ort_optimize=False)
    with pytest.raises(CatomeError, match=r"holds files no build made \(calib/data.bin, my_notes.txt\).*--force"):
        run_build(opts)
    assert (folder / "my_notes.txt").read_text() == "mine" and (folder / "calib" / "data.bin").is_file()
    assert (folder / MANIFEST_FILE).read_bytes() == before  # the old build untouched
    result = run_build(make_options("tiny", resolution=128, out_dir=folder, verify=False, force=True, ort_optimize=False))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MANIFEST_FILE] + [name for name, _, _ in result.manifest.files()])
    Manifest.load(folder)


def test_options_validate_themselves_and_keep_the_cli_strings():
    """BuildOptions checks every field on construction (naming it and the valid values); its closed sets are
    str enums that compare, print and serialise as the CLI's strings."""
    import json

    from catome_export.choices import Precision
    from catome_export.engine.options import BuildOptions
    from catome_export.merging import AutoSchedule

    with pytest.raises(CatomeError, match=r"precision must be one of fp32, fp16, got 'int8'"):
        make_options("tiny", precision="int8")
    with pytest.raises(CatomeError, match=r"min batch must be an int in 1\.\.256, got 0"):
        BuildOptions(model="tiny", weights="random", batch=(0, 2))
    with pytest.raises(CatomeError, match=r"weights must be one of pretrained, random"):
        BuildOptions(model="tiny", weights="seeded")
    opts = make_options("tiny", precision="fp16")
    assert opts.precision is Precision.FP16 and opts.precision == "fp16" and f"{opts.precision}" == "fp16"
    assert json.dumps({"precision": opts.precision}) == '{"precision": "fp16"}'
    auto = make_options("tiny", schedule="auto:3")
    assert auto.schedule == AutoSchedule(3, step_base=1) and auto.settings.schedule.name == "config3"
    with pytest.raises(CatomeError, match="auto:K"):
        make_options("tiny", schedule="auto:x")
    with pytest.raises(CatomeError, match="unknown build option"):
        make_options("tiny", resolutoin=128)


@pytest.mark.slow
def test_a_finished_build_that_cannot_be_swapped_in_is_kept(tmp_path, monkeypatch):
    """The last write of a build (moving the finished folder in) fails: the old build stays, the new one is
    kept beside it and the error says where."""
    target = _folder(tmp_path / "e", "old")
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(dst) == os.fspath(target) and ".tmp-" in os.fspath(src):
            raise PermissionError(13, "Permission denied")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CatomeError, match="the finished build is kept in") as info:
        run_build(make_options("tiny", resolution=128, out_dir=target, verify=False, ort_optimize=False))
    assert (target / MANIFEST_FILE).read_text() == "old"
    kept = tmp_path / "e.new"
    assert str(kept) in str(info.value) and Manifest.load(kept).stages
