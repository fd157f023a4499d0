"""Diffusers-format LoRA files: parsing ``FILE[:SCALE]``, reading and checking the weights, fusing them.

A LoRA file is a safetensors file as ``StableDiffusionPipeline.save_lora_weights``
writes it (and ``load_lora_weights`` reads it): per adapted U-Net module
``unet.<module path>.lora.down.weight`` ([r, in] for a Linear, [r, in, kh, kw]
for a Conv2d) and ``.lora.up.weight`` ([out, r] or [out, r, 1, 1]). Also read:
PEFT's own names (``lora_A`` / ``lora_B``), files without the ``unet.``
prefix, the old attention-processor names (``...processor.to_q_lora.down.weight``),
per-module ``.alpha`` entries (network alphas) and the ``lora_adapter_metadata``
that diffusers writes into the file (``lora_alpha``, ``alpha_pattern``,
``use_rslora``). Keys of the text encoders (``text_encoder.``,
``text_encoder_2.``) are counted and left to the pipeline: the engine is the U-Net.

The fused weight is what diffusers' ``load_lora_weights`` + ``fuse_lora(lora_scale=s)``
computes through PEFT, with the same float operations in the same order, so a
fused fp32 weight is bit for bit PEFT's: ``W + (up @ down) * (alpha / r * s)``
(Conv2d 1x1 as a matrix product, larger kernels through ``conv2d`` as PEFT
does), one LoRA after the other in the order given.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from catome_export.checks import check_float
from catome_export.errors import CatomeError

TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "te.", "te1.", "te2.")
_SUFFIXES = {
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
_PROCESSOR = re.compile(r"^(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>down|up)\.weight$")
_UNSUPPORTED = ("dora_scale", "lora_magnitude_vector", ".lora.down.bias", ".lora.up.bias", "lora_B.bias",
                "lora_A.bias")


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora FILE[:SCALE]``: a file and the scale its delta is fused with."""

    path: Path
    scale: float = 1.0

    def flag(self) -> str:
        return f"{self.path}:{self.scale:g}"


def parse_lora_arg(text: Any) -> LoraSpec:
    """``FILE`` or ``FILE:SCALE`` (SCALE a finite number; default 1) as a :class:`LoraSpec`, checked to exist.

    A path that itself contains ``:`` is taken whole when what follows the last ``:`` is not a number and the
    whole exists as a file."""
    if isinstance(text, LoraSpec):
        spec = text
    else:
        if not isinstance(text, str) or not text.strip():
            raise CatomeError(f"--lora takes FILE or FILE:SCALE (a diffusers LoRA .safetensors file), got {text!r}")
        path_text, scale_text = text, None
        if ":" in text:
            head, tail = text.rsplit(":", 1)
            if Path(text).is_file() and not _is_number(tail):
                head, tail = text, None  # type: ignore[assignment]
            path_text, scale_text = head, tail
        if not path_text:
            raise CatomeError(f"--lora {text!r} names no file: use FILE or FILE:SCALE, e.g. style.safetensors:0.8")
        scale = 1.0
        if scale_text is not None:
            if not _is_number(scale_text):
                raise CatomeError(f"--lora {text!r}: the scale {scale_text!r} is not a finite number: use FILE:SCALE, e.g. "
                                  f"{path_text}:0.8")
            scale = float(scale_text)
        spec = LoraSpec(Path(path_text).expanduser(), scale)
    check_float("LoRA scale", spec.scale, hint=f"for {spec.path}")
    if not spec.path.is_file():
        what = "is a folder: name the .safetensors file in it" if spec.path.is_dir() else "does not exist"
        raise CatomeError(f"LoRA file {spec.path} {what} (--lora FILE[:SCALE])")
    return LoraSpec(spec.path, float(spec.scale))


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@dataclass(frozen=True)
class LoraModule:
    """One adapted U-Net module: its down and up matrices and PEFT's scaling ``alpha / r`` (or ``/ sqrt(r)``)."""

    path: str
    """Module path in the U-Net (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``)."""
    down: torch.Tensor
    up: torch.Tensor
    scaling: float
    keys: tuple[str, str]
    """The file's keys of ``down`` and ``up`` (error messages name them)."""

    @property
    def param(self) -> str:
        """The U-Net parameter it changes."""
        return f"{self.path}.weight"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read and parsed (no check against a model yet: see :func:`check_lora`)."""

    path: Path
    sha256: str
    bytes: int
    modules: dict[str, LoraModule]
    """Module path -> its matrices, in the file's (sorted) key order."""
    text_encoder_keys: int = 0
    """Keys for the pipeline's text encoders (not the engine's: load them with ``pipe.load_lora_weights``)."""


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA safetensors file (CatomeError naming the file for one that is not)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CatomeError(f"cannot read LoRA file {path} ({exc.strerror or exc})") from None
    try:
        from safetensors import safe_open
        from safetensors.torch import load as st_load

        tensors = st_load(raw)
        with safe_open(str(path), "pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise CatomeError(f"LoRA file {path} is not a safetensors file ({type(exc).__name__}: {str(exc)[:120]}): "
                          "save it with pipe.save_lora_weights(...) (safe_serialization)") from None
    if not tensors:
        raise CatomeError(f"LoRA file {path} holds no tensors")
    config = _adapter_config(metadata, path)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    text_keys = 0
    for key in sorted(tensors):
        if key.startswith(TEXT_ENCODER_PREFIXES):
            text_keys += 1
            continue
        for bad in _UNSUPPORTED:
            if bad in key:
                raise CatomeError(f"LoRA file {path}: key {key!r} is not plain LoRA (DoRA or LoRA biases cannot be "
                                  "fused by this version): use a plain LoRA")
        module, which = _split_key(key)
        if module is None:
            raise CatomeError(f"LoRA file {path}: key {key!r} does not match the model (not a diffusers LoRA key "
                              "<module>.lora.down.weight / .lora.up.weight / .alpha)")
        parts.setdefault(module, {})[which] = (key, tensors[key])
    modules: dict[str, LoraModule] = {}
    for module, found in parts.items():
        if "down" not in found or "up" not in found:
            have = next(iter(found.values()))[0]
            missing = "up" if "down" in found else "down"
            raise CatomeError(f"LoRA file {path}: key {have!r} has no {missing} matrix beside it (the file is "
                              "incomplete)")
        (kd, down), (ku, up) = found["down"], found["up"]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise CatomeError(f"LoRA file {path}: key {kd!r} has shape {list(down.shape)} and its up matrix "
                              f"{list(up.shape)}: not the two factors of one LoRA")
        rank = int(down.shape[0])
        alpha: float
        if "alpha" in found:
            alpha = float(found["alpha"][1].float().reshape(-1)[0])
        else:
            alpha = config.alpha_for(module, rank)
        scaling = alpha / math.sqrt(rank) if config.rslora else alpha / rank
        modules[module] = LoraModule(module, down, up, scaling, (kd, ku))
    if not modules and not text_keys:
        raise CatomeError(f"LoRA file {path} holds no LoRA weights")
    return LoraFile(path=path, sha256=_sha256_bytes(raw), bytes=len(raw), modules=modules, text_encoder_keys=text_keys)


