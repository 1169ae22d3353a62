"""Reading YAML into a tree of nodes, within limits a hostile file cannot get past.

PyYAML's own composer recurses once per nesting level (thousands of ``[``
end in RecursionError) and shares aliased nodes, so a few hundred bytes of
anchors and aliases can stand for billions of values.  Here libyaml's
parser produces the events and a loop (no recursion) builds the nodes,
refusing more than :data:`MAX_DEPTH` levels or more than :data:`MAX_NODES`
values counted with every alias expanded: whatever reads the tree later
stays within that many steps.  Nodes are small slotted objects: a tree at
the limit stays within a few tens of MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from yaml import events

__all__ = [
    "MAX_DEPTH",
    "MAX_NODES",
    "MERGE_TAG",
    "NULL_TAG",
    "STR_TAG",
    "Map",
    "Node",
    "Scalar",
    "Seq",
    "TooComplex",
    "compose",
]

# A real config nests five levels (root, profiles, profile, veth, bridge).
MAX_DEPTH = 32
# About 15 per profile: over 10,000 profiles.
MAX_NODES = 200_000
MERGE_TAG = "tag:yaml.org,2002:merge"
NULL_TAG = "tag:yaml.org,2002:null"
STR_TAG = "tag:yaml.org,2002:str"

# libyaml's parser when PyYAML has it: about ten times faster.
_Parser: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_resolver: Any = yaml.resolver.Resolver()


class Node:
    """A node of the tree; ``line`` is 1-based."""

    __slots__ = ("line",)

    def __init__(self, line: int) -> None:
        self.line = line


class Scalar(Node):
    """A scalar with its resolved tag (``tag:yaml.org,2002:int`` ...)."""

    __slots__ = ("style", "tag", "value")

    def __init__(self, line: int, tag: str, value: str, style: str | None) -> None:
        super().__init__(line)
        self.tag = tag
        self.value = value
        self.style = style


class Seq(Node):
    """A sequence."""

    __slots__ = ("items",)

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.items: list[Node] = []


class Map(Node):
    """A mapping, as its (key, value) pairs in file order."""

    __slots__ = ("pairs",)

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.pairs: list[tuple[Node, Node]] = []


class TooComplex(Exception):
    """The file goes past a limit, at ``line`` and key ``path``."""

    def __init__(self, line: int, path: str, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.path = path
        self.message = message


@dataclass
class _Open:
    node: Seq | Map
    anchor: str | None
    size: int = 1  # values in this collection, aliases expanded
    key: Node | None = None  # a mapping's key waiting for its value


def _path(stack: list[_Open]) -> str:
    out = ""
    for frame in stack:
        if isinstance(frame.node, Seq):
            out += f"[{len(frame.node.items)}]"
        elif isinstance(frame.key, Scalar):
            out += f".{frame.key.value}" if out else frame.key.value
        else:
            break
    return out


def _line(event: Any) -> int:
    return int(event.start_mark.line) + 1


def compose(text: str) -> Node | None:
    """The tree of the single YAML document in ``text`` (None when there is none).

    Raises yaml.YAMLError for a file that is not YAML and TooComplex for
    one that nests too deep or expands to too many values.
    """
    parser = _Parser(text)
    try:
        return _compose(parser)
    finally:
        parser.dispose()


def _compose(parser: Any) -> Node | None:
    stack: list[_Open] = []
    anchors: dict[str, tuple[Node, int]] = {}
    root: Node | None = None
    first_doc: Any = None
    total = 0

    def attach(node: Node, size: int) -> None:
        nonlocal root
        if not stack:
            root = node
            return
        top = stack[-1]
        top.size += size
        if isinstance(top.node, Seq):
            top.node.items.append(node)
        elif top.key is None:
            top.key = node
        else:
            top.node.pairs.append((top.key, node))
            top.key = None

    def count(n: int, event: Any) -> None:
        nonlocal total
        total += n
        if total > MAX_NODES:
            raise TooComplex(
                _line(event),
                _path(stack),
                f"expands to more than {MAX_NODES} values (aliases expanded)",
            )

    while parser.check_event():
        event: Any = parser.get_event()
        # libyaml's marks are not PyYAML's Mark class, but read the same.
        mark: Any = event.start_mark
        if isinstance(event, events.DocumentStartEvent):
            if first_doc is not None:
                raise yaml.composer.ComposerError(
                    "expected a single document in the stream",
                    first_doc,
                    "but found another document",
                    mark,
                )
            first_doc = mark
        elif isinstance(event, events.AliasEvent):
            if event.anchor not in anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"found undefined alias {event.anchor!r}", mark
                )
            node, size = anchors[event.anchor]
            count(size, event)
            attach(node, size)
        elif isinstance(event, events.ScalarEvent):
            count(1, event)
            tag = event.tag
            if tag is None or tag == "!":
                tag = _resolver.resolve(yaml.ScalarNode, event.value, event.implicit)
            scalar = Scalar(_line(event), tag, event.value, event.style)
            if event.anchor is not None:
                anchors[event.anchor] = (scalar, 1)
            attach(scalar, 1)
        elif isinstance(event, events.SequenceStartEvent | events.MappingStartEvent):
            count(1, event)
            if len(stack) >= MAX_DEPTH:
                raise TooComplex(
                    _line(event), _path(stack), f"nests deeper than {MAX_DEPTH} levels"
                )
            cls = Seq if isinstance(event, events.SequenceStartEvent) else Map
            stack.append(_Open(cls(_line(event)), event.anchor))
        elif isinstance(event, events.SequenceEndEvent | events.MappingEndEvent):
            frame = stack.pop()
            # Registered only now: an alias inside its own anchor is undefined,
            # so the tree has no cycles.
            if frame.anchor is not None:
                anchors[frame.anchor] = (frame.node, frame.size)
            attach(frame.node, frame.size)
    return root
