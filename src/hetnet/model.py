"""Sequential: layers applied in order, run through their plan (hetnet.plan), with Keras-style fit / evaluate /
predict.

    >>> import hetnet as hn, numpy as np
    >>> m = hn.Sequential([hn.Dense(4, 3), hn.ReLU(), hn.Dense(3, 2)]).to("reference")
    >>> m.forward(np.ones((5, 4))).shape
    (5, 2)
"""
from __future__ import annotations

import inspect

import numpy as np

from . import export, losses, train
from .device import get_backend
from .errors import UsageError
from .layers import LAYER_TYPES, BatchNorm1D, BatchNorm2D, Dropout, Layer, Parameter, ReLU
from .layers.base import FlatPack
from .plan import Plan

# layers that may stand between a Dense / Conv2D and its ReLU without changing its initialisation
_TRANSPARENT_FOR_INIT = (BatchNorm1D, BatchNorm2D, Dropout)


class Sequential(Layer):
    """Layers applied in order. Dense/Conv2D layers followed by ReLU (BatchNorm and Dropout in between allowed) are
    re-initialised He-normal, as in the thesis; others keep Glorot. forward / backward run the model's plan, where
    the fusions its backend supports are single ops (hetnet.plan)."""

    def __init__(self, layers: list[Layer]):
        super().__init__()
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is {type(layer).__name__}, not a hetnet layer")
        self._reinit_for_relu()
        self._pack: FlatPack | None = None
        self.plan = Plan(self)

    def _reinit_for_relu(self) -> None:
        for i, layer in enumerate(self.layers):
            if layer._init_kind() is None:
                continue
            nxt = next((lyr for lyr in self.layers[i + 1:] if not isinstance(lyr, _TRANSPARENT_FOR_INIT)), None)
            if isinstance(nxt, ReLU):
                layer.reset_parameters("he")

    # -- device, mode, parameters
    def to(self, device, precision: str | None = None) -> Sequential:
        """Move to a device ('reference', 'cpu', 'cuda', 'cuda:N') and a precision ('fp32' default, 'tf32', 'bf16':
        tensor-core matrix products on the cuda backend, see hetnet.device); returns self.

            >>> model = hn.zoo.build("fashion-cnn").to("cuda", precision="bf16")        # doctest: +SKIP
        """
        backend = device if not isinstance(device, str) else get_backend(device, precision)
        if backend is not self.backend or self._pack is None:
            params = self.parameters()      # straight into flat buffers on the new backend
            self._pack = FlatPack(params, backend) if params else None
        for layer in self.layers:           # the buffers (BatchNorm's running statistics); parameters are there
            layer.to(backend)
        self.backend = backend
        return self

    def train(self, mode: bool = True) -> Sequential:
        self.training = mode
        for layer in self.layers:
            layer.train(mode)
        return self

    def parameters(self) -> list[Parameter]:
        return [p for layer in self.layers for p in layer.parameters()]

    def zero_grad(self) -> None:
        if self._pack is not None and self._pack.backend is self.backend:
            self._pack.grad[...] = 0
        else:
            super().zero_grad()

    def named_arrays(self, prefix: str = ""):
        for i, layer in enumerate(self.layers):
            yield from layer.named_arrays(f"{prefix}{i}.")

    # -- shapes
    def output_shape(self, input_shape: tuple) -> tuple:
        shape = tuple(input_shape)
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape

    # -- passes
    def forward(self, x):
        """The output for a batch x (N, ...) on the model's device; ValueError naming the first layer whose input
        shape does not fit."""
        return self.plan.forward(x)

    def backward(self, dy, need_dx: bool = True):
        """Backpropagate dy = dE/d(output of the last forward), adding into every Parameter's .grad; returns
        dE/d(input) (None with need_dx=False)."""
        return self.plan.backward(dy, need_dx)

    def predict(self, x, batch_size: int = 256):
        """Class probabilities for a batch (eval mode, softmax of the logits), as a NumPy array."""
        was_training = self.training
        self.eval()
        try:
            out = []
            for i in range(0, x.shape[0], batch_size):
                logits = self.plan.forward(x[i:i + batch_size], keep=False)
                out.append(self.backend.to_numpy(losses.softmax(logits)))
        finally:
            self.train(was_training)
        return np.concatenate(out) if out else np.zeros((0,))

    def __repr__(self) -> str:
        inner = ",\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    @property
    def input_shape(self) -> tuple | None:
        """The per-sample shape (C, H, W) the model last ran on, or None."""
        return self.plan.input_shape

    def spec(self, input_shape: tuple) -> dict:
        """The JSON spec (hetnet.zoo's format) that rebuilds this architecture; input_shape is (C, H, W)."""
        return spec_of(self, input_shape)

    def export_onnx(self, path, input_shape: tuple, mean=None, std=None, class_names=None):
        """Write an ONNX graph of this model in eval mode (hetnet.export): input `images` float32 (N, C, H, W) in
        [0, 1], normalised inside the graph with mean/std; output `logits`. Returns the path."""
        return export.export_onnx(self, path, input_shape, mean=mean, std=std, class_names=class_names)

    # -- training conveniences (the loops live in hetnet.train)
    def fit(self, x, y, **kwargs) -> list:
        """Train on arrays; see hetnet.train.fit for the options. Returns one metrics record per epoch."""
        return train.fit(self, x, y, **kwargs)

    def evaluate(self, x, y, batch_size: int = 256) -> tuple:
        """(mean loss, accuracy) on arrays, in eval mode."""
        return train.evaluate_arrays(self, x, y, batch_size)


