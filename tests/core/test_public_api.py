"""The public API: ``from catome_export import ...`` stays light, and the README's Python snippet runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PUBLIC = ["apply_catome", "apply_tome", "apply_deepcache", "FeatureCacheSettings", "build_engine", "Runtime", "MergeSettings", "CatomeError"]


def test_import_is_light_and_every_public_name_resolves():
    code = ("import sys, catome_export\n"
            "heavy = [m for m in ('torch', 'diffusers', 'onnx', 'onnxruntime') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            f"from catome_export import {', '.join(PUBLIC)}\n"
            f"assert set({PUBLIC!r}) <= set(catome_export.__all__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr


def test_unknown_name_is_an_attribute_error():
    import catome_export

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        catome_export.nope


def readme_python_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_python_snippet_runs_on_the_tiny_model(tmp_path, monkeypatch):
    """The README's snippet as written, on the tiny model: sd15 -> tiny (a small build range, no verify, since
    the build's own checks are tested elsewhere), and a pipeline whose calls take few steps at 128 px."""
    pytest.importorskip("onnxruntime", reason="the engine part needs ONNX Runtime (pip install 'catome-export[ort]')")
    pytest.importorskip("transformers", reason="the tiny pipeline's text encoder needs transformers")
    from catome_export.models.pipeline import tiny_pipeline

    snippet = readme_python_snippet()
    assert 'build_engine("sd15", out_dir="engines/sd15")' in snippet and '"engines/sd15"' in snippet
    snippet = snippet.replace('build_engine("sd15", out_dir="engines/sd15")',
                              'build_engine("tiny", out_dir="engines/tiny", min_resolution=128, max_resolution=128, '
                              'max_batch=2, verify=False)')
    snippet = snippet.replace('"engines/sd15"', '"engines/tiny"')

    pipe = tiny_pipeline("pndm")

    class QuickPipeline(type(pipe)):  # type: ignore[misc]
        def __call__(self, *args, **kwargs):
            kwargs.setdefault("num_inference_steps", 3)
            kwargs.setdefault("height", 128)
            kwargs.setdefault("width", 128)
            return super().__call__(*args, **kwargs)

    pipe.__class__ = QuickPipeline
    monkeypatch.chdir(tmp_path)
    scope = {"pipe": pipe}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert (tmp_path / "engines" / "tiny" / "manifest.json").is_file()
    assert scope["image"].size == (128, 128)
    assert scope["runtime"].settings.threshold == 0.8 and scope["handle"].history
