"""Shared fixtures: small trained models and data, built once per session."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
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


# Images per split in `digits_npz`: 4 batches of 64 per training epoch instead of digits' 21.
NPZ_TRAIN, NPZ_HELD_OUT = 256, 128


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory, digits) -> Path:
    """The first 256 train (128 val, 128 test) digits as an .npz data spec for subprocess runs.

    A CLI run in a subprocess pays for every training step, and `--data digits` also imports
    scikit-learn (2-3 s) to split; this file has its own splits, so neither cost comes back.
    """
    arrays = {}
    for part, name, count in (("train", "", NPZ_TRAIN), ("val", "_val", NPZ_HELD_OUT)):
        x, y = getattr(digits, part).dataset.tensors
        arrays |= {f"x{name}": x[:count].numpy(), f"y{name}": y[:count].numpy()}
    x, y = digits.test.dataset.tensors
    arrays |= {"x_test": x[:NPZ_HELD_OUT].numpy(), "y_test": y[:NPZ_HELD_OUT].numpy()}
    path = tmp_path_factory.mktemp("data") / "digits256.npz"
    np.savez(path, **arrays)
    return path


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# Unstructured methods change weights, never the graph, so one of them (magnitude-global)
# and every method that slims or may slim (bar, channel-magnitude, gss) go through the
# torch.export exporter; the other methods' results use the TorchScript exporter, 10-20x
# cheaper, whose onnxruntime verification checks their weights just the same. This keeps
# the every-method x every-model matrices within CI's time (issue 16 item 7).
GRAPH_EXPORTED = frozenset({"magnitude-global", "bar", "channel-magnitude", "gss"})

# The zoo without ResNet-32 for the expensive every-model matrices (method contracts, .pt2
# and ONNX round trips, cost prediction). ResNet-32 is ResNet-20 with five blocks a stage
# instead of three, and ResNet-56 has nine: every block, join and stage transition it has,
# both of its neighbours have, so it added CI time (about 30 s of one core) and no case.
# The cheap zoo tests (shapes, FX trace, surgery, --round-to) still cover all of it.
DISTINCT_ARCHS = [arch for arch in zoo.list_archs() if arch != "resnet32"]
# ...and without ResNet-56 where depth adds nothing a method sees (unstructured masks are
# per layer, and ResNet-20 has every join): the method contract keeps it for BAR alone,
# the method whose gates, joins and final budget step grow with depth.
SHALLOW_ARCHS = [arch for arch in DISTINCT_ARCHS if arch != "resnet56"]


def exporter_for(method: str) -> str:
    """The ONNX exporter a matrix test uses for `method`'s result (see GRAPH_EXPORTED)."""
    return "dynamo" if method in GRAPH_EXPORTED else "legacy"
