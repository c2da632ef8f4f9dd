"""The Method lifecycle and the registry (`prune()`, which drives them, is methods/driver.py).

    m = get_method("bar")(model, budget, config)   # validates; no side effects yet
    m.prepare()            # installs masks / gates / scores on the model
    m.penalty()            # extra loss term (0 for methods without one)
    m.step(progress)       # after each optimiser step: projections, schedules
    m.finalize()           # -> Result(model, report); all machinery stripped

`m.phases(data)` yields the whole schedule as training phases (methods/phases.py) and
`prune()` drives exactly those: a pipeline's own loop gets the same result, bit for bit.
A method file implements the math; this file holds the machinery once.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from compressor import distill
from compressor.budget import Budget
from compressor.errors import (
    InputError,
)
from compressor.lift import clone_model
from compressor.masks import (
    apply_masks_,
    layer_floors,
    prunable_layers,
    strip_,
    weight_of,
)
from compressor.methods.options import checked_config
from compressor.methods.phases import Phase, drive
from compressor.pattern_masks import method_pattern, pattern_report
from compressor.stats import sparsity_of
from compressor.train import Distill

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from compressor.data import Data


@dataclass(frozen=True)
class MethodConfig:
    """Options every method has."""

    exclude: tuple[str, ...] = ()  # module-path globs never pruned (e.g. "fc", "layer1.*")
    # the model output the task loss and accuracy read (index or dict key; None: the first);
    # distillation and reconstruction match every output (compressor/outputs.py)
    output: int | str | None = None
    # A layer left with no weight makes the output constant: a floor per layer prevents it
    # (masks.layer_floors) and prune() fails on an emptied layer, unless this is True.
    allow_layer_collapse: bool = False
    pattern: str | None = None  # "N:M" or "RxC" (compressor/pattern_masks.py); None: any weights

    def __post_init__(self) -> None:
        checked_config(self)  # types and ranges, however the config was built (options.py)


@dataclass
class Result:
    """What a method returns: a plain nn.Module and a JSON-able report."""

    model: nn.Module
    report: dict


METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: registers a Method under its CLI name (also the report's `method`)."""

    def register(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return register


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    import compressor.methods  # noqa: F401  (registers the built-in methods)

    return sorted(METHODS)


def get_method(name: str) -> type[Method]:
    """The Method class registered as `name`.

    Raises:
        InputError: unknown name; the message lists the known ones.
    """
    known = list_methods()
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose one of: {', '.join(known)}")
    return METHODS[name]


class Method:
    """Base of every compression method; see the module docstring for the lifecycle."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    metrics: ClassVar[tuple[str, ...]] = ("weights",)  # budget metrics the method accepts
    needs: ClassVar[str] = "nothing"  # "nothing", "inputs" (calibration) or "labels"
    demo_config: ClassVar[dict] = {}  # overrides that keep `compress demo` within minutes
    smoke_config: ClassVar[dict] = {}  # the fewest steps that still run every phase (tests)
    demo_budget: ClassVar[str | None] = None  # a structured method's budget in the demo
    # set by `training_data()`: the report's labels entry, and the dense model's soft
    # targets when the data had no labels (compressor.distill)
    labels: dict | None = None
    soft_targets: Distill | None = None
    # the state a budget decision was taken from, and one to start from (trained_phase)
    trained: dict | None = None
    warm: dict | None = None

    def __init__(
        self, model: nn.Module, budget: Budget, config: MethodConfig | None = None, **overrides
    ):
        if budget.metric not in self.metrics:
            raise InputError(
                f"method {self.name!r} takes a budget on {' or '.join(self.metrics)}, "
                f"not {budget.metric}; use --sparsity or --budget-metric {self.metrics[0]}"
            )
        self.model = model
        self.budget = budget
        self.config = _with_overrides(config or self.Config(), overrides, self.name)
        self.layers = prunable_layers(model, self.config.exclude)
        self.pattern = method_pattern(self)
        if not self.layers:
            raise InputError(
                f"{type(model).__name__} has no prunable Conv/Linear layers"
                + (f" outside --exclude {self.config.exclude}" if self.config.exclude else "")
            )

    @classmethod
    def default_metric(cls, config: dict) -> str:
        """What a budget without a metric (`--budget 4x`) counts, given the config overrides."""
        return cls.metrics[0]

    def prepare(self) -> None:
        """Installs the method's machinery on the model."""

    def penalty(self) -> torch.Tensor:
        """The method's extra loss term for the current step."""
        return torch.zeros(())

    def step(self, progress: float) -> None:
        """Called after every optimiser step with training progress in [0, 1]."""

    def finalize(self) -> Result:
        """Applies the decision and strips all machinery."""
        raise NotImplementedError(f"{type(self).__name__} must implement finalize()")

    def state_dict(self) -> dict:
        """The method's own state outside the model's state_dict (optimisers, schedule
        positions, parameters it keeps itself): what a checkpoint saves and the ranks of a
        data-parallel run must agree on. Tensors, numbers and nested dicts/lists only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores what `state_dict()` returned (on the same prepared method)."""

    def phases(self, data: Data | None) -> Iterator[Phase]:
        """The method's whole schedule, phase by phase (the loop: methods/phases.py); a
        post-training method has none, its work is `prepare()` and `finalize()`."""
        self.prepare()
        yield from ()

    def run(self, data: Data | None) -> Result:
        """Trains every phase of `phases(data)` as `prune()` does, then `finalize()`."""
        return drive(self, data)

    def training_snapshot(self) -> dict | None:
        """After a run: the trained state its budget decision was taken from, so that a
        latency re-fit decides again from it instead of training again; None when the
        decision comes first and there is no such training to reuse (`trained_phase`)."""
        return self.trained

    def start_from(self, snapshot: dict) -> None:
        """Makes the next `phases()` skip the training `snapshot` (from `training_snapshot()`
        of the same method and config) holds, and decide at this instance's budget."""
        self.warm = snapshot

    def trained_phase(self, phase: Phase) -> Iterator[Phase]:
        """`yield from` it for the training a budget decision is taken from: yields `phase`
        and, under a latency budget (whose re-fits use it), keeps the state it leaves
        (`training_snapshot`); after `start_from` restores that state instead of training."""
        if self.warm is None:
            yield phase
            if self.budget.metric == "latency":
                self.trained = training_state(self)
            return
        self.model.load_state_dict(self.warm["model"])
        self.load_state_dict(self.warm["method"])
        self.trained = self.warm

    def floors(self, keep_total: int) -> dict[str, int] | None:
        """Per-layer minimum kept weights for `keep_total` in all (None: collapse allowed)."""
        if self.config.allow_layer_collapse:
            return None
        return layer_floors({f: weight_of(m).shape for f, m in self.layers.items()}, keep_total)

    def training_data(
        self,
        data: Data,
        batch_size: int,
        temperature: float = distill.TEMPERATURE,
        alpha: float = distill.ALPHA,
    ) -> DataLoader:
        """The training loader; without labels, pseudo-labelled by the model as it is now
        (call before changing it), whose soft targets become `soft_targets`."""
        found = distill.training_data(data, batch_size, self.model, temperature, alpha)
        self.labels, self.soft_targets = found.report, found.soft
        return found.loader

    def teacher(self) -> Distill | None:
        """What training distils from: the soft targets `training_data()` made, else (config
        `distill` on) the model as it is now, frozen: call before changing it."""
        cfg = self.config
        if self.soft_targets is not None or not getattr(cfg, "distill", False):
            return self.soft_targets
        return Distill(clone_model(self.model).eval(), cfg.temperature, cfg.alpha)

    def base_report(self) -> dict:
        """The fields every report has: method, config, budget, per-layer sparsity."""
        zeros, total = sparsity_of(self.model, self.config.exclude)
        return {
            "method": self.name,
            "config": jsonable(dataclasses.asdict(self.config)),
            "budget": self.budget.to_dict(),
            "requested": {"sparsity": self.budget.sparsity}
            if self.budget.metric == "weights"
            else {},
            "achieved": {"sparsity": zeros / total, "zeros": zeros, "total": total},
            "layers": [_layer_row(fqn, m) for fqn, m in self.layers.items()],
        } | pattern_report(self)


class MaskMethod(Method):
    """An unstructured method that decides one weight mask per layer, then bakes it in."""

    def compute_masks(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement compute_masks()")

    def prepare(self) -> None:
        self.masks = self.compute_masks()
        apply_masks_(self.layers, self.masks)

    def finalize(self) -> Result:
        strip_(self.model)
        return Result(self.model, self.base_report())


def _layer_row(fqn: str, module: nn.Module) -> dict:
    weight = module.weight.detach()
    zeros, params = int((weight == 0).sum()), weight.numel()
    return {"fqn": fqn, "params": params, "zeros": zeros, "sparsity": zeros / params}


def _with_overrides(config: MethodConfig, overrides: dict, name: str) -> MethodConfig:
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(
            f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(sorted(fields))}"
        )
    if "exclude" in overrides and isinstance(overrides["exclude"], str):
        overrides = overrides | {"exclude": (overrides["exclude"],)}
    try:
        return dataclasses.replace(config, **overrides)
    except InputError as exc:
        raise InputError(f"method {name!r}: {exc}") from None


def jsonable(value):
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def training_state(method: Method) -> dict:
    """Copies of the model's state and the method's own: a `training_snapshot()`."""
    model = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
    return {"model": model, "method": copy.deepcopy(method.state_dict())}
