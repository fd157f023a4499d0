"""``catome-export generate``: one image from a prompt, with eager CA-ToMe or an engine."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from catome_export.cli.vocab import deprecate, image_size, set_side
from catome_export.errors import CatomeError
from catome_export.fsutil import Outputs, check_writable_file
from catome_export.defaults import (
    DEFAULT_GUIDANCE, DEFAULT_R_MULTIPLE, DEFAULT_SCHEDULE, DEFAULT_SEED, DEFAULT_STEPS, DEFAULT_THRESHOLD,
)

logger = logging.getLogger(__name__)

def add_merge_options(p: argparse.ArgumentParser) -> None:
    """--threshold, --schedule, --step-base (shared with eval)."""
    p.add_argument("--threshold", type=float, default=None,
                   help=f"CA-ToMe similarity threshold t in [-1, 1] (default {DEFAULT_THRESHOLD}; with --engine: "
                        "the engine's own); 1 merges nothing")
    p.add_argument("--schedule", default=None,
                   help=f"checkpoint steps at which matching is recomputed: a name (config1..config4, adaptive, "
                        f"config_five, every_step), a list like 0,8,11,13 (default {DEFAULT_SCHEDULE}; with --engine: "
                        "the engine's own)")
    p.add_argument("--step-base", type=int, choices=(0, 1), default=1,
                   help="1 (default): schedule entry k fires at loop index k-1, as the authors' code ran; "
                        "0: at loop index k, as the paper's lists read")


R_MULTIPLE_HELP = ("round each merge site's r down to a multiple of Q, merging the Q*floor(r/Q) best-scoring src "
                   "tokens: bounded shape variety (at most about N/Q shapes per site of N tokens, so TensorRT "
                   "kernels and CUDA graphs can be reused and ONNX Runtime's CPU arena meets fewer buffer sizes); "
                   "1 = off")


def add_r_multiple_option(p: argparse.ArgumentParser, engine_default: bool, eager: bool = False) -> None:
    """--r-multiple (shared by build, verify, generate, bench and serve); ``eager``: the command also runs eager."""
    default = f"default {DEFAULT_R_MULTIPLE}"
    if engine_default:
        default = (f"default: the engine's own, set at build ({DEFAULT_R_MULTIPLE} for engines built before this "
                   "flag)" + (f"; eager: {DEFAULT_R_MULTIPLE}" if eager else ""))
    p.add_argument("--r-multiple", default=None, metavar="Q", help=f"{R_MULTIPLE_HELP} ({default})")


def r_multiple_arg(args: argparse.Namespace) -> int | None:
    """The parsed --r-multiple (None: not given); a one-line CatomeError for anything but an integer >= 1."""
    text = getattr(args, "r_multiple", None)
    if text is None:
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value < 1:
        raise CatomeError(f"--r-multiple must be a whole number >= 1 (1 is off; e.g. 64 rounds r down to multiples "
                          f"of 64), got {text!r}")
    return value


FEATURE_CACHE_HELP = ("DeepCache-style feature caching: I,b runs every I-th call in full and the calls between "
                      "only on the shallow branch b (cache_interval, cache_branch_id of DeepCacheSDHelper; 0 = "
                      "shallowest); 'I' = branch 0; 'full:0,5,9;b' lists the full calls; off = none")


def add_feature_cache_option(p: argparse.ArgumentParser, engine_default: bool) -> None:
    """--feature-cache (shared by generate, verify, eval, bench and serve)."""
    default = "default: the engine's own, set at build; eager: off" if engine_default else "default off"
    p.add_argument("--feature-cache", "--deepcache", default=None, metavar="I,b", help=f"{FEATURE_CACHE_HELP} ({default})")


def feature_cache_arg(args: argparse.Namespace, engine: bool) -> Any:
    """The parsed --feature-cache: FeatureCacheSettings, None (off), or "engine" (not given, with an engine)."""
    from catome_export.featurecache import parse_feature_cache

    text = getattr(args, "feature_cache", None)
    if text is None:
        return "engine" if engine else None
    return parse_feature_cache(text)


def check_eager_feature_cache(settings: Any, model: str) -> None:
    """CatomeError naming the valid range when the branch does not exist on ``model`` (before it loads)."""
    from catome_export.featurecache import UNetLayout
    from catome_export.featurecache.branches import check_branch
    from catome_export.models.registry import unet_config_of

    if settings is not None and settings != "engine":
        check_branch(settings.branch, UNetLayout.from_config(unet_config_of(model)))


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """--steps, --guidance, --seed, --resolution, --negative-prompt (shared with eval)."""
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the initial noise (default {DEFAULT_SEED})")
    p.add_argument("--resolution", type=image_size, default=None, metavar="N|HxW",
                   help="image size in pixels, multiples of 8: N (square) or HxW (default: the model's native size, "
                        "or the engine's optimal profile)")
    deprecate(p, "--height", "--resolution", use="--resolution HxW", type=int, metavar="H", merge=set_side(0))
    deprecate(p, "--width", "--resolution", use="--resolution HxW", type=int, metavar="W", merge=set_side(1))


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """--backend, --device, --precision (shared with eval)."""
    p.add_argument("--backend", default="auto",
                   help="engine backend: auto (TensorRT, then ORT CUDA, then ORT CPU), trt, ort, ort-cuda, ort-cpu, "
                        "torch (default auto)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N] (default auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16"),
                   help="eager model precision: auto = fp16 on CUDA, fp32 on CPU (engines keep their own) (default auto)")
    deprecate(p, "--dtype", "--precision")


def requested_size(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(height, width) of ``--resolution`` (or the old ``--height``/``--width``); None where not given."""
    return args.resolution if args.resolution is not None else (None, None)


