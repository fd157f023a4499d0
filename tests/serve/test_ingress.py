"""The ingress deployment in-process, without Ray running: a stand-in for the image deployment's handle raises what
Ray Serve raises (BackPressureError, ActorDiedError), hangs, or answers; every answer must be JSON in the API's shape.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'catome-export[serve]')")

GENERATIONS = "/v1/images/generations"


class FakeResponse:
    """What ``handle.respond.remote(...)`` returns: awaitable, cancellable."""

    def __init__(self, behaviour: Callable[[], Any]) -> None:
        self._behaviour = behaviour
        self.cancelled = False

    def __await__(self):
        return self._run().__await__()

    async def _run(self) -> Any:
        return await self._behaviour()

    def cancel(self) -> None:
        self.cancelled = True


class FakeImages:
    """A stand-in for the image deployment's handle: ``respond.remote`` plays the next behaviour."""

    def __init__(self, *behaviours: Callable[[], Any]) -> None:
        self.behaviours = list(behaviours)
        self.calls: list[tuple[str, str, bytes]] = []
        self.responses: list[FakeResponse] = []
        self.respond = self

    def remote(self, method: str, path: str, body: bytes) -> FakeResponse:
        self.calls.append((method, path, body))
        behaviour = self.behaviours[min(len(self.calls), len(self.behaviours)) - 1]
        response = FakeResponse(behaviour)
        self.responses.append(response)
        return response


def answers(status: int, body: dict) -> Callable[[], Any]:
    async def run() -> tuple[int, bytes]:
        return status, json.dumps(body).encode()
    return run


def raises(exc: BaseException) -> Callable[[], Any]:
    async def run() -> Any:
        raise exc
    return run


def hangs() -> Callable[[], Any]:
    async def run() -> Any:
        await asyncio.Event().wait()
    return run


def ingress(images: FakeImages, request_timeout_s: float = 30.0) -> Any:
    from catome_export.serve.deployment import Ingress

    return Ingress.func_or_class(images, request_timeout_s=request_timeout_s)


def request(body: bytes, method: str = "POST", path: str = GENERATIONS) -> Any:
    from starlette.requests import Request

    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # a client that stays connected
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b"", "root_path": "",
             "scheme": "http", "server": ("127.0.0.1", 8000)}
    return Request(scope, receive)


def call(front: Any, body: bytes = b'{"prompt": "a fox"}', method: str = "POST") -> tuple[int, dict, Any]:
    response = asyncio.run(front(request(body, method)))
    assert response.media_type == "application/json"
    return response.status_code, json.loads(response.body.decode("ascii")), response.headers


def api_error(body: dict, code: str) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error", body
    assert error["code"] == code and error["message"] and "\n" not in error["message"], body
    return error


def test_answers_pass_through_with_their_status():
    images = FakeImages(answers(400, {"error": {"message": "prompt is missing"}}))
    status, body, _ = call(ingress(images), b'{"n": 1}')
    assert status == 400 and body == {"error": {"message": "prompt is missing"}}
    assert images.calls == [("POST", GENERATIONS, b'{"n": 1}')]


def test_a_full_queue_is_429_json_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    images = FakeImages(raises(BackPressureError(num_queued_requests=32, max_queued_requests=32)))
    status, body, headers = call(ingress(images))
    assert status == 429 and headers["retry-after"] == "5"
    assert "queue of waiting requests is full" in api_error(body, "queue_full")["message"]


def test_a_request_older_than_the_timeout_is_504_and_its_work_dropped():
    images = FakeImages(hangs())
    front = ingress(images, request_timeout_s=0.2)
    status, body, headers = call(front)
    assert status == 504 and "retry-after" not in headers
    assert "request timeout (0.2 s)" in api_error(body, "timeout")["message"]
    assert images.responses[0].cancelled  # Serve drops the call from its queue
    assert asyncio.run(front.in_flight()) == 0


def test_a_client_that_disconnects_has_its_work_dropped():
    images = FakeImages(hangs())
    front = ingress(images)

    async def scenario() -> None:
        task = asyncio.ensure_future(front(request(b'{"prompt": "a fox"}')))
        while not images.responses:
            await asyncio.sleep(0.01)
        assert await front.in_flight() == 1
        task.cancel()  # what Serve's proxy does when the client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        assert images.responses[0].cancelled
        assert await front.in_flight() == 0

    asyncio.run(scenario())


