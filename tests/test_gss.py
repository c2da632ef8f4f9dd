"""GSS: the regularisers against hand values and Table 1, the a-update, groups, pruning, CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cli.main import cli
from compressor import zoo
from compressor.budget import Budget
from compressor.errors import CompressorWarning, InputError
from compressor.masks import has_machinery, weight_of
from compressor.methods import prune
from compressor.methods.gss import Gss
from compressor.methods.gss import prune as gss_prune
from compressor.methods.gss import reg as R
from compressor.stats import measure
from compressor.surgery.select import SelectedLinear


def _tiny_mlp() -> nn.Module:
    """2 -> 2 -> 1 with hand-picked weights (hidden neurons j = 0, 1)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 3.0]]))
        model[2].weight.copy_(torch.tensor([[4.0, -1.0]]))
    model.input_shape = (2,)
    return model


HALF = Budget("weights", 0.5)


def _gss(model, budget=HALF, **config) -> Gss:
    method = Gss(model, budget, eps=0.0, **config)
    method.prepare(torch.randn(2, *model.input_shape))
    return method


# hidden neuron 0: incoming (1, -2), outgoing (4); neuron 1: incoming (0, 3), outgoing (-1)
HAND = {
    # sum_j ||in_j||_1^2 + ||out_j||_1^2 = (9 + 16) + (9 + 1)
    ("gss", "212", "element"): 35.0,
    # (sum_j sqrt(||in_j||_2^2 + ||out_j||_2^2))^2 = (sqrt(5 + 16) + sqrt(9 + 1))^2
    ("gss", "212", "structure"): (math.sqrt(21) + math.sqrt(10)) ** 2,
    # sum_j sqrt(||in_j||_1^2 + ||out_j||_1^2) = sqrt(9 + 16) + sqrt(9 + 1)
    ("gss", "121", "element"): 5.0 + math.sqrt(10),
    ("gss", "121", "structure"): 5.0 + math.sqrt(10),
    ("lasso", "212", "element"): 1 + 2 + 0 + 3 + 4 + 1,
    ("l2", "212", "element"): 1 + 4 + 0 + 9 + 16 + 1,
    # rows of each layer: |1| + |-2|, |0| + |3|, |4| + |-1|, squared
    ("exclusive-lasso", "212", "element"): 9 + 9 + 25,
    ("group-lasso", "212", "structure"): math.sqrt(21) + math.sqrt(10),
}


# The input layer's neurons (inputs=True, the default): features 0 and 1 have no incoming
# weights and outgoing (1, 0) and (-2, 3), the first layer's columns (authors' structure.py).
INPUT_LAYER = {
    ("gss", "212", "element"): 1 + 25,
    # a layer of its own inside the sum over layers: (sqrt(1) + sqrt(13))^2
    ("gss", "212", "structure"): (1 + math.sqrt(13)) ** 2,
    ("gss", "121", "element"): 1 + 5,
    ("gss", "121", "structure"): 1 + 5,
    ("group-lasso", "212", "structure"): 1 + math.sqrt(13),
}


@pytest.mark.parametrize("inputs", [False, True])
@pytest.mark.parametrize(("regulariser", "norms", "variant"), list(HAND))
def test_deep_regularisers_hand_values(regulariser, norms, variant, inputs):
    budget = Budget("flops", 0.5) if variant == "structure" else Budget("weights", 0.5)
    method = _gss(
        _tiny_mlp(), budget, regulariser=regulariser, norms=norms, variant=variant, inputs=inputs
    )
    value = float(method.regulariser().detach())
    key = (regulariser, norms, variant)
    expected = HAND[key] + (INPUT_LAYER.get(key, 0.0) if inputs else 0.0)
    assert value == pytest.approx(expected, rel=1e-6)
    assert float(method.penalty().detach()) == pytest.approx(1e-5 * value, rel=1e-6)


def test_aux_form_hand_value_and_p2q2_is_squared_212():
    # p = 1, q = 2: c = (3 + 4, 3 + 1); at the optimal a, R = (7^(2/3) + 4^(2/3))^(3/2);
    # the input layer, a group of its own: c = (1, 5)
    method = _gss(_tiny_mlp(), p=1.0, q=2.0)
    hidden, inputs = (7 ** (2 / 3) + 4 ** (2 / 3)) ** 1.5, (1 + 5 ** (2 / 3)) ** 1.5
    assert float(method.regulariser().detach()) == pytest.approx(hidden + inputs)
    square = _gss(_tiny_mlp(), Budget("flops", 0.5), p=2.0, q=2.0)
    key = ("gss", "212", "structure")
    assert float(square.regulariser().detach()) == pytest.approx(HAND[key] + INPUT_LAYER[key])


