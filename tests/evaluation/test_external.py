"""FID and CLIP score: presence checks (no download), the Fréchet distance, CLIP score on a local model."""

from __future__ import annotations

import numpy as np
import pytest

from catome_export.errors import CatomeError
from catome_export.evaluation.external import (ClipScorer, InceptionFeatures, clip_availability, fid_availability,
                                               frechet_distance)


def test_frechet_distance_of_identical_sets_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((64, 8))
    assert frechet_distance(feats, feats.copy()) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    # Same covariance, means apart by d: the trace term vanishes and FID = |d|^2.
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((200, 6))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert frechet_distance(feats + shift, feats) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_of_scaled_gaussians_matches_the_closed_form():
    # Covariances I and 4 I (exactly, by whitening): trace term = D (1 + 4 - 2 * 2) = D.
    rng = np.random.default_rng(2)
    raw = rng.standard_normal((500, 4))
    raw -= raw.mean(axis=0)
    white = raw @ np.linalg.inv(np.linalg.cholesky(np.cov(raw, rowvar=False))).T
    assert frechet_distance(white, 2.0 * white) == pytest.approx(4.0, rel=1e-6)


def test_frechet_distance_needs_two_samples_and_equal_widths():
    with pytest.raises(CatomeError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(CatomeError):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_fid_reports_what_is_missing_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    status = fid_availability()
    assert not status.available
    assert "InceptionV3" in status.detail or "weights" in status.detail
    assert "to get it" in status.line() and "pip install" in status.fix
    assert not (tmp_path / "empty-torch-home").exists() or not any((tmp_path / "empty-torch-home").rglob("*.pth"))
    with pytest.raises(CatomeError, match="FID is not available"):
        InceptionFeatures()


def test_clip_reports_a_model_missing_from_the_cache():
    status = clip_availability("catome-export-tests/no-such-clip-model")
    assert not status.available
    assert "not in the local" in status.detail and "hf download" in status.fix
    with pytest.raises(CatomeError, match="CLIP score is not available"):
        ClipScorer("catome-export-tests/no-such-clip-model")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP model saved as a local folder (tokenizer built in memory)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from catome_export.models.pipeline import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(tokenizer) - 2,
                         eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.CLIPModel(config).eval()
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    folder = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_clip_score_on_a_local_model(tiny_clip_dir):
    status = clip_availability(str(tiny_clip_dir))
    assert status.available, status.line()
    scorer = ClipScorer(str(tiny_clip_dir))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["a red car", "a dog", "a house by the sea"]
    scores = scorer(images, prompts)
    assert len(scores) == 3 and all(0.0 <= s <= 100.0 for s in scores)
    assert scorer(images[:1], prompts[:1])[0] == pytest.approx(scores[0], abs=1e-4)  # per pair, batch-independent
    with pytest.raises(CatomeError, match="pair up"):
        scorer(images, prompts[:2])
