"""The replica's work without Ray: batch-1 identity with a direct call, grouping and chunking, health, options."""

from __future__ import annotations

import io

import numpy as np
import pytest

from catome_export.errors import CatomeError
from catome_export.serve.protocol import ImageJob, RequestError
from catome_export.serve.service import ImageService, ServeOptions, check_max_batch

pytest.importorskip("PIL", reason="pillow is not installed")


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _job(seed: int, guidance: float = 7.5, threshold: float | None = None, size: int = 128) -> ImageJob:
    return ImageJob("a red fox", None, seed, 2, guidance, size, size, threshold)


@pytest.fixture(scope="module")
def service(tiny_engine):
    svc = ImageService(ServeOptions(str(tiny_engine), backend="ort", max_batch=2, steps=2, threads=1))
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


def test_options_are_checked():
    with pytest.raises(CatomeError, match="unknown serve option.*max_btach"):
        ServeOptions.from_dict({"engine_dir": "x", "max_btach": 2})
    with pytest.raises(CatomeError, match="engine_dir is missing"):
        ServeOptions.from_dict({})
    with pytest.raises(CatomeError, match="max_batch must be an integer >= 1"):
        ServeOptions("x", max_batch=0)
    with pytest.raises(CatomeError, match="backend_options must be a mapping, got list"):
        ServeOptions("x", backend_options=["cpu_mem_arena"])
    with pytest.raises(CatomeError, match="max-batch 3 is above the engine's built batch range 1..2"):
        check_max_batch(3, (1, 2))
    check_max_batch(2, (1, 2))
