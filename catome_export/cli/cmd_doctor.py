"""``catome-export doctor``: what is installed, what is usable, and how to get the rest."""

from __future__ import annotations

import argparse
import importlib
import platform
from dataclasses import dataclass


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _version(module: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # a broken install raises more than ImportError
        return False, f"not importable ({type(exc).__name__}: {exc})".splitlines()[0][:160]
    return True, str(getattr(mod, "__version__", "installed"))


def _tensorrt_check() -> Check:
    """Installed, and a version this project supports (``select.TRT_SUPPORTED``)?"""
    from catome_export.backends.select import TRT_PIP, trt_version_problem

    ok, detail = _version("tensorrt")
    if not ok:
        return Check("tensorrt", False, detail, "pip install 'catome-export[trt]' on a machine with an NVIDIA GPU "
                     f"(or {TRT_PIP})")
    problem = trt_version_problem(detail)
    if problem is not None:
        return Check("tensorrt", False, f"{detail} (unsupported: {problem})", TRT_PIP)
    return Check("tensorrt", True, detail)


def run_checks() -> list[Check]:
    checks = [Check("python", True, platform.python_version())]
    for module, fix in (
        ("torch", "pip install torch==2.13.0 (CPU) or a CUDA build from pytorch.org"),
        ("diffusers", "pip install diffusers"),
        ("onnx", "pip install onnx"),
        ("onnxscript", "pip install onnxscript (needed by the torch.onnx dynamo exporter)"),
        ("polygraphy", "pip install 'catome-export[trt]' (Polygraphy drives the TensorRT path)"),
    ):
        ok, detail = _version(module)
        checks.append(Check(module, ok, detail, "" if ok else fix))

    ok, detail = _version("onnxruntime")
    if ok:
        import onnxruntime as ort

        detail += f"; providers: {', '.join(ort.get_available_providers())}"
    checks.append(Check("onnxruntime", ok, detail, "" if ok else "pip install 'catome-export[ort]' (CPU) or [ort-gpu]"))

    checks.append(_tensorrt_check())

    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            cc = ".".join(map(str, torch.cuda.get_device_capability(0)))
            checks.append(Check("cuda device", True, f"{name} (compute capability {cc}), CUDA {torch.version.cuda}"))
        else:
            build = "CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
            checks.append(Check("cuda device", False, f"none ({build})",
                                "GPU backends need an NVIDIA GPU and a CUDA build of torch; ORT CPU works without"))
    except Exception as exc:
        checks.append(Check("cuda device", False, f"unknown ({exc})"))
    return checks


def _backends(checks: list[Check]) -> list[str]:
    have = {c.name: c.ok for c in checks}
    usable = ["eager torch"] if have.get("torch") else []
    if have.get("onnxruntime"):
        usable.append("ONNX Runtime")
    if have.get("tensorrt") and have.get("cuda device"):
        usable.append("TensorRT")
    return usable


def run(args: argparse.Namespace) -> int:
    checks = run_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok  " if c.ok else "--  "
        print(f"{mark}{c.name:<{width}}  {c.detail}")
        if c.fix:
            print(f"    {'':<{width}}  to get it: {c.fix}")
    print(f"usable backends: {', '.join(_backends(checks)) or 'none'}")
    print("extras (pip install 'catome-export[NAME]'):")
    from catome_export.extras import EXTRAS, extra_status

    for name in EXTRAS:
        status = extra_status(name)
        mark = "ok  " if status.ok else "--  "
        print(f"{mark}{name:<{width}}  {status.extra.enables}" + ("" if status.ok else f"; {status.detail}: "
                                                                   f"{status.extra.pip}"))
    core = {"torch", "diffusers", "onnx"}
    return 0 if all(c.ok for c in checks if c.name in core) else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="report what is installed and usable (python, torch, ORT, TensorRT, CUDA)",
                       description="Report the versions of python, torch, diffusers, onnx, onnxruntime and "
                                   "TensorRT, the CUDA device, which backends are usable, and how to install "
                                   "what is missing. Exit 1 when a core package is missing.")
    p.set_defaults(func=run)
