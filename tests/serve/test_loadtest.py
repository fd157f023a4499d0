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


# --- the load's pure parts: the bad bodies, which request sends which, what the answers add up to

import pytest  # noqa: E402

from catome_export.serve.loadtest import (BAD_REQUESTS, Answer, LoadResult, Reply, answer_of, bad_case,  # noqa: E402
                                          client_outcome, compare_counts, outcome_deltas, replica_loss_summary,
                                          shape_problem)


def _tiny_limits():
    """The limits of catome-export build --model tiny's engine (256 x 256, batch 1..2); 999 steps is the most its
    PNDM scheduler runs (the service finds it from the scheduler: test_deployment.py checks /v1/engine says 999)."""
    from catome_export.serve.protocol import EngineLimits

    return EngineLimits.from_ranges({"batch": (1, 2), "latent_height": (32, 32), "latent_width": (32, 32)},
                                    default_size=(256, 256), default_steps=4, max_steps=999, default_guidance=7.5,
                                    max_images=8, threshold_allowed=False, scheduler="PNDMScheduler")


def test_every_bad_body_is_refused_400_by_validation_and_the_issues_cases_are_there():
    from catome_export.serve.protocol import RequestError, parse_request

    limits = _tiny_limits()
    names = [name for name, _ in BAD_REQUESTS]
    assert len(set(names)) == len(names)
    for name, raw in BAD_REQUESTS:
        with pytest.raises(RequestError) as caught:
            parse_request(raw, limits)
        assert caught.value.status == 400, name
    raw = dict(BAD_REQUESTS)
    assert raw["lone surrogate in prompt"] == b'{"prompt": "\\ud800"}'  # the JSON escape, in raw bytes
    assert b'"negative_prompt": "\\ud800"' in raw["lone surrogate in negative_prompt"]
    assert b'"steps": 1000' in raw["steps = 1000"]
    assert b"1e30}" in raw["guidance_scale 1e30"] and b"1e308}" in raw["guidance_scale 1e308"]
    assert raw["5000-digit integer"].count(b"0") == 4999
    assert raw["100000-deep nesting"].count(b"[") == 100_000
    with pytest.raises(UnicodeDecodeError):
        raw["bad UTF-8"].decode("utf-8")
    # the good request of the load is accepted
    parse_request(b'{"prompt": "a red fox in the snow", "size": "256x256", "seed": 1000}', limits)


def test_every_nth_request_is_bad_cycling_through_every_case():
    plan = [bad_case(i, 5, 3) for i in range(30)]
    assert [i for i, c in enumerate(plan) if c is not None] == [4, 9, 14, 19, 24, 29]
    assert [c for c in plan if c is not None] == [0, 1, 2, 0, 1, 2]
    assert all(bad_case(i, 0, 3) is None for i in range(10))
    # in the final run (every 5th of about a thousand requests) each of the cases is sent
    assert {bad_case(i, 5, len(BAD_REQUESTS)) for i in range(5 * len(BAD_REQUESTS))} - {None} == \
        set(range(len(BAD_REQUESTS)))


def _reply(status, body, **headers):
    return Reply(status, body, 0.5, "rid", {k.replace("_", "-"): v for k, v in headers.items()})


def _error(code=None):
    return {"error": {"message": "m", "type": "server_error", "param": None, "code": code}}


def test_answers_in_the_apis_shape_and_those_not():
    image = {"data": [{"b64_json": "iVBOR"}]}
    assert shape_problem(_reply(200, image)) is None
    assert shape_problem(_reply(200, image), images=2) == "HTTP 200 without its 2 image(s)"
    assert shape_problem(_reply(400, _error())) is None
    assert shape_problem(_reply(504, _error("timeout"))) is None  # no Retry-After promised
    assert shape_problem(_reply(429, _error("queue_full"), retry_after="5")) is None
    assert "without Retry-After" in shape_problem(_reply(429, _error("queue_full")))
    assert "without Retry-After" in shape_problem(_reply(503, _error("replica_lost"), retry_after="soon"))
    assert "not JSON" in shape_problem(_reply(500, {"raw": "Internal Server Error"}))
    assert "not the API's error shape" in shape_problem(_reply(400, {"detail": "bad"}))
    assert "no HTTP answer" in shape_problem(_reply(0, {"error": {"message": "ConnectionResetError"}}))


