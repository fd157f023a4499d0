"""The command line's one vocabulary: one spelling per concept across every command, and the old spellings.

:data:`CONCEPTS` is the table docs/cli.md shows (``markdown_table`` writes it;
a test checks that the doc and every parser agree with it). An old spelling
still parses for one release, into the same value as its new one, and prints
one line on stderr naming the new spelling (:func:`deprecate`). This module
imports nothing heavy: ``--help`` must stay fast.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

DEPRECATED_SINCE = "0.2.0"
"""The release that brings the one vocabulary; the old spellings still parse in it."""

REMOVAL_PLANNED = "0.3.0"
"""The release planned to drop the old spellings."""

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
"""Every value ``--precision`` takes in some command; each command takes the subset it can run."""

DEVICES = "auto, cpu, cuda or cuda:N"
"""The values ``--device`` takes in every command (parsed by catome_export.devices)."""


@dataclass(frozen=True)
class Concept:
    """One thing the user names on the command line, and how every command spells it."""

    name: str
    """What it is, as docs/cli.md's table names it."""
    flag: str
    """The one spelling (``--engine``); the only option string of the concept in any command."""
    dest: str
    """The attribute the parsed namespace holds it in, in every command."""
    default: str
    """Its default, in words."""
    commands: tuple[str, ...]
    """The commands that take it."""
    values: str
    """What it takes, in words."""
    old: tuple[str, ...] = ()
    """The spellings it replaces (still parsed for one release, with a note)."""
    others: tuple[str, ...] = ()
    """Spellings that would name it a second way: no command may offer them (nor ``old``) as visible flags."""
    related: tuple[str, ...] = ()
    """Flags of the same concept with a fixed prefix (``--min-resolution``): allowed besides ``flag``."""


CONCEPTS: tuple[Concept, ...] = (
    Concept("image size", "--resolution", "resolution",
            "the model's native size (tiny 256, SD 1.5 512, SD 2.1 768, SDXL 1024), or the engine's optimal profile",
            ("build", "verify", "generate", "eval", "bench", "analyze"),
            "pixels, multiples of 8: `N` (square) or `HxW` (height first) in verify, generate and eval; "
            "`N` in build and analyze; `N [N ...]` in bench; build also takes `--min-resolution` and "
            "`--max-resolution`",
            old=("--height", "--width"), others=("--size", "--image-size", "--res"),
            related=("--min-resolution", "--max-resolution")),
    Concept("precision", "--precision", "precision",
            "fp32 (build, bench, analyze); auto (generate, eval: fp16 on CUDA, fp32 on the CPU; engines keep "
            "their own)",
            ("build", "bench", "generate", "eval", "analyze"),
            "from auto, fp32, fp16, bf16: build and bench fp32/fp16; generate and eval auto/fp32/fp16; "
            "analyze fp32/fp16/bf16",
            old=("--dtype",), others=("--fp16", "--half", "--torch-dtype")),
    Concept("run backend", "--backend", "backend", "auto (TensorRT, then ONNX Runtime CUDA, then ONNX Runtime CPU)",
            ("verify", "generate", "eval", "bench", "serve"),
            "auto, trt, ort, ort-cuda, ort-cpu, torch: what runs an engine",
            old=("--engine-backend",), others=("--runtime-backend", "--provider", "--run-backend")),
    Concept("engine kind", "--engine-kind", "engine_kind", "auto (TensorRT where it runs, else ONNX Runtime)",
            ("build",), "auto, ort, trt: what a build makes (ONNX graphs only, or TensorRT plans too)",
            old=("--backend",), others=("--build-backend", "--engines")),
    Concept("device", "--device", "device", "auto (cuda when available, else cpu)",
            ("verify", "generate", "eval", "bench", "serve", "analyze"), DEVICES,
            others=("--gpu", "--cuda", "--cpu")),
    Concept("engine folder", "--engine", "engine",
            "none: verify, serve and refit need one; generate and eval run eager without; bench builds one for --model",
            ("verify", "generate", "eval", "bench", "serve", "refit"), "a folder written by catome-export build",
            old=("ENGINE_DIR",), others=("--engine-dir", "--engine-folder", "engine_dir")),
    Concept("seed", "--seed", "seed", "0", ("verify", "generate", "eval", "bench", "analyze"),
            "an int >= 0 (eval: image i uses seed + i)", others=("--random-seed", "--rng-seed")),
    Concept("output", "--out", "out", "per command: `engines/<name>` (build), `out/<prompt>-seed<seed>.png` "
            "(generate), `out/eval-<name>` (eval)", ("build", "generate", "eval"),
            "a folder (build, eval) or a .png file (generate); reports: `--json FILE`, `--plot FILE`",
            others=("--output", "-o", "--output-dir", "--out-dir")),
)


@dataclass(frozen=True)
class Deprecation:
    """An old spelling of one command, the one that replaces it, and how its value carries over."""

    command: str
    old: str
    new: str
    note: str = ""
    """How the value maps, where it is not the same text (shown in docs/cli.md)."""


