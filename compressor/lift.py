"""Turn a loaded ExportedProgram back into a trainable model made of real nn layers.

`ExportedProgram.module()` runs, but its convolutions are `aten.conv2d` calls on bare
parameters: no `nn.Conv2d` for a method to find, no train mode. `lift` rewrites each such
call whose weights are parameters into a `call_module` on a real layer holding those same
parameters under the same names, so a `.pt2` written by anyone prunes, trains and
re-exports like the model it came from, without running any of its code.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import fx, nn

from compressor.static_batch import free_static_batch_

aten = torch.ops.aten


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _param_prefix(node: fx.Node, attrs: dict) -> str | None:
    """Module path owning the get_attr `node` (`layer1.0.conv1.weight` -> `layer1.0.conv1`)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or node.target not in attrs:
        return None
    prefix, _, _ = node.target.rpartition(".")
    return prefix


def _rank(node: fx.Node) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _conv(node: fx.Node, attrs: dict, dims: int) -> nn.Module | None:
    weight = attrs[node.args[1].target]
    bias_node = _arg(node, 2, "bias", None)
    padding = _arg(node, 4, "padding", [0] * dims)
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = cls(
        weight.shape[1] * _arg(node, 6, "groups", 1),
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=tuple(_arg(node, 3, "stride", [1] * dims)),
        padding=padding if isinstance(padding, str) else tuple(padding),
        dilation=tuple(_arg(node, 5, "dilation", [1] * dims)),
        groups=_arg(node, 6, "groups", 1),
        bias=bias_node is not None,
    )
    conv.weight = weight
    if bias_node is not None:
        conv.bias = attrs[bias_node.target]
    return conv


def _linear(node: fx.Node, attrs: dict) -> nn.Module:
    weight = attrs[node.args[1].target]
    bias_node = _arg(node, 2, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias_node is not None)
    linear.weight = weight
    if bias_node is not None:
        linear.bias = attrs[bias_node.target]
    return linear


def _batch_norm(node: fx.Node, attrs: dict) -> nn.Module | None:
    weight_node, bias_node, mean_node, var_node = node.args[1:5]
    if weight_node is None or mean_node is None:
        return None
    rank = _rank(node.args[0])
    cls = nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d if rank in (2, 3) else None
    if cls is None:
        return None
    bn = cls(attrs[weight_node.target].shape[0], eps=node.args[7], momentum=node.args[6])
    bn.weight, bn.bias = attrs[weight_node.target], attrs[bias_node.target]
    bn.running_mean, bn.running_var = attrs[mean_node.target], attrs[var_node.target]
    tracked = mean_node.target.rpartition(".")[0] + ".num_batches_tracked"
    if tracked in attrs:
        bn.num_batches_tracked = attrs[tracked]
    return bn


def _layer_norm(node: fx.Node, attrs: dict) -> nn.Module | None:
    weight_node = _arg(node, 2, "weight", None)
    bias_node = _arg(node, 3, "bias", None)
    if weight_node is None:
        return None
    norm = nn.LayerNorm(
        list(node.args[1]), eps=_arg(node, 4, "eps", 1e-5), bias=bias_node is not None
    )
    norm.weight = attrs[weight_node.target]
    if bias_node is not None:
        norm.bias = attrs[bias_node.target]
    return norm


def _prelu(node: fx.Node, attrs: dict) -> nn.Module:
    weight = attrs[node.args[1].target]
    prelu = nn.PReLU(weight.numel())
    prelu.weight = weight
    return prelu


# op -> (builder, positions of the parameter arguments the layer takes over)
_LIFTERS: dict = {
    aten.conv1d.default: (lambda n, a: _conv(n, a, 1), (1, 2)),
    aten.conv2d.default: (lambda n, a: _conv(n, a, 2), (1, 2)),
    aten.conv1d.padding: (lambda n, a: _conv(n, a, 1), (1, 2)),
    aten.conv2d.padding: (lambda n, a: _conv(n, a, 2), (1, 2)),
    aten.linear.default: (_linear, (1, 2)),
    aten.batch_norm.default: (_batch_norm, (1, 2, 3, 4)),
    aten.layer_norm.default: (_layer_norm, (2, 3)),
    aten.prelu.default: (_prelu, (1,)),
}


def _owned_params(node: fx.Node, positions: tuple[int, ...]) -> list[fx.Node]:
    return [node.args[i] for i in positions if i < len(node.args) and node.args[i] is not None]


