"""ONNX export of the stages: one dynamic-shape graph per stage, checked, optionally with external data.

The default exporter is the TorchScript one (``torch.onnx.export(...,
dynamo=False)``): it traces each stage once at a small example shape and
records every shape computation as graph ops, so the graphs serve any batch,
latent size, text length and merged count, r = 0 (one exact self-merge
row, so no index tensor is ever empty) included. The dynamo exporter (``exporter="dynamo"``) gives the same results
and smaller graphs but takes about 15 times longer on the tiny model, which
would put the quick-start build over its time budget (see docs/export.md).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from catome_export._version import __version__
from catome_export.choices import Exporter
from catome_export.defaults import OPSET
from catome_export.errors import CatomeError
from catome_export.export._threads import torch_threads
from catome_export.engine.controlnet import ControlNetInputs
from catome_export.export.controlnet import random_residuals, residual_feeds
from catome_export.export.external_data import (
    WeightsFile, all_tensors, gather_weights, is_external, needs_external_data, save_graph,
)
from catome_export.fsutil import sha256_file
from catome_export.engine.manifest import StageRecord
from catome_export.export.stages import StageModule, run_stages
from catome_export.engine.specs import StageSpec
from catome_export.merging.matching import match_tokens, partition
from catome_export.models.conditioning import conditioning_for_config
from catome_export.models.sites import MergeSite

logger = logging.getLogger(__name__)

EXPORTERS = Exporter.values()
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Stages whose weights exceed this many bytes keep them in ``stage_<k>.onnx.data`` (margin under 2 GB)."""
EXAMPLE_SHAPE = (2, (16, 16), 7)
"""(batch, latent hw, text length) the stages are traced at: small, and any shape works afterwards."""
EXAMPLE_MERGE_FRACTION = 0.5
"""Share of src tokens merged in the example plans (0 < r < #src, so K and R differ from N)."""


@dataclass(frozen=True)
class ExportedStage:
    """One exported stage file (the manifest's ``stages`` entry without the spec)."""

    index: int
    file: str
    """Graph file name, ``stage_<k>.onnx``."""
    external_data: str | None
    """Weights file name (``stage_<k>.onnx.data``) or None when the weights are inside the graph file."""
    sha256: str
    bytes: int
    external_data_sha256: str | None
    external_data_bytes: int | None
    seconds: float
    """Export time."""

    def record(self, spec: StageSpec) -> StageRecord:
        """The manifest's record of this file and its spec."""
        return StageRecord(spec=spec, file=self.file, sha256=self.sha256, bytes=self.bytes,
                           external_data=self.external_data, external_data_sha256=self.external_data_sha256,
                           external_data_bytes=self.external_data_bytes)

    @property
    def total_bytes(self) -> int:
        return self.bytes + (self.external_data_bytes or 0)


def stage_file(index: int) -> str:
    return f"stage_{index}.onnx"


