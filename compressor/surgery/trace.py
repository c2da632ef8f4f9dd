"""Trace a model into an fx graph and record the real value of every node.

Structured surgery needs a dataflow graph. `torch.fx.symbolic_trace` gives one whose
`call_module` nodes are the model's own layers, so slicing a layer slices the model. Models
fx cannot trace (shape-dependent Python branches, for instance) fall back to `torch.export`,
lifted back to real nn layers by `compressor.lift`; that graph holds aten ops and *new* layer
objects, so surgery on it produces a new model rather than changing the given one.

Shapes come from running the graph once on the example inputs (an `fx.Interpreter` that
records every node's output), which works the same for both kinds of graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from compressor.errors import CompressorError, first_line
from compressor.io import export_program
from compressor.lift import lift
from compressor.surgery.layers import SelectedLinear

NodeHook = Callable[[fx.Node, Any, dict], Any]  # (node, output, values so far) -> output


@dataclass
class Traced:
    """A model's dataflow graph and the value of each node on the example inputs.

    Attributes:
        gm: The graph. For `source == "fx"` and `"graph"` its layers are the model's own
            module objects; for `"export"` they are new objects holding the same tensors.
        values: Node -> the value it produced on the example inputs.
        source: "graph" (the model already was a GraphModule), "fx" or "export".
        note: Why fx tracing failed, when `source == "export"`.
    """

    gm: fx.GraphModule
    values: dict[fx.Node, Any]
    source: str
    note: str = ""


def as_tuple(example_inputs: torch.Tensor | tuple | list) -> tuple:
    """Example inputs as a tuple of positional arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def trace(model: nn.Module, example_inputs: tuple) -> Traced:
    """Trace `model` (fx first, torch.export as fallback) and record node values.

    Raises:
        CompressorError: Neither tracer can capture the model; the message gives both reasons.
    """
    inputs = as_tuple(example_inputs)
    if isinstance(model, fx.GraphModule):
        gm, source, note = _through_custom_modules(model)
    else:
        try:
            gm, source, note = symbolic_trace(model), "fx", ""
        except Exception as exc:  # fx raises TraceError, TypeError, AttributeError, ...
            note = first_line(exc)
            gm, source = _export(model, inputs, note), "export"
    return Traced(gm, run_graph(gm, inputs), source, note)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with the toolkit's own layers (SelectedLinear) kept as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, SelectedLinear) or super().is_leaf_module(m, module_qualified_name)


class _ThroughTracer(_Tracer):
    """Also traces into custom modules (onnx2torch's OnnxBinaryMathOperation, ...).

    A graph converted from ONNX calls one custom module per ONNX op; most are a line of plain
    torch ops (torch.add, torch.mean, F.pad) that the per-op rules know. Only modules fx
    cannot trace on their own (a Python branch on a tensor, as in onnx2torch's OnnxReshape)
    stay leaves, and the op rules then name them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._traceable: dict[int, bool] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if not is_custom(m):
            return super().is_leaf_module(m, module_qualified_name)
        if id(m) not in self._traceable:
            self._traceable[id(m)] = _traces_alone(m)
        return not self._traceable[id(m)]


def is_custom(module: nn.Module) -> bool:
    """True for a module class defined outside torch and this toolkit (not a GraphModule).

    The toolkit's own modules (SelectedLinear, ResidualJoin) keep the meaning surgery gives
    them as leaves.
    """
    home = type(module).__module__
    return not home.startswith(("torch.", "compressor.")) and not isinstance(module, fx.GraphModule)


def _traces_alone(module: nn.Module) -> bool:
    try:
        _Tracer().trace(module)
    except Exception:  # fx raises TraceError, TypeError, AttributeError, ...
        return False
    return True


def symbolic_trace(model: nn.Module, tracer: fx.Tracer | None = None) -> fx.GraphModule:
    """`fx.symbolic_trace` with `_Tracer` (or the given tracer)."""
    tracer = tracer or _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _through_custom_modules(gm: fx.GraphModule) -> tuple[fx.GraphModule, str, str]:
    """`gm` itself, or when its nodes call custom modules, a trace through them.

    Retracing keeps the module objects, so slicing a layer still slices the given model.
    """
    called = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    if not any(is_custom(m) for m in called):
        return gm, "graph", ""
    try:
        return symbolic_trace(gm, _ThroughTracer()), "fx", ""
    except Exception as exc:  # keep the graph as given; its custom ops stay opaque
        return gm, "graph", f"cannot trace into its custom modules: {first_line(exc)}"


def _export(model: nn.Module, inputs: tuple, fx_reason: str) -> fx.GraphModule:
    try:
        return lift(export_program(model, inputs))
    except CompressorError as exc:
        raise CompressorError(
            f"cannot build a dataflow graph of {type(model).__name__}: torch.fx failed "
            f"({fx_reason}) and torch.export failed ({first_line(exc.__cause__ or exc)})"
        ) from exc


class _Recorder(fx.Interpreter):
    """Runs a graph, keeping every node's output; `hook` may replace an output."""

    def __init__(self, gm: fx.GraphModule, hook: NodeHook | None):
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[fx.Node, Any] = {}
        self.hook = hook

    def run_node(self, node: fx.Node) -> Any:
        out = super().run_node(node)
        if self.hook is not None:
            out = self.hook(node, out, self.values)
        self.values[node] = out
        return out


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put `module` in eval mode, then restore every submodule's own flag exactly.

    `module.train(was_training)` would not do: it overwrites submodules deliberately kept
    in eval mode (a frozen BatchNorm) inside a model in training mode.
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


@torch.no_grad()
def run_graph(gm: fx.GraphModule, inputs: tuple, hook: NodeHook | None = None) -> dict:
    """Run `gm` in eval mode on `inputs`; return {node: value}. `hook` may edit outputs."""
    with eval_mode(gm):
        recorder = _Recorder(gm, hook)
        recorder.run(*inputs)
    return recorder.values


def output_values(gm: fx.GraphModule, values: dict) -> list[torch.Tensor]:
    """The tensors the graph returns, flattened, from recorded `values`."""
    (output,) = (n for n in gm.graph.nodes if n.op == "output")
    found: list[torch.Tensor] = []
    fx.node.map_arg(output.args, lambda n: found.append(values[n]))
    return [v for v in found if isinstance(v, torch.Tensor)]


def scope_of(node: fx.Node) -> str | None:
    """Path of the innermost non-leaf module whose forward created `node` ('' = root).

    Uses the `nn_module_stack` fx records; None when unknown.
    """
    stack = node.meta.get("nn_module_stack")
    if stack is None:
        return None
    paths = [value[0] for value in stack.values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]  # a leaf's own entry: the node lives in its parent
    return paths[-1] if paths else ""
