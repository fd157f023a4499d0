"""The public API: ``from catome_export import ...`` stays light (the README's Python block runs in tests/docs)."""

from __future__ import annotations

import os
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
