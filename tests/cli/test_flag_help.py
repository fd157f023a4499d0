"""Every flag of every subcommand teaches: it has help, and the help states its default; every concept is spelled
one way across the commands (catome_export.cli.vocab, docs/cli.md), and each old spelling still parses to the same
value with one note naming the new one."""

from __future__ import annotations

import argparse
import re

import pytest

from catome_export.cli.main import build_parser
from catome_export.cli.vocab import Deprecated

STATES_DEFAULT = re.compile(r"\bdefault\b|\(required\)", re.I)
SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._CountAction, argparse._HelpAction,
            argparse._VersionAction)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_flag_has_help_and_states_its_default():
    missing_help, missing_default = [], []
    commands = subcommands()
    assert {"build", "verify", "bench", "generate", "eval", "serve"} <= set(commands)
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, Deprecated)):  # old spellings: tested below
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            if not action.help:
                missing_help.append(f"{name} {flag}")
            elif action.option_strings and not isinstance(action, SWITCHES) and not action.required \
                    and not STATES_DEFAULT.search(action.help):
                missing_default.append(f"{name} {flag}")
    assert not missing_help, f"flags without help: {missing_help}"
    assert not missing_default, f"flags whose help states no default: {missing_default}"


# -- one vocabulary (catome_export.cli.vocab, docs/cli.md) ------------------------------------------------------------
def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, Deprecated))]


def _normal(name: str) -> str:
    """``--engine-backend`` -> ``engine_backend``, ``ENGINE_DIR`` -> ``engine_dir``: a spelling as a dest."""
    return name.lstrip("-").replace("-", "_").lower()


def test_every_concept_has_one_spelling_across_commands():
    from catome_export.cli.vocab import CONCEPTS

    flags = {c.flag for c in CONCEPTS}
    dests = {c.dest for c in CONCEPTS}
    problems = []
    for name, parser in subcommands().items():
        for action in _visible(parser):
            spelled = action.option_strings or [action.dest]
            for c in CONCEPTS:
                if action.dest == c.dest or c.flag in spelled:
                    if action.option_strings != [c.flag] or action.dest != c.dest:
                        problems.append(f"{name}: {c.name} spelled {spelled} (dest {action.dest}), not {c.flag}")
                    if name not in c.commands:
                        problems.append(f"{name} takes {c.flag}, which the table does not list for it")
                other = [s for s in c.old + c.others if s not in flags and _normal(s) not in dests]
                if any(s in spelled or _normal(s) == action.dest for s in other):
                    problems.append(f"{name}: {spelled} names {c.name} a second way: use {c.flag}")
                if any(s in spelled for s in c.related) and action.dest != _normal(next(s for s in c.related
                                                                                        if s in spelled)):
                    problems.append(f"{name}: {spelled} has dest {action.dest}")
            if not action.option_strings:
                problems.append(f"{name}: positional {action.dest}: every concept is a flag (--engine DIR)")
    assert not problems, problems


def test_the_table_lists_exactly_the_commands_that_take_each_concept():
    from catome_export.cli.vocab import CONCEPTS

    commands = subcommands()
    for c in CONCEPTS:
        taking = {name for name, parser in commands.items() if any(c.flag in a.option_strings
                                                                    for a in _visible(parser))}
        assert taking == set(c.commands), c.name


EXPECTED_DEFAULTS = {"resolution": None, "device": "auto", "backend": "auto", "engine_kind": "auto", "seed": 0,
                     "engine": None, "out": None}


def test_each_concept_has_one_default_and_one_set_of_values():
    from catome_export.backends.select import BACKEND_NAMES
    from catome_export.choices import BuildBackend
    from catome_export.cli.vocab import PRECISIONS

    for name, parser in subcommands().items():
        for action in _visible(parser):
            if action.dest in EXPECTED_DEFAULTS:
                assert action.default == EXPECTED_DEFAULTS[action.dest], (name, action.dest, action.default)
            if action.dest == "precision":
                assert set(action.choices) <= set(PRECISIONS), (name, action.choices)
            if action.dest == "backend" and action.choices is not None:
                assert tuple(action.choices) == BACKEND_NAMES, name
            if action.dest == "engine_kind":
                assert tuple(action.choices) == BuildBackend.values()


def test_docs_cli_md_shows_the_vocabulary_and_the_deprecations():
    from pathlib import Path

    from catome_export.cli.vocab import deprecations_table, markdown_table

    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    assert markdown_table() in text, "docs/cli.md: paste catome_export.cli.vocab.markdown_table()"
    assert deprecations_table() in text, "docs/cli.md: paste catome_export.cli.vocab.deprecations_table()"


