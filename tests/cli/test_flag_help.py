"""Every flag of every subcommand teaches: it has help, and the help states its default."""

from __future__ import annotations

import argparse
import re

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
            if isinstance(action, (argparse._HelpAction, Deprecated)):  # old spellings: test_vocabulary.py
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            if not action.help:
                missing_help.append(f"{name} {flag}")
            elif action.option_strings and not isinstance(action, SWITCHES) and not action.required \
                    and not STATES_DEFAULT.search(action.help):
                missing_default.append(f"{name} {flag}")
    assert not missing_help, f"flags without help: {missing_help}"
    assert not missing_default, f"flags whose help states no default: {missing_default}"
