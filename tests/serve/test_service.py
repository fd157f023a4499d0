"""The replica's work without Ray: batch-1 identity with a direct call, grouping and chunking, health, options, and
faults: a request's own faults (text the tokenizer cannot read, steps the scheduler cannot run, NaN images) fail that
request only and leave the replica healthy; the engine's faults fail its health check."""

from __future__ import annotations

import io

import numpy as np
import pytest

from catome_export.errors import CatomeError
from catome_export.serve.protocol import ImageJob, RequestError, render
from catome_export.serve.service import (EngineMismatch, ImageResult, ImageService, ServeOptions, check_max_batch,
                                         generation_answer, pin_engine, scheduler_step_limit)

pytest.importorskip("PIL", reason="pillow is not installed")


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _job(seed: int, guidance: float = 7.5, threshold: float | None = None, size: int = 128, steps: int = 2,
         prompt: str = "a red fox", negative: str | None = None) -> ImageJob:
    return ImageJob(prompt, negative, seed, steps, guidance, size, size, threshold)


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def service(tiny_engine):
    pinned = _sha256(tiny_engine / "manifest.json")  # as the application pins it at deploy
    svc = ImageService(ServeOptions(str(tiny_engine), backend="ort", max_batch=2, steps=2, threads=1,
                                    engine_sha256=pinned))
    yield svc
    svc.close()


def test_batch_one_is_identical_to_a_direct_generate_call(tiny_engine, service):
    from catome_export.workflows.generate import ImageRequest, generate, pipeline_for_engine
    from catome_export.runtime import Runtime
    from catome_export.runtime.embed import attach

    [result] = service.run_jobs([_job(11)])
    assert result.batch_images == 1 and len(result.merged) == len(result.step_ms) >= 2  # U-Net calls (PNDM adds one)
    with Runtime.load(tiny_engine, backend="ort", backend_options={"intra_op_threads": 1}) as runtime:
        pipe = pipeline_for_engine(runtime)
        with attach(pipe, runtime):
            direct = generate(pipe, ImageRequest("a red fox", None, 2, 7.5, 11, 128, 128), stats=runtime).image
            direct_merged = [[rec.merged[k] for k in sorted(rec.merged)] for rec in runtime.history]
    served = _pixels(result.png)
    assert served.shape == direct.shape == (128, 128, 3)
    np.testing.assert_array_equal(served, direct)
    assert result.merged == direct_merged and any(r > 0 for step in direct_merged for r in step)


def test_serve_uses_the_generate_workflows_pipeline_call_and_pixel_conversion():
    from catome_export.serve import service as serve_module
    from catome_export.workflows import generate as workflow

    assert serve_module.run_pipeline is workflow.run_pipeline and serve_module.to_pixels is workflow.to_pixels
    assert not hasattr(serve_module, "_StepMarks")  # no step clock of its own
    assert workflow.to_pixels(np.array([[[-0.2, 0.5, 1.3]]])).tolist() == [[[0, 128, 255]]]


def test_jobs_are_grouped_and_chunked_within_the_built_batch(service):
    # guidance <= 1: one U-Net row per image, two images share a call (max_batch 2, engine batch 1..2);
    # guidance 7.5: two rows per image, so one image per call; another size is another group.
    jobs = [_job(1, guidance=1.0), _job(2, guidance=7.5), _job(3, guidance=1.0), _job(4, guidance=1.0, size=136)]
    results = service.run_jobs(jobs)
    assert [r.seed for r in results] == [1, 2, 3, 4]
    assert [r.batch_images for r in results] == [2, 1, 2, 1]
    assert [_pixels(r.png).shape[0] for r in results] == [128, 128, 128, 136]
    alone = service.run_jobs([_job(1, guidance=1.0)])[0]
    assert _pixels(alone.png).shape == _pixels(results[0].png).shape


def test_a_request_threshold_is_applied_and_the_engine_default_restored(service):
    default = service.default_settings
    [no_merge] = service.run_jobs([_job(5, threshold=1.0)])
    assert all(r == 0 for step in no_merge.merged for r in step)
    assert service.runtime.settings.threshold == 1.0
    [merged] = service.run_jobs([_job(5)])
    assert service.runtime.settings == default
    assert any(r > 0 for step in merged.merged for r in step)


