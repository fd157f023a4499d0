"""Model registry: ``sd15``, ``sd21``, ``sdxl`` (hub ids), ``tiny``, ``tiny-xl`` (bundled configs), or a path.

``weights="pretrained"`` loads real weights (hub download or a local diffusers
folder); ``weights="random"`` builds the architecture from its config with
seeded weights, identical in every process, for tests and speed work; a
single-file checkpoint (``.safetensors``/``.ckpt``, see
:mod:`catome_export.models.checkpoint`) as ``weights`` fills the named
architecture with its weights, and as the model itself names its own
architecture (detected from its tensor shapes).

Where the bundled configs come from (the hub's ``unet/config.json`` of each
model, as mirrored in public code; fields that only restate diffusers'
defaults may be left out):

- ``sd15_unet.json``: stable-diffusion-v1-5/stable-diffusion-v1-5.
- ``sd21_unet.json``: stabilityai/stable-diffusion-2-1 (768 px, v-prediction):
  read from huggingface/candle ``candle-transformers/src/models/stable_diffusion/mod.rs``
  (``v2_1``: heads 5/10/20/20, cross-attention 1024, linear projection, which
  cites the hub config and its v-prediction scheduler) and checked field by
  field against a full copy of the hub file (``upcast_attention: true``,
  ``sample_size: 96``) in public training code.
- ``sdxl_unet.json``: stabilityai/stable-diffusion-xl-base-1.0: the hub
  file as copied in public repositories (transformer depth 1/2/10, no
  attention in down_blocks.0, ``addition_embed_type: text_time`` with
  ``addition_time_embed_dim`` 256 and ``projection_class_embeddings_input_dim``
  2816 = 1280 pooled text + 6 time ids x 256), cross-checked against
  huggingface/candle ``stable_diffusion/mod.rs`` (``sdxl_``).
- ``tiny-xl_unet.json``: SDXL's layout at toy width (ours): no attention at the
  top level, depth 2 at downsample 2, linear ``proj_in``, ``text_time``
  conditioning with 32 pooled text dims and 6 time ids x 8.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Union

import torch

from catome_export.choices import Weights
from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""The community mirror of the SD 1.5 weights on the Hugging Face hub."""

RANDOM_SEED = 0
"""Seed of ``weights="random"``."""


SD21_HUB_ID = "stabilityai/stable-diffusion-2-1"
"""SD 2.1 at 768 px (v-prediction) on the Hugging Face hub."""

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
"""SDXL base 1.0 on the Hugging Face hub."""

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""What a U-Net's output means (the scheduler's ``prediction_type``)."""

SDXL_TIME_IDS = 6
"""SDXL base's ``time_ids``: original size (h, w), crop top-left (y, x), target size (h, w)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    """Registry name (``tiny``, ``sd15``, ``sdxl``, ...) or the folder path."""
    source: str
    """Hub id or local path weights come from (``bundled`` for the tiny models)."""
    default_resolution: int
    """Default image resolution in pixels (latent * 8)."""
    text_dim: int
    """Width of the text embeddings the U-Net cross-attends to (2048 for SDXL: both text encoders side by side)."""
    text_len: int = 77
    """Token count of the text embeddings."""
    max_downsample: int = 1
    """Default merge level: merge sites are the transformer blocks at downsample <= this (SD 1.x/2.x: 1, the
    full latent resolution; SDXL: 2, its highest-resolution attention). Users may still set another."""
    prediction_type: str = "epsilon"
    """What the U-Net predicts: ``epsilon`` (noise) or ``v_prediction`` (SD 2.x 768)."""
    text_embeds_dim: int | None = None
    """SDXL-style added conditioning: width of ``added_cond_kwargs["text_embeds"]`` (pooled text), else None."""
    time_ids_dim: int | None = None
    """SDXL-style added conditioning: width of ``added_cond_kwargs["time_ids"]`` (6 for SDXL base), else None."""

    @property
    def added_conditioning(self) -> bool:
        """True when the U-Net needs ``added_cond_kwargs`` (``text_embeds`` and ``time_ids``), as SDXL does."""
        return self.text_embeds_dim is not None


