"""ONNX export: a hetnet Sequential as an ONNX graph that onnxruntime, TensorRT, OpenVINO or a browser can run.

The graph's input `images` is float32 (N, C, H, W) with values in [0, 1] and any batch size N; the graph first
normalises each channel, (x - mean) / std, with the model's statistics, then runs the layers in eval mode
(BatchNorm with its running statistics, Dropout the identity). Its output `logits` is the last layer's output
(N, K) (probabilities if the model ends in Softmax). Built with the `onnx` package's helpers at opset 17 and
checked with onnx.checker; the class names, mean and std travel in the model's metadata_props.

Each layer type is one small function that appends its nodes to the graph; `CONVERTERS` maps a layer class to it
and is searched by isinstance (most specific class first), so a new layer type is one function and one entry.

    >>> model.export_onnx("fashion.onnx", (1, 28, 28), mean=[0.286], std=[0.353], class_names=names)  # doctest: +SKIP
    >>> import onnxruntime as ort                                                                       # doctest: +SKIP
    >>> ort.InferenceSession("fashion.onnx").run(["logits"], {"images": x})[0]    # x in [0, 1]       # doctest: +SKIP

onnx is an optional extra (`pip install 'hetnet[export]'`), imported only when a model is exported.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import layers as L
from .errors import UsageError
from .files import atomic_write_bytes
from .version import __version__

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
INSTALL_HINT = "pip install 'hetnet[export]' (or pip install onnx)"


class Graph:
    """The nodes and initialisers (weights) of the graph being built; every tensor is named by the layer that
    made it ('3.Conv2D', '3.Conv2D.weight')."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.initializers: list = []

    def const(self, name: str, array) -> str:
        """A float32 initialiser holding `array`; returns its name."""
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list, output: str, **attrs) -> str:
        """One node op(inputs) -> output; returns the output's name."""
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _host(layer, array) -> np.ndarray:
    return np.asarray(layer.backend.to_numpy(array), dtype=np.float32)


# --- one function per layer type: (graph, layer, input name, output name) -> the name of the layer's output -----


def _dense(g: Graph, layer, x: str, out: str) -> str:
    # y = x W^T + b with W (out, in), as Gemm with transB
    inputs = [x, g.const(f"{out}.weight", _host(layer, layer.weight.data))]
    if layer.use_bias:
        inputs.append(g.const(f"{out}.bias", _host(layer, layer.bias.data)))
    return g.node("Gemm", inputs, out, transB=1)


def _conv2d(g: Graph, layer, x: str, out: str) -> str:
    # weight (K, C, R, S) is ONNX's layout; zero padding on all four sides
    inputs = [x, g.const(f"{out}.weight", _host(layer, layer.weight.data))]
    if layer.use_bias:
        inputs.append(g.const(f"{out}.bias", _host(layer, layer.bias.data)))
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    return g.node("Conv", inputs, out, kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])


def _pool(op: str):
    def convert(g: Graph, layer, x: str, out: str) -> str:
        # no padding, output floored (ceil_mode 0), as hetnet's pooling
        k, s = layer.kernel_size, layer.stride
        return g.node(op, [x], out, kernel_shape=[k, k], strides=[s, s])
    return convert


def _global_avgpool2d(g: Graph, layer, x: str, out: str) -> str:
    # (N, C, H, W) -> (N, C, 1, 1) -> (N, C)
    return g.node("Flatten", [g.node("GlobalAveragePool", [x], f"{out}.pooled")], out, axis=1)


def _flatten(g: Graph, layer, x: str, out: str) -> str:
    return g.node("Flatten", [x], out, axis=1)


def _elementwise(op: str):
    def convert(g: Graph, layer, x: str, out: str) -> str:
        return g.node(op, [x], out)
    return convert


def _softmax(g: Graph, layer, x: str, out: str) -> str:
    return g.node("Softmax", [x], out, axis=-1)


def _batchnorm(g: Graph, layer, x: str, out: str) -> str:
    # eval mode: y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta per channel (axis 1)
    stats = [g.const(f"{out}.{name}", _host(layer, arr)) for name, arr in
             (("weight", layer.gamma), ("bias", layer.bias.data), ("running_mean", layer.running_mean),
              ("running_var", layer.running_var))]
    return g.node("BatchNormalization", [x, *stats], out, epsilon=float(layer.eps))


def _gelu(g: Graph, layer, x: str, out: str) -> str:
    # the exact form: y = x * Phi(x) = x * (1 + erf(x / sqrt 2)) / 2 (opset 17 has Erf; Gelu itself is opset 20)
    e = g.node("Erf", [g.node("Mul", [x, g.const(f"{out}.rsqrt2", np.float32(2 ** -0.5))], f"{out}.scaled")],
               f"{out}.erf")
    phi = g.node("Mul", [g.node("Add", [e, g.const(f"{out}.one", np.float32(1))], f"{out}.1perf"),
                         g.const(f"{out}.half", np.float32(0.5))], f"{out}.phi")
    return g.node("Mul", [x, phi], out)


