"""The CSR weight pack: write it from a model, read it back, verify it against the model.

A pack is a safetensors file holding a model's complete state_dict: every Conv/Linear
weight for which CSR is smaller than dense (or every one, `layers="all"`) as
`NAME.values` / `NAME.col_indices` / `NAME.row_ptr` (+ `NAME.scales` for int8) of its 2-D
view, everything else dense under its own name. docs/csr-format.md specifies the bytes;
`exporters.csr_format` encodes and parses them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.errors import CompressorError, InputError
from compressor.io import atomic_write
from compressor.masks import has_machinery, prunable_layers
from compressor.patterns import Pattern
from exporters import csr_format as fmt
from exporters import csr_nm
from exporters.csr_compare import bit_equal, max_error, output_diff
from exporters.csr_pattern import plan_layouts

LAYER_CHOICES = ("auto", "all")
TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass
class CsrTensor:
    """One weight stored as CSR: its name, encoding and sizes."""

    name: str
    encoding: str
    shape: tuple[int, ...]
    nonzero: int
    stored_bytes: int
    dense_bytes: int


@dataclass
class CsrVerification:
    """How a pack compares with the model it came from.

    Attributes:
        lossless: every stored value is exact (fp32 values of fp32 weights).
        exact_weights: every rebuilt tensor equals the model's bit for bit, up to the sign
            of zero (a pruned -0.0 is not stored and comes back as +0.0).
        max_weight_error: largest |rebuilt - original| over all weights.
        max_output_diff: largest |output with rebuilt weights - original output|, when
            example inputs were given.
    """

    lossless: bool
    exact_weights: bool
    max_weight_error: float
    max_output_diff: float | None = None


@dataclass
class CsrPack:
    """What `export_csr` wrote: sizes per part, the CSR tensors, the verification."""

    path: Path
    size_bytes: int
    header_bytes: int
    values: str
    block: tuple[int, int]
    csr_tensors: list[CsrTensor] = field(default_factory=list)
    dense_tensors: int = 0
    verification: CsrVerification | None = None
    pattern: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict (the CLI's --json output)."""
        return {
            "format": "csr",
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "header_bytes": self.header_bytes,
            "values": self.values,
            "block": "x".join(map(str, self.block)),
            "csr_tensors": [vars(t) for t in self.csr_tensors],
            "dense_tensors": self.dense_tensors,
            "verification": vars(self.verification) if self.verification else None,
            "pattern": self.pattern,
            "warnings": self.warnings,
        }


def parse_block(text: str) -> tuple[int, int]:
    """`"1x4"` -> (1, 4).

    Raises:
        InputError: not two positive integers joined by x.
    """
    parts = str(text).lower().split("x")
    try:
        block = tuple(int(p) for p in parts)
    except ValueError:
        block = ()
    if len(block) != 2 or min(block) < 1:
        raise InputError(f"block {text!r} is not RxC with positive integers, e.g. 1x4")
    return block


def export_csr(
    model: nn.Module,
    path: str | Path,
    example_inputs: tuple | None = None,
    *,
    values: str = "fp32",
    block: tuple[int, int] | None = None,
    layers: str = "auto",
    report: dict | None = None,
    verify: bool = True,
    protect: tuple = (),
) -> CsrPack:
    """Writes `model`'s weights as a CSR pack, verified by reading the file back.

    Args:
        model: a plain model (no masks or other parametrizations left on it).
        path: the output file; written atomically, never onto a `protect`ed path.
        example_inputs: inputs to compare the model's outputs with the pack's weights.
        values: value type of CSR tensors: "fp32", "fp16" or "int8" (per-row scales).
        block: block shape (R, C) of every weight; (1, 1) is plain CSR. None: the layout
            of the pattern `report` names (`exporters.csr_pattern`), plain CSR without one.
            A block the model was not pruned to adds a warning to the result.
        layers: "auto" stores a Conv/Linear weight as CSR when that is smaller than dense;
            "all" stores every Conv/Linear weight as CSR.
        report: the compression report, stored as JSON in the metadata.
        verify: read the written pack back and check it (see `verify`).
        protect: paths the output must not overwrite (the model's own file).

    Raises:
        InputError: bad options, or a model with masks still installed.
        CompressorError: the pack does not rebuild the model (nothing is written then).
    """
    _check_options(model, values, (1, 1) if block is None else block, layers)
    plan = plan_layouts(model, report, block)
    tensors, entries, infos = _encode_state(model, values, plan.block, layers, plan.layouts)
    data = _serialize(tensors, entries, report)
    pack = CsrPack(Path(path), len(data), 8 + _header_len(data), values, plan.block, infos)
    pack.pattern, pack.warnings = plan.pattern, plan.warnings
    pack.dense_tensors = len(model.state_dict()) - len(infos)

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)
        if verify:
            # what this very model needs: an ultra-sparse pack may exceed the default cap
            needed = sum(fmt.padded_elements(entry) for entry in entries.values())
            pack.verification = _verify(tmp, model, example_inputs, needed)

    atomic_write(path, write, protect=protect)
    return pack


