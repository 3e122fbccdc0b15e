"""The cpu backend's step objects (hetnet.train's `make_train_step` / `make_eval_step`): the model run as a plan in
which every Conv2D -> ReLU -> MaxPool2D(2) is one fused op (`cpu.conv2d_relu_maxpool_*`, compiled, one image at a
time), so the full-size convolution output and the ReLU's output never go through memory, and every
BatchNorm2D -> ReLU -> MaxPool2D(2) likewise (`cpu.bn_relu_maxpool_*`: the statistics, then one pass), and every
run of Dense layers with only ReLUs between is one op that keeps the activations feature-major (`cpu.dense_chain_*`,
the GEMM orientation OpenBLAS runs fastest at short batches). Every other layer runs its own forward / backward.
The conv fusion's outputs and gradients are bit-identical to the layer-by-layer model's; the fused batch norm's
gradients (float64 sums in another order) and the dense chains' outputs and gradients (GEMMs in another orientation,
float64 bias sums) are float32 rounding apart (tests/test_cpu_step.py). The public `model.forward` /
`model.backward` are unchanged.

Measured (benchmarks/cpu_step.py, thesis-m1 at batch 32, 2 threads): see benchmarks/README-cpu.md, v13.
"""
from __future__ import annotations

from ..layers.base import backward_chain
from ..train import EvalStep, TrainStep
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
        dx = cpu.conv2d_relu_maxpool_backward(dy, self.cache, *c.grad_targets(), need_dx=self.need_dx)
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
        y, self.cache = cpu.bn_relu_maxpool_forward(x, bn.gamma, bn.bias.data, bn.running_mean, bn.running_var,
                                                    bn.momentum, bn.eps, bn.training)
        return y

    def backward(self, dy):
        bn = self.bn
        dx = cpu.bn_relu_maxpool_backward(dy, self.cache, *bn.grad_targets(), need_dx=self.need_dx)
        self.cache = None
        return dx


def _relu_pool2(layers, i) -> bool:
    """Whether layers[i:i + 2] are ReLU, MaxPool2D(kernel 2, stride 2)."""
    return (i + 1 < len(layers) and type(layers[i]).__name__ == "ReLU" and type(layers[i + 1]).__name__ == "MaxPool2D"
            and layers[i + 1].kernel_size == 2 and layers[i + 1].stride == 2)


class _DenseChain:
    """Dense layers, each followed by a ReLU or not, one after the other, as one op that keeps the activations
    feature-major (`cpu.dense_chain_*`); gradients go to the Dense layers' parameters. accumulate=False (set by
    CpuTrainStep when it knows they are zero) writes them instead of adding to them."""

    def __init__(self, denses, relus):
        self.denses = denses
        self.params = {f"{i}.{k}": p for i, d in enumerate(denses) for k, p in d.params.items()}
        self.relus = relus
        self.cache = None
        self.need_dx = True
        self.accumulate = True

    def forward(self, x):
        self.denses[0]._check_input(x)
        layers = [(d.weight.data, d.bias.data if d.use_bias else None, r) for d, r in zip(self.denses, self.relus)]
        y, self.cache = cpu.dense_chain_forward(x, layers)
        return y

    def backward(self, dy):
        grads = [d.grad_targets() for d in self.denses]
        dx = cpu.dense_chain_backward(dy, self.cache, grads, need_dx=self.need_dx, accumulate=self.accumulate)
        self.cache = None
        return dx


# runs of at least this many Dense layers become a _DenseChain (0: never; tests and A/B timings switch it)
DENSE_CHAIN_MIN = 2


def _dense_chain_at(layers, i) -> tuple[list, list]:
    """The Dense layers (and whether a ReLU follows each) of the run Dense [ReLU] Dense [ReLU] ... at layers[i:],
    those whose float32 weights and gradients are C-contiguous (so sgemm can read and write them)."""
    denses, relus = [], []
    while i < len(layers) and type(layers[i]).__name__ == "Dense":
        d = layers[i]
        arrays = [d.weight.data, d.weight.grad] + ([d.bias.data, d.bias.grad] if d.use_bias else [])
        if not all(a.flags.c_contiguous and a.dtype == cpu.dtype for a in arrays):
            break
        relu = i + 1 < len(layers) and type(layers[i + 1]).__name__ == "ReLU"
        denses.append(d)
        relus.append(relu)
        i += 2 if relu else 1
    return denses, relus