def _scale(g: Graph, layer, x: str, out: str) -> str:
    return g.node("Mul", [x, g.const(f"{out}.factor", np.float32(layer.factor))], out)


def _identity(g: Graph, layer, x: str, out: str) -> str:
    return x                                        # Dropout in eval mode: no node at all


CONVERTERS = {
    L.Dense: _dense,
    L.Conv2D: _conv2d,
    L.MaxPool2D: _pool("MaxPool"),
    L.AvgPool2D: _pool("AveragePool"),
    L.GlobalAvgPool2D: _global_avgpool2d,
    L.Flatten: _flatten,
    L.ReLU: _elementwise("Relu"),
    L.Sigmoid: _elementwise("Sigmoid"),
    L.Tanh: _elementwise("Tanh"),
    L.Softmax: _softmax,
    L.GELU: _gelu,
    L.Scale: _scale,
    L.BatchNorm1D: _batchnorm,
    L.BatchNorm2D: _batchnorm,
    L.Dropout: _identity,
}


def converter_for(layer):
    """The CONVERTERS entry of the most specific class of `layer` that has one, or None."""
    return next((CONVERTERS[cls] for cls in type(layer).__mro__ if cls in CONVERTERS), None)


def import_onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise UsageError(f"--format onnx: exporting needs the onnx package, which is not installed: "
                         f"{INSTALL_HINT}") from None
    return onnx, helper, numpy_helper


def to_onnx(model, input_shape: tuple, mean=None, std=None, class_names=None, opset: int = OPSET):
    """The onnx.ModelProto of `model` (see the module docstring), checked with onnx.checker (full check)."""
    onnx, helper, numpy_helper = import_onnx()
    if opset < 17:
        raise UsageError(f"opset: expected 17 or later, got {opset}")
    if not getattr(model, "layers", None):
        raise UsageError("export: expected a hetnet Sequential with at least one layer")
    try:
        shape = tuple(int(v) for v in input_shape)
        out_shape = model.output_shape(shape)
    except (TypeError, ValueError) as e:
        raise UsageError(f"input_shape: {input_shape!r} does not fit the model: {e}") from None
    if len(shape) != 3:
        raise UsageError(f"input_shape: expected (C, H, W), got {input_shape!r}")
    c = shape[0]
    g = Graph(helper, numpy_helper)
    x = INPUT_NAME
    if mean is not None or std is not None:
        mean = np.zeros(c) if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
        std = np.ones(c) if std is None else np.asarray(std, dtype=np.float64).reshape(-1)
        if mean.shape != (c,) or std.shape != (c,) or not np.all(std > 0):
            raise UsageError(f"mean/std: expected {c} value(s) each, std > 0; got {mean.tolist()} / {std.tolist()}")
        # (x - mean) / std as x * (1 / std) + (-mean / std), per channel
        scale = g.const("normalize.scale", (1 / std).reshape(1, c, 1, 1))
        shift = g.const("normalize.shift", (-mean / std).reshape(1, c, 1, 1))
        x = g.node("Add", [g.node("Mul", [x, scale], "normalize.scaled"), shift], "normalize")
    last = len(model.layers) - 1
    for i, layer in enumerate(model.layers):
        convert = converter_for(layer)
        if convert is None:
            raise UsageError(f"export: layer {i} ({type(layer).__name__}) has no ONNX converter (known: "
                             f"{', '.join(sorted(cls.__name__ for cls in CONVERTERS))})")
        x = convert(g, layer, x, OUTPUT_NAME if i == last else f"{i}.{type(layer).__name__}")
    if x != OUTPUT_NAME:                            # the last layer made no node of its own (e.g. Dropout)
        g.node("Identity", [x], OUTPUT_NAME)
    graph = helper.make_graph(
        g.nodes, "hetnet",
        [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["N", *out_shape])],
        g.initializers)
    opsets = [helper.make_opsetid("", int(opset))]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="hetnet", producer_version=__version__,
                              doc_string="images: float32 (N, C, H, W) in [0, 1]; normalised inside the graph")
    proto.ir_version = helper.find_min_ir_version_for(opsets)       # the oldest runtimes that know the opset
    meta = {"input_shape": list(shape), "class_names": None if class_names is None else [str(s) for s in class_names],
            "mean": None if mean is None else [float(v) for v in mean],
            "std": None if std is None else [float(v) for v in std]}
    helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items() if v is not None})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path: str | Path, input_shape: tuple, mean=None, std=None,
                class_names=None, opset: int = OPSET) -> Path:
    """Write the ONNX graph of `model` to `path` atomically (see the module docstring); returns the path."""
    proto = to_onnx(model, input_shape, mean, std, class_names, opset)
    path = Path(path)
    try:
        atomic_write_bytes(path, proto.SerializeToString())
    except OSError as e:
        raise UsageError(f"--out: cannot write {path}: {e.strerror or e}") from None
    return path
