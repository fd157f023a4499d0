"""Backend selection with monkeypatched availability: trt > ort-cuda > ort-cpu, and clear errors for what is missing."""

from __future__ import annotations

import pytest

from catome_export.backends import select
from catome_export.backends.select import choose_backend
from catome_export.errors import CatomeError

CPU_ONLY = ["CPUExecutionProvider"]
WITH_CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def machine(monkeypatch):
    """``machine(tensorrt=..., cuda=..., providers=[...])`` fakes what is installed and present."""
    def fake(*, tensorrt: bool, cuda: bool, providers: list[str]) -> None:
        monkeypatch.setattr(select, "_has", lambda module: tensorrt if module == "tensorrt" else bool(providers))
        monkeypatch.setattr(select, "_cuda_available", lambda: cuda)
        monkeypatch.setattr(select, "_ort_providers", lambda: list(providers))
    return fake


@pytest.mark.parametrize("tensorrt, cuda, providers, expected", [
    (True, True, WITH_CUDA, "trt"),
    (True, True, CPU_ONLY, "trt"),
    (False, True, WITH_CUDA, "ort-cuda"),
    (True, False, WITH_CUDA, "ort-cpu"),  # TensorRT installed but no GPU
    (False, True, CPU_ONLY, "ort-cpu"),
    (False, False, CPU_ONLY, "ort-cpu"),
])
def test_auto_prefers_trt_then_ort_cuda_then_ort_cpu(machine, tensorrt, cuda, providers, expected):
    machine(tensorrt=tensorrt, cuda=cuda, providers=providers)
    choice = choose_backend("auto")
    assert choice.name == expected and choice.reason


def test_auto_with_nothing_installed(machine):
    machine(tensorrt=False, cuda=False, providers=[])
    with pytest.raises(CatomeError, match="pip install"):
        choose_backend("auto")


def test_trt_without_tensorrt_names_it_and_the_install(machine):
    machine(tensorrt=False, cuda=True, providers=WITH_CUDA)
    with pytest.raises(CatomeError) as err:
        choose_backend("trt")
    msg = str(err.value)
    assert "TensorRT" in msg and "pip install" in msg and "--backend ort" in msg


def test_trt_without_gpu(machine):
    machine(tensorrt=True, cuda=False, providers=CPU_ONLY)
    with pytest.raises(CatomeError, match="CUDA device"):
        choose_backend("trt")


def test_trt_requested_and_available(machine):
    machine(tensorrt=True, cuda=True, providers=CPU_ONLY)
    assert choose_backend("trt").name == "trt"


@pytest.mark.parametrize("cuda, providers, expected", [
    (True, WITH_CUDA, "ort-cuda"), (False, WITH_CUDA, "ort-cpu"), (True, CPU_ONLY, "ort-cpu"),
])
def test_ort_picks_cuda_provider_when_usable(machine, cuda, providers, expected):
    machine(tensorrt=False, cuda=cuda, providers=providers)
    assert choose_backend("ort").name == expected


def test_ort_cuda_without_provider(machine):
    machine(tensorrt=False, cuda=True, providers=CPU_ONLY)
    with pytest.raises(CatomeError, match="ort-gpu"):
        choose_backend("ort-cuda")


@pytest.mark.parametrize("requested, engine, device, expected", [
    ("auto", "ort", None, "ort-cuda"),  # a folder without TensorRT plans: auto does not pick TensorRT
    ("auto", "trt", None, "trt"),
    ("auto", None, None, "trt"),  # no folder named: what runs here
    ("auto", "trt", "cpu", "ort-cpu"),  # a CPU device: ONNX Runtime's CPU provider
    ("ort", "ort", "cpu", "ort-cpu"),
    ("ort", "ort", "cuda:0", "ort-cuda"),
    ("trt", "ort", None, "trt"),  # asked for by name: no substitute (the folder's load says what is missing)
    ("ort-cuda", "ort", "cpu", "ort-cuda"),  # asked for by name: the device check is the backend's
    ("torch", "trt", "cpu", "torch"),
])
def test_the_engine_folder_and_the_device_narrow_the_choice(machine, requested, engine, device, expected):
    import torch

    machine(tensorrt=True, cuda=True, providers=WITH_CUDA)
    choice = choose_backend(requested, engine_backend=engine, device=device)
    assert choice.name == expected and choice.reason
    dev = None if device is None else torch.device(device)
    assert choose_backend(requested, engine_backend=engine, device=dev).name == expected  # a torch.device alike


