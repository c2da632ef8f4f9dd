"""Memory bounds for the files we read: what a zip, npz or torch file declares, checked first.

A reader that trusts declared sizes can be made to allocate gigabytes by a file of a few
kilobytes: numpy allocates an .npy member's declared shape before reading it, and a zip
member's declared size is only checked once it has been read. These checks read only the
zip directory and the .npy headers, and refuse a file that declares more than
`max(MIN_BYTES, RATIO x its own size)` bytes: a torch file (zip, stored) or an
`numpy.savez` archive declares about its own size, a `numpy.savez_compressed` one of real
data a few times its size.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from compressor.errors import InputError

MIN_BYTES = 64 * 2**20  # any file may declare this much, whatever its size
RATIO = 100  # deflate reaches ~5-20x on image data; 100x is a bomb, not a data set


def limit_for(path: Path) -> int:
    """The most bytes a file at `path` may declare it holds, uncompressed."""
    return max(MIN_BYTES, RATIO * Path(path).stat().st_size)


def check_zip(path: str | Path, what: str) -> zipfile.ZipFile:
    """Opens `path` as a zip and checks its members' declared sizes; the caller closes it.

    Raises:
        InputError: not a zip archive, or members declaring more than `limit_for(path)`.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise InputError(
            f"{what} {str(path)!r} is damaged or not a zip archive ({exc}); torch.save and "
            "numpy.savez write zip archives"
        ) from None
    declared = sum(info.file_size for info in archive.infolist())
    _check_total(path, what, declared)
    return archive


def check_torch_file(path: str | Path, what: str) -> None:
    """Checks a `torch.save` file before `torch.load` reads it (zip format only).

    torch checks each tensor's storage against its zip member's size, so bounding the
    members bounds the load. The pre-1.6 format allocates declared sizes unchecked: refused.

    Raises:
        InputError: not a zip archive, or members declaring too much.
    """
    check_zip(path, what).close()


def check_npz(path: str | Path, what: str = "data file") -> None:
    """Checks every .npy member's declared shape against its member size and the file size.

    Raises:
        InputError: not a zip archive, a member whose header declares more bytes than the
            member holds, or members declaring more than `limit_for(path)` in all.
    """
    path = Path(path)
    with check_zip(path, what) as archive:
        total = 0
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            declared = _npy_bytes(archive, info, path, what)
            if declared > info.file_size:
                raise InputError(
                    f"{what} {str(path)!r}: member {info.filename!r} declares {declared} bytes "
                    f"of array data but holds {info.file_size}; the file is corrupt"
                )
            total += declared
        _check_total(path, what, total)


def _npy_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, what: str) -> int:
    """The byte count an .npy member's header declares (0 for object arrays: never read)."""
    try:
        with archive.open(info) as member:
            major, _ = np.lib.format.read_magic(member)
            read = (
                np.lib.format.read_array_header_1_0
                if major == 1
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(member)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise InputError(
            f"{what} {str(path)!r}: member {info.filename!r} is not a readable .npy ({exc})"
        ) from None
    return 0 if dtype.hasobject else math.prod(shape) * dtype.itemsize


def _check_total(path: Path, what: str, declared: int) -> None:
    limit = limit_for(path)
    if declared > limit:
        size = path.stat().st_size
        raise InputError(
            f"{what} {str(path)!r} declares {declared} bytes from a {size}-byte file, more "
            f"than the {limit} allowed (max(64 MiB, {RATIO} x file size)): corrupt or a zip "
            "bomb; if it is genuine, save it uncompressed (numpy.savez / torch.save)"
        )
