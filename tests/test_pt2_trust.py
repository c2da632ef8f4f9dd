"""A .pt2 runs no code from the file unless --trust-pickle; damaged metadata is bad input."""

from __future__ import annotations

import contextlib
import json
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor import zoo
from compressor.errors import InputError
from compressor.io import load_model, save_model
from compressor.pt2_check import check_program_targets
from tests.models import ConstNet

Edit = Callable[[str, bytes], bytes | None]


class _Payload:
    """Unpickling this writes `marker`: proof that loading ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def const_pt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("trust") / "const.pt2"
    return save_model(ConstNet().eval(), path, example_inputs=(torch.randn(2, 1, 8, 8),))


def _rewrite(src: Path, dst: Path, edit: Edit, add: dict[str, bytes] | None = None) -> Path:
    """Copies the zip `src` to `dst`, passing each entry through `edit` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = edit(info.filename[len(root) + 1 :], zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
        for rel, data in (add or {}).items():
            zout.writestr(f"{root}/{rel}", data)
    return dst


def _edit_config(rel: str, data: bytes, config: str, fqn: str, **fields) -> bytes:
    if rel != config:
        return data
    parsed = json.loads(data)
    parsed["config"][fqn].update(fields)
    return json.dumps(parsed).encode()


def _pickled_weight(src: Path, dst: Path, marker: Path) -> tuple[Path, str]:
    config = "data/weights/model_weights_config.json"
    path_name = json.loads(zipfile.ZipFile(src).read(_full(src, config)))["config"]["fc.weight"]
    target = f"data/weights/{path_name['path_name']}"

    def edit(rel, data):
        if rel == target:
            return pickle.dumps(_Payload(marker))
        return _edit_config(rel, data, config, "fc.weight", use_pickle=True)

    return _rewrite(src, dst, edit), target


def _pickled_constant(src: Path, dst: Path, marker: Path) -> tuple[Path, str]:
    config = "data/constants/model_constants_config.json"
    target = "data/constants/opaque_obj_0"

    def edit(rel, data):
        # as torch writes an opaque object: pickled, no tensor metadata
        fields = {"path_name": "opaque_obj_0", "use_pickle": True, "tensor_meta": None}
        return _edit_config(rel, data, config, "offset", **fields)

    return _rewrite(src, dst, edit, {target: pickle.dumps(_Payload(marker))}), target


def _pickled_sample_inputs(src: Path, dst: Path, marker: Path) -> tuple[Path, str]:
    target = "data/sample_inputs/model.pt"

    def edit(rel, data):
        return pickle.dumps(_Payload(marker)) if rel == target else data

    return _rewrite(src, dst, edit), target


def _full(src: Path, rel: str) -> str:
    return zipfile.ZipFile(src).namelist()[0].split("/")[0] + "/" + rel


CRAFTS = {
    "pickled-weight": _pickled_weight,
    "pickled-constant": _pickled_constant,
    "pickled-sample-inputs": _pickled_sample_inputs,
}


@pytest.mark.parametrize("craft", CRAFTS)
def test_api_refuses_pickled_entries_and_never_runs_them(tmp_path, const_pt2, craft):
    marker = tmp_path / "ran"
    evil, entry = CRAFTS[craft](const_pt2, tmp_path / "evil.pt2", marker)
    with pytest.raises(InputError, match="--trust-pickle") as info:
        load_model(evil)
    assert entry in str(info.value)
    assert not marker.exists()
    # the control: with the flag torch really unpickles the entry, so the craft is live
    # the payload replaced a tensor, so what torch then makes of it varies
    with warnings.catch_warnings(), contextlib.suppress(Exception):
        warnings.simplefilter("ignore")  # torch's notices about the foreign pickle
        load_model(evil, trust_pickle=True)
    assert marker.read_text() == "ran"


COMMANDS = {
    "info": [],
    "eval": ["--data", "digits"],
    "prune": ["--method", "magnitude-global", "--sparsity", "0.5", "-o", "{out}"],
    "export": ["--format", "onnx", "-o", "{out}"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_pickled_weight(tmp_path, const_pt2, command):
    marker, out = tmp_path / "ran", tmp_path / "out.file"
    evil, entry = _pickled_weight(const_pt2, tmp_path / "evil.pt2", marker)
    args = [command, str(evil)] + [a.format(out=out) for a in COMMANDS[command]]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert entry in lines[0] and "--trust-pickle" in lines[0]
    assert not marker.exists() and not out.exists()


def test_trust_pickle_reaches_the_pt2_loader(tmp_path, const_pt2):
    marker = tmp_path / "ran"
    evil, _ = _pickled_constant(const_pt2, tmp_path / "evil.pt2", marker)
    CliRunner().invoke(cli, ["info", str(evil), "--trust-pickle"])
    assert marker.read_text() == "ran"


def test_unknown_entry_is_refused_by_name(tmp_path, const_pt2):
    evil = _rewrite(
        const_pt2, tmp_path / "aoti.pt2", lambda rel, data: data, {"data/aotinductor/m/x.so": b""}
    )
    with pytest.raises(
        InputError, match=r"data/aotinductor/m/x\.so \(not an entry .*--trust-pickle"
    ):
        load_model(evil)


def test_entries_outside_the_archive_folder_are_refused(tmp_path, const_pt2):
    evil = tmp_path / "legacy.pt2"
    _rewrite(const_pt2, evil, lambda rel, data: data)
    with zipfile.ZipFile(evil, "a") as archive:
        archive.writestr("serialized_state_dict.pt", pickle.dumps(_Payload(tmp_path / "ran")))
    with pytest.raises(InputError, match="serialized_state_dict.pt .outside"):
        load_model(evil)
    assert not (tmp_path / "ran").exists()


def test_genuine_archive_with_a_constant_loads_and_matches(const_pt2):
    torch.manual_seed(0)
    model = ConstNet().eval()
    x = torch.randn(5, 1, 8, 8)
    loaded = load_model(const_pt2)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=1e-6)
    assert set(loaded.model.state_dict()) == set(model.state_dict())


# --- damaged compressor metadata ------------------------------------------------------

BAD_META = {
    "not-json": (b"{bad", "compressor.json is not valid JSON"),
    "not-an-object": (b"[1, 2]", "holds a JSON list, not an object"),
    "shape-type": (b'{"input_shape": "1x8x8"}', "input_shape '1x8x8' is not a list"),
    "shape-negative": (b'{"input_shape": [1, -8, 8]}', "is not a list of positive integers"),
    "report-type": (b'{"report": [1]}', "report is a list, not a dict"),
    "version-type": (b'{"version": "one"}', "version is a str, not a int"),
}


@pytest.mark.parametrize("case", BAD_META)
def test_damaged_pt2_metadata_exits_2(tmp_path, const_pt2, case):
    meta, detail = BAD_META[case]
    bad = _rewrite(
        const_pt2, tmp_path / "bad.pt2", lambda r, d: meta if r == "extra/compressor.json" else d
    )
    result = CliRunner().invoke(cli, ["info", str(bad)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: damaged compressor metadata in '{bad}': ")
    assert detail in result.output and len(result.output.strip().splitlines()) == 1


def test_graph_calling_a_python_function_is_refused(const_pt2):
    # torch's verifier refuses this too; ours is the second line of defence, so it is
    # tested on a loaded program edited in memory
    import os

    program = torch.export.load(str(const_pt2))
    node = next(n for n in program.graph.nodes if n.op == "call_function")
    node.target = os.getcwd
    with pytest.raises(InputError, match=rf"graph node '{node.name}' .*--trust-pickle"):
        check_program_targets(program, const_pt2)


def _safetensors_with_meta(path: Path, meta: str) -> Path:
    from safetensors.torch import save_file

    model = zoo.build("lenet300", in_channels=1, num_classes=10, input_size=8)
    save_file(dict(model.state_dict()), path, metadata={"compressor.json": meta})
    return path


def test_safetensors_metadata_is_read_back(tmp_path):
    meta = json.dumps({"input_shape": [1, 8, 8], "report": {"method": "dense"}})
    path = _safetensors_with_meta(tmp_path / "w.safetensors", meta)
    loaded = load_model(path, arch="lenet300")
    assert loaded.report == {"method": "dense"} and loaded.input_shape == (1, 8, 8)


@pytest.mark.parametrize("case", ["not-json", "shape-type", "report-type"])
def test_damaged_safetensors_metadata_exits_2(tmp_path, case):
    meta, detail = BAD_META[case]
    path = _safetensors_with_meta(tmp_path / "w.safetensors", meta.decode())
    result = CliRunner().invoke(cli, ["info", str(path), "--arch", "lenet300"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: damaged compressor metadata in '{path}': ")
    assert detail in result.output and len(result.output.strip().splitlines()) == 1


def test_safetensors_header_of_wrong_type_exits_2(tmp_path):
    header = json.dumps({"__metadata__": {"compressor.json": 5}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    result = CliRunner().invoke(cli, ["info", str(path), "--arch", "lenet300"])
    assert result.exit_code == 2, result.output
    assert f"Error: '{path}' is a damaged safetensors file: " in result.output
    assert "expected a string" in result.output


def test_a_pickled_weight_is_named_once_with_its_name(tmp_path, const_pt2):
    evil, entry = _pickled_weight(const_pt2, tmp_path / "evil.pt2", tmp_path / "ran")
    with pytest.raises(InputError) as info:
        load_model(evil)
    message = str(info.value)
    assert message.count(entry) == 1 and f"{entry} (weight 'fc.weight', pickled)" in message