def test_an_engine_failure_fails_the_health_check(tiny_engine, monkeypatch):
    svc = ImageService(ServeOptions(str(tiny_engine), backend="ort", steps=2, threads=1))
    try:
        svc.check_health()

        def broken(*args, **kwargs):
            raise RuntimeError("ORT session lost")

        monkeypatch.setattr(svc, "pipe", broken)
        [result] = svc.run_jobs([_job(1)])
        assert isinstance(result, RuntimeError)
        with pytest.raises(CatomeError, match="the engine failed and cannot be trusted: RuntimeError: ORT session"):
            svc.check_health()
    finally:
        svc.close()
    with pytest.raises(CatomeError, match="closed"):
        svc.check_health()


def test_a_job_outside_the_engine_is_a_request_error_not_a_failure(service):
    [result] = service.run_jobs([_job(1, size=256)])
    assert isinstance(result, RequestError) and "outside the built range" in str(result)
    service.check_health()


def test_service_limits_come_from_the_manifest(service):
    limits = service.limits
    assert (limits.height, limits.width, limits.batch) == ((128, 192), (128, 192), (1, 2))
    assert limits.threshold_allowed and limits.default_steps == 2
    assert (limits.max_steps, limits.scheduler) == (999, "PNDMScheduler")  # from the pipeline's scheduler


def test_options_are_checked():
    with pytest.raises(CatomeError, match="unknown serve option.*max_btach"):
        ServeOptions.from_dict({"engine_dir": "x", "max_btach": 2})
    with pytest.raises(CatomeError, match="engine_dir is missing"):
        ServeOptions.from_dict({})
    with pytest.raises(CatomeError, match="max_batch must be an int >= 1"):
        ServeOptions("x", max_batch=0)
    with pytest.raises(CatomeError, match="backend_options must be a mapping, got list"):
        ServeOptions("x", backend_options=["cpu_mem_arena"])
    for bad in (0, 2.5, True, "64"):
        with pytest.raises(CatomeError, match="r_multiple must be an int >= 1"):
            ServeOptions("x", r_multiple=bad)
    assert ServeOptions.from_dict({"engine_dir": "x", "r_multiple": 64}).r_multiple == 64
    with pytest.raises(CatomeError, match="max-batch 3 is above the engine's built batch range 1..2"):
        check_max_batch(3, (1, 2))
    check_max_batch(2, (1, 2))


# -- a request's faults are the request's -------------------------------------------------------------------------

def _denoise(scheduler, steps: int) -> None:
    """The pipeline's denoising loop over ``scheduler`` with a stand-in model (zeros)."""
    import torch

    scheduler.set_timesteps(steps)
    sample = torch.zeros(1, 4, 2, 2)
    for t in scheduler.timesteps:
        scheduler.scale_model_input(sample, t)
        sample = scheduler.step(torch.zeros_like(sample), t, sample).prev_sample


@pytest.mark.parametrize("name, limit", [("pndm", 999), ("ddim", 999), ("euler", 1000)])
def test_the_step_limit_is_asked_of_the_scheduler_and_exact(name, limit):
    from catome_export.models.pipeline import tiny_pipeline

    scheduler = tiny_pipeline(name).scheduler
    assert scheduler_step_limit(scheduler) == limit
    assert scheduler.num_inference_steps is None  # asked of copies: the pipeline's own is untouched
    _denoise(scheduler, limit)
    if limit < scheduler.config.num_train_timesteps:  # one more step is what broke replicas (PNDM: IndexError)
        with pytest.raises(IndexError):
            _denoise(scheduler, limit + 1)