def spec_of(model, input_shape) -> dict:
    """The JSON spec {"input_shape": [C, H, W], "layers": [...]} that rebuilds `model`'s architecture exactly
    (weights are not part of a spec). Every constructor argument is written out, read from the layer's attribute
    of the same name (`use_<name>` first, for a flag such as Dense's `bias`). UsageError for anything a spec cannot
    hold: an empty model, a layer type hetnet does not know, input shapes that do not chain.

        >>> model = hn.Sequential([hn.Flatten(), hn.Dense(784, 10)])
        >>> model.spec((1, 28, 28))["layers"][1]
        {'type': 'Dense', 'in_features': 784, 'out_features': 10, 'bias': True}
    """
    if not model.layers:
        raise UsageError("spec: the model has no layers")
    shape = _input_shape(input_shape)
    layers = []
    for i, layer in enumerate(model.layers):
        kind = type(layer).__name__
        if LAYER_TYPES.get(kind) is not type(layer):
            raise UsageError(f"spec: layer {i} is a {kind}, not one of hetnet's layer types "
                             f"({', '.join(sorted(LAYER_TYPES))}); a spec cannot rebuild it")
        entry = {"type": kind}
        for name, param in inspect.signature(type(layer).__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            attr = f"use_{name}" if hasattr(layer, f"use_{name}") else name   # Dense.bias is the Parameter
            if not hasattr(layer, attr):
                raise UsageError(f"spec: layer {i} ({kind}) keeps no attribute for its argument {name!r}")
            entry[name] = _json_value(getattr(layer, attr))
        layers.append(entry)
    try:
        model.output_shape(shape)
    except ValueError as e:
        raise UsageError(f"spec: input_shape {list(shape)} does not fit the model: {e}") from None
    return {"input_shape": list(shape), "layers": layers}


def _input_shape(input_shape) -> tuple:
    try:
        shape = tuple(int(v) for v in input_shape)
        ok = len(shape) == 3 and all(v > 0 and v == w for v, w in zip(shape, input_shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"input_shape: expected (C, H, W), three positive integers, got {input_shape!r}")
    return shape


def _json_value(v):
    """A layer attribute as JSON: Python ints, floats, bools (NumPy scalars converted)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, (tuple, list)):
        return [_json_value(x) for x in v]
    raise UsageError(f"spec: cannot write {v!r} ({type(v).__name__}) as JSON")