def load(path: str | Path, max_elements: int | None = None) -> dict[str, torch.Tensor]:
    """Reads a pack and rebuilds every tensor dense, in its original shape and dtype.

    Args:
        path: the pack (format version 1 or 2).
        max_elements: the most elements its CSR weights may rebuild to, in all; by
            default max(2**24, 1024 x the file's size in bytes), enough for any real pack
            up to 99.9 % sparse. Checked from the header, before anything is allocated.

    Raises:
        ValueError: (an `InputError`) the file is missing, truncated or corrupt, declares
            more than `max_elements`, or does not fit in memory; the message says what.
    """
    return {name: tensor for name, tensor, _ in _read(path, max_elements)[0]}


def verify(
    pack_path: str | Path,
    model: nn.Module,
    example_inputs: tuple | None = None,
    max_elements: int | None = None,
) -> CsrVerification:
    """Checks a pack against `model`: its tensors, and its outputs on `example_inputs`.

    fp32 packs must rebuild every tensor exactly (up to the sign of zero) and give
    identical outputs; fp16 / int8 packs report their largest weight and output errors.
    `max_elements` is `load`'s.

    Raises:
        ValueError: the pack is corrupt.
        CompressorError: names, shapes or dtypes differ from the model's, or a lossless
            pack does not rebuild it exactly.
    """
    return _verify(pack_path, model, example_inputs, max_elements)


def _verify(pack_path, model: nn.Module, example_inputs, max_elements=None) -> CsrVerification:
    rows, entries = _read(pack_path, max_elements)
    rebuilt = {name: tensor for name, tensor, _ in rows}
    state = model.state_dict()
    _check_names(rebuilt, state)
    lossless = all(e["values"] == "F32" and e["dtype"] != "F64" for e in entries.values())
    errors = {name: max_error(state[name], tensor) for name, tensor in rebuilt.items()}
    exact = all(bit_equal(state[name], tensor) for name, tensor in rebuilt.items())
    if lossless and not exact:
        worst = max(errors, key=errors.get)
        raise CompressorError(
            f"the pack does not rebuild the weights exactly: {worst} is off by {errors[worst]:.3g}"
        )
    result = CsrVerification(lossless, exact, max(errors.values(), default=0.0))
    if example_inputs is not None:
        result.max_output_diff = output_diff(model, rebuilt, tuple(example_inputs))
        if lossless and result.max_output_diff != 0.0:
            raise CompressorError(
                "the model run from the pack's weights differs from the original: max abs "
                f"difference {result.max_output_diff:.3g}"
            )
    return result


def _read(path, max_elements=None) -> tuple[list[tuple[str, torch.Tensor, str]], dict]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read CSR pack {str(path)!r}: {exc.strerror or exc}") from None
    except MemoryError:
        raise InputError(f"CSR pack {str(path)!r} does not fit in memory") from None
    try:
        unpacked = fmt.unpack(data, max_elements)
        rows = [
            (name, _to_torch(array, unpacked.dtypes[name]), unpacked.dtypes[name])
            for name, array in unpacked.arrays.items()
        ]
    except ValueError as exc:
        raise InputError(f"{str(path)!r} is not a valid CSR pack: {exc}") from None
    except MemoryError:
        raise InputError(f"CSR pack {str(path)!r}: out of memory rebuilding it") from None
    return rows, unpacked.entries


def _to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array))  # a writable copy, out of the file's bytes
    if dtype == "BF16" and tensor.dtype == torch.uint16:
        return tensor.view(torch.bfloat16)
    return tensor.to(TORCH_DTYPES[dtype])