# (command, old argv, new argv or the parsed value, the new spelling the note names)
OLD_SPELLINGS = [
    ("generate", ["--height", "64"], ["--resolution", "64"], "--resolution HxW"),
    ("generate", ["--height", "64", "--width", "96"], ["--resolution", "64x96"], "--resolution HxW"),
    ("generate", ["--width", "96", "--height", "64"], ["--resolution", "64x96"], "--resolution HxW"),
    ("generate", ["--width", "96"], (None, 96), "--resolution HxW"),  # the height stays the default, as before
    ("eval", ["--height", "128", "--width", "64"], ["--resolution", "128x64"], "--resolution HxW"),
    ("eval", ["--height", "64"], ["--resolution", "64"], "--resolution HxW"),
    ("generate", ["--dtype", "fp16"], ["--precision", "fp16"], "--precision"),
    ("eval", ["--dtype", "fp32"], ["--precision", "fp32"], "--precision"),
    ("analyze", ["--dtype", "bf16"], ["--precision", "bf16"], "--precision"),
    ("build", ["--backend", "trt"], ["--engine-kind", "trt"], "--engine-kind"),
    ("bench", ["--engine-backend", "ort-cpu"], ["--backend", "ort-cpu"], "--backend"),
    ("verify", ["engines/x"], ["--engine", "engines/x"], "--engine DIR"),
    ("serve", ["engines/x"], ["--engine", "engines/x"], "--engine DIR"),
]
REQUIRED = {"build": ["--model", "tiny"]}


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    return subcommands()[command].parse_args(REQUIRED.get(command, []) + argv)


def _values(ns: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(ns).items() if k != "_deprecated_seen"}


@pytest.mark.parametrize("command, old, new, spelling", OLD_SPELLINGS,
                         ids=[f"{c}{'='.join(o)}" for c, o, _, _ in OLD_SPELLINGS])
def test_an_old_spelling_parses_to_the_same_value_and_notes_the_new_one_once(command, old, new, spelling, capsys):
    from catome_export.cli.vocab import DEPRECATED_SINCE, REMOVAL_PLANNED

    parsed = _parse(command, old)
    noted = capsys.readouterr().err.splitlines()
    if isinstance(new, tuple):
        assert parsed.resolution == new
    else:
        assert _values(parsed) == _values(_parse(command, new))
        assert capsys.readouterr().err == ""  # the new spelling is quiet
    named = list(dict.fromkeys(a for a in old if a.startswith("-"))) or ["the positional ENGINE_DIR"]
    assert noted == [f"note: {name} is deprecated since {DEPRECATED_SINCE} and goes in {REMOVAL_PLANNED}: use {spelling}"
                     for name in named]
    if old[0].startswith("-"):
        assert _values(_parse(command, old + old)) == _values(parsed)
        assert len(capsys.readouterr().err.splitlines()) == len(named)  # given twice: still one note each


def test_every_old_spelling_is_tested_and_listed():
    from catome_export.cli.vocab import DEPRECATIONS

    tested = {(c, a if o[0].startswith("-") else "ENGINE_DIR") for c, o, _, _ in OLD_SPELLINGS for a in o
              if a.startswith("-") or not o[0].startswith("-")}
    listed = {(c.strip(), d.old.split()[0]) for d in DEPRECATIONS for c in d.command.split(",")}
    for name, parser in subcommands().items():
        for action in parser._actions:
            if isinstance(action, Deprecated):
                old = action.option_strings[0] if action.option_strings else str(action.metavar)
                assert (name, old) in tested, f"{name} {old}: add it to OLD_SPELLINGS"
                assert (name, old) in listed, f"{name} {old}: add it to vocab.DEPRECATIONS (docs/cli.md)"


def test_an_old_spelling_runs_the_command(tmp_path, capsys):
    from catome_export.cli.main import main

    assert main(["verify", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("note: the positional ENGINE_DIR is deprecated") and err[0].endswith("--engine DIR")
    assert err[-1].startswith("error: ") and "does not exist" in err[-1]


def test_a_command_that_needs_an_engine_folder_says_which_flag(capsys):
    from catome_export.cli.main import main

    for command in ("verify", "serve"):
        assert main([command]) == 1
        assert capsys.readouterr().err == (f"error: {command} needs an engine folder: --engine DIR (a folder "
                                           "catome-export build wrote, e.g. engines/tiny)\n")
