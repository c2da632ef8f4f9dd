"""The CSR pack: exact round trips, scipy as the oracle, and a reader that only says ValueError."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

from compressor import zoo
from compressor.errors import CompressorError, InputError
from compressor.masks import apply_masks_, prunable_layers
from compressor.methods import prune
from exporters import csr
from exporters import csr_format as fmt


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread for this module's tiny models, the caller's setting restored after.

    They gain nothing from a second thread, and on a busy 2-core machine OpenMP's
    spin-waiting made a small ResNet forward take 1.5 s instead of 2 ms.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(seed: int = 0) -> nn.Module:
    """Conv (25 columns: uint8 indices) + BN + Linear (288 columns: uint16 indices)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)
    )
    model[1].running_mean.normal_()  # non-trivial BN statistics, so dense tensors matter
    return prune(model.eval(), "magnitude-global", 0.9).model


def _x(n: int = 3) -> tuple[torch.Tensor]:
    return (torch.randn(n, 1, 10, 10, generator=torch.Generator().manual_seed(1)),)


@pytest.fixture(scope="module")
def resnet_sparse():
    torch.manual_seed(0)
    model = zoo.build("resnet20", in_channels=1, num_classes=10, input_size=8, width=0.5)
    return prune(model.eval(), "magnitude-global", 0.9).model


# --- round trips and the scipy oracle --------------------------------------------------------


@pytest.mark.parametrize("block", [(1, 1), (1, 4)])
@pytest.mark.parametrize("layers", ["auto", "all"])
def test_fp32_round_trip_is_exact(tmp_path, resnet_sparse, block, layers):
    x = (torch.randn(2, 1, 8, 8),)
    pack = csr.export_csr(resnet_sparse, tmp_path / "p.csr", x, block=block, layers=layers)
    rebuilt = csr.load(pack.path)
    state = resnet_sparse.state_dict()
    assert list(rebuilt) and set(rebuilt) == set(state)  # a complete weight set
    assert all(torch.equal(rebuilt[k], v) and rebuilt[k].dtype == v.dtype for k, v in state.items())
    assert pack.verification.exact_weights and pack.verification.max_output_diff == 0.0
    assert pack.csr_tensors, "a 90 %-sparse ResNet must have CSR weights"
    if layers == "all":
        assert len(pack.csr_tensors) == len(prunable_layers(resnet_sparse))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_dtypes_round_trip(tmp_path, dtype):
    model = _tiny().to(dtype)
    x = tuple(t.to(dtype) for t in _x())
    pack = csr.export_csr(model, tmp_path / "p.csr", x, layers="all")
    rebuilt = csr.load(pack.path)
    assert all(
        rebuilt[k].dtype == v.dtype and torch.equal(rebuilt[k], v)
        for k, v in model.state_dict().items()
    )
    assert pack.verification.exact_weights and pack.verification.max_output_diff == 0.0
    # float64 weights pass through float32 values, so only an exact rebuild proves them
    assert pack.verification.lossless == (dtype != torch.float64)


def _arrays(path) -> tuple[dict, dict]:
    with safe_open(str(path), "np") as handle:  # the reference safetensors reader
        arrays = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        entries = json.loads(handle.metadata()["tensors"])
    return arrays, entries


def test_scipy_csr_oracle(tmp_path):
    model = _tiny()
    csr.export_csr(model, tmp_path / "p.csr", layers="all")
    arrays, entries = _arrays(tmp_path / "p.csr")
    assert set(entries) == {"0.weight", "4.weight"}
    for name, entry in entries.items():
        view = model.state_dict()[name].reshape(entry["view"]).numpy()
        matrix = scipy.sparse.csr_matrix(
            (arrays[f"{name}.values"], arrays[f"{name}.col_indices"], arrays[f"{name}.row_ptr"]),
            shape=tuple(entry["view"]),
        )
        assert np.array_equal(matrix.toarray(), view)
        assert matrix.nnz == np.count_nonzero(view)  # only the non-zeros are stored


