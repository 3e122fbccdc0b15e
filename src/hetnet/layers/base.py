"""Parameter, Layer and FlatPack: the device-independent part of every layer (Sequential is hetnet.model).

A layer owns its parameters, their gradients and the cache its forward pass leaves for backward. The arithmetic is
the backend's (`self.backend.<op>_forward / _backward`); layers never branch on the device.

    >>> import hetnet as hn
    >>> model = hn.Sequential([hn.Flatten(), hn.Dense(784, 10)]).to("cpu")
    >>> [p.data.shape for p in model.parameters()]
    [(10, 784), (10,)]
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..device import get_backend
from ..init import initial_weight


class Parameter:
    """A trainable array and its gradient (same shape). Assigning to `.data` copies into the existing storage.

    `requires_grad = False` freezes it, as in PyTorch: the layer's backward still computes its input gradient but
    leaves this parameter's `.grad` at zero (the op skips that gradient where it can, see `grad_target`), and
    `model.parameters()` still lists it.

        >>> import hetnet as hn
        >>> conv = hn.Conv2D(3, 24, 2)
        >>> conv.weight.requires_grad = False          # trained bias, fixed weight
    """

    def __init__(self, data: np.ndarray, backend=None, requires_grad: bool = True):
        self.backend = backend or get_backend("cpu")
        self._data = self.backend.asarray(np.asarray(data))
        self._grad = self.backend.zeros(self._data.shape)
        self._pack = None  # the FlatPack whose buffers hold data and grad, if any
        self.requires_grad = requires_grad

    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self._requires_grad = bool(value)

    def grad_target(self):
        """The array a backward op adds dE/d(this parameter) into: `.grad` while it trains; None while frozen (the
        ops skip that gradient, so `.grad` stays zero)."""
        return self._grad if self._requires_grad else None

    @property
    def shape(self) -> tuple:
        return tuple(self._data.shape)

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value) -> None:
        value = _host(value)
        if tuple(value.shape) != self.shape:
            raise ValueError(f"cannot assign an array of shape {tuple(value.shape)} "
                             f"to a parameter of shape {self.shape}")
        self._data[...] = self.backend.asarray(value)

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value) -> None:
        value = _host(value)
        if tuple(value.shape) != self.shape:
            raise ValueError(f"cannot assign a gradient of shape {tuple(value.shape)} "
                             f"to a parameter of shape {self.shape}")
        self._grad[...] = self.backend.asarray(value)

    def zero_grad(self) -> None:
        self._grad[...] = 0

    def to(self, backend) -> None:
        """Move to another backend (a fresh, unshared storage)."""
        if backend is self.backend:
            return
        data, grad = self.backend.to_numpy(self._data), self.backend.to_numpy(self._grad)
        self.backend = backend
        self._data, self._grad = backend.asarray(data), backend.asarray(grad)
        self._pack = None
        self.requires_grad = self._requires_grad      # a sink on the new backend

    def _bind(self, data, grad, backend) -> None:
        """Use views of a flat buffer on `backend` as storage (see FlatPack); values are copied over, from
        whichever backend holds them now."""
        if backend is self.backend:          # a repack on the same device: no trip through the host
            data[...] = self._data
            grad[...] = self._grad
        else:
            data[...] = backend.asarray(self.backend.to_numpy(self._data))
            grad[...] = backend.asarray(self.backend.to_numpy(self._grad))
        moved = backend is not self.backend
        self.backend, self._data, self._grad = backend, data, grad
        if moved:
            self.requires_grad = self._requires_grad  # a sink on the new backend

    def __repr__(self) -> str:
        frozen = "" if self._requires_grad else ", requires_grad=False"
        return f"Parameter(shape={self.shape}, device={self.backend.name}{frozen})"


def _host(value):
    """A NumPy view of value (CuPy arrays are copied to the host)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "get"):
        return value.get()
    return np.asarray(value)


class FlatPack:
    """All parameters of a model in one flat data buffer and one flat gradient buffer; each Parameter holds views.

    One buffer each lets an optimiser update every parameter in one call (one kernel launch on the GPU) and prepares
    an all-reduce of the gradients. The parameters' values are copied in from whichever backend holds them, so a
    model moving to a device goes straight into its flat buffers there (no second, per-parameter copy on the device).
    """

    def __init__(self, params: list[Parameter], backend):
        self.params = params
        self.backend = backend
        total = sum(int(np.prod(p.shape)) for p in params)
        self.data = backend.zeros((total,))
        self.grad = backend.zeros((total,))
        for p, data, grad in zip(params, self.views(self.data), self.views(self.grad)):
            p._bind(data, grad, backend)
            p._pack = self

    def views(self, flat) -> list:
        """Per-parameter views (each parameter's shape) of a flat buffer laid out like `data`."""
        out, offset = [], 0
        for p in self.params:
            n = int(np.prod(p.shape))
            out.append(flat[offset:offset + n].reshape(p.shape))
            offset += n
        return out


