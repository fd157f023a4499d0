"""Single-file checkpoints (``.safetensors``, ``.ckpt``): what most Stable Diffusion users have.

A file in the original LDM layout (``model.diffusion_model.*`` for the
U-Net, ``first_stage_model.*`` for the VAE, ``cond_stage_model.*`` or
``conditioner.embedders.*`` for the text encoders, as A1111 and ComfyUI
write them) or a diffusers U-Net weights file
(``diffusion_pytorch_model.safetensors``) is read here, offline: the
architecture comes from a registry name (its bundled config) or a local
diffusers folder, never from the hub.

- :func:`detect_architecture`: the registry name whose bundled config fits
  the file's U-Net (input channels, width, text width, projection kind,
  added conditioning), read from the tensor shapes alone.
- :func:`unet_from_checkpoint`: a ``UNet2DConditionModel`` of a given config
  with the file's weights, converted with diffusers' own
  ``convert_ldm_unet_checkpoint`` and loaded strictly (every weight present,
  every shape right), else one :class:`CatomeError` that says what the file
  holds and what to do.
- :func:`load_components`: a pipeline's VAE and text encoders replaced by
  the file's, where it carries them.

``.ckpt`` files are read with ``torch.load(weights_only=True)``: a pickle
that holds more than tensors (some old training checkpoints do) is refused
rather than executed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
"""File name endings taken as single-file checkpoints."""

UNET_PREFIX = "model.diffusion_model."
"""Key prefix of the U-Net in the original (LDM) layout."""

VAE_PREFIX = "first_stage_model."
"""Key prefix of the VAE in the original layout."""

CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
"""Key prefixes of a CLIP ViT-L text encoder (SD 1.x; SDXL's first encoder)."""

OPEN_CLIP_PREFIXES = {"cond_stage_model.model.": "text_encoder", "conditioner.embedders.1.model.": "text_encoder_2"}
"""Key prefixes of an OpenCLIP text encoder (SD 2.x's; SDXL's second) and the pipeline component each fills."""

_LORA_MARKS = ("lora_up", "lora_down", "lora_A", "lora_B", "lora_unet_", "lora_te", ".lora.", "lora.down", "lora.up")


def is_checkpoint_path(value: object) -> bool:
    """True for a str or Path that ends in ``.safetensors`` or ``.ckpt`` (whether or not it exists)."""
    return isinstance(value, (str, Path)) and Path(value).suffix.lower() in CHECKPOINT_SUFFIXES


def check_checkpoint_file(value: str | Path, flag: str = "--weights") -> Path:
    """The absolute path of an existing checkpoint file, or CatomeError naming ``flag`` and the fix."""
    path = Path(value).expanduser()
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise CatomeError(f"{flag} {str(value)!r} is not a single-file checkpoint: the file name must end in "
                          f"{' or '.join(CHECKPOINT_SUFFIXES)}")
    if path.is_dir():
        raise CatomeError(f"{flag} {str(value)!r} is a folder: a single-file checkpoint is one file; pass a "
                          "diffusers folder as --model instead")
    if not path.is_file():
        raise CatomeError(f"{flag} {str(value)!r}: no such file")
    return path.resolve()


# -- reading -----------------------------------------------------------------------------
class _Reader:
    """Tensor names, shapes and (on demand) values of a checkpoint file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded: dict[str, torch.Tensor] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors
                raise CatomeError(f"{path} is not a readable .safetensors file ({_short(exc)}): it may be "
                                  "truncated (an interrupted download) or not a checkpoint; download it again") from None
        else:
            self._loaded = _torch_load(path)
            self.shapes = {k: tuple(v.shape) for k, v in self._loaded.items()}

    def tensors(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        wanted = list(keys)
        if self._loaded is not None:
            return {k: self._loaded[k] for k in wanted}
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in wanted}
        except Exception as exc:  # noqa: BLE001
            raise CatomeError(f"cannot read the tensors of {self.path} ({_short(exc)}): download it again") from None

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        return self.tensors(k for k in self.shapes if k.startswith(prefix))


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(str(path), map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - zip, pickle and OS errors
        if "Unsupported global" in str(exc):  # a pickled class or function, not garbage
            raise CatomeError(f"{path} holds Python objects besides tensors, which are not loaded here because "
                              "unpickling can run code: convert it to .safetensors with a tool you trust, or use "
                              "the .safetensors release of the model") from None
        raise CatomeError(f"{path} is not a readable .ckpt file ({_short(exc)}): it may be truncated (an "
                          "interrupted download) or not a checkpoint; download it again") from None
    while isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CatomeError(f"{path} holds a {type(data).__name__}, not a state dict of tensors: pass a model checkpoint")
    return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}


# -- what a file holds -------------------------------------------------------------------
@dataclass(frozen=True)
class UNetFingerprint:
    """The U-Net traits a tensor shape reveals: enough to tell the registry's architectures apart."""

    in_channels: int
    width: int
    """Channels of the first level (``block_out_channels[0]``)."""
    text_dim: int | None
    """Width of the text embeddings the cross-attention reads (None: no cross-attention found)."""
    linear_projection: bool
    """Transformer ``proj_in`` is a linear layer (SD 2.x, SDXL) rather than a 1x1 convolution (SD 1.x)."""
    added_dim: int | None
    """Input width of the added (SDXL ``text_time``) embedding, None without one."""

    def describe(self) -> str:
        parts = [f"{self.in_channels} input channels", f"width {self.width}",
                 f"text width {self.text_dim}" if self.text_dim is not None else "no cross-attention",
                 "linear projections" if self.linear_projection else "1x1-conv projections"]
        if self.added_dim is not None:
            parts.append(f"added conditioning of {self.added_dim}")
        if self.in_channels == 9:
            parts.append("an inpainting model")
        return ", ".join(parts)


def fingerprint_of_config(config: Mapping[str, Any]) -> UNetFingerprint:
    """The fingerprint a diffusers U-Net config implies."""
    added = None
    if config.get("addition_embed_type") == "text_time" or config.get("class_embed_type") == "projection":
        added = int(config.get("projection_class_embeddings_input_dim") or 0) or None
    cross = config.get("cross_attention_dim")
    text_dim = int(cross[0] if isinstance(cross, (list, tuple)) else cross) if cross is not None else 1280
    return UNetFingerprint(int(config.get("in_channels", 4)), int(list(config.get("block_out_channels",
                           (320,)))[0]), text_dim, bool(config.get("use_linear_projection", False)), added)


def _fingerprint(shapes: Mapping[str, tuple[int, ...]], layout: str) -> UNetFingerprint:
    p = UNET_PREFIX if layout == "ldm" else ""
    conv_in = shapes.get(f"{p}input_blocks.0.0.weight" if layout == "ldm" else "conv_in.weight")
    if conv_in is None or len(conv_in) != 4:
        raise CatomeError("the file's U-Net has no input convolution (conv_in): it is truncated or not a U-Net")
    text_dim = next((s[1] for k, s in sorted(shapes.items())
                     if k.startswith(p) and k.endswith("attn2.to_k.weight") and len(s) == 2), None)
    proj = next((s for k, s in sorted(shapes.items()) if k.startswith(p) and k.endswith("proj_in.weight")), None)
    added_key = f"{p}label_emb.0.0.weight" if layout == "ldm" else "add_embedding.linear_1.weight"
    added = shapes.get(added_key)
    return UNetFingerprint(conv_in[1], conv_in[0], text_dim, proj is not None and len(proj) == 2,
                           added[1] if added is not None and len(added) == 2 else None)


def _unet_layout(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """``ldm`` (original layout), ``diffusers`` (a diffusers U-Net weights file) or None (no U-Net)."""
    if any(k.startswith(UNET_PREFIX) for k in shapes):
        return "ldm"
    if "conv_in.weight" in shapes and "time_embedding.linear_1.weight" in shapes:
        return "diffusers"
    return None


def _no_unet_message(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> str:
    keys = list(shapes)
    lora = [k for k in keys if any(mark in k for mark in _LORA_MARKS)]
    if lora:
        return (f"{path} is a LoRA ({len(lora)} low-rank adapter tensors, e.g. {lora[0]}), not a model checkpoint: "
                "pass the full checkpoint of the base model (LoRAs are not applied here; fuse one into its base "
                "model with diffusers' fuse_lora and save that)")
    if not keys:
        return f"{path} holds no tensors: it is empty or truncated; download it again"
    if any(k.startswith(("encoder.", "decoder.", VAE_PREFIX)) for k in keys) and not any(
            k.startswith(("cond_stage_model.", "conditioner.")) for k in keys):
        return f"{path} holds a VAE only, not a U-Net: pass the model's full checkpoint"
    if any(k.startswith(("model.diffusion_model.joint_blocks", "double_blocks", "joint_blocks")) for k in keys):
        what = "a transformer-based model (SD3 or Flux layout)"
    else:
        what = f"no Stable Diffusion U-Net (keys like {', '.join(keys[:3])})"
    return (f"{path} holds {what}: token merging here needs an SD 1.x, 2.x or SDXL U-Net checkpoint "
            f"({UNET_PREFIX}* keys, or a diffusers U-Net weights file)")


def _known_fingerprints() -> dict[str, UNetFingerprint]:
    from catome_export.models.registry import MODELS, bundled_config

    return {name: fingerprint_of_config(bundled_config(name)) for name in MODELS}


@lru_cache(maxsize=8)
def _detect_cached(path: str, size: int, mtime: float) -> str:
    reader = _Reader(Path(path))
    layout = _unet_layout(reader.shapes)
    if layout is None:
        raise CatomeError(_no_unet_message(Path(path), reader.shapes))
    found = _fingerprint(reader.shapes, layout)
    matches = [name for name, fp in _known_fingerprints().items() if fp == found]
    if not matches:
        raise CatomeError(
            f"{path} holds a U-Net of no known architecture ({found.describe()}): name its architecture with a "
            "local diffusers folder (--model ./folder --weights FILE, the folder's unet/config.json fitting the "
            "file), or convert it with diffusers' from_single_file and pass the saved folder as --model")
    if found.text_dim == 1024 and matches == ["sd21"]:
        logger.info("%s: an SD 2.x U-Net, taken as sd21 (768 px, v-prediction); a 512 px epsilon SD 2.x model "
                    "needs a local diffusers folder whose scheduler says so", path)
    return matches[0]


def detect_architecture(path: str | Path) -> str:
    """The registry name whose bundled config fits the U-Net in ``path`` (CatomeError when none does)."""
    file = check_checkpoint_file(path, "--model")
    stat = file.stat()
    return _detect_cached(str(file), stat.st_size, stat.st_mtime)


# -- loading -----------------------------------------------------------------------------
def _open_unet(file: Path, config: Mapping[str, Any], architecture: str) -> tuple[_Reader, str]:
    """The file's reader and U-Net layout, or CatomeError when it holds no U-Net or one that does not fit."""
    reader = _Reader(file)
    layout = _unet_layout(reader.shapes)
    if layout is None:
        raise CatomeError(_no_unet_message(file, reader.shapes))
    found = _fingerprint(reader.shapes, layout)
    expected = fingerprint_of_config(config)
    if found != expected:
        known = [name for name, fp in _known_fingerprints().items() if fp == found]
        hint = (f"use --model {known[0]} --weights {file}" if known else
                "pass a local diffusers folder of its architecture as --model")
        raise CatomeError(f"{file} does not fit {architecture}: the file's U-Net has {found.describe()}, "
                          f"{architecture}'s has {expected.describe()}"
                          f"{f' (the file is a {known[0]} checkpoint)' if known else ''}: {hint}")
    return reader, layout


def check_checkpoint_fits(path: str | Path, config: Mapping[str, Any], architecture: str) -> None:
    """CatomeError unless ``path`` holds a U-Net whose traits are those of ``config`` (read from the shapes only)."""
    _open_unet(check_checkpoint_file(path), config, architecture)


def unet_from_checkpoint(path: str | Path, config: Mapping[str, Any], architecture: str,
                         dtype: torch.dtype = torch.float32) -> Any:
    """A ``UNet2DConditionModel`` built from ``config`` with the weights of the checkpoint ``path``, in ``dtype``.

    ``architecture`` names the config in messages (``sd15``, a folder). The
    file's U-Net must fit ``config`` exactly: every weight present, every
    shape the config's; otherwise CatomeError naming what the file holds.
    """
    from diffusers import UNet2DConditionModel

    file = check_checkpoint_file(path)
    reader, layout = _open_unet(file, config, architecture)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config))
    if layout == "ldm":
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        raw = reader.with_prefix(UNET_PREFIX)
        try:
            state = convert_ldm_unet_checkpoint(raw, dict(config))
        except (KeyError, IndexError) as exc:
            raise CatomeError(f"{file}: the U-Net weights are incomplete ({type(exc).__name__} {exc} while "
                              f"converting them for {architecture}): the file is truncated or of another "
                              "architecture; download it again") from None
        del raw
    else:
        state = reader.tensors(reader.shapes)
    _assign(unet, state, dtype, f"{file}'s U-Net", architecture)
    return unet.eval().requires_grad_(False)


def _check_state(module: torch.nn.Module, state: Mapping[str, Any], what: str, architecture: str,
                 ignore: tuple[str, ...] = ()) -> None:
    """CatomeError unless ``state`` has exactly the module's keys (those ending in ``ignore`` aside) and shapes."""
    def kept(key: str) -> bool:
        return not (ignore and key.endswith(ignore))

    own = {k: tuple(v.shape) for k, v in module.state_dict().items() if kept(k)}
    given = {k for k in state if kept(k)}
    missing = sorted(set(own) - given)
    unexpected = sorted(given - set(own))
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise CatomeError(f"{what} does not fit {architecture}: {len(missing)} weights missing, {len(unexpected)} "
                          f"unexpected (first: {first}): the file is truncated or of another architecture")
    for key, shape in own.items():
        value = state[key]
        if value is None or tuple(value.shape) != shape:
            got = None if value is None else tuple(value.shape)
            raise CatomeError(f"{what} does not fit {architecture}: {key} is {got} in the file, {shape} in "
                              f"{architecture}: pass the --model of the file's architecture")


def _assign(module: torch.nn.Module, state: Mapping[str, Any], dtype: torch.dtype, what: str,
            architecture: str) -> None:
    """Load ``state`` into ``module`` (built on the meta device) strictly, as ``dtype`` tensors of its own."""
    _check_state(module, state, what, architecture)
    ready = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    module.load_state_dict(ready, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CatomeError(f"{what}: {len(left)} tensors stayed unset (first: {left[0]}); report this with the file's "
                          "origin")


def load_components(pipe: Any, path: str | Path) -> list[str]:
    """Replace the pipeline's VAE and text encoders with the ones the checkpoint carries; return their names.

    Each goes through diffusers' converter for the original layout and is
    copied into the pipeline's own module (so its config, dtype and device
    stay), strictly: a shape that does not fit is a CatomeError. Components
    the file lacks are left as they are (many fine-tunes ship the U-Net only).
    """
    from diffusers.loaders import single_file_utils as sfu

    file = check_checkpoint_file(path)
    reader = _Reader(file)
    replaced: list[str] = []
    vae = getattr(pipe, "vae", None)
    if vae is not None and any(k.startswith(VAE_PREFIX) for k in reader.shapes):
        state = sfu.convert_ldm_vae_checkpoint(reader.with_prefix(VAE_PREFIX), dict(vae.config))
        _copy_into(vae, state, f"{file}'s VAE", "the pipeline's VAE")
        replaced.append("vae")
    for prefix in CLIP_PREFIXES:
        encoder = getattr(pipe, "text_encoder", None)
        if encoder is None or not any(k.startswith(prefix) for k in reader.shapes):
            continue
        state = sfu.convert_ldm_clip_checkpoint(reader.with_prefix(prefix), remove_prefix=prefix)
        _copy_into(encoder, _fit_text_model_prefix(encoder, state), f"{file}'s text encoder",
                   "the pipeline's text encoder", ignore=("position_ids",))
        replaced.append("text_encoder")
    for prefix, name in OPEN_CLIP_PREFIXES.items():
        encoder = getattr(pipe, name, None)
        if encoder is None or not any(k.startswith(prefix) for k in reader.shapes):
            continue
        try:
            state = sfu.convert_open_clip_checkpoint(encoder, reader.with_prefix(prefix), prefix=prefix)
        except (KeyError, IndexError, RuntimeError) as exc:
            raise CatomeError(f"{file}'s {name} cannot be converted ({_short(exc)}): the file is truncated or "
                              "of another architecture") from None
        _copy_into(encoder, _fit_text_model_prefix(encoder, state), f"{file}'s {name}", f"the pipeline's {name}",
                   ignore=("position_ids",))
        replaced.append(name)
    return replaced


def _fit_text_model_prefix(encoder: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Newer transformers flatten ``CLIPTextModel`` (no ``text_model.``): drop the prefix where the module has none."""
    if hasattr(encoder, "text_model"):
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _copy_into(module: torch.nn.Module, state: Mapping[str, Any], what: str, architecture: str,
               ignore: tuple[str, ...] = ()) -> None:
    _check_state(module, state, what, architecture, ignore)
    kept = {k: v for k, v in state.items() if not (ignore and k.endswith(ignore))}
    missing, unexpected = module.load_state_dict(kept, strict=False)
    left = [k for k in [*missing, *unexpected] if not (ignore and k.endswith(ignore))]
    if left:
        raise CatomeError(f"{what} does not fit {architecture} (first: {left[0]})")
