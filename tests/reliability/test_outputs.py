"""Output paths: checked before the work, and a result whose write still fails at the end is kept elsewhere.

The end-of-run case is made real: the output folder exists when the command checks it, and is replaced by a
file while the work runs (as a folder removed or unmounted meanwhile would be), so the final write fails.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

from catome_export.cli.main import main


def _kept(err: str) -> Path:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "the result was kept in " in lines[0] and "Traceback" not in err, err
    return Path(lines[0].split("the result was kept in ", 1)[1].split(";", 1)[0].strip())


def _break_folder_after(monkeypatch, module: str, name: str, folder: Path) -> None:
    """Run ``module.name`` as usual, then replace ``folder`` with a file."""
    mod = importlib.import_module(module)
    real = getattr(mod, name)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        shutil.rmtree(folder)
        folder.write_text("now a file")
        return result

    monkeypatch.setattr(mod, name, wrapped)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "analyze-json", "bench-json", "verify-json", "eval"])
def test_a_write_that_fails_at_the_end_keeps_the_result(command, tmp_path, capsys, monkeypatch, request):
    folder = tmp_path / "out"
    folder.mkdir()
    if command == "generate":
        target = folder / "fox.png"
        argv = ["generate", "--model", "tiny", "--prompt", "a fox", "--steps", "2", "--resolution", "64",
                "--out", str(target)]
        _break_folder_after(monkeypatch, "catome_export.workflows.generate", "generate", folder)
    elif command == "analyze-json":
        target = folder / "a.json"
        argv = ["analyze", "--model", "tiny", "--steps", "3", "--resolution", "64", "--json", str(target)]
        _break_folder_after(monkeypatch, "catome_export.analysis.result", "analyze_pairs", folder)
    elif command == "bench-json":
        target = folder / "b.json"
        argv = ["bench", "--model", "tiny", "--backends", "eager", "--merge-fractions", "0", "--resolution", "64",
                "--repeats", "1", "--warmup", "1", "--json", str(target)]
        _break_folder_after(monkeypatch, "catome_export.bench.runner", "run_bench", folder)
    elif command == "verify-json":
        engine = request.getfixturevalue("tiny_engine")
        target = folder / "v.json"
        argv = ["verify", "--engine", str(engine), "--steps", "2", "--threads", "1", "--quiet", "--json", str(target)]
        _break_folder_after(monkeypatch, "catome_export.runtime.verify", "verify_engine", folder)
    else:
        target = folder / "results.json"
        argv = ["eval", "--model", "tiny", "--imagenet", "1", "--steps", "2", "--resolution", "64", "--warmup", "0",
                "--out", str(folder)]
        _break_folder_after(monkeypatch, "catome_export.workflows.evaluate", "_external_metrics", folder)
    assert main(argv) == 1
    err = capsys.readouterr().err
    kept = _kept(err)
    assert str(target) in err and kept.name == target.name and kept.stat().st_size > 0
    shutil.rmtree(kept.parent)


def _unwritable(kind: str, tmp_path: Path, name: str) -> Path:
    """A path no run can write, as root too: under a file, or in /proc."""
    if kind == "under-a-file":
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file")
        return blocker / "sub" / name
    return Path("/proc") / name


@pytest.mark.parametrize("kind", ["under-a-file", "proc", "existing-read-only"])
def test_eval_out_is_checked_before_any_model_loads(kind, tmp_path, capsys, monkeypatch):
    import catome_export.models.registry as registry

    def no_model_loads(*args, **kwargs):
        raise AssertionError("the output should have been refused before a model was loaded")

    monkeypatch.setattr(registry, "load_unet", no_model_loads)
    out = Path("/proc") if kind == "existing-read-only" else _unwritable(kind, tmp_path, "eval-out")
    assert main(["eval", "--model", "tiny", "--imagenet", "1", "--steps", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot write --out" in err, err


def test_outputs_keeps_what_it_cannot_write_where_asked(tmp_path):
    from catome_export.errors import CatomeError
    from catome_export.fsutil import Outputs

    blocker = tmp_path / "file"
    blocker.write_text("x")
    outputs = Outputs()
    assert outputs.save(tmp_path / "ok.txt", lambda p: p.write_text("fine"), "--a") == tmp_path / "ok.txt"
    kept = outputs.save(blocker / "r.txt", lambda p: p.write_text("result"), "--b")
    assert kept is not None and kept.read_text() == "result" and kept.parent != tmp_path
    with pytest.raises(CatomeError, match=f"cannot write --b {blocker / 'r.txt'} .*kept in {kept}"):
        outputs.finish()
    shutil.rmtree(kept.parent)
