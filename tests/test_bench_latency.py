"""bench.latency's machinery: the speed-up search on a fake timer, and the per-cell resume."""

from __future__ import annotations

import json
import re
import sys

import pytest

from bench import latency as bench
from bench import latency_methods as lm
from bench import latency_report as report
from bench.latency_search import CellStore, FlopTimer, search_factor
from compressor.errors import CompressorError, InputError
from compressor.stats import measure


def test_search_interpolates_to_the_target():
    calls = []

    def probe(factor):  # speed-up grows slower than the FLOP cut, as on a real runtime
        calls.append(factor)
        return factor**0.7, f"model at {factor:.3f}"

    found = search_factor(probe, 2.0, tolerance=0.01, steps=8)
    assert found.met
    assert found.speedup == pytest.approx(2.0, rel=0.01)
    assert found.factor == pytest.approx(2.0 ** (1 / 0.7), rel=0.02)  # 2.69x FLOPs
    assert found.payload == f"model at {found.factor:.3f}"
    assert calls[0] == 2.0 and len(calls) <= 3  # the slope from the dense model: one step
    assert [p["factor"] for p in found.probes] == calls


def test_search_backs_off_from_failed_probes_and_reports_a_miss():
    def probe(factor):  # pruning beyond 3x fails; 3x gives only 1.5x
        return (None, None) if factor > 3.0 else (factor / 2, factor)

    found = search_factor(probe, 2.0, tolerance=0.05, steps=6)
    assert not found.met
    assert found.factor <= 3.0 and found.speedup == found.factor / 2
    assert any(p["speedup"] is None for p in found.probes)


@pytest.fixture()
def fake_context(lenet5_digits, small_digits, monkeypatch):
    """LeNet-5 on digits, timed by a deterministic FLOP timer; the FLOP-search path forced
    (the toolkit may grow a latency metric, which would skip the search)."""
    monkeypatch.setattr(lm, "takes_latency", lambda method: False)
    model = lenet5_digits
    example = (small_digits.sample_inputs(2),)
    mflops = measure(model, example).flops / 1e6
    # a fixed cost of a third of the dense batch-32 time: 2x FLOPs gives only ~1.5x
    timer = FlopTimer(example, overhead_ms=32 * mflops / 3, ms_per_mflop=1.0)
    setup = bench.Setup(epochs=0, probe_steps=6, final_steps=2, limit=None)
    ctx = bench.Context(setup, "lenet5", model.eval(), small_digits, small_digits, timer, example)
    return ctx, timer


def test_main_cell_meets_a_measured_speedup_on_a_fake_timer(fake_context):
    ctx, timer = fake_context
    row = bench.main_cell(ctx, "channel-magnitude", 2.0, 32, 1)
    assert row["path"] == "FLOP search" and row["met"] is True
    assert row["speed-up b32"] == pytest.approx(2.0, rel=0.10)
    # the overhead makes the speed-up trail the FLOP cut: the search had to go past 2x
    assert row["FLOPs x"] > 2.2
    # the row's speed-up is the fake timer's formula on the row's own FLOPs
    dense_ms = timer.ms(ctx.dense, (32,))["32"]
    assert row["speed-up b32"] == pytest.approx(
        dense_ms / (timer.overhead + row["MFLOPs"] * 32), rel=1e-3
    )
    assert row["probes"] + row["runs"] == timer.calls


def test_a_batch_32_target_is_searched_not_taken_by_the_latency_metric(fake_context, monkeypatch):
    """The toolkit checks a latency budget at batch 1: a batch-32 row must not be that
    batch-1 network timed at 32, so it searches the FLOP budget at batch 32."""
    ctx, _ = fake_context
    monkeypatch.setattr(lm, "takes_latency", lambda method: True)
    monkeypatch.setattr(lm, "build_latency_model", lambda *a, **k: pytest.fail("batch 1 path"))
    row = bench.main_cell(ctx, "channel-magnitude", 2.0, 32, 1)
    assert row["path"] == "FLOP search" and "latency_error" not in row
    assert row["met"] is True and row["speed-up b32"] == pytest.approx(2.0, rel=0.10)


