"""The deployment's options and the application builder, and the deployment object answering in-process, without
starting Ray."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from catome_export.errors import CatomeError

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'catome-export[serve]')")


def test_fixed_replicas_and_autoscaling():
    from catome_export.serve.deployment import deployment_options

    fixed = deployment_options(replicas=3, gpus_per_replica=1)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 1}
    auto = deployment_options(min_replicas=0, max_replicas=4, gpus_per_replica=0, target_ongoing_requests=3)
    assert auto["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 4,
                                          "target_ongoing_requests": 3, "upscale_delay_s": 10,
                                          "downscale_delay_s": 300}
    assert "num_replicas" not in auto
    # without a Ray session there is no GPU to ask for
    assert deployment_options()["ray_actor_options"]["num_gpus"] == 0.0


def test_backpressure_limits_and_their_defaults():
    """Serve's own backpressure: a replica holds two batches' worth of requests, the ingress's handle queues 32 more
    (then 429); the command line's defaults are the deployment's."""
    from catome_export.cli import cmd_serve
    from catome_export.serve import deployment

    default = deployment.deployment_options(max_batch=3)
    assert default["max_ongoing_requests"] == 6 and default["max_queued_requests"] == 32
    given = deployment.deployment_options(max_ongoing_requests=1, max_queued_requests=-1)
    assert given["max_ongoing_requests"] == 1 and given["max_queued_requests"] == -1
    assert (cmd_serve.DEFAULT_MAX_QUEUED, cmd_serve.DEFAULT_REQUEST_TIMEOUT_S) == \
        (deployment.DEFAULT_MAX_QUEUED, deployment.DEFAULT_REQUEST_TIMEOUT_S)
    for bad, message in (({"max_ongoing_requests": 0}, "max_ongoing_requests must be an int >= 1, got 0"),
                         ({"max_queued_requests": 0}, "max_queued_requests must be an int >= 1 (or -1 for no "
                                                      "limit), got 0")):
        with pytest.raises(CatomeError, match=re.escape(message)):
            deployment.deployment_options(**bad)


def test_the_application_is_the_ingress_in_front_of_the_image_deployment(tiny_engine):
    from catome_export.serve.deployment import DEPLOYMENT_NAME, INGRESS_NAME, build_app

    app = build_app({"engine_dir": str(tiny_engine), "max_queued_requests": 4, "request_timeout_s": 9})
    ingress = app._bound_deployment
    assert ingress.name == INGRESS_NAME and ingress.init_kwargs == {"request_timeout_s": 9}
    assert ingress.ray_actor_options["num_cpus"] == 0
    [images] = [a._bound_deployment for a in ingress.init_args]
    assert images.name == DEPLOYMENT_NAME and images.max_queued_requests == 4 and images.max_ongoing_requests == 2
    with pytest.raises(CatomeError, match="request_timeout_s must be a number of seconds > 0, got 0"):
        build_app({"engine_dir": str(tiny_engine), "request_timeout_s": 0})


@pytest.mark.parametrize("kwargs, message", [
    ({"replicas": 2, "min_replicas": 1}, "not both"),
    ({"replicas": 0}, "replicas must be an int >= 1, got 0"),
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas must be an int >= 3 (max(1, min_replicas)), got 2"),
])
def test_bad_scaling(kwargs, message):
    from catome_export.serve.deployment import deployment_options

    with pytest.raises(CatomeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        deployment_options(**kwargs)


def test_build_app_checks_the_engine_before_any_replica(tiny_engine, tmp_path):
    from catome_export.serve.deployment import build_app

    with pytest.raises(CatomeError, match="max-batch 3 is above the engine's built batch range 1..2"):
        build_app({"engine_dir": str(tiny_engine), "max_batch": 3})
    with pytest.raises(CatomeError, match="unknown serve option"):
        build_app({"engine_dir": str(tiny_engine), "max_btach": 2})
    app = build_app({"engine_dir": str(tiny_engine), "max_batch": 2, "min_replicas": 1, "max_replicas": 2})
    assert type(app).__name__ == "Application"


@pytest.fixture(scope="module")
def replica(tiny_engine):
    """The deployment's class (what Serve runs in each replica), made in this process without Ray."""
    from catome_export.serve.deployment import ImageDeployment

    made = ImageDeployment.func_or_class({"engine_dir": str(tiny_engine), "backend": "ort", "steps": 2, "threads": 1})
    yield made
    made._executor.submit(made._service.close).result(timeout=60)
    made._executor.shutdown(wait=True)


