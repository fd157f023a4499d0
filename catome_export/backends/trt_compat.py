"""Can this machine run the TensorRT engines of an engine folder? Checked before any plan is loaded.

TensorRT plans are tied to what built them:

- the TensorRT version: a plan only deserialises under the exact TensorRT
  build that made it (``deserialize_cuda_engine`` returns None under any
  other, patch releases included), so the version string must match exactly
  (plans built version-compatible, which this project does not do, are the
  exception the manifest records);
- the GPU: kernels are chosen for one compute capability (a plan fails on
  another unless built hardware-compatible) and tuned for one device model
  (another model with the same capability runs it, possibly slowly or not
  at all, so it is refused here too);
- the shapes: every input must lie inside the optimisation profile.

Each mismatch raises :class:`CatomeError` with the exact ``catome-export
build`` command that rebuilds the folder on this machine. The machine's side
(:class:`TrtRuntimeInfo`) is injectable, so every rule is tested without
TensorRT or a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catome_export.backends.select import TRT_PIP, trt_version_problem
from catome_export.errors import CatomeError
from catome_export.engine.io_names import SAMPLE
from catome_export.engine.record import RebuildNeeded

if TYPE_CHECKING:  # the manifest module imports torch; this one stays importable without it
    from catome_export.engine.manifest import Manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrtRuntimeInfo:
    """What this machine offers the TensorRT backend."""

    tensorrt_version: str | None
    """``tensorrt.__version__``, or None when TensorRT is not importable."""
    gpu_name: str | None
    """``torch.cuda.get_device_name``, or None without a CUDA device."""
    compute_capability: str | None
    """``"major.minor"``, e.g. ``"9.0"`` for H100, or None without a CUDA device."""

    @classmethod
    def detect(cls, device: Any = None) -> "TrtRuntimeInfo":
        """Probe this machine (imports tensorrt and torch.cuda; never raises)."""
        version = None
        try:
            import tensorrt

            version = str(tensorrt.__version__)
        except Exception:  # missing or broken install: reported as None
            version = None
        name = cc = None
        try:
            import torch

            if torch.cuda.is_available():
                index = torch.device(device).index if device is not None else None
                index = torch.cuda.current_device() if index is None else index
                name = torch.cuda.get_device_name(index)
                cc = ".".join(str(v) for v in torch.cuda.get_device_capability(index))
        except Exception:
            name = cc = None
        return cls(version, name, cc)


def _fmt_range(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def rebuild_error(manifest: Manifest, problem: str, engine_dir: str | Path | None = None, *,
                  lead: str = ". Rebuild them here:", after: str = "", **overrides: tuple[int, int]) -> RebuildNeeded:
    """The error that asks for the folder's TensorRT plans to be built again here (``--engine-kind trt``), into
    ``engine_dir`` (default: where the manifest was loaded from); ``overrides`` replace build options
    (``resolution=(lo, hi)``, ``batch=(lo, hi)``)."""
    return manifest.rebuild_needed(problem, lead, after, None if engine_dir is None else Path(engine_dir),
                                   {"backend": "trt", **overrides})


def _widened(manifest: Manifest, batch: int, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Build-option overrides whose ranges cover the built ones and the requested shape."""
    s = manifest.shapes
    b, lh, lw = s.batch, s.latent_height, s.latent_width
    return {"batch": (min(b[0], batch), max(b[1], batch)),
            "resolution": (8 * min(lh[0], lw[0], *latent_hw), 8 * max(lh[1], lw[1], *latent_hw))}


