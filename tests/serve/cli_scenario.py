"""Run inside a loopback-only namespace by test_serve_ray.py: ``catome-export serve ENGINE``, one request, Ctrl-C.

Usage: python cli_scenario.py ENGINE_DIR OUT_JSON. Writes what happened as JSON (the test asserts on it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(engine: str, out: str) -> int:
    from PIL import Image

    from catome_export.serve.loadtest import in_isolated_network, post, process_commands

    if not in_isolated_network():
        print("refusing to start Ray outside a loopback-only network namespace", file=sys.stderr)
        return 2
    logs = Path(out).with_suffix(".log")
    with open(logs, "w") as stdout, open(Path(out).with_suffix(".err"), "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "catome_export.cli.main", "serve", engine, "--steps", "2",
                                 "--threads", "1"], stdout=stdout, stderr=stderr, cwd=str(ROOT))
    result: dict = {"url_line": None}
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            lines = [l for l in logs.read_text().splitlines() if l.startswith("serving ")]
            if lines:
                result["url_line"] = lines[0]
                break
            time.sleep(0.5)
        if result["url_line"] is not None:
            reply = post(8000, "/v1/images/generations", {"prompt": "a red fox in the snow", "n": 1,
                                                          "size": "128x128", "response_format": "b64_json"})
            result["status"] = reply.status
            data = reply.body.get("data", [])
            result["images"] = len(data)
            if data:
                result["png_size"] = list(Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).size)
            result["created"] = reply.body.get("created")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            result["rc"] = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            result["rc"] = "timeout"
    err = Path(out).with_suffix(".err").read_text().strip().splitlines()
    result["last_stderr_line"] = err[-1] if err else ""
    result["stderr_tail"] = "\n".join(err[-30:])
    time.sleep(2)
    me = os.getpid()
    result["ray_processes_left"] = [cmd[:120] for pid, cmd in process_commands().items()
                                    if pid != me and "ray" in cmd]
    Path(out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
