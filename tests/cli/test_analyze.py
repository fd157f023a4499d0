"""``catome-export analyze`` on the tiny model: output files and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catome_export.cli.main import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK = ["analyze", "--model", "tiny", "--steps", "6", "--resolution", "128"]


def test_analyze_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "pairs.json", tmp_path / "pairs.png"
    rc = main([*QUICK, "--budget", "3", "--json", str(out_json), "--plot", str(out_png)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "smooth" in printed and "random text embeddings" in printed
    assert "auto:3" in printed and "config3" in printed

    assert out_png.read_bytes()[:8] == PNG_SIGNATURE
    data = json.loads(out_json.read_text())
    for key in ("model", "tracking", "inputs", "num_calls", "timesteps", "sites", "per_step", "distance",
                "proposal", "comparison", "merged_fraction", "step_base", "budget"):
        assert key in data, key
    assert data["num_calls"] == 7 and len(data["per_step"]) == 7
    assert data["tracking"]["latents"] == "smooth" and data["latent_hw"] == [16, 16]
    assert len(data["sites"]) == 5
    proposal = data["proposal"]
    assert proposal["name"] == "auto:3" and len(proposal["checkpoints"]) == 3
    assert proposal["checkpoints"][0] == 1 and proposal["loop_indices"][0] == 0
    names = [c["name"] for c in data["comparison"]]
    assert {"config1", "config2", "config3", "config4"} <= set(names)
    step1 = data["per_step"][1]
    assert set(step1["jaccard_prev"]) == {"0", "1", "2", "3", "4"}
    assert all(0.0 <= v <= 1.0 for v in step1["jaccard_prev"].values())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_step_base_zero(tmp_path: Path) -> None:
    out_json = tmp_path / "p.json"
    assert main([*QUICK, "--steps", "3", "--budget", "2", "--step-base", "0", "--json", str(out_json)]) == 0
    proposal = json.loads(out_json.read_text())["proposal"]
    assert proposal["checkpoints"][0] == 0 and proposal["checkpoints"] == proposal["loop_indices"]


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0"], "--budget"),
    (["--budget", "7"], "--budget"),
    (["--model", "no-such-model"], "unknown model"),
    (["--prompts", "a cat"], "text encoder"),
    (["--resolution", "100"], "multiple of 8"),
    (["--threshold", "2"], "--threshold"),
    (["--json", "/no/such/folder/x.json"], "does not exist"),
])
def test_bad_input_exits_1_without_traceback(extra: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUICK, *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_analyze_tiny_xl_tracks_its_ten_sites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SDXL's layout: sites at downsample 2 (8x8 grid at 128 px), seeded text_embeds and time_ids."""
    out_json = tmp_path / "xl.json"
    rc = main(["analyze", "--model", "tiny-xl", "--steps", "3", "--resolution", "128", "--budget", "2",
               "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert len(data["sites"]) == 10 and data["num_calls"] == 4
    assert "down_blocks.1.attentions.0.transformer_blocks.1 8x8" in printed


def test_analyze_prompts_on_an_sdxl_model_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--model", "sdxl", "--prompts", "a cat"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --prompts encodes with one CLIP text encoder; sdxl needs SDXL's two")
