"""SD 2.1 at its real size (seeded random weights) in fp16: ``catome-export build --model sd21 --precision fp16``.

The fp16 real-size build: SD 2.1's U-Net has SD 1.5's size (865 M
parameters; its stage 2 holds 1.7 GB of fp16 weights), with SD 2.x's layout
(linear ``proj_in``/``proj_out``, 5 / 10 / 20 attention heads per level, a
1024-wide text encoding). SD 1.5's fp32 build is in test_sd15_real_size.py;
the two files run on two test workers at once. The fp16 path is the same code
for both models, and the layouts are checked at parity on small configs
(tests/export/test_stages_xl.py).

ONNX Runtime's CPU kernels lack fp16 ScatterElements (add), so the fp16
graphs are not run here (they run on TensorRT or ONNX Runtime CUDA): every
stage passes the ONNX checker, its weights are fp16 and its IO is the one the
manifest records. At 64 px, like the fp32 test (see its docstring for the
costs; SD 1.5's fp16 build took 255 s of them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from catome_export.engine.manifest import Manifest

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'catome-export[ort]')")


@pytest.fixture(scope="module")
def sd21_fp16(tmp_path_factory, build_real) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sd21_fp16") / "sd21"
    # ONNX Runtime's fusions do not fuse the fp16 export's attention (see export/ort_optimize.py): this fixture checks
    # the fp16 graphs themselves, so it builds without the fused copies
    return out, build_real("sd21", out, "--precision", "fp16", "--ort-optimize", "off")


def test_fp16_export_is_valid_onnx_with_fp16_weights_and_the_manifest_io(sd21_fp16, unet_parameters, weight_bytes):
    import onnx

    from catome_export.export.onnx_export import check_stage_file

    out, _ = sd21_fp16
    manifest = Manifest.load(out, check_files=True, check_hashes=True)
    assert manifest.precision == "fp16" and len(manifest.stages) == 6 and manifest.model.id == "sd21"
    assert manifest.shapes.text_dim == 1024 and manifest.merge.max_downsample == 1
    audit = manifest.extra["audit"]  # the TensorRT operator audit of SD 2.x's stages
    assert audit["passed"] and audit["errors"] == 0, audit["findings"][:5]
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
    assert 0.999 < weights[onnx.TensorProto.FLOAT16] / (2 * unet_parameters("sd21")) < 1.001  # as in fp32