def size_or_default(height: int | None, width: int | None, default_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) as given; a missing height is the default, a missing width the height (or the default).
    A given 0 stays 0, so the request's check refuses it rather than taking the default."""
    h = default_hw[0] if height is None else height
    w = width if width is not None else (height if height is not None else default_hw[1])
    return h, w


def check_merge_flags(args: argparse.Namespace) -> None:
    if args.no_merge and (args.threshold is not None or args.schedule is not None
                          or getattr(args, "r_multiple", None) is not None):
        raise CatomeError("--no-merge turns merging off: leave out --threshold, --schedule and --r-multiple")
    r_multiple_arg(args)
    if args.threshold is not None:  # checked before any pipeline or engine is loaded
        from catome_export.merging import MergeSettings

        MergeSettings(threshold=args.threshold)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "image"


def run(args: argparse.Namespace) -> int:
    from catome_export.workflows.generate import ImageRequest, default_resolution, save_png

    if args.model is None and args.engine is None:
        raise CatomeError("say what to run: --model tiny|tiny-xl|sd15|sd21|sdxl|<pipeline folder> (eager), or --engine <engine folder>")
    if args.prompt is None:
        raise CatomeError("--prompt is missing: pass --prompt \"a photograph of ...\"")
    check_merge_flags(args)
    if args.weights is not None and args.model is None:
        raise CatomeError("--weights names the weights of --model's architecture: give --model too (e.g. --model "
                          "sd15 --weights model.safetensors)")
    if args.engine is not None and not Path(args.engine).is_dir():
        raise CatomeError(f"engine folder {args.engine!r} does not exist: build one with "
                          "catome-export build --model tiny (or pass the folder the build wrote)")
    # Check the request before loading anything (the default size stands in for a missing one).
    ImageRequest(args.prompt, args.negative_prompt, args.steps, args.guidance, args.seed,
                 *size_or_default(*requested_size(args), (512, 512)))
    out = Path(args.out) if args.out else Path("out") / f"{_slug(args.prompt)}-seed{args.seed}.png"
    if out.suffix.lower() != ".png":
        raise CatomeError(f"--out must name a .png file, got {str(out)!r}")
    check_writable_file(out, "--out")
    cache = feature_cache_arg(args, engine=args.engine is not None)
    if args.engine is None:
        check_eager_feature_cache(cache, args.model)
    from catome_export.extras import require

    require("generate", "generate")  # the pipeline's text encoder and the PNG writer, before any model loads

    if args.engine is not None:
        gen, what = _run_engine(args, cache)
    else:
        gen, what = _run_eager(args, default_resolution, cache)
    for line in gen.step_lines():
        print(line)
    merged_steps = sum(1 for s in gen.steps if any(s.merged.values()))
    outputs = Outputs()
    written = outputs.save(out, lambda path: save_png(gen.image, path), "--out")
    h, w = gen.image.shape[:2]
    if written is not None:
        print(f"wrote {written} ({w}x{h}, {len(gen.steps)} steps, {gen.seconds:.2f} s; {what}; "
              f"tokens merged at {merged_steps}/{len(gen.steps)} steps)")
    outputs.finish()
    return 0


def _request(args: argparse.Namespace, default_hw: tuple[int, int]) -> Any:
    from catome_export.workflows.generate import ImageRequest

    height, width = size_or_default(*requested_size(args), default_hw)
    return ImageRequest(args.prompt, args.negative_prompt, args.steps, args.guidance, args.seed, height, width)


