"""CSR pack format version 2: the whole-file checksum, the stricter reader, version 1 still read,
and a reader whose memory is bounded by the file it reads."""

from __future__ import annotations

import json
import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_numpy
from safetensors.torch import save as save_torch
from torch import nn

from compressor.errors import InputError
from exporters import csr
from exporters import csr_format as fmt

DOC = Path(__file__).resolve().parents[1] / "docs" / "csr-format.md"


def _model(seed: int = 0) -> nn.Module:
    """Two ~70 %-sparse Linear layers, their pruned negative weights -0.0 (w * 0)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.7)  # ~70 % zeros, some -0.0
    return model


def _pack(tmp_path: Path, model: nn.Module | None = None, **options) -> bytes:
    path = tmp_path / "p.csr"
    csr.export_csr(model or _model(), path, layers="all", **options)
    return path.read_bytes()


def _write(tensors: dict[str, np.ndarray], entries: dict, version: str = "2") -> bytes:
    """A pack made from raw arrays and entries, sealed as a writer would (no checks)."""
    meta = {"format": fmt.FORMAT, "version": version, "crc32": "00000000"}
    meta["tensors"] = json.dumps(entries, separators=(",", ":"))
    data = save_numpy(tensors, metadata=meta)
    if version == "1":
        meta["crc32"] = fmt.checksum_v1(fmt.parse(data), data)
        return save_numpy(tensors, metadata=meta)
    return fmt.seal(data)


def _write_v1(model: nn.Module, report: dict | None = None) -> bytes:
    """A version 1 pack, made the way the version 1 writer made it (draft, checksum, save)."""
    tensors, entries, _ = csr._encode_state(model, "fp32", (1, 1), "all")
    meta = {"format": fmt.FORMAT, "version": "1", "crc32": "00000000"}
    meta["tensors"] = json.dumps(entries, separators=(",", ":"))
    if report is not None:
        meta["report"] = json.dumps(report)
    draft = save_torch(tensors, metadata=meta)
    meta["crc32"] = fmt.checksum_v1(fmt.parse(draft), draft)
    return save_torch(tensors, metadata=meta)


def _header(data: bytes) -> tuple[bytes, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + length], data[8 + length :]


def _reframe(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


# --- the checksum and the doc's worked example -------------------------------------------------


def test_the_worked_example_in_the_doc_checks_out():
    """Rebuilds the example's bytes from docs/csr-format.md's text alone and checks its CRC."""
    text = DOC.read_text()
    block = re.search(r"### Worked example.*?```text\n(.*?)```", text, re.S).group(1)
    lines = dict(line.split(":", 1) for line in block.strip().splitlines())
    header = lines["header"].strip().encode()
    count, byte = lines["padding"].split("x")
    header += bytes.fromhex(byte.strip()) * int(count)
    data = bytes.fromhex(lines["length"]) + header + bytes.fromhex(lines["data"])
    digits = lines["crc32"].strip()
    assert struct.unpack("<Q", data[:8])[0] == len(header)  # the length line is N
    at = data.index(b'"crc32":"') + 9
    assert data[at : at + 8].decode() == digits and f"P = 8 + {at - 8} = {at}" in text
    assert f"CRC-32 of the {len(data)} file" in text
    assert f"{zlib.crc32(data[:at] + b'00000000' + data[at + 8 :]):08x}" == digits
    unpacked = fmt.unpack(data)  # and the reader takes it as it is
    assert unpacked.arrays["b"].tolist() == [1.0, -2.0] and unpacked.metadata["version"] == "2"


def test_writer_emits_version_2_whose_crc_covers_the_report(tmp_path):
    data = _pack(tmp_path, report={"method": "magnitude", "note": "x"})
    header, body = _header(data)
    assert json.loads(header)["__metadata__"]["version"] == "2"
    edited = header.replace(b'\\"note\\":\\"x\\"', b'\\"note\\":\\"y\\"')
    assert edited != header
    with pytest.raises(ValueError, match="checksum mismatch"):
        fmt.unpack(_reframe(edited, body))


def test_every_single_byte_header_flip_is_refused(tmp_path):
    data = _pack(tmp_path, report={"method": "magnitude"})
    (length,) = struct.unpack("<Q", data[:8])
    accepted = []
    for position in range(8 + length):
        for mask in (0x01, 0x20, 0xFF):
            flipped = bytearray(data)
            flipped[position] ^= mask
            try:
                fmt.unpack(bytes(flipped))
            except ValueError as exc:
                assert str(exc)
            else:
                accepted.append((position, mask))
    assert accepted == [], f"{len(accepted)} header flips loaded, e.g. {accepted[:3]}"


def test_a_second_crc32_field_is_refused(tmp_path):
    header, body = _header(_pack(tmp_path))
    opening = b'{"__metadata__":{'
    assert header.startswith(opening)
    forged = _reframe(opening + b'"crc32":"00000000",' + header[len(opening) :], body)
    with pytest.raises(ValueError, match="duplicate key 'crc32'"):
        fmt.unpack(forged)
    with pytest.raises(ValueError, match='2 "crc32" fields'):
        fmt.crc_field(forged, len(forged) - len(body) - 8)


# --- duplicate keys, index widths, block cap ------------------------------------------------


def test_duplicate_header_key_names_the_key(tmp_path):
    header, body = _header(_pack(tmp_path))
    entry = re.search(rb'"2\.bias":\{[^}]*\}', header).group(0)
    doubled = header.replace(entry, entry + b"," + entry).rstrip()
    with pytest.raises(ValueError, match="duplicate key '2.bias'"):
        fmt.unpack(fmt.seal(_reframe(doubled, body)))


def test_duplicate_key_in_tensors_entry_names_the_key(tmp_path):
    header, body = _header(_pack(tmp_path))
    doubled = header.replace(
        b'\\"encoding\\":\\"csr\\"', b'\\"encoding\\":\\"csr\\",\\"encoding\\":\\"csr\\"', 1
    )
    assert doubled != header
    with pytest.raises(ValueError, match="duplicate key 'encoding'"):
        fmt.unpack(fmt.seal(_reframe(doubled.rstrip(), body)))


def _sparse(rows: int, cols: int) -> np.ndarray:
    weight = np.zeros((rows, cols), np.float32)
    weight[0, cols - 1] = 1.5
    weight[rows - 1, 0] = -2.0
    return weight


def _tensors(weight: np.ndarray, block=(1, 1), name: str = "w") -> tuple[dict, dict]:
    parts, entry = fmt.encode(weight, "fp32", block)
    entry.update(dtype="F32", scales=None)
    return {f"{name}.{k}": np.ascontiguousarray(v) for k, v in parts.items()}, {name: entry}


def test_index_type_too_narrow_is_refused():
    tensors, entries = _tensors(_sparse(2, 300))
    assert tensors["w.col_indices"].dtype == np.uint16
    assert fmt.unpack(_write(tensors, entries)).arrays["w"][0, 299] == 1.5
    tensors["w.col_indices"] = tensors["w.col_indices"].astype(np.uint8)  # 299 -> 43
    with pytest.raises(ValueError, match="U8 cannot hold every block-column index of the 300"):
        fmt.unpack(_write(tensors, entries))


def test_block_above_the_cap_is_refused_by_reader_and_writer(tmp_path):
    tensors, entries = _tensors(_sparse(2, 600), block=(1, 512))
    with pytest.raises(ValueError, match="block 1x512 has more than 256 elements"):
        fmt.unpack(_write(tensors, entries))
    assert fmt.unpack(_write(tensors, entries, version="1")).arrays["w"][1, 0] == -2.0  # v1: none
    with pytest.raises(InputError, match="more than 256 elements"):
        csr.export_csr(_model(), tmp_path / "p.csr", block=(16, 17))
    assert csr.export_csr(_model(), tmp_path / "p.csr", block=(16, 16)).block == (16, 16)


def test_nonzero_bits_in_the_padding_are_refused():
    tensors, entries = _tensors(_sparse(2, 6), block=(1, 4))  # 8 padded columns
    tensors["w.values"][0, 0, 3] = -0.0  # block column 1, column 7: padding
    assert tensors["w.col_indices"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="block padding"):
        fmt.unpack(_write(tensors, entries))


# --- -0.0 and "exact" ---------------------------------------------------------------------------


def test_negative_zero_comes_back_positive_and_counts_as_exact(tmp_path):
    model = _model()
    weight = model[0].weight.detach()
    negative_zeros = (weight == 0) & torch.signbit(weight)
    assert negative_zeros.any(), "masking negative weights must have made -0.0"
    pack = csr.export_csr(model, tmp_path / "p.csr", (torch.randn(2, 40),), layers="all")
    rebuilt = csr.load(pack.path)["0.weight"]
    assert not torch.signbit(rebuilt[negative_zeros]).any()  # documented: +0.0
    assert torch.equal(rebuilt, weight) and pack.verification.exact_weights
    assert csr.bit_equal(rebuilt, weight) and not csr.bit_equal(rebuilt, weight + 1e-7)


# --- version 1 -----------------------------------------------------------------------------


def test_version_1_packs_still_load(tmp_path):
    model = _model()
    data = _write_v1(model, report={"method": "magnitude"})
    assert json.loads(_header(data)[0])["__metadata__"]["version"] == "1"
    path = tmp_path / "v1.csr"
    path.write_bytes(data)
    rebuilt = csr.load(path)
    assert all(torch.equal(rebuilt[k], v) for k, v in model.state_dict().items())
    assert csr.verify(path, model).exact_weights
    flipped = bytearray(data)
    flipped[-1] ^= 0x01  # its data section is still covered
    with pytest.raises(ValueError, match="checksum"):
        fmt.unpack(bytes(flipped))


# --- bounded memory -----------------------------------------------------------------------------


def _empty_weight_pack(rows: int, cols: int) -> bytes:
    """A pack declaring a rows x cols weight with no non-zeros: its row_ptr is all it stores."""
    tensors = {
        "w.values": np.zeros(0, np.float32),
        "w.col_indices": np.zeros(0, np.dtype(fmt.DTYPES[fmt.index_dtype(cols)])),
        "w.row_ptr": np.zeros(rows + 1, np.int32),
    }
    entry = {"encoding": "csr", "shape": [rows, cols], "view": [rows, cols], "block": [1, 1]}
    entry.update(values="F32", dtype="F32", scales=None)
    return _write(tensors, {"w": entry})


def test_a_small_pack_declaring_a_huge_weight_is_refused_in_small_memory(tmp_path):
    path = tmp_path / "bomb.csr"
    path.write_bytes(_empty_weight_pack(16384, 16384))
    assert path.stat().st_size < 70_000
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as caught:
            csr.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert "declares 268435456 weight elements" in message
    assert "load(path, max_elements=268435456)" in message
    assert peak < 2 * 2**20, f"peak {peak} bytes to refuse a 66 KB file"


def test_max_elements_is_the_limit_and_the_default_scales_with_the_file():
    data = _empty_weight_pack(64, 300)
    assert fmt.unpack(data).arrays["w"].shape == (64, 300)
    with pytest.raises(ValueError, match="more than the limit 19199 \\(max_elements\\)"):
        fmt.unpack(data, max_elements=64 * 300 - 1)
    assert fmt.unpack(data, max_elements=64 * 300).arrays["w"].sum() == 0
    assert fmt.default_max_elements(1000) == 2**24
    assert fmt.default_max_elements(2**20) == 2**30


def test_running_out_of_memory_is_a_value_error(tmp_path, monkeypatch):
    path = tmp_path / "p.csr"
    path.write_bytes(_pack(tmp_path))

    def no_memory(*args):
        raise MemoryError

    monkeypatch.setattr(fmt, "decode", no_memory)
    with pytest.raises(InputError, match="out of memory rebuilding"):
        csr.load(path)


def test_an_ultra_sparse_pack_exports_and_loads_with_max_elements(tmp_path, monkeypatch):
    """The writer verifies with what its own pack needs; readers get told the number."""
    monkeypatch.setattr(fmt, "MIN_ELEMENTS", 1000)  # a small floor stands in for a huge model
    monkeypatch.setattr(fmt, "ELEMENTS_PER_BYTE", 1)
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[3, 5] = 1.0
    pack = csr.export_csr(model, tmp_path / "p.csr", (torch.randn(2, 64),))
    assert pack.verification.exact_weights and pack.size_bytes < 1000 < 64 * 64
    with pytest.raises(InputError, match="max_elements=4096"):
        csr.load(pack.path)
    with pytest.raises(InputError, match="max_elements=4096"):
        csr.verify(pack.path, model)
    assert csr.load(pack.path, max_elements=4096)["0.weight"][3, 5] == 1.0
    assert csr.verify(pack.path, model, max_elements=4096).exact_weights


def test_cli_refuses_a_block_above_the_cap(tmp_path, lenet5_pt2):
    from click.testing import CliRunner

    from cli.main import cli

    out = tmp_path / "m.csr.safetensors"
    args = ["export", str(lenet5_pt2), "--format", "csr", "--block", "1x512", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Error: block 1x512 has more than 256 elements; use a smaller block" in result.output
    assert "Traceback" not in result.output and not out.exists()