def _split_key(key: str) -> tuple[str | None, str]:
    """(U-Net module path, down/up/alpha) of one key, or (None, "") for a key of no known form."""
    body = key[len("unet."):] if key.startswith("unet.") else key
    m = _PROCESSOR.match(body)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['path']}.{proj}", m["which"]
    for suffix, which in _SUFFIXES.items():
        if body.endswith(suffix):
            return body[: -len(suffix)], which
    return None, ""


@dataclass(frozen=True)
class _AdapterConfig:
    alpha: float | None
    alpha_pattern: dict[str, float]
    rslora: bool

    def alpha_for(self, module: str, rank: int) -> float:
        """PEFT's ``lora_alpha`` for a module: an ``alpha_pattern`` entry it matches, else the file's, else r."""
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(value)
        return float(rank) if self.alpha is None else self.alpha


def _adapter_config(metadata: Mapping[str, str], path: Path) -> _AdapterConfig:
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return _AdapterConfig(None, {}, False)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise CatomeError(f"LoRA file {path}: its lora_adapter_metadata is not JSON") from None
    unet = {k[len("unet."):]: v for k, v in data.items() if k.startswith("unet.")} if any(
        k.startswith("unet.") for k in data) else dict(data)
    if unet.get("use_dora"):
        raise CatomeError(f"LoRA file {path} is a DoRA adapter (use_dora): only plain LoRA can be fused")
    alpha = unet.get("lora_alpha")
    return _AdapterConfig(None if alpha is None else float(alpha),
                          {str(k): float(v) for k, v in (unet.get("alpha_pattern") or {}).items()},
                          bool(unet.get("use_rslora")))


# -- the model side ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A U-Net module a LoRA can adapt: a Linear or a Conv2d, with its weight's shape."""

    kind: str
    """``linear`` or ``conv``."""
    shape: tuple[int, ...]
    groups: int = 1


def lora_targets(unet: torch.nn.Module) -> dict[str, Target]:
    """Every Linear and Conv2d of a U-Net by module path (what a LoRA may adapt)."""
    out: dict[str, Target] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = Target("linear", tuple(module.weight.shape))
        elif isinstance(module, torch.nn.Conv2d):
            out[name] = Target("conv", tuple(module.weight.shape), int(module.groups))
    return out


