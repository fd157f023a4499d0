"""Text-to-image generation with eager CA-ToMe or an engine: the API under ``catome-export generate`` and ``eval``.

- :func:`load_pipeline`: a full ``StableDiffusionPipeline``: ``tiny`` is
  assembled offline from small configs (see :mod:`catome_export.models.pipeline`:
  a random text encoder behind a character-level tokenizer, a random VAE, so
  prompts work but images carry no meaning); ``sd15`` comes from the hub (or
  its local cache); a path is a local diffusers pipeline folder.
- :func:`pipeline_for_engine`: the pipeline around an engine's model,
  without loading the eager U-Net where it can be left out; attach the
  runtime with :func:`catome_export.runtime.embed.attach`.
- :class:`ImageRequest` and :func:`generate`: one image from one seed, with
  the per-step merge counts (from an eager handle's or a runtime's history)
  and the wall time of every denoising step.
- :func:`save_png`: an atomic PNG write.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from catome_export.defaults import DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS
from catome_export.devices import resolve_device
from catome_export.dtypes import precision_dtype
from catome_export.checks import check_float, check_int
from catome_export.errors import CatomeError
from catome_export.fsutil import atomic_write_bytes
from catome_export.merging.steps import StepHistory, StepRecord

logger = logging.getLogger(__name__)



# -- requests and results ----------------------------------------------------------------
@dataclass(frozen=True)
class ImageRequest:
    """One image to generate: prompt, sampling settings and size."""

    prompt: str
    """The text prompt (must not be empty)."""
    negative_prompt: str | None = None
    """What to steer away from (classifier-free guidance's unconditional prompt)."""
    steps: int = DEFAULT_STEPS
    """Number of denoising steps."""
    guidance: float = DEFAULT_GUIDANCE
    """Classifier-free guidance scale (<= 1 turns guidance off)."""
    seed: int = DEFAULT_SEED
    """Seed of the initial latent (a CPU generator, so every device starts from the same noise)."""
    height: int = 512
    """Image height in pixels, a multiple of 8."""
    width: int = 512
    """Image width in pixels, a multiple of 8."""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise CatomeError("the prompt is empty: pass --prompt \"a photograph of ...\"")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise CatomeError(f"the negative prompt must be a string, got {type(self.negative_prompt).__name__}")
        check_int("steps", self.steps, 1)
        check_int("seed", self.seed, 0)
        check_float("guidance", self.guidance, 0, hint="7.5 is usual; <= 1 turns it off")
        for name, value in (("height", self.height), ("width", self.width)):
            check_int(name, value, 8)
            if value % 8:
                raise CatomeError(f"{name} must be a multiple of 8 (the VAE downsamples by 8), got {value}: "
                                  f"use {value - value % 8} or {value - value % 8 + 8}")


@dataclass
class Generation:
    """One generated image and how it was made."""

    image: np.ndarray
    """uint8 ``[H, W, 3]``."""
    seconds: float
    """Wall time of the whole ``pipe(...)`` call (text encoding, denoising, VAE decode)."""
    steps: list[StepRecord]
    """One record per denoising step: the merging of its U-Net call (where ``stats`` kept any) and the step's
    wall time in ``step_ms``."""

    def pil(self) -> Any:
        from PIL import Image

        return Image.fromarray(self.image)

    def step_lines(self) -> list[str]:
        """One line per step: merged counts per site, matched sites and time."""
        return [format_step(s) for s in self.steps]


def format_step(report: StepRecord) -> str:
    """``step   3  merged [12, 10, 0, 9, 11]  matched [0, 1]  41.2 ms``."""
    merged = [report.merged[k] for k in sorted(report.merged)]
    matched = [k for k in sorted(report.matched) if report.matched[k]]
    parts = [f"step {report.step:3d}"]
    parts.append(f"merged {merged}" if merged else "merged -")
    parts.append(f"matched {matched}" if report.matched else "")
    parts.append(f"{report.step_ms:.1f} ms")
    return "  ".join(p for p in parts if p)


# -- pipelines ---------------------------------------------------------------------------
def default_resolution(model: str) -> int:
    """The model's native image size in pixels (256 for tiny, 512 for SD 1.5)."""
    from catome_export.models import model_info

    return int(model_info(model).default_resolution)


def load_pipeline(model: str, *, weights: str | Path | None = None, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, with_unet: bool = True, scheduler: str | None = None) -> Any:
    """The diffusers pipeline of ``model``: ``tiny``, ``tiny-xl`` (offline), ``sd15``, ``sd21``, ``sdxl`` (hub), a
    local pipeline folder, or a single-file checkpoint. SDXL-style models give a ``StableDiffusionXLPipeline``,
    the others a ``StableDiffusionPipeline``.

    ``weights``: ``pretrained`` (default) or a single-file checkpoint
    (``.safetensors``/``.ckpt``) of ``model``'s architecture; a checkpoint
    file as ``model`` names its own architecture. With a checkpoint, the
    U-Net comes from the file, and so do the VAE and the text encoders where
    the file carries them (diffusers' converters for the original layout);
    the tokenizers, the scheduler and what the file lacks come from
    ``model``'s own pipeline (bundled for the tiny models, else the hub or
    its cache, or the folder).

    ``with_unet=False`` leaves the U-Net out where the pipeline loads from
    files (hub, folder or checkpoint): the engine takes its place.
    ``scheduler`` (tiny models only): ``pndm`` (tiny's default, PLMS as SD 1.5
    ships), ``ddim`` or ``euler`` (tiny-xl's default, as SDXL ships).
    """
    from catome_export.choices import Weights
    from catome_export.models.registry import BUNDLED_ONLY, load_unet, resolve_source

    dev = resolve_device(device)
    torch_dtype = precision_dtype(dtype, ("auto", "fp32", "fp16"), f"unknown dtype {dtype!r}: use auto, fp32 or fp16",
                                  device=dev)
    arch, spec = resolve_source(model, weights)
    if spec == Weights.RANDOM and arch not in BUNDLED_ONLY:
        raise CatomeError("--weights random gives an image pipeline whose images are noise: generate and eval take "
                          "pretrained weights or a checkpoint file (random weights are for build and bench)")
    checkpoint = spec if isinstance(spec, Path) else None
    unet = load_unet(arch, checkpoint) if checkpoint is not None and with_unet else None
    if arch == "tiny":
        from catome_export.models.pipeline import tiny_pipeline

        pipe = tiny_pipeline(scheduler or "pndm", unet=unet)
    elif arch == "tiny-xl":
        from catome_export.models.pipeline import tiny_xl_pipeline

        pipe = tiny_xl_pipeline(scheduler or "euler", unet=unet)
    else:
        if scheduler is not None:
            raise CatomeError("a scheduler can be chosen for the tiny pipelines only; other models use their own")
        pipe = _from_pretrained(arch, torch_dtype, with_unet and checkpoint is None)
        if unet is not None:
            pipe.unet = unet
    if checkpoint is not None:
        from catome_export.models.checkpoint import load_components

        replaced = load_components(pipe, checkpoint)
        kept = [n for n in ("vae", "text_encoder", "text_encoder_2")
                if getattr(pipe, n, None) is not None and n not in replaced]
        logger.info("%s: U-Net%s from the file%s", checkpoint.name, "".join(f", {n}" for n in replaced),
                    f"; {', '.join(kept)} from {arch}" if kept else "")
    _move(pipe, dev, torch_dtype)
    return pipe


def _from_pretrained(model: str, torch_dtype: torch.dtype, with_unet: bool) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from catome_export.models import model_info
    from catome_export.models.hub import load_from_hub
    from catome_export.models.registry import HUB_IDS

    extra: dict[str, Any] = {} if with_unet else {"unet": None}
    if model not in HUB_IDS:
        path = Path(model)
        if not path.exists():
            raise CatomeError(f"unknown model {model!r}: use tiny or tiny-xl (offline, bundled), sd15, sd21 or sdxl "
                              "(hub), a local diffusers pipeline folder, or a single-file checkpoint "
                              "(.safetensors/.ckpt)")
        if not (path / "model_index.json").is_file():
            raise CatomeError(f"{model} is not a diffusers pipeline folder (no model_index.json): pass the folder "
                              "the pipeline's save_pretrained wrote, or use --model tiny / sd15 / sdxl")
    # SDXL-style U-Nets (added conditioning) come with StableDiffusionXLPipeline, the others with
    # StableDiffusionPipeline (SD 2.x's v-prediction is in its scheduler config).
    kind = StableDiffusionXLPipeline if model_info(model).added_conditioning else StableDiffusionPipeline
    ways_out = ("Ways out: --model tiny or tiny-xl (bundled offline pipelines), HF_HUB_OFFLINE=1 with the model "
                "already in the cache, or a local diffusers pipeline folder")
    try:
        if model in HUB_IDS:
            source = HUB_IDS[model]
            return load_from_hub(source, "model_index.json", lambda local: kind.from_pretrained(
                source, torch_dtype=torch_dtype, local_files_only=local, **extra),
                f"the Stable Diffusion pipeline {source!r}", ways_out)
        return kind.from_pretrained(model, torch_dtype=torch_dtype, **extra)
    except CatomeError:
        raise
    except Exception as exc:  # hub, cache and file errors come in many types
        where = f"{HUB_IDS[model]!r} from the hub or its local cache" if model in HUB_IDS else repr(model)
        detail = " ".join(str(exc).split())[:200]
        raise CatomeError(
            f"cannot load the Stable Diffusion pipeline {where} ({type(exc).__name__}: {detail}). {ways_out}"
        ) from None


def _move(pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Move the pipeline's torch modules to ``device`` and floating ``dtype`` (only those elsewhere)."""
    for component in getattr(pipe, "components", {}).values():
        if not isinstance(component, torch.nn.Module):
            continue
        first = next(component.parameters(), None)
        if first is None:
            continue
        if first.device != device and not (first.device.type == device.type == "cuda" and device.index is None):
            component.to(device=device)
        if first.is_floating_point() and first.dtype != dtype:
            component.to(dtype=dtype)


def pipeline_for_engine(runtime: Any, model: str | None = None, scheduler: str | None = None,
                        weights: str | Path | None = None) -> Any:
    """The pipeline around an engine (text encoder, VAE, tokenizer, scheduler), on the engine's device and dtype.

    ``model`` (default: the model the engine was built from, with the
    checkpoint file it was built from, if any) names where the other
    components come from: a registry name, a local pipeline folder or a
    single-file checkpoint; ``weights``: a checkpoint file of ``model``'s
    architecture. Its U-Net must fit the engine's (:func:`check_model_fits`).
    The U-Net is left out when the pipeline loads from files; the tiny
    pipeline keeps its small eager U-Net (it is what
    :func:`~catome_export.runtime.embed.attach` checks the engine against).
    Attach the runtime afterwards.
    """
    from catome_export.models.checkpoint import is_checkpoint_path

    manifest = runtime.manifest
    built_from = manifest.model.id or None  # empty: a runtime made from ready runners names no model
    source = model or built_from
    if source is None:
        raise CatomeError("the engine's manifest names no model: pass --model to say which pipeline to use")
    built_weights = manifest.model.weights
    if model is None and weights is None and is_checkpoint_path(built_weights):
        if not Path(str(built_weights)).is_file():
            raise CatomeError(f"the engine was built from {built_weights}, which is gone, and its text encoder and "
                              f"VAE come from that file: pass --model (and --weights) to say where they come from")
        weights = built_weights
    if model is not None:
        check_model_fits(dict(runtime.unet.config), built_from or "the engine's model", model, weights)
    if built_weights == "random" and source != "tiny" and model is None:
        logger.warning("the engine was built from random weights: the images are noise (speed work only)")
    pipe = load_pipeline(source, weights=weights, device=runtime.device, dtype=runtime.dtype,
                         with_unet=source == "tiny", scheduler=scheduler)
    return pipe


FITTING_CONFIG = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
                  "projection_class_embeddings_input_dim", "addition_time_embed_dim")
"""U-Net config keys on which the pipeline's model and an engine must agree (what the pipeline feeds the U-Net)."""

_CONFIG_DEFAULTS = {"in_channels": 4, "out_channels": 4, "cross_attention_dim": 1280}
"""diffusers' defaults of :data:`FITTING_CONFIG` keys a config may leave out."""


def check_model_fits(engine_config: Mapping[str, Any], built_from: str, model: str,
                     weights: str | Path | None = None) -> None:
    """CatomeError (one line) when ``model``'s U-Net config differs from the engine's on :data:`FITTING_CONFIG`.

    ``engine_config``: the engine's U-Net config (``runtime.unet.config``, the
    manifest's ``model.unet_config``); ``built_from`` names its model in the
    message. Read from the configs alone (the bundled one, the folder's, the
    checkpoint's detected architecture), before any weights load.
    """
    from catome_export.models.registry import resolve_source, unet_config_of

    arch, _ = resolve_source(model, weights)
    mine = unet_config_of(arch)
    for key in FITTING_CONFIG:
        theirs, ours = engine_config.get(key, _CONFIG_DEFAULTS.get(key)), mine.get(key, _CONFIG_DEFAULTS.get(key))
        if theirs != ours:
            raise CatomeError(
                f"--model {model} does not fit the engine: its U-Net has {key}={ours}, the engine's (built from "
                f"{built_from}) has {theirs}; the text encoder and VAE must be of the engine's architecture: "
                f"pass a model of that architecture, or leave --model out to use the engine's own ({built_from})")


def check_engine_shapes(runtime: Any, request: "ImageRequest") -> None:
    """CatomeError (naming the built range and the rebuild command) when the engine cannot run ``request``."""
    check = getattr(runtime, "shape_check", None)
    if check is not None:
        batch = 2 if request.guidance > 1 else 1  # classifier-free guidance batches both halves
        check(batch, request.height // 8, request.width // 8)


def engine_resolution(runtime: Any) -> tuple[int, int]:
    """The image size of the engine's optimal profile (latent * 8)."""
    manifest = runtime.manifest
    return manifest.shapes.opt_height * 8, manifest.shapes.opt_width * 8


# -- generation --------------------------------------------------------------------------
class _StepClock:
    """``callback_on_step_end`` that records the wall time of every denoising step."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.start = 0.0

    def begin(self) -> None:
        self.marks = []
        self.start = time.perf_counter()

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.marks.append(time.perf_counter())
        return {}

    def durations(self, pipeline_start: float) -> list[float]:
        previous = pipeline_start
        out = []
        for mark in self.marks:
            out.append(mark - previous)
            previous = mark
        return out


def _sync(pipe: Any, device: torch.device | None) -> None:
    if device is None:
        found = getattr(pipe, "device", None)
        device = found if isinstance(found, torch.device) else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PipelineRun:
    """One ``pipe(...)`` call, timed by the step clock."""

    images: np.ndarray
    """float64 ``[N, H, W, 3]`` in [0, 1], as the pipeline returned them (``output_type="np"``)."""
    start: float
    """``time.perf_counter()`` when the call started."""
    seconds: float
    """Wall time of the call (text encoding, denoising, VAE decode); on CUDA synchronised before and after."""
    step_seconds: list[float]
    """Wall time of each denoising step, from diffusers' ``callback_on_step_end`` (the first step's includes
    the text encoding; the VAE decode is in ``seconds`` only)."""


def run_pipeline(pipe: Any, *, device: torch.device | None = None, **kwargs: Any) -> PipelineRun:
    """``pipe(**kwargs)`` under ``torch.no_grad`` with ``output_type="np"`` and the one step clock.

    The one place generate and serve call a pipeline. ``device``: the CUDA device to synchronise on around
    the call (None: the pipeline's own ``device``).
    """
    clock = _StepClock()
    _sync(pipe, device)
    start = time.perf_counter()
    clock.begin()
    with torch.no_grad():
        output = pipe(**kwargs, output_type="np", callback_on_step_end=clock)
    _sync(pipe, device)
    seconds = time.perf_counter() - start
    images = np.asarray(output.images if hasattr(output, "images") else output[0], dtype=np.float64)
    return PipelineRun(images=images, start=start, seconds=seconds, step_seconds=clock.durations(start))


def to_pixels(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] (one ``[H, W, 3]`` or a batch) as uint8: scaled by 255, rounded, clipped."""
    return np.clip(np.round(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def generate(pipe: Any, request: ImageRequest, *, stats: StepHistory | None = None,
             progress: bool = False) -> Generation:
    """Generate one image; ``stats``: an eager handle, a runtime or an attachment, whose records of the U-Net
    calls the report takes (None: steps with their times only).

    The first step's time includes the text encoding; the VAE decode is in
    the total only. ``progress`` shows diffusers' own progress bar.
    """
    if not isinstance(request, ImageRequest):
        raise CatomeError(f"request must be an ImageRequest, got {type(request).__name__}")
    pipe.set_progress_bar_config(disable=not progress)
    run = run_pipeline(
        pipe, prompt=request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
        guidance_scale=float(request.guidance), height=request.height, width=request.width,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    )
    history = list(stats.history) if stats is not None else []
    reports = []
    for i, dt in enumerate(run.step_seconds):
        rec = history[i] if i < len(history) else StepRecord(i)
        reports.append(replace(rec, merged=dict(rec.merged), matched=dict(rec.matched), step_ms=dt * 1e3))
    return Generation(image=to_pixels(run.images[0]), seconds=run.seconds, steps=reports)


def save_png(image: np.ndarray | Any, path: str | Path) -> Path:
    """Write ``image`` (uint8 ``[H, W, 3]`` array or PIL image) as PNG, atomically (temp file + rename)."""
    from PIL import Image

    target = Path(path)
    if target.suffix.lower() != ".png":
        raise CatomeError(f"the output file must end in .png, got {str(target)!r}")
    if target.is_dir():
        raise CatomeError(f"{str(target)!r} is a folder: pass a file name ending in .png")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CatomeError(f"cannot create the folder {str(target.parent)!r}: {exc}") from None
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    atomic_write_bytes(target, buffer.getvalue())
    return target


# -- merge settings ----------------------------------------------------------------------
def merge_settings_for_engine(settings: Any, threshold: float | None, schedule: str | None, step_base: int,
                              no_merge: bool, r_multiple: int | None = None) -> Any:
    """The engine's merge settings with the command line's overrides applied (no rebuild needed)."""
    from catome_export.merging import AutoSchedule, parse_schedule_request

    if no_merge:
        return replace(settings, threshold=1.0, ratio=None, merge_fraction=None)
    out = settings
    if r_multiple is not None:
        out = replace(out, r_multiple=r_multiple)
    if threshold is not None:
        out = replace(out, threshold=threshold, ratio=None, merge_fraction=None)
    if schedule is not None:
        request = parse_schedule_request(schedule, step_base)
        if isinstance(request, AutoSchedule):
            raise CatomeError("auto:K schedules are calibrated on the eager model: run catome-export analyze on the "
                              "model and pass the checkpoint list it prints as --schedule")
        out = replace(out, schedule=request)
    return out


def describe_settings(settings: Any) -> str:
    """``CA-ToMe t=0.7, config3`` / ``no merging`` / ``ToMe ratio 0.5``."""
    if settings is None:
        return "no merging"
    if settings.mode == "threshold":
        if settings.threshold >= 1:
            return "no merging (t=1)"
        return f"CA-ToMe t={settings.threshold:g}, {settings.schedule.describe()}{_rounding(settings)}"
    if settings.mode == "ratio":
        return f"ToMe ratio {settings.ratio:g}, {settings.schedule.describe()}{_rounding(settings)}"
    return f"forced merge fraction {settings.merge_fraction:g}, {settings.schedule.describe()}{_rounding(settings)}"


def _rounding(settings: Any) -> str:
    q = getattr(settings, "r_multiple", 1)
    return "" if q == 1 else f", r in multiples of {q}"
