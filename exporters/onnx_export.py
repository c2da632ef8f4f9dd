"""Which torch.onnx exporter writes the graph, and at which opset.

torch.onnx has two exporters. The dynamo one (torch.export, then onnxscript) writes opset
18-20 and converts down only where the version converters can: they have no adapter that
takes `Shape` below 15, so most graphs stop at 17. The TorchScript ("legacy") one traces the model
with torch.jit and writes opsets 7-20 natively; it also captures models torch.export cannot
(data-dependent Python control flow), at the price of baking in the branch each traced
`if` took. The onnxruntime verification that follows every export is what catches a graph
whose baked branch is wrong on other inputs.

`auto` (the default) uses dynamo, and the legacy exporter when dynamo cannot capture the
model or cannot produce the requested opset; for an opset below 18 it tries legacy first.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import torch
from torch import fx, nn

from compressor.errors import CompressorError, InputError, first_line
from exporters.onnx_errors import REMEDY, export_failure

EXPORTERS = ("auto", "dynamo", "legacy")
# The TorchScript exporter's range (torch.onnx._constants: ONNX_MIN_OPSET and
# ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET).
LEGACY_OPSETS = range(7, 21)
# The opset the dynamo exporter's op library is written in (torch.onnx's TORCHLIB_OPSET);
# anything older is a version conversion of its graph.
DYNAMO_OPSET = 18
# Without --opset the legacy exporter writes what the dynamo one does by default in torch
# 2.13 (torch.onnx._constants.ONNX_DEFAULT_OPSET), so a file's opset does not depend on
# which exporter ran.
DEFAULT_OPSET = 20
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Exported:
    """A graph from one of the exporters.

    Attributes:
        proto: the ONNX model.
        exporter: "dynamo" or "legacy": the exporter that wrote `proto`.
        note: why `auto` used the legacy exporter ('' when it did not).
    """

    proto: onnx.ModelProto
    exporter: str
    note: str = ""


def opset_of(proto: onnx.ModelProto) -> int:
    """The default-domain opset of `proto` (0 when it imports none)."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def export_graph(
    model: nn.Module,
    example_inputs: tuple,
    names: tuple[list[str], list[str]],
    *,
    opset: int | None = None,
    exporter: str = "auto",
) -> Exported:
    """The model as ONNX from the chosen exporter, at exactly `opset` when one is given.

    Args:
        model: the module, in eval mode.
        example_inputs: input tensors whose first dimension (the batch) stays dynamic.
        names: (input names, output names).
        opset: the default-domain opset the graph must have (None: the exporter's, 20).
        exporter: "dynamo", "legacy", or "auto": dynamo, then legacy if dynamo fails; for
            an opset below 18, legacy first.

    Raises:
        InputError: an unknown exporter, an opset the chosen exporter cannot produce, or a
            model the chosen exporter (dynamo) cannot capture; the message names the fix.
        CompressorError: neither exporter could export the model.
    """
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    failures: list[CompressorError] = []
    for name in _order(exporter, opset):
        run = _dynamo if name == "dynamo" else _legacy
        try:
            proto = run(model, example_inputs, names, opset)
        except CompressorError as exc:
            failures.append(exc)
            continue
        note = "; ".join(map(str, failures))
        if name == "legacy" and exporter == "auto" and not failures:
            note = f"opset {opset} is older than the dynamo exporter's own {DYNAMO_OPSET}"
        return Exported(proto, name, note)
    raise _failure(failures, exporter)


def _order(exporter: str, opset: int | None) -> tuple[str, ...]:
    """The exporters to try, in order."""
    if exporter != "auto":
        return (exporter,)
    if opset is not None and opset < DYNAMO_OPSET:
        # the TorchScript exporter writes older opsets natively; the dynamo exporter would
        # only convert its opset-18 graph down, which fails on most graphs below 17
        return ("legacy", "dynamo")
    return ("dynamo", "legacy")


def _failure(failures: list[CompressorError], exporter: str) -> CompressorError:
    """One error for every exporter tried; InputError when each failed on bad input."""
    if exporter == "dynamo":
        if REMEDY in str(failures[0]):  # an op without a conversion: the message says what to do
            return failures[0]
        return InputError(f"{failures[0]}; use --exporter legacy (or auto)")
    if len(failures) == 1:
        return failures[0]
    # auto tried both exporters: "try --exporter legacy" would send the user in a circle
    texts = [str(f).replace(f"; {REMEDY}", "; replace the op") for f in failures]
    kind = InputError if all(isinstance(f, InputError) for f in failures) else CompressorError
    return kind("; ".join(texts))


