"""Errors and warnings raised by the library.

The CLI maps them onto click's exit codes: `InputError` (the user gave us something we
cannot use) exits 2, every other `CompressorError` (a failure while working) exits 1.
"""

from __future__ import annotations


class CompressorError(Exception):
    """Base class of every error the library raises on purpose."""


class InputError(CompressorError, ValueError):
    """Bad user input: a malformed budget, an unknown name, a file we cannot read."""


class TargetNotReachedError(CompressorError):
    """A method could not reach the requested budget; the message says why."""


class BelowSmallestNetworkError(TargetNotReachedError):
    """The budget is below the smallest network the fitter can build.

    `ratio` is that network's cost over the requested one (> 1): a latency re-fit asks for
    the smallest network itself when the measured graph, not the table, is the judge.
    """

    def __init__(self, message: str, ratio: float):
        super().__init__(message)
        self.ratio = ratio


class MachineryLeftError(RuntimeError):
    """A method left hooks, parametrizations or modules behind after `finalize()`.

    A bug in compressor, not something the user caused: deliberately not a CompressorError,
    so the CLI reports it as an internal error (exit 1).
    """


class CompressorWarning(UserWarning):
    """Warnings from compressor (the test suite turns them into errors)."""


def first_line(exc: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """The first line of an exception's message, at most `limit` characters.

    A message-less exception gives `empty`, or its type name when `empty` is None.
    """
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if empty is None else empty
    return text.splitlines()[0][:limit]