def test_unknown_backend():
    with pytest.raises(CatomeError, match="unknown backend"):
        choose_backend("tensorflow")


@pytest.mark.parametrize("version, accepted", [
    ("8.6.1", False), ("10.0.1.6", False), ("10.1.0", True), ("10.13.0.35", True), ("11.1.0.106", True),
    ("12.0.0", False), ("unknown", False),
])
def test_import_tensorrt_checks_the_supported_range(monkeypatch, version, accepted):
    import sys
    import types

    from catome_export.backends.select import TRT_SUPPORTED, import_tensorrt

    module = types.ModuleType("tensorrt")
    module.__version__ = version
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    if accepted:
        assert import_tensorrt() is module
    else:
        with pytest.raises(CatomeError) as err:
            import_tensorrt()
        assert version in str(err.value) and f"tensorrt{TRT_SUPPORTED}" in str(err.value)


def test_import_tensorrt_missing(monkeypatch):
    import sys

    from catome_export.backends.select import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(CatomeError, match="TensorRT is not installed.*pip install"):
        import_tensorrt()


def test_import_tensorrt_accepts_both_standin_majors(tensorrt_standin):
    from catome_export.backends.select import import_tensorrt

    assert import_tensorrt() is tensorrt_standin


def test_extra_hints_and_docs_agree_on_the_supported_range():
    """pyproject's [trt] extra, the version check, the install hints and the docs name one range."""
    import tomllib
    from pathlib import Path

    from catome_export.backends.select import POLYGRAPHY_SUPPORTED, TRT_INSTALL_HINT, TRT_PIP, TRT_SUPPORTED

    repo = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["trt"] == [f"tensorrt{TRT_SUPPORTED}", f"polygraphy{POLYGRAPHY_SUPPORTED}"]
    assert f"polygraphy{POLYGRAPHY_SUPPORTED}" in extras["test"]  # the tests drive the real Polygraphy
    assert extras["ort-gpu"] == ["onnxruntime-gpu>=1.21"]
    assert f"tensorrt{TRT_SUPPORTED}" in TRT_PIP and TRT_PIP in TRT_INSTALL_HINT
    for doc in ("docs/tensorrt.md", "README.md"):
        text = (repo / doc).read_text()
        assert f"tensorrt{TRT_SUPPORTED}" in text, doc
        assert "pip install tensorrt --extra-index-url" not in text, doc  # an unpinned install picks any major


def test_broken_tensorrt_install_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    from catome_export.backends.select import import_tensorrt

    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.py").write_text("raise OSError('libnvinfer.so.10: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(CatomeError, match="not importable.*libnvinfer"):
        import_tensorrt()


def test_tensorrt_path_without_polygraphy_says_how_to_install_it(monkeypatch):
    import sys

    from catome_export.backends.select import POLYGRAPHY_SUPPORTED, require_polygraphy

    require_polygraphy()  # installed here (the test extra has it)
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    with pytest.raises(CatomeError, match=r"needs Polygraphy.*pip install 'catome-export\[trt\]'") as err:
        require_polygraphy()
    assert f"polygraphy{POLYGRAPHY_SUPPORTED}" in str(err.value)


@pytest.mark.parametrize("trt_version, polygraphy, refused", [
    ("11.1.0.106", "0.49.9", True),
    ("11.0.0.114", "0.49.27", True),
    ("11.1.0.106", "0.50.3", False),
    ("11.1.0.106", "0.53.6", False),
    ("10.13.0.35", "0.49.9", False),
    ("10.1.0.27", "0.49.0", False),
])
def test_polygraphy_before_050_cannot_build_for_tensorrt_11(trt_version, polygraphy, refused):
    from catome_export.tensorrt_support import POLYGRAPHY_SUPPORTED, polygraphy_problem

    problem = polygraphy_problem(trt_version, polygraphy)
    assert (problem is not None) is refused
    if refused:
        assert trt_version in problem and polygraphy in problem and "pip install 'polygraphy>=0.50'" in problem
    assert POLYGRAPHY_SUPPORTED == ">=0.50"  # the [trt] extra installs a release that builds for 10 and 11
