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
