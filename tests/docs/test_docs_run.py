"""The documentation runs: every Python block of README.md and docs/*.md, every file in examples/, and every
``catome-export`` command line of their shell blocks.

- Python blocks: a block fenced ```python runs; the blocks of one file run in order, in one namespace, in a
  fresh folder that holds ``engines/tiny`` (the tiny model's engine, as ``catome-export build --model tiny``
  makes it, but built once here at 128 px without its check so that these tests stay short) and where ``pipe``
  is the bundled tiny ``StableDiffusionPipeline`` (seeded random weights: the docs' "any diffusers pipeline"),
  whose calls default to 3 steps at 128 x 128. A block that needs what cannot run here (a GPU, TensorRT, the
  Hugging Face hub, SD 1.5's weights, a running server) is fenced ```python no-run and says why in a comment
  ``# no-run: ...``; it must still compile. Any other fence that names Python is refused, so no block escapes.
- Every block, run or not, and every example uses the public API only: ``catome_export``'s exports.
- Examples run as scripts (``__main__``) with small arguments, against the tiny model.
- Shell blocks: every ``catome-export ...`` command parses with the real argument parser, so a renamed or
  removed flag fails here.
"""

from __future__ import annotations

import ast
import argparse
import contextlib
import io
import re
import runpy
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
RUN, NO_RUN = "python", "python no-run"
PYTHON_NAMES = re.compile(r"^(python\d?|py|pycon|ipython)\b", re.I)
SHELL = {"bash", "sh", "shell", "console"}

EXAMPLE_ARGS = {"embed_pipeline.py": ["--model", "{tiny_pipeline}", "--engine", "{engine}", "--steps", "3",
                                     "--size", "128"]}
