"""The engine's latency model: a cached per-layer table, timed once, summed over layers."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from compressor import zoo
from compressor.surgery import channel_groups, mask_, slim_
from compressor.surgery.cost import CostModel
from compressor.surgery.fit import FitUnit, fit_budget
from compressor.surgery.latency import (
    TABLE_VERSION,
    LatencyModel,
    LatencyTable,
    OrtLayerTimer,
    cache_path,
    machine_id,
    rate_multiple,
    spec_key,
)
from compressor.surgery.latency_graphs import single_layer_graph
from tests.test_surgery_cost import random_keep


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build(arch, in_channels=1, num_classes=10, input_size=8).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


class FakeTimer:
    """Milliseconds = 1e-6 x MACs + 0.01 per layer call, and a record of what was timed."""

    def __init__(self):
        self.timed: list[str] = []

    def __call__(self, spec: dict) -> float:
        self.timed.append(spec_key(spec))
        if spec["op"] == "linear":
            macs = spec["in"] * spec["out"] * spec["tokens"]
        else:
            out_hw = [
                (h + 2 * p - d * (k - 1) - 1) // s + 1
                for h, p, d, k, s in zip(spec["hw"], spec["p"], spec["d"], spec["k"], spec["s"])
            ]
            per_output = spec["in"] // spec["g"] * math.prod(spec["k"])
            macs = spec["out"] * math.prod(out_hw) * per_output
        return 1e-6 * macs + 0.01


def _latency(model, x, residual, tmp_path, timer=None):
    table = LatencyTable(timer or FakeTimer(), path=tmp_path / "table.json")
    return LatencyModel(CostModel(model, (x,), residual), model, (x,), table)


def test_the_table_holds_each_layer_shape_and_the_total_sums_them(tmp_path):
    timer = FakeTimer()
    latency = _latency(_model("lenet5"), _x(), "tied", tmp_path, timer)
    expected = {
        "conv2d d=1x1 g=1 hw=28x28 in=1 k=5x5 out=20 p=0x0 s=1x1": 1e-6 * 20 * 24 * 24 * 25 + 0.01,
        "conv2d d=1x1 g=1 hw=12x12 in=20 k=5x5 out=50 p=0x0 s=1x1": 1e-6 * 50 * 64 * 500 + 0.01,
        "linear in=800 out=500 tokens=1": 1e-6 * 800 * 500 + 0.01,
        "linear in=500 out=10 tokens=1": 1e-6 * 500 * 10 + 0.01,
    }
    assert latency.dense() == pytest.approx(sum(expected.values()), rel=1e-12)
    assert latency.table.entries == pytest.approx(expected, rel=1e-12)
    keep = {0: torch.arange(20) < 5}  # conv1 keeps 5 channels: conv2 reads 5
    assert latency.cost(keep) == pytest.approx(
        1e-6 * 5 * 24 * 24 * 25
        + 0.01
        + 1e-6 * 50 * 64 * 125
        + 0.01
        + expected["linear in=800 out=500 tokens=1"]
        + expected["linear in=500 out=10 tokens=1"],
        rel=1e-12,
    )
    assert len(timer.timed) == 6  # each distinct shape timed once, however often priced
    latency.cost(keep)
    assert len(timer.timed) == 6


@pytest.mark.parametrize(("arch", "residual"), [("resnet20", "mixed"), ("mobilenetv2", "tied")])
def test_the_prediction_equals_the_slimmed_networks_own_sum(arch, residual, tmp_path):
    x = _x()
    latency = _latency(_model(arch), x, residual, tmp_path)
    keep = random_keep(channel_groups(_model(arch), x), residual, seed=2)
    predicted = latency.cost(keep)
    model = _model(arch)
    mask_(model, keep, x, residual=residual, norms=True)
    slimmed = slim_(model, keep, x, residual=residual).model
    assert predicted == pytest.approx(_latency(slimmed, x, "tied", tmp_path).dense(), rel=1e-12)
    assert predicted < latency.dense()


def test_the_table_is_cached_and_reused(tmp_path):
    latency = _latency(_model("lenet5"), _x(), "tied", tmp_path)
    dense = latency.dense()
    latency.table.save()
    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["version"] == TABLE_VERSION and saved["entries"] == latency.table.entries

    def refuse(spec):
        raise AssertionError(f"timed again: {spec_key(spec)}")

    again = _latency(_model("lenet5"), _x(), "tied", tmp_path, refuse)
    assert again.dense() == dense and again.table.measured == 0


def test_a_table_timed_another_way_is_timed_again(tmp_path):
    """Version 1 tables were timed on the wall clock: their entries are not reused."""
    latency = _latency(_model("lenet5"), _x(), "tied", tmp_path)
    latency.dense()
    latency.table.save()
    path = tmp_path / "table.json"
    old = json.loads(path.read_text()) | {"version": 1}
    path.write_text(json.dumps(old))
    again = _latency(_model("lenet5"), _x(), "tied", tmp_path)
    assert again.table.entries == {}
    again.dense()
    assert again.table.measured == len(latency.table.entries)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_a_damaged_table_file_is_timed_again(text, tmp_path):
    (tmp_path / "table.json").write_text(text)
    latency = _latency(_model("lenet5"), _x(), "tied", tmp_path)
    assert latency.table.entries == {} and latency.dense() > 0
    latency.table.save()
    assert json.loads((tmp_path / "table.json").read_text())["version"] == TABLE_VERSION


def test_the_layer_timer_reads_the_cpu_clock_by_default():
    """A busy neighbour on the core inflates the wall clock, not this process's CPU time
    (bench/RESULTS.md latency_noise); with several threads CPU time adds up their work."""
    assert OrtLayerTimer().clock is time.process_time
    assert OrtLayerTimer(threads=2).clock is time.perf_counter


def test_the_cache_file_is_keyed_by_runtime_cpu_and_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    machine = machine_id(1)
    import onnxruntime

    assert machine["onnxruntime"] == onnxruntime.__version__ and machine["threads"] == "1"
    path = cache_path(1)
    assert path.parent == tmp_path / "compressor" and path.name.startswith("latency-")
    assert cache_path(2) != path
    assert cache_path(1, machine | {"cpu": "another CPU"}) != path


@pytest.mark.parametrize(
    "spec",
    [
        {
            "op": "conv2d",
            "in": 4,
            "out": 6,
            "k": [3, 3],
            "s": [2, 2],
            "p": [1, 1],
            "d": [1, 1],
            "g": 1,
            "hw": [9, 7],
        },
        {
            "op": "conv2d",
            "in": 6,
            "out": 6,
            "k": [3, 3],
            "s": [1, 1],
            "p": [1, 1],
            "d": [1, 1],
            "g": 6,
            "hw": [5, 5],
        },
        {"op": "linear", "in": 12, "out": 5, "tokens": 3},
    ],
)
def test_the_timed_single_layer_graph_is_the_layer(spec):
    weights, x, got = run_graph(*single_layer_graph(spec))
    if spec["op"] == "linear":
        want = torch.nn.functional.linear(torch.from_numpy(x), weights["w"], weights["b"])
    else:
        want = torch.nn.functional.conv2d(
            torch.from_numpy(x),
            weights["w"],
            weights["b"],
            spec["s"],
            spec["p"],
            spec["d"],
            spec["g"],
        )
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def run_graph(graph: bytes, shape: list[int]):
    """(weights by name, input, output) of a timed graph run once in onnxruntime."""
    import onnxruntime as ort
    from onnx import load_from_string, numpy_helper

    weights = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
        for t in load_from_string(graph).graph.initializer
    }
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    got = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return weights, x, got


def test_the_layer_timer_takes_the_median_of_rounds_on_its_clock():
    ticks = iter(range(10_000))
    clock = lambda: next(ticks) * 0.001  # noqa: E731  (every reading 1 ms after the last)
    spec = {"op": "linear", "in": 4, "out": 3, "tokens": 1}
    # one warm run reads 1 ms: 5 ms samples need 5 runs; each sample then reads 1 ms
    assert OrtLayerTimer(rounds=3, clock=clock)(spec) == pytest.approx(1.0 / 5)


def test_the_fitter_meets_a_latency_budget_on_the_fake_table(tmp_path):
    x = _x()
    latency = _latency(_model("resnet20"), x, "tied", tmp_path)
    groups = [g for g in channel_groups(_model("resnet20"), x) if g.prunable]
    units = [FitUnit(g.id, torch.arange(g.size, dtype=torch.float32), g.fixed) for g in groups]
    dense = latency.dense()
    fit = fit_budget(units, latency.cost, 0.5 * dense, 0.495 * dense, round_to=4)
    assert 0.495 * dense <= fit.after <= 0.5 * dense
    keep = {unit.key: mask for unit, mask in zip(units, fit.masks)}
    assert all(int(m.sum()) % 4 == 0 or bool(m.all()) for m in fit.masks)
    model = _model("resnet20")
    mask_(model, keep, x, norms=True)
    slimmed = slim_(model, keep, x).model
    assert _latency(slimmed, x, "tied", tmp_path).dense() == pytest.approx(fit.after, rel=1e-12)


@pytest.mark.parametrize(("block", "expected"), [(8, 8), (4, 4), (1, 1), (64, 32)])
def test_the_default_multiple_is_where_the_kernel_rate_steps_up(block, expected, tmp_path):
    """A kernel that reads and writes `block` channels at a time: a partial block costs a
    full one, so rounding a count up to a multiple of `block` is free."""
    up = lambda c: -(-c // block) * block  # noqa: E731
    timer = lambda spec: 1e-1 * up(spec["out"]) / block + 1e-3 * up(spec["in"])  # noqa: E731
    table = LatencyTable(timer, path=tmp_path / "table.json")
    specs = [{"op": "linear", "in": 64, "out": out, "tokens": 1} for out in (100, 80, 48, 10)]
    assert rate_multiple(table, specs) == expected


def test_a_multiple_that_would_freeze_a_layer_is_not_the_default(tmp_path):
    """onnxruntime pads a blocked conv's outputs to 16, so a 16-channel layer costs the same
    at 5 outputs as at 16; rounding to 16 (or 32) then looks free but would keep every such
    layer whole, and reading 5 channels instead of 16 makes the next layer cheaper."""
    pad = lambda c: -(-c // 16) * 16  # noqa: E731
    timer = lambda spec: 1e-3 * pad(spec["out"]) * spec["in"]  # noqa: E731
    table = LatencyTable(timer, path=tmp_path / "table.json")
    specs = [{"op": "linear", "in": 16, "out": 16, "tokens": 1}] * 3
    assert rate_multiple(table, specs) == 1