def example_inputs(stages: Sequence[tuple[StageSpec, StageModule]], sites: Sequence[MergeSite],
                   config: dict, dtype: torch.dtype, shape: tuple[int, tuple[int, int], int] = EXAMPLE_SHAPE,
                   merge_fraction: float = EXAMPLE_MERGE_FRACTION, stride: tuple[int, int] = (2, 2),
                   seed: int = 0) -> dict[int, tuple[torch.Tensor, ...]]:
    """Positional inputs of every stage for one walk of the chain at ``shape`` with real (forced) merges."""
    batch, hw, text_len = shape
    gen = torch.Generator().manual_seed(seed)
    feeds = {
        "sample": torch.randn(batch, int(config["in_channels"]), *hw, generator=gen).to(dtype),
        "timestep": torch.linspace(999.0, 1.0, batch, dtype=torch.float32),
        "encoder_hidden_states": torch.randn(batch, text_len, int(config["cross_attention_dim"]),
                                             generator=gen).to(dtype),
    }
    added = conditioning_for_config(config, batch, (hw[0] * 8, hw[1] * 8), seed=seed, dtype=dtype)
    if added is not None:  # SDXL-style U-Net: text_embeds and time_ids feed stage 0
        feeds.update(added)
    controlnet = ControlNetInputs.of([spec for spec, _ in stages])
    if controlnet is not None:  # --controlnet: seeded residuals, so the traced additions see non-zero values
        feeds.update(residual_feeds(*random_residuals(controlnet, batch, hw, seed=seed + 1, dtype=dtype)))
    by_index = {s.index: s for s in sites}

    def plans(k: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grid = by_index[k].grid(hw)
        num_src = partition(grid, stride, None, x.device)[0].numel()
        r = max(1, min(num_src - 1, int(round(merge_fraction * num_src)))) if num_src > 1 else 0
        return match_tokens(x.float(), grid, num_merged=r, stride=stride).tensors()

    captured: dict[int, tuple[torch.Tensor, ...]] = {}

    def recording(spec: StageSpec, module: StageModule):
        def call(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            captured[spec.index] = args
            return module(*args)
        return call

    with torch.no_grad(), torch_threads(1):
        run_stages([(spec, recording(spec, m)) for spec, m in stages], feeds, plans)
    return captured


def _torch_export(spec: StageSpec, module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                  opset: int, exporter: str) -> None:
    names_in, names_out = list(spec.input_names), list(spec.output_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names_in,
                              output_names=names_out, do_constant_folding=True,
                              dynamic_axes={t.name: t.dynamic_axes() for t in (*spec.inputs, *spec.outputs)})
            return
        from torch.export import Dim

        dims: dict[str, object] = {}

        def dim(name: str) -> object:
            if name not in dims:
                dims[name] = Dim(name, min=1)  # R >= 1 too: r = 0 is one self-merge row
            return dims[name]

        shapes = tuple({i: dim(d) for i, d in t.dynamic_axes().items()} or None for t in spec.inputs)
        program = torch.onnx.export(module, args, dynamo=True, opset_version=max(opset, 18), input_names=names_in,
                                    output_names=names_out, dynamic_shapes=(shapes,), verbose=False)
        program.save(str(path))


def export_stage(spec: StageSpec, module: torch.nn.Module, args: tuple[torch.Tensor, ...], out_dir: str | Path, *,
                 opset: int = OPSET, exporter: str = "torchscript",
                 external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> ExportedStage:
    """Export one stage to ``out_dir/stage_<k>.onnx`` (+ ``.data`` when large) and check it."""
    import onnx

    if exporter not in EXPORTERS:
        raise CatomeError(f"unknown exporter {exporter!r}: use one of {', '.join(EXPORTERS)}")
    if opset < 17:
        raise CatomeError(f"opset {opset} is too old: the stages need opset >= 17")
    out_dir = Path(out_dir)
    name = stage_file(spec.index)
    data_name = f"{name}.data"
    scratch = out_dir / f".export-{spec.index}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    start = time.perf_counter()
    try:
        with torch_threads(1):
            _torch_export(spec, module.eval(), args, scratch / name, opset, exporter)
        gc.collect()
        model = onnx.load(str(scratch / name), load_external_data=False)
        _annotate(model, spec)
        target = out_dir / name
        data_path = out_dir / data_name
        written_external = sum(is_external(t) for t in all_tensors(model))
        external = needs_external_data(model, scratch, external_data_threshold)
        logger.debug("stage %d: %d tensors written to external files by the exporter; weights %s", spec.index,
                     written_external, "external" if external else "inline")
        weights: WeightsFile | None = None
        if external:
            # data first: the graph refers to it; the exporter's files go as they are copied (disk: 1x the weights)
            weights = gather_weights(model, scratch, data_path, consume=True)
            save_graph(model, target)
        else:
            save_graph(model, target)
            data_path.unlink(missing_ok=True)
        del model
    except CatomeError:
        raise
    except Exception as exc:
        raise CatomeError(f"exporting stage {spec.index} to ONNX failed ({type(exc).__name__}: {exc})".strip()
                          + ". Check the model layout, or try exporter='dynamo'") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    check_stage_file(target)
    seconds = time.perf_counter() - start
    return ExportedStage(
        index=spec.index, file=name, external_data=data_name if weights is not None else None,
        sha256=sha256_file(target), bytes=target.stat().st_size,
        external_data_sha256=weights.sha256 if weights is not None else None,
        external_data_bytes=weights.bytes if weights is not None else None, seconds=seconds,
    )


def _annotate(model, spec: StageSpec) -> None:
    """Record the producer and the stage spec in the graph's metadata."""
    import onnx

    model.producer_name = "catome-export"
    model.producer_version = __version__
    onnx.helper.set_model_props(model, {"catome_export.stage": json.dumps(spec.to_dict(), separators=(",", ":"))})


def check_stage_file(path: str | Path) -> None:
    """``onnx.checker.check_model`` on the file path (works with external data), as a CatomeError."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise CatomeError(f"{path} fails the ONNX checker ({type(exc).__name__}: {exc}): "
                          "the export is broken, rebuild it") from None


def ort_session(path: str | Path):
    """An ONNX Runtime CPU session for one stage file."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CatomeError("ONNX Runtime is not installed: pip install 'catome-export[ort]'") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_max_diff(session, spec: StageSpec, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> float:
    """Largest absolute difference between the ONNX Runtime outputs and the torch stage's outputs."""
    feeds = {name: a.detach().cpu().numpy() for name, a in zip(spec.input_names, args)}
    outs = session.run(list(spec.output_names), feeds)
    with torch.no_grad():
        ref = module(*args)
    worst = 0.0
    for got, want in zip(outs, ref):
        if tuple(got.shape) != tuple(want.shape):
            raise CatomeError(f"stage {spec.index}: ONNX Runtime output shape {tuple(got.shape)} differs from "
                              f"torch's {tuple(want.shape)}")
        worst = max(worst, float((torch.from_numpy(got).float() - want.float()).abs().max()) if got.size else 0.0)
    return worst