MODELS: dict[str, ModelInfo] = {
    "tiny": ModelInfo("tiny", "bundled", default_resolution=256, text_dim=32),
    "tiny-xl": ModelInfo("tiny-xl", "bundled", default_resolution=256, text_dim=64, max_downsample=2,
                         text_embeds_dim=32, time_ids_dim=SDXL_TIME_IDS),
    "sd15": ModelInfo("sd15", SD15_HUB_ID, default_resolution=512, text_dim=768),
    "sd21": ModelInfo("sd21", SD21_HUB_ID, default_resolution=768, text_dim=1024, prediction_type="v_prediction"),
    "sdxl": ModelInfo("sdxl", SDXL_HUB_ID, default_resolution=1024, text_dim=2048, max_downsample=2,
                      text_embeds_dim=1280, time_ids_dim=SDXL_TIME_IDS),
}

HUB_IDS: dict[str, str] = {"sd15": SD15_HUB_ID, "sd21": SD21_HUB_ID, "sdxl": SDXL_HUB_ID}
"""Registry names whose pretrained weights come from the hub."""

BUNDLED_ONLY = ("tiny", "tiny-xl")
"""Registry names that exist only as a bundled config (random weights)."""


def bundled_config(name: str) -> dict[str, Any]:
    """The bundled U-Net config of a registry name (``tiny``, ``tiny-xl``, ``sd15``, ``sd21``, ``sdxl``)."""
    if name not in MODELS:
        raise CatomeError(f"no bundled config for {name!r}: known models are {', '.join(MODELS)}")
    text = resources.files("catome_export.models").joinpath("configs", f"{name}_unet.json").read_text()
    return json.loads(text)


def added_conditioning_dims(config: Any) -> tuple[int, int] | None:
    """(text_embeds width, time_ids width) of a U-Net config with ``addition_embed_type: text_time``, else None.

    The config gives ``projection_class_embeddings_input_dim`` = text_embeds +
    time_ids * ``addition_time_embed_dim``; the split assumes SDXL base's 6
    time ids (a refiner-style model with an aesthetic score uses 5: pass a
    pipeline folder whose text_encoder_2 config names its projection width).
    """
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    if get("addition_embed_type") != "text_time":
        return None
    total = int(get("projection_class_embeddings_input_dim") or 0)
    per_id = int(get("addition_time_embed_dim") or 0)
    text_embeds = total - SDXL_TIME_IDS * per_id
    if per_id <= 0 or text_embeds <= 0:
        raise CatomeError(f"the U-Net config's text_time conditioning is inconsistent (projection_class_embeddings"
                          f"_input_dim {total}, addition_time_embed_dim {per_id}): check the model's config.json")
    return text_embeds, SDXL_TIME_IDS


def top_attention_level(config: Any) -> int:
    """Downsample factor of the highest-resolution level that has transformer blocks (the natural merge level).

    1 for SD 1.x/2.x (attention at the full latent resolution), 2 for SDXL
    (down_blocks.0 has none). CatomeError when no down block has attention.
    """
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    down = list(get("down_block_types") or [])
    for i, kind in enumerate(down):
        if "CrossAttn" in str(kind) or str(kind).startswith("Attn"):
            return 2 ** i
    raise CatomeError("the U-Net has no attention in any down block, so token merging has nothing to act on: "
                      "use a Stable Diffusion U-Net (SD 1.x, 2.x or SDXL layout)")


WeightsSpec = Union[Weights, Path]
"""Parsed weights: ``Weights.PRETRAINED``, ``Weights.RANDOM`` or the absolute path of a single-file checkpoint."""


def parse_weights(value: str | Path | Weights) -> WeightsSpec:
    """``pretrained``, ``random`` or a checkpoint file (absolute path), else CatomeError saying what is taken."""
    from catome_export.models.checkpoint import check_checkpoint_file, is_checkpoint_path

    if isinstance(value, Weights):
        return value
    if isinstance(value, str) and value in Weights.values():
        return Weights(value)
    if is_checkpoint_path(value):
        return check_checkpoint_file(value)
    raise CatomeError(f"weights must be one of pretrained, random, or a single-file checkpoint (.safetensors or "
                      f".ckpt), got {str(value)!r}")


