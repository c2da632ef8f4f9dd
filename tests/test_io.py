import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compressor import zoo
from compressor.errors import CompressorError, InputError
from compressor.io import atomic_write, detect_format, load_model, save_model
from tests.conftest import DISTINCT_ARCHS, file_digest


def _net(arch="resnet20", size=8):
    torch.manual_seed(0)
    return zoo.build(arch, in_channels=1, num_classes=10, input_size=size).eval()


@pytest.mark.parametrize("arch", DISTINCT_ARCHS)
def test_pt2_round_trip_lifts_real_layers(tmp_path, arch):
    model = _net(arch)
    x = torch.randn(3, 1, 8, 8)
    path = save_model(
        model, tmp_path / "m.pt2", example_inputs=(x[:2],), report={"method": "dense", "k": 1}
    )
    loaded = load_model(path)
    assert loaded.format == "pt2"
    assert loaded.report == {"method": "dense", "k": 1}
    assert loaded.input_shape == (1, 8, 8)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=1e-6)
    assert set(loaded.model.state_dict()) == set(model.state_dict())
    kinds = {type(m) for m in loaded.model.modules()}
    assert {
        type(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))
    } <= kinds


def test_lifted_model_trains(tmp_path):
    model = _net("resnet20")
    path = save_model(model, tmp_path / "m.pt2", example_inputs=(torch.randn(2, 1, 8, 8),))
    lifted = load_model(path).model.train()
    bn = lifted.get_submodule("layer1.0.bn1")
    before = bn.running_mean.clone()
    lifted(torch.randn(4, 1, 8, 8)).sum().backward()
    assert not torch.equal(before, bn.running_mean), "BN must update in train mode"
    assert lifted.get_submodule("layer1.0.conv1").weight.grad is not None


def test_dynamic_batch(tmp_path):
    model = _net("lenet300", 8)
    path = save_model(model, tmp_path / "m.pt2", example_inputs=(torch.randn(2, 1, 8, 8),))
    lifted = load_model(path).model
    for batch in (1, 5, 33):
        assert lifted(torch.randn(batch, 1, 8, 8)).shape == (batch, 10)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_state_dict_needs_arch(tmp_path, suffix):
    model = _net("lenet5")
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.raises(InputError, match="--arch"):
        load_model(path)
    loaded = load_model(path, arch="lenet5", input_shape=(1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded.model.eval()(x), model(x))
    with pytest.raises(InputError, match="do not fit --arch resnet20"):
        load_model(path, arch="resnet20")


def test_pickled_module_needs_trust(tmp_path):
    model = _net("lenet300")
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(InputError, match="--trust-pickle"):
        load_model(path)
    assert isinstance(load_model(path, trust_pickle=True).model, nn.Module)


def test_torchscript_rejected_with_hint(tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.script(_net("lenet300")).save(str(path))
    assert detect_format(path) == "torchscript"
    with pytest.raises(InputError, match=r"TorchScript.*torch\.export"):
        load_model(path)


def test_format_from_content_not_extension(tmp_path):
    path = save_model(
        _net("lenet300"), tmp_path / "m.pt2", example_inputs=(torch.randn(2, 1, 8, 8),)
    )
    renamed = tmp_path / "model.pt"
    renamed.write_bytes(path.read_bytes())
    assert load_model(renamed).format == "pt2"


@pytest.mark.parametrize("content", [b"", b"hello world, not a model", b"PK\x03\x04garbage"])
def test_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.pt2"
    path.write_bytes(content)
    with pytest.raises(InputError, match="bad.pt2"):
        load_model(path)


def test_truncated_pt2(tmp_path):
    path = save_model(
        _net("lenet300"), tmp_path / "m.pt2", example_inputs=(torch.randn(2, 1, 8, 8),)
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load_model(path)


def test_missing_file():
    with pytest.raises(InputError, match="does not exist"):
        load_model("/nonexistent/model.pt2")


def test_refuses_to_overwrite_input(tmp_path):
    path = save_model(
        _net("lenet300"), tmp_path / "m.pt2", example_inputs=(torch.randn(2, 1, 8, 8),)
    )
    digest = file_digest(path)
    with pytest.raises(InputError, match="input"):
        save_model(
            _net("lenet300"),
            tmp_path / "." / "m.pt2",
            example_inputs=(torch.randn(2, 1, 8, 8),),
            protect=(path,),
        )
    assert file_digest(path) == digest


def test_atomic_write_keeps_old_file_on_crash(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def crash(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"], "no temporary file left behind"


def test_untraceable_model_saves_as_safetensors(tmp_path):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
                return self.fc(x)
            return -self.fc(x)

    model = DataDependent()
    with pytest.raises(CompressorError, match=r"\.safetensors"):
        save_model(model, tmp_path / "m.pt2", example_inputs=(torch.randn(2, 4),))
    path = save_model(
        model, tmp_path / "m.safetensors", example_inputs=(torch.randn(2, 4),), report={"a": 1}
    )
    assert detect_format(path) == "safetensors"


def test_written_files_get_the_usual_mode(tmp_path):
    import os

    path = atomic_write(tmp_path / "f.bin", lambda tmp: open(tmp, "wb").close())
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_saved_file_does_not_embed_the_dataset(tmp_path):
    from compressor.data import load_data

    data = load_data("digits")
    model = _net("lenet300", 8)
    path = save_model(model, tmp_path / "m.pt2", example_inputs=(data.sample_inputs(2),))
    dataset_bytes = data.train.dataset.tensors[0].numel() * 4
    assert path.stat().st_size < 50_000 + sum(p.numel() * 4 for p in model.parameters())
    assert path.stat().st_size < dataset_bytes
