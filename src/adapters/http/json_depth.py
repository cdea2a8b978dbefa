"""A bound on how deeply a request's JSON may nest, checked before it is parsed.

Python's json module recurses once per level: about a thousand levels exhaust the interpreter's
stack (a RecursionError, a 500 and a traceback), and pydantic refuses a few hundred levels with a
message about cyclic references. No request Aura takes needs more than a few levels, so anything
deeper than `MAX_JSON_DEPTH` is refused as a clear 422 problem before either parser sees it."""

from __future__ import annotations

from typing import Any

from quart import Quart
from quart.json.provider import DefaultJSONProvider

from adapters.http.problems import Problem

MAX_JSON_DEPTH = 64
_OPENERS = frozenset("[{")
_CLOSERS = frozenset("]}")


def too_deep(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects in `text` nest deeper than `limit` (brackets inside strings
    do not count). Malformed JSON is left to the parser."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text.count("[") + text.count("{") <= limit:
        return False  # cannot be deeper: the common case costs two counts
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        elif char in _CLOSERS:
            depth -= 1
    return False


def refuse_if_too_deep(text: str | bytes) -> None:
    if too_deep(text):
        raise Problem(422, "json_too_deep",
                      f"The request body nests JSON arrays or objects more than {MAX_JSON_DEPTH} levels deep.")


class DepthLimitedJSONProvider(DefaultJSONProvider):
    """Quart's JSON provider (used by `request.get_json()` and quart-schema) with the depth bound."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        refuse_if_too_deep(s)
        return super().loads(s, **kwargs)


def install_depth_limited_json(app: Quart) -> None:
    app.json = DepthLimitedJSONProvider(app)
