"""``catome-export verify --engine DIR``: the engine against eager CA-ToMe, step by step.

Exit 1 above tolerance, when merging differs, or when a plan differs from eager's own beyond a near-tie.
"""

from __future__ import annotations

import argparse
from typing import Any

from catome_export.backends.select import BACKEND_NAMES
from catome_export.cli.vocab import deprecate, engine_folder, image_size
from catome_export.fsutil import Outputs, check_writable_file


def run(args: argparse.Namespace) -> int:
    from catome_export.errors import CatomeError

    engine_folder(args, "verify")  # before anything runs
    for flag, value, minimum in (("--threads", args.threads, 1), ("--seed", args.seed, 0)):
        if value is not None and value < minimum:
            raise CatomeError(f"{flag} must be an int >= {minimum}, got {value}")
    if args.json is not None:
        check_writable_file(args.json, "--json")

    from catome_export.cli.cmd_generate import feature_cache_arg

    from catome_export.cli.cmd_generate import r_multiple_arg

    cache = feature_cache_arg(args, engine=True)
    q = r_multiple_arg(args)
    from catome_export.progress import Progress
    from catome_export.workflows.build import verify_note

    bar = Progress(args.steps, "verify")
    with bar:
        report = _verify(args, cache, lambda row: bar.update(note=verify_note(row)), q)
    if not args.quiet:
        print(report.format_table())
        differences = report.format_differences()
        if differences:
            print("plan differences from eager's own matching (engine's block input vs eager's):")
            print(differences)
    print(report.summary())
    if args.json:
        from catome_export.runtime.verify import write_report_json

        outputs = Outputs()
        written = outputs.save(args.json, lambda path: write_report_json(report, path), "--json")
        if written is not None:
            print(f"report written to {written}")
        outputs.finish()
    return 0 if report.ok else 1


def _verify(args: argparse.Namespace, cache: Any, progress: Any, r_multiple: int | None = None) -> Any:
    from catome_export.runtime.verify import verify_engine

    return verify_engine(engine_folder(args, "verify"), steps=args.steps, schedule=args.schedule, backend=args.backend,
                         seed=args.seed, batch=args.batch, resolution=args.resolution, tolerance=args.tolerance,
                         merge_tolerance=args.merge_tolerance, feature_cache=cache, progress=progress,
                         device=None if args.device == "auto" else args.device, r_multiple=r_multiple,
                         backend_options={"intra_op_threads": args.threads} if args.threads is not None else None)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="compare an engine with eager CA-ToMe step by step (exit 1 above tolerance)",
        description="Run the engine and eager CA-ToMe (same weights, same merge settings) side by side over a "
                    "denoising schedule on seeded smooth latents, feeding both the same latents at every step. "
                    "Eager runs on the engine's merge plans, so the noise predictions are compared on the same "
                    "plans; separately, where a site matches, eager's own plan (from its own block input) is "
                    "compared with the engine's token by token, and a difference is accepted only where it is "
                    "a provable near-tie (two scores within their possible float error). Prints per step the max "
                    "abs difference, the tokens merged per site and the near-tie flips, then a summary with the "
                    "median latency of both. Exit 1 when a step is above the tolerance, matches at other steps "
                    "than eager, or has a plan difference no near-tie explains.",
    )
    p.add_argument("--engine", default=None, metavar="DIR", help="engine folder written by catome-export build (required)")
    deprecate(p, "ENGINE_DIR", "--engine", use="--engine DIR")
    p.add_argument("--steps", type=int, default=50, help="U-Net calls to compare (default 50)")
    p.add_argument("--schedule", default=None,
                   help="checkpoint schedule to use instead of the engine's: a name (config1..4, adaptive, "
                        "config_five, every_step) or a list like 0,10,20 (default: the engine's own)")
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES, help="engine backend (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents and text embeddings (default 0)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the build's opt batch)")
    p.add_argument("--resolution", type=image_size, default=None, metavar="N|HxW",
                   help="image size in pixels, N or HxW (default: the build's opt size)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="limit of max|diff| as a multiple of max(1, max|eager output|) "
                        "(default 1e-4 for fp32 engines, 2e-2 for fp16)")
    p.add_argument("--merge-tolerance", type=float, default=None, metavar="F",
                   help="allowed difference of the merged count r per site from eager's own matching, as a "
                        "fraction of its tokens, besides what near-ties explain (default 0 for fp32 engines, "
                        "0.01 for fp16)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N] (default auto)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: physical cores)")
    from catome_export.cli.cmd_generate import add_feature_cache_option, add_r_multiple_option

    add_feature_cache_option(p, engine_default=True)
    add_r_multiple_option(p, engine_default=True)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON (default: none)")
    p.add_argument("-q", "--quiet", action="store_true", help="print the summary only, not the per-step table")
    p.set_defaults(func=run)
