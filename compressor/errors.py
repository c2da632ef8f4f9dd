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


class CompressorWarning(UserWarning):
    """Warnings from compressor (the test suite turns them into errors)."""
