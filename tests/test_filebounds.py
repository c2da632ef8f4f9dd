"""Small files that declare huge arrays: refused from their headers, before any allocation."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import checkpoint, filebounds
from compressor.data import load_data
from compressor.errors import InputError


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """An .npy version 1.0 header declaring `shape` (no data after it)."""
    text = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (-(10 + len(text) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _peak(call) -> tuple[Exception, int]:
    """Runs `call`, which must raise InputError; returns it and the tracemalloc peak."""
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as caught:
            call()
        return caught.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_npz_member_declaring_more_than_it_holds(tmp_path: Path) -> None:
    """16 GiB declared in a 300-byte archive: numpy would allocate it before reading."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", _npy_header((65536, 65536)) + b"\0" * 16)
    error, peak = _peak(lambda: load_data(str(path)))
    assert "member 'x.npy' declares 17179869184 bytes of array data but holds 144" in str(error)
    assert peak < 2**20


def test_compressed_npz_declaring_too_much_in_all(tmp_path: Path) -> None:
    """A real deflated member of zeros 1000x its compressed size: a zip bomb."""
    path = tmp_path / "zeros.npz"
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((9000, 8192), np.uint8))  # 73.7 MB, deflates to ~72 KB
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", buffer.getvalue())
    size = path.stat().st_size
    assert 100 * size < 9000 * 8192 and filebounds.MIN_BYTES < 9000 * 8192
    error, peak = _peak(lambda: load_data(str(path)))
    assert f"from a {size}-byte file" in str(error) and "numpy.savez" in str(error)
    assert peak < 2**20


def test_npz_within_bounds_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.npz"
    np.savez_compressed(path, x=np.zeros((40, 1, 4, 4), np.float32), y=np.arange(40) % 2)
    data = load_data(str(path), seed=0)
    assert data.num_classes == 2


def _torch_zip_declaring(path: Path, numel: int) -> None:
    """A torch.save zip whose one tensor's pickle declares `numel` floats over 4 stored ones."""
    torch.save({"x": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    pickle_name = next(name for name in members if name.endswith("data.pkl"))
    big = b"J" + struct.pack("<i", numel)
    members[pickle_name] = members[pickle_name].replace(b"K\x04t", big + b"t", 1)
    members[pickle_name] = members[pickle_name].replace(b"K\x04\x85", big + b"\x85", 1)
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)


def test_pt_data_declaring_a_huge_tensor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pt"
    _torch_zip_declaring(path, 2**30)
    error, _ = _peak(lambda: load_data(str(path)))
    assert "cannot load" in str(error) and "does not match expected size" in str(error)


def test_pt_data_zip_member_declaring_too_much(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data/0", b"\0" * (filebounds.MIN_BYTES + 1))
    error, _ = _peak(lambda: load_data(str(path)))
    assert "declares 67108865 bytes" in str(error)


def test_legacy_torch_format_is_refused(tmp_path: Path) -> None:
    """The pre-1.6 format allocates declared storage sizes before reading them."""
    path = tmp_path / "old.pt"
    torch.save({"x": torch.zeros(3, 2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="not a zip archive.*torch.save"):
        load_data(str(path))


def test_checkpoint_declaring_a_huge_tensor_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    _torch_zip_declaring(path, 2**30)
    error, _ = _peak(lambda: checkpoint.read(path))
    assert "run.ckpt' is damaged" in str(error) and "expected size" in str(error)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("run/data/0", b"\0" * (filebounds.MIN_BYTES + 1))
    with pytest.raises(InputError, match="checkpoint .*run.ckpt' declares 67108865 bytes"):
        checkpoint.read(path)


def test_checkpoint_out_of_memory_is_an_input_error(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "run.ckpt"
    torch.save({"x": torch.zeros(2)}, path)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(InputError, match="does not fit in memory"):
        checkpoint.read(path)