def test_rerun_skips_finished_cells(tmp_path, monkeypatch):
    setup = bench.Setup(
        archs=("lenet5",),
        targets=(2.0, 4.0),
        batches=(32,),
        methods=("channel-magnitude",),
        flop_factors=(),
    )
    computed = []

    def fake_cell(ctx, name, target, batch, align):
        computed.append(target)
        return {"method": name, "speed-up b32": target * 0.95}

    monkeypatch.setattr(bench, "main_cell", fake_cell)
    dense = {"method": "dense", "top-1 %": 90.5, "params": 1000, "kind": "dense"}
    monkeypatch.setattr(bench, "dense_cell", lambda ctx: dense)  # the same dense model
    path = tmp_path / "cells.json"
    finished = {"method": "channel-magnitude", "speed-up b32": 1.91, "kind": "main"}
    cells = {"lenet5/dense": dense, "lenet5/channel-magnitude/2x/b32": finished}
    path.write_text(json.dumps({"cells": cells}))

    rows = bench.run(setup, CellStore(path), make_context=lambda setup, arch: None)

    assert computed == [4.0]  # the dense row and 2x were finished: only 4x ran
    assert [r.get("speed-up b32") for r in rows] == [None, 1.91, 3.8]
    assert rows[0]["top-1 %"] == 90.5
    stored = json.loads(path.read_text())["cells"]
    assert stored["lenet5/channel-magnitude/4x/b32"]["speed-up b32"] == 3.8
    assert stored["lenet5/channel-magnitude/2x/b32"] == finished
    assert bench.run(setup, CellStore(path), make_context=None) == rows and computed == [4.0]


def test_missing_torch_pruning_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import now raises ImportError
    with pytest.raises(lm.TorchPruningMissing, match=r"pip install -e '\.\[bench\]'"):
        lm.require_torch_pruning()


def test_pareto_front_keeps_only_undominated_points():
    points = [(10.0, 80.0), (5.0, 70.0), (7.0, 65.0), (12.0, 79.0), (5.0, 60.0), (20.0, 85.0)]
    assert report.pareto(points) == [(5.0, 70.0), (10.0, 80.0), (20.0, 85.0)]


def test_budget_column_names_each_rows_knob():
    assert report.budget_column({"flops_request": 6.8268})["budget"] == "6.83x FLOPs"
    assert report.budget_column({"pruning_ratio": 0.2929})["budget"] == "ratio 0.293"
    assert report.budget_column({"latency_request": 2.0})["budget"] == "2x latency"


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    path = tmp_path / "cells.json"
    quick = bench.settings_of(bench.QUICK)
    CellStore(path, quick).run("resnet20/dense", lambda: {"top-1 %": 45.9})
    assert CellStore(path, quick).cells == {"resnet20/dense": {"top-1 %": 45.9}}
    with pytest.raises(CompressorError, match=r"cells\.json holds cells of a run with other"):
        CellStore(path, bench.settings_of(bench.Setup()))


def test_narrowed_runs_a_subset_and_names_unknown_choices():
    setup = bench.narrowed(bench.Setup(), archs="resnet56", methods="BAR-mixed,Torch-Pruning")
    assert setup.archs == ("resnet56",) and setup.methods == ("BAR-mixed", "Torch-Pruning")
    assert bench.settings_of(setup) == bench.settings_of(bench.Setup())  # one checkpoint
    with pytest.raises(InputError, match=r"unknown methods \['BAR'\]; choose from BAR-mixed,"):
        bench.narrowed(bench.Setup(), methods="BAR,BAR-tied")
    full = bench.narrowed(bench.REDUCED, targets="2,3,4", batches="32,1")
    assert full.targets == (2.0, 3.0, 4.0) and full.batches == (32, 1)
    assert bench.settings_of(full) == bench.settings_of(bench.REDUCED)  # the same checkpoint
    with pytest.raises(InputError, match=r"^unknown targets \['5.0'\]; choose from 2,3,4$"):
        bench.narrowed(bench.REDUCED, targets="2,5")
    with pytest.raises(InputError, match=r"^unknown batches \['x'\]; choose from 1,32$"):
        bench.narrowed(bench.REDUCED, batches="1,x")


def test_cells_of_another_dense_model_are_refused(tmp_path, monkeypatch):
    """A checkpoint resumed from a fresh clone trains its dense models again: one that
    comes out different (code or library changed) must not add rows beside the old ones."""
    setup = bench.Setup(archs=("lenet5",), targets=(2.0,), batches=(32,), flop_factors=())
    setup = bench.narrowed(setup, methods="channel-magnitude")
    monkeypatch.setattr(bench, "main_cell", lambda *args: pytest.fail("ran a cell"))
    monkeypatch.setattr(bench, "dense_cell", lambda ctx: {"top-1 %": 88.1, "params": 1000})
    path = tmp_path / "cells.json"
    stored = {"lenet5/dense": {"method": "dense", "top-1 %": 90.5, "params": 1000}}
    path.write_text(json.dumps({"cells": stored}))
    with pytest.raises(CompressorError) as caught:
        bench.run(setup, CellStore(path), make_context=lambda setup, arch: None)
    assert str(caught.value) == (
        f"{path} holds lenet5 cells pruned from a dense model of top-1 90.5 % (1000 params); "
        "the one trained now has 88.1 % (1000). Delete the file's lenet5 cells to run them "
        "all again from this one"
    )


