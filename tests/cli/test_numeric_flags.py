"""Every numeric flag of every command refuses values outside its range: exit 1, one `error:` line naming it,
before any model is loaded or anything is run."""

from __future__ import annotations

import pytest

from catome_export.cli.main import main


@pytest.fixture
def no_work(monkeypatch):
    import catome_export.bench.runner as bench_runner
    import catome_export.workflows.build as build
    import catome_export.models.registry as registry
    import catome_export.runtime.runtime as runtime

    def refuse(*args, **kwargs):
        raise AssertionError("a bad flag should have been refused before any work")

    monkeypatch.setattr(registry, "load_unet", refuse)
    monkeypatch.setattr(bench_runner, "run_bench", refuse)
    monkeypatch.setattr(build, "run_build", refuse)
    monkeypatch.setattr(runtime.Runtime, "load", classmethod(lambda cls, *a, **k: refuse()))


GENERATE = ["generate", "--model", "tiny", "--prompt", "a fox"]
EVAL = ["eval", "--model", "tiny", "--imagenet", "1"]
BENCH = ["bench", "--model", "tiny"]
BUILD = ["build", "--model", "tiny"]
ANALYZE = ["analyze", "--model", "tiny"]

CASES = [
    (GENERATE, ["--steps", "0"], "steps"), (GENERATE, ["--steps", "-3"], "steps"),
    (GENERATE, ["--seed", "-1"], "seed"), (GENERATE, ["--guidance", "nan"], "guidance"),
    (GENERATE, ["--resolution", "0"], "height"), (GENERATE, ["--resolution", "64x-8"], "width"),
    (EVAL, ["--imagenet", "0"], "ImageNet prompts"), (EVAL, ["--steps", "0"], "steps"), (EVAL, ["--seed", "-1"], "seed"),
    (EVAL, ["--warmup", "-1"], "warmup"), (EVAL, ["--resolution", "0"], "height"), (EVAL, ["--ratio", "1.5"], "ratio"),
    (EVAL, ["--guidance", "inf"], "guidance"),
    (BENCH, ["--batch", "0"], "batch"), (BENCH, ["--repeats", "0"], "repeats"), (BENCH, ["--warmup", "-1"], "warmup"),
    (BENCH, ["--threads", "0"], "threads"), (BENCH, ["--steps", "-1"], "steps"), (BENCH, ["--text-len", "0"], "text"),
    (BENCH, ["--seed", "-1"], "seed"), (BENCH, ["--resolution", "0"], "resolution"),
    (BENCH, ["--checkpoint-repeats", "-1"], "checkpoint"), (BENCH, ["--threshold", "2"], "threshold"),
    (BUILD, ["--verify-steps", "0"], "verify steps"), (BUILD, ["--batch", "0"], "batch"),
    (BUILD, ["--threshold", "nan"], "threshold"), (BUILD, ["--opt-merge-fraction", "2"], "merge-fraction"),
    (BUILD, ["--r-multiple", "0"], "--r-multiple"), (BUILD, ["--r-multiple", "1.5"], "--r-multiple"),
    (GENERATE, ["--r-multiple", "-64"], "--r-multiple"), (BENCH, ["--r-multiple", "x"], "--r-multiple"),
    (ANALYZE, ["--steps", "0"], "steps"), (ANALYZE, ["--resolution", "0"], "resolution"),
    (ANALYZE, ["--seed", "-1"], "seed"), (ANALYZE, ["--budget", "0"], "budget"),
    (ANALYZE, ["--guidance", "nan"], "guidance"), (ANALYZE, ["--threshold", "2"], "threshold"),
]


@pytest.mark.parametrize("base,flag,needle", CASES, ids=[f"{b[0]}{'='.join(f)}" for b, f, _ in CASES])
def test_out_of_range_numeric_flags_are_refused(base, flag, needle, tmp_path, capsys, no_work):
    argv = list(base) + list(flag)
    if base[0] in ("generate",):
        argv += ["--out", str(tmp_path / "x.png")]
    if base[0] in ("eval", "build"):
        argv += ["--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


VERIFY_CASES = [(["--steps", "0"], "steps"), (["--batch", "0"], "batch"), (["--tolerance", "-1"], "tolerance"),
                (["--merge-tolerance", "2"], "tolerance"), (["--threads", "0"], "threads"),
                (["--seed", "-1"], "seed"), (["--r-multiple", "0"], "--r-multiple")]


@pytest.mark.parametrize("flag,needle", VERIFY_CASES, ids=["=".join(f) for f, _ in VERIFY_CASES])
def test_out_of_range_verify_flags_are_refused(flag, needle, tiny_engine, capsys, no_work):
    assert main(["verify", "--engine", str(tiny_engine), *flag]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and needle in lines[0], err