def _run_eager(args: argparse.Namespace, default_resolution: Any, cache: Any = None) -> tuple[Any, str]:
    from contextlib import nullcontext

    from catome_export.eager import apply_deepcache
    from catome_export.workflows.generate import describe_settings, generate, load_pipeline
    from catome_export.workflows.eager import apply_catome

    res = default_resolution(args.model)
    request = _request(args, (res, res))
    pipe = load_pipeline(args.model, weights=args.weights, device=args.device, dtype=args.precision)
    caching = nullcontext() if cache is None else apply_deepcache(pipe, settings=cache)
    suffix = "" if cache is None else f", {cache.describe()}"
    with caching:
        if args.no_merge:
            return generate(pipe, request, progress=True), f"no merging{suffix}, eager torch"
        threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
        schedule = DEFAULT_SCHEDULE if args.schedule is None else args.schedule
        q = r_multiple_arg(args)
        with apply_catome(pipe, threshold=threshold, schedule=schedule, step_base=args.step_base,
                          r_multiple=DEFAULT_R_MULTIPLE if q is None else q) as handle:
            gen = generate(pipe, request, stats=handle, progress=True)
            what = f"{describe_settings(handle.settings)}{suffix}, eager torch"
    return gen, what


def _run_engine(args: argparse.Namespace, cache: Any = "engine") -> tuple[Any, str]:
    from catome_export.workflows.generate import (check_engine_shapes, describe_settings, engine_resolution, generate,
                                         merge_settings_for_engine, pipeline_for_engine)
    from catome_export.runtime import Runtime
    from catome_export.runtime.embed import attach

    device = None if args.device == "auto" else args.device
    with Runtime.load(args.engine, backend=args.backend, device=device, feature_cache=cache) as runtime:
        settings = merge_settings_for_engine(runtime.settings, args.threshold, args.schedule, args.step_base,
                                             args.no_merge, r_multiple=r_multiple_arg(args))
        if settings != runtime.settings:
            runtime.set_settings(settings)
        hw = engine_resolution(runtime) or (512, 512)
        request = _request(args, hw)
        check_engine_shapes(runtime, request)
        pipe = pipeline_for_engine(runtime, args.model, weights=args.weights)
        backend = runtime.backend.name
        with attach(pipe, runtime) as attached:
            gen = generate(pipe, request, stats=attached, progress=True)
        suffix = "" if runtime.feature_cache is None else f", {runtime.feature_cache.describe()}"
        return gen, f"{describe_settings(runtime.settings)}{suffix}, engine on {backend}"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate an image from a prompt (eager CA-ToMe or an engine)",
        description="Generate one image with a Stable Diffusion pipeline whose U-Net runs eager CA-ToMe "
                    "(--model) or an engine built by catome-export build (--engine; with --model as well, the engine's "
                    "U-Net runs inside --model's pipeline). Prints one line per step "
                    "(tokens merged per site, sites that recomputed their matching, step time) and writes a PNG. "
                    "The tiny model runs offline: its text encoder and VAE are small random stand-ins, so its "
                    "images are noise-shaped whatever the prompt.",
    )
    p.add_argument("--model", default=None,
                   help="tiny, tiny-xl (bundled, offline), sd15, sd21, sdxl (hub or local cache), a local diffusers "
                        "pipeline folder, or a single-file checkpoint (.safetensors/.ckpt); with --engine: where the "
                        "text encoder, VAE, tokenizer and scheduler come from, its U-Net config fitting the engine's "
                        "(default: none; give --model or --engine, with --engine the engine's own model)")
    p.add_argument("--weights", default=None, metavar="pretrained|FILE",
                   help="pretrained, or a single-file checkpoint (.safetensors/.ckpt) of --model's architecture: "
                        "its U-Net, and its VAE and text encoder where it has them (default: pretrained)")
    p.add_argument("--engine", default=None, help="an engine folder written by catome-export build; its U-Net "
                   "replaces the model's (default: none; give --model or --engine)")
    p.add_argument("--prompt", default=None, help="the text prompt (required)")
    add_sampling_options(p)
    add_merge_options(p)
    add_r_multiple_option(p, engine_default=True, eager=True)
    p.add_argument("--no-merge", action="store_true", help="run without token merging (the baseline)")
    add_feature_cache_option(p, engine_default=True)
    add_runtime_options(p)
    p.add_argument("--out", default=None, help="PNG file to write (default out/<prompt>-seed<seed>.png)")
    p.set_defaults(func=run)
