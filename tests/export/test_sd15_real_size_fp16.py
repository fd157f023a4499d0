"""SD 1.5 at its real size (seeded random weights) in fp16: ``catome-export build --precision fp16``, graphs only.

ONNX Runtime's CPU kernels lack fp16 ScatterElements (add), so the fp16
graphs are not run here (they run on TensorRT or ONNX Runtime CUDA): every
stage passes the ONNX checker, its weights are fp16 and its IO is the one the
manifest records. At 64 px, like the fp32 test in test_sd15_real_size.py
(see its docstring for the costs; this build took 255 s of them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from catome_export.export.manifest import Manifest

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'catome-export[ort]')")


@pytest.fixture(scope="module")
def sd15_fp16(tmp_path_factory, build_sd15) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sd15_fp16") / "sd15"
    # ONNX Runtime's fusions do not fuse the fp16 export's attention (see export/ort_optimize.py): this fixture checks
    # the fp16 graphs themselves, so it builds without the fused copies
    return out, build_sd15(out, "--precision", "fp16", "--ort-optimize", "off")


def test_fp16_export_is_valid_onnx_with_fp16_weights_and_the_manifest_io(sd15_fp16, sd15_parameters, weight_bytes):
    import onnx

    from catome_export.export.onnx_export import check_stage_file

    out, _ = sd15_fp16
    manifest = Manifest.load(out, check_files=True, check_hashes=True)
    assert manifest.precision == "fp16" and len(manifest.stages) == 6
    elem = {"float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
    for entry in manifest.stages:
        path = out / entry.file
        check_stage_file(path)
        model = onnx.load(str(path), load_external_data=False)
        for io_kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
            want = [(t["name"], elem[t["dtype"]], list(t["shape"])) for t in entry.to_dict()[io_kind]]
            seen = [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in
                                                             v.type.tensor_type.shape.dim]) for v in values]
            if io_kind == "outputs":  # the exporter names some static output dims itself: compare the rank
                want = [(name, dtype, len(shape)) for name, dtype, shape in want]
                seen = [(name, dtype, len(shape)) for name, dtype, shape in seen]
            assert seen == want, (entry.index, io_kind)
        for t in model.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT:
                # fp32 tensors left in an fp16 graph are small constants (the sinusoidal time embedding's
                # frequencies and the like), never weights.
                assert len(t.raw_data) <= 4096, (entry.index, t.name, list(t.dims))
    weights = weight_bytes(out, manifest)
    assert 0.999 < weights[onnx.TensorProto.FLOAT16] / (2 * sd15_parameters) < 1.001  # as in fp32
