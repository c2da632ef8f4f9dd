"""The CSR pack's on-disk format: encoding weights, and decoding a pack with validation.

The pack is a plain safetensors file (docs/csr-format.md has the full specification):

    [8 bytes: u64 little-endian N][N bytes: JSON header][data section: raw tensors]

This module encodes one weight into its CSR / block-CSR arrays and decodes a whole pack,
checking every entry, dtype and index before using it, so that any corrupt file raises
`ValueError` with a message and never another exception or a silently wrong tensor.
`exporters.csr_header` parses the safetensors layer and computes the checksums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compressor.patterns import MAX_BLOCK_ELEMENTS
from exporters import csr_nm
from exporters.csr_header import (  # noqa: F401 (re-exported: one module for callers)
    DTYPES,
    MAX_HEADER,
    PLACEHOLDER,
    Parsed,
    checksum_v1,
    checksum_v2,
    crc_field,
    ints,
    parse,
    parse_json,
    seal,
)
from exporters.csr_values import (  # noqa: F401 (re-exported)
    FP16_MAX,
    INT8_MAX,
    VALUE_DTYPES,
    finish,
    part,
    quantize,
)

FORMAT = "compressor.csr"
VERSION = "2"  # what the writer emits
READ_VERSIONS = ("1", "2")
# Tensor name suffixes of one CSR-encoded weight NAME.
PARTS = ("values", "col_indices", "row_ptr", "scales")
checksum = checksum_v1  # the name version 1 had

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
INDEX_DTYPES = ("U8", "U16", "I32")
ROW_PTR_DTYPES = ("I32", "I64")
# How many block columns each index dtype can address (indices 0 .. capacity-1).
INDEX_CAPACITY = {"U8": 2**8, "U16": 2**16, "I32": 2**31}
# Version 2: a block holds at most MAX_BLOCK_ELEMENTS (R*C, 256: e.g. 16x16 or 1x256).
# Larger blocks buy nothing on any runtime we know, and padding to them can inflate a
# rebuild. One number with `--pattern`'s block limit, so every pattern a method prunes to packs.


def index_dtype(count: int) -> str:
    """The narrowest index dtype that holds 0..count-1: U8, U16 or I32."""
    if count <= 2**8:
        return "U8"
    if count <= 2**16:
        return "U16"
    if count <= 2**31:
        return "I32"
    raise ValueError(f"{count} columns exceed the pack's int32 column indices")


def row_ptr_dtype(nnz: int) -> str:
    """I32 while the stored-block count fits, else I64."""
    return "I32" if nnz < 2**31 else "I64"


def view_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view [rows, cols] of a weight: [O, I, kh, kw] -> [O, I*kh*kw]."""
    return shape[0], math.prod(shape[1:])


# --- encoding -------------------------------------------------------------------------------