def _answer(index, status, case=None, code=None, problem=None, seconds=1.0, seeded=True):
    return Answer(index=index, status=status, seconds=seconds, case=case, code=code, problem=problem,
                  retry_after="5" if code in ("queue_full", "replica_lost") else None, seeded=seeded)


def test_the_load_summary_counts_good_bad_shed_and_failed_requests():
    answers = [_answer(i, 200, seconds=float(i + 1)) for i in range(8)]          # 8 good, 1..8 s
    answers += [_answer(8, 429, code="queue_full"), _answer(9, 503, code="replica_lost")]  # shed
    answers += [_answer(10, 500, problem="HTTP 500, not JSON: 'Internal'"), _answer(11, 0, problem="no HTTP answer")]
    answers += [_answer(12, 400, case="steps = 0"), _answer(13, 400, case="steps = 0"),
                _answer(14, 500, case="bad UTF-8")]
    result = LoadResult(concurrency=4, wall_s=4.0, answers=answers, duration_s=10.0, bad_every=5,
                        cases=("steps = 0", "bad UTF-8", "n = 0"))
    s = result.summary()
    assert s["requests"] == 15 and s["good"] == {"sent": 12, "answered": 8, "shed": 2, "failed": 2}
    assert s["ok"] == 8 and s["errors"] == 2 and s["shed"] == 2
    assert s["shed_by_code"] == {"429 queue_full": 1, "503 replica_lost": 1}
    assert s["throughput_rps"] == 2.0
    assert (s["p50_s"], s["p99_s"], s["max_s"], s["mean_s"]) == (4.0, 8.0, 8.0, 4.5)  # nearest rank
    assert s["not_api_shape"] == 2 and len(s["first_errors"]) == 2
    bad = s["bad"]
    assert bad["sent"] == 3 and not bad["all_4xx"] and bad["cases_not_sent"] == ["n = 0"]
    assert bad["cases"]["steps = 0"] == {"sent": 2, "statuses": {"400": 2}}
    assert [(x["case"], x["status"]) for x in bad["not_4xx"]] == [("bad UTF-8", 500)]
    assert s["outcomes"] == {"failed_or_error": 1, "invalid": 2, "no_answer": 1, "not_json": 1, "ok": 8,
                             "queue_full": 1, "replica_lost": 1}
    assert s["statuses"] == {"0": 1, "200": 8, "400": 2, "429": 1, "500": 2, "503": 1}


def test_client_outcomes_against_the_ingress_metrics():
    assert client_outcome(answer_of(0, _reply(404, _error()))) == "invalid"
    assert client_outcome(answer_of(0, _reply(504, _error("timeout")))) == "timeout"
    before = {"ray_catome_requests_total{outcome=ok}": 9.0, "ray_catome_images_total": 8.0}
    after = {"ray_catome_requests_total{outcome=ok}": 29.0, "ray_catome_requests_total{outcome=invalid}": 5.0,
             "ray_catome_requests_total{outcome=failed}": 1.0, "ray_catome_requests_total{outcome=error}": 1.0,
             "ray_catome_images_total": 28.0}
    deltas = outcome_deltas(before, after)
    assert deltas == {"failed_or_error": 2, "invalid": 5, "ok": 20}
    same = compare_counts({"ok": 20, "invalid": 5, "failed_or_error": 2}, deltas)
    assert same["consistent"] and same["differences"] == {}
    off = compare_counts({"ok": 21, "invalid": 5}, deltas)
    assert not off["consistent"] and off["differences"] == {"ok": [21, 20], "failed_or_error": [0, 2]}


def test_a_killed_replicas_lost_requests_must_be_json_503s():
    fine = [_answer(0, 200), _answer(1, 503, code="replica_lost", seeded=False), _answer(2, 200)]
    summary = replica_loss_summary(fine)
    assert summary["lost_503"] == 1 and summary["lost_503_seeded"] == 0
    assert summary["plain_text_500s"] == 0 and not summary["not_api_shape"] and not summary["other_non_200"]
    broken = fine + [_answer(3, 500, problem="HTTP 500, not JSON: ''"), _answer(4, 504, code="timeout")]
    summary = replica_loss_summary(broken)
    assert summary["plain_text_500s"] == 1 and len(summary["not_api_shape"]) == 1
    assert [x.split(":")[0] for x in summary["other_non_200"]] == ["request 3", "request 4"]