def test_a_lost_replica_is_503_json_and_a_seeded_request_is_sent_once_more():
    from ray.exceptions import ActorDiedError

    # without a seed: no second try
    images = FakeImages(raises(ActorDiedError()), answers(200, {"data": []}))
    status, body, headers = call(ingress(images), b'{"prompt": "a fox"}')
    assert status == 503 and headers["retry-after"] == "5" and len(images.calls) == 1
    assert "stopped before it answered" in api_error(body, "replica_lost")["message"]
    # with a seed: the same images wherever they are made, so once more
    images = FakeImages(raises(ActorDiedError()), answers(200, {"data": ["image"]}))
    status, body, _ = call(ingress(images), b'{"prompt": "a fox", "seed": 3}')
    assert status == 200 and body == {"data": ["image"]} and len(images.calls) == 2
    # lost twice: 503
    images = FakeImages(raises(ActorDiedError()))
    status, body, _ = call(ingress(images), b'{"prompt": "a fox", "seed": 3}')
    assert status == 503 and len(images.calls) == 2
    api_error(body, "replica_lost")


def test_a_lost_replica_wrapped_in_a_task_error_is_recognised():
    from ray.exceptions import ActorDiedError

    from catome_export.serve.deployment import _replica_lost, names_a_seed

    class Wrapped(Exception):
        cause = ActorDiedError()

    assert _replica_lost(Wrapped()) and not _replica_lost(RuntimeError("x"))
    assert names_a_seed("GET", b"") and names_a_seed("POST", b'{"seed": 0}')
    assert not names_a_seed("POST", b'{"seed": null}') and not names_a_seed("POST", b"[" * 100_000)


def test_an_unexpected_failure_is_a_json_500():
    images = FakeImages(raises(RuntimeError("a bug")))
    status, body, _ = call(ingress(images))
    assert status == 500 and body["error"]["type"] == "server_error"
    assert body["error"]["message"] == "the service failed to answer (RuntimeError); retry the request"


def test_draining_answers_new_requests_503_and_abort_answers_those_in_flight():
    images = FakeImages(hangs())
    front = ingress(images)

    async def scenario() -> None:
        in_flight = asyncio.ensure_future(front(request(b'{"prompt": "a fox"}')))
        while not images.responses:
            await asyncio.sleep(0.01)
        assert await front.drain() == 1
        refused = await front(request(b'{"prompt": "a fox"}'))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        api_error(json.loads(refused.body), "shutting_down")
        assert len(images.calls) == 1  # a new request never reaches a replica
        assert await front.abort() == 1
        answered = await asyncio.wait_for(in_flight, 5)
        assert answered.status_code == 503 and answered.headers["retry-after"] == "5"
        assert "stopped before this request was answered" in api_error(json.loads(answered.body),
                                                                       "shutting_down")["message"]
        assert images.responses[0].cancelled and await front.in_flight() == 0

    asyncio.run(scenario())


class Outcomes:
    """Stands in for the ingress's metrics: the outcomes it counted."""

    def __init__(self) -> None:
        self.counted: list[str] = []
        self.resent = 0

    def request(self, outcome: str) -> None:
        self.counted.append(outcome)

    def resend(self) -> None:
        self.resent += 1


def test_every_request_is_counted_by_its_outcome():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    cases = [(answers(200, {}), b"{}", "ok"), (answers(400, {}), b"{}", "invalid"),
             (answers(500, {}), b"{}", "failed"), (raises(BackPressureError(1, 1)), b"{}", "queue_full"),
             (raises(ActorDiedError()), b"{}", "replica_lost"), (raises(RuntimeError("x")), b"{}", "error")]
    for behaviour, body, outcome in cases:
        front = ingress(FakeImages(behaviour))
        front._metrics = counted = Outcomes()
        call(front, body)
        assert counted.counted == [outcome], (outcome, counted.counted)
    front = ingress(FakeImages(raises(ActorDiedError()), answers(200, {})))
    front._metrics = counted = Outcomes()
    call(front, b'{"seed": 1}')
    assert counted.counted == ["ok"] and counted.resent == 1
    front = ingress(FakeImages(hangs()), request_timeout_s=0.1)
    front._metrics = counted = Outcomes()
    call(front)
    assert counted.counted == ["timeout"]

    async def gone() -> list[str]:
        front = ingress(FakeImages(hangs()))
        front._metrics = counted = Outcomes()
        task = asyncio.ensure_future(front(request(b"{}")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await front.drain()
        await front(request(b"{}"))
        return counted.counted

    assert asyncio.run(gone()) == ["disconnected", "shutting_down"]
