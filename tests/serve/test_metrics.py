"""What an image replica records per image, per pipeline call and per U-Net call and site (Ray's metric classes
replaced by stand-ins that keep the records; Ray exports the real ones, see test_serve_ray.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'catome-export[serve]')")


class Kept:
    records: dict[str, list] = {}

    def __init__(self, name: str, **kwargs) -> None:
        self.name = name
        Kept.records[name] = []

    def inc(self, value=1, tags=None) -> None:
        assert value > 0  # Ray refuses anything else
        Kept.records[self.name].append((value, tags))

    def observe(self, value, tags=None) -> None:
        Kept.records[self.name].append((value, tags))


def test_a_replica_records_images_calls_and_merging(monkeypatch):
    import ray.serve.metrics

    from catome_export.serve.metrics import ReplicaMetrics, outcome_of
    from catome_export.serve.service import ImageResult

    monkeypatch.setattr(ray.serve.metrics, "Counter", Kept)
    monkeypatch.setattr(ray.serve.metrics, "Histogram", Kept)
    Kept.records = {}
    metrics = ReplicaMetrics()

    def image(call: int, queue_ms: float, cached: int = 0) -> ImageResult:
        return ImageResult(png=b"", seed=0, batch_images=2 if call == 1 else 1, merged=[[10, 0], [12, 3], [0, 0]],
                           matched_steps=[0], queue_ms=queue_ms, generation_ms=1500.0, step_ms=[1.0, 1.0, 1.0],
                           call=call, cached_steps=cached)

    metrics.record([image(1, 100.0), image(1, 120.0), RuntimeError("a failed job"), image(2, 5.0, cached=2)])
    kept = Kept.records
    assert kept["catome_images_total"] == [(1, None)] * 3
    assert [v for v, _ in kept["catome_queue_seconds"]] == [0.1, 0.12, 0.005]
    assert [v for v, _ in kept["catome_generation_seconds"]] == [1.5, 1.5]  # once per pipeline call
    assert [v for v, _ in kept["catome_batch_images"]] == [2, 1] and [v for v, _ in kept["catome_steps"]] == [3, 3]
    assert kept["catome_unet_calls_total"] == [(3, None), (3, None)]
    assert kept["catome_feature_cached_steps_total"] == [(2, None)]
    per_site = [(v, t["site"]) for v, t in kept["catome_merged_tokens"]]
    assert per_site == [(10, "0"), (0, "1"), (12, "0"), (3, "1"), (0, "0"), (0, "1")] * 2
    assert [outcome_of(s) for s in (200, 400, 422, 500, 503)] == ["ok", "invalid", "invalid", "failed", "failed"]