def _call(replica, body: bytes, method: str = "POST", path: str = "/v1/images/generations") -> tuple[int, dict]:
    """One request as the ingress forwards it to a replica: status and the body's JSON (which must be ASCII)."""
    status, content = asyncio.run(replica.respond(method, path, body))
    return status, json.loads(content.decode("ascii"))


@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "a fox", "n": ' + b"1" * 5000 + b"}", None),
    (b"[" * 100_000, None),
    (b'{"prompt": ' * 100_000, None),
    (b'{"prompt": "a fox", "\\ud800": 1}', "\ud800"),
    (b'{"prompt": "\\ud800"}', "prompt"),
    (b'{"prompt": "a fox", "negative_prompt": "\\udc00"}', "negative_prompt"),
    (b'{"prompt": "a fox", "steps": 1000}', "steps"),
    (b'{"prompt": "a fox", "guidance_scale": 1e308}', "guidance_scale"),
], ids=["5000-digit integer", "100000-deep array", "100000-deep object", "lone surrogate field name",
        "lone surrogate prompt", "lone surrogate negative_prompt", "steps 1000", "guidance 1e308"])
def test_the_deployment_answers_bad_bodies_400_in_the_api_shape(replica, raw, param):
    status, body = _call(replica, raw)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param
    assert body["error"]["message"] and "\n" not in body["error"]["message"]
    replica._service.check_health()


def test_an_unexpected_error_is_a_json_500(replica, monkeypatch):
    import catome_export.serve.deployment as deployment

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(deployment, "parse_request", broken)
    status, body = _call(replica, b'{"prompt": "a fox"}')
    assert status == 500 and body["error"] == {"message": "the replica failed to answer (RuntimeError); retry the "
                                                          "request", "type": "server_error", "param": None,
                                               "code": None}


def test_the_engine_endpoint_names_no_process(replica, tiny_engine):
    import hashlib

    status, body = _call(replica, b"", method="GET", path="/v1/engine")
    assert status == 200 and body["engine"] == "tiny" and body["max_steps"] == 999
    assert "replica_pid" not in body
    assert body["engine_sha256"] == hashlib.sha256((tiny_engine / "manifest.json").read_bytes()).hexdigest()


def test_a_replica_is_warmed_up_before_it_is_ready(replica):
    """The constructor (after which Serve routes requests to the replica) ran one small generation."""
    status, body = _call(replica, b"", method="GET", path="/v1/engine")
    assert status == 200 and body["warm_up_s"] is not None and body["warm_up_s"] > 0
    assert replica._service.warm_up_s == body["warm_up_s"]


def test_a_failed_warm_up_fails_the_start(tiny_engine, monkeypatch):
    from catome_export.serve.deployment import ImageDeployment, app_options
    from catome_export.serve.service import ImageService

    def broken(self, jobs, enqueued):
        raise RuntimeError("ORT session lost")

    monkeypatch.setattr(ImageService, "_run_chunk", broken)
    options, _ = app_options({"engine_dir": str(tiny_engine), "backend": "ort", "steps": 2, "threads": 1})
    cls = ImageDeployment.func_or_class
    with pytest.raises(CatomeError, match="the warm-up generation failed"):
        cls(options.to_dict())


def test_build_app_pins_the_engine(tiny_engine):
    import hashlib

    from catome_export.serve.deployment import app_options

    options, scaling = app_options({"engine_dir": str(tiny_engine), "replicas": 2})
    assert options.engine_sha256 == hashlib.sha256((tiny_engine / "manifest.json").read_bytes()).hexdigest()
    assert scaling == {"replicas": 2}
    with pytest.raises(CatomeError, match="is not the engine in"):
        app_options({"engine_dir": str(tiny_engine), "engine_sha256": "0" * 64})


def test_a_replica_started_on_another_engine_serves_nothing(tiny_engine, caplog):
    import logging

    from catome_export.serve.deployment import ImageDeployment

    caplog.set_level(logging.ERROR, logger="catome_export")
    made = ImageDeployment.func_or_class({"engine_dir": str(tiny_engine), "backend": "ort", "steps": 2,
                                          "engine_sha256": "0" * 64})
    try:
        [line] = [m for m in caplog.messages if "refuses to serve" in m]
        assert f"the deployment pinned {'0' * 64}" in line and "build the new engine into a new folder" in line
        for method, path in (("GET", "/v1/engine"), ("POST", "/v1/images/generations")):
            status, body = _call(made, b'{"prompt": "a fox"}', method=method, path=path)
            assert status == 503 and body["error"]["type"] == "server_error"
            assert "started on another engine than the application was deployed with" in body["error"]["message"]
        with pytest.raises(CatomeError, match=f"the deployment pinned {'0' * 64}"):
            asyncio.run(made.check_health())
    finally:
        made._executor.shutdown(wait=True)
