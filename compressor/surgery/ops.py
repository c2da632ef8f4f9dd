"""Per-op channel rules: layers and element-wise ops, plus the rule tables.

One rule per kind of op, looked up by module type (call_module) or by a normalised name that
is the same for a torch function, a Tensor method and the aten op (`torch.add`, `x.add`,
`operator.add` and `aten.add.Tensor` are all "add"), so fx graphs and lifted torch.export
graphs share one table. Rules read the real values recorded on the example inputs, so shapes,
split sizes and reduced dimensions need little argument parsing.

An op that reads channels and is in no table fixes them ("unsupported op ... at node ..."):
never a silently wrong model; `slim_` names the op if asked to remove those channels.
Shape ops (reshape, permute, slicing, split, reductions) live in `shape_ops`.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from compressor.surgery import shape_ops as shp
from compressor.surgery.groups import Use
from compressor.surgery.layers import SelectedLinear
from compressor.surgery.walker import Rule, Walker, ar, arg, first_tensor, op_name


def rule_for(walker: Walker, node: fx.Node) -> Rule:
    """The rule for `node`: by module type, or by op name; `unknown` when neither."""
    if node.op == "call_module":
        module = walker.module(node)
        for types, rule in MODULE_RULES:
            if isinstance(module, types):
                return rule
        return unknown
    return FUNCTION_RULES.get(op_name(node), unknown)


def unknown(walker: Walker, node: fx.Node) -> None:
    """An op no rule knows: the channels it reads are fixed (unless plain element-wise)."""
    if node.op == "call_module" and _elementwise_inside(walker, node):
        return elementwise(walker, node)
    walker.mix(node, "unsupported op")


def _elementwise_inside(walker: Walker, node: fx.Node) -> bool:
    """True when a module fx could not enter runs only element-wise torch ops.

    Such a module (onnx2torch's Div branches on `is_floating_point()`, which fx cannot
    answer) is traced once more by make_fx on the recorded inputs, where Python sees real
    tensors. Only a module without parameters or buffers whose ops all act per element
    qualifies: it then works unchanged on fewer channels.
    """
    module = walker.module(node)
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return False
    if not isinstance(walker.values[node], torch.Tensor):
        return False
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: walker.values[n])
    try:
        with torch.no_grad():
            inner = make_fx(lambda *a: module(*a, **kwargs))(*args)
    except Exception:  # anything make_fx cannot run: stay conservative
        return False
    ops = [n for n in inner.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    return bool(ops) and all(op_name(n) in _PER_ELEMENT for n in ops)


# --- layers --------------------------------------------------------------------------------


def conv(walker: Walker, node: fx.Node) -> None:
    module = walker.module(node)
    if module.groups > 1:
        return grouped_conv(walker, node, module)
    walker.layer_in(node, "consumer", 1, node.args[0], 1)
    walker.layer_out(node, "producer", 0, 1)


def conv_transpose(walker: Walker, node: fx.Node) -> None:
    if walker.module(node).groups > 1:
        return walker.mix(node, "grouped transposed conv")
    walker.layer_in(node, "consumer", 0, node.args[0], 1)
    walker.layer_out(node, "producer", 1, 1)


def grouped_conv(walker: Walker, node: fx.Node, module: nn.Module) -> None:
    """Tie each conv group's input channels and output channels into one removal unit."""
    in_ids = walker.layer_in(node, "", 0, node.args[0], 1)
    groups = module.groups
    blocks = in_ids.view(groups, -1)
    if blocks.shape[1] > 1:
        heads = blocks[:, :1].expand(-1, blocks.shape[1] - 1).reshape(-1)
        walker.uf.union(heads, blocks[:, 1:].reshape(-1))
    out_ids = walker.layer_out(node, "grouped", 0, 1)
    walker.uf.union(out_ids, blocks[:, 0].repeat_interleave(len(out_ids) // groups))
    walker.grouped_inputs.append((node, (node.args[0], None)))


def linear(walker: Walker, node: fx.Node) -> None:
    walker.layer_in(node, "consumer", 1, node.args[0], -1)
    walker.layer_out(node, "producer", 0, walker.values[node].dim() - 1)


def selected_linear(walker: Walker, node: fx.Node) -> None:
    """A Linear gathering some input features first: what it reads can never be removed."""
    ids = walker.layer_in(node, "", 1, node.args[0], -1)
    walker.uf.pin(ids, f"read through an input selection: {walker.label(node)}")
    walker.layer_out(node, "producer", 0, walker.values[node].dim() - 1)


def channelwise(walker: Walker, node: fx.Node, kind: str, axis: int) -> None:
    """A layer with one parameter per channel (norms, PReLU): channels pass through."""
    x = node.args[0]
    track = walker.track(x)
    if track is None:
        return
    if track.axis != axis % walker.value(x).dim():
        walker.uf.pin(track.ids, f"per-channel layer on another dimension: {walker.label(node)}")
    else:
        walker.share(str(node.target), "in", track.ids)
        walker.uses.append(Use(str(node.target), kind, 0, (x, None), track.ids, node))
        if kind == "norm" and x in walker.produced_by:
            walker.norm_after[walker.produced_by[x]] = str(node.target)  # the last norm wins
    walker.copy(node, (x, None), track.axis)


def batch_norm(walker: Walker, node: fx.Node) -> None:
    module = walker.module(node)
    if module.weight is None and module.running_mean is None:
        return passthrough(walker, node)  # nothing per channel to slice
    channelwise(walker, node, "norm", 1)


def layer_norm(walker: Walker, node: fx.Node) -> None:
    x = node.args[0]
    track = walker.track(x)
    if track is None:
        return
    rank = walker.value(x).dim()
    normalized = len(walker.module(node).normalized_shape)
    if track.axis < rank - normalized:
        return walker.copy(node, (x, None), track.axis)  # normalises other dimensions
    if normalized > 1 or walker.module(node).weight is None:
        return walker.mix(node, "normalised together with other dimensions")
    walker.layer_norms.add(node)
    channelwise(walker, node, "norm", -1)


def prelu(walker: Walker, node: fx.Node) -> None:
    if walker.module(node).num_parameters == 1:
        return passthrough(walker, node)
    channelwise(walker, node, "channelwise", 1)


# --- element-wise -----------------------------------------------------------------------


def passthrough(walker: Walker, node: fx.Node) -> None:
    """Per-element ops (activations, dropout, casts): every output holds its input's channels."""
    x = first_tensor(walker, node)
    track = walker.track(x)
    if track is None:
        return
    value = walker.values[node]
    if isinstance(value, tuple | list):  # e.g. native_dropout -> (out, mask)
        for i in range(len(value)):
            walker.copy(node, (x, None), track.axis, key=(node, i))
    else:
        walker.copy(node, (x, None), track.axis)


def spatial(walker: Walker, node: fx.Node) -> None:
    """Pooling, resizing: act on dimensions 2.., so channels on dimension 1 pass through."""
    x = first_tensor(walker, node)
    track = walker.track(x)
    if track is not None and track.axis >= 2:
        return walker.mix(node, "spatial op over the channel dimension")
    passthrough(walker, node)


def pad(walker: Walker, node: fx.Node) -> None:
    x = first_tensor(walker, node)
    track = walker.track(x)
    if track is None:
        return
    widths = [walker.value(w) for w in walker.value(arg(node, 1, "pad", []))]  # may be nodes
    rank = walker.value(x).dim()
    padded = {rank - 1 - i // 2 for i, w in enumerate(widths) if w}
    if track.axis in padded:
        return walker.mix(node, "padding of the channel dimension")
    passthrough(walker, node)


def elementwise(walker: Walker, node: fx.Node) -> None:
    """Binary/ternary element-wise ops with broadcasting; add/sub of two streams is a join."""
    out = walker.values[node]
    operands = [a for a in walker.tensor_args(node) if isinstance(walker.values[a], torch.Tensor)]
    tracked = [(a, walker.track(a)) for a in operands if walker.track(a) is not None]
    if not tracked:
        return
    axes = {t.axis + out.dim() - walker.values[a].dim() for a, t in tracked}
    if len(axes) > 1:
        return walker.mix(node, "operands carry channels on different dimensions")
    axis = axes.pop()
    size = out.shape[axis]
    sources, params, untracked = [], [], []
    for a in operands:
        dim = axis - (out.dim() - walker.values[a].dim())
        if dim < 0 or walker.values[a].shape[dim] == 1:
            continue  # broadcast along the channels
        track = walker.track(a)
        if track is not None and track.axis == dim:
            sources.append(((a, None), ar(size), ar(size)))
        elif a.op == "get_attr" and track is None:
            params.append((a, dim))
        else:
            untracked.append(a)
    name = op_name(node)
    join = None
    if len(sources) > 1:
        join = {"add": "add", "iadd": "add", "sub": "sub", "isub": "sub"}.get(name, "strict")
    alpha = node.kwargs.get("alpha", 1.0)
    ids = walker.emit((node, None), axis, size, sources, join, alpha)
    if join in ("add", "sub"):
        walker.residual_ids.append(ids)
    for param, dim in params:
        walker.share(param.target, "param", ids)
        walker.uses.append(Use(param.target, "channelwise", dim, (node, None), ids, node))
    if untracked:
        walker.uf.pin(ids, f"combined with an untracked tensor: {walker.label(node)}")


def max_min(walker: Walker, node: fx.Node) -> None:
    """max / min: element-wise between two tensors, else a reduction (`shape_ops`)."""
    if isinstance(walker.value(arg(node, 1, "other")), torch.Tensor):
        return elementwise(walker, node)
    return shp.reduction(walker, node)


def cat(walker: Walker, node: fx.Node) -> None:
    items = list(arg(node, 0, "tensors", []))
    out = walker.values[node]
    dim = arg(node, 1, "dim", 0) % out.dim()
    tracked = [(a, walker.track(a)) for a in items if walker.track(a) is not None]
    if not tracked:
        return
    axes = {t.axis for _, t in tracked}
    if len(axes) > 1:
        return walker.mix(node, "concatenated tensors carry channels on different dimensions")
    axis = axes.pop()
    if axis != dim:
        return elementwise_strict(walker, node, items, axis)
    sources, offset = [], 0
    for a in items:
        count = walker.values[a].shape[dim]
        if walker.track(a) is not None:
            sources.append(((a, None), torch.arange(offset, offset + count), ar(count)))
        offset += count
    walker.emit((node, None), axis, out.shape[axis], sources)


def elementwise_strict(walker: Walker, node: fx.Node, items, axis: int) -> None:
    """Concatenation/stacking along another dimension: channel c of every input is one."""
    out = walker.values[node]
    out_axis = axis + out.dim() - walker.values[items[0]].dim()
    size = out.shape[out_axis]
    sources = [((a, None), ar(size), ar(size)) for a in items if walker.track(a) is not None]
    ids = walker.emit((node, None), out_axis, size, sources, "strict" if len(sources) > 1 else None)
    if len(sources) < len(items):
        walker.uf.pin(ids, f"joined with an untracked tensor: {walker.label(node)}")


def stack(walker: Walker, node: fx.Node) -> None:
    items = list(arg(node, 0, "tensors", []))
    tracked = [walker.track(a) for a in items if walker.track(a) is not None]
    if not tracked:
        return
    if len({t.axis for t in tracked}) > 1:
        return walker.mix(node, "stacked tensors carry channels on different dimensions")
    dim = arg(node, 1, "dim", 0) % walker.values[node].dim()
    axis = tracked[0].axis
    out_axis = axis + 1 if dim <= axis else axis
    sources = [((a, None), ar(len(t.ids)), ar(len(t.ids))) for a in items if (t := walker.track(a))]
    ids = walker.emit(
        (node, None), out_axis, len(tracked[0].ids), sources, "strict" if len(sources) > 1 else None
    )
    if len(sources) < len(items):
        walker.uf.pin(ids, f"stacked with an untracked tensor: {walker.label(node)}")


def mixing(walker: Walker, node: fx.Node) -> None:
    """Ops that combine channels (matmul, functional conv, channel shuffle): fix them."""
    walker.mix(node, "op mixes channels")


def _module_softmax(walker: Walker, node: fx.Node) -> None:
    shp.softmax(walker, node, dim=walker.module(node).dim)


_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad2d,
         nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d)  # fmt: skip
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)  # fmt: skip


def _module_pad(walker: Walker, node: fx.Node) -> None:
    module = walker.module(node)
    rank = walker.values[node].dim()
    widths = module.padding if isinstance(module.padding, tuple) else (module.padding,) * 2
    track = walker.track(node.args[0])
    padded = {rank - 1 - i // 2 for i, w in enumerate(widths) if w}
    if track is not None and track.axis in padded:
        return walker.mix(node, "padding of the channel dimension")
    passthrough(walker, node)


MODULE_RULES: list[tuple[tuple[type, ...] | type, Rule]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), conv),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), conv_transpose),
    (SelectedLinear, selected_linear),  # before nn.Linear: it is one
    (nn.Linear, linear),
    (_NORMS, batch_norm),
    (nn.LayerNorm, layer_norm),
    (nn.PReLU, prelu),
    (_ACTIVATIONS, passthrough),
    (_POOLS, spatial),
    (_PADS, _module_pad),
    ((nn.Flatten, nn.Unflatten), shp.reshape),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin), _module_softmax),
    ((nn.GroupNorm, nn.LocalResponseNorm, nn.PixelShuffle, nn.PixelUnshuffle,
      nn.ChannelShuffle), mixing),
]  # fmt: skip

