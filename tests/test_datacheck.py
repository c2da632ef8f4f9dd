"""NaN / Inf in user data is refused with the array named and counted (CLI exit 2)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor.data import load_data
from compressor.datacheck import check_finite
from compressor.errors import InputError

LOADER_MODULE = "cmp_test_nan_loaders"
LOADER_SOURCE = textwrap.dedent(
    """
    import torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset


    class Streamed(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            x = torch.zeros(1, 8, 8)
            x[0, 0, 0] = float("nan") if i == 1 else 0.0
            return x, i % 2


    def tensors():
        x = torch.zeros(32, 1, 8, 8)
        x[3, 0, 1, 1] = float("inf")
        clean = TensorDataset(torch.zeros(8, 1, 8, 8), torch.arange(8) % 2)
        return DataLoader(TensorDataset(x, torch.arange(32) % 2), batch_size=8), DataLoader(clean)


    def streamed():
        return DataLoader(Streamed(), batch_size=4, shuffle=True)
    """
)


def _images(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    x = _images()
    labels = np.arange(40) % 4
    nan_x = x.copy()
    nan_x[0, 0, 0, :3] = np.nan
    nan_x[5, 0, 2, 2] = np.inf
    inf_val = x[:8].copy()
    inf_val[1, 0, 0, 0] = -np.inf
    return {
        "nan": _npz(tmp_path / "nan.npz", x=nan_x, y=labels),
        "inf_val": _npz(tmp_path / "inf.npz", x=x, y=labels, x_val=inf_val, y_val=labels[:8]),
    }


def test_nan_and_inf_counted_in_the_message(bad_files):
    with pytest.raises(InputError) as info:
        load_data(str(bad_files["nan"]))
    assert f"x in '{bad_files['nan']}' has 3 NaN and 1 Inf values (of 2560)" in str(info.value)
    with pytest.raises(InputError, match=r"x_val in .* has 0 NaN and 1 Inf values \(of 512\)"):
        load_data(str(bad_files["inf_val"]))


def test_pt_file_and_float64_are_checked(tmp_path):
    x = torch.zeros(10, 1, 8, 8, dtype=torch.float64)
    x[2, 0, 0, 0] = float("nan")
    torch.save({"x": x, "x_test": torch.zeros(2, 1, 8, 8)}, tmp_path / "d.pt")
    with pytest.raises(InputError, match=r"x in .* has 1 NaN and 0 Inf values \(of 640\)"):
        load_data(str(tmp_path / "d.pt"))


@pytest.mark.parametrize("name", ["nan", "inf_val"])
def test_cli_exit_2_naming_the_array(bad_files, lenet5_pt2, tmp_path, name):
    path = bad_files[name]
    array, counts = ("x", "3 NaN and 1 Inf") if name == "nan" else ("x_val", "0 NaN and 1 Inf")
    args = ["prune", lenet5_pt2, "--method", "gmp", "--sparsity", "0.5", "--data", path]
    result = CliRunner().invoke(cli, [str(a) for a in [*args, "-o", tmp_path / "o.pt2"]])
    assert result.exit_code == 2, result.output
    assert f"Error: {array} in '{path}' has {counts} values" in result.output
    assert not (tmp_path / "o.pt2").exists()
    args = ["train", "--arch", "lenet5", "--data", path, "-o", tmp_path / "t.pt2"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 2 and f"{array} in '{path}' has {counts}" in result.output


def test_clean_data_still_loads(tmp_path):
    data = load_data(str(_npz(tmp_path / "ok.npz", x=_images(), y=np.arange(40) % 4)))
    assert data.num_classes == 4 and torch.isfinite(data.sample_inputs(8)).all()


@pytest.fixture
def nan_module(tmp_path, monkeypatch) -> str:
    (tmp_path / f"{LOADER_MODULE}.py").write_text(LOADER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, LOADER_MODULE, raising=False)
    return LOADER_MODULE


def test_module_loaders_are_checked(nan_module):
    with pytest.raises(InputError, match=r"the train inputs in .* 0 NaN and 1 Inf values"):
        load_data(f"{nan_module}:tensors")
    # a streamed dataset: its first batch, in dataset order (sample 1 is NaN)
    with pytest.raises(InputError, match=r"the first train batch's inputs in .* has 1 NaN"):
        load_data(f"{nan_module}:streamed")


def test_integer_arrays_pass_and_complex_is_counted():
    check_finite("y", torch.arange(5), "spec")
    with pytest.raises(InputError, match="has 1 NaN and 0 Inf values"):
        check_finite("x", torch.tensor([1 + 1j, complex("nan")]), "spec")
