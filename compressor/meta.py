"""The compressor metadata embedded in saved models, parsed as untrusted input.

`save_model` writes one JSON object (format, version, per-sample input shape, report)
into a `.pt2` extra file or a safetensors `__metadata__` entry. A file from elsewhere may
hold anything there, so every field is checked before use: bad JSON or a wrong type is
the user's bad input, never an internal error.
"""

from __future__ import annotations

import json
from pathlib import Path

from compressor.errors import InputError

META_FILE = "compressor.json"
META_FORMAT = "compressor.pt2"
META_VERSION = 1


def parse_meta(text: str | None, path: str | Path) -> dict:
    """The checked metadata object in `text` ({} when there is none).

    Raises:
        InputError: not JSON, not an object, or a field of the wrong type.
    """
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _damaged(path, f"{META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _damaged(path, f"{META_FILE} holds a JSON {type(meta).__name__}, not an object")
    _check_field(meta, "format", str, path)
    _check_field(meta, "version", int, path)
    _check_field(meta, "report", dict, path)
    shape = meta.get("input_shape")
    if shape is not None and not _is_shape(shape):
        raise _damaged(path, f"input_shape {shape!r} is not a list of positive integers")
    return meta


def _is_shape(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value
    )


def _check_field(meta: dict, key: str, kind: type, path: str | Path) -> None:
    value = meta.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise _damaged(path, f"{key} is a {type(value).__name__}, not a {kind.__name__}")


def _damaged(path: str | Path, detail: str) -> InputError:
    return InputError(f"damaged compressor metadata in {str(path)!r}: {detail}")