class Layer:
    """Base class. Subclasses set `self.params` (name -> Parameter) and `self.buffers` (name -> array) and implement
    `forward`, `backward` and `output_shape`."""

    def __init__(self):
        self.backend = get_backend("cpu")
        self.training = True
        self.params: OrderedDict[str, Parameter] = OrderedDict()
        self.buffers: OrderedDict[str, object] = OrderedDict()
        self.cache = None

    # -- parameters as attributes: layer.weight, layer.bias, layer.running_mean ...
    def __getattr__(self, name):
        d = self.__dict__
        if "params" in d and name in d["params"]:
            return d["params"][name]
        if "buffers" in d and name in d["buffers"]:
            return d["buffers"][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name, value):
        d = self.__dict__
        if "buffers" in d and name in d["buffers"]:
            d["buffers"][name][...] = self.backend.asarray(_host(value))
        else:
            object.__setattr__(self, name, value)

    # -- device and mode
    def to(self, device, precision: str | None = None) -> Layer:
        """Move parameters and buffers to a device ('reference', 'cpu', 'cuda', 'cuda:N'), computing in `precision`
        ('fp32' default, 'tf32', 'bf16': see hetnet.device); returns self."""
        backend = device if not isinstance(device, str) else get_backend(device, precision)
        if backend is not self.backend:
            for p in self.params.values():
                p.to(backend)
            for k, v in list(self.buffers.items()):
                self.buffers[k] = backend.asarray(self.backend.to_numpy(v))
            self.backend = backend
            self.cache = None
        return self

    @property
    def device(self) -> str:
        return self.backend.name

    def train(self, mode: bool = True) -> Layer:
        self.training = mode
        return self

    def eval(self) -> Layer:
        return self.train(False)

    def parameters(self) -> list[Parameter]:
        return list(self.params.values())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def named_arrays(self, prefix: str = ""):
        """(name, array) for parameters then buffers, names like 'weight', 'running_mean'."""
        for k, p in self.params.items():
            yield prefix + k, p.data
        for k, v in self.buffers.items():
            yield prefix + k, v

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        return OrderedDict((k, self.backend.to_numpy(v).copy()) for k, v in self.named_arrays())

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        _load_state(self, state, strict)

    # -- shapes
    def output_shape(self, input_shape: tuple) -> tuple:
        """Per-sample output shape for a per-sample input shape (no batch axis); ValueError naming the layer if the
        input does not fit. Shape-preserving layers keep the default."""
        return tuple(input_shape)

    def check_batch(self, x) -> None:
        """Checks of a batch that its shape alone cannot tell (run by the forward pass, the plan's included);
        ValueError naming the layer. None by default."""

    def _check_input(self, x) -> None:
        """Validate a batch against output_shape (raises ValueError naming the layer)."""
        if x.ndim < 1:
            raise ValueError(f"{self!r}: expected a batched input, got a scalar")
        self.output_shape(tuple(x.shape[1:]))

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_kind(self) -> str | None:
        """'he' / 'glorot' for layers with weights initialised by hetnet.init, None otherwise."""
        return None

    def _state_loaded(self) -> None:
        """Called after load_state_dict has filled this layer's arrays."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WeightedLayer(Layer):
    """A layer with a weight (out, ...) and an optional bias (out,): Dense and Conv2D. Subclasses set `op`
    (backend ops `<op>_forward(x, w, b, *op_args())` / `<op>_backward`) and call `_make_parameters`."""

    op = ""

    def _make_parameters(self, weight_shape: tuple, bias: bool) -> None:
        self.use_bias = bool(bias)
        self.params["weight"] = Parameter(np.zeros(weight_shape), self.backend)
        if self.use_bias:
            self.params["bias"] = Parameter(np.zeros(weight_shape[0]), self.backend)
        self.reset_parameters("glorot")

    def _init_kind(self) -> str:
        return "glorot"

    def reset_parameters(self, kind: str) -> None:
        """Weight from hetnet.init ('he' or 'glorot'), bias zero."""
        self.weight.data = initial_weight(self.weight.shape, kind)
        if self.use_bias:
            self.bias.data = np.zeros(self.bias.shape)

    def op_args(self) -> tuple:
        return ()

    def grad_targets(self) -> tuple:
        """(dw, db) for the backward op: the parameters' .grad, or None for a frozen one (the op skips that
        gradient, see Parameter.grad_target) or an absent bias."""
        return self.weight.grad_target(), self.bias.grad_target() if self.use_bias else None

    def forward(self, x):
        self._check_input(x)
        bias = self.bias.data if self.use_bias else None
        y, self.cache = getattr(self.backend, f"{self.op}_forward")(x, self.weight.data, bias, *self.op_args())
        return y

    def backward(self, dy):
        dw, db = self.grad_targets()
        return getattr(self.backend, f"{self.op}_backward")(dy, self.cache, dw, db)


def _load_state(module, state: dict, strict: bool) -> None:
    own = dict(module.named_arrays())
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise ValueError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
    for k, arr in own.items():
        if k not in state:
            continue
        value = _host(state[k])
        if tuple(value.shape) != tuple(arr.shape):
            raise ValueError(f"state_dict entry {k!r}: expected shape {tuple(arr.shape)}, got {tuple(value.shape)}")
        arr[...] = module.backend.asarray(value)
    for layer in getattr(module, "layers", (module,)):
        layer._state_loaded()