def test_general_norms_hand_values():
    groups = [[torch.tensor([3.0, -4.0]), torch.tensor([1.0])], [torch.tensor([0.0, 2.0])]]
    # 212: sqrt((5 + 1)^2 + 2^2);  121: sqrt(7^2 + 1^2) + sqrt(2^2)
    assert float(R.omega_212(groups)) == pytest.approx(math.sqrt(40))
    assert float(R.omega_121(groups)) == pytest.approx(math.sqrt(50) + 2)


def test_table1_special_cases_equal_the_classic_regularisers():
    torch.manual_seed(0)
    w = torch.randn(12, dtype=torch.float64)
    parts = [w[:3], w[3:4], w[4:9], w[9:]]
    singles = [[x] for x in w]
    by_part = [[x for x in part] for part in parts]
    lasso, l2 = w.abs().sum(), w.pow(2).sum().sqrt()
    group = sum(part.norm() for part in parts)
    exclusive = sum(part.abs().sum() ** 2 for part in parts)
    close = dict(rtol=1e-12, atol=0)
    torch.testing.assert_close(R.omega_121([[x] for x in singles]), lasso, **close)
    torch.testing.assert_close(R.omega_212([singles]), lasso, **close)
    torch.testing.assert_close(R.omega_212([[x] for x in singles]), l2, **close)
    torch.testing.assert_close(R.omega_121([singles]), l2, **close)
    torch.testing.assert_close(R.omega_121(by_part), group, **close)
    torch.testing.assert_close(R.omega_212([parts]), group, **close)
    torch.testing.assert_close(R.omega_212(by_part) ** 2, exclusive, **close)
    torch.testing.assert_close(R.omega_121([parts]) ** 2, exclusive, **close)


