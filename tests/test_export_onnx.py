"""ONNX export: every zoo model (ResNet-32 aside, see conftest), dense and 90 % sparse, runs in
onnxruntime like in PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compressor import zoo
from compressor.errors import CompressorError, InputError
from compressor.io import load_model, save_model
from compressor.methods import prune
from compressor.train import recalibrate_batchnorm_
from exporters.onnx import RTOL, export_onnx
from tests.conftest import DISTINCT_ARCHS

INPUT = (1, 8, 8)  # small inputs keep the exports fast; LeNet-5 upsamples them inside


def _zoo_model(arch: str, sparse: bool) -> nn.Module:
    torch.manual_seed(0)
    model = zoo.build(arch, in_channels=1, num_classes=10, input_size=INPUT[1:]).eval()
    if sparse:
        model = prune(model, "magnitude-global", 0.9).model
    _randomize_batchnorm_(model)
    if sparse:
        # pruning a random-init net shrinks its signal layer by layer until the output is
        # constant (the export then refuses it); re-estimated BN statistics restore it, as
        # fine-tuning a real model would
        recalibrate_batchnorm_(model, [(_inputs(16, seed=3), None)])
    return model


def _randomize_batchnorm_(model: nn.Module) -> None:
    """Trained-looking BN statistics, so BN folding in the exporter is really exercised."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)


def _ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _inputs(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, *INPUT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse90"])
@pytest.mark.parametrize("arch", DISTINCT_ARCHS)
def test_every_zoo_model_exports_and_matches(tmp_path, arch, sparse):
    # The sparse model has the dense one's graph with zeros in its weights: the TorchScript
    # exporter (the "auto" fallback, 10-20x cheaper) carries them as the default one does,
    # and onnxruntime's verification checks them just the same (see GRAPH_EXPORTED).
    model = _zoo_model(arch, sparse)
    path = tmp_path / f"{arch}.onnx"
    exporter = "legacy" if sparse else "auto"
    report = {"method": "test", "arch": arch}
    result = export_onnx(model, path, (_inputs(2),), report=report, exporter=exporter)
    assert result.verified and result.max_abs_diff <= result.tolerance
    assert result.batch_sizes == (1, 2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # one file, no .data
    assert result.size_bytes == path.stat().st_size
    # an independent run at a batch size the export never saw
    x = _inputs(5, seed=7)
    with torch.no_grad():
        expected = model(x).numpy()
    got = _ort(path, x)
    assert np.abs(got - expected).max() <= RTOL * max(np.abs(expected).max(), 1e-2)


def test_graph_has_names_dynamic_batch_and_report(tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(_zoo_model("lenet5", True), path, (_inputs(2),), report={"method": "x", "k": 1})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["compressor.report"]) == {"method": "x", "k": 1}
    assert json.loads(props["compressor.input_shapes"]) == [list(INPUT)]


def test_sparse_initializers_smaller_and_identical_in_onnxruntime(tmp_path):
    model = _zoo_model("lenet5", True)
    dense = export_onnx(model, tmp_path / "dense.onnx", (_inputs(2),))
    sparse = export_onnx(model, tmp_path / "sparse.onnx", (_inputs(2),), sparse_initializers=True)
    assert sparse.sparse_initializers >= 2 and sparse.size_bytes < 0.5 * dense.size_bytes
    proto = onnx.load(str(sparse.path))
    for init in proto.graph.sparse_initializer:
        assert init.indices.data_type == onnx.TensorProto.INT64 and len(init.indices.dims) == 1
    x = _inputs(4, seed=3)
    assert np.array_equal(_ort(dense.path, x), _ort(sparse.path, x))


def test_sparse_threshold_decides_which_weights_go_coo(tmp_path):
    model = _zoo_model("lenet300", True)
    threshold = 0.95
    result = export_onnx(
        model,
        tmp_path / "a.onnx",
        (_inputs(2),),
        sparse_initializers=True,
        sparse_threshold=threshold,
    )
    proto = onnx.load(str(result.path))
    for init in proto.graph.sparse_initializer:
        size = int(np.prod(init.dims))
        assert 1 - len(onnx.numpy_helper.to_array(init.values)) / size >= threshold
    for init in proto.graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        if array.ndim >= 2 and array.dtype == np.float32:
            assert np.mean(array == 0) < threshold, init.name
    assert result.sparse_initializers == len(proto.graph.sparse_initializer)
    with pytest.raises(InputError, match="threshold"):
        export_onnx(model, tmp_path / "b.onnx", (_inputs(2),), sparse_threshold=1.5)


def test_pt2_round_trip_train_save_load_export(tmp_path, lenet5_digits, digits):
    """A .pt2 comes back as a lifted fx graph; it must export like the model it came from."""
    pruned = prune(lenet5_digits, "magnitude-global", 0.9).model
    sample = digits.sample_inputs(4)
    save_model(pruned, tmp_path / "m.pt2", example_inputs=(sample,), report={"method": "mg"})
    loaded = load_model(tmp_path / "m.pt2")
    assert isinstance(loaded.model, torch.fx.GraphModule)
    result = export_onnx(loaded.model, tmp_path / "m.onnx", (sample,), report=loaded.report)
    assert result.max_abs_diff <= result.tolerance
    with torch.no_grad():
        original = pruned.eval()(sample).numpy()
    ort_out = _ort(result.path, sample)
    assert np.abs(ort_out - original).max() <= result.tolerance


class _Drifting(nn.Module):
    """Outputs that change after export: what the verification exists to catch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x) * self.calls


def test_mismatch_is_an_error_and_writes_nothing(tmp_path):
    path = tmp_path / "drift.onnx"
    with pytest.raises(CompressorError, match="max abs difference .* exceeds the tolerance"):
        export_onnx(_Drifting(), path, (torch.randn(2, 4),))
    assert not path.exists()
    unchecked = export_onnx(_Drifting(), path, (torch.randn(2, 4),), verify=False)
    assert path.exists() and not unchecked.verified and unchecked.max_abs_diff is None


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_unexportable_model_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="torch.onnx could not export _DataDependent"):
        export_onnx(_DataDependent(), tmp_path / "m.onnx", (torch.randn(2, 3),), exporter="dynamo")


def test_opset_is_honoured_or_refused(tmp_path):
    model = _zoo_model("lenet300", False)
    result = export_onnx(model, tmp_path / "a.onnx", (_inputs(2),), opset=18)
    assert result.opset == 18 and result.exporter == "dynamo"
    result = export_onnx(model, tmp_path / "b.onnx", (_inputs(2),), opset=13)
    assert result.opset == 13 and result.exporter == "legacy"
    with pytest.raises(InputError, match="--opset 6"):
        export_onnx(model, tmp_path / "c.onnx", (_inputs(2),), opset=6)


def test_never_overwrites_the_input_and_keeps_train_mode(tmp_path):
    model = _zoo_model("lenet300", False).train()
    source = tmp_path / "model.pt2"
    source.write_bytes(b"original")
    with pytest.raises(InputError, match="input file"):
        export_onnx(model, source, (_inputs(2),), protect=(source,))
    assert source.read_bytes() == b"original"
    export_onnx(model, tmp_path / "ok.onnx", (_inputs(1),))  # batch 1 example is fine too
    assert model.training
