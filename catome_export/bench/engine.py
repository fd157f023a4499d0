"""The engine a benchmark times when no ``--engine`` is given: built once under the work folder, then reused.

A folder is reused when its manifest loads (files and hashes checked), was
built from the same weights (hash) and precision, covers every timed
batch and resolution, and (ONNX Runtime folders, ``--ort-optimize on``) holds
ONNX Runtime's fused graphs; otherwise it is rebuilt with ``build_engine``. The
benchmark's build skips the step-by-step parity check (``catome-export
verify DIR`` runs it), since timing does not depend on it and on SD 1.5 it
costs many eager and engine steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

from catome_export.bench.config import BenchConfig
from catome_export.errors import CatomeError
from catome_export.models.registry import MODELS

logger = logging.getLogger(__name__)


def work_name(config: BenchConfig) -> str:
    """Folder name under the work folder for a model, its weights and precision."""
    from catome_export.models.checkpoint import is_checkpoint_path

    model = config.model if config.model in MODELS else (Path(config.model).resolve().name or "model")
    weights = Path(config.weights).stem if is_checkpoint_path(config.weights) else config.weights
    return f"{model}-{weights}-{config.precision}"


def _build_backend(config: BenchConfig) -> str:
    if config.engine_backend == "trt":
        return "trt"
    if config.engine_backend == "auto":
        return "auto"
    return "ort"


def reusable(folder: Path, config: BenchConfig, resolutions: Sequence[int], digest: str) -> str | None:
    """None when the engine in ``folder`` fits this benchmark, else why it does not."""
    from catome_export.engine.manifest import Manifest

    if not (folder / "manifest.json").is_file():
        return "no engine built yet"
    try:
        manifest = Manifest.load(folder)
        if manifest.model.weights_hash != digest:
            return "built from other weights"
        if manifest.precision != config.precision:
            return f"built in {manifest.precision}"
        if config.engine_backend == "trt" and manifest.engine_backend != "trt":
            return "holds no TensorRT plans"
        if config.ort_optimize and manifest.engine_backend == "ort" and \
                not all(s.ort_optimized is not None for s in manifest.stages):
            return "holds no ONNX Runtime fused graphs"
        for res in resolutions:
            manifest.check_shapes(config.batch, res // 8, res // 8)
    except CatomeError as exc:
        return str(exc)
    return None


def ensure_engine(config: BenchConfig, resolutions: Sequence[int], digest: str,
                  progress: Callable[[str], None]) -> Path:
    """An engine folder for ``config.model`` covering ``resolutions`` and ``config.batch`` (built when needed)."""
    from catome_export.workflows.build import build_engine

    folder = config.workdir / work_name(config) / "engine"
    why = reusable(folder, config, resolutions, digest)
    if why is None:
        progress(f"reusing the engine in {folder}")
        return folder
    progress(f"building an engine in {folder} ({why.split(':')[0]}) ...")
    folder.parent.mkdir(parents=True, exist_ok=True)
    build_engine(config.model, weights=config.weights, precision=config.precision, backend=_build_backend(config),
                 min_resolution=min(resolutions), max_resolution=max(resolutions), min_batch=1,
                 max_batch=max(1, config.batch), out_dir=folder, name=work_name(config), verify=False,
                 progress=progress)
    return folder