_PASSTHROUGH = """
relu relu6 hardtanh leaky_relu elu selu celu gelu silu mish hardswish hardsigmoid sigmoid
tanh softplus softsign tanhshrink threshold log_sigmoid logsigmoid exp exp2 expm1 log log2
log1p abs neg negative sqrt rsqrt square reciprocal sign sin cos erf erfc clamp clip clamp_min
clamp_max dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
native_dropout contiguous clone detach to float double half bfloat16 type type_as alias
lift_fresh_copy round floor ceil trunc frac nan_to_num logit logical_not bitwise_not
isnan isfinite isinf relu_ hardswish_ silu_ gelu_ sigmoid_ tanh_ pow_scalar
"""
_ELEMENTWISE = """
add iadd sub isub rsub mul imul div truediv itruediv true_divide floor_divide floordiv
remainder mod fmod maximum minimum pow where masked_fill eq ne lt le gt ge logical_and
logical_or logical_xor bitwise_and bitwise_or bitwise_xor and or xor hypot atan2 copysign
lerp addcmul addcdiv
"""
_SPATIAL = """
max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d max_pool2d_with_indices max_pool1d_with_indices lp_pool1d lp_pool2d
interpolate upsample upsample_nearest1d upsample_nearest2d upsample_bilinear2d
upsample_bicubic2d upsample_linear1d upsample_trilinear3d upsample_nearest3d
"""
_MIXING = """
matmul mm bmm einsum conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d
convolution linear addmm baddbmm bilinear batch_norm layer_norm group_norm instance_norm
normalize pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle embedding
index_select gather scatter scatter_add index_add index_copy repeat tile repeat_interleave sort
topk cross tensordot
"""

