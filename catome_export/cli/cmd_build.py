"""``catome-export build``: export a U-Net to staged ONNX graphs (+ TensorRT engines), audit and verify them."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from catome_export.choices import BuildBackend, Exporter, Precision
from catome_export.cli.vocab import deprecate
from catome_export.defaults import (
    DEFAULT_R_MULTIPLE, DEFAULT_SCHEDULE, DEFAULT_STEP_BASE, DEFAULT_THRESHOLD, DEFAULT_VERIFY_STEPS,
)

WEIGHTS_HELP = ("pretrained (default for sd15/sd21/sdxl and folders: the hub, its cache or the folder), random "
                "(seeded; the only choice for tiny and tiny-xl without a file), or a single-file checkpoint "
                "(.safetensors/.ckpt, original or diffusers layout) of --model's architecture, e.g. --model sd15 "
                "--weights model.safetensors")
"""--weights help, shared by the commands that load a U-Net."""

if TYPE_CHECKING:  # the build pulls in torch; --help must not
    from catome_export.engine.options import BuildOptions
    from catome_export.export.build import BuildResult

DESCRIPTION = """\
Cut the U-Net at its merge sites into stages, export each stage as a
dynamic-shape ONNX graph, check the graphs (ONNX checker, ONNX Runtime,
TensorRT operator audit), build TensorRT engines where TensorRT runs, write
engines/<name>/manifest.json last, and verify the engine against eager
CA-ToMe. The folder is replaced only by a finished, verified build.

examples:
  catome-export build --model tiny                      quick start (about a minute on a CPU)
  catome-export build --model sd15 --weights random     SD 1.5 layout, seeded weights (offline)
  catome-export build --model sd15 --min-resolution 512 --max-resolution 768 --max-batch 4
  catome-export build --model ./my-sd-folder --precision fp16 --engine-kind trt
  catome-export build --model sd15 --weights ./dreamshaper_8.safetensors
                                    a single-file (A1111/Civitai) checkpoint, offline; engine named after the file
  catome-export build --model sd15 --weights random --feature-cache 3,0
                                    + DeepCache-style feature caching (interval 3, branch 0) with CA-ToMe
  catome-export build --model sd15 --lora style.safetensors:0.8
                                    + a diffusers LoRA fused into the U-Net (swap it later: catome-export refit)
"""


def options_from_args(args: argparse.Namespace) -> "BuildOptions":
    """The build's options from the parsed flags: the one place the command line becomes a :class:`BuildOptions`."""
    from catome_export.engine.options import BuildOptions
    from catome_export.merging import MergeSettings, parse_schedule

    level = args.max_downsample
    if level is None:  # the model's own merge level (SD 1.x/2.x: 1, SDXL: 2)
        from catome_export.models import model_info

        level = model_info(args.model).max_downsample
    from catome_export.cli.cmd_generate import r_multiple_arg

    q = r_multiple_arg(args)
    settings = MergeSettings(threshold=args.threshold, schedule=parse_schedule(DEFAULT_SCHEDULE, args.step_base),
                             max_downsample=level, r_multiple=DEFAULT_R_MULTIPLE if q is None else q)
    return BuildOptions.create(
        args.model, weights=args.weights, precision=args.precision, backend=args.engine_kind,
        resolution=args.resolution, min_resolution=args.min_resolution, max_resolution=args.max_resolution,
        batch=args.batch, min_batch=args.min_batch, max_batch=args.max_batch, settings=settings,
        schedule=args.schedule, name=args.name, out_dir=args.out, verify=not args.no_verify,
        verify_steps=args.verify_steps, exporter=args.exporter, opt_merge_fraction=args.opt_merge_fraction,
        force=args.force, ort_optimize=args.ort_optimize == "on", max_stage_gb=args.max_stage_gb,
        feature_cache=args.feature_cache, cache_branches=_branches(args.cache_branches),
        lora=tuple(args.lora or ()), refittable=args.refittable,
        controlnet=args.controlnet,
    )


