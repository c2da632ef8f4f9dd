"""CSR packs of pattern-pruned models: the N:M layout, pattern defaults, warnings, the floor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file, save
from torch import nn

from bench.pattern_floor import build, mask_to_pattern_
from cli.main import cli
from compressor.io import save_model
from compressor.pattern_layers import prunable_weights
from exporters import csr, csr_nm
from exporters import csr_format as fmt
from exporters.csr_floor import floor_report, pack_floor
from exporters.csr_pattern import padding_ratio

PATTERNS = [("2:4", 0.5), ("4:8", 0.5), ("1x4", 0.8), ("4x1", 0.9)]


def _linear(weight: list[list[float]], bias: bool = False) -> nn.Sequential:
    rows = torch.tensor(weight, dtype=torch.float32)
    model = nn.Sequential(nn.Linear(rows.shape[1], rows.shape[0], bias=bias))
    with torch.no_grad():
        model[0].weight.copy_(rows)
        if bias:
            model[0].bias.copy_(torch.arange(rows.shape[0], dtype=torch.float32))
    return model


def _small(text: str, sparsity: float) -> tuple[nn.Module, dict]:
    """A conv (cols 3*3*3 = 27: not 2:4-eligible) + conv (72 cols) + linear, masked."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
    ).eval()
    return model, mask_to_pattern_(model, text, sparsity)


# --- the N:M layout against the hand-built examples of docs/csr-format.md -----------------

HAND_2_4 = [[0, 1.5, 0, -2, 3, 0, 0, 0], [0, 0, 0, 0, 0.5, 0, 0, 0.25]]
HAND_4_8 = [[0, 0, 5, 0, 0, 0, 7, 0, 1, 2, 3, 4, 0, 0, 0, 0]]


def test_nm_layout_matches_the_hand_built_2_of_4_example(tmp_path):
    weight = np.array(HAND_2_4, dtype=np.float32)
    parts, entry = csr_nm.encode(weight, "fp32", 2, 4)
    assert parts["values"].tolist() == [[1.5, -2, 3, 0], [0, 0, 0.5, 0.25]]
    assert parts["indices"].tobytes() == bytes.fromhex("4dc4")
    assert entry == {
        "encoding": "nm",
        "shape": [2, 8],
        "view": [2, 8],
        "block": [1, 4],
        "nm": [2, 4],
        "values": "F32",
    }
    # the same bytes through the writer, and back
    model = _linear(HAND_2_4)
    report = {"pattern": "2:4", "pattern_layers": ["0"]}
    pack = csr.export_csr(model, tmp_path / "p.csr", values="fp32", report=report)
    stored = load_file(tmp_path / "p.csr")
    assert stored["0.weight.indices"].tobytes() == bytes.fromhex("4dc4")
    assert stored["0.weight.values"].dtype == np.float32
    assert np.array_equal(stored["0.weight.values"], parts["values"])
    assert [t.encoding for t in pack.csr_tensors] == ["nm"]
    assert torch.equal(csr.load(pack.path)["0.weight"], model[0].weight.detach())


def test_nm_offsets_cross_bytes_in_the_4_of_8_example():
    parts, _ = csr_nm.encode(np.array(HAND_4_8, dtype=np.float32), "fp32", 4, 8)
    assert parts["values"].tolist() == [[0, 0, 5, 7, 1, 2, 3, 4]]
    assert parts["indices"].tobytes() == bytes.fromhex("888c68")
    assert csr_nm.unpack_bits(parts["indices"], 8, 3).tolist() == [0, 1, 2, 6, 0, 1, 2, 3]


def test_nm_encoder_refuses_a_group_over_n():
    with pytest.raises(ValueError, match=r"row 1, columns 4\.\.7 hold 3 non-zeros, more than 2"):
        csr_nm.encode(np.array([[1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0]]), "fp32", 2, 4)


# --- round trips: bit-exact for every pattern and value type --------------------------------


@pytest.mark.parametrize(("text", "sparsity"), PATTERNS)
@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
def test_pattern_pack_round_trips_bit_exact(tmp_path, text, sparsity, values):
    model, report = _small(text, sparsity)
    pack = csr.export_csr(model, tmp_path / "p.csr", values=values, layers="all", report=report)
    loaded = csr.load(pack.path)
    entries = json.loads(load_file_meta(pack.path)["tensors"])
    expected = {"2:4": "nm", "4:8": "nm"}.get(text, "bcsr")
    for layer in report["pattern_layers"]:
        assert entries[f"{layer}.weight"]["encoding"] == expected
    if expected == "bcsr":
        assert entries["4.weight"]["block"] == [int(d) for d in text.split("x")]
    assert "0.weight" not in report["pattern_layers"] or expected == "bcsr"
    assert pack.warnings == [] and pack.pattern == text
    # the oracle: the same weights as plain CSR at the same value type (same per-row scales)
    plain = csr.export_csr(model, tmp_path / "c.csr", values=values, block=(1, 1), layers="all")
    reference = csr.load(plain.path)
    assert set(loaded) == set(reference) == set(model.state_dict())
    assert all(csr.bit_equal(loaded[k], reference[k]) for k in loaded)
    if values == "fp32":
        assert all(csr.bit_equal(loaded[k], v) for k, v in model.state_dict().items())


