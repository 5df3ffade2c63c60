"""Regexes that come from config files, compiled and matched with a time bound.

A pattern in ``adapter_config.json`` is untrusted input: a nested quantifier such as
``(.*)*x$`` makes Python's ``re`` backtrack for hours. Patterns here go through the ``regex``
package, whose matcher gives up after :data:`MATCH_TIMEOUT_S`, and a bad or too slow pattern
is a :class:`ConfigError` that names the config field it came from.
"""

from __future__ import annotations

import functools

import regex

from deltatune.errors import ConfigError

#: seconds one match may take; module paths are short, so a sane pattern needs microseconds
MATCH_TIMEOUT_S = 0.25
#: longest pattern accepted (the longest real ones list a few dozen module names)
MAX_PATTERN_CHARS = 4096


def shown(value: object, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that must not echo big input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


def compile_pattern(field: str, pattern: object) -> regex.Pattern:
    """``pattern`` compiled, or a :class:`ConfigError` naming ``field`` when it is not a usable regex."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{field} must be a non-empty regex string, got {shown(pattern)}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConfigError(f"{field} is a regex of {len(pattern)} characters, more than the {MAX_PATTERN_CHARS} "
                          f"allowed; list the module names instead")
    try:
        return _compiled(pattern)
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise ConfigError(f"{field} {shown(pattern)} is not a valid regex ({exc}); fix the pattern") from None


def fullmatch(field: str, pattern: str, text: str) -> bool:
    """Whether ``pattern`` matches all of ``text``; a match that runs past :data:`MATCH_TIMEOUT_S`
    is a :class:`ConfigError` (the pattern backtracks catastrophically) instead of a hang."""
    rx = compile_pattern(field, pattern)
    try:
        return rx.fullmatch(text, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise ConfigError(f"{field} {shown(pattern)} took over {MATCH_TIMEOUT_S}s to match {text!r}: it "
                          f"backtracks catastrophically; avoid nested quantifiers such as (a*)* or (.*)*") from None


def tail_pattern(key: str) -> str:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern`` keys: the key matches a path's tail."""
    return rf"(?:.*\.)?(?:{key})"