def _branches(text: str | None) -> tuple[int, ...]:
    from catome_export.errors import CatomeError

    if not text:
        return ()
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise CatomeError(f"--cache-branches takes branch ids like 0,1,3, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from catome_export.workflows.build import run_build

    opts = options_from_args(args)
    log = logging.getLogger("catome_export.build")
    result = run_build(opts, progress=log.info)
    print(summary(result))
    return 0


def summary(result: "BuildResult") -> str:
    """The short report printed after a build."""
    m = result.manifest
    lines = [f"engine: {result.engine_dir} ({m.model.id}, {m.precision}, {len(m.stages)} stages, "
             f"{len(m.sites)} merge sites, engines: {result.backend}, {result.seconds:.0f} s)"]
    total = 0
    for stage in m.stages:
        size = stage.total_bytes
        extra = f" + {stage.engine.file}" if stage.engine is not None else ""
        if stage.ort_optimized is not None:
            size += stage.ort_optimized.total_bytes
            extra += f" + {stage.ort_optimized.file}"
        total += size
        lines.append(f"  {stage.file}{extra}: {size / 1e6:.1f} MB")
    lines.append(f"  total {total / 1e6:.1f} MB")
    if m.lora is not None and m.lora.active:
        lines.append(f"LoRA fused: {m.lora.describe()}")
    lines.append(result.audit.summary())
    if result.quick_check:
        lines.append(f"ONNX Runtime vs torch per stage: max |diff| {max(result.quick_check.values()):.1e}")
    if result.verify is not None:
        lines.append(result.verify.summary())
    for note in result.notes:
        lines.append(f"note: {note}")
    lines.append(f"load it with: Runtime.load({str(result.engine_dir)!r}) or catome-export verify --engine {result.engine_dir}")
    return "\n".join(lines)


def _resolution(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="export + audit + verify an engine folder (staged ONNX, TensorRT where present)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="tiny, tiny-xl, sd15, sd21, sdxl, a local diffusers folder (pipeline or U-Net), or a "
                        "single-file checkpoint (.safetensors/.ckpt; its architecture is detected) (required)")
    p.add_argument("--weights", default=None, metavar="pretrained|random|FILE",
                   help=WEIGHTS_HELP)
    p.add_argument("--precision", choices=Precision.values(), default=str(Precision.FP32), help="fp32 or fp16 graphs (fp16 engines run on a GPU; default fp32)")
    p.add_argument("--engine-kind", choices=BuildBackend.values(), default=str(BuildBackend.AUTO),
                   help="engines to build: auto = TensorRT where it runs, else ONNX Runtime (default); ort = ONNX "
                        "graphs only; trt = TensorRT plans too")
    deprecate(p, "--backend", "--engine-kind")
    p.add_argument("--resolution", type=_resolution, default=None, metavar="N",
                   help="image side in pixels, a multiple of 8 (default: the model's, tiny 256, sd15 512)")
    p.add_argument("--min-resolution", type=_resolution, default=None, metavar="N", help="smallest image side the engine takes, pixels (default: --resolution, or the model's)")
    p.add_argument("--max-resolution", type=_resolution, default=None, metavar="N", help="largest image side the engine takes, pixels (default: --resolution, or the model's)")
    p.add_argument("--batch", type=int, default=None, metavar="N", help="one batch size (default: range 1..2)")
    p.add_argument("--min-batch", type=int, default=None, metavar="N", help="smallest U-Net batch the engine takes (default 1)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N", help="largest U-Net batch the engine takes (default 2: one image with CFG)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"CA-ToMe similarity threshold t (default {DEFAULT_THRESHOLD})")
    p.add_argument("--schedule", default=None,
                   help="checkpoint schedule: config1..config4, adaptive, config_five, every_step, a list like "
                        f"0,10,20, or auto:K (calibrated on the model) (default {DEFAULT_SCHEDULE})")
    p.add_argument("--step-base", type=int, choices=(0, 1), default=DEFAULT_STEP_BASE,
                   help="step number of the first loop index: 1 as the authors' code ran (default), 0 as the paper")
    from catome_export.cli.cmd_generate import add_r_multiple_option

    add_r_multiple_option(p, engine_default=False)
    p.add_argument("--max-downsample", type=int, choices=(1, 2, 4, 8), default=None,
                   help="merge level: the transformer blocks at downsample <= this become merge sites (default: the "
                        "model's own, 1 for SD 1.x/2.x, 2 for SDXL)")
    p.add_argument("--opt-merge-fraction", type=float, default=None, metavar="F",
                   help="TensorRT profiles: share of src tokens you expect merged, the shape TensorRT tunes for "
                        "(default 0.5; measure it with catome_export.export.profiles.calibrate_opt_fraction)")
    p.add_argument("--ort-optimize", choices=("on", "off"), default="on",
                   help="ONNX Runtime builds: also write each stage with ONNX Runtime's own transformer fusions "
                        "(stage_<k>.ort.onnx: fused attention, layer norm, Gelu), which the ONNX Runtime backend "
                        "loads; the standard graphs stay as TensorRT needs them (default on)")
    p.add_argument("--max-stage-gb", type=float, default=None, metavar="GB",
                   help="cut a stage whose weights exceed GB into pieces that are exported, checked and built one "
                        "at a time (default 4: SD 1.x/2.x stay one stage per merge site, SDXL's 9.6 GB middle "
                        "becomes 3 pieces, and its fp32 build peaked at 20.8 GiB on a 2-core CPU; a lower value "
                        "holds less at once)")
    p.add_argument("--feature-cache", "--deepcache", default=None, metavar="I,b",
                   help="DeepCache-style feature caching the engine runs by default: every I-th call runs the whole "
                        "U-Net, the calls between run only the shallow branch b (cache_interval, cache_branch_id of "
                        "DeepCacheSDHelper; 0 = shallowest, most saved) on the deep features of the last full call; "
                        "'I' alone means branch 0, 'full:0,5,9;b' lists the full calls (default off)")
    p.add_argument("--cache-branches", default=None, metavar="B,B",
                   help="more feature-cache branches to cut the stages for, so a runtime can switch to them without "
                        "a rebuild (default: only --feature-cache's branch)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="fuse a diffusers-format LoRA (.safetensors, as pipe.save_lora_weights writes it) into the "
                        "U-Net before export, with SCALE as fuse_lora(lora_scale=...) (default 1); repeat for more, "
                        "fused in order; swap later without a rebuild with catome-export refit (default none)")
    p.add_argument("--refittable", action="store_true",
                   help="TensorRT builds: plans whose weights catome-export refit can replace (BuilderFlag.REFIT, "
                        "and STRIP_PLAN where TensorRT has it); ONNX Runtime engines are always refittable "
                        "(default off)")
    p.add_argument("--controlnet", action="store_true",
                   help="take ControlNet's residuals as engine inputs, so runtime.unet serves "
                        "StableDiffusionControlNetPipeline / StableDiffusionXLControlNetPipeline (the ControlNet runs "
                        "eagerly; docs/controlnet.md); default: off, the engine refuses them")
    p.add_argument("--name", default=None, help="engine name (default: the model name)")
    p.add_argument("--out", default=None, metavar="DIR", help="engine folder (default engines/<name>)")
    p.add_argument("--force", action="store_true",
                   help="when rebuilding, remove files in the engine folder that no build made (without it the build "
                        "refuses and names them)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime checks and the eager comparison")
    p.add_argument("--verify-steps", type=int, default=DEFAULT_VERIFY_STEPS, metavar="N",
                   help=f"steps of the eager comparison (default {DEFAULT_VERIFY_STEPS})")
    p.add_argument("--exporter", choices=Exporter.values(), default=str(Exporter.TORCHSCRIPT),
                   help="torch.onnx exporter (torchscript: fast and checked; dynamo: slower) (default torchscript)")
    p.set_defaults(func=run)

