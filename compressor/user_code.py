"""`package.module:function` specs: the options (`--arch`, `--data`) that run the user's code.

Both options import MODULE and call FUNCTION with no arguments, so they run whatever that
code does; nothing else in compressor imports code named by the user. MODULE is looked up
on `sys.path` (PYTHONPATH, installed packages) first and then in the current directory, so
`--arch mynets:small` finds `./mynets.py` while a stray file in the current directory
never shadows an installed package of the same name.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator

from compressor.errors import CompressorError, InputError, first_line

SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
# shown in --help and README; kept here so both options say the same
RUNS_CODE = (
    "imports MODULE and calls FN, running that code: use only code you trust; MODULE is "
    "looked up on PYTHONPATH, then in the current directory"
)


def call_spec(spec: str, option: str) -> object:
    """Imports `package.module:function` and returns what the function returns.

    Args:
        spec: the user's `package.module:function`.
        option: the option it came from (`--arch`, `--data`), for messages.

    Raises:
        InputError: malformed spec, the module cannot be imported, it has no such
            function, or the function raised.
    """
    if not SPEC.match(spec):
        raise InputError(f"{option} {spec!r} is not of the form package.module:function")
    module_name, func_name = spec.split(":")
    with _cwd_searched_last():
        func = _import_function(spec, option, module_name, func_name)
        try:
            return func()
        except CompressorError:
            raise
        except Exception as exc:  # the user's function failed, not compressor
            first = first_line(exc, empty="")
            raise InputError(
                f"{option} {spec!r}: {func_name}() raised {type(exc).__name__}: {first}"
            ) from exc


def _import_function(spec: str, option: str, module_name: str, func_name: str):
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's module, not ours
        raise InputError(
            f"{option} {spec!r}: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {exc}); it is looked up on PYTHONPATH, then in the "
            "current directory"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise InputError(f"{option} {spec!r}: module {module_name!r} has no function {func_name!r}")
    return func


@contextlib.contextmanager
def _cwd_searched_last() -> Iterator[None]:
    """Appends the current directory to sys.path while the user's code imports and runs."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