def test_scipy_bsr_oracle_with_padding(tmp_path):
    """1x4 blocks over 25 columns: 7 block columns, the last one padded with zeros."""
    model = _tiny()
    csr.export_csr(model, tmp_path / "p.csr", block=(1, 4), layers="all")
    arrays, entries = _arrays(tmp_path / "p.csr")
    for name, entry in entries.items():
        rows, cols = entry["view"]
        padded_cols = -(-cols // 4) * 4
        matrix = scipy.sparse.bsr_matrix(
            (arrays[f"{name}.values"], arrays[f"{name}.col_indices"], arrays[f"{name}.row_ptr"]),
            shape=(rows, padded_cols),
        )
        view = model.state_dict()[name].reshape(rows, cols).numpy()
        assert np.array_equal(matrix.toarray()[:, :cols], view)
        assert entry["encoding"] == "bcsr" and arrays[f"{name}.values"].shape[1:] == (1, 4)


def test_index_dtypes_are_the_narrowest(tmp_path):
    csr.export_csr(_tiny(), tmp_path / "p.csr", layers="all")
    arrays, _ = _arrays(tmp_path / "p.csr")
    assert arrays["0.weight.col_indices"].dtype == np.uint8  # 25 columns
    assert arrays["4.weight.col_indices"].dtype == np.uint16  # 288 columns
    assert arrays["0.weight.row_ptr"].dtype == np.int32
    assert [fmt.index_dtype(n) for n in (256, 257, 65536, 65537)] == ["U8", "U16", "U16", "I32"]
    wide = np.zeros((2, 70_000), np.float32)
    wide[1, 69_999] = 1.0
    parts, _ = fmt.encode(wide, "fp32", (1, 1))
    assert parts["col_indices"].dtype == np.int32 and parts["col_indices"].tolist() == [69_999]


def test_auto_keeps_dense_layers_dense_and_all_does_not(tmp_path):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    auto = csr.export_csr(dense, tmp_path / "a.csr")
    everything = csr.export_csr(dense, tmp_path / "b.csr", layers="all")
    assert auto.csr_tensors == [] and len(everything.csr_tensors) == 2
    assert auto.size_bytes < everything.size_bytes
    for path in (auto.path, everything.path):
        rebuilt = csr.load(path)
        assert all(torch.equal(rebuilt[k], v) for k, v in dense.state_dict().items())


@pytest.mark.parametrize("block", [(1, 1), (2, 3)])
def test_int8_per_row_error_bound(tmp_path, block):
    model = _tiny()
    pack = csr.export_csr(model, tmp_path / "p.csr", _x(), values="int8", block=block)
    rebuilt = csr.load(pack.path)
    for name in ("0.weight", "4.weight"):
        original = model.state_dict()[name].flatten(1)
        # symmetric int8: the rounding error is at most half a step, step = row max / 127
        bound = original.abs().amax(dim=1, keepdim=True) / 127 / 2 * (1 + 1e-5)
        got = rebuilt[name].flatten(1)
        assert torch.all((got - original).abs() <= bound), name
        assert not torch.any((got != 0) & (original == 0)), "pruned zeros must stay zero"
    check = pack.verification
    assert not check.lossless and not check.exact_weights
    assert check.max_weight_error > 0 and 0 < check.max_output_diff < 0.05


def test_fp16_values_are_rounded_weights(tmp_path):
    model = _tiny()
    pack = csr.export_csr(model, tmp_path / "p.csr", _x(), values="fp16", layers="all")
    rebuilt = csr.load(pack.path)
    errors = []
    for name in ("0.weight", "4.weight"):
        weight = model.state_dict()[name]
        assert torch.equal(rebuilt[name], weight.half().float())
        errors.append(float((weight - weight.half().float()).abs().max()))
    assert pack.verification.max_weight_error == pytest.approx(max(errors))


def test_fp16_overflow_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 0] = 1e6
    with pytest.raises(CompressorError, match="fp16"):
        csr.export_csr(model, tmp_path / "p.csr", values="fp16")
    assert not (tmp_path / "p.csr").exists()


