"""Faults with real processes: a build killed midway, two builds at once, a rebuild that fails late.

The previous good engine folder (a finished build copied to
``<tmp>/engines/tiny``) must come through every one of them byte for byte:
it still passes ``Manifest.load`` (every file's size and sha256) and runs
under ``Runtime.load``; half-written files are never loaded, and what a
dead build leaves (its temp folder, its lock) is cleaned by the next build.
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from catome_export.cli.main import main
from catome_export.errors import CatomeError
from catome_export.engine.manifest import MANIFEST_FILE, Manifest

POLL = 0.05


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` (names relative to it)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_loads(folder: Path) -> None:
    """The folder passes ``Manifest.load`` (sizes and sha256 of every file) and runs a step at its smallest size."""
    from catome_export.runtime import Runtime

    manifest = Manifest.load(folder)
    latent = manifest.shapes.latent_height[0]
    with Runtime.load(folder, backend="ort", backend_options={"intra_op_threads": 1}) as runtime:
        gen = torch.Generator().manual_seed(0)
        sample, text = torch.randn(1, 4, latent, latent, generator=gen), torch.randn(1, 77, 32, generator=gen)
        out = runtime.unet(sample, torch.tensor(999.0), encoder_hidden_states=text, return_dict=False)[0]
        assert out.shape == sample.shape and bool(torch.isfinite(out).all())


def assert_good_engine(folder: Path, hashes: dict[str, str]) -> None:
    """The folder is byte for byte unchanged, and loads and runs."""
    assert file_hashes(folder) == hashes
    assert_loads(folder)


def build_argv(out: Path) -> list[str]:
    return ["build", "--model", "tiny", "--resolution", "64", "--no-verify", "--ort-optimize", "off", "--out", str(out)]


def start_build(out: Path, child_env, log: Path) -> subprocess.Popen:
    """``python -m catome_export.cli build ...`` as a child process (stdout and stderr into ``log``)."""
    fh = open(log, "w")
    try:
        return subprocess.Popen([sys.executable, "-m", "catome_export.cli", *build_argv(out)], stdout=fh,
                                stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    finally:
        fh.close()


def kill(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=60)


@pytest.fixture
def good_build(engine_copy) -> tuple[Path, dict[str, str]]:
    """(engine folder, its file hashes): a finished build at ``<tmp>/engines/tiny``."""
    return engine_copy, file_hashes(engine_copy)


def test_killed_build_keeps_the_previous_build(good_build, child_env, tmp_path, monkeypatch, capsys):
    target, hashes = good_build
    parent = target.parent
    proc = start_build(target, child_env, tmp_path / "build.log")
    tmp = parent / f".{target.name}.tmp-{proc.pid}"
    try:
        deadline = time.monotonic() + 240
        while not list(tmp.glob("stage_*.onnx")):  # the temp build folder exists and a stage is being written
            assert proc.poll() is None, f"the build ended before it was killed:\n{(tmp_path / 'build.log').read_text()}"
            assert time.monotonic() < deadline, "the build wrote no stage within 240 s"
            time.sleep(POLL)
    finally:
        code = kill(proc)
    assert code == -signal.SIGKILL

    # The good build is untouched and still loads; what the dead build left is never trusted.
    assert_good_engine(target, hashes)
    assert tmp.is_dir() and not (tmp / MANIFEST_FILE).exists()
    lock = parent / f".{target.name}.lock"
    assert lock.read_text().strip() == str(proc.pid)
    from catome_export.runtime import Runtime

    with pytest.raises(CatomeError, match="not a finished build"):
        Manifest.load(tmp)
    with pytest.raises(CatomeError, match="not a finished build"):
        Runtime.load(tmp, backend="ort")

    # The next build takes over the dead build's lock and removes its temp folder, even when it fails itself.
    import catome_export.export.build as build_mod

    def late_failure(spec, *args, **kwargs):
        raise CatomeError("stage export failed (forced by the test)")

    monkeypatch.setattr(build_mod, "export_stage", late_failure)
    code = main(build_argv(target))
    err = capsys.readouterr().err
    assert code == 1 and "forced by the test" in err and "Traceback" not in err
    assert sorted(p.name for p in parent.iterdir()) == [target.name]  # no temp folder, no lock
    assert_good_engine(target, hashes)


def test_two_builds_at_once_are_refused_or_serialised(good_build, child_env, tmp_path):
    """Two real processes start the same build into one folder: never both at once.

    Normally the later one to reach the lock is refused at once (exit 1, naming the other's pid) and the
    other goes on alone (then killed here: the old folder must be intact). Should one process finish its
    whole build before the other reaches the lock (a very slow start), the second builds after it.
    """
    target, hashes = good_build
    procs = [start_build(target, child_env, tmp_path / f"build-{k}.log") for k in range(2)]
    logs = {p.pid: tmp_path / f"build-{k}.log" for k, p in enumerate(procs)}
    temps = [target.parent / f".{target.name}.tmp-{p.pid}" for p in procs]

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 240
        while not condition():
            assert not all(t.exists() for t in temps), "both builds are writing into the same folder at once"
            assert time.monotonic() < deadline, f"{what} within 240 s"
            time.sleep(POLL)

    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), "neither build ended or was refused")
        first = next(p for p in procs if p.poll() is not None)
        other = next(p for p in procs if p is not first)
        err = logs[first.pid].read_text()
        assert "Traceback" not in err, err
        if first.returncode == 1:
            assert f"error: another build into {target} is running (pid {other.pid}): wait for it to finish" in err
            assert other.poll() is None  # the other one goes on alone
            refused = True
        else:
            assert first.returncode == 0, err
            wait_for(lambda: other.poll() is not None, "the second build did not end")
            assert other.returncode == 0, logs[other.pid].read_text()
            refused = False
    finally:
        for p in procs:
            kill(p)
    if refused:
        assert_good_engine(target, hashes)
    else:  # serialised: the folder holds the last finished build
        assert_loads(target)
        assert Manifest.load(target).shapes.latent_height == (8, 8)


@pytest.mark.parametrize("point", ["stage-export", "manifest-write"])
def test_failed_rebuild_keeps_the_good_build(good_build, monkeypatch, capsys, point):
    """A rebuild that fails (an error found late, or a full disk on the last write) changes nothing."""
    import catome_export.export.build as build_mod

    target, hashes = good_build
    if point == "stage-export":
        real = build_mod.export_stage

        def export_stage(spec, *args, **kwargs):
            if spec.index == 2:
                raise CatomeError("stage 2 cannot be exported (forced by the test)")
            return real(spec, *args, **kwargs)

        monkeypatch.setattr(build_mod, "export_stage", export_stage)
        needle = "forced by the test"
    else:
        def save(self, engine_dir):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(engine_dir) / MANIFEST_FILE))

        monkeypatch.setattr(build_mod.Manifest, "save", save)
        needle = "No space left on device"
    code = main(build_argv(target))
    err = capsys.readouterr().err
    assert code == 1 and needle in err and "Traceback" not in err
    if point == "manifest-write":
        assert f"{target} was not changed" in err
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert_good_engine(target, hashes)


# -- the build lock under a real race -----------------------------------------------------------------------
def _race(path: str, start, done, results) -> None:
    from catome_export.engine.folder import BuildLock

    lock = BuildLock(path, "the engine")
    start.wait()
    try:
        lock.acquire()
    except CatomeError:
        results.put("refused")
        return
    results.put("won")
    done.wait(60)  # hold the lock until every racer has tried
    lock.release()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale-lock"])
def test_build_lock_has_one_winner_among_racing_processes(tmp_path, stale):
    """Processes released at once against a free lock, or one left by a dead build: exactly one gets it."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method (POSIX)")
    ctx = multiprocessing.get_context("fork")
    racers = 6
    for round_ in range(4):
        path = tmp_path / f".engine-{round_}.lock"
        if stale:
            path.write_text(f"{_dead_pid()}\n")
        start, done, results = ctx.Barrier(racers), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(path), start, done, results)) for _ in range(racers)]
        for p in procs:
            p.start()
        try:
            outcome = sorted(results.get(timeout=120) for _ in range(racers))
        finally:
            done.set()
            for p in procs:
                p.join(60)
        assert outcome == ["refused"] * (racers - 1) + ["won"], f"round {round_}: {outcome}"
        assert not path.exists()
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(path.name + ".")]