def _liftable(node: fx.Node, positions: tuple[int, ...], attrs: dict) -> str | None:
    """The module path for `node` if all its parameters live under one prefix, used once."""
    params = _owned_params(node, positions)
    prefixes = {_param_prefix(p, attrs) for p in params}
    if not params or None in prefixes or len(prefixes) != 1:
        return None
    if any(len(p.users) != 1 for p in params):
        return None  # a shared weight stays a functional call
    prefix = prefixes.pop()
    return prefix or None


def lift(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """Rebuild `program` as an fx.GraphModule whose layers are real nn modules.

    Parameter and buffer names are kept, so the lifted model's state_dict equals the
    original model's. Ops that have no layer equivalent stay as they are.
    """
    flat = program.module()
    attrs, constants = _flat_attrs(flat)
    graph, modules = _lifted_graph(flat, attrs)
    free_static_batch_(graph)  # a program exported at a fixed batch runs at any batch
    root = _root_module(graph, modules, attrs, constants)
    lifted_gm = fx.GraphModule(root, graph)
    _unpersist_constants_(lifted_gm, constants)
    lifted_gm.recompile()
    return lifted_gm.eval()  # exported programs are inference graphs


def _flat_attrs(flat: fx.GraphModule) -> tuple[dict, set[str]]:
    """Every tensor the graph reads by get_attr, and which of them are lifted constants."""
    attrs = dict(flat.named_parameters()) | dict(flat.named_buffers())
    constants = set()
    for node in flat.graph.nodes:
        if node.op == "get_attr" and node.target not in attrs:
            # lifted tensor constants are plain attributes, neither parameter nor buffer
            attrs[node.target] = _get_path(flat, node.target)
            constants.add(node.target)
    return attrs, constants


def _lifted_graph(flat: fx.GraphModule, attrs: dict) -> tuple[fx.Graph, dict[str, nn.Module]]:
    """A copy of `flat`'s graph with each liftable call replaced by a call_module."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(flat.graph._codegen)  # keeps the pytree in/out structure
    env: dict[fx.Node, fx.Node] = {}
    modules: dict[str, nn.Module] = {}
    for node in flat.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            continue
        lifted = _lift_node(node, attrs)
        if lifted is not None and lifted[0] not in modules:
            fqn, module = lifted
            modules[fqn] = module
            env[node] = graph.call_module(fqn, (env[node.args[0]],))
            env[node].meta = dict(node.meta)
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)  # taken over by a lifted layer
    return graph, modules


def _lift_node(node: fx.Node, attrs: dict) -> tuple[str, nn.Module] | None:
    if node.op != "call_function" or node.target not in _LIFTERS:
        return None
    build, positions = _LIFTERS[node.target]
    fqn = _liftable(node, positions, attrs)
    if fqn is None:
        return None
    module = build(node, attrs)
    return None if module is None else (fqn, module)


def _root_module(
    graph: fx.Graph, modules: dict[str, nn.Module], attrs: dict, constants: set[str]
) -> nn.Module:
    """An nn.Module tree holding the lifted layers and the attributes still read by get_attr."""
    root = nn.Module()
    for fqn, module in modules.items():
        _set_path(root, fqn, module, lambda parent, name, value: parent.add_module(name, value))
    for node in graph.nodes:
        if node.op == "get_attr":
            value = attrs[node.target]
            _set_path(root, node.target, value, _setter(value, node.target not in constants))
    return root


def _setter(value, persistent: bool) -> Callable:
    if isinstance(value, nn.Parameter):
        return lambda parent, name, v: parent.register_parameter(name, v)
    return lambda parent, name, v: parent.register_buffer(name, v, persistent=persistent)


def _unpersist_constants_(gm: fx.GraphModule, constants: set[str]) -> None:
    """Keeps lifted tensor constants out of the state_dict, as in the exported program.

    fx.GraphModule copies every get_attr tensor in as a persistent buffer.
    """
    for fqn in constants:
        owner, _, name = fqn.rpartition(".")
        module = gm.get_submodule(owner)
        if name in module._buffers:
            module._non_persistent_buffers_set.add(name)


def _get_path(root: nn.Module, fqn: str):
    value = root
    for part in fqn.split("."):
        value = getattr(value, part)
    return value


def _set_path(root: nn.Module, fqn: str, value, setter: Callable) -> None:
    *parents, name = fqn.split(".")
    module = root
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if not hasattr(module, name):
        setter(module, name, value)


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of `model` (a lifted .pt2 model too, without torch's pytree warning)."""
    with warnings.catch_warnings():
        # deep-copying a lifted .pt2 model trips torch's own pytree deprecation warning
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
        return copy.deepcopy(model)