DEPRECATIONS: tuple[Deprecation, ...] = (
    Deprecation("generate, eval", "--height H", "--resolution HxW", "a missing width is the height, as before"),
    Deprecation("generate, eval", "--width W", "--resolution HxW", "a missing height is the default, as before"),
    Deprecation("generate, eval, analyze", "--dtype", "--precision"),
    Deprecation("build", "--backend", "--engine-kind"),
    Deprecation("bench", "--engine-backend", "--backend"),
    Deprecation("verify, serve", "ENGINE_DIR (positional)", "--engine DIR"),
)


def note_deprecated(namespace: argparse.Namespace, old: str, new: str) -> None:
    """One line on stderr naming the new spelling, once per old spelling and parse."""
    seen: set[str] = namespace.__dict__.setdefault("_deprecated_seen", set())
    if old in seen:
        return
    seen.add(old)
    print(f"note: {old} is deprecated since {DEPRECATED_SINCE} and goes in {REMOVAL_PLANNED}: use {new}",
          file=sys.stderr)


class Deprecated(argparse.Action):
    """An old spelling: hidden from --help, stores into its new spelling's dest and notes the new spelling.

    ``merge(current, value)`` combines the value with what the dest holds (``--height`` sets one side of
    ``--resolution``); without it the value replaces it, as a repeated flag does.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str,
                 merge: Callable[[Any, Any], Any] | None = None, **kwargs: Any) -> None:
        kwargs["help"] = argparse.SUPPRESS
        kwargs.setdefault("default", argparse.SUPPRESS)  # the new spelling's default stands
        super().__init__(option_strings, dest, **kwargs)
        self.new = new
        self.merge = merge

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        note_deprecated(namespace, option_string or f"the positional {self.metavar or self.dest}", self.new)
        setattr(namespace, self.dest, values if self.merge is None else self.merge(getattr(namespace, self.dest,
                                                                                           None), values))


def deprecate(parser: argparse.ArgumentParser, old: str, new: str, *, use: str | None = None,
              merge: Callable[[Any, Any], Any] | None = None, **kwargs: Any) -> None:
    """Keep ``old`` (an option string, or a positional's metavar) parsing into ``new``'s dest, with the note.

    The type, choices and nargs are ``new``'s unless given; ``use``: how the note spells the new form (default
    ``new``); ``merge`` as in :class:`Deprecated`.
    """
    (target,) = [a for a in parser._actions if new in a.option_strings]
    for key in ("type", "choices", "nargs", "metavar"):
        kwargs.setdefault(key, getattr(target, key))
    if old.startswith("-"):
        parser.add_argument(old, dest=target.dest, action=Deprecated, new=use or new, merge=merge, **kwargs)
    else:  # a positional: its dest is its name, so it is named after the new dest
        kwargs.update(nargs="?", metavar=old)
        parser.add_argument(target.dest, action=Deprecated, new=use or new, merge=merge, **kwargs)


def engine_folder(args: argparse.Namespace, command: str) -> str:
    """The ``--engine`` folder of a command that needs one (or the old positional), or the error naming the flag."""
    from catome_export.errors import CatomeError

    if args.engine is None:
        raise CatomeError(f"{command} needs an engine folder: --engine DIR (a folder catome-export build wrote, "
                          "e.g. engines/tiny)")
    return str(args.engine)


def image_size(text: str) -> tuple[int, int]:
    """``--resolution``'s value where a command takes any shape: ``N`` (square) or ``HxW``, as (height, width)."""
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x", 1)
            return int(h), int(w)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be N or HxW in pixels, got {text!r}") from None


def set_side(index: int) -> Callable[[Any, int], tuple[int | None, int | None]]:
    """``merge`` of ``--height`` (0) / ``--width`` (1): that side of the (height, width) held so far.

    As before the vocabulary, ``--height`` alone gives a square and ``--width`` alone keeps the default height
    (None: the command's default).
    """

    def merge(current: Any, value: int) -> tuple[int | None, int | None]:
        if current is None:
            return (value, value) if index == 0 else (None, value)
        h, w = current
        return (value, w) if index == 0 else (h, value)

    return merge


def markdown_table() -> str:
    """The vocabulary as docs/cli.md shows it."""
    lines = ["| concept | spelling | default | commands | takes | old spellings |", "|---|---|---|---|---|---|"]
    for c in CONCEPTS:
        old = ", ".join(f"`{o}`" + ("" if o.startswith("-") else " (positional)") for o in c.old)
        lines.append(f"| {c.name} | `{c.flag}` | {c.default} | {', '.join(c.commands)} | {c.values} | {old or '-'} |")
    return "\n".join(lines) + "\n"


def deprecations_table() -> str:
    """The old spellings as docs/cli.md shows them."""
    lines = ["| command | old | new | since | removal planned | note |", "|---|---|---|---|---|---|"]
    for d in DEPRECATIONS:
        lines.append(f"| {d.command} | `{d.old}` | `{d.new}` | {DEPRECATED_SINCE} | {REMOVAL_PLANNED} | "
                     f"{d.note or '-'} |")
    return "\n".join(lines) + "\n"
