"""``catome-export analyze``: pair drift between denoising steps and a least-drift checkpoint schedule."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from catome_export.choices import Weights
from catome_export.cli.vocab import deprecate
from catome_export.defaults import DEFAULT_THRESHOLD
from catome_export.errors import CatomeError
from catome_export.fsutil import Outputs, atomic_write_with, check_writable_file

logger = logging.getLogger(__name__)

FEW_PAIRS = 0.01
"""Below this fraction of merged tokens the output warns that the distances are not informative."""

DESCRIPTION = """\
Run a seeded denoising loop (PLMS or DDIM, classifier-free guidance, batch 2)
on the U-Net, match every merge site at every step (no cache), and report how
much the merge pairs change between steps (Jaccard distance of the pair sets,
paper section III-B). Then propose the K checkpoints with the least total drift
between each step's true pairs and the pairs cached at its last checkpoint
(exact optimum by dynamic programming), and score the paper's CONFIG_1..4 by
the same measure.

Random weights (and the tiny model) have no text encoder: seeded random text
embeddings stand in, and --prompts is refused. White-noise latents give few
pairs with random weights, so smooth (blurred seeded noise) latents are their
default.
"""


def _int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return v


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="pair drift between steps and a least-drift checkpoint schedule (auto:K)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny, tiny-xl, sd15, sd21, sdxl, a local diffusers folder, or a "
                                                   "single-file checkpoint (.safetensors/.ckpt) (default: tiny)")
    p.add_argument("--weights", default=None, metavar="pretrained|random|FILE",
                   help="pretrained weights, the architecture with seeded random weights, or a single-file checkpoint "
                        "(.safetensors/.ckpt) of --model's architecture; prompts are still encoded with the "
                        "architecture's own text encoder (default: pretrained, random for the tiny models)")
    p.add_argument("--steps", type=_int, default=50, help="inference steps (default 50)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"CA-ToMe similarity threshold (default {DEFAULT_THRESHOLD})")
    p.add_argument("--resolution", type=_int, default=None,
                   help="image size in pixels, a multiple of 8 (default: the model's, tiny 256, sd15 512)")
    p.add_argument("--seed", type=_int, default=0, help="seed of the start latents and random embeddings (default 0)")
    p.add_argument("--latents", choices=("smooth", "noise"), default=None,
                   help="start latents: smooth (blurred seeded noise) or noise (default: smooth for random "
                        "weights, noise for pretrained)")
    p.add_argument("--budget", type=_int, default=None,
                   help="checkpoints K of the proposed schedule (default: 13, the size of CONFIG_3, "
                        "or the number of steps if fewer)")
    p.add_argument("--step-base", type=_int, choices=(0, 1), default=1,
                   help="numbering of the schedules: 1 = loop index + 1, as the authors' code ran (default); "
                        "0 = loop index, as the paper's lists read")
    p.add_argument("--scheduler", choices=("pndm", "ddim"), default="pndm",
                   help="pndm = PLMS as in the paper (steps + 1 U-Net calls), or ddim (default pndm)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--prompts", nargs="+", default=None, metavar="PROMPT",
                   help="prompts, one generation each (needs pretrained weights with a text encoder) (default: none, random embeddings)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="U-Net precision (default fp32)")
    deprecate(p, "--dtype", "--precision")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every number to FILE (JSON) (default: none)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE",
                   help="write the Jaccard distance between consecutive steps per site to FILE (PNG) (default: none)")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise CatomeError(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.threshold) or not -1.0 <= args.threshold <= 1.0:
        raise CatomeError(f"--threshold must be in [-1, 1] ({DEFAULT_THRESHOLD} in the paper), got {args.threshold}")
    if args.budget is not None and not 1 <= args.budget <= args.steps:
        raise CatomeError(f"--budget must be from 1 to --steps ({args.steps}) checkpoints, got {args.budget}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise CatomeError(f"--resolution must be a multiple of 8 pixels (>= 8), got {args.resolution}")
    if args.seed < 0:
        raise CatomeError(f"--seed must be >= 0, got {args.seed}")
    if not math.isfinite(args.guidance):
        raise CatomeError(f"--guidance must be a number, got {args.guidance}")
    if args.prompts is not None and not all(p.strip() for p in args.prompts):
        raise CatomeError("--prompts holds an empty prompt: give non-empty prompts")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            if not (path.parent if str(path.parent) else Path(".")).is_dir():
                raise CatomeError(f"{flag} {path}: the folder {path.parent} does not exist; create it first")
            check_writable_file(path, flag)
    if args.plot is not None:
        from catome_export.extras import require

        require("plot", "--plot")


def _text_inputs(args: argparse.Namespace, random_weights: bool, source: str, device, dtype):
    """(embeddings or None, description) of the conditioning."""
    if random_weights:
        return None, None
    from catome_export.analysis.text import DEFAULT_PROMPT, encode_prompts

    prompts = args.prompts or [DEFAULT_PROMPT]
    try:
        embs = encode_prompts(source, prompts, device=device, dtype=dtype)
    except CatomeError:
        if args.prompts:
            raise
        print(f"note: no text encoder found for {source}; using seeded random text embeddings")
        return None, None
    return embs, "prompts: " + " | ".join(prompts) + " (uncond: empty prompt)"


def _print_table(analysis, step_base: int) -> None:
    import numpy as np

    sites = " ".join(f"{'r' + str(s.index):>6}" for s in analysis.sites)
    print(f"{'loop':>4} {'step':>4} {'t':>5} {'jaccard':>8}  {sites}")
    mean_r = analysis.merged.mean(axis=0)
    for i, t in enumerate(analysis.timesteps):
        jd = "-" if i == 0 else f"{float(np.mean(analysis.consecutive[i])):.4f}"
        rs = " ".join(f"{v:>6.0f}" for v in mean_r[i])
        print(f"{i:>4} {i + step_base:>4} {t:>5} {jd:>8}  {rs}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    import torch

    from catome_export.analysis.result import DEFAULT_BUDGET, analyze_pairs
    from catome_export.analysis.tracking import TrackingConfig
    from catome_export.devices import resolve_device
    from catome_export.dtypes import precision_dtype
    from catome_export.models import load_unet, model_info

    from catome_export.models.registry import BUNDLED_ONLY, resolve_source

    model, spec = resolve_source(args.model, args.weights)
    if spec is None:
        spec = Weights.RANDOM if model in BUNDLED_ONLY else Weights.PRETRAINED
    if model in BUNDLED_ONLY and spec == Weights.PRETRAINED:
        spec = Weights.RANDOM  # the tiny models exist only with seeded random weights (or a checkpoint's)
    random_weights = spec == Weights.RANDOM
    if random_weights and args.prompts:
        raise CatomeError(
            "--prompts needs a text encoder, which random weights (and the tiny models) do not have: "
            "leave out --prompts (seeded random text embeddings are used), or use --weights pretrained"
        )
    info = model_info(model)
    if info.added_conditioning and args.prompts:
        raise CatomeError(
            f"--prompts encodes with one CLIP text encoder; {args.model} needs SDXL's two (and their pooled "
            "output): leave out --prompts (seeded random text embeddings and text_embeds are used)")
    device = resolve_device(args.device)
    dtype = precision_dtype(args.precision)
    if device.type == "cpu" and dtype == torch.float16:
        raise CatomeError("--precision fp16 needs a CUDA device: use fp32 or bf16 on the CPU")
    resolution = args.resolution or info.default_resolution
    latent = resolution // 8
    latents = args.latents or ("smooth" if random_weights else "noise")
    budget = args.budget or min(DEFAULT_BUDGET, args.steps)

    unet = load_unet(model, weights=spec, dtype=dtype).to(device)
    embs, inputs = _text_inputs(args, random_weights or info.added_conditioning, info.source, device, dtype)
    config = TrackingConfig(steps=args.steps, threshold=args.threshold, latent_hw=(latent, latent), seed=args.seed,
                            latents=latents, scheduler=args.scheduler, guidance_scale=args.guidance)
    weights_note = f"weights of {spec.name}" if isinstance(spec, Path) else f"{spec} weights"
    print(f"model {model} ({weights_note}), {resolution} px = {latent}x{latent} latent, "
          f"{args.scheduler} {args.steps} steps, CFG {args.guidance:g}, t={args.threshold:g}, seed {args.seed}")
    if latents == "smooth":
        why = "the default for random weights" if args.latents is None else "as asked"
        print(f"latents: smooth (blurred seeded noise; {why}: white noise gives few pairs with random weights)")
    else:
        print("latents: noise (seeded Gaussian, as a pipeline starts)")
    if embs is None:
        print("text: seeded random text embeddings (no text encoder); prompts are not used")

    analysis = analyze_pairs(unet, config, embs, inputs, progress=True)
    print("sites: " + ", ".join(f"{s.index}={s.path.replace('.transformer_blocks.0', '')} {g[0]}x{g[1]}"
                                 for s, g in zip(analysis.sites, analysis.grids)))
    _print_table(analysis, args.step_base)
    print(f"merged: {100 * analysis.merged_fraction:.1f}% of tokens over all sites and steps "
          f"({analysis.num_calls} U-Net calls)")
    if analysis.merged_fraction < FEW_PAIRS:
        print("warning: almost nothing merges at this threshold, so the distances rest on a handful of tokens"
              + (" (random weights with noise latents: try --latents smooth)" if random_weights else ""))

    scores = analysis.compare(budget, args.step_base)
    proposal = scores[0]
    print(f"\nproposed schedule, {budget} checkpoints (step_base {args.step_base}): "
          f"{proposal.name} {list(proposal.checkpoints or ())}")
    if args.steps != 50:
        print(f"note: the paper's lists are for 50 steps; entries beyond this run's {analysis.num_calls} calls "
              "are dropped")
    print(f"{'schedule':<12} {'checkpoints':>11} {'drift':>9} {'per step+site':>14} {'best, same K':>13}")
    for sc in scores:
        print(f"{sc.name:<12} {sc.num_checkpoints:>11} {sc.drift:>9.3f} {sc.mean_drift:>14.4f} "
              f"{sc.best_drift:>13.3f}")
    print("drift: sum over steps and sites of the Jaccard distance between the pairs a step would match and "
          "the pairs cached at its last checkpoint (every_step: 0); best, same K: the least drift any list with "
          "as many checkpoints reaches")

    outputs = Outputs()
    if args.json is not None:
        data = {
            "model": model,
            "weights": str(spec),
            "resolution": resolution,
            "latent_hw": [latent, latent],
            "step_base": args.step_base,
            "budget": budget,
            **analysis.to_dict(),
            "proposal": proposal.to_dict(),
            "comparison": [sc.to_dict() for sc in scores],
        }
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        written = outputs.save(args.json, lambda path: atomic_write_with(path, lambda tmp: tmp.write_text(text)),
                               "--json")
        if written is not None:
            print(f"wrote {written}")
    if args.plot is not None:
        from catome_export.analysis.plot import plot_consecutive

        written = outputs.save(args.plot, lambda path: plot_consecutive(analysis, path,
                                                                        checkpoints=proposal.loop_indices), "--plot")
        if written is not None:
            print(f"wrote {written}")
    outputs.finish()
    return 0
