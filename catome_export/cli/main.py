"""``catome-export``: a thin command line over the Python API.

Each command lives in its own module ``catome_export.cli.cmd_<name>`` with a
``register(subparsers)`` function. Any :class:`CatomeError` becomes one line
on stderr and exit code 1; Ctrl-C exits 130 without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from catome_export._version import __version__
from catome_export.cli.rebuild import error_line
from catome_export.errors import CatomeError

COMMANDS = ("build", "refit", "verify", "bench", "generate", "analyze", "eval", "serve", "doctor")
"""Subcommands in --help order; a module that does not exist yet is left out."""

DESCRIPTION = """\
Make a Stable Diffusion U-Net faster with Cached Adaptive Token Merging
(CA-ToMe): export it to staged dynamic-shape ONNX graphs, build TensorRT or
ONNX Runtime engines, and drive them from a Python controller.

typical use:
  catome-export doctor                        what is installed and usable here
  catome-export build --model tiny            export + verify the bundled tiny model
  catome-export build --model sd15            SD 1.5 from the hub (or --weights random)
  catome-export verify --engine engines/tiny  engine vs eager CA-ToMe, step by step
  catome-export refit --engine engines/tiny --lora style.safetensors:0.8   swap the LoRA, no re-export
  catome-export serve --engine engines/tiny   HTTP images API on Ray Serve
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catome-export", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"catome-export {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"catome_export.cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"catome_export.cli.cmd_{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports the command modules (torch among them): Ctrl-C may land here
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("interrupted: nothing was started", file=sys.stderr)
        return 130
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore")
        for noisy in ("diffusers", "transformers", "torch.onnx", "onnxscript", "torch._dynamo", "torch.export"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CatomeError as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing already built was changed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