_NAMED_RULES: list[tuple[str, Rule]] = [
    (_PASSTHROUGH, passthrough),
    (_ELEMENTWISE, elementwise),
    (_SPATIAL, spatial),
    (_MIXING, mixing),
    ("view reshape flatten unflatten squeeze unsqueeze view_as reshape_as", shp.reshape),
    ("expand expand_as broadcast_to", shp.expand),
    ("mean sum nansum nanmean amax amin std var prod logsumexp norm", shp.reduction),
    ("max min", max_min),
    ("argmax argmin all any", shp.reduction),
    ("split split_with_sizes unsafe_split chunk tensor_split unbind", shp.split),
    ("softmax log_softmax softmin", shp.softmax),
    ("cumsum cumprod flip roll", shp.along_dim),
    ("permute", shp.permute),
    ("transpose swapaxes swapdims movedim t", shp.transpose),
    ("getitem", shp.getitem),
    ("slice narrow", shp.slice_op),
    ("select", shp.select),
    ("cat concat concatenate", cat),
    ("stack", stack),
    ("pad constant_pad_nd", pad),
]
_PER_ELEMENT = frozenset((_PASSTHROUGH + _ELEMENTWISE).split())
FUNCTION_RULES: dict[str, Rule] = {
    name: rule for names, rule in _NAMED_RULES for name in names.split()
}
