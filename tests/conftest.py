"""Shared fixtures: small trained models and data, built once per session."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from compressor import zoo
from compressor.data import load_data
from compressor.io import save_model
from compressor.train import train_dense

# One intra-op thread: on a loaded 2-core machine OpenMP's spin-waiting made tiny forwards
# hundreds of times slower, and the tests' tensors are too small to gain from threads.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    return load_data("digits", seed=0)


@pytest.fixture(scope="session")
def small_digits():
    """A 256-image digits subset: enough to run every method's phases quickly."""
    return load_data("digits", seed=0, limit=256)


@pytest.fixture(scope="session")
def lenet5_digits(digits):
    """LeNet-5 trained 2 epochs on digits (accuracy well above chance)."""
    torch.manual_seed(0)
    model = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    train_dense(model, digits.train, epochs=2)
    return model.eval()


@pytest.fixture(scope="session")
def lenet5_pt2(tmp_path_factory, lenet5_digits, digits) -> Path:
    path = tmp_path_factory.mktemp("models") / "lenet5.pt2"
    save_model(
        lenet5_digits, path, example_inputs=(digits.sample_inputs(2),), report={"method": "dense"}
    )
    return path


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
