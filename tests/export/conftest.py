"""Fixtures of the export tests: the tiny U-Net cut into stages, and one export of them shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def export_sites(tiny_unet):
    from catome_export.models import find_merge_sites

    return find_merge_sites(tiny_unet)


@pytest.fixture(scope="session")
def export_stages(tiny_unet, export_sites):
    """``cut_unet`` of the tiny U-Net in fp32 (modules share the session U-Net's weights)."""
    from catome_export.export.stages import cut_unet

    return cut_unet(tiny_unet, export_sites)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_unet, export_sites, export_stages) -> tuple[Path, list]:
    """(folder, [ExportedStage]): every stage of the tiny U-Net exported once (TorchScript exporter, opset 17)."""
    from catome_export.export.onnx_export import example_inputs, export_stage

    folder = tmp_path_factory.mktemp("tiny_export")
    examples = example_inputs(export_stages, export_sites, tiny_unet.config, torch.float32)
    items = [export_stage(spec, module, examples[spec.index], folder) for spec, module in export_stages]
    return folder, items


@pytest.fixture(scope="session")
def ort_sessions(exported) -> dict:
    """Stage index -> ONNX Runtime CPU session of the shared export."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'catome-export[ort]')")
    from catome_export.export.onnx_export import ort_session

    folder, items = exported
    return {item.index: ort_session(folder / item.file) for item in items}


# -- SD 1.5 and SD 2.1 at their real size (test_sd15_real_size.py, test_sd21_real_size_fp16.py) ------------------

SD15_RESOLUTION = 64
"""Image side in pixels of the real-size builds: the CLI's minimum (an 8 x 8 latent)."""


def _parameters(model: str) -> int:
    from diffusers import UNet2DConditionModel

    from catome_export.models import bundled_config

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(bundled_config(model))
    return sum(p.numel() for p in unet.parameters())


@pytest.fixture(scope="session")
def unet_parameters():
    """``unet_parameters(model)``: parameter count of a registry model's U-Net (its bundled config, built on the
    meta device: no memory, no init)."""
    return _parameters


@pytest.fixture(scope="session")
def sd15_parameters() -> int:
    """Parameter count of SD 1.5's U-Net."""
    return _parameters("sd15")


def _weight_bytes(folder: Path, manifest) -> dict[int, int]:
    import onnx

    from catome_export.export.external_data import tensor_nbytes

    total: dict[int, int] = {}
    for entry in manifest.stages:
        model = onnx.load(str(folder / entry.file), load_external_data=False)
        for t in model.graph.initializer:
            total[t.data_type] = total.get(t.data_type, 0) + tensor_nbytes(t, folder)
    return total


@pytest.fixture(scope="session")
def weight_bytes():
    """``weight_bytes(folder, manifest)``: ONNX data type -> bytes of the initializers of that type over all stage
    files (sized, not loaded)."""
    return _weight_bytes


def _build_real(model: str, out: Path, *extra: str) -> str:
    import gc
    import io
    from contextlib import redirect_stdout

    from catome_export.cli.main import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["build", "--model", model, "--weights", "random", "--engine-kind", "ort", "--resolution",
                     str(SD15_RESOLUTION), "--no-verify", "--out", str(out), *extra])
    gc.collect()
    assert code == 0, buf.getvalue()[-2000:]
    return buf.getvalue()


@pytest.fixture(scope="session")
def build_real():
    """``build_real(model, out, *extra_flags)``: ``catome-export build --model <model> --weights random --engine-kind
    ort`` at 64 px without verification; returns its stdout (asserts exit code 0)."""
    return _build_real


@pytest.fixture(scope="session")
def build_sd15():
    """``build_sd15(out, *extra_flags)``: :func:`build_real` of ``sd15``."""
    return lambda out, *extra: _build_real("sd15", out, *extra)
