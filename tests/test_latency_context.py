"""Convs priced in context: the latency table's pair chains (surgery/latency_graphs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compressor.surgery.latency import LatencyTable, OrtLayerTimer
from compressor.surgery.latency_graphs import chainable, pair_chain_graph, reverse
from tests.test_surgery_latency import FakeTimer, run_graph

CONV = {"op": "conv2d", "in": 4, "out": 8, "k": [3, 3], "s": [1, 1], "p": [1, 1]}
CONV |= {"d": [1, 1], "g": 1, "hw": [8, 8]}
BASE, PAIR = 0.5, 3.0


class PairTimer(FakeTimer):
    """FakeTimer's layers plus a fixed run cost, and every pair chain adding PAIR ms."""

    def __init__(self):
        super().__init__()
        self.pairs: list[dict] = []

    def __call__(self, spec: dict) -> float:
        return BASE + super().__call__(spec)

    def pair(self, spec: dict) -> float:
        self.pairs.append(spec)
        return PAIR

    def overhead(self) -> float:
        return BASE


def test_the_pair_chain_graph_is_the_conv_and_its_reverse_alternating():
    weights, x, got = run_graph(*pair_chain_graph(CONV, 2))
    want = torch.from_numpy(x)
    for i in range(4):
        want = torch.relu(
            torch.nn.functional.conv2d(want, weights[f"w{i}"], weights[f"b{i}"], 1, 1)
        )
    assert got.shape == (1, 4, 8, 8)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-3)


def test_a_same_size_conv_is_priced_as_its_share_of_the_pair_chain(tmp_path):
    timer = PairTimer()
    table = LatencyTable(timer, path=tmp_path / "table.json")
    alone, back = table.alone(CONV) - BASE, table.alone(reverse(CONV)) - BASE
    assert table.lookup(CONV) == pytest.approx(BASE + PAIR * alone / (alone + back))
    # the two convs share the pair: one chain timed, their prices add up to it
    assert table.lookup(CONV) + table.lookup(reverse(CONV)) == pytest.approx(2 * BASE + PAIR)
    assert timer.pairs == [CONV]
    strided = CONV | {"s": [2, 2]}  # cannot follow its reverse: priced alone
    assert not chainable(strided) and not chainable(CONV | {"p": [0, 0]})
    assert table.lookup(strided) == table.alone(strided)
    assert len(timer.pairs) == 1


def test_a_timer_without_pair_chains_prices_every_layer_alone(tmp_path):
    table = LatencyTable(FakeTimer(), path=tmp_path / "table.json")
    assert table.lookup(CONV) == table.alone(CONV) == FakeTimer()(CONV)


def test_a_table_that_priced_convs_alone_is_timed_again(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"version": 2, "entries": {"overhead": 0.5}}))
    assert LatencyTable(PairTimer(), path=path).entries == {}


def _avx() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _avx(), reason="onnxruntime's blocked (NCHWc) convs need AVX2 or wider")
def test_real_pair_chains_price_a_conv_off_the_blocked_kernels_above_one_on_them(tmp_path):
    """17 channels fall off onnxruntime's NCHWc kernels, 16 stay on them; a chain runs the
    17-channel conv at about 3x at 14x14 (bench/RESULTS.md latency_context)."""
    table = LatencyTable(OrtLayerTimer(), path=tmp_path / "table.json")
    wide = CONV | {"in": 16, "out": 16, "hw": [14, 14]}
    off = wide | {"in": 17, "out": 17}
    in_context = (table.lookup(off) - table.overhead()) / (table.lookup(wide) - table.overhead())
    assert in_context > 1.5
