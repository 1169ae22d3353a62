"""User-supplied regular expressions, run by RE2 so that any pattern matches in linear time.

Python's ``re`` backtracks: a pattern such as ``^x-(a+)+$`` against a name
like ``x-aaaa…ab`` takes seconds per evaluation, and names are evaluated on
every rescan.  RE2 never backtracks; it refuses what needs backtracking
(backreferences, lookaround), and that is reported when the pattern is read.
"""

from __future__ import annotations

import functools

import re2

__all__ = ["PatternError", "UserRegex", "user_regex"]


class PatternError(ValueError):
    """RE2 cannot compile the pattern; the message says why."""


class UserRegex:
    """A compiled user pattern; :meth:`search` is ``re.search`` semantics in linear time."""

    __slots__ = ("_rx", "pattern")

    def __init__(self, pattern: str) -> None:
        options = re2.Options()
        # RE2 would also log the error on stderr; the caller reports it.
        options.log_errors = False
        try:
            self._rx = re2.compile(pattern, options)
        except re2.error as e:
            raise PatternError(_message(e)) from None
        self.pattern = pattern

    def search(self, text: str) -> bool:
        """Whether the pattern matches anywhere in ``text``."""
        try:
            return self._rx.search(text) is not None
        except UnicodeEncodeError:
            # Names read from disk carry undecodable bytes as lone
            # surrogates, which UTF-8 cannot encode: match those as U+FFFD.
            clean = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            return self._rx.search(clean) is not None


def _message(e: Exception) -> str:
    arg = e.args[0] if e.args else e
    text = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
    if "perl operator" in text or "escape sequence" in text:
        # What Python's re takes but RE2 does not: say why, not just what.
        text += " (RE2 takes no backreferences or lookaround)"
    return text


@functools.lru_cache(maxsize=256)
def user_regex(pattern: str) -> UserRegex:
    """The compiled pattern (cached); raises PatternError when RE2 refuses it."""
    return UserRegex(pattern)
