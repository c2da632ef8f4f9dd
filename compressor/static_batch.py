"""Free a graph exported at a fixed batch size to run at any batch.

`torch.export.export(model, (x,))` without `dynamic_shapes` specialises the batch: a
flatten written `x.view(x.shape[0], -1)` is recorded as `view(x, [2, -1])`, and the program
fails at any other batch with a shape error deep inside a matmul. Where the leading entry
of a view / reshape / expand shape is the export batch and the tensor it reshapes carries
the batch in its leading dimension, that entry is replaced by the tensor's live
`sym_size(x, 0)`, exactly what a dynamic-batch export records.

What cannot be recovered stays frozen: a batch folded into another dimension
(`view(x, [B * T, C])`, as attention's heads are) or tensors created with a batch-sized
shape (`zeros([B, H])`); loading probes the lifted model at two other batches and, if it
still fails, says so and how to re-export. A leading entry that merely equals the batch
by coincidence is taken to be the batch (with a batch-1 export `x.view(1, -1)` and
`x.view(x.shape[0], -1)` are the same graph).
"""

from __future__ import annotations

import torch
from torch import fx

from compressor.errors import InputError, first_line

aten = torch.ops.aten

# ops whose argument 1 is a shape whose leading entry follows the batch
_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_EXPAND_OPS = {aten.expand.default}


def static_batch(graph: fx.Graph) -> int | None:
    """The batch size every tensor input of `graph` was fixed to; None if dynamic or mixed."""
    sizes = []
    for node in graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() > 0:
            sizes.append(val.shape[0])
    if not sizes or not all(type(size) is int and size == sizes[0] for size in sizes):
        return None  # a SymInt batch is dynamic already
    return sizes[0]


def free_static_batch_(graph: fx.Graph) -> int:
    """Rewrites batch-sized shape arguments of `graph` in place; returns how many.

    Does nothing to a graph whose inputs already have a dynamic batch.
    """
    batch = static_batch(graph)
    if batch is None:
        return 0
    lead = {n for n in graph.nodes if n.op == "placeholder" and _leads(n, batch)}
    first_input = next((n for n in graph.nodes if n in lead), None)
    rewritten = 0
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_module"):
            continue
        if _rewrite_shape_(graph, node, batch, lead, first_input):
            rewritten += 1
        if any(arg in lead for arg in node.all_input_nodes) and _leads(node, batch):
            lead.add(node)
    return rewritten


def _leads(node: fx.Node, batch: int) -> bool:
    """Whether `node`'s value (or, for a tuple, its items) has the batch leading."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim() > 0 and val.shape[0] == batch
    return isinstance(val, (tuple, list))  # getitem on it is checked item by item


def _rewrite_shape_(graph, node, batch, lead, first_input) -> bool:
    if node.op != "call_function" or node.target not in _SHAPE_OPS | _EXPAND_OPS:
        return False
    src, shape = node.args[0], node.args[1]
    if not isinstance(shape, (list, tuple)) or not shape or isinstance(shape[0], fx.Node):
        return False
    if shape[0] != batch:
        return False
    if src in lead:
        size_of = src
    elif node.target in _EXPAND_OPS and _dim0(src) == 1:
        size_of = first_input  # a singleton broadcast to exactly the batch, e.g. a class token
    else:
        return False
    with graph.inserting_before(node):
        size = graph.call_function(aten.sym_size.int, (size_of, 0))
    size.meta["val"] = batch
    node.args = (src, [size, *shape[1:]], *node.args[2:])
    return True


def _dim0(node) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.shape[0] if isinstance(val, torch.Tensor) and val.dim() > 0 else None


def check_any_batch(model: fx.GraphModule, path: str, hint: str) -> None:
    """Runs a lifted program exported at a fixed batch at two other batch sizes.

    Raises:
        InputError: it still fails there (a batch this module could not free); the
            message says how to re-export with a dynamic batch (`hint`).
    """
    batch = static_batch(model.graph)
    inputs = [n.meta["val"] for n in model.graph.nodes if n.op == "placeholder"]
    if batch is None or len(inputs) != 1:
        return
    for probe in sorted({1, batch + 1} - {batch}):
        sample = torch.zeros(probe, *inputs[0].shape[1:], dtype=inputs[0].dtype)
        try:
            with torch.no_grad():
                model(sample)
        except Exception as exc:  # whatever op still holds the export batch
            first = first_line(exc, 200, empty="")
            raise InputError(
                f"{path!r} was exported with its batch fixed at {batch} and fails at batch "
                f"{probe} ({type(exc).__name__}: {first}); re-export it with a dynamic "
                f"batch, {hint}"
            ) from None
