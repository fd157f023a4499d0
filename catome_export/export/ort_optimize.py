"""ONNX Runtime's own transformer fusions, applied to a stage graph for the ONNX Runtime backend only.

The stage graphs a build exports stay standard ONNX (TensorRT parses them and
the operator audit checks them). For ONNX Runtime a build also writes
``stage_<k>.ort.onnx`` beside each of them: the same graph after
``onnxruntime.transformers``' fusion passes, which put ONNX Runtime's
contrib operators (``com.microsoft.MultiHeadAttention``,
``SkipLayerNormalization``, ``Gelu``) in place of the subgraphs they compute.

Two of ONNX Runtime's passes run, in this order:

1. the Stable Diffusion U-Net pass (``optimize_model(model_type="unet")``):
   layer norm, Gelu, skip layer norm and the attention fusion it anchors on a
   LayerNormalization whose output feeds Q, K and V and whose input is the
   residual. That matches every attention outside a merge site (cross-attention,
   and self-attention at levels that do not merge);
2. the Softmax-anchored ``MultiHeadAttention`` fusion of the MMDiT pass
   (``onnx_model_mmdit``), for the attentions that pass 1 cannot see: at a merge
   site Q, K and V come from the merged tokens ``[B, K, C]`` (K varies with r),
   not from the layer norm. It needs K in the exporter's "BNSH, then transposed"
   form; the TorchScript exporter folds those two transposes into one
   (perm 0,2,3,1 straight from the [B, N, H, D] reshape), so before the pass
   that one Transpose is written back as the two it came from (exact: the
   same permutation; :func:`_unfold_key_transposes`).

Only fusions whose operators ONNX Runtime runs on the CPU provider are used
(:func:`fusion_options`); those that exist only for CUDA (``GroupNorm``,
``NhwcConv``, ``BiasSplitGelu``, ``BiasAdd``, packed QKV) would make graphs the
CPU provider cannot load, and cannot be measured here.

ONNX Runtime 1.32's optimizer has two bugs this module works around, while it
runs, by replacing the two methods with corrected copies (restored after):
``FusionAttentionUnet.get_num_heads`` calls ``int()`` on a 1-element array,
which numpy 2.4 refuses; ``UnetOnnxModel.remove_useless_div`` removes a
divide-by-one whose output is a graph output, leaving the output unproduced.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from catome_export.errors import CatomeError
from catome_export.engine.manifest import FusedGraph

logger = logging.getLogger(__name__)

SUFFIX = ".ort.onnx"
"""``stage_3.onnx`` -> ``stage_3.ort.onnx`` (weights, where external, in ``stage_3.ort.onnx.data``)."""
CONTRIB_DOMAIN = "com.microsoft"
CPU_FUSIONS_OFF = ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                   "enable_bias_add", "group_norm_channels_last", "enable_packed_qkv", "enable_packed_kv")
"""U-Net fusions whose operators have CUDA kernels only (or whose packed layouts the CPU kernel lacks)."""

SMALL_WEIGHT_BYTES = 16 << 20
"""External weights up to this size are read in for the fusions, which read every attention projection (SD 1.5's
largest, 1280 x 1280 fp32, is 6.6 MB; SDXL's cross-attention key and value, 2048 x 1280, 10.5 MB); larger ones
(convolutions, feed-forward matrices) are copied from file to file without being held."""

_patch_lock = threading.Lock()


def optimized_name(file: str) -> str:
    """The optimized graph's file name for a stage file (``stage_0.onnx`` -> ``stage_0.ort.onnx``)."""
    if not file.endswith(".onnx"):
        raise CatomeError(f"{file} is not an .onnx file")
    return file[: -len(".onnx")] + SUFFIX


@dataclass
class OptimizedGraph:
    """What :func:`optimize_graph` wrote."""

    file: str
    external_data: str | None
    sha256: str
    bytes: int
    external_data_sha256: str | None
    external_data_bytes: int | None
    fused: dict[str, int] = field(default_factory=dict)
    """Contrib operator type -> count in the optimized graph."""
    attention_left: int = 0
    """Softmax nodes left unfused (attention cores no pass matched)."""
    seconds: float = 0.0

    def record(self) -> FusedGraph:
        """The stage's ``ort_optimized`` manifest record."""
        return FusedGraph(file=self.file, sha256=self.sha256, bytes=self.bytes, external_data=self.external_data,
                          external_data_sha256=self.external_data_sha256,
                          external_data_bytes=self.external_data_bytes, fused=dict(self.fused),
                          attention_left=self.attention_left)

    def entry(self) -> dict[str, Any]:
        """The stage's ``ort_optimized`` manifest item, as written to manifest.json."""
        return self.record().to_dict()


def _import_optimizer() -> Any:
    try:
        from onnxruntime.transformers import optimizer
    except ImportError as exc:
        raise CatomeError(f"ONNX Runtime's transformer optimizer is not importable ({exc}): install onnxruntime "
                          "(pip install 'catome-export[ort]'), or build with --ort-optimize off") from None
    return optimizer


def fusion_options(model_type: str) -> Any:
    """ONNX Runtime ``FusionOptions`` for ``model_type`` with the CUDA-only fusions off."""
    _import_optimizer()  # puts onnxruntime/transformers on sys.path, where its modules import each other
    from fusion_options import FusionOptions

    options = FusionOptions(model_type)
    for name in CPU_FUSIONS_OFF:
        if hasattr(options, name):
            setattr(options, name, False)
    return options


def _get_num_heads(self: Any, reshape_q: Any, is_torch2: bool = False) -> int:
    """``FusionAttentionUnet.get_num_heads`` of onnxruntime 1.32, with ``int()`` of a 1-element array fixed."""
    import numpy as np

    num_heads = 0
    if is_torch2:
        parent = self.model.get_parent(reshape_q, 1)
        if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.size == 1:
                num_heads = int(value.reshape(-1)[0])
    else:
        value = self.model.get_constant_value(reshape_q.input[1])
        if isinstance(value, np.ndarray) and list(value.shape) == [4]:
            num_heads = int(value[2])
    return num_heads if num_heads > 0 else 0


def _remove_useless_div(self: Any) -> None:
    """``UnetOnnxModel.remove_useless_div`` that keeps a divide-by-one whose output is a graph output."""
    outputs = {o.name for o in self.model.graph.output}
    nodes = [n for n in self.nodes()
             if n.op_type == "Div" and n.output[0] not in outputs and self.find_constant_input(n, 1.0) == 1]
    for node in nodes:
        self.replace_input_of_all_nodes(node.output[0], node.input[0])
    if nodes:
        self.remove_nodes(nodes)


@contextlib.contextmanager
def _patched_optimizer() -> Iterator[None]:
    """onnxruntime 1.32's optimizer with the two fixes of the module docstring, for the duration."""
    _import_optimizer()
    import fusion_attention_unet
    import onnx_model_unet

    fixes = [(fusion_attention_unet.FusionAttentionUnet, "get_num_heads", _get_num_heads),
             (onnx_model_unet.UnetOnnxModel, "remove_useless_div", _remove_useless_div)]
    with _patch_lock:
        saved = [(cls, name, cls.__dict__[name]) for cls, name, _ in fixes if name in cls.__dict__]
        for cls, name, fn in fixes:
            setattr(cls, name, fn)
        try:
            yield
        finally:
            for cls, name, fn in saved:
                setattr(cls, name, fn)


def _perm(node: Any) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _unfold_key_transposes(onnx_model: Any) -> int:
    """Write each attention's folded K transpose (perm 0,2,3,1 of [B, N, H, D]) as perm 0,2,1,3 then 0,1,3,2.

    The pair is what the exporter emitted before it folded them (K to BNSH,
    then K^T for Q K^T), and what ONNX Runtime's Softmax-anchored attention
    fusion matches; the permutation is the same, so the graph computes the same
    values. Returns how many it rewrote.
    """
    from onnx import helper

    count = 0
    for softmax in onnx_model.get_nodes_by_op_type("Softmax"):
        path = onnx_model.match_parent_path(softmax, ["MatMul", "Mul", "Transpose", "Reshape"], [0, 1, 0, 0])
        if path is None or _perm(path[2]) != [0, 2, 3, 1]:
            continue
        transpose = path[2]
        bnsh = transpose.output[0] + "_bnsh"
        onnx_model.add_node(helper.make_node("Transpose", [transpose.input[0]], [bnsh],
                                             name=transpose.name + "_bnsh", perm=[0, 2, 1, 3]))
        transpose.input[0] = bnsh
        del transpose.attribute[:]
        transpose.attribute.extend([helper.make_attribute("perm", [0, 1, 3, 2])])
        count += 1
    if count:
        onnx_model.topological_sort()
    return count


@contextlib.contextmanager
def _quiet_optimizer() -> Iterator[None]:
    """Hold what ONNX Runtime's optimizer prints (its progress bars and fusion counts, on the process's stdout and
    stderr) and pass it to this module's debug log (``--verbose``), so a build's own output stays readable."""
    import os
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as held:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(held.fileno(), 1)
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        finally:
            for fd in saved:
                os.close(fd)
        held.seek(0)
        text = held.read().decode(errors="replace").strip()
    if text:
        logger.debug("ONNX Runtime's optimizer said:\n%s", text)


def fuse_model(model: Any) -> Any:
    """The ModelProto ``model`` after ONNX Runtime's fusions (see the module docstring); ``model`` is reused."""
    optimizer = _import_optimizer()
    from onnx_model import OnnxModel

    producer = (model.producer_name, model.producer_version)
    model.producer_name = "pytorch"  # what the optimizer expects of a U-Net export (else it warns; nothing else)
    with _patched_optimizer(), _quiet_optimizer():
        unet = optimizer.optimize_model(model, model_type="unet", opt_level=0, use_gpu=False,
                                        optimization_options=fusion_options("unet"))
        unfolded = _unfold_key_transposes(OnnxModel(unet.model))
        merged_sites = fusion_options("mmdit")
        merged_sites.enable_layer_norm = False  # pass 1 did these; this pass adds the attention fusion only
        merged_sites.enable_gelu = False
        unet.model.producer_name = "pytorch"
        fused = optimizer.optimize_model(unet.model, model_type="mmdit", opt_level=0, use_gpu=False,
                                         optimization_options=merged_sites)
    out = fused.model
    _name_fused_attention(out)
    if any(n.domain == CONTRIB_DOMAIN for n in out.graph.node) and \
            not any(o.domain == CONTRIB_DOMAIN for o in out.opset_import):
        from onnx import helper

        out.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    out.producer_name, out.producer_version = producer
    logger.debug("unfolded %d key transposes for the merged-site attention fusion", unfolded)
    return out


def _name_fused_attention(model: Any) -> None:
    """Name each fused attention node after the attention it replaced (``.../attn1/MultiHeadAttention``).

    The fusions name them ``MultiHeadAttention_<n>``; their output keeps the
    replaced subgraph's name, whose module path tells self- from cross-attention
    in profiles (catome_export.bench.profile).
    """
    for node in model.graph.node:
        if node.domain == CONTRIB_DOMAIN and node.op_type in ("MultiHeadAttention", "Attention") \
                and "/" in node.output[0]:
            node.name = f"{node.output[0].rsplit('/', 1)[0]}/{node.op_type}"


def _contrib_counts(model: Any) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node if n.domain == CONTRIB_DOMAIN).items()))


