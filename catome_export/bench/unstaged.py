"""The un-cut baseline: the whole U-Net as one ONNX graph, run like one engine stage.

Exported with the staged export's settings (TorchScript exporter, the same
opset, constant folding, dynamic batch / latent size / text length) and run
through the ONNX Runtime backend's own stage runner (same session options,
same IO binding), so the only difference from the staged engine at merge
fraction 0 is the cutting itself. SDXL-style U-Nets take ``text_embeds`` and
``time_ids`` as two more graph inputs, as the engine's stage 0 does. The graph is traced at a latent size
divisible by 8 and serves latent sizes divisible by 8 (images in multiples of
64 pixels): diffusers' U-Net takes another branch for other sizes.

The graph is cached under the benchmark's work folder, keyed by the weights
hash and the precision; a ``meta.json`` written last marks a complete export.
:func:`fused_unstaged` writes ``unet.ort.onnx`` beside it, the same ONNX
Runtime fusions the engine's stages get at build time
(catome_export.export.ort_optimize), marked complete by ``ort.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from catome_export.errors import CatomeError
from catome_export.engine.io_names import ADDED_INPUTS, MODEL_OUTPUT, SAMPLE, TEXT, TIMESTEP
from catome_export.engine.manifest import StageRecord
from catome_export.engine.specs import StageSpec, TensorSpec

logger = logging.getLogger(__name__)

GRAPH_FILE = "unet.onnx"
META_FILE = "meta.json"
FUSED_META_FILE = "ort.json"
TRACE_SHAPE = (2, (16, 16), 7)
"""(batch, latent hw, text length) of the trace: small; every latent size divisible by 8 works afterwards."""
CONSOLIDATE_BYTES = 1_800_000_000
"""Graphs with more weight bytes than this keep them in one ``unet.onnx.data`` file (protobuf's 2 GB limit)."""


class _WholeUNet(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> noise_pred, the staged graphs' model IO.

    SDXL-style U-Nets take their added conditioning as two more inputs, as the staged engine's stage 0 does."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                *added: torch.Tensor) -> torch.Tensor:
        added_cond = dict(zip(ADDED_INPUTS, added)) if added else None
        return self.unet(sample, timestep, text, added_cond_kwargs=added_cond, return_dict=False)[0]


def _added_dims(unet_config: Any) -> dict[str, int]:
    """Added-conditioning input -> width (``text_embeds``, ``time_ids``) of an SDXL-style config, else empty."""
    from catome_export.models.registry import added_conditioning_dims

    dims = added_conditioning_dims(dict(unet_config))
    return {} if dims is None else dict(zip(ADDED_INPUTS, dims))


def unstaged_spec(dtype: str, in_channels: int, out_channels: int, text_dim: int,
                  added: Mapping[str, int] | None = None) -> StageSpec:
    """The IO of the whole U-Net as a one-stage spec (model inputs in, ``noise_pred`` out).

    ``added``: width of each added-conditioning input (``text_embeds``, ``time_ids``) of an SDXL-style U-Net."""
    return StageSpec(
        index=0, site=None, next_site=None,
        inputs=(TensorSpec(SAMPLE, dtype, ("B", in_channels, "H", "W")),
                TensorSpec(TIMESTEP, "float32", ("B",)),
                TensorSpec(TEXT, dtype, ("B", "L", text_dim)),
                *(TensorSpec(name, dtype, ("B", int(width))) for name, width in (added or {}).items())),
        outputs=(TensorSpec(MODEL_OUTPUT, dtype, ("B", out_channels, "H", "W")),),
    )


def _dtype_name(unet: torch.nn.Module) -> str:
    names = {torch.float32: "float32", torch.float16: "float16"}
    dtype = next(unet.parameters()).dtype
    if dtype not in names:
        raise CatomeError(f"the unstaged graph is exported in float32 or float16, not {dtype}")
    return names[dtype]


def _spec_of(unet: torch.nn.Module) -> StageSpec:
    cfg: Any = unet.config
    return unstaged_spec(_dtype_name(unet), int(cfg.in_channels), int(cfg.out_channels),
                         int(cfg.cross_attention_dim), _added_dims(cfg))


def _trace_args(unet: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    from catome_export.models.conditioning import random_added_conditioning

    batch, (h, w), text_len = TRACE_SHAPE
    gen = torch.Generator().manual_seed(0)
    cfg: Any = unet.config
    weight = next(unet.parameters())
    device, dtype = weight.device, weight.dtype
    added = random_added_conditioning(unet, batch, (h * 8, w * 8), device=device, dtype=dtype)
    return (torch.randn(batch, cfg.in_channels, h, w, generator=gen).to(device, dtype),
            torch.linspace(999.0, 1.0, batch, dtype=torch.float32).to(device),
            torch.randn(batch, text_len, cfg.cross_attention_dim, generator=gen).to(device, dtype),
            *(added[name] for name in ADDED_INPUTS if added is not None))


def _meta(weights_hash: str, dtype: str) -> dict[str, Any]:
    return {"weights_hash": weights_hash, "dtype": dtype, "torch": torch.__version__, "file": GRAPH_FILE}


def cached_graph(folder: Path, weights_hash: str, dtype: str) -> Path | None:
    """The graph in ``folder`` when a complete export of these weights and dtype is there."""
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta != _meta(weights_hash, dtype) or not (folder / GRAPH_FILE).is_file():
        return None
    return folder / GRAPH_FILE


def export_unstaged(unet: torch.nn.Module, folder: str | Path, weights_hash: str | None = None) -> Path:
    """Export ``unet`` whole to ``folder/unet.onnx`` (reused when a matching export is there)."""
    from catome_export.fsutil import atomic_write_json
    from catome_export.defaults import OPSET
    from catome_export.export.onnx_export import check_stage_file
    from catome_export.models import weights_hash as hash_weights

    folder = Path(folder)
    dtype = _dtype_name(unet)
    digest = weights_hash or hash_weights(unet)
    found = cached_graph(folder, digest, dtype)
    if found is not None:
        logger.info("reusing the unstaged graph %s", found)
        return found
    spec = _spec_of(unet)
    scratch = folder.parent / f".{folder.name}.export-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    start = time.perf_counter()
    logger.info("exporting the whole U-Net to one ONNX graph (the unstaged baseline)...")
    try:
        module = _WholeUNet(unet).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, _trace_args(unet), str(scratch / GRAPH_FILE), dynamo=False,
                              opset_version=OPSET, do_constant_folding=True,
                              input_names=list(spec.input_names), output_names=list(spec.output_names),
                              dynamic_axes={t.name: t.dynamic_axes() for t in (*spec.inputs, *spec.outputs)})
        if sum(p.numel() * p.element_size() for p in unet.parameters()) > CONSOLIDATE_BYTES:
            _consolidate(scratch / GRAPH_FILE)
        check_stage_file(scratch / GRAPH_FILE)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(scratch, folder)
        atomic_write_json(folder / META_FILE, _meta(digest, dtype))
    except CatomeError:
        raise
    except Exception as exc:
        raise CatomeError(f"exporting the whole U-Net to ONNX failed ({type(exc).__name__}: {exc}); "
                          "leave engine-unstaged out of --backends") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("unstaged graph exported in %.0f s", time.perf_counter() - start)
    return folder / GRAPH_FILE


def _consolidate(graph: Path) -> None:
    """Gather the graph's weights (the exporter's one file per tensor above 2 GB) into ``unet.onnx.data``.

    One tensor is in memory at a time (SDXL's are 10 GB in fp32, beside the torch U-Net); the files the
    exporter wrote are removed afterwards."""
    import onnx

    from catome_export.export.external_data import gather_weights, save_graph

    folder = graph.parent
    data = folder / f"{GRAPH_FILE}.data"
    model = onnx.load(str(graph), load_external_data=False)
    gather_weights(model, folder, data)
    save_graph(model, graph)
    del model
    for path in folder.iterdir():
        if path not in (graph, data):
            path.unlink()


def _fused_meta(folder: Path) -> dict[str, Any]:
    from importlib import metadata

    try:
        source = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        source = None
    try:
        version = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        version = None
    return {"source": source, "onnxruntime": version}


def fused_unstaged(graph: Path) -> Path:
    """``unet.ort.onnx`` beside the unstaged ``graph``: ONNX Runtime's fusions, as the engine's stages get them.

    Reused when ``ort.json`` says it was made from this export with this onnxruntime.
    """
    from catome_export.fsutil import atomic_write_json
    from catome_export.export.ort_optimize import optimize_graph, optimized_name

    graph = Path(graph)
    folder = graph.parent
    meta = _fused_meta(folder)
    fused = folder / optimized_name(graph.name)
    try:
        if json.loads((folder / FUSED_META_FILE).read_text()) == meta and fused.is_file():
            logger.info("reusing the fused unstaged graph %s", fused)
            return fused
    except (OSError, json.JSONDecodeError):
        pass
    (folder / FUSED_META_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    result = optimize_graph(graph)
    atomic_write_json(folder / FUSED_META_FILE, meta)
    logger.info("unstaged graph fused in %.0f s (%s)", time.perf_counter() - start,
                ", ".join(f"{n} {op}" for op, n in result.fused.items()))
    return folder / result.file


def load_unstaged(graph: Path, unet_config: Any, dtype: str, device: str,
                  ort_options: Mapping[str, Any]) -> tuple[Any, Any]:
    """(stage runner, backend) of the graph on the ONNX Runtime backend with the engine's session options."""
    from catome_export.backends.ort import OrtBackend, OrtOptions

    backend = OrtBackend(device, OrtOptions.from_mapping(ort_options))
    cfg = dict(unet_config)
    spec = unstaged_spec(dtype, int(cfg["in_channels"]), int(cfg["out_channels"]), int(cfg["cross_attention_dim"]),
                         _added_dims(cfg))
    try:
        runner = backend.load_stage(graph.parent, StageRecord(spec, graph.name))
    except BaseException:
        backend.close()
        raise
    return runner, backend
