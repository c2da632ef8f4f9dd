"""Channel rules for shape ops: reshape, permute, slicing, split, reductions, softmax.

Shapes come from the values recorded on the example inputs, so a reshape is understood from
its input and output shapes alone, whether it was written `x.view(n, -1)`, `x.flatten(1)`,
`nn.Flatten()` or `aten.view(x, [s0, 800])`. Ops whose literal arguments name channel sizes
or positions (view sizes, slice bounds, split sizes) are recorded as `Patch`es, so the
rewrite after slimming can update them.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from compressor.surgery.groups import Patch
from compressor.surgery.walker import Walker, ar, arg, first_tensor, op_name


def reshape_axis(shape_in, shape_out, axis: int) -> tuple[int, int] | None:
    """Where channel `axis` of `shape_in` lands after a reshape to `shape_out`.

    Returns (output axis, m): each input channel becomes m consecutive positions of the output
    axis (m > 1 when the channel is flattened with the dimensions after it, as before a
    Linear). None when the channel dimension is split or merged with earlier dimensions.
    """
    prefix = math.prod(shape_in[:axis])
    channels = shape_in[axis]
    inner = math.prod(shape_in[axis + 1 :])
    acc = 1
    for out_axis, size in enumerate(shape_out):
        if acc == prefix and channels and size % channels == 0:
            m = size // channels
            if m * math.prod(shape_out[out_axis + 1 :]) == inner:
                return out_axis, m
        if acc > prefix:
            return None
        acc *= size
    return None


def reshape(walker: Walker, node: fx.Node) -> None:
    """view / reshape / flatten / unflatten / squeeze / unsqueeze / nn.Flatten."""
    x = first_tensor(walker, node)
    track = walker.track(x)
    if track is None:
        return
    shape_in, shape_out = walker.values[x].shape, walker.values[node].shape
    found = reshape_axis(list(shape_in), list(shape_out), track.axis)
    if found is None:
        return walker.mix(node, "reshape splits or merges the channel dimension")
    out_axis, m = found
    count = len(track.ids) * m
    walker.emit((node, None), out_axis, count, [((x, None), ar(count), ar(count) // m)])
    if op_name(node) in ("view", "reshape", "unflatten"):
        walker.patches[node] = Patch("shape", out_axis)


def expand(walker: Walker, node: fx.Node) -> None:
    """expand / expand_as / broadcast_to: new leading dims, size-1 dims broadcast."""
    x = first_tensor(walker, node)
    track = walker.track(x)
    if track is None:
        return
    out = walker.values[node]
    out_axis = track.axis + out.dim() - walker.values[x].dim()
    count = out.shape[out_axis]
    src = ar(count) if len(track.ids) == count else torch.zeros(count, dtype=torch.long)
    walker.emit((node, None), out_axis, count, [((x, None), ar(count), src)])
    if op_name(node) == "expand":
        walker.patches[node] = Patch("shape", out_axis)


def permute(walker: Walker, node: fx.Node) -> None:
    x = node.args[0]
    track = walker.track(x)
    if track is None:
        return
    rank = walker.values[x].dim()
    dims = node.args[1] if isinstance(node.args[1], list | tuple) else node.args[1:]
    dims = [d % rank for d in dims]
    walker.copy(node, (x, None), dims.index(track.axis))


def transpose(walker: Walker, node: fx.Node) -> None:
    """transpose / swapaxes / movedim / t: only the tracked axis' position changes."""
    x = node.args[0]
    track = walker.track(x)
    if track is None:
        return
    rank = walker.values[x].dim()
    order = list(range(rank))
    name = op_name(node)
    if name == "t":
        order = order[::-1]
    elif name == "movedim" and all(isinstance(a, int) for a in node.args[1:3]):
        source, target = node.args[1] % rank, node.args[2] % rank
        order.remove(source)
        order.insert(target, source)
    elif name != "movedim":
        a, b = node.args[1] % rank, node.args[2] % rank
        order[a], order[b] = order[b], order[a]
    else:
        return walker.mix(node, "movedim with several dimensions")
    walker.copy(node, (x, None), order.index(track.axis))


def getitem(walker: Walker, node: fx.Node) -> None:
    """Item of a tuple output, or tensor indexing with slices / ints / None / Ellipsis."""
    source, index = node.args[0], node.args[1]
    if isinstance(walker.values.get(source), tuple | list):
        if (source, index) in walker.tracks:
            walker.copy(node, (source, index), walker.tracks[(source, index)].axis)
        return
    track = walker.track(source)
    if track is None:
        return
    items = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, slice | int | type(None) | type(Ellipsis)) for i in items):
        return walker.mix(node, "advanced indexing")
    rank = walker.values[source].dim()
    hit, out_axis = _index_target(items, rank, track.axis)
    if hit is None:
        return walker.copy(node, (source, None), out_axis)
    item = items[hit]
    if isinstance(item, slice):
        return _slice(walker, node, track, out_axis, item, ("getitem", hit))
    _select(walker, node, track, item, ("getitem", hit))


def _index_target(items, rank: int, axis: int) -> tuple[int | None, int | None]:
    """(position in `items` that indexes `axis` or None, output axis of `axis` or None)."""
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    in_dim = out_dim = 0
    for position, item in enumerate(items):
        if item is Ellipsis:
            span = rank - consumed
            if in_dim <= axis < in_dim + span:
                return None, out_dim + axis - in_dim
            in_dim, out_dim = in_dim + span, out_dim + span
        elif item is None:
            out_dim += 1
        else:
            if in_dim == axis:
                return position, out_dim if isinstance(item, slice) else None
            in_dim += 1
            out_dim += isinstance(item, slice)
    return None, out_dim + axis - in_dim


