"""Fashion-MNIST's idx files: where to find them and a validating parser.

The idx format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the
number of dimensions, then each dimension as a big-endian uint32, then the data.
"""

from __future__ import annotations

import gzip
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from compressor.errors import InputError

# Where Debian's dataset-fashion-mnist package installs the idx files.
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# idx type codes (http://yann.lecun.com/exdb/mnist/); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _fashion_search_dirs(given: Path | None) -> list[Path]:
    if given is not None:
        return [given]
    root = os.environ.get("COMPRESSOR_DATA")
    if root:
        return [Path(root).expanduser() / "fashion-mnist", SYSTEM_FASHION_DIR]
    return [SYSTEM_FASHION_DIR]


def find_fashion_files(given: Path | None) -> tuple[Path, ...]:
    """Returns the four idx files from the first directory that holds all of them."""
    searched = _fashion_search_dirs(given)
    for directory in searched:
        found = [_find_idx_file(directory, stem) for stem in FASHION_FILES.values()]
        if all(found):
            return tuple(found)
    names = ", ".join(f"{stem}[.gz]" for stem in FASHION_FILES.values())
    dirs = ", ".join(str(d) for d in searched)
    raise InputError(
        f"fashion-mnist idx files ({names}) not found in: {dirs}; install them with "
        "'sudo apt-get install dataset-fashion-mnist', set $COMPRESSOR_DATA to a folder "
        "holding fashion-mnist/, or use fashion-mnist:DIR"
    )


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    # Mirrors differ: "train-images-idx3-ubyte" vs "train-images.idx3-ubyte", gzipped or not.
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


@lru_cache(maxsize=4)
def read_fashion_mnist(files: tuple[Path, ...]) -> tuple[np.ndarray, ...]:
    """Parses the four idx files; cached because benchmarks load the set repeatedly.

    The arrays are read-only since every caller shares them.
    """
    arrays = tuple(read_idx(path) for path in files)
    for array in arrays:
        array.setflags(write=False)
    return arrays


def read_idx(path: Path) -> np.ndarray:
    """Parses one idx file (optionally gzipped) into a numpy array."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read idx file {path}: {exc}; re-download it") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise InputError(f"idx file {path} has a bad magic number {raw[:4].hex()}; re-download it")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"idx file {path} is truncated inside its header; re-download it")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise InputError(
            f"idx file {path} holds {len(raw)} bytes but its header {dims} implies "
            f"{expected}; the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