def test_pareto_plot_of_a_partial_run_leaves_missing_cells_empty(tmp_path):
    """A resumed grid may hold one model's batch-1 rows only; its batch-32 panel stays
    empty instead of failing the report (a median of no rows)."""
    row = {"method": "BAR-tied", "top-1 %": 80.0, "ms b1": 1.0, "dense ms b1": 2.0}
    row |= {"ms b32": 30.0, "dense ms b32": 60.0}
    main = [row | {"model": "resnet20", "batch": b} for b in (1, 32)]
    main.append(row | {"model": "mobilenetv2", "batch": 1})
    dense = {m: {"top-1 %": 86.0} for m in ("resnet20", "mobilenetv2")}
    name = report.pareto_plot(main, dense, tmp_path, "partial")
    assert name == "partial_pareto.png"
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_floor_table_marks_misses_and_failed_checks():
    from bench.latency_floor import table

    row = {"model": "resnet20", "method": "BAR-tied", "top-1 %": 83.75, "FLOPs x": 4.218}
    row |= {"speed-up b1": 1.953, "speed-up b32": 1.873, "channels": {"stem.0": 8, "c": 16}}
    rows = [
        row | {"floor": 0.375, "met": True},
        row | {"floor": 0.0, "met": False, "speed-up b1": 1.5},
        {"model": "resnet20", "method": "GSS-structured", "floor": 0.5, "error": "gss: missed"},
    ]
    rows.append(row | {"floor": 0.0, "met": True, "budget": "4x FLOPs", "top-1 %": 79.93})
    lines = table(rows).splitlines()
    latency = "| 2x latency | resnet20 | BAR-tied | 0.375 | 83.75 | 1.95x | 1.87x | 4.22x | 8,16 |"
    assert lines[2] == latency
    assert "| 1.50x (missed) |" in lines[3]
    assert lines[4].startswith("| 2x latency | resnet20 | GSS-structured | 0.5 | gss: missed |")
    assert lines[5].startswith("| 4x FLOPs | resnet20 | BAR-tied | 0 | 79.93 | 1.95x |")


def test_gate_steps_schedules_parse_and_the_table_takes_medians_against_tp():
    from bench.bar_gate_steps import parse_schedule, table

    assert parse_schedule("1e+2") == {"finetune_epochs": 2, "epochs": 1}
    assert parse_schedule("20s+3") == {"finetune_epochs": 3, "epochs": 1, "gate_steps": 20}
    for bad in ("20x+3", "0s+3", "20s", "s+3"):
        with pytest.raises(ValueError, match=f"schedule '{re.escape(bad)}': give gates"):
            parse_schedule(bad)
    base = {"model": "resnet20", "met": True, "speed-up b1": 2.0, "FLOPs x": 4.0}
    rows = [
        base | {"method": "Torch-Pruning", "schedule": "3", "seed": 0, "top-1 %": 85.0},
        base | {"method": "BAR-tied", "schedule": "20s+3", "seed": 1, "top-1 %": 84.0},
        base | {"method": "BAR-tied", "schedule": "20s+3", "seed": 0, "top-1 %": 86.5},
        base | {"method": "BAR-tied", "schedule": "20s+3", "seed": 2, "top-1 %": 85.5},
        {"model": "resnet20", "method": "BAR-tied", "schedule": "1e+2", "seed": 0, "error": "x"},
    ]
    lines = table(rows).splitlines()
    assert lines[2] == "| resnet20 | BAR-tied | 1e+2 | x ||||||"
    assert lines[3] == (
        "| resnet20 | BAR-tied | 20s+3 | 3 | 85.50 | +0.50 | 2.00x | 4.00x | 86.5 / 84.0 / 85.5 |"
    )
    assert lines[4].startswith("| resnet20 | Torch-Pruning | 3 | 1 | 85.00 |  |")


def test_timed_cells_record_their_command_and_are_not_run_again(tmp_path, capsys):
    path, calls = tmp_path / "cells.json", []
    store = CellStore(path)
    store.run_timed("a", lambda: calls.append("a") or {"x": 1}, " --seeds 0")
    store.run_timed("b", lambda: calls.append("b") or {"x": 2}, " --seeds 1")
    again = CellStore(path)
    assert again.run_timed("a", lambda: calls.append("a again") or {}, " --seeds 9")["x"] == 1
    assert calls == ["a", "b"] and again.cells["b"]["run"] == " --seeds 1"
    assert again.cells["a"]["cell s"] == 0
    assert again.commands("bench.x") == (
        "`.venv/bin/python -m bench.x --seeds 0`, `.venv/bin/python -m bench.x --seeds 1`"
    )
    assert capsys.readouterr().out.splitlines() == ["a: done", "b: done", "a: done"]
