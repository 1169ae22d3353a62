"""The floor constraints CI installs (.ci/constraints-floor.txt) are pyproject.toml's floors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_floors() -> dict[str, str]:
    """Every dependency of the package and its test extra -> its ``>=`` floor."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    out: dict[str, str] = {}
    for req in reqs:
        m = REQUIREMENT.match(req)
        assert m, req
        floor = re.search(r">=\s*([^,\s]+)", m.group(2))
        assert floor, f"{req}: no floor; CI could not install the lowest version"
        out[normalise(m.group(1))] = floor.group(1)
    return out


def pinned() -> dict[str, str]:
    """The constraints file's ``name==version`` lines."""
    out: dict[str, str] = {}
    for line in (ROOT / ".ci" / "constraints-floor.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, line
        out[normalise(name.strip())] = version.strip()
    return out


def test_floor_constraints_pin_every_declared_floor() -> None:
    """Each dependency's lowest allowed version is pinned in the floor constraints, and nothing else."""
    assert pinned() == declared_floors()