def _explicit_neurons(model: nn.Sequential):
    """Per layer l, per neuron j: (W^(l)[j], W^(l+1)[:, j]), built by hand; the input
    layer first, whose neurons have no incoming weights."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    first = linears[0].weight
    inputs = [(first.new_zeros(0), first[:, j]) for j in range(first.shape[1])]
    return [inputs] + [
        [(a.weight[j], b.weight[:, j]) for j in range(a.out_features)]
        for a, b in zip(linears, linears[1:])
    ]


def test_deep_forms_are_the_general_norms_on_neuron_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model.input_shape = (5,)
    layers = _explicit_neurons(model)
    flops = Budget("flops", 0.5)
    deep212 = _gss(model, flops, variant="structure").regulariser()
    torch.testing.assert_close(deep212, sum(R.omega_212([layer]) ** 2 for layer in layers))
    deep121 = _gss(model, norms="121").regulariser()
    torch.testing.assert_close(deep121, sum(R.omega_121([list(n)]) for ls in layers for n in ls))
    element = _gss(model).regulariser()
    subgroups = [[[x] for x in half] for ls in layers for n in ls for half in n]
    torch.testing.assert_close(element, sum(R.omega_212([s]) ** 2 for s in subgroups))


@pytest.mark.parametrize(("p", "q"), [(1.0, 2.0), (2.0, 2.0), (1.0, 1.0), (0.5, 3.0)])
def test_aux_update_is_the_exact_minimiser(p, q):
    generator = torch.Generator().manual_seed(int(10 * p + q))
    c = torch.rand(20, dtype=torch.float64, generator=generator) * 5
    c[3] = 0.0  # a dead channel: a_j = 0, no contribution
    best = R.aux_update(c, p, q)
    assert float(best.pow(q).sum()) == pytest.approx(1.0)
    at_best = R.aux_penalty([c], [best], p)
    assert float(at_best) == pytest.approx(float(R.aux_minimum(c, p, q)), rel=1e-10)
    for _ in range(300):
        trial = (best * torch.exp(0.3 * torch.randn(20, generator=generator))).clamp_min(1e-12)
        trial = trial / trial.pow(q).sum().pow(1 / q)  # feasible: ||a||_q = 1
        assert float(at_best) <= float(R.aux_penalty([c], [trial], p)) * (1 + 1e-12)


def test_step_updates_a_after_every_optimiser_step():
    model = _tiny_mlp()
    method = _gss(model, p=1.0, q=2.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method.penalty().backward()
    optimizer.step()
    stale = method.selectors[0].clone()
    method.step(0.5)
    fresh = R.aux_update(sum(method.halves(1.0)[0]), 1.0, 2.0)
    torch.testing.assert_close(method.selectors[0], fresh)
    assert not torch.equal(stale, fresh)


def test_residual_streams_are_grouped_with_all_producers_and_readers():
    torch.manual_seed(0)
    model = zoo.build("resnet20", in_channels=1, num_classes=10, input_size=8, width=0.25)
    method = _gss(model, Budget("flops", 0.5), variant="structure")

    def find(producer):
        (ng,) = [n for n in method.neurons if producer in {m.fqn for m in n.group.producers}]
        return ng

    stage1, stage2 = find("stem.0"), find("layer2.0.shortcut.0")
    assert {m.fqn for m in stage1.group.producers} == {
        "stem.0",
        *(f"layer1.{b}.conv2" for b in range(3)),
    }
    assert {m.fqn for m in stage1.group.consumers} == {
        *(f"layer1.{b}.conv1" for b in range(3)),
        "layer2.0.conv1",
        "layer2.0.shortcut.0",
    }
    assert {m.fqn for m in stage2.group.producers} == {
        "layer2.0.shortcut.0",
        *(f"layer2.{b}.conv2" for b in range(3)),
    }
    # the Deep GSS halves of the stream sum over every producer's rows / reader's columns
    incoming, outgoing = R.halves(model, [stage1], 2.0)[0]
    weight = {fqn: m.weight for fqn, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    rows = sum(weight[m.fqn].pow(2).sum(dim=(1, 2, 3)) for m in stage1.group.producers)
    cols = sum(weight[m.fqn].pow(2).sum(dim=(0, 2, 3)) for m in stage1.group.consumers)
    torch.testing.assert_close(incoming, rows)
    torch.testing.assert_close(outgoing, cols)


def test_element_sparsity_exact_and_threshold_rule(small_digits):
    model = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    result = prune(model, "gss", Budget("weights", 0.1), small_digits, epochs=1, finetune_epochs=0)
    weights = [m.weight for m in result.model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    assert zeros == round(0.9 * total) and result.report["regulariser"] == "gss-element"
    method = _gss(copy.deepcopy(model), prune="threshold")
    expected = {f: w.abs() >= 0.25 * w.std(correction=0) for f, w in _weights(method).items()}
    method.prune_masks()
    got = {f: m.weight != 0 for f, m in method.layers.items()}
    assert all(torch.equal(got[f], expected[f] & (weight_of(method.layers[f]) != 0)) for f in got)


def _weights(method):
    return {f: weight_of(m).detach().clone() for f, m in method.layers.items()}


@pytest.mark.parametrize("arch", ["lenet5", "resnet20"])
def test_structure_slimmed_output_equals_masked_output(arch, small_digits):
    torch.manual_seed(0)
    kwargs = {"width": 0.5} if arch == "resnet20" else {}
    model = zoo.build(arch, in_channels=1, num_classes=10, input_size=8, **kwargs)
    dense = measure(model, small_digits.sample_inputs(2))
    method = Gss(model, Budget("flops", 0.3), p=1.0, q=2.0, epochs=1, finetune_epochs=1)
    method.prepare(small_digits.sample_inputs(2))
    method.prune_masks()
    x = torch.randn(16, *small_digits.input_shape)
    with torch.no_grad():
        masked = method.model.eval()(x)  # the masks are installed: this is the masked model
    result = method.finalize()
    torch.testing.assert_close(result.model(x), masked, rtol=1e-5, atol=1e-5)
    slim = measure(result.model, x[:2])
    assert abs(slim.flops / dense.flops - 0.3) <= 0.005
    assert result.report["achieved"]["keep"] == slim.flops / dense.flops
    assert slim.params < dense.params and has_machinery(result.model) == []


def test_channel_scores_are_relative_to_their_layer():
    """Scaling one layer (e.g. a classifier's small 1/sqrt(fan-in) weights) changes nothing."""
    torch.manual_seed(0)
    model = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    method = _gss(model, Budget("flops", 0.5), variant="structure")
    before = gss_prune.channel_scores(model, method.neurons)
    with torch.no_grad():
        model[-3].weight.mul_(1e-3)  # the 800 -> 500 Linear: conv2's outgoing weights
    after = gss_prune.channel_scores(model, method.neurons)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b)


