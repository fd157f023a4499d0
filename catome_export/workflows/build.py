"""Build and verify: the export layer's atomic build, checked by the runtime against eager CA-ToMe.

:func:`run_build` picks the engines the machine can make (TensorRT where it
runs, else ONNX Runtime), builds the folder with
:func:`catome_export.export.build.build_folder` and has the runtime verify it
step by step before it is installed; :func:`build_engine` is the same from
loose keyword arguments.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from catome_export.backends.select import choose_backend
from catome_export.choices import BuildBackend, EngineBackend, Precision
from catome_export.errors import CatomeError
from catome_export.engine.options import BuildOptions, make_options
from catome_export.export.build import BuildResult, Progress, VerifyVerdict, build_folder
from catome_export.engine.manifest import Manifest
from catome_export.runtime.verify import verify_engine

logger = logging.getLogger(__name__)


def resolve_engine_backend(requested: BuildBackend) -> EngineBackend:
    """The engines a build makes here: TensorRT when asked (or, for ``auto``, where it runs), else ONNX Runtime."""
    if requested == BuildBackend.TRT:
        try:
            choose_backend("trt")  # CatomeError naming TensorRT and how to install it when it cannot run here
        except CatomeError as exc:  # its way out names the run flag; a build's is --engine-kind
            raise CatomeError(str(exc).replace("use --backend ort", "build with --engine-kind ort")) from None
        return EngineBackend.TRT
    if requested == BuildBackend.AUTO:
        try:
            return EngineBackend.TRT if choose_backend("auto").name == "trt" else EngineBackend.ORT
        except CatomeError:
            return EngineBackend.ORT  # no runtime backend at all: the graphs can still be built
    return EngineBackend.ORT


def verify_build(folder: Path, opts: BuildOptions, backend: EngineBackend, notes: list[str],
                 say: Progress) -> VerifyVerdict | None:
    """The runtime's step-by-step parity check against eager CA-ToMe (None where it cannot run here)."""
    run_on = "trt" if backend == EngineBackend.TRT else "ort"
    if run_on == "ort" and opts.precision == Precision.FP16:
        try:
            if choose_backend("ort").name != "ort-cuda":
                notes.append("verification skipped: fp16 graphs do not run on ONNX Runtime CPU (no fp16 "
                             "ScatterElements add kernel); verify on a GPU with catome-export verify")
                say(notes[-1])
                return None
        except CatomeError as exc:
            notes.append(f"verification skipped: {exc}")
            say(notes[-1])
            return None
    say(f"verifying against eager CA-ToMe ({opts.verify_steps} steps, backend {run_on})")
    from catome_export.progress import Progress as StepProgress

    with StepProgress(opts.verify_steps, "verify", emit=say) as bar:
        report = verify_engine(folder, steps=opts.verify_steps, backend=run_on,
                               progress=lambda row: bar.update(note=verify_note(row)))
    differences = report.format_differences(limit=5)  # near-tie flips, and any plan difference that fails
    if differences:
        say(differences)
    summary = report.summary()
    say(summary)
    return VerifyVerdict(ok=report.ok, text=summary)


def verify_note(row: Any) -> str:
    """The progress note of one verified step: its difference and kind."""
    kind = ", feature-cached" if row.cached_engine else ""
    return f"step {row.step}: max |diff| {row.max_abs_diff:.2g}{kind}{'' if row.ok else ', FAILED'}"


def run_build(opts: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """Build ``opts.out_dir``, verified against eager CA-ToMe unless ``opts.verify`` is off (see ``build_folder``)."""
    backend = resolve_engine_backend(opts.backend)
    return build_folder(opts, progress, engine_backend=backend, verifier=verify_build if opts.verify else None)


def build_engine(model: str, *, progress: Progress | None = None, **options: Any) -> Manifest:
    """Build an engine folder and return its manifest (see :func:`run_build` for the full result).

    ``options``: the keyword arguments of :meth:`BuildOptions.create`
    (weights, precision, backend, resolution or min/max_resolution, batch or
    min/max_batch, settings, schedule (``auto:K`` included), name, out_dir,
    verify, verify_steps, exporter, opset, opt_merge_fraction, force); an
    unknown one is a CatomeError listing them.
    """
    return run_build(make_options(model, **options), progress).manifest