def _dynamo(model: nn.Module, example_inputs: tuple, names, opset: int | None):
    from exporters.onnx import _quiet_exporter

    batch = torch.export.Dim("batch")
    try:
        with _quiet_exporter(), _no_prints():
            program = torch.onnx.export(
                model,
                tuple(example_inputs),
                None,
                input_names=names[0],
                output_names=names[1],
                opset_version=opset,
                dynamic_shapes=tuple({0: batch} for _ in example_inputs),
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises a zoo of types; name the op that failed
        raise export_failure(model, example_inputs, exc, opset) from exc
    proto = program.model_proto
    if opset is not None and opset_of(proto) != opset:
        raise InputError(
            f"--opset {opset}: the dynamo exporter produced opset {opset_of(proto)} and cannot "
            f"convert this graph to {opset}"
        )
    return proto


def _legacy(model: nn.Module, example_inputs: tuple, names, opset: int | None):
    from exporters.onnx import _quiet_exporter

    opset = DEFAULT_OPSET if opset is None else opset
    if opset not in LEGACY_OPSETS:
        raise InputError(
            f"--opset {opset}: the TorchScript exporter writes opsets {LEGACY_OPSETS.start}-"
            f"{LEGACY_OPSETS.stop - 1}; pick one of those (or --exporter dynamo for 18+)"
        )
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in names[0] + names[1]}
    try:
        with _quiet_exporter(), _no_prints(), torch.no_grad():
            torch.onnx.export(
                _traced_sizes(model),
                tuple(example_inputs),
                buffer,
                dynamo=False,
                input_names=names[0],
                output_names=names[1],
                opset_version=opset,
                dynamic_axes=axes,
            )
    except Exception as exc:  # torch.jit tracing and the symbolic functions raise many types
        raise CompressorError(
            f"the TorchScript exporter could not export {type(model).__name__}: {_clean(exc)}"
        ) from exc
    return onnx.load_from_string(buffer.getvalue())


def _traced_sizes(model: nn.Module) -> nn.Module:
    """`model`, or for a graph lifted from a .pt2 a copy whose sizes torch.jit can trace.

    A lifted graph reads the batch size with `aten.sym_size.int` and passes it to aten
    overloads (`aten.new_zeros.default(x, [s, 7, 4, 4])`); under torch.jit tracing both
    take plain ints, so the batch size would be baked into the graph. `x.size(0)` and the
    Tensor methods (`x.new_zeros(...)`) are recorded as Shape ops and stay dynamic. The
    copy shares the model's layers.
    """
    if not isinstance(model, fx.GraphModule) or not any(map(_is_sym_size, model.graph.nodes)):
        return model
    graph = copy.deepcopy(model.graph)
    derived: set[fx.Node] = set()
    for node in list(graph.nodes):
        if _is_sym_size(node):
            with graph.inserting_before(node):
                size = graph.call_method("size", node.args, node.kwargs)
            node.replace_all_uses_with(size)
            graph.erase_node(node)
            derived.add(size)
        elif any(arg in derived for arg in node.all_input_nodes):
            if isinstance(node.target, torch._ops.OpOverload):
                _as_method_(node)
            else:  # int arithmetic on sizes (operator.mul, ...): traced like a size
                derived.add(node)
    return fx.GraphModule(model, graph, type(model).__name__)


def _as_method_(node: fx.Node) -> None:
    """Calls the Tensor method (or torch function) of an aten overload instead. In place."""
    name = node.target.overloadpacket.__name__
    if hasattr(torch.Tensor, name):
        node.op, node.target = "call_method", name
    elif hasattr(torch, name):
        node.target = getattr(torch, name)


def _is_sym_size(node: fx.Node) -> bool:
    target = getattr(node.target, "overloadpacket", None)
    return node.op == "call_function" and target is torch.ops.aten.sym_size


@contextlib.contextmanager
def _no_prints() -> Iterator[None]:
    """Swallows what the exporters print (a failed torch.export prints the whole graph)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _clean(exc: BaseException) -> str:
    """The first line of the innermost cause, without terminal colour codes.

    torch.onnx wraps the real failure ("Could not guard on data-dependent expression ...")
    in a generic "Failed to export the model with torch.export" whose first line says nothing.
    """
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return " ".join(_ANSI.sub("", first_line(exc)).split())
