"""--pattern: masks in units of N:M groups or RxC blocks, at exact counts (issue 19.1)."""

import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor.errors import InputError, TargetNotReachedError
from compressor.io import load_model
from compressor.masks import prunable_layers
from compressor.methods import prune
from compressor.pattern_masks import block_masks, nm_zeros
from compressor.patterns import holds, parse_pattern, unit_sizes
from tests.models import EqualLayers, PatternNet

PATTERNS = ("2:4", "4:8", "1x4", "4x1")
# The most N:M reaches on PatternNet: conv1 (9 columns) stays dense.
NM_SPARSITY = {"2:4": 0.49, "4:8": 0.49}


def assert_pattern(model: torch.nn.Module, report: dict, text: str) -> None:
    """The pattern invariant on every prunable layer, and the report's pattern fields.

    RxC: every block of every layer is all zero or all kept. N:M: a listed layer keeps
    exactly N of every M (no more zeros, no fewer), every other layer is dense.
    """
    pattern = parse_pattern(text)
    weights = {f: m.weight.detach() for f, m in prunable_layers(model).items()}
    assert report["pattern"] == text
    listed = report["pattern_layers"]
    assert listed == [f for f, w in weights.items() if bool((w == 0).any())]
    for fqn, weight in weights.items():
        zeros = int((weight == 0).sum())
        if pattern.kind == "block":
            assert holds(weight, pattern), fqn
        elif fqn in listed:
            assert holds(weight, pattern), fqn
            assert zeros == nm_zeros(weight.shape, pattern), fqn
        else:
            assert zeros == 0, fqn


def kept_total(model: torch.nn.Module) -> int:
    return sum(int((m.weight != 0).sum()) for m in prunable_layers(model).values())


def sparsity_for(text: str) -> float:
    return NM_SPARSITY.get(text, 0.8)


@pytest.mark.parametrize("text", PATTERNS)
@pytest.mark.parametrize("method", ["magnitude-global", "magnitude-uniform", "magnitude-erk"])
def test_magnitude_pattern_invariant_and_exact_count(method, text):
    torch.manual_seed(0)
    model = PatternNet()
    result = prune(model, method, sparsity_for(text), pattern=text)
    assert_pattern(result.model, result.report, text)
    layers = prunable_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    keep_total = round((1 - sparsity_for(text)) * total)
    pattern = parse_pattern(text)
    if pattern.kind == "block":
        # at most the budget, short of it by less than one block (global) or one per layer
        per = 1 if method == "magnitude-global" else len(layers)
        assert 0 <= keep_total - kept_total(result.model) < pattern.a * pattern.b * per
    else:  # every eligible layer: conv1 (9 columns) is the only one left dense
        assert result.report["pattern_layers"] == ["conv2", "fc1", "fc2", "head"]


def test_block_masks_match_a_brute_force_ranking():
    """Blocks (partial ones at the edges) ranked by summed score over both layers, taken
    best first while their element count fits."""
    torch.manual_seed(1)
    scores = {"a": torch.rand(5, 7), "b": torch.rand(3, 2, 2, 2)}
    pattern = parse_pattern("2x3")
    keep = 40
    units = []
    for fqn, score in scores.items():
        rows, cols = score.shape[0], score[0].numel()
        flat = score.reshape(rows, cols)
        for r in range(0, rows, 2):
            for c in range(0, cols, 3):
                block = flat[r : r + 2, c : c + 3]
                units.append((-float(block.sum()), fqn, r, c, block.numel()))
    expected = {
        f: torch.zeros(s.shape[0], s[0].numel(), dtype=torch.bool) for f, s in scores.items()
    }
    used = 0
    for _, fqn, r, c, size in sorted(units, key=lambda u: u[0]):
        if used + size > keep:
            break
        expected[fqn][r : r + 2, c : c + 3] = True
        used += size
    masks = block_masks(scores, pattern, keep)
    for fqn in scores:
        assert torch.equal(masks[fqn].reshape(expected[fqn].shape), expected[fqn]), fqn
    assert sum(int(m.sum()) for m in masks.values()) == used
    assert keep - used < 6
    assert int(unit_sizes(scores["a"].shape, pattern)[-1, -1]) == 1  # a partial edge block