def encode(weight: np.ndarray, values: str, block: tuple[int, int]) -> tuple[dict, dict]:
    """Encodes one weight (rank >= 2) as CSR (block 1x1) or block-CSR.

    Args:
        weight: the dense weight, any float dtype.
        values: "fp32", "fp16" or "int8" (per-row symmetric scales).
        block: (R, C), the block shape; (1, 1) is plain CSR.

    Returns:
        ({part: array} for the parts in PARTS that exist, the metadata entry).

    Raises:
        ValueError: values outside fp16's range, or too many columns.
    """
    rows, cols = view_of(weight.shape)
    height, width = block
    brows, bcols = -(-rows // height), -(-cols // width)
    padded = np.zeros((brows * height, bcols * width), dtype=weight.dtype)
    padded[:rows, :cols] = weight.reshape(rows, cols)
    # A zero is not stored whatever its sign: masking makes -0.0 of every pruned negative
    # weight (w * 0), and storing those would store half the zeros (see the format doc).
    keep = _blocks(padded, block).any(axis=(2, 3))
    block_rows, block_cols = np.nonzero(keep)  # row-major: sorted by row, then column
    stored, scales = quantize(padded, rows, values)
    data = _blocks(stored, block)[block_rows, block_cols]
    parts = {
        "values": data.reshape(-1) if block == (1, 1) else data,
        "col_indices": block_cols.astype(DTYPES[index_dtype(bcols)]),
        "row_ptr": np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(
            DTYPES[row_ptr_dtype(len(block_cols))]
        ),
    }
    if scales is not None:
        parts["scales"] = scales
    return parts, {
        "encoding": "csr" if block == (1, 1) else "bcsr",
        "shape": list(weight.shape),
        "view": [rows, cols],
        "block": list(block),
        "values": VALUE_DTYPES[values],
    }


def nonzero_bits(array: np.ndarray) -> np.ndarray:
    """True where an element's bits are not all zero: -0.0 counts, +0.0 does not."""
    if array.dtype.kind == "f":
        return (array != 0) | np.signbit(array)
    return array != 0


def _blocks(padded: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[brows*R, bcols*C] -> [brows, bcols, R, C] (a view)."""
    height, width = block
    brows, bcols = padded.shape[0] // height, padded.shape[1] // width
    return padded.reshape(brows, height, bcols, width).transpose(0, 2, 1, 3)


# --- reading --------------------------------------------------------------------------------


def decode(name: str, entry: dict, parsed: Parsed) -> np.ndarray:
    """Rebuilds the dense weight NAME from its parts, checking every index.

    Returns:
        The weight in its original shape, float32 (float64 for an F64 weight).

    Raises:
        ValueError: parts missing or of the wrong dtype/shape, row_ptr not monotone, column
            indices out of range or unsorted, non-zero padding, bad int8 scales.
    """
    if entry["encoding"] == csr_nm.ENCODING:
        return csr_nm.decode(name, entry, parsed)
    rows, cols = entry["view"]
    height, width = entry["block"]
    brows, bcols = -(-rows // height), -(-cols // width)
    row_ptr = part(name, "row_ptr", parsed, ROW_PTR_DTYPES, [brows + 1]).astype(np.int64)
    nblocks = _check_row_ptr(name, row_ptr)
    col_idx = part(name, "col_indices", parsed, INDEX_DTYPES, [nblocks])
    _check_index_width(name, parsed.dtypes[f"{name}.col_indices"], bcols)
    col_idx = col_idx.astype(np.int64)
    shape = [nblocks] if entry["encoding"] == "csr" else [nblocks, height, width]
    values = part(name, "values", parsed, (entry["values"],), shape)
    block_rows = np.repeat(np.arange(brows), np.diff(row_ptr))
    _check_columns(name, col_idx, block_rows, bcols)
    padded = np.zeros((brows, bcols, height, width), dtype=values.dtype)
    padded[block_rows, col_idx] = values.reshape(nblocks, height, width)
    full = padded.transpose(0, 2, 1, 3).reshape(brows * height, bcols * width)
    if np.any(nonzero_bits(full[rows:])) or np.any(nonzero_bits(full[:, cols:])):
        raise ValueError(
            f"{name}: non-zero values in the block padding past the view {rows}x{cols}"
        )
    return finish(name, full[:rows, :cols], entry, parsed)


def _check_row_ptr(name: str, row_ptr: np.ndarray) -> int:
    if row_ptr[0] != 0:
        raise ValueError(f"{name}.row_ptr starts at {row_ptr[0]}, not 0")
    if np.any(np.diff(row_ptr) < 0):
        raise ValueError(f"{name}.row_ptr is not monotone (non-decreasing)")
    return int(row_ptr[-1])


def _check_index_width(name: str, dtype: str, bcols: int) -> None:
    if bcols > INDEX_CAPACITY[dtype]:
        raise ValueError(
            f"{name}.col_indices: {dtype} cannot hold every block-column index of the "
            f"{bcols} block columns (indices up to {bcols - 1}); use a wider index type"
        )


def _check_columns(name: str, col_idx: np.ndarray, block_rows: np.ndarray, bcols: int) -> None:
    if len(col_idx) and (col_idx.min() < 0 or col_idx.max() >= bcols):
        raise ValueError(f"{name}.col_indices out of range: must lie in [0, {bcols})")
    same_row = block_rows[1:] == block_rows[:-1]
    if np.any(np.diff(col_idx)[same_row] <= 0):
        raise ValueError(f"{name}.col_indices not strictly increasing within a row")


# --- the pack as a whole --------------------------------------------------------------------

ENTRY_KEYS = {"encoding", "shape", "view", "dtype", "values", "block", "scales"}
# The default cap on the elements a pack may make the reader rebuild, over all its CSR
# weights: the larger of a fixed floor (any model of up to 16 Mi weight elements, whatever
# its sparsity) and 1024 elements per byte of file. A stored element costs 1.25-6 bytes
# (int8 1x4 blocks .. fp32 with U16 indices), so that admits real packs up to 99.9 %
# sparse, and refuses a 66 KB file declaring a 16384x16384 weight (2**28 elements).
MIN_ELEMENTS = 2**24
ELEMENTS_PER_BYTE = 1024


def default_max_elements(file_bytes: int) -> int:
    """The rebuild cap `unpack` applies to a `file_bytes`-byte pack unless told otherwise."""
    return max(MIN_ELEMENTS, ELEMENTS_PER_BYTE * file_bytes)


@dataclass
class Unpacked:
    """A pack decoded to dense arrays.

    Attributes:
        arrays: name -> dense array (CSR weights rebuilt; others views into the file).
        dtypes: name -> safetensors dtype name of the tensor the array stands for.
        entries: the validated `tensors` metadata (CSR-encoded weights only).
        metadata: the whole `__metadata__`.
        header_len: the header's length in bytes.
    """

    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]
    entries: dict[str, dict]
    metadata: dict[str, str]
    header_len: int


def unpack(data: bytes, max_elements: int | None = None) -> Unpacked:
    """Parses and validates a whole pack and rebuilds its CSR weights as dense arrays.

    Args:
        data: the pack's bytes.
        max_elements: the most elements the CSR weights may rebuild to, in all (block
            padding included); None: `default_max_elements(len(data))`.

    Raises:
        ValueError: anything wrong with the file, with a message saying what; a pack that
            declares more than `max_elements`, checked before anything is allocated; and
            a rebuild that runs out of memory.
    """
    parsed = parse(data)
    entries = check_metadata(parsed, data)
    _check_budget(entries, len(data), max_elements)
    claimed = _claimed_parts(entries, parsed)
    arrays = {k: v for k, v in parsed.arrays.items() if k not in claimed}
    dtypes = {k: parsed.dtypes[k] for k in arrays}
    for name, entry in entries.items():
        try:
            arrays[name] = decode(name, entry, parsed)
        except MemoryError:
            raise ValueError(
                f"{name}: out of memory rebuilding its {padded_elements(entry)} elements"
            ) from None
        dtypes[name] = entry["dtype"]
    return Unpacked(arrays, dtypes, entries, parsed.metadata, parsed.header_len)


def padded_elements(entry: dict) -> int:
    """The elements a checked entry rebuilds to, block padding included."""
    (rows, cols), (height, width) = entry["view"], entry["block"]
    return -(-rows // height) * height * -(-cols // width) * width


def _check_budget(entries: dict[str, dict], file_bytes: int, max_elements: int | None) -> None:
    total = sum(padded_elements(entry) for entry in entries.values())
    limit = default_max_elements(file_bytes) if max_elements is None else max_elements
    if total > limit:
        rule = (
            f"the default for a {file_bytes}-byte file, max(2**24, 1024 x file size)"
            if max_elements is None
            else "max_elements"
        )
        raise ValueError(
            f"the pack declares {total} weight elements to rebuild, more than the limit "
            f"{limit} ({rule}); if the file is genuine, load it with "
            f"exporters.csr.load(path, max_elements={total})"
        )


def check_metadata(parsed: Parsed, data: bytes) -> dict[str, dict]:
    """Checks format, version, checksum and every `tensors` entry; returns the entries."""
    meta = parsed.metadata
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"not a compressor CSR pack: __metadata__ format is {meta.get('format')!r}, "
            f"expected {FORMAT!r}"
        )
    version = meta.get("version")
    if version not in READ_VERSIONS:
        raise ValueError(
            f"unsupported CSR pack version {version!r}; this reader reads versions "
            f"{', '.join(READ_VERSIONS)}"
        )
    _check_crc(parsed, data, version)
    entries = parse_json(meta.get("tensors", "").encode(), "__metadata__ 'tensors'")
    if not isinstance(entries, dict):
        raise ValueError("__metadata__ 'tensors' is not a JSON object")
    for name, entry in entries.items():
        _check_entry(name, entry, version)
    return entries


def _check_crc(parsed: Parsed, data: bytes, version: str) -> None:
    recorded = meta_crc = parsed.metadata.get("crc32")
    if version == "1":
        crc = checksum_v1(parsed, data)
    else:
        start = crc_field(data, parsed.header_len)
        recorded = bytes(data[start : start + 8]).decode("ascii")
        if meta_crc != recorded:
            raise ValueError(f"__metadata__ crc32 {meta_crc!r} is not the crc32 field's digits")
        crc = checksum_v2(data, parsed.header_len)
    if recorded != crc:
        raise ValueError(
            f"checksum mismatch (crc32 {recorded!r} recorded, {crc} computed): the file is corrupt"
        )


def _check_entry(name: str, entry, version: str) -> None:
    nm_entry = isinstance(entry, dict) and entry.get("encoding") == csr_nm.ENCODING
    keys = ENTRY_KEYS | {"nm"} if nm_entry else ENTRY_KEYS
    if not isinstance(entry, dict) or set(entry) != keys:
        raise ValueError(f"{name}: metadata entry must have exactly {sorted(keys)}")
    shape, block = entry["shape"], entry["block"]
    if not ints(shape) or len(shape) < 2 or any(d < 0 for d in shape):
        raise ValueError(f"{name}: shape {shape!r} is not a list of >= 2 sizes")
    if not ints(entry["view"]) or entry["view"] != list(view_of(tuple(shape))):
        raise ValueError(f"{name}: view {entry['view']!r} is not shape {shape} as 2-D")
    if not ints(block) or len(block) != 2 or min(block) < 1:
        raise ValueError(f"{name}: block {block!r} is not [R, C] of positive sizes")
    if version != "1" and block[0] * block[1] > MAX_BLOCK_ELEMENTS:
        raise ValueError(
            f"{name}: block {block[0]}x{block[1]} has more than {MAX_BLOCK_ELEMENTS} elements"
        )
    if nm_entry:
        csr_nm.check_entry(name, entry, version)
    elif entry["encoding"] != ("csr" if block == [1, 1] else "bcsr"):
        raise ValueError(f"{name}: encoding {entry['encoding']!r} does not fit block {block}")
    if entry["dtype"] not in FLOAT_DTYPES or entry["values"] not in VALUE_DTYPES.values():
        raise ValueError(f"{name}: bad dtype {entry['dtype']!r} or values {entry['values']!r}")
    if entry["values"] != "I8" and entry["scales"] is not None:
        raise ValueError(f"{name}: scales given for {entry['values']} values")


def _claimed_parts(entries: dict[str, dict], parsed: Parsed) -> set[str]:
    claimed = set()
    for name, entry in entries.items():
        if name in parsed.arrays:
            raise ValueError(f"{name}: stored both dense and as CSR")
        scales = f"{name}.scales"
        if entry["values"] != "I8" and scales in parsed.arrays:
            raise ValueError(f"{scales}: a scales tensor for {entry['values']} values")
        own = csr_nm.PARTS if entry["encoding"] == csr_nm.ENCODING else PARTS
        claimed |= {f"{name}.{suffix}" for suffix in own}
    return claimed
