"""The ONNX graphs the latency table times: one layer alone, and a layer in a chain.

A layer timed alone runs as its own graph: onnxruntime reads the graph's input in NCHW,
reorders it into its blocked NCHWc layout where the conv qualifies (input channels under
16 or a multiple of 16 on AVX-512) and back out for the graph's output. In a network those
reorders sit only where the layout changes, a conv that falls off the blocked kernels runs
im2col + GEMM on every input, and each node costs a dispatch. A conv is therefore also
timed in a *pair chain*: itself and its reverse (output channels back to input channels,
same kernel), ReLU after each, repeated; what one more pair adds is the pair's cost among
neighbours of its own widths, as a residual block's two convs meet them
(surgery/latency.py `LatencyTable.lookup`).
"""

from __future__ import annotations

Spec = dict  # one layer shape: see latency.layer_spec
CHAIN_PAIRS = (1, 5)  # pair chains timed; their difference over 4 is one pair in context


def chainable(spec: Spec) -> bool:
    """Whether a layer can follow its own reverse: a plain 2-d conv (no groups) whose
    output keeps its input's size (stride 1, 'same' padding)."""
    if spec["op"] != "conv2d" or spec["g"] != 1 or list(spec["s"]) != [1, 1]:
        return False
    return all(2 * p == d * (k - 1) for p, d, k in zip(spec["p"], spec["d"], spec["k"]))


def reverse(spec: Spec) -> Spec:
    """The layer that maps `spec`'s output channels back to its input channels."""
    return spec | {"in": spec["out"], "out": spec["in"]}


def single_layer_graph(spec: Spec) -> tuple[bytes, list[int]]:
    """A serialized one-node ONNX model of `spec` (random weights) and its input's shape."""
    import numpy as np
    from onnx import helper

    rng = np.random.default_rng(0)
    if spec["op"] == "linear":
        x_shape, w_shape = [spec["tokens"], spec["in"]], [spec["out"], spec["in"]]
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    else:
        x_shape = [1, spec["in"], *spec["hw"]]
        w_shape = [spec["out"], spec["in"] // spec["g"], *spec["k"]]
        node = _conv(spec, "x", "w", "b", "y")
    return _model([node], _weights(rng, w_shape, "w", "b"), x_shape), x_shape


def pair_chain_graph(spec: Spec, pairs: int) -> tuple[bytes, list[int]]:
    """`pairs` times conv `spec` -> ReLU -> conv `reverse(spec)` -> ReLU, serialized, and
    its input's shape (`spec` must be `chainable`)."""
    import numpy as np
    from onnx import helper

    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for i in range(2 * pairs):
        layer = spec if i % 2 == 0 else reverse(spec)
        weights += _weights(rng, [layer["out"], layer["in"], *layer["k"]], f"w{i}", f"b{i}")
        nodes.append(_conv(layer, previous, f"w{i}", f"b{i}", f"c{i}"))
        previous = "y" if i == 2 * pairs - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"c{i}"], [previous]))
    x_shape = [1, spec["in"], *spec["hw"]]
    return _model(nodes, weights, x_shape), x_shape


def _weights(rng, w_shape: list[int], w: str, b: str) -> list:
    """Random initializers `w` of `w_shape` and bias `b` of its first dimension."""
    import numpy as np
    from onnx import numpy_helper

    weight = rng.standard_normal(w_shape, dtype=np.float32)
    bias = rng.standard_normal(w_shape[0], dtype=np.float32)
    return [numpy_helper.from_array(weight, w), numpy_helper.from_array(bias, b)]


def _conv(spec: Spec, x: str, w: str, b: str, y: str):
    from onnx import helper

    return helper.make_node(
        "Conv",
        [x, w, b],
        [y],
        kernel_shape=spec["k"],
        strides=spec["s"],
        pads=list(spec["p"]) * 2,
        dilations=spec["d"],
        group=spec["g"],
    )


def _model(nodes: list, weights: list, x_shape: list[int]) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        weights,
    )
    # IR 8 / opset 17: what every onnxruntime since 1.14 reads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()
