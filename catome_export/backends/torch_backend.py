"""Eager torch backend: runs the stage modules of ``cut_unet`` directly.

It is the reference for the graph backends (same stage chain, same IO names,
no export in between) and what the runtime runs on when neither TensorRT nor
ONNX Runtime is wanted. The U-Net is rebuilt from the manifest's model id and
weights; its weights hash must match the one the engine was built from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch

from catome_export.choices import Precision
from catome_export.devices import resolve_device
from catome_export.backends.base import check_outputs, ordered_feeds, torch_dtype
from catome_export.dtypes import precision_dtype
from catome_export.errors import CatomeError
from catome_export.engine.manifest import Manifest, StageRecord
from catome_export.engine.specs import StageSpec
from catome_export.export.stages import cut_unet
from catome_export.models import load_unet, weights_hash

logger = logging.getLogger(__name__)


class TorchStageRunner:
    """One stage module, called under ``torch.no_grad``."""

    def __init__(self, spec: "StageSpec", module: torch.nn.Module, device: torch.device) -> None:
        self.spec = spec
        self.module = module
        self.device = device
        self._out_names = [t.name for t in spec.outputs]
        self._in_dtypes = {t.name: torch_dtype(t) for t in spec.inputs}

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = ordered_feeds(self.spec, feeds)
        for t, arg in zip(self.spec.inputs, args):
            if arg.dtype != self._in_dtypes[t.name] or arg.device != self.device:
                raise CatomeError(f"stage {self.spec.index} input {t.name!r} is {arg.dtype} on {arg.device}, "
                                  f"expected {self._in_dtypes[t.name]} on {self.device}")
        with torch.no_grad():
            result = self.module(*args)
        outs = result if isinstance(result, (tuple, list)) else (result,)
        if len(outs) != len(self._out_names):
            raise CatomeError(f"stage {self.spec.index} returned {len(outs)} tensors for {len(self._out_names)} "
                              "outputs: the stage modules do not match the manifest; rebuild the engine")
        outputs = dict(zip(self._out_names, outs))
        check_outputs(self.spec, outputs)
        return outputs

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]


def _io_names(spec: "StageSpec") -> tuple[list[str], list[str]]:
    return [t.name for t in spec.inputs], [t.name for t in spec.outputs]


def manifest_dtype(manifest: Manifest) -> torch.dtype:
    """The model dtype of an engine (fp32 or fp16)."""
    precision = manifest.precision
    return precision_dtype(precision, Precision.values(),
                           f"unknown engine precision {precision!r}: rebuild the engine with --precision fp32 or fp16")


def load_reference_unet(manifest: Manifest, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The U-Net the engine was built from (model id + weights), checked against the manifest's weights hash, with
    the LoRA the engine computes (its manifest's ``lora.active``) fused as the build fuses it."""
    from catome_export.models.checkpoint import is_checkpoint_path

    model = manifest.model
    if is_checkpoint_path(model.weights) and not Path(str(model.weights)).is_file():
        raise CatomeError(f"the engine was built from the checkpoint {model.weights}, which is not there any more: "
                          "put the file back (the eager reference is loaded from it), or rebuild the engine")
    unet = load_unet(model.id, weights=model.weights or "pretrained", dtype=manifest_dtype(manifest))
    expected = model.weights_hash
    if expected:
        got = weights_hash(unet)
        if got != expected:
            raise CatomeError(
                f"the weights of model {model.id!r} ({model.weights}) do not match the ones the engine was "
                f"built from (weights hash {got[:12]}... vs {str(expected)[:12]}... in the manifest): load the same "
                "weights, or rebuild the engine with catome-export build"
            )
    if manifest.lora is not None and manifest.lora.active:  # the LoRA the engine computes, fused the same way
        from catome_export.lora.refit import fuse_active

        fuse_active(unet, manifest, manifest.engine_dir or Path("."))
    return unet.to(device)


class TorchBackend:
    """Stage modules from ``cut_unet`` on one torch device."""

    name = "torch"

    def __init__(self, manifest: Manifest | None = None, device: torch.device | str | None = None,
                 stages: Sequence[tuple["StageSpec", torch.nn.Module]] | None = None) -> None:
        self.device = resolve_device(None) if device is None else torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.manifest = manifest
        self._modules: dict[int, tuple["StageSpec", torch.nn.Module]] | None = None
        if stages is not None:
            self._modules = {spec.index: (spec, module.to(self.device).eval()) for spec, module in stages}
        elif manifest is None:
            raise CatomeError("the torch backend needs a manifest (or ready stage modules)")
        self._runners: list[TorchStageRunner] = []

    def _stage_modules(self) -> dict[int, tuple["StageSpec", torch.nn.Module]]:
        if self._modules is None:

            manifest = self.manifest
            if manifest is None:  # the constructor refuses this; kept for type checkers
                raise CatomeError("the torch backend needs a manifest (or ready stage modules)")
            unet = load_reference_unet(manifest, self.device)
            settings = manifest.merge
            export = manifest.extra.get("export")
            limit = export.get("max_stage_bytes") if isinstance(export, dict) else None  # absent: not cut by size
            cut = cut_unet(unet, list(manifest.sites), dtype=manifest_dtype(manifest),
                           merge_crossattn=settings.merge_crossattn, merge_mlp=settings.merge_mlp,
                           max_stage_bytes=int(limit) if isinstance(limit, int) and limit > 0 else None,
                           cache_branches=() if manifest.feature_cache is None else manifest.feature_cache.branch_ids,
                           controlnet=manifest.controlnet is not None)
            self._modules = {spec.index: (spec, module.to(self.device).eval()) for spec, module in cut}
            logger.debug("torch backend: %d stage modules of %s", len(cut), manifest.model.id)
        return self._modules

    def load_stage(self, engine_dir: Path | None, stage: StageRecord) -> TorchStageRunner:
        spec = stage.spec
        modules = self._stage_modules()
        if spec.index not in modules:
            raise CatomeError(f"stage {spec.index} of the manifest has no stage module: rebuild the engine")
        cut_spec, module = modules[spec.index]
        if _io_names(cut_spec) != _io_names(spec):
            raise CatomeError(f"stage {spec.index}: the stage module's inputs/outputs differ from the manifest's "
                              "(built by another version?): rebuild the engine with catome-export build")
        runner = TorchStageRunner(spec, module, self.device)
        self._runners.append(runner)
        return runner

    def close(self) -> None:
        for runner in self._runners:
            runner.close()
        self._runners.clear()
        self._modules = None