def test_structure_hits_the_flop_budget_through_prune(small_digits):
    torch.manual_seed(0)
    model = zoo.build("lenet300", in_channels=1, num_classes=10, input_size=8)
    budget = Budget("flops", 0.25)
    result = prune(model, "gss", budget, small_digits, epochs=1, finetune_epochs=1)
    assert result.report["variant"] == "structure"
    assert abs(result.report["achieved"]["keep"] - 0.25) <= 0.005
    widths = [int(w) for w in result.report["structure"].split("-")]
    assert widths[0] < 64 and widths[-1] == 10 and widths[1] < 300 and widths[2] < 100
    first = result.model.get_submodule("1")  # reads only the input pixels it kept
    assert isinstance(first, SelectedLinear) and len(first.index) == widths[0]
    assert (
        measure(result.model, small_digits.sample_inputs(2)).flops
        == result.report["achieved"]["flops"]
    )


def test_structure_keeps_every_input_feature_with_inputs_off(small_digits):
    torch.manual_seed(0)
    model = zoo.build("lenet300", in_channels=1, num_classes=10, input_size=8)
    budget = Budget("flops", 0.25)
    result = prune(model, "gss", budget, small_digits, epochs=1, finetune_epochs=1, inputs=False)
    assert abs(result.report["achieved"]["keep"] - 0.25) <= 0.005
    assert result.report["structure"].startswith("64-")
    assert type(result.model.get_submodule("1")) is nn.Linear


def test_bad_configurations_name_the_fix():
    model = _tiny_mlp()
    # the hint restates the user's own budget (once always "8x", whatever was asked)
    with pytest.raises(InputError, match=r"not weights: give --budget 10x \(FLOPs is the default"):
        Gss(model, Budget("weights", 0.1), variant="structure")
    with pytest.raises(InputError, match="not flops: give --sparsity 0.9$"):
        Gss(model, Budget("flops", 0.1), variant="element")
    with pytest.raises(InputError, match="both --p and --q"):
        Gss(model, Budget("weights", 0.1), p=1.0)
    with pytest.raises(InputError, match="regulariser 'lasso2'"):
        Gss(model, Budget("weights", 0.1), regulariser="lasso2")


class Untraceable(nn.Module):
    """Data-dependent control flow: neither torch.fx nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)
        self.input_shape = (6,)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h if float(h.sum()) > 0 else -h)


def test_untraceable_model_falls_back_to_layer_groups():
    model = Untraceable()
    method = Gss(model, Budget("weights", 0.5), eps=0.0)
    with pytest.warns(CompressorWarning, match="layer-local"):
        method.prepare(torch.randn(2, 6))
    a, b = model.a.weight, model.b.weight
    expected = sum(w.abs().sum(dim=d).pow(2).sum() for w in (a, b) for d in (0, 1))
    torch.testing.assert_close(method.regulariser(), expected)


def test_cli_prune_element(tmp_path, lenet5_pt2):
    out, report = tmp_path / "gss.pt2", tmp_path / "report.json"
    args = [lenet5_pt2, "--method", "gss", "--variant", "element", "--sparsity", "0.9"]
    args += ["--data", "digits", "--epochs", "1", "--finetune-epochs", "1", "--lambda", "1e-5"]
    args += ["-o", out, "--report", report]
    result = CliRunner().invoke(cli, ["prune", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["method"] == "gss" and data["config"]["lambda_"] == 1e-5
    assert abs(data["achieved"]["sparsity"] - 0.9) < 1e-4 and out.exists()


def test_structure_variant_budgets_flops_by_default():
    assert Gss.default_metric({"variant": "structure"}) == "flops"
    assert Gss.default_metric({"variant": "element"}) == "weights"
    assert Gss.default_metric({}) == "weights"  # auto: a bare 4x is a weights budget


def test_cli_prune_structure_with_a_bare_budget(tmp_path, lenet5_pt2):
    """`--variant structure --budget 4x` (no --budget-metric) removes channels to 1/4 FLOPs."""
    out, report = tmp_path / "gss.pt2", tmp_path / "report.json"
    args = [lenet5_pt2, "--method", "gss", "--variant", "structure", "--budget", "4x"]
    args += ["--data", "digits", "--epochs", "1", "--finetune-epochs", "1", "-o", out]
    args += ["--report", report]
    result = CliRunner().invoke(cli, ["prune", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["budget"] == {"metric": "flops", "keep": 0.25, "factor": 4.0}
    assert abs(data["achieved"]["keep"] - 0.25) <= 0.005 and data["variant"] == "structure"


def test_cli_structure_with_a_weights_budget_names_the_fix(lenet5_pt2):
    args = [lenet5_pt2, "--method", "gss", "--variant", "structure", "--budget", "5x"]
    args += ["--budget-metric", "weights", "--data", "digits"]
    result = CliRunner().invoke(cli, ["prune", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 2
    assert "give --budget 5x (FLOPs is the default for this variant)" in result.output
