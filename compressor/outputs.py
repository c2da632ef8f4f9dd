"""Models with several outputs: which one the task loss and accuracy use, and distillation
over all of them.

A model may return a tensor, a tuple / list of tensors or a dict of tensors (a detector's
class and box heads). The *task output* is the one cross-entropy and top-1 accuracy read:
an index or a dict key, by default the first output. `prune(..., output=SPEC)` makes it the
task output of everything the method runs (`task_output`); the CLI's `--task-output` sets it.

Distillation and post-training reconstruction match every output of the teacher: the task
output with the temperature-scaled KL of Hinton et al. (it holds class logits), every other
output with the mean squared error (boxes, landmarks: values, not distributions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import InputError

OutputSpec = int | str | None

_TASK_OUTPUT: ContextVar[OutputSpec] = ContextVar("task_output", default=None)


@contextlib.contextmanager
def task_output(spec: OutputSpec) -> Iterator[None]:
    """Makes `spec` the default of `select_output` inside the block (`prune` uses it)."""
    token = _TASK_OUTPUT.set(spec)
    try:
        yield
    finally:
        _TASK_OUTPUT.reset(token)


def named_outputs(out) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model's output, flattened in order, with their names.

    A dict's entries are named by key, a tuple's / list's by index; a nested entry's
    tensors get `name.j`. A lone tensor is one output named "0".
    """
    if isinstance(out, torch.Tensor):
        return [("0", out)]
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(out)]
    else:
        raise InputError(
            f"the model returned a {type(out).__name__}; compressor needs a tensor, or a "
            "tuple, list or dict of tensors"
        )
    named = []
    for name, value in items:
        if isinstance(value, torch.Tensor):
            named.append((name, value))
            continue
        leaves = [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
        named += [(f"{name}.{j}", t) for j, t in enumerate(leaves)]
    return named


def output_index(out, spec: OutputSpec = None) -> int:
    """Position of the task output among `named_outputs(out)`.

    `spec` is an index, a dict key or a digit string (as the CLI passes it); None means the
    active `task_output`, and failing that the first output.

    Raises:
        InputError: no output matches; the message lists the outputs there are.
    """
    spec = _TASK_OUTPUT.get() if spec is None else spec
    named = named_outputs(out)
    if spec is None:
        return 0
    names = [name for name, _ in named]
    if isinstance(spec, str) and spec in names:
        return names.index(spec)
    index = int(spec) if isinstance(spec, str) and spec.lstrip("-").isdigit() else spec
    if isinstance(index, int) and not isinstance(index, bool) and -len(named) <= index < len(named):
        return index % len(named)
    raise InputError(
        f"the model has no output {spec!r}; its outputs are {_listing(named)}: choose one by "
        "index or name with --task-output"
    )


def _listing(named: list[tuple[str, torch.Tensor]]) -> str:
    return ", ".join(f"{i} ({name!r}, shape {list(t.shape)})" for i, (name, t) in enumerate(named))


def select_output(out, spec: OutputSpec = None) -> torch.Tensor:
    """The task output of a model's output `out` (see `output_index` for `spec`)."""
    if isinstance(out, torch.Tensor) and spec is None and _TASK_OUTPUT.get() is None:
        return out
    return named_outputs(out)[output_index(out, spec)][1]


def check_class_logits(out, num_classes: int | None, spec: OutputSpec = None) -> torch.Tensor:
    """The task output, checked to hold class logits [batch, >= num_classes].

    Raises:
        InputError: it has another shape; the message names the output and the fix.
    """
    index = output_index(out, spec)
    named = named_outputs(out)
    name, logits = named[index]
    wanted = num_classes or 2
    if logits.dim() != 2 or logits.shape[1] < wanted:
        raise InputError(
            f"model output {index} ({name!r}) has shape {list(logits.shape)}, but the task loss "
            f"and accuracy need class logits [batch, {wanted} or more]; the outputs are "
            f"{_listing(named)}: choose the classification output with --task-output"
        )
    return logits


@torch.no_grad()
def check_task_output(
    model: nn.Module, example: torch.Tensor, spec: OutputSpec, num_classes: int | None
) -> None:
    """Runs `model` once in eval mode on `example`: `spec` must name one of its outputs,
    holding class logits [batch, >= num_classes] when `num_classes` is given.

    Raises:
        InputError: no such output, or not logits; the message lists the outputs.
    """
    from compressor.stats import restore_modes, training_modes

    modes = training_modes(model)
    model.eval()
    try:
        out = model(example)
    finally:
        restore_modes(model, modes)
    if num_classes is None:
        output_index(out, spec)
    else:
        check_class_logits(out, num_classes, spec)


def distill_loss(student, teacher, temperature: float, spec: OutputSpec = None) -> torch.Tensor:
    """Sum over outputs: T^2 KL on the task output, mean squared error on every other one.

    `teacher` may be the teacher's structured output or its flat list of tensors (what
    reconstruction caches). A single-output model gets exactly `kd_loss`.

    Raises:
        InputError: student and teacher have different numbers of outputs.
    """
    from compressor.train import kd_loss

    if isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor):
        return kd_loss(student, teacher, temperature)
    pairs = _paired(student, teacher)
    task = output_index(student, spec)
    total = kd_loss(pairs[task][0], pairs[task][1], temperature)
    for i, (s, t) in enumerate(pairs):
        if i != task:
            total = total + F.mse_loss(s, t.detach())
    return total


def flat_tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's output, in `named_outputs` order."""
    return [t for _, t in named_outputs(out)]


def _paired(student, teacher) -> list[tuple[torch.Tensor, torch.Tensor]]:
    s = flat_tensors(student)
    t = teacher if isinstance(teacher, list) else flat_tensors(teacher)
    if len(s) != len(t):
        raise InputError(f"the student has {len(s)} outputs but the teacher {len(t)}")
    return list(zip(s, t))