def resolve_source(model: str, weights: str | Path | Weights | None = None) -> tuple[str, WeightsSpec | None]:
    """(architecture, weights) of ``--model``/``--weights``: a checkpoint file given as the model names its own.

    The architecture is a registry name or a local folder; a checkpoint file
    as ``model`` becomes (the registry name its U-Net fits, the file).
    ``weights`` None stays None (the caller's default applies).
    """
    from catome_export.models.checkpoint import check_checkpoint_file, detect_architecture, is_checkpoint_path

    if not isinstance(model, str) or not model:
        raise CatomeError("give a model: tiny, tiny-xl, sd15, sd21, sdxl, a local diffusers folder or a "
                          "single-file checkpoint")
    if is_checkpoint_path(model):
        file = check_checkpoint_file(model, "--model")
        if weights is not None and parse_weights(weights) not in (Weights.PRETRAINED, file):
            raise CatomeError(f"--model {model} is a checkpoint file, which holds the weights: leave out --weights, "
                              "or name the architecture as --model (e.g. --model sd15 --weights FILE)")
        return detect_architecture(model), file
    spec = None if weights is None else parse_weights(weights)
    if isinstance(spec, Path):
        from catome_export.models.checkpoint import check_checkpoint_fits

        check_checkpoint_fits(spec, unet_config_of(model), model)  # before anything loads
    return model, spec


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    from catome_export.dtypes import precision_dtype

    return precision_dtype(dtype)


def random_unet(config: dict[str, Any], seed: int = RANDOM_SEED):
    """A UNet2DConditionModel from ``config`` with seeded weights (same in every process)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config)
    return unet


def model_info(name_or_path: str) -> ModelInfo:
    """Registry entry of a name, or an entry describing a local diffusers folder.

    For a folder everything comes from its files: the U-Net config (text
    width, added conditioning, merge level = its highest-resolution attention
    level) and, in a pipeline folder, the scheduler's ``prediction_type``.
    """
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    from catome_export.models.checkpoint import detect_architecture, is_checkpoint_path

    if is_checkpoint_path(name_or_path):
        return MODELS[detect_architecture(name_or_path)]
    path = Path(name_or_path)
    cfg = _local_unet_config(path)
    added = added_conditioning_dims(cfg)
    sample = cfg.get("sample_size", 64)
    sample = int(sample[0] if isinstance(sample, (list, tuple)) else sample)
    return ModelInfo(str(path), str(path), default_resolution=sample * 8,
                     text_dim=int(cfg.get("cross_attention_dim", 768)), max_downsample=top_attention_level(cfg),
                     prediction_type=_local_prediction_type(path),
                     text_embeds_dim=added[0] if added else None, time_ids_dim=added[1] if added else None)


def _local_prediction_type(path: Path) -> str:
    """The scheduler's prediction_type in a pipeline folder (``epsilon`` when there is none to read)."""
    file = path / "scheduler" / "scheduler_config.json"
    try:
        value = json.loads(file.read_text()).get("prediction_type", "epsilon") if file.is_file() else "epsilon"
    except (OSError, json.JSONDecodeError) as exc:
        raise CatomeError(f"cannot read {file}: {exc}") from None
    if value not in PREDICTION_TYPES:
        raise CatomeError(f"{file} names prediction_type {value!r}; supported: {', '.join(PREDICTION_TYPES)}")
    return str(value)


def _local_unet_dir(path: Path) -> Path:
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    if (path / "config.json").is_file():
        return path
    raise CatomeError(
        f"unknown model {str(path)!r}: use one of {', '.join(repr(n) for n in MODELS)}, or a local diffusers folder "
        "(a pipeline folder with unet/config.json, or a U-Net folder with config.json); a single-file checkpoint "
        "(.safetensors/.ckpt) works too (e.g. --model sd15 --weights model.safetensors)"
    )


def unet_config_of(name_or_path: str) -> dict[str, Any]:
    """The U-Net config of a registry name (its bundled config) or a local diffusers folder, read without weights."""
    if name_or_path in MODELS:
        return bundled_config(name_or_path)
    from catome_export.models.checkpoint import detect_architecture, is_checkpoint_path

    if is_checkpoint_path(name_or_path):
        return bundled_config(detect_architecture(name_or_path))
    return _local_unet_config(Path(name_or_path))