def load_file_meta(path) -> dict:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])["__metadata__"]


def test_nm_layer_that_does_not_follow_is_packed_plain_with_a_warning(tmp_path):
    model = _linear([[1, 2, 3, 0, 0, 0, 0, 4]])
    report = {"pattern": "2:4", "pattern_layers": ["0"]}
    pack = csr.export_csr(model, tmp_path / "p.csr", report=report, layers="all")
    assert [t.encoding for t in pack.csr_tensors] == ["csr"]
    assert pack.warnings == ["0.weight does not follow 2:4; packed as plain CSR"]


# --- the reader refuses broken N:M parts --------------------------------------------------


def _nm_pack(weight, n: int, m: int, edit=None, version: str = "2") -> bytes:
    parts, entry = csr_nm.encode(np.array(weight, dtype=np.float32), "fp32", n, m)
    entry.update(dtype="F32", scales=None)
    if edit:
        edit(parts, entry)
    meta = {"format": fmt.FORMAT, "version": version, "crc32": "00000000"}
    meta["tensors"] = json.dumps({"w": entry})
    data = save({f"w.{k}": v for k, v in parts.items()}, metadata=meta)
    if version == "1":
        crc = fmt.checksum_v1(fmt.parse(data), data)
        return data.replace(b'"crc32":"00000000"', f'"crc32":"{crc}"'.encode())
    return fmt.seal(data)


def _set_offsets(offsets: list[int], bits: int):
    def edit(parts, entry):
        parts["indices"] = csr_nm.pack_bits(np.array(offsets), bits)

    return edit


@pytest.mark.parametrize(
    ("weight", "nm", "edit", "message"),
    [
        (HAND_2_4, (2, 4), _set_offsets([1, 1, 0, 1, 0, 1, 0, 3], 2), "not strictly increasing"),
        (HAND_2_4, (2, 4), _set_offsets([3, 1, 0, 1, 0, 1, 0, 3], 2), "not strictly increasing"),
        ([[0, 1, 2, 0, 0, 3]], (2, 3), _set_offsets([1, 2, 2, 3], 2), "offset 3 is not below M=3"),
        (
            [[0, 1, 2]],  # 2 offsets of 2 bits: the byte's upper 4 bits are padding
            (2, 3),
            lambda p, e: p.update(indices=p["indices"] | np.uint8(0x80)),
            "non-zero padding bits",
        ),
        (HAND_2_4, (2, 4), lambda p, e: e.update(block=[1, 8]), "must be \\[1, M\\]"),
        (HAND_2_4, (2, 4), lambda p, e: e.update(nm=[4, 4]), "1 <= N < M <= 32"),
        (HAND_2_4, (2, 4), lambda p, e: e.pop("nm"), "metadata entry must have exactly"),
        (
            HAND_2_4,
            (2, 4),
            lambda p, e: p.update(values=p["values"][:, :2].copy()),
            "shape \\[2, 2\\] disagrees",
        ),
        (
            HAND_2_4,
            (2, 4),
            lambda p, e: p.update(indices=np.zeros(3, np.uint8)),
            "shape \\[3\\] disagrees",
        ),
    ],
)
def test_reader_refuses_broken_nm_parts(weight, nm, edit, message):
    with pytest.raises(ValueError, match=message):
        fmt.unpack(_nm_pack(weight, *nm, edit))


def test_nm_entry_is_refused_in_a_version_1_pack():
    with pytest.raises(ValueError, match="encoding 'nm' does not exist in version 1 packs"):
        fmt.unpack(_nm_pack(HAND_2_4, 2, 4, version="1"))


def test_unedited_hand_pack_reads_back():
    unpacked = fmt.unpack(_nm_pack([[0, 1, 2, 0, 0, 3]], 2, 3))
    assert unpacked.arrays["w"].tolist() == [[0, 1, 2, 0, 0, 3]]


# --- compress export: the pattern's layout by default, a warning for another block ---------


@pytest.fixture(scope="module")
def nm_pt2(tmp_path_factory):
    """A LeNet-5 .pt2 masked to 2:4, its report embedded, and the model."""
    model = build("lenet5")
    report = mask_to_pattern_(model, "2:4", 0.5)
    path = tmp_path_factory.mktemp("pattern-pt2") / "lenet5-2of4.pt2"
    save_model(model, path, example_inputs=(torch.randn(2, 1, 8, 8),), report=report)
    return path, model


