"""The load test's helpers that read Serve's replica log files: which replicas run, which one answered a request."""

from __future__ import annotations

import os

from catome_export.serve.loadtest import answered_by, live_replica_pids, replica_logs

DEAD_PID = 4_194_400
"""Above Linux's largest pid_max (2**22): no process has it."""


def _write_logs(root, files: dict[str, str]) -> None:
    folder = root / "session_latest" / "logs" / "serve"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_replicas_and_the_requests_they_answered_come_from_their_log_files(tmp_path):
    me = os.getpid()
    _write_logs(tmp_path, {
        "replica_catome_CatomeImages_aaaa.log":
            "INFO 2026-01-01 10:00:00,000 catome_CatomeImages aaaa -- Started initializing replica.\n"
            f"INFO 2026-01-01 10:00:05,000 catome_CatomeImages aaaa -- replica pid {DEAD_PID}: engine tiny loaded\n"
            "INFO 2026-01-01 10:00:06,000 catome_CatomeImages aaaa req-1 -- POST / 200 191.5ms\n",
        "replica_catome_CatomeImages_bbbb.log":
            f"INFO 2026-01-01 10:00:05,000 catome_CatomeImages bbbb -- replica pid {me}: engine tiny loaded on ort\n"
            "INFO 2026-01-01 10:00:07,000 catome_CatomeImages bbbb req-2 -- POST / 200 172.7ms\n",
        "replica_catome_CatomeImages_cccc.log":  # still loading its engine
            "INFO 2026-01-01 10:00:08,000 catome_CatomeImages cccc -- Started initializing replica.\n",
        "controller_214.log": f"replica pid {me + 1}: engine tiny loaded\n",
    })
    assert [log.pid for log in replica_logs(tmp_path)] == [DEAD_PID, me, None]
    assert live_replica_pids(tmp_path) == [me]  # the first one has died
    assert answered_by(tmp_path, ["req-1", "req-2", "req-3"]) == {"req-1": DEAD_PID, "req-2": me}


def test_no_session_no_replicas(tmp_path):
    assert replica_logs(tmp_path) == [] and answered_by(tmp_path, ["req-1"]) == {}