def _slice(walker, node, track, out_axis, item: slice, form) -> None:
    bounds = (item.start, item.stop, item.step)
    if any(isinstance(b, fx.Node) for b in bounds):
        return walker.mix(node, "channel slice with computed bounds")
    if item.step not in (None, 1):
        return walker.mix(node, "strided channel slice")
    positions = ar(len(track.ids))[item]
    walker.emit(
        (node, None),
        out_axis,
        len(positions),
        [((node.args[0], None), ar(len(positions)), positions)],
    )
    if len(positions) != len(track.ids):
        walker.patches[node] = Patch("slice", track.axis, form)


def _select(walker, node, track, index, form) -> None:
    if not isinstance(index, int):
        return walker.mix(node, "channel selected by a computed index")
    walker.uf.pin(
        track.ids[index : index + 1] if index != -1 else track.ids[-1:],
        f"channel selected by index: {walker.label(node)}",
    )
    walker.patches[node] = Patch("select", track.axis, form)


def slice_op(walker: Walker, node: fx.Node) -> None:
    """aten.slice.Tensor(x, dim, start, end, step) and narrow(x, dim, start, length)."""
    x = node.args[0]
    track = walker.track(x)
    if track is None:
        return
    rank = walker.values[x].dim()
    dim = arg(node, 1, "dim", 0) % rank
    if dim != track.axis:
        return walker.copy(node, (x, None), track.axis)
    if op_name(node) == "narrow":
        start = arg(node, 2, "start")
        length = arg(node, 3, "length")
        item = slice(start, None if isinstance(start, fx.Node) else start + length)
    else:
        item = slice(arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1))
    _slice(walker, node, track, track.axis, item, (op_name(node), None))


def select(walker: Walker, node: fx.Node) -> None:
    """aten.select.int(x, dim, index) / Tensor.select."""
    x = node.args[0]
    track = walker.track(x)
    if track is None:
        return
    dim = arg(node, 1, "dim", 0) % walker.values[x].dim()
    if dim != track.axis:
        return walker.copy(node, (x, None), track.axis - (dim < track.axis))
    _select(walker, node, track, arg(node, 2, "index"), ("select", None))


def split(walker: Walker, node: fx.Node) -> None:
    """split / split_with_sizes / chunk / tensor_split / unbind: a tuple of pieces."""
    x = node.args[0]
    track = walker.track(x)
    if track is None:
        return
    pieces = walker.values[node]
    rank = walker.values[x].dim()
    default = 0
    dim = arg(node, 2, "dim", default) if op_name(node) != "unbind" else arg(node, 1, "dim", 0)
    dim %= rank
    if dim != track.axis:
        shift = op_name(node) == "unbind" and dim < track.axis
        for i in range(len(pieces)):
            walker.copy(node, (x, None), track.axis - shift, key=(node, i))
        return
    if op_name(node) == "unbind":
        return walker.mix(node, "channels unbound into separate tensors")
    offset = 0
    for i, piece in enumerate(pieces):
        count = piece.shape[dim]
        walker.emit((node, i), dim, count, [((x, None), ar(count), ar(count) + offset)])
        offset += count
    walker.patches[node] = Patch("split", dim)


def reduction(walker: Walker, node: fx.Node) -> None:
    """mean / sum / amax / max(dim) / std / ...: pass channels unless reduced over them.

    `ops.max_min` sends max / min of two tensors (element-wise) elsewhere first.
    """
    x = node.args[0]
    track = walker.track(x)
    if track is None:
        return
    rank = walker.values[x].dim()
    dims = arg(node, 2 if op_name(node) == "norm" else 1, "dim")
    if dims is None or isinstance(dims, bool):
        return walker.mix(node, "reduction over all dimensions")
    dims = [d % rank for d in (dims if isinstance(dims, list | tuple) else [dims])]
    if track.axis in dims:
        return walker.mix(node, "reduction over channels")
    value = walker.values[node]
    out = value[0] if isinstance(value, tuple | list) else value
    keep = out.dim() == rank
    out_axis = track.axis if keep else track.axis - sum(d < track.axis for d in dims)
    keys = [(node, i) for i in range(len(value))] if isinstance(value, tuple | list) else [None]
    for key in keys:
        walker.copy(node, (x, None), out_axis, key=key)


def softmax(walker: Walker, node: fx.Node, dim=None) -> None:
    """softmax / log_softmax: mixes the channels only when taken over them."""
    x = first_tensor(walker, node)
    track = walker.track(x)
    if track is None:
        return
    dim = arg(node, 1, "dim") if dim is None else dim
    if dim is None or dim % walker.values[x].dim() == track.axis:
        return walker.mix(node, "softmax over channels")
    walker.copy(node, (x, None), track.axis)


def along_dim(walker: Walker, node: fx.Node) -> None:
    """cumsum / flip / roll: harmless unless they run along the channels."""
    x = first_tensor(walker, node)
    track = walker.track(x)
    if track is None:
        return
    dims = arg(node, 1, "dims") if op_name(node) == "flip" else arg(node, 1, "dim")
    if op_name(node) == "roll":
        dims = arg(node, 2, "dims")
    dims = dims if isinstance(dims, list | tuple) else [dims]
    if dims == [None] or any(d % walker.values[x].dim() == track.axis for d in dims):
        return walker.mix(node, "op along the channel dimension")
    walker.copy(node, (x, None), track.axis)
