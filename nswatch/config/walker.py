"""Turning a YAML tree into typed values, collecting every problem with its line and key path."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import NamedTuple, TypeVar

import yaml

from nswatch.config.problems import Problem
from nswatch.config.yamltree import MERGE_TAG, NULL_TAG, STR_TAG, Map, Node, Scalar, Seq
from nswatch.values import Invalid

__all__ = ["Entry", "Walker"]

_T = TypeVar("_T")
# Merges of merges deeper than this are refused (they are never needed).
MAX_MERGE_DEPTH = 20


class Entry(NamedTuple):
    """A mapping value with the line of its key."""

    line: int  # of the key
    node: Node


class Walker:
    """Turns a composed YAML tree into typed values, recording problems."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self.lines: dict[str, int] = {}
        # (path, name) of every profile with a readable name, valid or not,
        # so duplicate names are reported even next to other problems.
        self.profile_names: list[tuple[str, str]] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def add(self, path: str, line: int | None, message: str) -> None:
        """Record a problem."""
        self.problems.append(Problem(self.file, line, path, message))

    def scalar(self, node: Node) -> object:
        """The plain value of a node; lists of scalars become lists."""
        if isinstance(node, Seq):
            return [self.scalar(n) if isinstance(n, Scalar) else {} for n in node.items]
        if not isinstance(node, Scalar):
            return {}
        if node.tag == STR_TAG:
            return node.value  # most values: no need for the constructor
        try:
            return self._constructor.construct_object(
                yaml.ScalarNode(node.tag, node.value, style=node.style), deep=True
            )
        except yaml.YAMLError as e:
            raise Invalid(f"unreadable value: {getattr(e, 'problem', e)}") from None
        finally:
            # The constructor remembers every node it built: forget them.
            self._constructor.constructed_objects.clear()

    @staticmethod
    def is_null(node: Node) -> bool:
        """Whether the node is an empty value (``~``, ``null`` or nothing)."""
        return isinstance(node, Scalar) and node.tag == NULL_TAG

    def _pairs(self, node: Map, path: str, depth: int) -> list[tuple[Node, Node, bool]]:
        explicit: list[tuple[Node, Node, bool]] = []
        merged: list[tuple[Node, Node, bool]] = []
        for key, value in node.pairs:
            if not (isinstance(key, Scalar) and key.tag == MERGE_TAG):
                explicit.append((key, value, False))
                continue
            sources = value.items if isinstance(value, Seq) else [value]
            for src in sources:
                if not isinstance(src, Map) or depth > MAX_MERGE_DEPTH:
                    self.add(path, key.line, "<< must merge a mapping or a list of mappings")
                    continue
                merged.extend((k, v, True) for k, v, _ in self._pairs(src, path, depth + 1))
        return explicit + merged

    def mapping(self, node: Node, path: str, line: int) -> dict[str, Entry] | None:
        """The keys of a mapping node; duplicate and non-string keys are problems."""
        if not isinstance(node, Map):
            self.add(path, line, f"must be a mapping, not {self.kind(node)}")
            return None
        out: dict[str, Entry] = {}
        explicit_lines: dict[str, int] = {}
        for key, value, merged in self._pairs(node, path, 0):
            try:
                name = self.scalar(key) if isinstance(key, Scalar) else None
            except Invalid:
                name = None
            if not isinstance(name, str):
                self.add(path, key.line, f"keys must be strings, not {self.kind(key)}")
                continue
            if merged:
                # Keys written out win over merged ones; earlier merges win.
                out.setdefault(name, Entry(key.line, value))
                continue
            if name in explicit_lines:
                sub = f"{path}.{name}" if path else name
                self.add(sub, key.line, f"duplicate key (first on line {explicit_lines[name]})")
                continue
            explicit_lines[name] = key.line
            out[name] = Entry(key.line, value)
        return out

    def fields(
        self,
        node: Node,
        path: str,
        line: int,
        allowed: tuple[str, ...],
        required: tuple[str, ...] = (),
    ) -> dict[str, Entry] | None:
        """A mapping with a fixed set of keys: unknown and missing ones are problems."""
        m = self.mapping(node, path, line)
        if m is None:
            return None
        for key, entry in m.items():
            sub = f"{path}.{key}" if path else key
            self.lines[sub] = entry.line
            if not path and key.startswith("x-"):
                continue  # top-level x-* keys hold YAML anchors, as in Compose files
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.add(sub, entry.line, f"unknown key{hint}")
        for key in required:
            if key not in m:
                self.add(f"{path}.{key}" if path else key, line, "is required")
        return {k: v for k, v in m.items() if k in allowed}

    def sequence(self, node: Node, path: str, line: int) -> list[Node] | None:
        """The items of a sequence node (an empty value is an empty list)."""
        if self.is_null(node):
            return []
        if not isinstance(node, Seq):
            self.add(path, line, f"must be a list, not {self.kind(node)}")
            return None
        return list(node.items)

    def get(
        self,
        m: Mapping[str, Entry],
        key: str,
        path: str,
        conv: Callable[[object], _T],
    ) -> _T | None:
        """The converted value of ``m[key]``; None when absent or invalid."""
        entry = m.get(key)
        if entry is None:
            return None
        sub = f"{path}.{key}" if path else key
        try:
            return conv(self.scalar(entry.node))
        except Invalid as e:
            self.add(sub, entry.line, e.message)
            return None

    @staticmethod
    def kind(node: Node) -> str:
        """How a node reads in a message."""
        if isinstance(node, Map):
            return "a mapping"
        if isinstance(node, Seq):
            return "a list"
        assert isinstance(node, Scalar)
        return f"{node.value!r}" if node.value else "empty"
