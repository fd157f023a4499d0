"""Optional extras: commands check theirs before any work, with the install command; doctor reports each one.

Packages are blocked by import (``sys.modules[name] = None`` makes ``import name`` raise ImportError), not
uninstalled.
"""

from __future__ import annotations

import sys

import pytest

from catome_export.cli.main import main


@pytest.fixture
def no_work(monkeypatch):
    """Any model load or run fails the test: the command must stop before."""
    import catome_export.bench.runner as bench_runner
    import catome_export.models.registry as registry

    def refuse(*args, **kwargs):
        raise AssertionError("the missing extra should have been reported before any work")

    monkeypatch.setattr(registry, "load_unet", refuse)
    monkeypatch.setattr(bench_runner, "run_bench", refuse)


def _block(monkeypatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("blocked,argv,needle", [
    ("transformers", ["generate", "--model", "tiny", "--prompt", "a fox", "--steps", "2"], "generate needs transformers"),
    ("PIL", ["generate", "--model", "tiny", "--prompt", "a fox", "--steps", "2"], "generate needs pillow"),
    ("transformers", ["eval", "--model", "tiny", "--imagenet", "1", "--steps", "2"], "eval needs transformers"),
    ("scipy", ["eval", "--model", "tiny", "--imagenet", "1", "--steps", "2"], "eval needs scipy"),
    ("matplotlib", ["bench", "--model", "tiny", "--plot", "{tmp}/b.png"], "--plot needs matplotlib"),
    ("matplotlib", ["analyze", "--model", "tiny", "--plot", "{tmp}/p.png"], "--plot needs matplotlib"),
], ids=["generate-transformers", "generate-pillow", "eval-transformers", "eval-scipy", "bench-plot", "analyze-plot"])
def test_a_missing_extra_is_reported_before_the_work(blocked, argv, needle, tmp_path, capsys, monkeypatch, no_work):
    _block(monkeypatch, blocked)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] in ("generate",):
        argv += ["--out", str(tmp_path / "x.png")]
    if argv[0] == "eval":
        argv += ["--out", str(tmp_path / "eval")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and needle in lines[0] and "pip install 'catome-export[eval]'" in lines[0], err
    assert "Traceback" not in err


def test_doctor_reports_every_extra_and_what_is_missing(capsys, monkeypatch):
    from catome_export.extras import EXTRAS

    _block(monkeypatch, "transformers", "ray", "ray.serve")
    main(["doctor"])
    out = capsys.readouterr().out
    section = out.split("extras", 1)[1]
    for name in ("ort", "ort-gpu", "trt", "eval", "test", "serve"):
        assert name in EXTRAS
        assert any(line[4:].startswith(name + " ") for line in section.splitlines()), (name, section)
    eval_line = next(line for line in section.splitlines() if line[4:].startswith("eval "))
    assert eval_line.startswith("--") and "missing transformers" in eval_line
    assert "pip install 'catome-export[eval]'" in eval_line
    serve_line = next(line for line in section.splitlines() if line[4:].startswith("serve "))
    assert serve_line.startswith("--") and "ray[serve]" in serve_line and "catome-export[serve]" in serve_line


def test_extras_name_the_modules_of_their_pyproject_extra():
    """Each extra's import check covers the packages pyproject's extra installs (by import name)."""
    import re
    import tomllib
    from pathlib import Path

    from catome_export.extras import EXTRAS

    import_name = {"pillow": "PIL", "onnxruntime-gpu": "onnxruntime", "ray[serve]": "ray.serve", "pytest-xdist": "xdist"}
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    for name, requirements in pyproject["project"]["optional-dependencies"].items():
        if name not in EXTRAS:
            continue
        packages = {re.split(r"[<>=!~ ]", r, maxsplit=1)[0] for r in requirements}
        assert {import_name.get(p, p) for p in packages} <= set(EXTRAS[name].modules) | {"ruff", "mypy"}, name


def test_the_extras_table_matches_pyproject():
    import tomllib
    from pathlib import Path

    from catome_export.extras import EXTRAS

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    assert sorted(EXTRAS) == sorted(declared)
