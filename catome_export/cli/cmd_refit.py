"""``catome-export refit --engine DIR --lora FILE[:SCALE]``: swap the LoRA of a built engine without a re-export."""

from __future__ import annotations

import argparse
import logging

DESCRIPTION = """\
Replace the LoRA an engine computes, in place: the weights the LoRA changes are
computed in torch from the engine's base weights and written beside the graphs
(ONNX Runtime builds its sessions from the same graphs with them); TensorRT
plans built with --refittable are refit. No export, no trace. The folder
changes atomically (the manifest last): a failed refit leaves it as it was.

examples:
  catome-export refit --engine engines/sd15 --lora style.safetensors:0.8
  catome-export refit --engine engines/sd15 --lora a.safetensors --lora b.safetensors:0.5
  catome-export refit --engine engines/sd15 --none             back to the base weights, bit for bit
"""


def run(args: argparse.Namespace) -> int:
    from catome_export.cli.vocab import engine_folder
    from catome_export.errors import CatomeError

    folder = engine_folder(args, "refit")
    if args.none and args.lora:
        raise CatomeError("give --lora FILE[:SCALE] or --none, not both")
    if not args.none and not args.lora:
        raise CatomeError("give --lora FILE[:SCALE] (repeatable) or --none (back to the base weights)")
    import time

    from catome_export.lora.refit import refit_engine

    start = time.perf_counter()
    manifest = refit_engine(folder, None if args.none else list(args.lora),
                            progress=logging.getLogger("catome_export.refit").info)
    lora = manifest.lora.describe() if manifest.lora is not None else "none"
    print(f"engine: {folder} now computes LoRA {lora} ({time.perf_counter() - start:.1f} s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refit", help="swap the LoRA of a built engine without a re-export",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default=None, metavar="DIR", help="engine folder written by catome-export build (required)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="diffusers-format LoRA to fuse, SCALE as fuse_lora(lora_scale=...) (default 1); repeat for "
                        "more, fused in order (default: none given)")
    p.add_argument("--none", action="store_true", help="back to the engine's base weights (default off)")
    p.set_defaults(func=run)
