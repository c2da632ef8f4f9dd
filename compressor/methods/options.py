"""Checks of a method config's values, whoever built it (`--set`, `prune(**config)`, a Config).

The CLI parses `--set` by each field's type (cli/prune_steps.py), but the Python API hands
values straight to the dataclass: before this check `prune(..., epochs="2")` failed deep in
training with a TypeError, `freeze_weights="no"` ran as True (a non-empty string), and
`lr=-1` reached torch's optimiser as "internal error: ValueError". Now every config is
checked when it is made (`MethodConfig.__post_init__`):

* types, from the field's annotation: a bool field takes only True/False; an int field a
  whole number (not a bool, not 1.5); a float field any real number (ints become floats);
  a `tuple[str, ...]` field a string or a list/tuple of strings; `X | None` also None;
* ranges, by field name (one table for every method, `RANGES`): learning rates, weight
  decays, epochs, lambdas, margins, tolerances, eps and counts (steps, samples, batches...)
  at least 0; batch sizes at least 1; alpha and momenta in [0, 1]; the distillation
  temperature above 0; every float finite.

A method checks what only it knows (BAR's round_to, GSS's variant names) in its own
__init__; this module checks what holds for every method.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing

from compressor.errors import InputError

# (name stems, lowest, highest, whether the lowest is allowed): a field matches a stem when
# its name is the stem, ends with "_stem" or starts with "stem_" (gate_lr, lambda_c)
RANGES = (
    (("lr", "weight_decay", "epochs", "lambda", "margin", "tolerance", "eps"), 0.0, None, True),
    (
        ("batches", "samples", "steps", "draws", "bins", "points", "updates", "blocksize"),
        0,
        None,
        True,
    ),
    (("batch_size",), 1, None, True),
    (("alpha", "momentum"), 0.0, 1.0, True),
    (("temperature",), 0.0, None, False),
)

_KINDS = {bool: "True or False", int: "a whole number", float: "a number", str: "a string"}


def checked_config(config) -> None:
    """Checks (and normalises in place: ints to floats, lists to tuples) a config dataclass.

    Raises:
        InputError: a value of the wrong type or outside its range, naming field and value.
    """
    hints = _hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        fixed = _typed(field.name, value, hints[field.name])
        _in_range(field.name, fixed)
        if fixed is not value:
            object.__setattr__(config, field.name, fixed)  # frozen dataclasses too


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _typed(name: str, value, hint):
    """`value` as the annotation `hint` takes it, or InputError."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None and type(None) in options:
        return value
    for kind in options:
        if kind is type(None):
            continue
        fitted = _fitted(value, kind)
        if fitted is not _NO:
            return fitted
    wanted = " or ".join(_described(k) for k in options)
    raise InputError(f"option {name}={value!r} must be {wanted}")


_NO = object()


def _fitted(value, kind):
    """`value` as `kind` (bool, int, float, str, tuple[str, ...]), or _NO."""
    if kind is bool:
        return value if isinstance(value, bool) else _NO
    if isinstance(value, bool):  # True is an int to Python, never to a user
        return _NO
    if kind is int:
        return int(value) if isinstance(value, numbers.Integral) else _NO
    if kind is float:
        return float(value) if isinstance(value, numbers.Real) else _NO
    if kind is str:
        return value if isinstance(value, str) else _NO
    if typing.get_origin(kind) is tuple:
        items = (value,) if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return tuple(items)
        return _NO
    return value  # an annotation this module does not know: the method checks it


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _described(kind) -> str:
    if kind is type(None):
        return "None"
    if typing.get_origin(kind) is tuple:
        return "a string or a list of strings"
    return _KINDS.get(kind, str(kind))


def _in_range(name: str, value) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"option {name}={value!r} must be a finite number")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for stems, low, high, low_allowed in RANGES:
        if not any(_matches(name, stem) for stem in stems):
            continue
        above = value >= low if low_allowed else value > low
        if not above or (high is not None and value > high):
            if high is not None:
                span = f"between {low:g} and {high:g}"
            else:
                span = f"at least {low:g}" if low_allowed else f"above {low:g}"
            raise InputError(f"option {name}={value!r} must be {span}")


def _matches(name: str, stem: str) -> bool:
    return name == stem or name.endswith(f"_{stem}") or name.startswith(f"{stem}_")
