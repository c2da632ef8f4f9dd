"""The cost engine's latency model: a per-layer lookup table measured on the runtime.

A slimmed network's latency is predicted as the sum, over its Conv/Linear layers, of the
time each takes at its live widths: each distinct layer shape (op,
channels in and out, kernel, stride, padding, dilation, groups, input size) is timed once
as a single-layer ONNX graph in onnxruntime (one intra-op thread by default, the median of
several rounds) and cached as JSON under the user's cache directory, in a file whose name
hashes the onnxruntime version, the CPU model and the thread count: a table measured on one
machine is never read on another. The timer is injectable, so tests use a deterministic one.

A conv that keeps its input's size is priced in context, not alone (`LatencyTable.lookup`,
latency_graphs.py): alone, its graph pays onnxruntime's layout reorders at both ends and
none of a chain's per-node dispatch, so the table priced a 16-channel 3x3 conv at 7x7,
which stays on the blocked kernels, at 10 us where a chain runs it in 3.5, and one of 17
channels, which falls off them, at 1.8x it where a chain runs it at 4.2x. Fitted in
context, latency budgets on ResNet-20 met 24 of 24 rows over two runs against 20 of 24
priced alone, with 32 re-fits against 54 (bench/RESULTS.md latency_budget, latency_context).

With one intra-op thread (the default) a layer is timed on the process's CPU clock, not
the wall clock: an entry is cached for good, and one timed while other work shared the
core would misprice its shape in every later budget (with more threads CPU time would add
up their work, so the wall clock is used). Beside a busy process on the same core, wall-clock entries came out 0.84-2.69x
their idle value (median 2x), CPU-clock ones 0.81-1.13x; idle, both clocks repeat within
about 15 % (bench/RESULTS.md latency_noise). A table file of another TABLE_VERSION (1: the
wall clock; 2: every layer priced alone) is measured again.

Every run of a graph also pays a fixed cost (the session call, copying the input and
output) that each one-layer timing includes: it is timed once (an Identity graph), taken out
of every layer and counted once per network. The sum ignores what lies between the layers (activations, pools, joins), so it ranks
decisions well but is not the graph's latency; a budget met with it is checked by timing
the exported graph (exporters/latency.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compressor.masks import PRUNABLE_TYPES
from compressor.surgery.cost import CostModel
from compressor.surgery.latency_graphs import (
    CHAIN_PAIRS,
    chainable,
    pair_chain_graph,
    reverse,
    single_layer_graph,
)

THREADS = 1  # intra-op threads: comparable across machines, independent of free cores
ROUNDS = 5  # timed samples per layer shape; the median is kept
MIN_SAMPLE_S = 0.005  # one sample repeats the layer until it lasts this long (timer noise)
MAX_REPEATS = 1000
TABLE_VERSION = 3  # 2: timed on the CPU clock; 3: convs priced in pair chains
ALIGN_CANDIDATES = (2, 4, 8, 16, 32)  # channel multiples SIMD kernels block by
ALIGN_LAYERS = 3  # the slowest layer shapes that decide the multiple
ALIGN_TOLERANCE = 0.05  # rounding up "costs no time" within this (timer noise)

OVERHEAD_KEY = "overhead"  # the table's entry for the fixed cost of one graph run
PAIR_PREFIX = "pair "  # a pair chain's entry: "pair " + the spec_key of its narrower-input conv
Spec = dict  # one layer shape: see `layer_spec`
Timer = Callable[[Spec], float]  # milliseconds of one run of a single-layer graph


def spec_key(spec: Spec) -> str:
    """A layer shape as the table's key, e.g. 'conv in=16 out=8 k=3x3 s=1x1 ... hw=8x8'."""
    return " ".join(
        [spec["op"]] + [f"{k}={_text(v)}" for k, v in sorted(spec.items()) if k != "op"]
    )


def _text(value) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def machine_id(threads: int = THREADS) -> dict[str, str]:
    """What a measured table depends on: the runtime's version, the CPU model, the threads."""
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "cpu": _cpu_model(), "threads": str(threads)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path(threads: int = THREADS, machine: dict[str, str] | None = None) -> Path:
    """$XDG_CACHE_HOME (or ~/.cache)/compressor/latency-<hash of the machine id>.json."""
    machine = machine or machine_id(threads)
    digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "compressor" / f"latency-{digest}.json"