def _check_options(model: nn.Module, values: str, block, layers: str) -> None:
    if values not in fmt.VALUE_DTYPES:
        raise InputError(f"values {values!r}: use one of {', '.join(fmt.VALUE_DTYPES)}")
    if layers not in LAYER_CHOICES:
        raise InputError(f"layers {layers!r}: use one of {', '.join(LAYER_CHOICES)}")
    if len(tuple(block)) != 2 or min(block) < 1 or not all(isinstance(b, int) for b in block):
        raise InputError(f"block {block!r} must be (R, C) of positive integers")
    if block[0] * block[1] > fmt.MAX_BLOCK_ELEMENTS:
        raise InputError(
            f"block {block[0]}x{block[1]} has more than {fmt.MAX_BLOCK_ELEMENTS} elements; "
            "use a smaller block, e.g. 1x4"
        )
    leftovers = has_machinery(model)
    if leftovers:
        raise InputError(
            f"the model still has parametrizations on {', '.join(leftovers[:3])}; finalize the "
            "method (or compressor.masks.strip_) before packing"
        )


def _encode_state(model: nn.Module, values: str, block: tuple[int, int], layers: str, own=None):
    """The pack's tensors, metadata entries and CSR tensor descriptions."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights = {f"{fqn}.weight" for fqn in prunable_layers(model)}
    tensors, entries, infos = {}, {}, []
    for name, tensor in state.items():
        encoded = None
        if name in weights and tensor.is_floating_point() and tensor.dim() >= 2:
            layout = (own or {}).get(name, block)
            encoded = _encode_weight(name, tensor, values, layout, layers)
        if encoded is None:
            tensors[name] = tensor.contiguous().clone()  # clones: shared storage is refused
            continue
        parts, entry, info = encoded
        _check_free(name, parts, state)
        tensors.update(parts)
        entries[name] = entry
        infos.append(info)
    return tensors, entries, infos


def _encode_weight(name: str, tensor: torch.Tensor, values: str, layout, layers: str):
    # numpy has no bfloat16; its values are exact in float32
    array = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    try:
        if isinstance(layout, Pattern):
            parts, entry = csr_nm.encode(array, values, layout.a, layout.b)
        else:
            parts, entry = fmt.encode(array, values, layout)
    except ValueError as exc:
        raise CompressorError(f"{name}: {exc}; pack it with --values fp32 or int8") from None
    stored = sum(a.nbytes for a in parts.values())
    dense = tensor.numel() * tensor.element_size()
    if layers == "auto" and stored >= dense:
        return None
    entry["dtype"] = DTYPE_NAMES[tensor.dtype]
    entry["scales"] = f"{name}.scales" if "scales" in parts else None
    nonzero = int(torch.count_nonzero(tensor))
    info = CsrTensor(name, entry["encoding"], tuple(tensor.shape), nonzero, stored, dense)
    named = {
        f"{name}.{part}": torch.from_numpy(np.ascontiguousarray(a)) for part, a in parts.items()
    }
    return named, entry, info


def _check_free(name: str, parts: dict, state: dict) -> None:
    taken = [key for key in parts if key in state]
    if taken:
        raise CompressorError(
            f"cannot pack {name} as CSR: the model already has a tensor named {taken[0]!r}; "
            "use layers='auto' or rename it"
        )


def _serialize(tensors: dict, entries: dict, report: dict | None) -> bytes:
    """The pack's bytes (safetensors), metadata and checksum included."""
    from safetensors.torch import save

    meta = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "crc32": fmt.PLACEHOLDER.decode("ascii"),
        "tensors": json.dumps(entries, separators=(",", ":")),
    }
    if report is not None:
        meta["report"] = json.dumps(report, default=str, separators=(",", ":"))
    try:
        # Version 2's checksum covers the whole file with its own digits read as zeros,
        # so it is computed on the written bytes and patched into them (no re-layout).
        return fmt.seal(save(tensors, metadata=meta))
    except ValueError as exc:  # a tensor name or the report that mimics the crc32 field
        raise CompressorError(f"cannot checksum the pack: {exc}") from None


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def _check_names(rebuilt: dict, state: dict) -> None:
    missing = sorted(set(state) - set(rebuilt))
    extra = sorted(set(rebuilt) - set(state))
    if missing or extra:
        raise CompressorError(
            f"the pack does not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, tensor in rebuilt.items():
        if tensor.shape != state[name].shape or tensor.dtype != state[name].dtype:
            raise CompressorError(
                f"{name}: the pack holds {tuple(tensor.shape)} {tensor.dtype}, the model "
                f"{tuple(state[name].shape)} {state[name].dtype}"
            )
