"""``section.key=value`` config overrides anywhere on a `llavaseg` command line, split from what argparse parses."""

from __future__ import annotations

import argparse
import re

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)+=")


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings (of the parser and every subcommand) that take a value, so `--query a.b=c` stays a value."""
    options: set[str] = set()
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                options |= _value_options(subparser)
        elif action.option_strings and action.nargs != 0:
            options.update(action.option_strings)
    return options


def split_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(the arguments for argparse, the overrides), each in the order given; an option's value is never an override."""
    takes_value = _value_options(parser)
    rest, overrides = [], []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in takes_value and index + 1 < len(argv):
            rest += argv[index:index + 2]
            index += 2
            continue
        (overrides if OVERRIDE.match(token) else rest).append(token)
        index += 1
    return rest, overrides
