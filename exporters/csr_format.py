"""The CSR pack's on-disk format: encoding weights, and reading raw bytes with validation.

The pack is a plain safetensors file (docs/csr-format.md has the full specification):

    [8 bytes: u64 little-endian N][N bytes: JSON header][data section: raw tensors]

This module encodes one weight into its CSR / block-CSR arrays and parses a pack from its
raw bytes, checking every length, offset, dtype and index before using it, so that any
corrupt file raises `ValueError` with a message and never another exception or a silently
wrong tensor (the data section is covered by a CRC-32 as well).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

FORMAT = "compressor.csr"
VERSION = "1"
# Tensor name suffixes of one CSR-encoded weight NAME.
PARTS = ("values", "col_indices", "row_ptr", "scales")

# safetensors dtype names -> little-endian numpy dtypes. BF16 has no numpy type; it is
# read as raw 16-bit words and reinterpreted by the caller.
DTYPES = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F64": np.dtype("<f8"),
}
VALUE_DTYPES = {"fp32": "F32", "fp16": "F16", "int8": "I8"}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
INDEX_DTYPES = ("U8", "U16", "I32")
ROW_PTR_DTYPES = ("I32", "I64")
INT8_MAX = 127  # symmetric int8: -127..127, so -x is representable for every x
FP16_MAX = 65504.0
# A header past this size is not one we wrote: refuse it before decoding it.
MAX_HEADER = 100 * 2**20


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
    keep = _blocks(padded, block).any(axis=(2, 3))
    block_rows, block_cols = np.nonzero(keep)  # row-major: sorted by row, then column
    stored, scales = _values(padded, rows, values)
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


def _blocks(padded: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[brows*R, bcols*C] -> [brows, bcols, R, C] (a view)."""
    height, width = block
    brows, bcols = padded.shape[0] // height, padded.shape[1] // width
    return padded.reshape(brows, height, bcols, width).transpose(0, 2, 1, 3)


def _values(padded: np.ndarray, rows: int, values: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The padded view in the stored value dtype, and the int8 per-row scales."""
    if values == "fp32":
        return padded.astype("<f4"), None
    if values == "fp16":
        finite = np.isfinite(padded)
        if np.any(np.abs(padded[finite]) > FP16_MAX):
            raise ValueError(f"weights beyond fp16's range (|w| > {FP16_MAX:g})")
        return padded.astype("<f2"), None
    if values != "int8":
        raise ValueError(f"unknown value type {values!r}; use one of {', '.join(VALUE_DTYPES)}")
    peak = np.abs(padded.astype(np.float32)).max(axis=1, initial=0.0)
    scales = (peak / INT8_MAX).astype("<f4")
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(padded.astype(np.float32) / safe[:, None]), -INT8_MAX, INT8_MAX)
    return quantized.astype("<i1"), scales[:rows].copy()


# --- reading --------------------------------------------------------------------------------


@dataclass
class Parsed:
    """A safetensors file read from raw bytes.

    Attributes:
        arrays: name -> array, a view into the file's bytes (BF16 as raw uint16 words).
        dtypes: name -> safetensors dtype name (the header's, since BF16 and U16 share a
            numpy dtype).
        offsets: name -> (begin, end) in the data section.
        metadata: the header's `__metadata__`.
        header_len: N, the header's length in bytes.
    """

    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]
    offsets: dict[str, tuple[int, int]]
    metadata: dict[str, str]
    header_len: int


def parse(data: bytes) -> Parsed:
    """Parses a safetensors file from raw bytes, validating its structure.

    Raises:
        ValueError: a truncated file, a bad header, bad dtypes/shapes/offsets, or offsets
            that overlap, leave gaps or run past the data.
    """
    if len(data) < 8:
        raise ValueError(f"file is {len(data)} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, MAX_HEADER):
        raise ValueError(
            f"header length {header_len} runs past the end of the {len(data)}-byte file "
            "(truncated or corrupt)"
        )
    header = _json(data[8 : 8 + header_len], "header")
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise ValueError("header has no __metadata__ of string keys and values")
    body = memoryview(data)[8 + header_len :]
    arrays = {name: _array(name, entry, body) for name, entry in header.items()}
    _check_layout(header, len(body))
    dtypes = {k: v["dtype"] for k, v in header.items()}
    offsets = {k: tuple(v["data_offsets"]) for k, v in header.items()}
    return Parsed(arrays, dtypes, offsets, meta, header_len)


def checksum(parsed: Parsed, data: bytes) -> str:
    """The pack's CRC-32 (zlib's), as 8 lowercase hex digits.

    It covers, in this order: one line per tensor in data-offset order,
    `NAME\tDTYPE\tD0,D1,...\tBEGIN\tEND\n`; the `tensors` metadata string; the data
    section. So a changed name, dtype, shape, offset, CSR entry or data byte is caught.
    """
    crc = zlib.crc32(_table(parsed).encode("utf-8"))
    crc = zlib.crc32(parsed.metadata.get("tensors", "").encode("utf-8"), crc)
    crc = zlib.crc32(memoryview(data)[8 + parsed.header_len :], crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def _table(parsed: Parsed) -> str:
    rows = sorted(
        (*parsed.offsets[name], name, parsed.dtypes[name], parsed.arrays[name].shape)
        for name in parsed.arrays
    )
    return "".join(
        f"{name}\t{dtype}\t{','.join(map(str, shape))}\t{begin}\t{end}\n"
        for begin, end, name, dtype, shape in rows
    )


def _json(raw, what: str):
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not valid UTF-8 JSON: {str(exc)[:120]}") from None


def _array(name: str, entry, body: memoryview) -> np.ndarray:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not _ints(shape) or any(d < 0 for d in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not _ints(offsets) or len(offsets) != 2:
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= len(body):
        raise ValueError(
            f"tensor {name!r}: data_offsets [{begin}, {end}] outside the {len(body)}-byte data"
        )
    count = math.prod(shape)
    if end - begin != count * DTYPES[dtype].itemsize:
        raise ValueError(
            f"tensor {name!r}: {end - begin} bytes of data for shape {shape} of {dtype}"
        )
    return np.frombuffer(body, dtype=DTYPES[dtype], count=count, offset=begin).reshape(shape)


def _ints(value) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _check_layout(header: dict, size: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing after."""
    position = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = entry["data_offsets"]
        if begin != position:
            kind = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise ValueError(f"tensor {name!r} at offset {begin} {kind} (expected {position})")
        position = end
    if position != size:
        raise ValueError(f"{size - position} bytes of data after the last tensor")


def decode(name: str, entry: dict, parsed: Parsed) -> np.ndarray:
    """Rebuilds the dense weight NAME from its parts, checking every index.

    Returns:
        The weight in its original shape, float32 (float64 for an F64 weight).

    Raises:
        ValueError: parts missing or of the wrong dtype/shape, row_ptr not monotone, column
            indices out of range or unsorted, non-zero padding, bad int8 scales.
    """
    rows, cols = entry["view"]
    height, width = entry["block"]
    brows, bcols = -(-rows // height), -(-cols // width)
    row_ptr = _part(name, "row_ptr", parsed, ROW_PTR_DTYPES, [brows + 1]).astype(np.int64)
    nblocks = _check_row_ptr(name, row_ptr)
    col_idx = _part(name, "col_indices", parsed, INDEX_DTYPES, [nblocks]).astype(np.int64)
    shape = [nblocks] if entry["encoding"] == "csr" else [nblocks, height, width]
    values = _part(name, "values", parsed, (entry["values"],), shape)
    block_rows = np.repeat(np.arange(brows), np.diff(row_ptr))
    _check_columns(name, col_idx, block_rows, bcols)
    padded = np.zeros((brows, bcols, height, width), dtype=values.dtype)
    padded[block_rows, col_idx] = values.reshape(nblocks, height, width)
    full = padded.transpose(0, 2, 1, 3).reshape(brows * height, bcols * width)
    if np.any(full[rows:]) or np.any(full[:, cols:]):
        raise ValueError(
            f"{name}: non-zero values in the block padding past the view {rows}x{cols}"
        )
    # Stored values (F32, F16, I8) are exact in float32; int8 is dequantized there too,
    # float32(q) * scale, as a C reader would.
    view = full[:rows, :cols].astype(np.float32)
    if entry["values"] == "I8":
        view = view * _scales(name, entry, parsed, rows)[:, None]
    return view.astype(np.float64 if entry["dtype"] == "F64" else np.float32).reshape(
        entry["shape"]
    )


def _part(name: str, part: str, parsed: Parsed, dtypes: tuple, shape: list) -> np.ndarray:
    key = f"{name}.{part}"
    if key not in parsed.arrays:
        raise ValueError(f"{name}: the pack has no {key!r} tensor")
    array = parsed.arrays[key]
    if parsed.dtypes[key] not in dtypes:
        raise ValueError(f"{key}: dtype {parsed.dtypes[key]} is not one of {', '.join(dtypes)}")
    if list(array.shape) != list(shape):
        raise ValueError(f"{key}: shape {list(array.shape)} disagrees with the expected {shape}")
    return array


def _check_row_ptr(name: str, row_ptr: np.ndarray) -> int:
    if row_ptr[0] != 0:
        raise ValueError(f"{name}.row_ptr starts at {row_ptr[0]}, not 0")
    if np.any(np.diff(row_ptr) < 0):
        raise ValueError(f"{name}.row_ptr is not monotone (non-decreasing)")
    return int(row_ptr[-1])


def _check_columns(name: str, col_idx: np.ndarray, block_rows: np.ndarray, bcols: int) -> None:
    if len(col_idx) and (col_idx.min() < 0 or col_idx.max() >= bcols):
        raise ValueError(f"{name}.col_indices out of range: must lie in [0, {bcols})")
    same_row = block_rows[1:] == block_rows[:-1]
    if np.any(np.diff(col_idx)[same_row] <= 0):
        raise ValueError(f"{name}.col_indices not strictly increasing within a row")


def _scales(name: str, entry: dict, parsed: Parsed, rows: int) -> np.ndarray:
    if entry.get("scales") != f"{name}.scales":
        raise ValueError(f'{name}: int8 values need "scales": "{name}.scales"')
    scales = _part(name, "scales", parsed, ("F32",), [rows])
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise ValueError(f"{name}.scales must be finite and non-negative")
    return scales.astype(np.float32)


# --- the pack as a whole --------------------------------------------------------------------

ENTRY_KEYS = {"encoding", "shape", "view", "dtype", "values", "block", "scales"}
# The reader refuses to rebuild a weight larger than this many elements (4 GiB of fp32):
# no edge model has one, and a corrupt shape must not make the reader allocate terabytes.
MAX_DENSE = 2**30


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


def unpack(data: bytes) -> Unpacked:
    """Parses and validates a whole pack and rebuilds its CSR weights as dense arrays.

    Raises:
        ValueError: anything wrong with the file, with a message saying what.
    """
    parsed = parse(data)
    entries = check_metadata(parsed, data)
    claimed = _claimed_parts(entries, parsed)
    arrays = {k: v for k, v in parsed.arrays.items() if k not in claimed}
    dtypes = {k: parsed.dtypes[k] for k in arrays}
    for name, entry in entries.items():
        arrays[name] = decode(name, entry, parsed)
        dtypes[name] = entry["dtype"]
    return Unpacked(arrays, dtypes, entries, parsed.metadata, parsed.header_len)


def check_metadata(parsed: Parsed, data: bytes) -> dict[str, dict]:
    """Checks format, version, checksum and every `tensors` entry; returns the entries."""
    meta = parsed.metadata
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"not a compressor CSR pack: __metadata__ format is {meta.get('format')!r}, "
            f"expected {FORMAT!r}"
        )
    if meta.get("version") != VERSION:
        raise ValueError(
            f"unsupported CSR pack version {meta.get('version')!r}; this reader reads "
            f"version {VERSION}"
        )
    crc = checksum(parsed, data)
    if meta.get("crc32") != crc:
        raise ValueError(
            f"checksum mismatch (crc32 {meta.get('crc32')!r} recorded, {crc} computed): "
            "the file is corrupt"
        )
    entries = _json(meta.get("tensors", "").encode(), "__metadata__ 'tensors'")
    if not isinstance(entries, dict):
        raise ValueError("__metadata__ 'tensors' is not a JSON object")
    for name, entry in entries.items():
        _check_entry(name, entry)
    return entries


def _check_entry(name: str, entry) -> None:
    if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
        raise ValueError(f"{name}: metadata entry must have exactly {sorted(ENTRY_KEYS)}")
    shape, block = entry["shape"], entry["block"]
    if not _ints(shape) or len(shape) < 2 or any(d < 0 for d in shape):
        raise ValueError(f"{name}: shape {shape!r} is not a list of >= 2 sizes")
    if not _ints(entry["view"]) or entry["view"] != list(view_of(tuple(shape))):
        raise ValueError(f"{name}: view {entry['view']!r} is not shape {shape} as 2-D")
    if not _ints(block) or len(block) != 2 or min(block) < 1:
        raise ValueError(f"{name}: block {block!r} is not [R, C] of positive sizes")
    if entry["encoding"] != ("csr" if block == [1, 1] else "bcsr"):
        raise ValueError(f"{name}: encoding {entry['encoding']!r} does not fit block {block}")
    if entry["dtype"] not in FLOAT_DTYPES or entry["values"] not in VALUE_DTYPES.values():
        raise ValueError(f"{name}: bad dtype {entry['dtype']!r} or values {entry['values']!r}")
    if entry["values"] != "I8" and entry["scales"] is not None:
        raise ValueError(f"{name}: scales given for {entry['values']} values")
    rows, cols = entry["view"]
    padded = -(-rows // block[0]) * block[0] * -(-cols // block[1]) * block[1]
    if padded > MAX_DENSE:
        raise ValueError(f"{name}: {padded} elements is more than this reader rebuilds")


def _claimed_parts(entries: dict[str, dict], parsed: Parsed) -> set[str]:
    claimed = set()
    for name, entry in entries.items():
        if name in parsed.arrays:
            raise ValueError(f"{name}: stored both dense and as CSR")
        scales = f"{name}.scales"
        if entry["values"] != "I8" and scales in parsed.arrays:
            raise ValueError(f"{scales}: a scales tensor for {entry['values']} values")
        claimed |= {f"{name}.{part}" for part in PARTS}
    return claimed