def plan_nodes(layers, input_shape) -> list:
    """The node list for one per-sample input shape: a _FusedConvReluPool for each Conv2D -> ReLU -> MaxPool2D with
    kernel 2 and stride 2 whose conv output is at least 2x2, a _FusedBNReluPool for each such BatchNorm2D -> ReLU ->
    MaxPool2D, a _DenseChain for each run of DENSE_CHAIN_MIN or more Dense layers with only ReLUs between, the layer
    itself otherwise."""
    nodes, shape, i = [], tuple(input_shape), 0
    while i < len(layers):
        layer = layers[i]
        out = layer.output_shape(shape)
        kind = type(layer).__name__
        if kind == "Dense" and DENSE_CHAIN_MIN and cpu.dense_chain_available():
            denses, relus = _dense_chain_at(layers, i)
            if len(denses) >= DENSE_CHAIN_MIN:
                nodes.append(_DenseChain(denses, relus))
                shape = (denses[-1].out_features,)
                i += len(denses) + sum(relus)
                continue
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


def _written_nodes(nodes, optimizer) -> tuple[list, list]:
    """(nodes that may write their gradients instead of adding to them, the optimiser's parameters whose gradients
    must still be zeroed). A node may when it has an `accumulate` switch and every one of its parameters is the
    optimiser's (whose zero_grad would have zeroed it) and is used by no other node (nor twice by it)."""
    ids = [id(p) for nd in nodes for p in getattr(nd, "params", {}).values()]
    mine = {id(p) for p in optimizer.params}
    written = [nd for nd in nodes if hasattr(nd, "accumulate")
               and all(id(p) in mine and ids.count(id(p)) == 1 for p in nd.params.values())]
    done = {id(p) for nd in written for p in nd.params.values()}
    return written, [p for p in optimizer.params if id(p) not in done]


class CpuTrainStep(TrainStep):
    """hetnet.train.TrainStep on a FusedPlan, which zeroes only the gradients its backward will not write: nodes
    whose gradients are the optimiser's and theirs alone (_written_nodes) write them (GEMMs with beta = 0, PyTorch's
    set_to_none idea) instead of adding to a zeroed buffer (mlp: a 2 MiB memset per step less). The public
    model.backward still adds to .grad. After a TrainingDiverged those gradients hold the step before's values."""

    overwrite = True    # False: zero every gradient first, as TrainStep does (tests and A/B timings)

    def __init__(self, plan, optimizer, schedule=None, label_smoothing: float = 0.0):
        super().__init__(plan, optimizer, schedule, label_smoothing)
        self._written: dict = {}    # id(a plan's node list) -> (that list, _written_nodes(it, optimizer))

    def _zero_grad(self) -> None:
        if not self.overwrite:
            super()._zero_grad()

    def _backward(self, dlogits) -> None:
        if not self.overwrite:
            return super()._backward(dlogits)
        nodes = self.model.nodes
        if id(nodes) not in self._written:
            self._written[id(nodes)] = (nodes, _written_nodes(nodes, self.optimizer))
        written, zero = self._written[id(nodes)][1]
        if len(zero) == len(self.optimizer.params):
            self.optimizer.zero_grad()
        else:
            for p in zero:
                p.zero_grad()
        for nd in written:
            nd.accumulate = False
        try:
            self.model.backward(dlogits, need_dx=False)
        finally:
            for nd in written:
                nd.accumulate = True


def make_train_step(model, optimizer, schedule=None, label_smoothing: float = 0.0):
    return CpuTrainStep(FusedPlan(model), optimizer, schedule, label_smoothing)


def make_eval_step(model):
    return EvalStep(FusedPlan(model))
