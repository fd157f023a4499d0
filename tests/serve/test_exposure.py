"""``exposed_ports`` (what ``catome-export serve`` names at start) and the local Ray's node address, without Ray:
sockets of this process and its children listening beyond loopback, found through /proc, in a network namespace of
their own (nothing listens on this machine's network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROBE = textwrap.dedent("""
    import json, socket, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from catome_export.serve.local import exposed_ports

    def listener(host, family=socket.AF_INET):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind((host, 0))
        s.listen(1)
        return s

    mine = [listener("127.0.0.1"), listener("0.0.0.0"), listener("::", socket.AF_INET6), listener("10.254.0.1")]
    child = subprocess.Popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                              "s.bind(('0.0.0.0', 0)); s.listen(1); print(s.getsockname()[1], flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    child_port = int(child.stdout.readline())
    skip = mine[1].getsockname()[1]
    try:
        print(json.dumps({"ports": [s.getsockname()[1] for s in mine], "child_port": child_port,
                          "all": exposed_ports(), "without_second": exposed_ports((skip,))}))
    finally:
        child.kill()
""")


def test_exposed_ports_names_what_listens_beyond_loopback(ray_isolation, tmp_path):
    from catome_export.serve.loadtest import isolated_command

    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run(isolated_command([sys.executable, str(script), root], node_address=True),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    loop, any4, any6, node = result["ports"]
    found = {address: name for address, name in result["all"]}
    assert f"0.0.0.0:{any4}" in found and f"[::]:{any6}" in found and f"10.254.0.1:{node}" in found, found
    assert f"0.0.0.0:{result['child_port']}" in found, found  # a child's socket counts
    assert not any(address.endswith(f":{loop}") for address in found), found
    assert all("python" in name for name in found.values()), found
    assert not any(address.endswith(f":{any4}") for address, _ in result["without_second"])


def test_a_local_ray_takes_loopback_as_its_node_address(monkeypatch, ray_temp_dir):
    """Ray binds its servers to the node address; a local Ray's is 127.0.0.1, which Ray keeps only as a
    single-machine Ray (else it swaps a loopback address for the machine's own): both are set before ray.init."""
    pytest.importorskip("ray", reason="ray[serve] is not installed")
    import ray
    from ray._private import ray_constants, services

    from catome_export.serve.local import SINGLE_MACHINE_ENV, ray_session

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # restored afterwards, as are the variables
    for name in (SINGLE_MACHINE_ENV, "RAY_AUTH_TOKEN_PATH"):  # unset here, and as they were afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    seen = {}

    def init(**kwargs):
        seen.update(kwargs, env=os.environ.get(SINGLE_MACHINE_ENV),
                    node=services.resolve_ip_for_localhost(kwargs["_node_ip_address"]))

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with ray_session(temp_dir=ray_temp_dir, num_cpus=1):
        pass
    assert seen["_node_ip_address"] == "127.0.0.1" and seen["env"] == "0" and seen["node"] == "127.0.0.1", seen