def test_default_steps_the_scheduler_cannot_run_are_refused_at_load(tiny_engine):
    with pytest.raises(CatomeError, match=r"--steps 1000 is more than the pipeline's PNDMScheduler runs \(999\): "
                                          "use --steps 999 or fewer"):
        ImageService(ServeOptions(str(tiny_engine), backend="ort", steps=1000, threads=1))


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_text_the_tokenizer_cannot_read_fails_that_job_only(service, field):
    bad = _job(3, prompt="\ud800 fox") if field == "prompt" else _job(3, negative="a \udfff")
    results = service.run_jobs([bad, _job(4)])
    assert isinstance(results[0], RequestError) and results[0].param == field and results[0].status == 400
    assert str(results[0]).startswith(f"{field} cannot be tokenized (")
    assert isinstance(results[1], ImageResult)
    service.check_health()


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_is_a_400_naming_the_field(service, field):
    status, body = service.answer(('{"prompt": "a fox", "' + field + '": "\\ud800"}').encode())
    assert status == 400 and body["error"]["param"] == field
    assert body["error"]["message"].startswith(f"{field} contains a lone surrogate \\ud800 at character 0")
    service.check_health()


def test_steps_the_scheduler_cannot_run_are_the_requests_fault(service):
    status, body = service.answer(b'{"prompt": "a fox", "steps": 1000}')
    assert status == 400 and body["error"]["param"] == "steps" and "1..999" in body["error"]["message"]
    [before] = service.run_jobs([_job(8)])
    # past validation (as a fault it does not know of would be): the request's fault, answered 422
    [result] = service.run_jobs([_job(8, steps=1000)])
    assert isinstance(result, RequestError) and result.status == 422
    assert "IndexError" in str(result) and "a check generation succeeded" in str(result)
    service.check_health()
    [after] = service.run_jobs([_job(8)])
    np.testing.assert_array_equal(_pixels(after.png), _pixels(before.png))


def test_a_nan_image_is_never_answered_as_an_image(service):
    status, body = service.answer(b'{"prompt": "a fox", "guidance_scale": 1e30}')
    assert status == 400 and body["error"]["param"] == "guidance_scale"
    # past validation: the pipeline makes NaN pixels (once cast to a black PNG and answered 200)
    [result] = service.run_jobs([_job(9, guidance=1e30)])
    assert isinstance(result, RequestError) and result.status == 422
    assert "NaN or infinite pixels" in str(result)
    assert generation_answer([result], 0, "0" * 64)[0] == 422
    service.check_health()


def test_one_job_at_fault_in_a_shared_call_fails_alone(service, monkeypatch):
    real = service.pipe

    def fails_on_poison(**kwargs):
        if "poison" in kwargs["prompt"]:
            raise ValueError("cannot embed this prompt")
        return real(**kwargs)

    monkeypatch.setattr(service, "pipe", fails_on_poison)
    good, bad = _job(21, guidance=1.0), _job(22, guidance=1.0, prompt="poison")  # two per call (max_batch 2)
    results = service.run_jobs([good, bad])
    assert isinstance(results[0], ImageResult) and results[0].batch_images == 1  # retried alone
    assert isinstance(results[1], RequestError) and results[1].status == 422 and "ValueError" in str(results[1])
    service.check_health()
    [alone] = service.run_jobs([good])
    np.testing.assert_array_equal(_pixels(results[0].png), _pixels(alone.png))


def test_nan_images_from_the_engine_itself_fail_its_health_and_the_log_names_the_pid(tiny_engine, monkeypatch,
                                                                                    caplog):
    import logging
    import os

    from catome_export.serve.loadtest import REPLICA_PID_LINE

    caplog.set_level(logging.INFO, logger="catome_export")
    svc = ImageService(ServeOptions(str(tiny_engine), backend="ort", steps=2, threads=1))
    try:
        # the line the load test finds a replica's pid by (responses name no process)
        assert [int(m.group(1)) for m in map(REPLICA_PID_LINE.search, caplog.messages) if m] == [os.getpid()]
        real = svc.pipe

        def nan_engine(**kwargs):
            output = real(**kwargs)
            output.images[...] = np.nan
            return output

        monkeypatch.setattr(svc, "pipe", nan_engine)
        [result] = svc.run_jobs([_job(1)])
        assert not isinstance(result, RequestError)  # the check generation is NaN too: the engine's fault
        status, body = generation_answer([result], 0, "0" * 64)
        assert status == 500 and body["error"]["type"] == "server_error"
        with pytest.raises(CatomeError, match="the engine failed and cannot be trusted: NonFiniteImage: 49152 of "
                                              "49152 pixel values are NaN or infinite"):
            svc.check_health()
        assert any(f"replica pid {os.getpid()} reports itself unhealthy" in m for m in caplog.messages)
    finally:
        svc.close()


