"""`nswatch --help` and each command's help against the README's flags table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nswatch.cli import build_parser
from nswatch.helptable import Flag, flags, helptable, subcommands

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- flags table: python -m nswatch.helptable -->\n"
END = "<!-- end of flags table -->"


def readme_rows() -> list[list[str]]:
    """The cells of each row of the README's flags table."""
    text = README.read_text()
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()]
    return rows[2:]  # past the header and the rule


def help_text(*command: str) -> str:
    """What `nswatch COMMAND --help` prints, unwrapped (COLUMNS wide enough for one line each)."""
    env = {**os.environ, "COLUMNS": "1000"}
    p = subprocess.run(
        [sys.executable, "-m", "nswatch", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=True,
    )
    return p.stdout


def help_entries(text: str) -> dict[str, str]:
    """Each argument's help in argparse's output, by how it is invoked (e.g. '--netns NAME')."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m is not None:
            current = m.group(1)
            entries[current] = m.group(2) or ""
        elif current is not None and line.startswith("   "):
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    return entries


def test_readme_flags_table_is_generated() -> None:
    """The README's flags table is what `python -m nswatch.helptable` prints from the parser."""
    text = README.read_text()
    assert BEGIN + helptable(build_parser()) + END in text


def test_every_flag_in_help_states_the_readme_default() -> None:
    """Each command's --help lists every flag of the README table with the same default."""
    rows = readme_rows()
    commands = list(subcommands(build_parser()))
    top = help_text()
    for command in commands:
        assert command in top, command
    for command in commands:
        entries = help_entries(help_text(command))
        mine = [r for r in rows if f"`{command}`" in r[1].split(", ")]
        # An optional positional shows as [FILE] in the table, FILE in --help.
        listed = {r[0].strip("`[]") for r in mine}
        assert listed == set(entries) - {"-h, --help"}, command
        for usage, _, default, _ in mine:
            usage = usage.strip("`[]")
            if default == "off":  # a switch
                assert "(default" not in entries[usage], usage
                continue
            assert entries[usage].endswith(f"(default {default.replace('`', '')})"), (
                command,
                usage,
                entries[usage],
            )


def test_a_flag_without_a_stated_default_is_refused() -> None:
    """The table generator refuses a flag whose help does not say its default."""
    parser = build_parser()
    sub = subcommands(parser)["snapshot"]
    sub.add_argument("--colour", metavar="WHEN", help="when to use colour")
    with pytest.raises(ValueError, match="--colour WHEN: its help does not say its default"):
        flags(parser)


def test_setting_flags_point_at_their_setting() -> None:
    """A flag that sets a setting names it and carries the setting's documented default."""
    by_usage = {f.usage: f for f in flags(build_parser())}
    assert by_usage["--listen HOST:PORT"] == Flag(
        "--listen HOST:PORT", ("run",), "`127.0.0.1:9442`", "setting `listen`"
    )
    assert by_usage["--netns-dir DIR"].commands == ("run", "snapshot", "apply", "graph")
