"""``catome-export eval``: baseline vs token merging from the same seeds: s/image, PSNR, SSIM, FID, CLIP."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from catome_export.cli.cmd_generate import (add_merge_options, add_r_multiple_option, add_runtime_options, requested_size,
                                           size_or_default)
from catome_export.cli.vocab import deprecate, image_size, set_side
from catome_export.errors import CatomeError

DEFAULT_IMAGENET = 20
"""Prompts when neither --prompts nor --imagenet is given."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[-40:] or "model"


def _prompts(args: argparse.Namespace) -> list[str]:
    from catome_export.evaluation.prompts import imagenet_prompts, load_prompts

    if args.prompts is not None:
        return load_prompts(args.prompts)
    return imagenet_prompts(DEFAULT_IMAGENET if args.imagenet is None else args.imagenet, args.imagenet_order)


def _methods(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return tuple(m.strip() for m in text.split(",") if m.strip())


def run(args: argparse.Namespace) -> int:
    from catome_export.cli.cmd_generate import feature_cache_arg, r_multiple_arg
    from catome_export.workflows.evaluate import EvalConfig, run_eval
    from catome_export.workflows.generate import ImageRequest

    from catome_export.extras import require

    require("eval", "eval")  # text encoder, images and metrics, before any model loads
    if args.engine is not None and not Path(args.engine).is_dir():
        raise CatomeError(f"engine folder {args.engine!r} does not exist: build one with "
                          "catome-export build --model tiny (or pass the folder the build wrote)")
    prompts = _prompts(args)
    # Check the sampling options before loading anything (the default size stands in for a missing one).
    ImageRequest(prompts[0], None, args.steps, args.guidance, args.seed,
                 *size_or_default(*requested_size(args), (512, 512)))
    model = args.model if args.model is not None or args.engine is not None else "tiny"
    name = Path(args.engine).name if args.engine else _slug(model)
    out = Path(args.out) if args.out else Path("out") / f"eval-{name}"
    config = EvalConfig(
        prompts=tuple(prompts), out=out, model=model, weights=args.weights, engine=Path(args.engine) if args.engine else None,
        methods=_methods(args.methods), threshold=args.threshold, schedule=args.schedule, step_base=args.step_base,
        ratio=args.ratio, steps=args.steps, guidance=args.guidance, seed=args.seed, height=requested_size(args)[0],
        width=requested_size(args)[1], negative_prompt=args.negative_prompt, warmup=args.warmup, backend=args.backend,
        device=args.device, dtype=args.precision, clip_model=args.clip_model,
        fid_reference=Path(args.fid_ref) if args.fid_ref else None,
        feature_cache=feature_cache_arg(args, engine=True), r_multiple=r_multiple_arg(args),
    )
    print(f"evaluating {len(prompts)} prompts x methods {', '.join(config.method_list())} -> {out}")
    report = run_eval(config, log=print, progress=True)
    print()
    print(report.table())
    print()
    for status in report.availability:
        print(status.line())
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and images in {out / 'images'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="image quality and speed of token merging against the baseline (PSNR, SSIM, FID, CLIP)",
        description="Generate baseline (no merging) and token-merged images from the same seeds (image i uses "
                    "seed + i) and report seconds per image, PSNR and SSIM against the baseline images, and FID and "
                    "CLIP score where their weights are already on this machine (nothing is downloaded). Writes "
                    "images/<method>/*.png, results.json and results.md (method | setting | s/image | PSNR | SSIM | "
                    "FID | CLIP) into --out.",
    )
    p.add_argument("--model", default=None,
                   help="tiny (default, offline), tiny-xl (offline), sd15, sd21, sdxl (hub or local cache), a local "
                        "pipeline folder or a single-file checkpoint (.safetensors/.ckpt); with --engine: where the "
                        "text encoder, VAE and eager baseline come from, its U-Net config fitting the engine's "
                        "(default: the engine's model)")
    p.add_argument("--weights", default=None, metavar="pretrained|FILE",
                   help="pretrained, or a single-file checkpoint (.safetensors/.ckpt) of --model's architecture "
                        "(default: pretrained)")
    p.add_argument("--engine", default=None, help="an engine folder: adds the engine-baseline and engine methods (default: none, eager methods only)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", default=None, help="prompt file: one prompt per line, or a JSON list of strings (default: --imagenet's class prompts)")
    src.add_argument("--imagenet", type=int, default=None,
                     help=f"N prompts \"A high-quality photograph of a {{class}}.\" over ImageNet-1k classes "
                          f"(default {DEFAULT_IMAGENET}; N evenly spaced classes, see --imagenet-order)")
    p.add_argument("--imagenet-order", choices=("spaced", "first"), default="spaced",
                   help="spaced (default): classes floor(i*1000/N); first: classes 0..N-1; N > 1000 repeats classes")
    p.add_argument("--methods", default=None,
                   help="comma-separated: baseline, tome, adaptive, catome, deepcache (DeepCache-style feature "
                        "caching alone), catome-deepcache (both), engine-baseline, engine (default: baseline,catome; "
                        "with --engine: baseline,engine-baseline,engine); baseline always runs")
    p.add_argument("--feature-cache", "--deepcache", default=None, metavar="I,b",
                   help="feature cache of the deepcache methods (default 3,0) and of the engine methods (default: "
                        "the engine's own; off turns it off for the engine and cannot go with the deepcache methods)")
    add_merge_options(p)
    add_r_multiple_option(p, engine_default=True, eager=True)
    p.add_argument("--ratio", type=float, default=0.5, help="ToMe's fixed merge ratio for the tome method (default 0.5)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for every image (default: none)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--resolution", type=image_size, default=None, metavar="N|HxW",
                   help="image size in pixels, multiples of 8: N (square) or HxW (default: native)")
    deprecate(p, "--height", "--resolution", use="--resolution HxW", type=int, metavar="H", merge=set_side(0))
    deprecate(p, "--width", "--resolution", use="--resolution HxW", type=int, metavar="W", merge=set_side(1))
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed generations per method before timing (at most 3 steps each; default 1)")
    add_runtime_options(p)
    p.add_argument("--clip-model", default="openai/clip-vit-large-patch14",
                   help="CLIP model for the CLIP score: a Hugging Face id already in the local cache, or a folder (default openai/clip-vit-large-patch14)")
    p.add_argument("--fid-ref", default=None,
                   help="folder of real images for FID (e.g. ImageNet val); default: FID against the baseline images")
    p.add_argument("--out", default=None, help="output folder (default out/eval-<model or engine>)")
    p.set_defaults(func=run)
