"""One algorithm, two drivers: README's own loops over `phases()` give what `prune()` gives."""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compressor import distributed, zoo
from compressor.budget import Budget
from compressor.methods import get_method, list_methods, prune
from compressor.methods.phases import Phase

README = Path(__file__).resolve().parents[1] / "README.md"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def readme_function(name: str):
    """The README's python block defining `name`, executed: the code users copy."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if f"def {name}(" in b]
    assert len(found) == 1, f"README.md has {len(found)} blocks defining {name}()"
    namespace: dict = {}
    exec(compile(found[0], f"README.md:{name}", "exec"), namespace)
    return namespace[name]


def _budget(metric: str) -> Budget:
    return Budget(metric, 0.1 if metric == "weights" else 0.5)


# Latency budgets drive the same schedule as FLOPs ones; only the pricing differs, and it
# times this machine (tests/test_latency_budget.py fits them on a deterministic table).
CASES = [
    (name, metric)
    for name in list_methods()
    for metric in get_method(name).metrics
    if metric != "latency"
]


def _same(got, expected) -> None:
    """Bit-identical models and the same achieved values."""
    got_state, expected_state = got.model.state_dict(), expected.model.state_dict()
    assert list(got_state) == list(expected_state)
    for key, value in expected_state.items():
        assert torch.equal(got_state[key], value), key
    assert got.report["achieved"] == expected.report["achieved"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("method", "metric"), CASES)
def test_readme_loop_is_prune_bit_for_bit(method, metric, device, lenet5_digits, small_digits):
    own_loop = readme_function("own_loop")
    config = get_method(method).smoke_config
    model = copy.deepcopy(lenet5_digits).to(device)
    budget = _budget(metric)
    expected = prune(model, method, budget, small_digits, seed=3, **config)
    got = own_loop(model, method, budget, small_digits, seed=3, **config)
    _same(got, expected)
    assert next(got.model.parameters()).device.type == device


def test_every_training_method_has_phases(small_digits, lenet5_digits):
    """The schedules are what METHODS.md describes, phase by phase (names are checkpoints')."""
    expected = {
        "bar": ["bar: gates", "fine-tune"],
        "channel-magnitude": ["fine-tune"],
        "erk-recon": ["erk-recon"],
        "fcpts": ["fcpts"],
        "gmp": ["gmp", "fine-tune"],
        "gss": ["gss", "fine-tune"],
        "probmask": ["probmask", "fine-tune"],
    }
    for name in list_methods():
        cls = get_method(name)
        method = cls(copy.deepcopy(lenet5_digits), _budget(cls.metrics[0]), **cls.smoke_config)
        names = []
        for phase in method.phases(small_digits):
            assert isinstance(phase, Phase) and phase.model is method.model
            names.append(phase.name)
        assert names == expected.get(name, []), name


@pytest.mark.parametrize("method", list_methods())
def test_prepare_and_finalize_take_nothing_a_loop_lacks(method):
    """What prepare() and finalize() needed (loaders, data) now lives in the phases."""
    cls = get_method(method)
    assert list(inspect.signature(cls.finalize).parameters) == ["self"]
    prepare = inspect.signature(cls.prepare).parameters
    assert list(prepare) in (["self"], ["self", "example_inputs"])
    assert all(p.default is None for name, p in prepare.items() if name != "self")


def test_phase_steps_cap_the_last_epoch(small_digits, lenet5_digits):
    """FCPTS runs `steps` steps, not whole epochs: the last epoch stops at the cap."""
    model = copy.deepcopy(lenet5_digits)
    method = get_method("fcpts")(
        model, Budget("weights", 0.1), steps=5, calib_samples=64, batch_size=16
    )
    (phase,) = method.phases(small_digits)
    assert (phase.epochs, phase.total) == (2, 5)
    counts = [sum(1 for _ in phase.batches(epoch)) for epoch in range(phase.epochs)]
    assert counts == [4, 1]


# --- the DDP loop, in two gloo processes --------------------------------------------------


DDP_CASES = [("probmask", "weights"), ("bar", "flops")]  # scores in the model; gates outside


def _ddp_worker(rank: int, store: str, data, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        own_ddp_loop = readme_function("own_ddp_loop")
        for method, metric in DDP_CASES:
            torch.manual_seed(0)
            model = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)
            config = get_method(method).smoke_config
            expected = prune(model, method, _budget(metric), data, seed=1, **config)
            got = own_ddp_loop(model, method, _budget(metric), data, 1, **config)
            try:
                _same(got, expected)
                results[rank, method] = (
                    "same",
                    distributed.digest_check("", got.model.state_dict()),
                )
            except AssertionError as exc:
                results[rank, method] = ("differ", str(exc))
    finally:
        dist.destroy_process_group()


def test_readme_ddp_loop_is_prune_bit_for_bit(tmp_path, small_digits):
    """Two gloo processes: README's DDP loop against prune() in the same process group."""
    with mp.Manager() as manager:
        results = manager.dict()
        args = (str(tmp_path / "store"), small_digits, results)
        # forked, not spawned: a fresh interpreter would spend most of the test importing
        mp.start_processes(_ddp_worker, args=args, nprocs=2, start_method="fork")
        results = dict(results)
    for method, _ in DDP_CASES:
        assert results[0, method][0] == "same", results[0, method]
        assert results[1, method] == results[0, method]  # and the ranks agree
