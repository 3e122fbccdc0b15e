"""Sequential: layers applied in order, run through their plan (hetnet.plan), with Keras-style fit / evaluate /
predict.

    >>> import hetnet as hn, numpy as np
    >>> m = hn.Sequential([hn.Dense(4, 3), hn.ReLU(), hn.Dense(3, 2)]).to("reference")
    >>> m.forward(np.ones((5, 4))).shape
    (5, 2)
"""
from __future__ import annotations

import numpy as np

from . import losses, train
from .device import get_backend
from .layers import BatchNorm1D, BatchNorm2D, Dropout, Layer, Parameter, ReLU
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
    def to(self, device) -> "Sequential":
        backend = device if not isinstance(device, str) else get_backend(device)
        if backend is not self.backend or self._pack is None:
            params = self.parameters()      # straight into flat buffers on the new backend
            self._pack = FlatPack(params, backend) if params else None
        for layer in self.layers:           # the buffers (BatchNorm's running statistics); parameters are there
            layer.to(backend)
        self.backend = backend
        return self

    def train(self, mode: bool = True) -> "Sequential":
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

    # -- training conveniences (the loops live in hetnet.train)
    def fit(self, x, y, **kwargs) -> list:
        """Train on arrays; see hetnet.train.fit for the options. Returns one metrics record per epoch."""
        return train.fit(self, x, y, **kwargs)

    def evaluate(self, x, y, batch_size: int = 256) -> tuple:
        """(mean loss, accuracy) on arrays, in eval mode."""
        return train.evaluate_arrays(self, x, y, batch_size)
