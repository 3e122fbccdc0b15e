"""PyTorch interop for tests and benchmarks: the same model in torch, with the same weights.

torch is optional and imported only here, inside the functions.

    >>> import hetnet as hn
    >>> from hetnet.interop import to_torch
    >>> tm = to_torch(hn.Sequential([hn.Flatten(), hn.Dense(4, 2)]))        # doctest: +SKIP
"""
from __future__ import annotations

import numpy as np

from .model import Sequential

_SCALE_MODULE = None


def _scale_module():
    """torch Module y = factor * x (hetnet.Scale), defined once on first use (torch is optional)."""
    global _SCALE_MODULE
    if _SCALE_MODULE is None:
        from torch import nn

        class Scale(nn.Module):
            def __init__(self, factor: float):
                super().__init__()
                self.factor = factor

            def forward(self, x):
                return x * self.factor

            def extra_repr(self) -> str:
                return f"factor={self.factor}"

        _SCALE_MODULE = Scale
    return _SCALE_MODULE


def to_torch(model: Sequential, device: str = "cpu", dtype=None):
    """A torch.nn.Sequential computing the same function as `model`, weights and BN statistics copied, in the same
    train/eval mode, with the same parameters frozen (requires_grad False). Dropout is mapped to torch Dropout (its
    masks differ from hetnet's); GELU to nn.GELU() (the erf form); Scale to a Module x * factor; a BatchNorm with
    scale "frozen" to nn.BatchNorm with weight.requires_grad False (airbench's), with scale "none" to the same with
    its weight fixed at 1 (hetnet has no array for it: state and gradient maps leave it out)."""
    import torch
    from torch import nn

    dtype = dtype or torch.float32
    mods = []
    for layer in model.layers:
        t = type(layer).__name__
        if t == "Dense":
            m = nn.Linear(layer.in_features, layer.out_features, bias=layer.use_bias)
        elif t == "Conv2D":
            m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, bias=layer.use_bias)
        elif t == "MaxPool2D":
            m = nn.MaxPool2d(layer.kernel_size, layer.stride)
        elif t == "AvgPool2D":
            m = nn.AvgPool2d(layer.kernel_size, layer.stride)
        elif t == "GlobalAvgPool2D":
            m = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif t == "Flatten":
            m = nn.Flatten()
        elif t in ("ReLU", "Sigmoid", "Tanh", "GELU"):
            m = getattr(nn, t)()
        elif t == "Scale":
            m = _scale_module()(layer.factor)
        elif t == "Softmax":
            m = nn.Softmax(dim=1)
        elif t in ("BatchNorm1D", "BatchNorm2D"):
            cls = nn.BatchNorm1d if t == "BatchNorm1D" else nn.BatchNorm2d
            m = cls(layer.num_features, eps=layer.eps, momentum=layer.momentum)
            if layer.scale == "none":
                m.weight.requires_grad_(False)
                m.hetnet_constant_weight = True     # gamma = 1 for good: not in hetnet's state (_torch_arrays)
        elif t == "Dropout":
            m = nn.Dropout(layer.p)
        else:
            raise TypeError(f"to_torch: no torch equivalent for {t}")
        for name, p in layer.params.items():
            if not p.requires_grad:
                getattr(m, name).requires_grad_(False)
        mods.append(m)
    tmodel = nn.Sequential(*mods)
    copy_weights_to_torch(model, tmodel)
    tmodel.train(model.training)
    return tmodel.to(device=device, dtype=dtype)


def _torch_arrays(tmodel):
    """torch parameters/buffers in hetnet's state_dict order and naming ('<layer>.<name>')."""
    out = {}
    for i, m in enumerate(tmodel):
        if getattr(m, "weight", None) is not None and not getattr(m, "hetnet_constant_weight", False):
            out[f"{i}.weight"] = m.weight
        if hasattr(m, "bias") and m.bias is not None:
            out[f"{i}.bias"] = m.bias
        if getattr(m, "running_mean", None) is not None:
            out[f"{i}.running_mean"] = m.running_mean
            out[f"{i}.running_var"] = m.running_var
    return out


def copy_weights_to_torch(model: Sequential, tmodel) -> None:
    import torch

    state = model.state_dict()
    with torch.no_grad():
        for k, t in _torch_arrays(tmodel).items():
            t.copy_(torch.from_numpy(np.ascontiguousarray(state[k])).to(t.dtype))


def torch_state(tmodel) -> dict:
    """torch weights as NumPy arrays under hetnet's state_dict names."""
    return {k: t.detach().cpu().double().numpy() for k, t in _torch_arrays(tmodel).items()}


def torch_grads(tmodel) -> dict:
    """torch parameter gradients as NumPy arrays under hetnet's names ('<layer>.weight' / '.bias'); frozen
    parameters (no gradient) are left out."""
    out = {}
    for k, t in _torch_arrays(tmodel).items():
        if isinstance(t, torch_parameter_type()) and t.grad is not None:
            out[k] = t.grad.detach().cpu().double().numpy()
    return out


def torch_parameter_type():
    import torch

    return torch.nn.Parameter


def torch_optimizer(name: str, tmodel, **hyper):
    """torch.optim.SGD / Adam / AdamW with hetnet's hyperparameter names."""
    import torch

    cls = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[name]
    return cls(tmodel.parameters(), **hyper)
