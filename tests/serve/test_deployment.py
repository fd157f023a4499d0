"""The deployment's options and the application builder, without starting Ray."""

from __future__ import annotations

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


@pytest.mark.parametrize("kwargs, message", [
    ({"replicas": 2, "min_replicas": 1}, "not both"),
    ({"replicas": 0}, "replicas must be an integer >= 1, got 0"),
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas must be an integer >= max(1, min_replicas) = 3, got 2"),
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
