"""Execution backends for the exported stages: TensorRT, ONNX Runtime, eager torch.

``create_backend(choose_backend(name), engine)`` gives a :class:`Backend`
(see :mod:`catome_export.backends.base`); backend modules, and the packages
they need (``onnxruntime``, ``tensorrt``), are imported only when created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from catome_export.backends.select import BACKEND_NAMES, BackendChoice, choose_backend
from catome_export.errors import CatomeError

if TYPE_CHECKING:
    import torch

    from catome_export.backends.base import Backend, StageRunner
    from catome_export.engine.engine import EngineSource

__all__ = ["Backend", "StageRunner", "BackendChoice", "BACKEND_NAMES", "choose_backend", "create_backend"]


def __getattr__(name: str) -> Any:  # lazy: the protocols import torch, selection and --help need not
    if name in ("Backend", "StageRunner"):
        from catome_export.backends import base

        return getattr(base, name)
    raise AttributeError(f"module 'catome_export.backends' has no attribute {name!r}")


def _check_device(name: str, device: "torch.device | str | None", allowed: tuple[str, ...]) -> "torch.device | None":
    from catome_export.devices import parse_device

    if device is None:
        return None
    dev = parse_device(device)
    if dev.type not in allowed:
        raise CatomeError(f"backend {name} runs on {' or '.join(allowed)}, not {dev}: pick another --backend or device")
    return dev


def create_backend(choice: BackendChoice, engine: "EngineSource", device: "torch.device | str | None" = None,
                   options: Mapping[str, Any] | None = None) -> "Backend":
    """The backend ``choice`` names, for ``engine`` (an :class:`~catome_export.engine.engine.Engine`, or the path
    of its folder, opened and checked here).

    ``device``: where stages run (ort-cpu: cpu only; ort-cuda and trt: a CUDA
    device, default the current one; torch: cuda when present, else cpu).
    ``options``: backend settings, e.g. ONNX Runtime's ``intra_op_threads``
    (see :class:`catome_export.backends.ort.OrtOptions`).
    """
    from catome_export.engine.engine import Engine  # the manifest needs torch; choosing a backend does not

    manifest = Engine.open(engine).manifest
    name = choice.name
    if name in ("ort-cpu", "ort-cuda"):
        from catome_export.backends.ort import OrtBackend, OrtOptions

        dev = _check_device(name, device, ("cpu",) if name == "ort-cpu" else ("cuda",))
        return OrtBackend(dev or ("cpu" if name == "ort-cpu" else "cuda"), OrtOptions.from_mapping(options))
    if options:
        raise CatomeError(f"backend {name} takes no options (got {sorted(options)})")
    if name == "torch":
        from catome_export.backends.torch_backend import TorchBackend

        return TorchBackend(manifest, _check_device(name, device, ("cpu", "cuda")))
    if name == "trt":
        if manifest.engine_backend != "trt":
            raise CatomeError("this engine folder holds ONNX graphs only, no TensorRT plans: rebuild it with "
                              "catome-export build --engine-kind trt, or run it with --backend ort")
        from catome_export.backends.trt import TrtBackend

        return TrtBackend(manifest, device=_check_device(name, device, ("cuda",)))
    raise CatomeError(f"unknown backend {name!r}: use one of {', '.join(BACKEND_NAMES)}")