@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "a fox", "seed": ' + b"9" * 5000 + b"}", None),
    (b"[" * 100_000, None),
    (b'{"prompt": "a fox", "\\ud800": 1}', "\ud800"),
], ids=["5000-digit integer", "100000-deep nesting", "lone surrogate field name"])
def test_bodies_json_cannot_take_are_400s_in_the_api_shape(service, raw, param):
    status, body = service.answer(raw)
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param
    render(body).decode("ascii")
    service.check_health()


def test_responses_name_no_process(service):
    import json

    assert "replica_pid" not in service.info()
    status, body = service.answer(b'{"prompt": "a red fox", "size": "128x128", "steps": 2}')
    assert status == 200 and set(body) == {"created", "data", "catome"}
    assert set(body["catome"]) == {"engine_sha256", "images"}
    assert "replica_pid" not in json.dumps(body)


# -- the engine is pinned ------------------------------------------------------------------------------------------

def test_the_served_engine_is_named_by_its_manifest_hash(tiny_engine, service):
    expected = _sha256(tiny_engine / "manifest.json")
    assert service.engine_sha256 == expected and service.info()["engine_sha256"] == expected
    status, body = service.answer(b'{"prompt": "a red fox", "size": "128x128", "steps": 2}')
    assert status == 200 and body["catome"]["engine_sha256"] == expected


def test_a_replica_refuses_an_engine_rebuilt_in_place(tiny_engine, tmp_path):
    import shutil

    folder = tmp_path / "engine"
    shutil.copytree(tiny_engine, folder)
    deployed = pin_engine(ServeOptions(str(folder), backend="ort", steps=2, threads=1))
    assert deployed.engine_sha256 == _sha256(folder / "manifest.json")
    with open(folder / "manifest.json", "a") as f:  # the folder changes after deployment
        f.write("\n")
    now = _sha256(folder / "manifest.json")
    with pytest.raises(EngineMismatch) as info:
        ImageService(deployed)
    message = str(info.value)
    assert f"its manifest.json has sha256 {now}, the deployment pinned {deployed.engine_sha256}" in message
    assert "build the new engine into a new folder and redeploy with that folder" in message


def test_pinning_at_deploy(tiny_engine, tmp_path):
    here = _sha256(tiny_engine / "manifest.json")
    assert pin_engine(ServeOptions(str(tiny_engine))).engine_sha256 == here
    assert pin_engine(ServeOptions(str(tiny_engine), engine_sha256=here)).engine_sha256 == here
    with pytest.raises(CatomeError, match=f"engine_sha256 {'a' * 64} is not the engine in .*sha256 {here}"):
        pin_engine(ServeOptions(str(tiny_engine), engine_sha256="a" * 64))
    elsewhere = str(tmp_path / "on-the-gpu-machines")  # a folder only the cluster's machines hold
    with pytest.raises(CatomeError, match="is not on this machine, so its engine cannot be pinned here: give "
                                          "engine_sha256"):
        pin_engine(ServeOptions(elsewhere))
    assert pin_engine(ServeOptions(elsewhere, engine_sha256=here)).engine_sha256 == here
    with pytest.raises(CatomeError, match="engine_sha256 must be 64 lowercase hex digits"):
        ServeOptions(elsewhere, engine_sha256="ABC")


def test_r_multiple_rounds_every_request(tiny_engine):
    svc = ImageService(ServeOptions(str(tiny_engine), backend="ort", steps=2, threads=1, r_multiple=16))
    try:
        assert svc.runtime.settings.r_multiple == 16 and svc.info()["merge"]["r_multiple"] == 16
        [result] = svc.run_jobs([_job(3)])
        assert not isinstance(result, Exception)
        counts = [r for step in result.merged for r in step]
        assert counts and all(r % 16 == 0 for r in counts)
        [result] = svc.run_jobs([_job(4, threshold=0.5)])  # a request's own threshold keeps the rounding
        assert all(r % 16 == 0 for step in result.merged for r in step)
    finally:
        svc.close()