class LatencyTable:
    """Milliseconds per layer shape: looked up in the cache, else timed once and stored.

    Args:
        timer: Times one layer shape; default: `OrtLayerTimer(threads)`.
        path: The cache file; default: `cache_path(threads)`.
        threads: onnxruntime intra-op threads (part of the cache key).
    """

    def __init__(
        self, timer: Timer | None = None, path: Path | None = None, threads: int = THREADS
    ):
        self.timer = timer or OrtLayerTimer(threads)
        self.path = Path(path) if path is not None else cache_path(threads)
        self.entries: dict[str, float] = {}
        self.measured = 0  # shapes timed by this object (not found in the cache)
        self._priced: dict[str, float] = {}  # lookup()'s answers, from `entries`
        stored = _read_table(self.path)
        if stored.get("version") == TABLE_VERSION:  # else timed another way: again
            self.entries = dict(stored.get("entries", {}))

    def lookup(self, spec: Spec) -> float:
        """The layer shape's milliseconds in a network, timing what the table lacks.

        A conv that can follow its own reverse (`latency_graphs.chainable`) is priced in
        context when the timer times pair chains (`pair`): the pair's cost among neighbours
        of its widths, shared between the two convs as they time alone. Other layers, and
        every layer under a timer without `pair` (a fake one), are priced as timed alone.
        """
        key = spec_key(spec)
        if key not in self._priced:  # the fitter asks thousands of times per budget
            self._priced[key] = self._price(spec)
        return self._priced[key]

    def _price(self, spec: Spec) -> float:
        alone = self.alone(spec)
        pair = getattr(self.timer, "pair", None)
        if pair is None or not chainable(spec):
            return alone
        back = reverse(spec)
        first = spec if spec["in"] <= spec["out"] else back  # one chain for the two
        key = PAIR_PREFIX + spec_key(first)
        if key not in self.entries:
            self.entries[key] = max(0.0, float(pair(first)))
            self.measured += 1
        base = self.overhead()
        own, other = max(0.0, alone - base), max(0.0, self.alone(back) - base)
        share = own / (own + other) if own + other > 0 else 0.5
        return base + self.entries[key] * share

    def alone(self, spec: Spec) -> float:
        """The milliseconds of the layer shape's own one-layer graph (timed once, cached)."""
        key = spec_key(spec)
        if key not in self.entries:
            self.entries[key] = float(self.timer(spec))
            self.measured += 1
        return self.entries[key]

    def overhead(self) -> float:
        """The fixed milliseconds of one graph run, timed once (0 for a timer without
        an `overhead()`, e.g. a fake one)."""
        if OVERHEAD_KEY not in self.entries:
            measure = getattr(self.timer, "overhead", None)
            if measure is None:
                return 0.0
            self.entries[OVERHEAD_KEY] = float(measure())
            self.measured += 1
        return self.entries[OVERHEAD_KEY]

    def save(self) -> None:
        """Writes the table (a temporary file renamed over the old one: never half written)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": TABLE_VERSION, "entries": self.entries}, indent=1)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(text + "\n")
        partial.replace(self.path)


def _read_table(path: Path) -> dict:
    """The cached table file's contents; {} when it is missing or not a table (a cache: a
    damaged one is timed again and overwritten, never an error)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


class LatencyModel:
    """Predicted milliseconds of `model` slimmed with any keep dict: the engine's latency.

    Args:
        costs: The cost model of the same model (its live widths per keep dict).
        model: The network (not modified); one forward at batch 1 records each layer's
            input size.
        example_inputs: A tuple of inputs the model runs on (the first sample is used).
        table: Where layer times come from.
    """

    def __init__(
        self, costs: CostModel, model: nn.Module, example_inputs: tuple, table: LatencyTable
    ):
        self.costs, self.table = costs, table
        self.calls = _record_calls(model, tuple(x[:1] for x in example_inputs))

    def specs(self, keep: dict, residual: str | None = None) -> list[Spec]:
        """The shape of every layer call once slimmed with `keep`."""
        widths = self.costs.widths(keep, residual)
        found = []
        for fqn, module, size in self.calls:
            shape, outs = widths.weights[fqn], widths.outputs[fqn]
            found.append(layer_spec(module, shape, outs, size))
        return found

    def cost(self, keep: dict, residual: str | None = None) -> float:
        """Predicted milliseconds: the fixed cost of a run plus every layer call's own time."""
        base = self.table.overhead()
        specs = self.specs(keep, residual)
        return base + sum(max(0.0, self.table.lookup(spec) - base) for spec in specs)

    def dense(self) -> float:
        """Predicted milliseconds of the unslimmed model."""
        return self.cost({})


def rate_multiple(
    table: LatencyTable, specs: list[Spec], tolerance: float = ALIGN_TOLERANCE
) -> int:
    """The channel multiple where the runtime's kernel rate steps up: `--round-to`'s
    default under a latency budget.

    The largest N of ALIGN_CANDIDATES such that, on the ALIGN_LAYERS slowest of `specs`,
    rounding any count up to a multiple of N costs no time (within `tolerance`): the
    kernel runs N-wide and a partial block costs a full one. A count is priced where it is
    written and where it is read (`_free_rounding`), and N must lie below each of those
    layers' output counts: at N = 16 a 16-channel layer could not be slimmed at all, which
    onnxruntime's padded blocked kernels (a 5-channel output costs a 16-channel one) would
    otherwise call free. 1 when none does.
    """
    heavy = sorted(specs, key=table.lookup, reverse=True)[:ALIGN_LAYERS]
    best = 1
    for n in ALIGN_CANDIDATES:
        if all(n < spec["out"] and _free_rounding(table, spec, n, tolerance) for spec in heavy):
            best = n
    return best


