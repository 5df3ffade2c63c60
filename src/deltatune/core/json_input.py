"""JSON objects from untrusted input (adapter configs, safetensors metadata, data-set lines):
parsed with a bound on nesting, and refused with an error that names where they came from."""

from __future__ import annotations

import json

from deltatune.errors import DeltatuneError

#: PEFT's configs nest three levels at most; a data row or a metadata header no more
MAX_DEPTH = 16


def parse_object(text: str | bytes, where: str, error: type[DeltatuneError]) -> dict:
    """The JSON object in ``text``; ``error`` naming ``where`` when it is not valid JSON, nests
    deeper than :data:`MAX_DEPTH` levels, or is not an object."""
    too_deep = False
    try:
        data = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise error(f"{where} is not valid JSON ({reason})") from None
    except RecursionError:  # nested deeper than the parser's stack
        data, too_deep = None, True
    if too_deep or _depth(data) > MAX_DEPTH:
        raise error(f"{where} nests lists or objects deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        raise error(f"{where} does not hold a JSON object")
    return data


def _depth(value) -> int:
    """How deeply lists and dicts nest in ``value``, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        deepest = max(deepest, level)
        if level <= MAX_DEPTH:
            stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest
