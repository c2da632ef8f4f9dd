"""The CSR pack's safetensors layer: parsing the header and data layout, and the checksums.

docs/csr-format.md sections 1, 5 and 6 specify what this module checks. `parse` turns raw
bytes into validated arrays (views into the bytes) or raises `ValueError`; `checksum_v1` /
`checksum_v2` compute the two versions' CRC-32, and `seal` writes a version-2 checksum
into a freshly written pack.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

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
# A header past this size is not one we wrote: refuse it before decoding it.
MAX_HEADER = 100 * 2**20
# Version 2's checksum field: these bytes, 8 lowercase hex digits, a closing quote.
CRC_MARKER = b'"crc32":"'
CRC_DIGITS = 8
PLACEHOLDER = b"0" * CRC_DIGITS


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
        ValueError: a truncated file, a bad header (duplicate keys included), bad
            dtypes/shapes/offsets, or offsets that overlap, leave gaps or run past the data.
    """
    if len(data) < 8:
        raise ValueError(f"file is {len(data)} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, MAX_HEADER):
        raise ValueError(
            f"header length {header_len} runs past the end of the {len(data)}-byte file "
            "(truncated or corrupt)"
        )
    header = parse_json(data[8 : 8 + header_len], "header")
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


def parse_json(raw, what: str):
    """JSON text -> value; a duplicate key in any object is an error, not "last one wins"."""
    try:
        return json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{what} is not valid UTF-8 JSON: {str(exc)[:120]}") from None
    except ValueError as exc:  # json's own errors and _unique_keys's
        raise ValueError(f"{what}: {str(exc)[:160]}") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            # Readers disagree on which duplicate wins, so the file means two things.
            raise ValueError(f"duplicate key {key!r} in a JSON object")
        result[key] = value
    return result


def checksum_v1(parsed: Parsed, data: bytes) -> str:
    """Version 1's CRC-32 (zlib's), as 8 lowercase hex digits.

    It covers, in this order: one line per tensor in data-offset order,
    `NAME\tDTYPE\tD0,D1,...\tBEGIN\tEND\n`; the `tensors` metadata string; the data
    section. The rest of the header (other metadata, whitespace) is not covered.
    """
    crc = zlib.crc32(_table(parsed).encode("utf-8"))
    crc = zlib.crc32(parsed.metadata.get("tensors", "").encode("utf-8"), crc)
    crc = zlib.crc32(memoryview(data)[8 + parsed.header_len :], crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def crc_field(data: bytes, header_len: int) -> int:
    """Offset in `data` of version 2's 8 checksum digits (docs/csr-format.md section 5).

    Raises:
        ValueError: the header holds `"crc32":"` zero or several times, or not followed by
            8 lowercase hex digits and a quote.
    """
    header = bytes(data[8 : 8 + header_len])
    at = header.find(CRC_MARKER)
    if at < 0 or header.find(CRC_MARKER, at + 1) >= 0:
        count = header.count(CRC_MARKER)
        raise ValueError(f'header holds {count} "crc32" fields written as {CRC_MARKER}, not 1')
    start = 8 + at + len(CRC_MARKER)
    digits = data[start : start + CRC_DIGITS + 1]
    if len(digits) != CRC_DIGITS + 1 or digits[-1:] != b'"' or not _is_hex(digits[:-1]):
        raise ValueError("the crc32 field is not 8 lowercase hex digits")
    return start


def _is_hex(digits: bytes) -> bool:
    return all(48 <= b <= 57 or 97 <= b <= 102 for b in digits)


def checksum_v2(data: bytes, header_len: int) -> str:
    """Version 2's CRC-32: the whole file with the checksum digits read as `00000000`."""
    start = crc_field(data, header_len)
    view = memoryview(data)
    crc = zlib.crc32(view[:start])
    crc = zlib.crc32(PLACEHOLDER, crc)
    crc = zlib.crc32(view[start + CRC_DIGITS :], crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def seal(data: bytes) -> bytes:
    """`data` with its version-2 checksum written into the crc32 field's digits."""
    (header_len,) = struct.unpack("<Q", data[:8])
    start = crc_field(data, header_len)
    crc = checksum_v2(data, header_len).encode("ascii")
    return data[:start] + crc + data[start + CRC_DIGITS :]


def _table(parsed: Parsed) -> str:
    rows = sorted(
        (*parsed.offsets[name], name, parsed.dtypes[name], parsed.arrays[name].shape)
        for name in parsed.arrays
    )
    return "".join(
        f"{name}\t{dtype}\t{','.join(map(str, shape))}\t{begin}\t{end}\n"
        for begin, end, name, dtype, shape in rows
    )


def _array(name: str, entry, body: memoryview) -> np.ndarray:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not ints(shape) or any(d < 0 for d in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not ints(offsets) or len(offsets) != 2:
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


def ints(value) -> bool:
    """True for a list of Python ints (JSON integers; not bools, not floats)."""
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
