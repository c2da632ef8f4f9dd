"""Checks on the files a command reads and writes, made before any work starts.

Three promises: no output lands on another file of the same run (the input model, the
data, another output), no output silently replaces an existing file unless the caller
says so, and an output that cannot be written fails at the start, naming the path the
user gave, rather than after hours of training.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from compressor.errors import CompressorError, InputError

PathLike = str | os.PathLike


def check_distinct(
    reads: Mapping[str, PathLike | None],
    writes: Mapping[str, PathLike | None],
    *,
    may_share: tuple[frozenset[str], ...] = (),
) -> None:
    """Refuses any output that names the same file as an input or another output.

    Args:
        reads: label (e.g. "MODEL", "--data") -> path read; None entries are skipped.
        writes: label (e.g. "-o/--output") -> path written; None entries are skipped.
        may_share: pairs of labels allowed to name one file (a checkpoint resumed and
            rewritten in place).

    Raises:
        InputError: two roles name one file; the message names both and the path.
    """
    from compressor.io import same_file  # io imports this module

    seen = [(label, path) for label, path in reads.items() if path is not None]
    for label, path in writes.items():
        if path is None:
            continue
        for other, other_path in seen:
            if frozenset((label, other)) in may_share or not same_file(path, other_path):
                continue
            if other == "MODEL":
                raise InputError(
                    f"{label} {str(path)!r} is the input model; choose another path "
                    "(compressor never overwrites its input)"
                )
            raise InputError(
                f"{label} and {other} are the same file {str(path)!r}; give each its own path"
            )
        seen.append((label, path))


def check_new(label: str, path: PathLike, *, force: bool) -> None:
    """Refuses an existing output file unless `force`.

    Raises:
        InputError: `path` exists and `force` is False.
    """
    if not force and Path(path).exists():
        raise InputError(f"{label} {str(path)!r} exists; pass --force to overwrite")


def check_writable(label: str, path: PathLike) -> None:
    """Refuses an output file that is a directory or whose folder cannot be written.

    Raises:
        InputError: the message names `label` and the path as the user gave it.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{label} {str(path)!r} is a directory; give a file path")
    check_folder_writable(label, path.absolute().parent, shown=path)


def check_folder_writable(label: str, folder: PathLike, *, shown: PathLike | None = None) -> None:
    """Refuses a folder in which no file can be created.

    A missing folder is judged by its nearest existing ancestor, since writes create
    missing folders. Checked by creating and removing a file there, because permission
    bits say nothing for root and nothing about read-only mounts.

    Raises:
        InputError: names `label` and `shown` (default: `folder`).
    """
    shown = str(shown if shown is not None else folder)
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = f"cannot write {label} {shown!r}:"
    if not existing.is_dir():
        raise InputError(f"{where} {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{where} no write permission in {str(existing)!r}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".compressor-probe.", dir=existing)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InputError(f"{where} {str(existing)!r} is not writable ({reason})") from None
    os.close(fd)
    os.unlink(probe)


# errnos that mean the user's path cannot be written (exit 2), as opposed to a failure of
# the machine while writing, such as a full disk (exit 1)
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR}


def write_error(path: PathLike, exc: OSError) -> CompressorError:
    """The error to raise when writing `path` failed with `exc`: names `path`, not a temp file."""
    reason = exc.strerror or str(exc)
    cls = InputError if exc.errno in _USER_ERRNOS else CompressorError
    return cls(f"could not write {str(path)!r}: {reason}; nothing was written there")