"""Small arguments per example (a new example must be listed, with what keeps it short): ``{tiny_pipeline}`` is a
folder holding the tiny pipeline as ``save_pretrained`` writes it, ``{engine}`` the docs' tiny engine (built from
that model at 128 px: an example's own build would be one more build, and docs/export.md runs one)."""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    """Line of the opening fence (1-based)."""
    info: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order (fences of three backticks at the start of a line)."""
    blocks: list[Block] = []
    opened: tuple[int, str] | None = None
    lines: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if opened is None:
            if line.startswith("```"):
                opened, lines = (number, line[3:].strip()), []
        elif line.strip() == "```":
            blocks.append(Block(path, opened[0], opened[1], "\n".join(lines) + "\n"))
            opened = None
        else:
            lines.append(line)
    assert opened is None, f"{path.relative_to(REPO)}:{opened[0]}: a fence is never closed"
    return blocks


def python_blocks(path: Path) -> list[Block]:
    return [b for b in fenced_blocks(path) if PYTHON_NAMES.match(b.info)]


def public_names() -> set[str]:
    import catome_export

    return set(catome_export.__all__)


def private_uses(code: str, filename: str) -> list[str]:
    """Where ``code`` reaches past the public API: a ``catome_export.<module>`` import, a name imported from
    ``catome_export`` that is not exported, or an attribute of ``catome_export`` that is not."""
    public = public_names()
    found = []
    for node in ast.walk(ast.parse(code, filename)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("catome_export.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "catome_export":
            if node.module != "catome_export":
                found.append(f"from {node.module} import ...")
            else:
                found += [f"catome_export.{a.name}" for a in node.names if a.name not in public]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "catome_export" and node.attr not in public:
            found.append(f"catome_export.{node.attr}")
    return found


# Fast checks: every fence is known, every no-run block compiles and says why, only the public API.

def test_python_fences_say_whether_they_run_and_no_run_blocks_compile_and_say_why():
    problems = []
    for path in DOCS:
        for block in python_blocks(path):
            if block.info not in (RUN, NO_RUN):
                problems.append(f"{block.where}: fence ```{block.info}: use ```{RUN} or ```{NO_RUN}")
                continue
            try:
                compile(block.code, block.where, "exec")
            except SyntaxError as exc:
                problems.append(f"{block.where}: does not compile: {exc}")
            if block.info == NO_RUN and not re.search(r"^\s*# no-run: \S", block.code, re.M):
                problems.append(f"{block.where}: a no-run block must say why in a '# no-run: ...' comment")
    assert not problems, "\n".join(problems)


def test_the_docs_hold_runnable_python():
    """The harness finds blocks: a parser that found none would let every docs test pass without running."""
    runnable = {b.path.name for path in DOCS for b in python_blocks(path) if b.info == RUN}
    assert {"README.md", "api.md", "eager.md", "export.md", "runtime.md", "embedding.md", "feature-cache.md",
            "serving.md"} <= runnable


@pytest.mark.parametrize("path", [*DOCS, *EXAMPLES], ids=lambda p: str(p.relative_to(REPO)))
def test_docs_and_examples_use_only_the_public_api(path):
    if path.suffix == ".py":
        sources = [(str(path.relative_to(REPO)), path.read_text())]
    else:
        sources = [(b.where, b.code) for b in python_blocks(path)]
    problems = [f"{where}: {use}" for where, code in sources for use in private_uses(code, where)]
    assert not problems, "reaches past catome_export's exports (__all__):\n" + "\n".join(problems)


def test_the_public_api_check_catches_internal_imports():
    assert private_uses("from catome_export.runtime import Runtime\n", "x") == ["from catome_export.runtime import ..."]
    assert private_uses("import catome_export.models\n", "x") == ["catome_export.models"]
    assert private_uses("from catome_export import load_unet, Runtime\n", "x") == ["catome_export.load_unet"]
    assert private_uses("import catome_export\ncatome_export.match_tokens\n", "x") == ["catome_export.match_tokens"]
    assert private_uses("from catome_export import Runtime, build_engine\n", "x") == []


# Shell blocks: every catome-export command parses with the real parser.

def cli_commands(block: Block) -> list[list[str]]:
    """The ``catome-export`` commands of a shell block, as argument lists (continuations joined, comments and
    a leading ``$ `` dropped, ``&&``, ``||``, ``;`` and ``|`` split)."""
    text = re.sub(r"\\\n", " ", block.code)
    commands = []
    for line in text.splitlines():
        line = line.strip().removeprefix("$ ")
        if "catome-export" not in line:
            continue
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";", "|"):
                if command and command[0] == "catome-export":
                    commands.append(command[1:])
                command = []
            else:
                command.append(word)
    return commands


def shell_blocks() -> list[Block]:
    return [b for path in DOCS for b in fenced_blocks(path) if b.info in SHELL]


class _ParseError(Exception):
    pass


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``; argparse's usage error (it prints and exits) becomes a :class:`_ParseError`."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        raise _ParseError(lines[-1] if lines else f"exit while parsing {argv}") from None


def test_every_catome_export_command_in_the_docs_parses():
    from catome_export.cli.main import build_parser

    parser = build_parser()
    commands = [(b.where, argv) for b in shell_blocks() for argv in cli_commands(b)]
    readme = [argv for where, argv in commands if where.startswith("README.md")]
    assert ["build", "--model", "tiny"] in readme, "the README's quick start lost its build command"
    problems = []
    for where, argv in commands:
        if "--help" in argv or "-h" in argv:
            problems.append(f"{where}: catome-export {' '.join(argv)}: a documented command must not need --help")
            continue
        try:
            args = _parse(parser, argv)
        except _ParseError as exc:
            problems.append(f"{where}: catome-export {' '.join(argv)}: {exc}")
            continue
        if args.command is None:
            problems.append(f"{where}: catome-export {' '.join(argv)}: no command")
        old = sorted(getattr(args, "_deprecated_seen", ()))
        if old and not where.startswith("docs/cli.md"):
            problems.append(f"{where}: catome-export {' '.join(argv)}: deprecated spelling {', '.join(old)} "
                            "(docs/cli.md names the current one)")
    assert not problems, "\n".join(problems)


def test_the_command_check_fails_on_a_renamed_flag():
    from catome_export.cli.main import build_parser

    parser = build_parser()
    assert _parse(parser, ["build", "--model", "tiny"]).command == "build"
    assert getattr(_parse(parser, ["generate", "--model", "tiny", "--dtype", "fp32"]), "_deprecated_seen") == {"--dtype"}
    with pytest.raises(_ParseError, match="unrecognized arguments: --resoluton"):
        _parse(parser, ["build", "--model", "tiny", "--resoluton", "64"])
    block = Block(REPO / "README.md", 1, "bash", 'pip install -e ".[ort]" && catome-export build --model tiny  # x\n'
                                                 "catome-export bench \\\n  --model tiny | tee out.txt\n")
    assert cli_commands(block) == [["build", "--model", "tiny"], ["bench", "--model", "tiny"]]


# Running them (slow: one engine build, a few short generations).

@pytest.fixture(scope="module")
def docs_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime", reason="the engine blocks need ONNX Runtime (pip install 'catome-export[ort]')")
    from catome_export import build_engine

    out = tmp_path_factory.mktemp("docs-engines") / "tiny"
    build_engine("tiny", out_dir=out, resolution=128, verify=False, ort_optimize=False)
    return out


def quick_tiny_pipeline() -> Any:
    """The tiny pipeline, whose calls default to 3 steps at 128 x 128 (a block's own arguments win)."""
    pytest.importorskip("transformers", reason="the tiny pipeline's text encoder needs transformers")
    from catome_export.models.pipeline import tiny_pipeline

    pipe = tiny_pipeline("pndm")

    class QuickPipeline(type(pipe)):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("num_inference_steps", 3)
            kwargs.setdefault("height", 128)
            kwargs.setdefault("width", 128)
            return super().__call__(*args, **kwargs)

    pipe.__class__ = QuickPipeline
    return pipe


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test workers share the cores
    try:
        yield
    finally:
        torch.set_num_threads(threads)


RUNNABLE_DOCS = [p for p in DOCS if any(b.info == RUN for b in python_blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_python_blocks_run(path, docs_engine, tmp_path, monkeypatch):
    shutil.copytree(docs_engine, tmp_path / "engines" / "tiny")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {"__name__": "__docs__", "pipe": quick_tiny_pipeline()}
    with one_thread():
        for block in python_blocks(path):
            if block.info != RUN:
                continue
            try:
                exec(compile(block.code, block.where, "exec"), scope)
            except Exception as exc:
                raise AssertionError(f"{block.where} failed: {type(exc).__name__}: {exc}") from exc


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_run(path, docs_engine, tmp_path, monkeypatch, capsys):
    assert path.name in EXAMPLE_ARGS, f"give {path.name} its small arguments in EXAMPLE_ARGS"
    pytest.importorskip("transformers", reason="the tiny pipeline's text encoder needs transformers")
    from catome_export.models.pipeline import tiny_pipeline

    folder = tmp_path / "tiny-pipeline"
    tiny_pipeline("pndm").save_pretrained(folder)  # the tiny model as a user's local pipeline folder
    monkeypatch.chdir(tmp_path)
    argv = [arg.replace("{tiny_pipeline}", str(folder)).replace("{engine}", str(docs_engine))
            for arg in EXAMPLE_ARGS[path.name]]
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    with one_thread():
        runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip(), f"{path.name} printed nothing"