def test_nm_at_04_patterns_the_least_lossy_layers_and_leaves_the_rest_dense():
    torch.manual_seed(0)
    model = EqualLayers()
    result = prune(model, "magnitude-global", 0.4, pattern="2:4")
    # oracle: per layer, the |w| 2:4 drops (the two smallest of every four) per pruned weight
    loss = {}
    for fqn, module in prunable_layers(model).items():
        groups = module.weight.detach().abs().reshape(-1, 4).sort(dim=1).values
        loss[fqn] = float(groups[:, :2].sum()) / (groups.shape[0] * 2)
    least = sorted(loss, key=loss.__getitem__)[:4]
    assert sorted(result.report["pattern_layers"]) == sorted(least)
    assert result.report["achieved"]["sparsity"] == 0.4  # 4 x 512 of 5 x 1024, exactly
    assert_pattern(result.model, result.report, "2:4")
    dense = (set(loss) - set(least)).pop()
    before = dict(model.named_parameters())[f"{dense}.weight"]
    after = dict(result.model.named_parameters())[f"{dense}.weight"]
    assert torch.equal(before, after)


def test_nm_between_whole_layers_fails_naming_the_reachable_sparsity():
    torch.manual_seed(0)
    with pytest.raises(
        TargetNotReachedError, match=r"reach sparsity 0\.4000 nearest the request \(at most 0\.5000"
    ):
        prune(EqualLayers(), "magnitude-global", 0.45, pattern="2:4")


def test_structured_method_refuses_a_pattern():
    from compressor.budget import Budget
    from compressor.methods import get_method

    with pytest.raises(InputError, match="--pattern 2:4 is for the weight-sparsity methods"):
        get_method("channel-magnitude")(PatternNet(), Budget("flops", 0.5), pattern="2:4")


@pytest.fixture
def run():
    def invoke(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.mark.parametrize(
    ("method", "budget", "pattern", "message"),
    [
        ("bar", ("--budget", "2x"), "2:4", "removes whole channels to a flops budget"),
        ("magnitude-global", ("--sparsity", "0.5"), "4:2", "N:M needs 1 <= N < M <= 32"),
        ("magnitude-global", ("--sparsity", "0.5"), "1x1", "2 <= R*C <= 256"),
        ("magnitude-global", ("--sparsity", "0.5"), "dense", "neither N:M (e.g. 2:4) nor RxC"),
    ],
)
def test_cli_refuses_pattern(run, tmp_path, lenet5_pt2, method, budget, pattern, message):
    out = tmp_path / "o.pt2"
    args = ("prune", lenet5_pt2, "--method", method, *budget, "--pattern", pattern)
    result = run(*args, "--data", "digits", "-o", out)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_cli_prunes_to_blocks_and_reports_them(run, tmp_path, lenet5_pt2):
    out, report = tmp_path / "o.pt2", tmp_path / "r.json"
    result = run(
        "prune", lenet5_pt2, "-m", "magnitude-global", "--sparsity", "0.9", "--pattern", "1x4",
        "--data", "digits", "-o", out, "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written = json.loads(report.read_text())
    model = load_model(out).model
    assert_pattern(model, written, "1x4")
    assert written["config"]["pattern"] == "1x4"
    assert abs(written["achieved"]["sparsity"] - 0.9) < 1e-4


def test_cli_nm_target_between_whole_layers_exits_1_naming_the_reach(run, tmp_path, lenet5_pt2):
    """LeNet-5's 400k-weight fc1 dominates: 2:4 reaches 3.5 % or 49.9 %, not 40 %."""
    out = tmp_path / "o.pt2"
    result = run(
        "prune", lenet5_pt2, "-m", "magnitude-global", "--sparsity", "0.4", "--pattern", "2:4",
        "--data", "digits", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "2:4 fixes each patterned layer's sparsity" in result.output
    assert "(at most 0.4994 on this model)" in result.output
    assert "Traceback" not in result.output and not out.exists()