def test_verify_catches_a_pack_of_another_model(tmp_path):
    pack = csr.export_csr(_tiny(seed=0), tmp_path / "p.csr")
    with pytest.raises(CompressorError, match="does not rebuild the weights exactly"):
        csr.verify(pack.path, _tiny(seed=1), _x())
    with pytest.raises(CompressorError, match="does not match the model"):
        csr.verify(pack.path, nn.Sequential(nn.Linear(2, 2)))


def test_masks_still_installed_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    apply_masks_(prunable_layers(model), {"0": torch.ones(4, 4, dtype=torch.bool)})
    with pytest.raises(InputError, match="parametrizations"):
        csr.export_csr(model, tmp_path / "p.csr")


def test_never_overwrites_the_input(tmp_path):
    source = tmp_path / "model.pt"
    source.write_bytes(b"original")
    with pytest.raises(InputError, match="input file"):
        csr.export_csr(_tiny(), source, protect=(source,))
    assert source.read_bytes() == b"original"


@pytest.mark.parametrize("text", ["0x4", "abc", "1x", "2x2x2", "-1x4"])
def test_parse_block_rejects(text):
    with pytest.raises(InputError, match="RxC"):
        csr.parse_block(text)


# --- a reader written from docs/csr-format.md alone ---------------------------------------

_DOC_DTYPES = {
    "F32": "<f4",
    "F16": "<f2",
    "I8": "<i1",
    "U8": "<u1",
    "U16": "<u2",
    "I32": "<i4",
    "I64": "<i8",
}


def _doc_reader(data: bytes) -> dict[str, np.ndarray]:
    """Sections 1-5 of the format doc, with struct/json/zlib only (no exporters code)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta, body = header.pop("__metadata__"), data[8 + n :]
    at = 8 + data[8 : 8 + n].index(b'"crc32":"') + 9  # version 2: the digits read as zeros
    crc = zlib.crc32(data[:at] + b"00000000" + data[at + 8 :])
    assert meta["crc32"] == data[at : at + 8].decode() == f"{crc:08x}" and meta["version"] == "2"

    def array(name):
        entry = header[name]
        begin, end = entry["data_offsets"]
        return np.frombuffer(body[begin:end], _DOC_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    entries = json.loads(meta["tensors"])
    parts = {f"{k}.{p}" for k in entries for p in ("values", "col_indices", "row_ptr", "scales")}
    out = {k: array(k) for k in header if k not in parts}
    for name, entry in entries.items():
        (rows, cols), (r_, c_) = entry["view"], entry["block"]
        row_ptr, cols_idx = array(f"{name}.row_ptr"), array(f"{name}.col_indices")
        values = array(f"{name}.values").astype(np.float32).reshape(-1)
        view = np.zeros((rows, cols), np.float32)
        for b in range(len(row_ptr) - 1):
            for k in range(row_ptr[b], row_ptr[b + 1]):
                for i in range(r_):
                    for j in range(c_):
                        r, c = b * r_ + i, int(cols_idx[k]) * c_ + j
                        if r < rows and c < cols:
                            view[r, c] = values[k * r_ * c_ + i * c_ + j]
        if entry["values"] == "I8":
            view *= array(entry["scales"])[:, None]
        out[name] = view.reshape(entry["shape"])
    return out


@pytest.mark.parametrize(
    ("values", "block"), [("fp32", (1, 1)), ("int8", (2, 3)), ("fp16", (1, 4))]
)
def test_a_reader_from_the_format_doc_agrees(tmp_path, values, block):
    model = _tiny()
    pack = csr.export_csr(model, tmp_path / "p.csr", values=values, block=block, layers="all")
    ours = csr.load(pack.path)
    theirs = _doc_reader(pack.path.read_bytes())
    assert set(theirs) == set(ours)
    assert all(np.array_equal(theirs[k], ours[k].numpy()) for k in ours)


# --- corrupt packs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("packs")
    model = _tiny()
    out = {}
    for key, values, block in [("fp32", "fp32", (1, 1)), ("int8-1x4", "int8", (1, 4))]:
        path = folder / f"{key}.csr"
        csr.export_csr(model, path, values=values, block=block, layers="all")
        out[key] = path.read_bytes()
    return out


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict, body: bytes, fix_crc: bool = True) -> bytes:
    """Header + body as a pack; with `fix_crc`, the checksum recomputed as a writer would."""

    raw = json.dumps(header, separators=(",", ":")).encode()
    data = struct.pack("<Q", len(raw)) + raw + body
    if fix_crc:
        try:
            return fmt.seal(data)
        except ValueError:
            return data  # no crc32 field left to fill: the checksum is never reached
    return data


def _edit_tensor(data: bytes, name: str, edit) -> bytes:
    """Rewrites tensor `name`'s bytes with `edit(array)` and fixes the checksum."""
    header, body = _split(data)
    begin, end = header[name]["data_offsets"]
    array = np.frombuffer(body[begin:end], fmt.DTYPES[header[name]["dtype"]]).copy()
    edit(array)
    return _join(header, body[:begin] + array.tobytes() + body[end:])