def targets_from_config(config: Mapping[str, Any]) -> dict[str, Target]:
    """:func:`lora_targets` of a U-Net built from its config on the meta device (no weights, no memory)."""
    from diffusers import UNet2DConditionModel

    import logging

    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(clean)
    finally:
        quiet.setLevel(level)
    return lora_targets(unet)


def check_lora(lora: LoraFile, targets: Mapping[str, Target]) -> None:
    """CatomeError naming the first key (in the file's order) that does not fit the model."""
    for module, entry in lora.modules.items():
        key = entry.keys[0]
        target = targets.get(module)
        if target is None:
            raise CatomeError(f"LoRA file {lora.path}: key {key!r} does not match the model (it has no module "
                              f"{module!r}): this LoRA was trained for another model")
        want_dims = 2 if target.kind == "linear" else 4
        if entry.down.dim() != want_dims:
            raise CatomeError(f"LoRA file {lora.path}: key {key!r} does not match the model ({module} is a "
                              f"{target.kind} layer, the LoRA matrix has {entry.down.dim()} dims)")
        out_f, in_f = target.shape[0], target.shape[1]
        if entry.down.shape[1] != in_f or entry.up.shape[0] != out_f:
            raise CatomeError(f"LoRA file {lora.path}: key {key!r} does not match the model (LoRA {module} maps "
                              f"{entry.down.shape[1]} -> {entry.up.shape[0]} features, the model's "
                              f"{in_f} -> {out_f}): this LoRA was trained for another model")
        if target.kind == "conv":
            if tuple(entry.up.shape[2:]) != (1, 1) or (target.groups == 1 and
                                                         tuple(entry.down.shape[2:]) != tuple(target.shape[2:])):
                raise CatomeError(f"LoRA file {lora.path}: key {key!r} does not match the model (kernel "
                                  f"{list(entry.down.shape[2:])} against the model's {list(target.shape[2:])})")


def load_loras(specs: Sequence[LoraSpec], targets: Mapping[str, Target]) -> list[tuple[LoraSpec, LoraFile]]:
    """Read and check every LoRA (CatomeError on the first that does not fit), before anything changes."""
    out = []
    for spec in specs:
        lora = read_lora(spec.path)
        check_lora(lora, targets)
        out.append((spec, lora))
    return out


# -- fusing ------------------------------------------------------------------------------------------------------
def delta_weight(entry: LoraModule, scale: float, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """PEFT's ``get_delta_weight`` with the scaling ``fuse_lora(lora_scale=scale)`` gives it, in ``weight``'s
    dtype (computed in fp32 where the weight is fp16 or bf16, as PEFT does on a CPU)."""
    scaling = entry.scaling if scale == 1.0 else entry.scaling * scale
    down, up = entry.down, entry.up
    compute = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    down = down.to(device=weight.device, dtype=compute)
    up = up.to(device=weight.device, dtype=compute)
    if weight.dim() == 2:
        out = (up @ down) * scaling
    elif tuple(weight.shape[2:4]) == (1, 1):
        out = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling
    else:
        out = torch.nn.functional.conv2d(down.transpose(0, 1), up)
        out = out * scaling if groups > 1 else out.transpose(0, 1) * scaling
    return out.to(weight.dtype)


def fused_weights(base: Mapping[str, torch.Tensor], loras: Iterable[tuple[LoraSpec, LoraFile]],
                  targets: Mapping[str, Target]) -> dict[str, torch.Tensor]:
    """The fused value of every parameter the LoRAs touch (``{param: base + deltas}``; ``base``: their current
    values by parameter name, e.g. ``down_blocks.0....to_q.weight``). ``base`` is not changed."""
    out: dict[str, torch.Tensor] = {}
    for spec, lora in loras:
        for module, entry in lora.modules.items():
            name = entry.param
            current = out[name] if name in out else base[name].clone()
            current += delta_weight(entry, spec.scale, current, targets[module].groups)
            out[name] = current
    return out


def touched_params(loras: Iterable[tuple[LoraSpec, LoraFile]]) -> list[str]:
    """The U-Net parameters the LoRAs change, in first-touch order."""
    seen: dict[str, None] = {}
    for _, lora in loras:
        for entry in lora.modules.values():
            seen.setdefault(entry.param, None)
    return list(seen)


def fuse_into(unet: torch.nn.Module, specs: Sequence[LoraSpec]) -> list[tuple[LoraSpec, LoraFile]]:
    """Fuse LoRAs into a U-Net's weights in place (every file read and checked first: on an error nothing
    changed). Returns the LoRAs as read."""
    targets = lora_targets(unet)
    loras = load_loras(specs, targets)
    params = dict(unet.named_parameters())
    base = {name: params[name].detach() for name in touched_params(loras)}
    fused = fused_weights(base, loras, targets)
    with torch.no_grad():
        for name, value in fused.items():
            params[name].copy_(value)
    return loras
