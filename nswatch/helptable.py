"""The README's table of every command's flags and defaults, read off the argument parser.

``python -m nswatch.helptable`` prints it. Setting flags point at their row in
the settings table (:mod:`nswatch.settings`); the other flags carry their
default at the end of their help, ``(default …)``, as ``--help`` shows it.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from nswatch import settings

__all__ = ["Flag", "flags", "helptable", "subcommands"]

_DEFAULT = re.compile(r"^(?P<meaning>.*?)\s*\(default (?P<default>.*)\)$", re.S)


@dataclass(frozen=True)
class Flag:
    """One flag (or positional argument) of one or more commands."""

    usage: str
    commands: tuple[str, ...]
    default: str
    meaning: str


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each subcommand, by name, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _usage(action: argparse.Action) -> str:
    if not action.option_strings:
        name = str(action.metavar or action.dest).upper()
        return f"[{name}]" if action.nargs == "?" else name
    flag = action.option_strings[-1]
    if action.nargs == 0:
        return flag
    if action.choices is not None:
        return f"{flag} {{{','.join(str(c) for c in action.choices)}}}"
    return f"{flag} {action.metavar or action.dest.upper()}"


def _describe(action: argparse.Action) -> tuple[str, str]:
    """(default, meaning) as the README writes them."""
    if action.dest in dict(settings.declared()):
        return settings.default_text(action.dest), f"setting `{action.dest}`"
    text = " ".join((action.help or "").split()).replace("%%", "%")
    m = _DEFAULT.match(text)
    if m is not None:
        return m["default"], m["meaning"]
    if action.nargs == 0:
        return "off", text
    raise ValueError(f"{_usage(action)}: its help does not say its default")


def flags(parser: argparse.ArgumentParser) -> list[Flag]:
    """Every flag of every subcommand (help aside); one row for a flag several commands share."""
    rows: dict[tuple[str, str, str], list[str]] = {}
    for command, sub in subcommands(parser).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            default, meaning = _describe(action)
            rows.setdefault((_usage(action), default, meaning), []).append(command)
    return [Flag(u, tuple(c), d, m) for (u, d, m), c in rows.items()]


def helptable(parser: argparse.ArgumentParser) -> str:
    """The Markdown table of :func:`flags`."""
    lines = ["| flag | commands | default | meaning |", "|---|---|---|---|"]
    for f in flags(parser):
        commands = ", ".join(f"`{c}`" for c in f.commands)
        lines.append(f"| `{f.usage}` | {commands} | {f.default} | {f.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from nswatch.cli import build_parser

    print(helptable(build_parser()), end="")
