"""The cpu backend's step objects (hetnet.train's `make_train_step` / `make_eval_step`): the model run as a plan in
which every Conv2D -> ReLU -> MaxPool2D(2) is one fused op (`cpu.conv2d_relu_maxpool_*`, compiled, one image at a
time), so the full-size convolution output and the ReLU's output never go through memory, and every
BatchNorm2D -> ReLU -> MaxPool2D(2) likewise (`cpu.bn_relu_maxpool_*`: the statistics, then one pass). Every other
layer runs its own forward / backward. Outputs are bit-identical to the layer-by-layer model, and so are the
gradients but for the fused batch norm's, whose float64 sums run in another order (float32 rounding apart;
tests/test_cpu_step.py); the public `model.forward` / `model.backward` are unchanged.

Measured (benchmarks/cpu_step.py, thesis-m1 at batch 32, 2 threads): see benchmarks/README-cpu.md, v13.
"""
from __future__ import annotations

from ..layers.base import backward_chain
from . import cpu


class _FusedConvReluPool:
    """Conv2D -> ReLU -> MaxPool2D(2, stride 2) as one op; gradients go to the Conv2D's parameters."""

    def __init__(self, conv):
        self.conv = conv
        self.params = conv.params       # the Conv2D's (backward_chain stops at the first node with parameters)
        self.cache = None
        self.need_dx = True

    def forward(self, x):
        c = self.conv
        y, self.cache = cpu.conv2d_relu_maxpool_forward(x, c.weight.data, c.bias.data if c.use_bias else None,
                                                        c.stride, c.padding)
        return y

    def backward(self, dy):
        c = self.conv
        dx = cpu.conv2d_relu_maxpool_backward(dy, self.cache, c.weight.grad, c.bias.grad if c.use_bias else None,
                                              need_dx=self.need_dx)
        self.cache = None
        return dx


class _FusedBNReluPool:
    """BatchNorm2D -> ReLU -> MaxPool2D(2, stride 2) as one op; gradients go to the BatchNorm's parameters, and in
    training mode its running statistics are updated as its own forward does."""

    def __init__(self, bn):
        self.bn = bn
        self.params = bn.params
        self.cache = None
        self.need_dx = True

    def forward(self, x):
        bn = self.bn
        bn._check_input(x)
        y, self.cache = cpu.bn_relu_maxpool_forward(x, bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var,
                                                    bn.momentum, bn.eps, bn.training)
        return y

    def backward(self, dy):
        bn = self.bn
        dx = cpu.bn_relu_maxpool_backward(dy, self.cache, bn.weight.grad, bn.bias.grad, need_dx=self.need_dx)
        self.cache = None
        return dx


def _relu_pool2(layers, i) -> bool:
    """Whether layers[i:i + 2] are ReLU, MaxPool2D(kernel 2, stride 2)."""
    return (i + 1 < len(layers) and type(layers[i]).__name__ == "ReLU" and type(layers[i + 1]).__name__ == "MaxPool2D"
            and layers[i + 1].kernel_size == 2 and layers[i + 1].stride == 2)


def plan_nodes(layers, input_shape) -> list:
    """The node list for one per-sample input shape: a _FusedConvReluPool for each Conv2D -> ReLU -> MaxPool2D with
    kernel 2 and stride 2 whose conv output is at least 2x2, a _FusedBNReluPool for each such BatchNorm2D -> ReLU ->
    MaxPool2D, the layer itself otherwise."""
    nodes, shape, i = [], tuple(input_shape), 0
    while i < len(layers):
        layer = layers[i]
        out = layer.output_shape(shape)
        kind = type(layer).__name__
        fused = None
        if kind in ("Conv2D", "BatchNorm2D") and _relu_pool2(layers, i + 1) and out[1] >= 2 and out[2] >= 2:
            if kind == "Conv2D" and cpu.conv_relu_maxpool_available():
                fused = _FusedConvReluPool(layer)
            elif kind == "BatchNorm2D" and cpu.bn_relu_maxpool_available():
                fused = _FusedBNReluPool(layer)
        if fused is not None:
            nodes.append(fused)
            shape = layers[i + 2].output_shape(layers[i + 1].output_shape(out))
            i += 3
            continue
        nodes.append(layer)
        shape = out
        i += 1
    return nodes


class FusedPlan:
    """forward / backward of a Sequential with its Conv2D -> ReLU -> MaxPool2D(2) runs fused (see module docstring).
    Looks like the model to hetnet.train's TrainStep / EvalStep (attributes backend, forward, backward)."""

    def __init__(self, model):
        self.model, self.backend = model, model.backend
        self.plans: dict = {}       # per-sample input shape -> node list
        self.nodes: list = []       # those of the last forward

    def forward(self, x):
        shape = tuple(x.shape[1:])
        nodes = self.plans.get(shape)
        if nodes is None:
            self.model.output_shape(shape)          # ValueError naming the first layer that does not fit
            nodes = self.plans[shape] = plan_nodes(list(self.model.layers), shape)
        self.nodes = nodes
        for node in nodes:
            x = node.forward(x)
        return x

    def backward(self, dy, need_dx: bool = True):
        return backward_chain(self.nodes, dy, need_dx)


def make_train_step(model, optimizer, schedule=None, label_smoothing: float = 0.0):
    from ..train import TrainStep

    return TrainStep(FusedPlan(model), optimizer, schedule, label_smoothing)


def make_eval_step(model):
    from ..train import EvalStep

    return EvalStep(FusedPlan(model))