def _rejects(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fmt.unpack(data)


def test_clean_pack_reads(packs):
    for data in packs.values():
        assert set(fmt.unpack(data).arrays) == set(_tiny().state_dict())


def test_truncated(packs):
    data = packs["fp32"]
    _rejects(data[:5], "shorter than the 8-byte header length")
    _rejects(data[:100], "runs past the end")
    _rejects(data[:-1], "after the last tensor|outside")


def test_wrong_version_and_format(packs):
    header, body = _split(packs["fp32"])
    header["__metadata__"]["version"] = "3"
    _rejects(_join(header, body), "unsupported CSR pack version '3'")
    header["__metadata__"]["format"] = "something.else"
    _rejects(_join(header, body), "not a compressor CSR pack")


def test_row_ptr_not_monotone(packs):
    def swap(row_ptr):
        row_ptr[2], row_ptr[3] = row_ptr[3] + 1, row_ptr[2]

    _rejects(_edit_tensor(packs["fp32"], "0.weight.row_ptr", swap), "not monotone")


def test_row_ptr_total_disagrees_with_indices(packs):
    def bump(row_ptr):
        row_ptr[-1] += 1

    _rejects(_edit_tensor(packs["fp32"], "0.weight.row_ptr", bump), "shape .* disagrees")


def test_column_index_out_of_range(packs):
    def far(cols):
        cols[0] = 200  # the conv view has 25 columns

    _rejects(_edit_tensor(packs["fp32"], "0.weight.col_indices", far), "out of range")


def test_unsorted_column_indices(packs):
    def dup(cols):
        cols[1] = cols[0]

    _rejects(_edit_tensor(packs["fp32"], "4.weight.col_indices", dup), "strictly increasing")


def test_bad_int8_scales(packs):
    def nan(scales):
        scales[0] = np.nan

    _rejects(_edit_tensor(packs["int8-1x4"], "4.weight.scales", nan), "finite")


def test_header_shape_and_offsets_disagree(packs):
    header, body = _split(packs["fp32"])
    header["0.weight.values"]["shape"] = [header["0.weight.values"]["shape"][0] + 1]
    _rejects(_join(header, body), "bytes of data for shape")
    header, body = _split(packs["fp32"])
    first = min(header[k]["data_offsets"][1] for k in header if k != "__metadata__")
    name = next(k for k in header if k != "__metadata__" and header[k]["data_offsets"][0] == first)
    header[name]["data_offsets"] = [first - 4, header[name]["data_offsets"][1] - 4]
    _rejects(_join(header, body), "overlaps|gap")


def test_metadata_view_disagrees_with_shape(packs):
    header, body = _split(packs["fp32"])
    entries = json.loads(header["__metadata__"]["tensors"])
    entries["4.weight"]["view"] = [10, 289]
    header["__metadata__"]["tensors"] = json.dumps(entries)
    _rejects(_join(header, body), "is not shape")


def test_flips_fail_the_checksum(packs):
    data = bytearray(packs["fp32"])
    data[-3] ^= 0x10
    _rejects(bytes(data), "checksum")
    header, body = _split(packs["fp32"])
    header["4.bias"]["dtype"] = "I32"  # same size: only the checksum can tell
    _rejects(_join(header, body, fix_crc=False), "checksum")


def test_load_wraps_errors_with_the_path(tmp_path, packs):
    path = tmp_path / "bad.csr"
    path.write_bytes(packs["fp32"][:50])
    with pytest.raises(InputError, match="bad.csr"):
        csr.load(path)
    with pytest.raises(InputError, match="cannot read"):
        csr.load(tmp_path / "missing.csr")


def _same(result: fmt.Unpacked, original: fmt.Unpacked) -> bool:
    """Same names, dtypes and values."""
    return result.dtypes == original.dtypes and all(
        np.array_equal(result.arrays[k], v) for k, v in original.arrays.items()
    )


def _same_bytes(result: fmt.Unpacked, original: fmt.Unpacked) -> bool:
    """Same names and the same bytes behind each (a re-declared shape or dtype aside)."""
    return set(result.arrays) == set(original.arrays) and all(
        result.arrays[k].tobytes() == v.tobytes() for k, v in original.arrays.items()
    )


def _outcome(data: bytes):
    try:
        return fmt.unpack(data)
    except ValueError as exc:
        assert str(exc), "a ValueError must say what is wrong"
        return None


FUZZ = settings(
    max_examples=int(__import__("os").environ.get("CSR_FUZZ_EXAMPLES", 400)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(key=st.sampled_from(["fp32", "int8-1x4"]), data=st.data())
def test_fuzz_byte_flips(packs, key, data):
    """Any byte changed anywhere, header whitespace included: a ValueError (version 2)."""
    original = packs[key]
    position = data.draw(st.integers(0, len(original) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != original[position]))
    assert _outcome(original[:position] + bytes([value]) + original[position + 1 :]) is None


@FUZZ
@given(key=st.sampled_from(["fp32", "int8-1x4"]), cut=st.integers(0, 10**6))
def test_fuzz_truncation(packs, key, cut):
    original = packs[key]
    assert _outcome(original[: cut % len(original)]) is None


@FUZZ
@given(
    key=st.sampled_from(["fp32", "int8-1x4"]),
    field=st.sampled_from(["dtype", "shape", "data_offsets"]),
    value=st.one_of(
        st.integers(-5, 10**12),
        st.text(max_size=4),
        st.lists(st.integers(-3, 5000), max_size=4),
        st.none(),
        st.booleans(),
        st.floats(allow_nan=True),
    ),
    data=st.data(),
)
def test_fuzz_header_edits(packs, key, field, value, data):
    """A tensor entry given another dtype / shape / offsets, checksum recomputed: a ValueError,
    or (a dense tensor re-declared with the same byte count) the file's own bytes."""
    header, body = _split(packs[key])
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    header[name][field] = value
    result = _outcome(_join(header, body))
    assert result is None or _same_bytes(result, fmt.unpack(packs[key]))
    if result is not None and field != "shape":
        assert _same(result, fmt.unpack(packs[key]))


@FUZZ
@given(
    key=st.sampled_from(["fp32", "int8-1x4"]),
    field=st.sampled_from(sorted(fmt.ENTRY_KEYS)),
    value=st.one_of(
        st.integers(-5, 10**12),
        st.text(max_size=6),
        st.lists(st.integers(-3, 400), min_size=0, max_size=4),
        st.none(),
        st.sampled_from(["csr", "bcsr", "F16", "I8", "F64", [1, 1], [1, 4], [10, 288]]),
    ),
    data=st.data(),
)
def test_fuzz_metadata_edits(packs, key, field, value, data):
    """A CSR entry's metadata changed: ValueError, or the same tensors when the change is moot."""
    header, body = _split(packs[key])
    entries = json.loads(header["__metadata__"]["tensors"])
    name = data.draw(st.sampled_from(sorted(entries)))
    entries[name][field] = value
    header["__metadata__"]["tensors"] = json.dumps(entries)
    result = _outcome(_join(header, body))
    if result is not None:
        original = fmt.unpack(packs[key])
        # a re-declared dtype (F32 -> F64) or shape ([8, 1, 5, 5] -> [8, 25]) may change
        # what the values are called, never the values
        assert set(result.arrays) == set(original.arrays)
        assert all(
            np.array_equal(np.ravel(result.arrays[k]), np.ravel(v))
            for k, v in original.arrays.items()
        )
