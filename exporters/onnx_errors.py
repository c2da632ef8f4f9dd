"""Turns a torch.onnx exporter failure into one line: which op, in which module, what to do.

The exporter's own message ends in generic "Next steps:" advice; the op that failed is
only named deep in its chain of exceptions ("Error when translating node %cummax ...
target=torch.ops.aten.cummax.default"), and the module it sits in not at all. The
module path is read from the `nn_module_stack` that torch.export records on each node.
"""

from __future__ import annotations

import logging
import re
import warnings

import torch
from torch import nn

from compressor.errors import CompressorError, first_line

# what to try instead, for every op failure (the flag belongs to `compress export`)
REMEDY = "replace the op or try --exporter legacy"
_NODE = re.compile(r"Error when translating node %(\w+) : .*?call_function\[target=([\w.:]+)\]")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_failure(
    model: nn.Module, example_inputs: tuple, exc: BaseException, opset: int | None
) -> CompressorError:
    """The error to raise for `exc`, raised by torch.onnx.export on `model`.

    Names the aten op and the module path when the failure is an op the exporter could
    not translate; otherwise the innermost cause's first line (not the exporter's advice).
    """
    chain = _chain(exc)
    node = next((m for m in map(_NODE.search, map(str, chain)) if m), None)
    innermost = _ANSI.sub("", first_line(chain[-1]))
    if node is None:
        return CompressorError(f"torch.onnx could not export {type(model).__name__}: {innermost}")
    name, target = node.group(1), node.group(2).removeprefix("torch.ops.")
    op = "::".join(target.split(".")[:2])
    with warnings.catch_warnings():  # torch.export's warnings are not the user's concern here
        warnings.simplefilter("ignore")
        where = _where(_module_of(model, example_inputs, name, target))
    if any(type(e).__name__ == "DispatchError" for e in chain):
        what = f"has no ONNX conversion in opset {opset or _default_opset()}"
    else:
        what = f"could not be converted ({innermost})"
    return CompressorError(f"ONNX export failed: op {op}{where} {what}; {REMEDY}")


def _where(fqn: str | None) -> str:
    if fqn is None:
        return ""
    return f" (in module {fqn!r})" if fqn else " (in the model's own forward)"


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes, outermost first (cycles cut)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _module_of(model: nn.Module, example_inputs: tuple, name: str, target: str) -> str | None:
    """The module path of the node `name` (op `target`); "" for the root, None if unknown.

    The exporter decomposes the program before translating it, so the node is looked up
    in torch.export's program as captured, then decomposed as the exporter does it.
    """
    try:
        program = torch.export.export(model, tuple(example_inputs))
    except Exception:  # the ONNX exporter got past this step; if we cannot, say less
        return None
    for attempt in (lambda: program, lambda: _decomposed(program)):
        try:
            nodes = [n for n in attempt().graph.nodes if n.op == "call_function"]
        except Exception:  # a decomposition that fails here leaves us the first attempt
            continue
        found = [n for n in nodes if str(n.target) == target]
        found = [n for n in found if n.name == name] or found
        if found:
            stack = found[0].meta.get("nn_module_stack") or {}
            return list(stack.values())[-1][0] if stack else ""
    return None


def _decomposed(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program decomposed as the ONNX exporter does it (private API, hence the fallback)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # its registry logs each optional op it skips
    try:
        from torch.onnx._internal.exporter import _fx_passes, _registration

        registry = _registration.ONNXRegistry.from_torchlib()
        return _fx_passes.decompose_with_registry(program, registry)
    except (ImportError, AttributeError, TypeError):
        return program.run_decompositions()
    finally:
        logger.setLevel(level)


def _default_opset() -> int:
    from torch.onnx import _constants  # private, hence the fallback

    return getattr(_constants, "ONNX_DEFAULT_OPSET", 18)
