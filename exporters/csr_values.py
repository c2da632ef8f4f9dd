"""Stored values and parts shared by every CSR-pack layout (CSR, block-CSR, N:M).

docs/csr-format.md section 4 ("Values") specifies the value types: fp32, fp16 (refused
past +-65504) and int8 with one symmetric scale per row of the 2-D view. The writer
quantizes the whole view here, and each layout gathers what it stores from the result;
the reader checks a part's dtype and shape and dequantizes the rebuilt view the same way.
"""

from __future__ import annotations

import numpy as np

from exporters.csr_header import Parsed

VALUE_DTYPES = {"fp32": "F32", "fp16": "F16", "int8": "I8"}
INT8_MAX = 127  # symmetric int8: -127..127, so -x is representable for every x
FP16_MAX = 65504.0


def quantize(padded: np.ndarray, rows: int, values: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The view (maybe padded past `rows`) in the stored value dtype, and int8 row scales."""
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


def part(name: str, suffix: str, parsed: Parsed, dtypes: tuple, shape: list) -> np.ndarray:
    """The tensor NAME.SUFFIX, checked to have one of `dtypes` and exactly `shape`."""
    key = f"{name}.{suffix}"
    if key not in parsed.arrays:
        raise ValueError(f"{name}: the pack has no {key!r} tensor")
    array = parsed.arrays[key]
    if parsed.dtypes[key] not in dtypes:
        raise ValueError(f"{key}: dtype {parsed.dtypes[key]} is not one of {', '.join(dtypes)}")
    if list(array.shape) != list(shape):
        raise ValueError(f"{key}: shape {list(array.shape)} disagrees with the expected {shape}")
    return array


def finish(name: str, view: np.ndarray, entry: dict, parsed: Parsed) -> np.ndarray:
    """The rebuilt [rows, cols] view as the weight: dequantized, cast and reshaped."""
    # Stored values (F32, F16, I8) are exact in float32; int8 is dequantized there too,
    # float32(q) * scale, as a C reader would.
    view = view.astype(np.float32)
    if entry["values"] == "I8":
        view = view * _scales(name, entry, parsed, view.shape[0])[:, None]
    out = np.float64 if entry["dtype"] == "F64" else np.float32
    return view.astype(out).reshape(entry["shape"])


def _scales(name: str, entry: dict, parsed: Parsed, rows: int) -> np.ndarray:
    if entry.get("scales") != f"{name}.scales":
        raise ValueError(f'{name}: int8 values need "scales": "{name}.scales"')
    scales = part(name, "scales", parsed, ("F32",), [rows])
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise ValueError(f"{name}.scales must be finite and non-negative")
    return scales.astype(np.float32)
