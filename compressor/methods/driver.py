"""`prune()`: a method's whole run, from a trained model to a checked Result.

It builds the method (methods/base.py), drives its phases in a checkpoint session
(resume, data-parallel rank checks), measures a latency budget on the real graph
(compressor/latency_check.py), and checks the postconditions: no machinery left, the
budget met, no layer emptied.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from compressor import checkpoint, distributed, latency_check
from compressor.budget import Budget, parse_budget
from compressor.data import Data, load_data
from compressor.errors import (
    BelowSmallestNetworkError,
    CompressorWarning,
    InputError,
    TargetNotReachedError,
)
from compressor.factors import DenseBaseline
from compressor.guard import check_no_collapse, empty_layers
from compressor.lift import clone_model
from compressor.masks import check_no_machinery, model_names
from compressor.methods.base import Method, Result, get_method, jsonable
from compressor.methods.phases import device_of
from compressor.methods.targets import check_target, with_pins
from compressor.outputs import check_task_output, task_output


def prune(
    model: nn.Module,
    method: str,
    budget: Budget | str | float,
    data: Data | str | None = None,
    *,
    seed: int = 0,
    copy_model: bool = True,
    checkpoint_path: str | Path | None = None,
    resume: str | Path | None = None,
    check_ranks: bool = False,
    measure_latency: latency_check.Measure | None = None,
    **config,
) -> Result:
    """Compresses `model` with `method` to `budget` and returns the Result.

    Args:
        model: a trained model; copied first unless `copy_model=False`.
        method: a registered method name (see `list_methods()`).
        budget: a Budget, or a string/float parsed as `--budget` (e.g. "4x", 0.9 sparsity).
        data: what the method trains or calibrates on (see `Data`), when it needs any; a
            string is a `--data` spec, loaded with `load_data(data, seed=seed)`.
        seed: seeds torch's RNG so a run is reproducible.
        checkpoint_path: write a checkpoint there at every epoch boundary of training.
        resume: a checkpoint of the same run to continue from (also the default
            `checkpoint_path`); the result is bit-identical to an uninterrupted run.
        check_ranks: in a data-parallel run, compare a digest of model and method state
            across ranks after every epoch (always done once at the end).
        measure_latency: times (dense, slimmed) under a latency budget (see latency_check).
        **config: fields of the method's config dataclass.

    Raises:
        InputError: bad method, budget, option or missing data.
        TargetNotReachedError: the budget was not met (the report says why).
        CompressorError: the ranks of a data-parallel run diverged.
    """
    cls = get_method(method)
    data = _checked_inputs(model, data, cls, seed)
    if not isinstance(budget, Budget):
        budget = parse_budget(budget, metric=cls.default_metric(config))
    baseline = DenseBaseline(model, data)  # before any in-place change (copy_model=False)
    torch.manual_seed(seed)
    copy_model = copy_model or budget.metric == "latency"  # a re-fit starts from the dense one
    instance = cls(clone_model(model) if copy_model else model, budget, **config)
    _check_output(instance, data)
    empty_before = tuple(empty_layers(model, instance.config.exclude))
    before = model_names(instance.model)  # for the postcondition: finalize() leaves none
    session = _session(instance, model, data, seed, checkpoint_path, resume)
    start = time.perf_counter()
    result, ranks = _first_run(instance, model, data, session, check_ranks)
    if budget.metric == "latency":  # fitted on the layer table; checked on the real graph
        rerun = _fresh_run(instance, model, data)
        result, instance = latency_check.checked(result, instance, model, measure_latency, rerun)
    result.report["seconds"] = time.perf_counter() - start
    result.report["seed"] = seed
    result.report["factors"] = baseline.factors(result.model)
    if ranks is not None:
        result.report["distributed"] = ranks
    _check_result(result, model, instance, before, empty_before)
    return result


def _session(instance: Method, model: nn.Module, data, seed: int, path, resume) -> dict:
    """Where a run checkpoints, what it resumes, and the fingerprint both must match."""
    session = {"path": path, "resume": resume, "fingerprint": None}
    if path is not None or resume is not None:  # hashing the model costs a pass
        config = jsonable(dataclasses.asdict(instance.config))
        session["fingerprint"] = checkpoint.fingerprint(
            instance.name, config, instance.budget, seed, model, data
        )
    return session


def _checked_inputs(model, data, cls: type[Method], seed: int) -> Data | None:
    """`data` as a Data (a spec string is loaded), once model and data are what `cls` takes."""
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model must be a torch nn.Module, got {type(model).__name__}; "
            "load a file with compressor.load_model(path).model"
        )
    if isinstance(data, str):
        data = load_data(data, seed=seed)
    if data is not None and not isinstance(data, Data):
        raise InputError(
            f"data must be a compressor.Data or a --data spec string, got "
            f"{type(data).__name__}; e.g. compressor.load_data('digits')"
        )
    if cls.needs != "nothing" and data is None:
        raise InputError(f"method {cls.name!r} needs data ({cls.needs}); pass --data SPEC")
    return data


def _check_output(instance: Method, data: Data | None) -> None:
    """A wrong --task-output fails before any work (methods that read data only)."""
    if data is not None and instance.needs != "nothing":
        classes = data.num_classes if instance.needs == "labels" else None
        example = data.sample_inputs(2).to(device_of(instance.model))
        check_task_output(instance.model, example, instance.config.output, classes)


def _first_run(instance: Method, model: nn.Module, data, session: dict, check_ranks: bool):
    """The run's (result, ranks); under a latency budget a target below the table's smallest
    network is handed to the measured check (latency_check.checked) instead of raised."""
    try:
        return _run_session(instance, model, data, session, check_ranks)
    except BelowSmallestNetworkError as exc:
        if instance.budget.metric != "latency":
            raise
        return exc, None


REFIT_FROM = {
    True: "decided again from the first fit's training, then fine-tuned",
    False: "the method's whole schedule run again",
}


def _fresh_run(instance: Method, model: nn.Module, data: Data | None):
    """A latency re-fit: `instance`'s method and config run again on a copy of `model`,
    from the first run's trained state where the method keeps one (BAR's gates: only the
    decision and the fine-tuning run again), else from the start."""
    snapshot = instance.training_snapshot()

    def rerun(budget: Budget) -> tuple[Result, Method]:
        fresh = type(instance)(clone_model(model), budget, instance.config)
        if snapshot is not None:
            fresh.start_from(snapshot)
        idle = {"path": None, "resume": None, "fingerprint": None}  # no checkpoints
        result = _run_session(fresh, model, data, idle, False)[0]
        result.report["latency_refit"] = REFIT_FROM[snapshot is not None]
        return result, fresh

    return rerun


def _check_result(result: Result, model: nn.Module, instance: Method, before, empty_before):
    """prune()'s postconditions: no machinery left, the budget met, no layer emptied."""
    check_no_machinery(result.model, before, instance.name)
    try:
        check_target(result.report, instance.budget)
    except TargetNotReachedError as exc:
        raise with_pins(exc, model, instance) from exc
    if not instance.config.allow_layer_collapse:
        check_no_collapse(result.model, instance.config.exclude, instance.name, empty_before)


def _run_session(
    instance: Method, model: nn.Module, data: Data | None, session: dict, check_ranks: bool
) -> tuple[Result, dict | None]:
    """`instance.run(data)` in a checkpoint session: the Result (labels added), the rank report."""
    with checkpoint.session(**session, method=instance, check_ranks=check_ranks) as run:
        with task_output(instance.config.output):
            try:
                result = instance.run(data)
            except TargetNotReachedError as exc:
                raise with_pins(exc, model, instance) from exc
        digests = run.check("the final model", result.model) if distributed.active() else None
    if (session["path"] is not None or session["resume"] is not None) and not run.phases:
        warnings.warn(
            f"method {instance.name!r} does not train in epochs, so nothing was checkpointed",
            CompressorWarning,
            stacklevel=3,
        )
    result.report |= instance.labels or {}
    if digests is None:
        return result, None
    return result, {
        "processes": distributed.world_size(),
        "rank_digests": digests,  # of the final model and method state, all equal
        "rank_checks": run.checks,
    }
