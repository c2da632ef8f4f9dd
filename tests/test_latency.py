"""--measure-latency: alternating rounds, medians, and a real onnxruntime run on LeNet-5."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from compressor.errors import InputError
from compressor.io import load_model
from exporters.latency import repeats_for, speedup, time_alternating


class FakeClock:
    """A clock that advances only when a runner runs, by that runner's scripted cost."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def runner(self, name: str, costs: list[float]):
        it = iter(costs)

        def run():
            self.calls.append(name)
            self.now += next(it)

        return run


def test_rounds_alternate_and_the_median_is_reported():
    clock = FakeClock()
    # seconds per run; the dense model's third round is an outlier the median ignores
    dense = clock.runner("dense", [0.010, 0.012, 0.500, 0.011, 0.013])
    pruned = clock.runner("pruned", [0.004, 0.006, 0.005, 0.003, 0.007])
    timed = time_alternating({"dense": dense, "pruned": pruned}, rounds=5, clock=clock)
    assert clock.calls == ["dense", "pruned"] * 5
    assert timed == pytest.approx({"dense": 12.0, "pruned": 5.0})
    assert speedup({"1": timed["dense"]}, {"1": timed["pruned"]}) == pytest.approx({"1": 2.4})


def test_a_sample_is_the_mean_of_its_repeats():
    clock = FakeClock()
    dense = clock.runner("dense", [0.001, 0.003] * 3)  # each sample: two runs, 2 ms mean
    pruned = clock.runner("pruned", [0.001] * 3)
    timed = time_alternating(
        {"dense": dense, "pruned": pruned}, rounds=3, repeats={"dense": 2}, clock=clock
    )
    assert clock.calls == ["dense", "dense", "pruned"] * 3
    assert timed == pytest.approx({"dense": 2.0, "pruned": 1.0})


def test_repeats_fill_the_minimum_sample_time():
    clock = FakeClock()
    run = clock.runner("m", [0.5, 0.0001])  # a slow first (allocating) run, then 0.1 ms
    assert repeats_for(run, clock) == 200  # 20 ms / 0.1 ms
    assert clock.calls == ["m", "m"]


def test_zero_rounds_is_an_input_error():
    with pytest.raises(InputError, match="at least 1"):
        time_alternating({"m": lambda: None}, rounds=0)


def test_cli_prune_and_info_measure_latency(tmp_path, lenet5_pt2):
    out = tmp_path / "m.pt2"
    args = ["prune", str(lenet5_pt2), "--method", "magnitude-global", "--sparsity", "0.5"]
    args += ["--measure-latency", "--latency-batch", "4", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    latency = load_model(out).report["latency_ms"]
    assert set(latency) == {"dense", "pruned", "speedup", "threads", "runtime"}
    assert latency["threads"] == 1
    for name in ("dense", "pruned"):
        assert set(latency[name]) == {"1", "4"}
        assert all(ms > 0 for ms in latency[name].values())
    assert latency["speedup"]["4"] == pytest.approx(latency["dense"]["4"] / latency["pruned"]["4"])
    assert "latency: batch 1: " in result.output and "batch 4: " in result.output
    info = CliRunner().invoke(cli, ["info", str(out)])  # the report's latency, not measured
    assert info.exit_code == 0, info.output
    assert "  latency: batch 1: " in info.output and "latency_ms" not in info.output
    args = ["info", str(out), "--json", "--measure-latency", "--latency-batch", "2"]
    shown = json.loads(CliRunner().invoke(cli, args).output)
    assert set(shown["latency_ms"]["model"]) == {"1", "2"}
    assert all(ms > 0 for ms in shown["latency_ms"]["model"].values())


def test_cli_latency_threads_must_be_positive(lenet5_pt2):
    result = CliRunner().invoke(cli, ["info", str(lenet5_pt2), "--latency-threads", "0"])
    assert result.exit_code == 2
    assert "--latency-threads" in result.output