def _local_unet_config(path: Path) -> dict[str, Any]:
    folder = _local_unet_dir(path)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CatomeError(f"cannot read {folder / 'config.json'}: {exc}") from None
    if not isinstance(cfg, dict):
        raise CatomeError(f"{folder / 'config.json'} is not a diffusers model config (not a JSON object)")
    kind = cfg.get("_class_name", "UNet2DConditionModel")
    if kind != "UNet2DConditionModel":
        raise CatomeError(
            f"{folder} holds a {kind}, not a UNet2DConditionModel: token merging here follows the U-Net's "
            "levels (SD 1.x, 2.x, SDXL); transformer-based models (SD3, PixArt, Flux) are not supported")
    return cfg


def load_unet(name_or_path: str, weights: str | Path | Weights = "pretrained",
              dtype: torch.dtype | str = torch.float32):
    """Load a diffusers ``UNet2DConditionModel`` in eval mode.

    ``tiny``, ``tiny-xl``: bundled configs; only random weights exist, so
    ``pretrained`` is taken as random. ``sd15``, ``sd21``, ``sdxl``: the hub
    (or the local cache; offline it fails in seconds), or the bundled config
    with ``weights="random"`` (offline). A path: a local diffusers folder
    (pipeline or U-Net); ``weights="random"`` uses its config only.
    ``weights`` a single-file checkpoint (``.safetensors``/``.ckpt``, original
    LDM layout or a diffusers U-Net file): the named architecture with the
    file's weights, offline. ``name_or_path`` a checkpoint file: its own
    architecture (detected), its weights.
    """
    arch, spec = resolve_source(name_or_path, weights)
    spec = Weights.PRETRAINED if spec is None else spec
    torch_dtype = _parse_dtype(dtype)
    if isinstance(spec, Path):
        from catome_export.models.checkpoint import unet_from_checkpoint

        return unet_from_checkpoint(spec, unet_config_of(arch), arch, torch_dtype)
    if arch in BUNDLED_ONLY:
        unet = random_unet(bundled_config(arch))
    elif arch in HUB_IDS:
        unet = random_unet(bundled_config(arch)) if spec == Weights.RANDOM else _from_hub(HUB_IDS[arch], arch)
    else:
        path = Path(arch)
        if spec == Weights.RANDOM:
            unet = random_unet(_local_unet_config(path))
        else:
            unet = _from_local(_local_unet_dir(path))
    if unet.dtype != torch_dtype:
        unet = unet.to(dtype=torch_dtype)
    return unet.eval().requires_grad_(False)


def offline_ways_out(name: str) -> str:
    """The ways to load ``name`` (a hub model) without the hub, as the end of an error message."""
    return (f"Ways out: HF_HUB_OFFLINE=1 with the model already in the cache, a local diffusers folder "
            f"(--model ./folder), --weights random (same architecture, seeded weights), or a single-file "
            f"checkpoint (--model {name} --weights model.safetensors)")


def _from_hub(hub_id: str, name: str):
    from diffusers import UNet2DConditionModel

    from catome_export.models.hub import load_from_hub

    def load(local_only: bool):
        return UNet2DConditionModel.from_pretrained(hub_id, subfolder="unet", local_files_only=local_only)

    try:
        return load_from_hub(hub_id, "unet/config.json", load, f"pretrained weights of {hub_id!r}",
                             offline_ways_out(name))
    except CatomeError:
        raise
    except Exception as exc:  # hub and cache errors come in many types
        detail = " ".join(str(exc).split())[:160]
        raise CatomeError(
            f"cannot load pretrained weights of {hub_id!r} ({type(exc).__name__}: {detail}). "
            f"{offline_ways_out(name)}"
        ) from None


def _from_local(folder: Path):
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(str(folder))
    except Exception as exc:
        raise CatomeError(
            f"cannot load the U-Net weights in {folder} ({type(exc).__name__}: {exc}). "
            "Check the folder, or use --weights random to build its architecture with seeded weights"
        ) from None


def weights_hash(unet: torch.nn.Module) -> str:
    """sha256 over the U-Net's parameters and buffers (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