def _export(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def test_cli_packs_in_the_models_pattern_without_block(nm_pt2, tmp_path):
    path, model = nm_pt2
    result = _export(path, "--format", "csr", "-o", tmp_path / "p.csr")
    assert result.exit_code == 0, result.output
    assert "(fp32, 2:4 layout)" in result.output and "warning" not in result.output
    entries = json.loads(load_file_meta(tmp_path / "p.csr")["tensors"])
    # conv1 (25 columns) cannot carry 2:4 and stays out of the N:M layout
    assert {name: e["encoding"] for name, e in entries.items()} == {
        "4.weight": "nm",
        "8.weight": "nm",
        "10.weight": "nm",
    }
    loaded = csr.load(tmp_path / "p.csr")
    assert all(csr.bit_equal(loaded[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("block", ["1x4", "1x1"])
def test_cli_warns_with_the_padding_ratio(nm_pt2, tmp_path, block):
    path, model = nm_pt2
    result = _export(path, "--format", "csr", "--block", block, "-o", tmp_path / "p.csr")
    assert result.exit_code == 0, result.output
    ratio = padding_ratio(prunable_weights(model), tuple(int(d) for d in block.split("x")))
    assert ratio == 1.0 if block == "1x1" else ratio > 1.05
    assert result.output.count("warning:") == 1
    assert (
        f"; warning: block {block} does not match the model's pattern 2:4: it stores "
        f"{ratio:.2f}x the non-zeros (padding ratio, stored elements / non-zeros); omit "
        "--block to pack in the pattern's layout"
    ) in " ".join(result.output.split())


@pytest.mark.parametrize(("block", "warned"), [((4, 1), True), ((1, 4), False), (None, False)])
def test_block_pattern_warns_only_for_another_block(tmp_path, block, warned):
    model, report = _small("1x4", 0.8)
    pack = csr.export_csr(model, tmp_path / "p.csr", block=block, report=report)
    ratio = padding_ratio(prunable_weights(model), (4, 1))
    expected = [
        f"block 4x1 does not match the model's pattern 1x4: it stores {ratio:.2f}x the "
        "non-zeros (padding ratio, stored elements / non-zeros); omit --block to pack in the "
        "pattern's layout"
    ]
    assert pack.warnings == (expected if warned else [])
    assert pack.block == (block or (1, 4))


def test_cli_warns_for_a_block_on_a_model_without_pattern(lenet5_pt2, lenet5_digits, tmp_path):
    result = _export(lenet5_pt2, "--format", "csr", "--block", "4x1", "-o", tmp_path / "p.csr")
    assert result.exit_code == 0, result.output
    ratio = padding_ratio(prunable_weights(lenet5_digits), (4, 1))
    text = " ".join(result.output.split())
    assert (
        f"warning: block 4x1 does not match the model, which has no sparsity pattern: it "
        f"stores {ratio:.2f}x the non-zeros" in text
    )
    assert "prune with --pattern 4x1" in text


def test_padding_ratio_counts_stored_block_elements():
    weight = torch.tensor([[1.0, 0, 0, 0, 0, 2], [0, 0, 0, 0, 0, 0]])
    # 1x4 blocks: (0, 0) and the edge block (0, 1) stored, 8 elements for 2 non-zeros
    assert padding_ratio({"w": weight}, (1, 4)) == 4.0
    assert padding_ratio({"w": weight}, (1, 1)) == 1.0


# --- the floor ----------------------------------------------------------------------------


def test_floor_by_hand():
    nm = _linear([[0, 1, 0, 2, 3, 0, 0, 4], [5, 0, 6, 0, 0, 0, 7, 8]], bias=True)
    report = {"pattern": "2:4", "pattern_layers": ["0"]}
    # 8 slots x 4 B + 8 slots x 2 bits (2 B) + the dense bias (2 x 4 B)
    assert pack_floor(nm, report, "fp32") == 32 + 2 + 8
    assert pack_floor(nm, report, "int8") == 8 + 2 + 2 * 4 + 8  # + one scale per row
    blocks = _linear([[1, 2, 3, 4, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 5, 6]], bias=True)
    report = {"pattern": "1x4", "pattern_layers": ["0"]}
    # 6 real elements in 2 kept blocks (one an edge block of 2), 2 U8 indices, 4 row pointers
    assert pack_floor(blocks, report, "fp32") == 6 * 4 + 2 + 4 * 4 + 3 * 4
    # without a pattern: plain CSR, 6 non-zeros x (4 + 1) + 4 row pointers, or dense if smaller
    assert pack_floor(blocks, None, "fp32") == min(6 * 5 + 16, 18 * 4) + 3 * 4


@pytest.mark.parametrize("arch", ["lenet5", "resnet20"])
@pytest.mark.parametrize(("text", "sparsity"), PATTERNS)
def test_pack_is_within_1_02_of_its_floor(tmp_path, arch, text, sparsity):
    model = build(arch)
    report = mask_to_pattern_(model, text, sparsity)
    for values in ("fp32", "int8"):
        pack = csr.export_csr(model, tmp_path / "p.csr", values=values, report=report, verify=False)
        sizes = floor_report(pack, model, report)
        assert sizes["data_bytes"] == pack.path.stat().st_size - pack.header_bytes
        assert 1.0 <= sizes["data_ratio"] <= 1.02
        if arch == "lenet5" and values == "fp32":
            # the whole file too, header included, where the header is small (8 tensors)
            assert sizes["file_ratio"] <= 1.02
