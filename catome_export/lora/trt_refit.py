"""Refit TensorRT plans on disk (``catome-export refit`` of a ``--refittable`` build whose plans keep their weights).

A weight-stripped plan (STRIP_PLAN) needs nothing here: it holds no weights, and
every load refits it from its stage graph and the engine's overrides file. A
refittable plan with weights is loaded, refit through the Refitter and
serialized again under a new name (``stage_<k>.plan-<sha12>``), so the plan the
current manifest lists stays intact until the new manifest replaces it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from catome_export.errors import CatomeError
from catome_export.engine.manifest import EngineFile, Manifest, StageRecord
from catome_export.fsutil import atomic_write_bytes


def refit_plans(engine_dir: Path, manifest: Manifest, plan: Any, written: list[Path],
                say: Callable[[str], None]) -> tuple[StageRecord, ...]:
    """New plan files for the stages whose weights change; the stage records pointing at them."""
    from catome_export.tensorrt_support import import_tensorrt

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    runtime = trt.Runtime(logger)
    new = {p: plan.active[p] for p in plan.changed}
    out = []
    for stage in manifest.stages:
        weights = plan.wmap.initializers(stage.file, new)
        if not weights or stage.engine is None:
            out.append(stage)
            continue
        path = engine_dir / stage.engine.file
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise CatomeError(f"TensorRT could not load {path.name} to refit it (built by another TensorRT version "
                              "or for another GPU?): rebuild the engine on this machine")
        refitter = trt.Refitter(engine, logger)
        kept = []
        for name, array in weights.items():
            data = np.ascontiguousarray(array)
            kept.append(data)
            if not refitter.set_named_weights(name, trt.Weights(data)):
                raise CatomeError(f"TensorRT refused the new weights {name} of {path.name}: rebuild the engine")
        missing = list(refitter.get_missing_weights())
        if missing or not refitter.refit_cuda_engine():
            raise CatomeError(f"TensorRT could not refit {path.name}" + (f" ({len(missing)} weights missing, e.g. "
                              f"{missing[0]})" if missing else "") + ": rebuild the engine")
        data = bytes(memoryview(engine.serialize()))
        digest = hashlib.sha256(data).hexdigest()
        name = f"stage_{stage.index}.plan-{digest[:12]}"
        target = engine_dir / name
        if not target.exists():
            atomic_write_bytes(target, data)
            written.append(target)
        say(f"  refit {path.name} -> {name} ({len(weights)} weights)")
        out.append(replace(stage, engine=EngineFile(file=name, sha256=digest, bytes=len(data))))
        del kept
    return tuple(out)