def check_shapes_in_profiles(
    manifest: Manifest,
    batch: int,
    latent_hw: tuple[int, int],
    *,
    engine_dir: str | Path | None = None,
) -> None:
    """Raise CatomeError when (batch, latent height, latent width) lies outside the built ranges.

    Checks the manifest's ``shapes`` ranges and, where the ``trt`` section
    records the profiles, the ``sample`` input of the first stage.
    """
    shapes = manifest.shapes
    lh, lw = latent_hw
    bad = []
    for key, r, value in (("batch", shapes.batch, batch), ("latent_height", shapes.latent_height, lh),
                          ("latent_width", shapes.latent_width, lw)):
        if not r[0] <= value <= r[1]:
            bad.append(f"{key} {value} outside the built range {_fmt_range(r)}")
    profiles = manifest.trt.profiles if manifest.trt is not None else ()
    if not bad and profiles:
        sample = (profiles[0] or {}).get(SAMPLE)
        if sample:
            for axis, label, value in ((0, "batch", batch), (2, "latent_height", lh), (3, "latent_width", lw)):
                lo, hi = int(sample["min"][axis]), int(sample["max"][axis])
                if not lo <= value <= hi:
                    bad.append(f"{label} {value} outside the TensorRT profile range {_fmt_range((lo, hi))}")
    if bad:
        raise rebuild_error(
            manifest, "the requested shape is not covered by the engines: " + "; ".join(bad)
            + f" (image {lh * 8}x{lw * 8} px, batch {batch}). Use a shape inside the range", engine_dir,
            lead=", or rebuild with wider ranges:", **_widened(manifest, batch, latent_hw))


def check_trt_compat(
    manifest: Manifest,
    runtime_info: TrtRuntimeInfo | None = None,
    *,
    batch: int | None = None,
    latent_hw: tuple[int, int] | None = None,
    engine_dir: str | Path | None = None,
) -> None:
    """Raise CatomeError (RebuildNeeded where a rebuild here helps) unless this machine can run the folder's
    TensorRT plans.

    ``runtime_info`` defaults to :meth:`TrtRuntimeInfo.detect`. With
    ``batch`` and ``latent_hw`` the requested shape is checked against the
    profiles too.
    """
    info = runtime_info if runtime_info is not None else TrtRuntimeInfo.detect()
    backend = manifest.engine_backend
    section = manifest.trt
    if backend != "trt" or section is None:
        raise rebuild_error(manifest, f"this engine folder holds no TensorRT engines (engine_backend {backend!r})",
                            engine_dir, lead=": build them with:", after="  (or load it with --backend ort)")
    if info.tensorrt_version is None:
        raise CatomeError(
            "TensorRT is not installed here, and this folder's engines need it: install it on a machine with an "
            f"NVIDIA GPU (pip install 'catome-export[trt]', or {TRT_PIP}), or load the folder with --backend ort"
        )
    if info.gpu_name is None:
        raise CatomeError("TensorRT engines need a CUDA device and a CUDA build of torch; none is usable here. "
                          "Load the folder with --backend ort on this machine")
    built = section.version or ""
    here = str(info.tensorrt_version)
    problem = trt_version_problem(here)
    if problem is not None:
        raise rebuild_error(manifest, f"{problem}: {TRT_PIP}", engine_dir, lead=", then rebuild the engines:")
    if not section.version_compatible and built != here:
        if built:
            raise rebuild_error(
                manifest, f"the engines were built with TensorRT {built} and this machine has TensorRT {here}: "
                "TensorRT plans only load under the exact TensorRT version that built them", engine_dir,
                after=f"  (or install TensorRT {built}: pip install 'tensorrt=={built}' --extra-index-url "
                "https://pypi.nvidia.com)")
        raise rebuild_error(manifest, "the manifest does not record the TensorRT version of the engines; this machine "
                            f"has TensorRT {here}", engine_dir)
    built_cc = section.compute_capability or ""
    hw_compat = section.hardware_compatibility_level.lower() not in ("none", "")
    if built_cc != str(info.compute_capability) and not hw_compat:
        raise rebuild_error(
            manifest, f"the engines were built for compute capability {built_cc or 'unknown'} "
            f"({section.gpu or 'unknown GPU'}) and this GPU, {info.gpu_name}, has "
            f"{info.compute_capability}: TensorRT plans do not run on another GPU architecture", engine_dir)
    built_gpu = section.gpu or ""
    if built_gpu != str(info.gpu_name) and not hw_compat:
        raise rebuild_error(
            manifest, f"the engines were built on {built_gpu or 'an unknown GPU'} and this GPU is {info.gpu_name}: "
            "TensorRT tunes its kernels for one device model, so they are refused here", engine_dir)
    if batch is not None and latent_hw is not None:
        check_shapes_in_profiles(manifest, batch, latent_hw, engine_dir=engine_dir)