def _free_rounding(table: LatencyTable, spec: Spec, n: int, tolerance: float) -> bool:
    """Whether every count (up to twice the largest candidate) costs no less once rounded
    up to a multiple of `n` (or the layer's full count), in the layer that writes it and in
    a like layer reading it (a residual block's inner conv feeds one of its own shape): a
    count under the kernel's block may cost its producer no less yet its consumer less."""
    sides = ["out", "in"] if spec.get("g", 1) == 1 else ["out"]
    for count in range(1, min(spec["out"], 2 * ALIGN_CANDIDATES[-1]) + 1):
        up = min(-(-count // n) * n, spec["out"])
        for side in sides:
            if table.lookup(spec | {side: up}) > (1 + tolerance) * table.lookup(
                spec | {side: count}
            ):
                return False
    return True


def layer_spec(module: nn.Module, shape: list[int], outs: int, size: tuple[int, ...]) -> Spec:
    """One layer call's shape at live weight `shape` and `outs` output channels.

    `size` is the input's spatial size for a conv, its leading (token) sizes for a Linear.
    """
    if isinstance(module, nn.Linear):
        return {
            "op": "linear",
            "in": shape[1],
            "out": outs,
            "tokens": int(torch.Size(size).numel()),
        }
    groups = module.groups
    if groups > 1:  # a grouped conv keeps whole groups; depthwise: one channel each
        groups = outs // (module.out_channels // module.groups)
    return {
        "op": f"conv{len(module.kernel_size)}d",
        "in": shape[1] * groups,
        "out": outs,
        "k": list(module.kernel_size),
        "s": list(module.stride),
        "p": list(module.padding),
        "d": list(module.dilation),
        "g": groups,
        "hw": list(size),
    }


@torch.no_grad()
def _record_calls(model: nn.Module, example: tuple) -> list[tuple[str, nn.Module, tuple]]:
    """(fqn, module, input size past batch and channels) of every Conv/Linear call."""
    calls, hooks = [], []
    for fqn, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and not isinstance(module, nn.Conv1d | nn.Conv2d):
            hooks.append(module.register_forward_hook(_hook(calls, fqn, lambda x: x.shape[1:-1])))
        elif isinstance(module, PRUNABLE_TYPES):
            hooks.append(module.register_forward_hook(_hook(calls, fqn, lambda x: x.shape[2:])))
    training = model.training
    model.eval()
    try:
        model(*example)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return calls


def _hook(calls: list, fqn: str, size_of):
    def hook(module, inputs, output):
        calls.append((fqn, module, tuple(int(s) for s in size_of(inputs[0]))))

    return hook


class OrtLayerTimer:
    """Times one layer shape as a single-node ONNX graph in onnxruntime (median of rounds),
    by default on the process's CPU clock with one intra-op thread (see the module
    docstring) and on the wall clock with more, where CPU time adds up the threads' work."""

    def __init__(self, threads: int = THREADS, rounds: int = ROUNDS, clock=None):
        self.threads, self.rounds = threads, rounds
        self.clock = clock or (time.process_time if threads == 1 else time.perf_counter)

    def __call__(self, spec: Spec) -> float:
        return self._time(*single_layer_graph(spec))

    def pair(self, spec: Spec) -> float:
        """Milliseconds one more pair (`spec`, its reverse) adds to a chain of them."""
        few, many = (self._time(*pair_chain_graph(spec, n)) for n in CHAIN_PAIRS)
        return (many - few) / (CHAIN_PAIRS[1] - CHAIN_PAIRS[0])

    def overhead(self) -> float:
        """Milliseconds of one run of an Identity graph: what every run costs."""
        from onnx import TensorProto, helper

        node = helper.make_node("Identity", ["x"], ["y"])
        value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        graph = helper.make_graph([node], "noop", [value], [out])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        return self._time(model.SerializeToString(), [1, 1])

    def _time(self, graph: bytes, input_shape: list[int]) -> float:
        import numpy as np
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        feed = {"x": np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)}
        session.run(None, feed)  # the first run allocates
        start = self.clock()
        session.run(None, feed)
        once = self.clock() - start
        repeats = max(1, min(MAX_REPEATS, int(MIN_SAMPLE_S / once) if once > 0 else MAX_REPEATS))
        samples = []
        for _ in range(self.rounds):
            start = self.clock()
            for _ in range(repeats):
                session.run(None, feed)
            samples.append((self.clock() - start) * 1000.0 / repeats)
        return statistics.median(samples)