def _load_small_weights(model: Any, base: Path, limit: int = SMALL_WEIGHT_BYTES) -> int:
    """Read the external initializers of at most ``limit`` bytes into the graph; returns how many.

    The fusions read the weights they fold or check (attention projections,
    norm scales and biases); the large ones (convolutions, feed-forward
    matrices) stay where they are, so optimizing a graph whose weights exceed
    protobuf's 2 GB (SD 1.5's middle stage, 3.3 GB in fp32) does not hold them
    in memory, and :func:`gather_weights` copies them into the new data file
    one at a time.
    """
    from onnx import TensorProto

    from catome_export.export.external_data import _read_external, is_external, tensor_nbytes

    count = 0
    for tensor in model.graph.initializer:
        if is_external(tensor) and tensor_nbytes(tensor, base) <= limit:
            tensor.raw_data = _read_external(tensor, base)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            count += 1
    return count


def optimize_graph(src: str | Path, out_dir: str | Path | None = None) -> OptimizedGraph:
    """Write ONNX Runtime's fused form of the stage graph ``src`` beside it (or into ``out_dir``).

    External weights are read in and written to ``<name>.ort.onnx.data`` (one
    file, as the export does) when the source had them; the source is not
    changed. CatomeError when ONNX Runtime's optimizer fails or its graph fails
    the ONNX checker.
    """
    import onnx

    from catome_export.export.external_data import gather_weights, is_external, all_tensors, save_graph
    from catome_export.fsutil import sha256_file
    from catome_export.export.onnx_export import check_stage_file

    src = Path(src)
    folder = Path(out_dir) if out_dir is not None else src.parent
    name = optimized_name(src.name)
    target, data_path = folder / name, folder / f"{name}.data"
    start = time.perf_counter()
    try:
        model = onnx.load(str(src), load_external_data=False)
        external = any(is_external(t) for t in all_tensors(model))
        if external:
            _load_small_weights(model, src.parent)
        model = fuse_model(model)
    except CatomeError:
        raise
    except Exception as exc:  # the optimizer's own errors (pattern-matching assertions, shape inference)
        raise CatomeError(f"ONNX Runtime's optimizer failed on {src.name} ({type(exc).__name__}: {exc}); "
                          "build with --ort-optimize off") from exc
    weights = None
    if external:  # the large weights still lie in the source's data file: copied over one at a time
        weights = gather_weights(model, src.parent, data_path)
    else:
        data_path.unlink(missing_ok=True)
    save_graph(model, target)
    fused = _contrib_counts(model)
    left = sum(1 for n in model.graph.node if n.op_type == "Softmax")
    del model
    check_stage_file(target)
    return OptimizedGraph(
        file=name, external_data=data_path.name if weights is not None else None, sha256=sha256_file(target),
        bytes=target.stat().st_size, external_data_sha256=weights.sha256 if weights is not None else None,
        external_data_bytes=weights.bytes if weights is not None else None, fused=fused, attention_left=left,
        seconds=time.perf_counter() - start)
