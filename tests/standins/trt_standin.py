"""Switch the ``tensorrt`` stand-in (tests/standins/tensorrt) on and off inside a test process.

``activate(monkeypatch, "11")`` puts the stand-in playing TensorRT 11.1 on
``sys.path`` and returns the freshly imported module; ``deactivate()`` forgets
it again. Polygraphy imports ``tensorrt`` lazily and keeps the module (and a
logger subclassing its ``ILogger``) once imported; a real process only ever
has one TensorRT, so switching versions between tests resets those caches.
``subprocess_env("10")`` is the environment for a child process that should
see the stand-in. ``build_plan(trt, model, profiles)`` builds a plan with the
stand-in's builder the way TensorRT's Python API builds one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

STANDINS = Path(__file__).resolve().parent
ENV = "CATOME_TENSORRT_STANDIN"
VERSIONS = {"10": "10.13.0.35", "11": "11.1.0.106"}
"""The releases played: the NVIDIA/TensorRT sources the stand-in follows (release/10.13 and the 11.1 release)."""


def _version(major_or_version: str) -> str:
    return VERSIONS.get(str(major_or_version), str(major_or_version))


def _forget_polygraphy_import() -> None:
    for name, module in list(sys.modules.items()):
        if not name.startswith("polygraphy") or module is None:
            continue
        for value in list(vars(module).values()):
            if type(value).__name__ == "LazyModule":
                cached = object.__getattribute__(value, "module")
                if isinstance(cached, ModuleType) and cached.__name__ == "tensorrt":
                    object.__setattr__(value, "module", None)
    util = sys.modules.get("polygraphy.backend.trt.util")
    if util is not None:
        util.TRT_LOGGER = None


def deactivate() -> None:
    """Forget any imported ``tensorrt`` (stand-in) and Polygraphy's hold on it."""
    for name in [n for n in sys.modules if n == "tensorrt" or n.startswith("tensorrt.")]:
        del sys.modules[name]
    _forget_polygraphy_import()


def activate(monkeypatch: Any, major_or_version: str = "10") -> ModuleType:
    """Import the stand-in as ``tensorrt`` for one test (undone by ``monkeypatch`` and :func:`deactivate`)."""
    deactivate()
    monkeypatch.setenv(ENV, _version(major_or_version))
    monkeypatch.syspath_prepend(str(STANDINS))
    import tensorrt

    assert Path(tensorrt.__file__).resolve().parent.parent == STANDINS, tensorrt.__file__
    return tensorrt


def subprocess_env(major_or_version: str = "10", base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child Python that imports the stand-in as ``tensorrt``."""
    env = dict(os.environ if base is None else base)
    env[ENV] = _version(major_or_version)
    env["PYTHONPATH"] = os.pathsep.join([str(STANDINS), *filter(None, [env.get("PYTHONPATH")])])
    return env


def build_plan(trt: ModuleType, model: bytes, profiles: dict[str, tuple[tuple[int, ...], ...]]) -> bytes:
    """A plan of ONNX ``model`` from ``trt``'s builder with one optimization profile ``{input: (min, opt, max)}``."""
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # the ONNX parser maps ScatterElements with a reduction to a plugin
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model):
        raise AssertionError([str(parser.get_error(i)) for i in range(parser.num_errors)])
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise AssertionError("the stand-in's builder returned no plan")
    return bytes(memoryview(plan))
