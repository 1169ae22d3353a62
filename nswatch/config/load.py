"""Reading a config: from text or from a file, within size and complexity limits."""

from __future__ import annotations

import os
from dataclasses import replace

import yaml

from nswatch.config.model import Config
from nswatch.config.parse import parse_root
from nswatch.config.problems import ConfigError, Problem
from nswatch.config.walker import Walker
from nswatch.config.yamltree import TooComplex, compose

__all__ = ["DEFAULT_CONFIG_PATH", "MAX_FILE_BYTES", "load_config", "parse_config"]

DEFAULT_CONFIG_PATH = "/etc/nswatch/nswatch.yaml"
# Ten thousand profiles take about 1.5 MB.
MAX_FILE_BYTES = 4 * 1024 * 1024


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line is not None, p.line or 0))


def parse_config(text: str, *, source: str = "<string>") -> Config:
    """The Config in ``text``; raises ConfigError listing every problem."""
    try:
        root = compose(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = int(mark.line) + 1 if mark is not None else None
        what = ": ".join(s for s in (e.context, e.problem) if s)
        raise ConfigError([Problem(source, line, "", f"invalid YAML: {what}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem(source, None, "", f"invalid YAML: {e}")]) from None
    except TooComplex as e:
        raise ConfigError([Problem(source, e.line, e.path, e.message)]) from None
    if root is None or Walker.is_null(root):
        return Config(source=source)
    w = Walker(source)
    config = parse_root(w, root, source)
    if w.problems:
        raise ConfigError(_sorted(w.problems))
    return replace(config, key_lines=dict(w.lines))


def load_config(path: str | None, *, required: bool = False) -> Config:
    """The Config in the file at ``path`` (None: the default file).

    A missing file gives the defaults when it is the default file (``path``
    None or DEFAULT_CONFIG_PATH) and ``required`` is false; any other
    missing or unreadable file raises ConfigError, as do invalid contents
    and files over MAX_FILE_BYTES.
    """
    file = path or DEFAULT_CONFIG_PATH
    try:
        with open(file, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_FILE_BYTES:
                raise ConfigError([Problem(file, None, "", _too_big())])
            # Read one byte past the limit: a pipe or /proc file has no size.
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        if file == DEFAULT_CONFIG_PATH and not required:
            return Config()
        raise ConfigError([Problem(file, None, "", "no such file")]) from None
    except OSError as e:
        raise ConfigError([Problem(file, None, "", f"cannot read: {e.strerror or e}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([Problem(file, None, "", _too_big())])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError([Problem(file, line, "", "not UTF-8 text")]) from None
    return parse_config(text, source=file)


def _too_big() -> str:
    return f"larger than {MAX_FILE_BYTES // 2**20} MiB; a config file is at most that"
