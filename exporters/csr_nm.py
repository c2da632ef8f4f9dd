"""The CSR pack's N:M layout: N value slots and N packed column offsets per M-column group.

docs/csr-format.md section 4b specifies the bytes. For a weight whose 2-D view [rows, cols]
has at most N non-zeros in every group of M consecutive columns (cols a multiple of M):

- ``NAME.values`` [rows, cols / M * N]: per row, per group, N slots in column order;
- ``NAME.indices`` U8 [ceil(rows * cols / M * N * b / 8)]: each slot's column offset in
  its group (0..M-1) in b = ceil(log2 M) bits, packed little-endian (LSB first);
- ``NAME.scales`` F32 [rows] for int8 values, as in every layout.

A group with fewer than N non-zeros fills its remaining slots with +0.0 at the lowest free
offsets, so the offsets of a group are strictly increasing and the layout is unique: the
writer's output is a function of the weight, and a reader can reject anything else.
"""

from __future__ import annotations

import numpy as np

from exporters.csr_header import Parsed, ints
from exporters.csr_values import VALUE_DTYPES, finish, part, quantize

ENCODING = "nm"
# The parts of an N:M weight NAME (NAME.scales only with int8 values).
PARTS = ("values", "indices", "scales")
# As compressor.patterns.MAX_GROUP: past 32 an N:M group buys no kernel we know of.
MAX_GROUP = 32


def index_bits(m: int) -> int:
    """Bits per stored column offset: ceil(log2 M), at least 1 (2:4 -> 2, 4:8 -> 3)."""
    return max(1, (m - 1).bit_length())


def pack_bits(offsets: np.ndarray, bits: int) -> np.ndarray:
    """Packs integers < 2**bits into bytes, `bits` each, little-endian (LSB first)."""
    flat = offsets.reshape(-1).astype(np.int64)
    stream = (flat[:, None] >> np.arange(bits)) & 1
    return np.packbits(stream.reshape(-1).astype(np.uint8), bitorder="little")


def unpack_bits(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The `count` integers of `pack_bits`; the bits past them must be zero."""
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    if np.any(stream[count * bits :]):
        raise ValueError(f"non-zero padding bits after the last of {count} indices")
    fields = stream[: count * bits].reshape(count, bits).astype(np.int64)
    return fields @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def encode(weight: np.ndarray, values: str, n: int, m: int) -> tuple[dict, dict]:
    """Encodes one weight (rank >= 2) in the N:M layout.

    Args:
        weight: the dense weight, any float dtype; its view must follow N:M.
        values: "fp32", "fp16" or "int8" (per-row symmetric scales).
        n, m: keep at most `n` of every `m` consecutive columns.

    Returns:
        ({part: array}, the metadata entry without "dtype" and "scales").

    Raises:
        ValueError: the column count is not a multiple of M, a group holds more than N
            non-zeros, or values outside fp16's range.
    """
    rows, cols = weight.shape[0], int(np.prod(weight.shape[1:]))
    if cols % m:
        raise ValueError(f"{cols} columns are not a multiple of {m}: no {n}:{m} layout")
    groups = weight.reshape(rows, cols // m, m)
    nonzero = groups != 0  # -0.0 is a zero here, as in CSR (docs/csr-format.md section 4)
    counts = nonzero.sum(axis=-1)
    if counts.size and counts.max() > n:
        row, group = np.unravel_index(int(np.argmax(counts)), counts.shape)
        raise ValueError(
            f"row {row}, columns {group * m}..{group * m + m - 1} hold {counts[row, group]} "
            f"non-zeros, more than {n} of {m}"
        )
    # Non-zeros first, each class by position; the first N, back in column order.
    offsets = np.sort(np.argsort(~nonzero, axis=-1, kind="stable")[..., :n], axis=-1)
    stored, scales = quantize(weight.reshape(rows, cols), rows, values)
    slots = np.take_along_axis(stored.reshape(rows, cols // m, m), offsets, axis=-1)
    kept = np.take_along_axis(nonzero, offsets, axis=-1)
    slots = np.where(kept, slots, np.zeros((), slots.dtype)).astype(slots.dtype)
    parts = {
        "values": slots.reshape(rows, cols // m * n),
        "indices": pack_bits(offsets, index_bits(m)),
    }
    if scales is not None:
        parts["scales"] = scales
    entry = {
        "encoding": ENCODING,
        "shape": list(weight.shape),
        "view": [rows, cols],
        "block": [1, m],
        "nm": [n, m],
        "values": VALUE_DTYPES[values],
    }
    return parts, entry


def check_entry(name: str, entry: dict, version: str) -> None:
    """The N:M-specific rules of a `tensors` entry (the shared ones are csr_format's)."""
    if version == "1":
        raise ValueError(f"{name}: encoding 'nm' does not exist in version 1 packs")
    nm = entry["nm"]
    if not ints(nm) or len(nm) != 2 or not 1 <= nm[0] < nm[1] <= MAX_GROUP:
        raise ValueError(f"{name}: nm {nm!r} is not [N, M] with 1 <= N < M <= {MAX_GROUP}")
    if entry["block"] != [1, nm[1]]:
        raise ValueError(f"{name}: block {entry['block']!r} of an {nm} entry must be [1, M]")
    if entry["view"][1] % nm[1]:
        raise ValueError(f"{name}: {entry['view'][1]} columns are not a multiple of M={nm[1]}")


def decode(name: str, entry: dict, parsed: Parsed) -> np.ndarray:
    """Rebuilds the dense weight NAME from its N:M parts, checking every offset.

    Raises:
        ValueError: parts missing or of the wrong dtype/shape, an offset >= M, offsets
            not strictly increasing within a group, non-zero padding bits, bad scales.
    """
    rows, cols = entry["view"]
    n, m = entry["nm"]
    groups, bits = cols // m, index_bits(m)
    count = rows * groups * n
    values = part(name, "values", parsed, (entry["values"],), [rows, groups * n])
    packed = part(name, "indices", parsed, ("U8",), [-(-count * bits // 8)])
    offsets = unpack_bits(packed, count, bits).reshape(rows, groups, n)
    if count and offsets.max() >= m:
        raise ValueError(f"{name}.indices: an offset {int(offsets.max())} is not below M={m}")
    if np.any(np.diff(offsets, axis=-1) <= 0):
        raise ValueError(f"{name}.indices: offsets not strictly increasing within a group")
    full = np.zeros((rows, groups, m), dtype=values.dtype)
    np.put_along_axis(full, offsets, values.reshape(rows, groups, n), axis=-1)
    return finish(name, full.reshape(rows, cols), entry, parsed)
