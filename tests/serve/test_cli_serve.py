"""``catome-export serve``: wrong input is one ``error:`` line and exit 1, before any Ray process starts."""

from __future__ import annotations

import socket

import pytest

from catome_export.cli.main import main


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["serve", "--engine", *argv])  # the engine folder first
    err = capsys.readouterr().err.strip()
    return rc, err


def test_a_missing_engine_folder(tmp_path, capsys):
    rc, err = _run(capsys, str(tmp_path / "nope"))
    assert rc == 1 and err.startswith("error: engine folder") and "does not exist: build it with" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_max_batch_above_the_built_range(tiny_engine, capsys):
    rc, err = _run(capsys, str(tiny_engine), "--max-batch", "3")
    assert rc == 1
    assert err == ("error: --max-batch 3 is above the engine's built batch range 1..2 (images with guidance take "
                   "two rows each): use --max-batch 2 or less, or rebuild the engine with --max-batch 3")


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2", "--min-replicas", "1"],
     "give --replicas N (a fixed count) or --min-replicas/--max-replicas (autoscaling), not both"),
    (["--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--max-replicas 2 is below --min-replicas 3"),
    (["--port", "70000"], "--port must be in 1..65535, got 70000"),
    (["--metrics-port", "0"], "--metrics-port must be in 1..65535, got 0"),
    (["--max-ongoing-requests", "0"], "--max-ongoing-requests must be >= 1, got 0"),
    (["--max-queued-requests", "0"], "--max-queued-requests must be >= 1, or -1 for no limit, got 0"),
    (["--request-timeout", "0"], "--request-timeout must be a number of seconds > 0, got 0"),
    (["--drain-timeout", "-1"], "--drain-timeout must be a number of seconds >= 0, got -1"),
    (["--max-batch", "0"], "max_batch must be an int >= 1, got 0"),
    (["--steps", "0"], "steps must be an int >= 1, got 0"),
    (["--feature-cache", "3,x"], "give the feature cache as INTERVAL,BRANCH (e.g. 3,0), INTERVAL, off, or "
                                 "full:0,2,5;BRANCH (got '3,x')"),
    (["--feature-cache", "3,0"], "this engine was cut for no feature-cache branch; feature-cache branch 0 needs a "
                                 "rebuild with catome-export build ... --cache-branches 0 (or --feature-cache I,0)"),
])
def test_bad_options(tiny_engine, capsys, argv, message):
    rc, err = _run(capsys, str(tiny_engine), *argv)
    assert rc == 1 and err == f"error: {message}"


def test_another_engine_than_the_folder_holds(tiny_engine, capsys):
    rc, err = _run(capsys, str(tiny_engine), "--engine-sha256", "0" * 64)
    assert rc == 1 and err.startswith(f"error: engine_sha256 {'0' * 64} is not the engine in {tiny_engine} (its "
                                      "manifest.json has sha256 ")


def test_a_port_in_use(tiny_engine, capsys):
    pytest.importorskip("ray", reason="ray[serve] is not installed")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, err = _run(capsys, str(tiny_engine), "--port", str(port))
    assert rc == 1 and err.startswith(f"error: cannot listen on 127.0.0.1:{port} (")
    assert err.endswith("pass a free --port, or stop what uses it")


def test_ray_not_installed(tiny_engine, capsys, monkeypatch):
    import catome_export.serve.local as local

    monkeypatch.setattr(local, "ray_available", lambda: False)
    rc, err = _run(capsys, str(tiny_engine))
    assert rc == 1 and err == 'error: Ray Serve is not installed: pip install "catome-export[serve]" (ray[serve] >= 2.40)'


def test_r_multiple_is_checked_and_reaches_the_replicas_options(tiny_engine, capsys, monkeypatch):
    rc, err = _run(capsys, str(tiny_engine), "--r-multiple", "0")
    assert rc == 1 and err.startswith("error: --r-multiple must be a whole number >= 1") and len(err.splitlines()) == 1
    import catome_export.cli.cmd_serve as cmd_serve
    import catome_export.serve.local as local

    seen = []
    monkeypatch.setattr(local, "require_ray", lambda: None)
    monkeypatch.setattr(local, "check_port_free", lambda host, port: None)
    monkeypatch.setattr(cmd_serve, "_serve", lambda args, options, is_local: seen.append(options) or 0)
    rc, err = _run(capsys, str(tiny_engine), "--r-multiple", "64")
    assert rc == 0, err
    assert seen[0].r_multiple == 64 and seen[0].to_dict()["r_multiple"] == 64
    rc, _ = _run(capsys, str(tiny_engine))
    assert rc == 0 and seen[1].r_multiple is None  # the engine's own
