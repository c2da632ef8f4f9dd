"""Every registered method meets the same contract on the zoo models (timm-style; the deep
ResNets as conftest.DISTINCT_ARCHS / SHALLOW_ARCHS say)."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cli.main import cli
from compressor import zoo
from compressor.budget import Budget
from compressor.errors import CompressorError, MachineryLeftError
from compressor.io import load_model, save_model
from compressor.lift import clone_model
from compressor.masks import has_machinery, model_names, prunable_layers
from compressor.methods import get_method, list_methods, prune
from compressor.methods.targets import TARGET_TOLERANCE
from compressor.stats import measure
from tests.conftest import GRAPH_EXPORTED, SHALLOW_ARCHS

SPARSITY = 0.9
# every method runs where the model is (issue 16 item 8)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build(arch, in_channels=1, num_classes=10, input_size=8).eval()


def _budget(cls) -> Budget:
    return (
        Budget(cls.metrics[0], 1.0 - SPARSITY)
        if cls.metrics[0] == "weights"
        else Budget(cls.metrics[0], 0.5)
    )


CASES = [(method, arch) for method in list_methods() for arch in SHALLOW_ARCHS]
CASES += [("bar", "resnet56")]  # the deep case, for the method depth changes (see conftest)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("method", "arch"), CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_method_contract(method, arch, device, small_digits, tmp_path):
    cls = get_method(method)
    model = _model(arch).to(device)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, method, _budget(cls), small_digits, seed=0, **cls.smoke_config)
    pruned = result.model

    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), f"prune() modified the caller's model at {key}"
    assert has_machinery(pruned, model_names(model)) == []
    x = small_digits.sample_inputs(4).to(device)
    _check_budget(cls.metrics[0], model, pruned, result.report, x[:2])
    out = pruned.eval()(x)
    assert torch.isfinite(out).all()
    assert {p.device.type for p in pruned.parameters()} == {device}
    pruned, x, out = pruned.cpu(), x.cpu(), out.cpu()  # a .pt2 is saved from the CPU
    if method not in GRAPH_EXPORTED and arch != "lenet5":
        return  # same graph as the dense model: one .pt2 round trip per method suffices
    path = save_model(pruned, tmp_path / "p.pt2", example_inputs=(x[:2],), report=result.report)
    reloaded = load_model(path)
    torch.testing.assert_close(reloaded.model(x), out, rtol=1e-5, atol=1e-5)
    assert reloaded.report["method"] == method


def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match="magnitude-global"):
        get_method("magnitude-glob")


def test_unknown_option_named():
    with pytest.raises(ValueError, match="no option 'steps'"):
        prune(_model("lenet300"), "magnitude-global", "0.5", steps=3)


def _check_budget(metric: str, dense, pruned, report: dict, x: torch.Tensor) -> None:
    """The budget, measured on the models themselves (not taken from the report)."""
    if metric == "weights":
        layers = prunable_layers(pruned)
        zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
        total = sum(m.weight.numel() for m in layers.values())
        assert abs(zeros - SPARSITY * total) <= len(layers), (zeros, SPARSITY * total)
        assert report["achieved"]["zeros"] == zeros
        return
    # structured: channels are gone, so the cost is measured, against the dense model's
    keep = getattr(measure(pruned, x), metric) / getattr(measure(dense, x), metric)
    assert abs(keep - 0.5) <= TARGET_TOLERANCE, (metric, keep)
    assert report["achieved"]["keep"] == pytest.approx(keep, abs=1e-9)


def _budgets(cls) -> list[Budget]:
    return [Budget(m, 1.0 - SPARSITY if m == "weights" else 0.5) for m in cls.metrics]


# latency budgets time this machine; tests/test_latency_budget.py checks them on a fake table
LIFECYCLE = [
    (name, b)
    for name in list_methods()
    for b in _budgets(get_method(name))
    if b.metric != "latency"
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("method", "budget"), LIFECYCLE, ids=lambda v: getattr(v, "metric", v))
def test_lifecycle_leaves_nothing_and_meets_the_budget(method, budget, device, small_digits):
    """prepare -> penalty -> step -> finalize, driven by hand as a pipeline would."""
    cls = get_method(method)
    model = _model("resnet20").to(device)
    before = model_names(model)
    instance = cls(clone_model(model), budget, **cls.smoke_config)  # model stays dense
    x, y = (t.to(device) for t in next(iter(small_digits.train)))
    if "example_inputs" in inspect.signature(instance.prepare).parameters:
        instance.prepare(x[:2])
    else:
        instance.prepare()
    instance.model.train()
    optimizer = torch.optim.SGD(instance.model.parameters(), lr=0.01)
    loss = F.cross_entropy(instance.model(x), y) + instance.penalty()
    loss.backward()
    optimizer.step()
    instance.step(1.0)
    result = instance.finalize()
    assert has_machinery(result.model, before) == []
    _check_budget(budget.metric, model, result.model, result.report, x[:2])


class _HookLeak(torch.nn.Module):
    """A leak on purpose: a forward hook and a buffer that outlive finalize()."""

    def forward(self, x):
        return x


def test_a_leak_is_an_internal_error(small_digits, lenet5_pt2, tmp_path, monkeypatch):
    cls = get_method("magnitude-global")
    finalize = cls.finalize

    def leaky(self):
        result = finalize(self)
        result.model.register_forward_hook(lambda *_: None)
        result.model.leak = _HookLeak()
        result.model.register_buffer("gate_state", torch.zeros(1))
        return result

    monkeypatch.setattr(cls, "finalize", leaky)
    args = ["prune", str(lenet5_pt2), "--method", "magnitude-global", "--sparsity", "0.5"]
    done = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "o.pt2")])
    assert done.exit_code == 1, done.output
    assert "Error: internal error: MachineryLeftError: magnitude-global: finalize()" in done.output
    assert not (tmp_path / "o.pt2").exists()
    with pytest.raises(MachineryLeftError) as info:
        prune(_model("lenet5"), "magnitude-global", 0.5, small_digits)
    assert not isinstance(info.value, CompressorError)
    message = str(info.value)
    assert message.startswith("magnitude-global: finalize() left machinery on the model: ")
    assert "<model>: forward hook" in message
    assert "module leak" in message and "buffer gate_state" in message
