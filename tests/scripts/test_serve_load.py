"""scripts/serve_load.py's own parts that need no Ray: its arguments and the checks it reads from a report.

The load itself runs through Ray in tests/serve/test_serve_ray.py; what its answers add up to is tested in
tests/serve/test_loadtest.py.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "serve_load.py"
STATES_DEFAULT = re.compile(r"\bdefault\b|\(required\)", re.I)
"""As tests/cli/test_flag_help.py asks of the command line's flags."""


@pytest.fixture(scope="module")
def serve_load():
    spec = importlib.util.spec_from_file_location("serve_load_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_timed_mixed_load_and_its_defaults(serve_load):
    args = serve_load.parse_args(["--engine", "e", "--duration", "180", "--concurrency", "16", "--bad-every", "5"])
    assert (args.duration, args.requests, args.concurrency, args.bad_every, args.replicas) == (180.0, None, 16, 5, 2)
    assert serve_load.parse_args(["--engine", "e"]).requests == 200  # a count unless --duration is given


@pytest.mark.parametrize("argv, message", [
    (["--requests", "10", "--duration", "5"], "--requests or --duration, not both"),
    (["--duration", "0"], "--duration must be"),
    (["--bad-every", "1"], "--bad-every must be 0"),
    (["--max-queued-requests", "0"], "--max-queued-requests must be >= 1 (or -1: no limit)"),
    (["--overflow-max-ongoing", "0"], "--overflow-max-ongoing must be >= 1"),
    (["--request-timeout", "-1"], "--request-timeout must be"),
])
def test_bad_arguments_say_what_to_give(serve_load, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        serve_load.parse_args(["--engine", "e", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert serve_load.parse_args(["--engine", "e", "--max-queued-requests", "-1"]).max_queued_requests == -1


def test_every_flag_states_its_default(serve_load):
    flags = [a for a in serve_load.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 20
    assert [a.option_strings[0] for a in flags if not a.help or not STATES_DEFAULT.search(a.help)] == []


def _report():
    """A report of a run that met every requirement (two replicas)."""
    return {
        "load": {"errors": 0, "good": {"answered": 90}, "not_api_shape": 0,
                 "bad": {"all_4xx": True, "sent": 22}, "replica_states_after": {"RUNNING": 2}, "healthz_after": 200,
                 "metrics": {"consistent": True}},
        "bad_requests": {"cases": [{"status": 400, "problem": None}] * 3, "good_request_after": 200},
        "kill": {"not_api_shape": [], "other_non_200": [], "long_request": {"status": 200}, "replaced": True},
        "overflow": {"not_api_shape": 0, "counts": {"200": 20, "429": 40, "503": 0, "504": 0, "other": 0}},
    }


@pytest.mark.parametrize("where, value, failed", [
    (("load", "errors"), 1, "load: no good request failed"),
    (("load", "bad", "all_4xx"), False, "load: every bad request answered 4xx"),
    (("load", "replica_states_after"), {"RUNNING": 1, "STARTING": 1}, "load: the replicas running after it"),
    (("load", "metrics", "consistent"), None, "load: metrics match the clients' counts"),
    (("kill", "not_api_shape"), ["request 3: HTTP 500, not JSON: ''"],
     "kill: every answer JSON in the API's shape (no plain-text 500)"),
    (("kill", "other_non_200"), ["request 4: HTTP 504 timeout: m"],
     "kill: every non-200 a 503 replica_lost with Retry-After"),
    (("overflow", "counts", "429"), 0, "overflow: some requests answered, some shed 429"),
])
def test_the_checks_of_a_report(serve_load, where, value, failed):
    args = serve_load.parse_args(["--engine", "e", "--replicas", "2"])
    good = serve_load.checks(_report(), args)
    assert len(good) == 12 and all(good.values()), good
    report = copy.deepcopy(_report())
    target = report
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    verdict = serve_load.checks(report, args)
    assert [name for name, held in verdict.items() if not held] == [failed]
