"""``catome-export bench --generation``: whole generations per row, on tiny (structure and counts, not speed)."""

from __future__ import annotations

import json

import pytest

from catome_export.cli.main import main


@pytest.mark.slow
def test_generation_mode_end_to_end(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the engine rows run in ONNX Runtime here")
    pytest.importorskip("DeepCache", reason="the eager-deepcache row runs the DeepCache package's helper")
    out = tmp_path / "g.json"
    code = main(["bench", "--generation", "7", "--rounds", "2", "--model", "tiny", "--resolution", "64",
                 "--threads", "1", "--feature-cache", "3,0", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| row | mean ms/step |" in stdout and "| engine @ 0.75 + cache 3,0 |" in stdout
    data = json.loads(out.read_text())
    assert data["mode"] == "generation" and data["config"]["steps"] == 7
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["eager", "eager-deepcache + cache 3,0", "engine @ 0", "engine @ 0.75",
                          "engine @ 0 + cache 3,0", "engine @ 0.75 + cache 3,0"]
    for label, r in rows.items():
        assert r["calls"] == 7 and len(r["samples_ms"]) == 2 and all(len(g) == 7 for g in r["samples_ms"])
        cached = "cache" in label
        # interval 3 over 7 DDIM calls: full at 0, 3, 6; the rest from the cache
        assert r["cached"][0] == ([False, True, True] * 2 + [False] if cached else [False] * 7)
        assert r["vs_no_cache"] is None if not cached else r["vs_no_cache"] > 0
        assert r["mean_ms_per_step"] > 0 and r["vs_eager"] > 0
    assert data["device"]["threads"] == 1


@pytest.mark.parametrize("argv,message", [
    (["--generation", "5", "--feature-cache", "off"], "not off"),
    (["--feature-cache", "3,0"], "time it with --generation N"),
    (["--generation", "5", "--resolution", "64", "128"], "one --resolution"),
    (["--generation", "5", "--backends", "eager,engine-unstaged"], "generation mode times"),
    (["--generation", "5", "--feature-cache", "1,0"], "interval >= 2"),
])
def test_generation_mode_bad_flags_exit_1_before_any_work(argv, message, tmp_path, capsys):
    code = main(["bench", "--model", "tiny", "--workdir", str(tmp_path / "w"), *argv])
    assert code == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()
