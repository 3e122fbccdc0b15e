"""The plan: a Sequential compiled into nodes -- the one way hetnet runs a model.

`model.forward` / `model.backward`, the training and evaluation steps of hetnet.train (and so `fit`, `evaluate`,
`hetnet train`, `hetnet evaluate`, `predict`) and the benchmarks all run a model through its plan. A node is one layer,
or a run of layers that a fusion of FUSIONS declares; the patterns are matched by isinstance, and a backend runs the
fusions it lists in its `fusions` attribute (the others as separate nodes). Nodes call only the op contract of
hetnet.backends, so a new fused op costs: one contract entry (backends/__init__.py), its composed definition
(backends/compose.py, which the reference backend runs), a native version where a backend has one, a node and a
line in FUSIONS here, and a row in tests/test_ops.py.

ReLUs. A node whose last op applies a ReLU (`act="relu"`, or a ReLU layer of its own) leaves the ReLU's derivative to
the node after it: that node's backward runs with relu_mask=True (it multiplies its input gradient by input > 0),
Flatten and Dropout pass the property on, and the loss's gradient is masked when the logits are a ReLU output. On the
GPU this folds each ReLU's backward into the next kernel's epilogue. The fused BatchNorm -> ReLU of FUSIONS'
"bn_relu" (BNReluNode) is the exception: its backward recomputes the batch norm's output from its input, which it
reads anyway, and applies the ReLU's derivative itself, so that the next node needs no copy of the ReLU's output.

Hand-overs. A batch norm (-> GELU, or -> ReLU of its own), GELU or convolution -> GELU whose output only a
convolution's forward reads (not as a ReLU output) names that convolution (Node.feeds); on a backend with
`takes_feeds` its forward op gets feeds=(weight shape, stride, padding) and may return the output in a form only that
backend's convolutions read (cuda at bf16: the channels-last bf16 copy the convolution keeps, written by the op
before instead of a float32 output). Backwards, a batch norm (-> GELU or ReLU) right after a convolution (-> max
pool) without bias or ReLU names that node (Node.grad_feeds); its backward op gets grad_feeds=(weight shape, stride,
padding, the convolution's input shape, the pool's (kernel, stride) or None) and may return dE/dx in the form that
node's backward reads (cuda at bf16: the channels-last bf16 copy of its dE/dy, or dE/dy stored in bf16 for a small
convolution's filter gradient). And a convolution (-> max pool)
without act whose output only the batch norm (-> GELU or ReLU of its own) after it reads, not for a ReLU mask, is
told so (Node.to_norm; its forward op gets to_norm=True) and may return the output in a form only that backend's
batch norms read (cuda at bf16: stored in bf16); and a convolution (-> max pool) right after a batch norm (-> GELU or
ReLU of its own) likewise its input gradient (Node.grad_to_norm; its backward op gets grad_to_norm=True).

    >>> import hetnet as hn, numpy as np
    >>> model = hn.Sequential([hn.Conv2D(1, 4, 3, padding=1), hn.ReLU(), hn.MaxPool2D(2), hn.Flatten(),
    ...                        hn.Dense(4 * 4 * 4, 3)]).to("cpu")
    >>> [type(n).__name__ for n in model.plan.nodes_for((1, 8, 8))]
    ['ConvReluPoolNode', 'FlattenNode', 'DenseNode']

Steps: `TrainStep(model, optimizer, schedule, label_smoothing)` and `EvalStep(model)` run one batch with
`step(xb, yb)` and return the sums since the last call with `collect() -> (loss_sum, correct, count)`; the loss and
the count of right answers are accumulated by the backend (`softmax_cross_entropy_into`), so a step makes no host
round trip. How a step runs is the backend's `step_runner` (cuda: captured once per batch shape as a CUDA graph and
replayed, backends/cuda/graph.py) or `EagerRunner` (call it). A step opens the backend's `weight_copies` (where it has
one) around its forward and backward: the copies of the weights its convolutions read are then made in one launch as
the step starts, not one per convolution.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import TrainingDiverged
from .layers import GELU, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from .random import generator

# runs of at least this many Dense layers (ReLUs between) become one dense chain on backends that list "dense_chain"
DENSE_CHAIN_MIN = 2


# --- nodes ---------------------------------------------------------------------------------------------------------


class Node:
    """One stage of a plan. forward(be, x, ctx) -> y keeps what backward needs in self.cache;
    backward(be, dy, need_dx) -> dE/dx (None when not need_dx), accumulating its layers' parameter gradients."""

    pos_out = False        # the output is a ReLU output whose derivative the next node applies (relu_mask)
    mask_input = False     # set by the plan: the input is such an output, so backward returns dx * (x > 0)
    passes_pos = False     # the output is a ReLU output exactly when the input is (Flatten, Dropout)
    fresh_output = False   # forward's output is a new array its cache does not hold (a consumer may overwrite it)
    inplace = False        # set by the plan: backward may write dx over its input (nothing reads it afterwards)
    feeds = None           # set by the plan: the Conv2D whose forward alone reads the output (_feeds)
    grad_feeds = None      # set by the plan: the convolution node whose output the input is, whose backward reads dx
    x_shape = None         # the input's shape in the last forward (a grad_feeds node's, for _feeds)
    to_norm = False        # set by the plan: the output's one reader is the batch norm after it (_to_norm)
    grad_to_norm = False   # set by the plan: dE/dx's one reader is the batch norm's backward before it (_to_norm)
    writes_grads = False   # has an `accumulate` switch (False: write its gradients instead of adding to them)

    def __init__(self, *layers):
        self.layers = layers
        self.params = {f"{i}.{k}": p for i, layer in enumerate(layers) for k, p in layer.params.items()}
        self.cache = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.layers))})"


def _wb(layer, grad: bool = False):
    """(weight, bias or None) of a Conv2D / Dense: their data, or where their gradients go (layer.grad_targets:
    None for a frozen parameter, whose gradient the op skips)."""
    if grad:
        return layer.grad_targets()
    return layer.weight.data, layer.bias.data if layer.use_bias else None


class ConvNode(Node):
    """Conv2D, with the ReLU after it when act == "relu" (applied in the convolution's epilogue)."""

    fresh_output = True

    def __init__(self, conv, act=None):
        super().__init__(conv)
        self.act, self.pos_out = act, act == "relu"

    def forward(self, be, x, ctx):
        c = self.layers[0]
        y, self.cache = be.conv2d_forward(x, *_wb(c), c.stride, c.padding, act=self.act, relu_mask=self.mask_input,
                                          **_to_norm(self, be))
        return y

    def backward(self, be, dy, need_dx):
        return be.conv2d_backward(dy, self.cache, *_wb(self.layers[0], True), need_dx=need_dx,
                                  relu_mask=self.mask_input, **_to_norm(self, be, grad=True))


class DenseNode(Node):
    """Dense, with the ReLU after it when act == "relu"."""

    fresh_output = True

    def __init__(self, dense, act=None):
        super().__init__(dense)
        self.act, self.pos_out = act, act == "relu"

    def forward(self, be, x, ctx):
        y, self.cache = be.dense_forward(x, *_wb(self.layers[0]), act=self.act)
        return y

    def backward(self, be, dy, need_dx):
        return be.dense_backward(dy, self.cache, *_wb(self.layers[0], True), need_dx=need_dx,
                                 relu_mask=self.mask_input)


def _bn_args(bn):
    return (bn.gamma, bn.bias.data, bn.running_mean, bn.running_var, bn.momentum, bn.eps, bn.training)


def _feeds(node, be, grad: bool = False) -> dict:
    """{"feeds": (weight shape, stride, padding)} of the Conv2D that alone reads the node's output (the op contract's
    hand-over: the backend may give it the output in the form its convolutions read), on a backend that takes it
    (`takes_feeds`); else no argument. grad: {"grad_feeds": (weight shape, stride, padding, input shape, pool)} of the
    convolution node (a Conv2D, or Conv2D -> MaxPool2D: pool = (kernel, stride), else None) whose output the node's
    input is, for the node's backward (the backward hand-over: dx in the form that node's backward reads)."""
    if not getattr(be, "takes_feeds", False):
        return {}
    if grad:
        prev = node.grad_feeds
        if prev is None:
            return {}
        conv = prev.layers[0]
        pool = (prev.layers[1].kernel_size, prev.layers[1].stride) if isinstance(prev, ConvPoolNode) else None
        return {"grad_feeds": (tuple(conv.weight.shape), conv.stride, conv.padding, prev.x_shape, pool)}
    conv = node.feeds
    if conv is None:
        return {}
    return {"feeds": (tuple(conv.weight.shape), conv.stride, conv.padding)}


def _to_norm(node, be, grad: bool = False) -> dict:
    """{"to_norm": True} for a convolution node whose output only the batch norm after it reads (Node.to_norm), on
    a backend that takes hand-overs (`takes_feeds`); else no argument. grad: {"grad_to_norm": True} for a
    convolution node right after a batch norm (Node.grad_to_norm), for its backward."""
    if not getattr(be, "takes_feeds", False):
        return {}
    if grad:
        return {"grad_to_norm": True} if node.grad_to_norm else {}
    return {"to_norm": True} if node.to_norm else {}


def _bn_sync(bn) -> dict:
    """{"reduce": f} for a synchronised BatchNorm (hetnet.parallel sets the layer's `sync_stats` to a function that
    sums an array over the processes, see batchnorm_forward in hetnet.backends), else no argument."""
    reduce = getattr(bn, "sync_stats", None)
    return {} if reduce is None else {"reduce": reduce}


class BatchNormNode(Node):
    """BatchNorm1D / BatchNorm2D, with the ReLU after it when act == "relu"."""

    fresh_output = True

    def __init__(self, bn, act=None):
        super().__init__(bn)
        self.act, self.pos_out = act, act == "relu"

    def forward(self, be, x, ctx):
        bn = self.layers[0]
        y, self.cache = be.batchnorm_forward(x, *_bn_args(bn), act=self.act, **_bn_sync(bn), **_feeds(self, be))
        return y

    def backward(self, be, dy, need_dx):
        return be.batchnorm_backward(dy, self.cache, *self.layers[0].grad_targets(), need_dx=need_dx,
                                     relu_mask=self.mask_input, **_feeds(self, be, grad=True))


class BNGeluNode(Node):
    """BatchNorm1D / BatchNorm2D -> GELU as one fused op (bn_gelu_*): the GELU's derivative is its own."""

    fresh_output = True
    op = "bn_gelu"

    def __init__(self, bn, act):
        super().__init__(bn, act)

    def forward(self, be, x, ctx):
        bn = self.layers[0]
        y, self.cache = getattr(be, self.op + "_forward")(x, *_bn_args(bn), **_bn_sync(bn), **_feeds(self, be))
        return y

    def backward(self, be, dy, need_dx):
        return getattr(be, self.op + "_backward")(dy, self.cache, *self.layers[0].grad_targets(), need_dx=need_dx,
                                                  relu_mask=self.mask_input, inplace=self.inplace,
                                                  **_feeds(self, be, grad=True))


class BNReluNode(BNGeluNode):
    """BatchNorm1D / BatchNorm2D -> ReLU as one fused op (bn_relu_*) that owns the ReLU's derivative: its output is
    no ReLU output to the next node (which then keeps no input for a mask, and may take a hand-over)."""

    op = "bn_relu"


class GeluNode(Node):
    """GELU (gelu_forward / gelu_backward), whose output it may hand over to a convolution (_feeds); the ReLU mask of
    its input when that is a ReLU output."""

    def forward(self, be, x, ctx):
        y, self.cache = be.gelu_forward(x, **_feeds(self, be))
        return y

    def backward(self, be, dy, need_dx):
        dx = be.gelu_backward(dy, self.cache)         # the cache is x
        return be.relu_mask(dx, self.cache) if self.mask_input else dx


class ConvGeluNode(Node):
    """Conv2D -> GELU as one fused op (conv2d_gelu_*), whose output it may hand over to a convolution (_feeds)."""

    fresh_output = True

    def __init__(self, conv, gelu):
        super().__init__(conv, gelu)

    def forward(self, be, x, ctx):
        c = self.layers[0]
        y, self.cache = be.conv2d_gelu_forward(x, *_wb(c), c.stride, c.padding, relu_mask=self.mask_input,
                                               **_feeds(self, be))
        return y

    def backward(self, be, dy, need_dx):
        return be.conv2d_gelu_backward(dy, self.cache, *_wb(self.layers[0], True), need_dx=need_dx,
                                       relu_mask=self.mask_input)


class ConvReluPoolNode(Node):
    """Conv2D -> ReLU -> MaxPool2D as one fused op (conv2d_relu_maxpool_*)."""

    def __init__(self, conv, relu, pool):
        super().__init__(conv, relu, pool)

    def forward(self, be, x, ctx):
        c, _, pool = self.layers
        y, self.cache = be.conv2d_relu_maxpool_forward(x, *_wb(c), c.stride, c.padding, pool.kernel_size,
                                                       pool.stride)
        return y

    def backward(self, be, dy, need_dx):
        return be.conv2d_relu_maxpool_backward(dy, self.cache, *_wb(self.layers[0], True), need_dx=need_dx,
                                               relu_mask=self.mask_input)


class ConvPoolNode(Node):
    """Conv2D -> MaxPool2D as one fused op (conv2d_maxpool_*)."""

    def __init__(self, conv, pool):
        super().__init__(conv, pool)

    def forward(self, be, x, ctx):
        c, pool = self.layers
        y, self.cache = be.conv2d_maxpool_forward(x, *_wb(c), c.stride, c.padding, pool.kernel_size, pool.stride,
                                                  relu_mask=self.mask_input, **_to_norm(self, be))
        return y

    def backward(self, be, dy, need_dx):
        return be.conv2d_maxpool_backward(dy, self.cache, *_wb(self.layers[0], True), need_dx=need_dx,
                                          relu_mask=self.mask_input, **_to_norm(self, be, grad=True))


class BNReluPoolNode(Node):
    """BatchNorm2D -> ReLU -> MaxPool2D as one fused op (bn_relu_maxpool_*)."""

    def __init__(self, bn, relu, pool):
        super().__init__(bn, relu, pool)

    def forward(self, be, x, ctx):
        bn, _, pool = self.layers
        y, self.cache = be.bn_relu_maxpool_forward(x, *_bn_args(bn), pool.kernel_size, pool.stride, **_bn_sync(bn))
        return y

    def backward(self, be, dy, need_dx):
        return be.bn_relu_maxpool_backward(dy, self.cache, *self.layers[0].grad_targets(), need_dx=need_dx,
                                           relu_mask=self.mask_input, inplace=self.inplace)


class DenseChainNode(Node):
    """Dense layers, each followed by a ReLU or not, as one op (dense_chain_*): the chain owns its ReLUs."""

    writes_grads = True

    def __init__(self, denses, relus):
        super().__init__(*denses)
        self.relus = relus
        self.accumulate = True

    def forward(self, be, x, ctx):
        y, self.cache = be.dense_chain_forward(x, [(*_wb(d), r) for d, r in zip(self.layers, self.relus)])
        return y

    def backward(self, be, dy, need_dx):
        return be.dense_chain_backward(dy, self.cache, [_wb(d, True) for d in self.layers], need_dx=need_dx,
                                       relu_mask=self.mask_input, accumulate=self.accumulate)


class MaxPoolNode(Node):
    def forward(self, be, x, ctx):
        pool = self.layers[0]
        y, self.cache = be.maxpool2d_forward(x, pool.kernel_size, pool.stride)
        return y

    def backward(self, be, dy, need_dx):
        return be.maxpool2d_backward(dy, self.cache, relu_mask=self.mask_input)


class ReluNode(Node):
    """A ReLU no node before it took in: forward only; its derivative is the next node's relu_mask (a ReLU of a
    ReLU output changes nothing, so it passes the mask on rather than applying one)."""

    pos_out = fresh_output = True

    def forward(self, be, x, ctx):
        return be.relu_forward(x)[0]

    def backward(self, be, dy, need_dx):
        return dy


class FlattenNode(Node):
    """(N, C, H, W) -> (N, C*H*W), a view."""

    passes_pos = True

    def forward(self, be, x, ctx):
        self.cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, be, dy, need_dx):
        return dy.reshape(self.cache)


class DropoutNode(Node):
    """Dropout with its seed from the step context (ctx.seed(slot), drawn in node order as Dropout.forward draws
    it); the identity in eval mode or with p = 0. y > 0 exactly where x > 0 and the element is kept, so the ReLU
    mask of the node after covers a ReLU before."""

    passes_pos = True

    def __init__(self, layer, slot: int):
        super().__init__(layer)
        self.slot = slot

    def forward(self, be, x, ctx):
        d = self.layers[0]
        if not d.training or d.p == 0.0:
            self.cache = None
            return x
        seed = ctx.seed(self.slot) if ctx is not None else int(generator().integers(0, 2**32))
        y, self.cache = be.dropout_forward(x, d.p, seed)
        return y

    def backward(self, be, dy, need_dx):
        return dy if self.cache is None else be.dropout_backward(dy, self.cache)


class LayerNode(Node):
    """Any other layer: its own forward / backward (which call the backend's ops), then the ReLU mask if needed."""

    def forward(self, be, x, ctx):
        self.cache = x if self.mask_input else None     # the mask's x
        return self.layers[0].forward(x)

    def backward(self, be, dy, need_dx):
        dx = self.layers[0].backward(dy)
        return be.relu_mask(dx, self.cache) if self.mask_input else dx


# --- the fusions, declared once ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fusion:
    """A run of layers matched by isinstance (`pattern`, one class or tuple of classes per layer) that `build` turns
    into one node; `accepts` may refuse a match on the layers' settings."""

    name: str
    pattern: tuple
    build: Callable
    accepts: Callable = lambda layers: True


_BN = (BatchNorm1D, BatchNorm2D)
FUSIONS: tuple[Fusion, ...] = (
    Fusion("conv_relu_pool", (Conv2D, ReLU, MaxPool2D), lambda ls: ConvReluPoolNode(*ls)),
    Fusion("bn_relu_pool", (BatchNorm2D, ReLU, MaxPool2D), lambda ls: BNReluPoolNode(*ls)),
    Fusion("conv_pool", (Conv2D, MaxPool2D), lambda ls: ConvPoolNode(*ls)),
    Fusion("conv_gelu", (Conv2D, GELU), lambda ls: ConvGeluNode(*ls)),
    Fusion("conv_act", (Conv2D, ReLU), lambda ls: ConvNode(ls[0], "relu")),
    Fusion("dense_act", (Dense, ReLU), lambda ls: DenseNode(ls[0], "relu")),
    Fusion("bn_act", (_BN, ReLU), lambda ls: BatchNormNode(ls[0], "relu")),
    Fusion("bn_relu", (_BN, ReLU), lambda ls: BNReluNode(*ls)),          # where bn_act is not run
    Fusion("bn_gelu", (_BN, GELU), lambda ls: BNGeluNode(*ls)),
)
FUSION_NAMES = frozenset(f.name for f in FUSIONS) | {"dense_chain"}

# one layer on its own
SINGLE: tuple[tuple[type, Callable], ...] = (
    (Conv2D, ConvNode), (Dense, DenseNode), (_BN, BatchNormNode), (MaxPool2D, MaxPoolNode), (ReLU, ReluNode),
    (Flatten, FlattenNode), (GELU, GeluNode),
)


def _dense_chain_at(layers, i) -> tuple[list, list]:
    """The Dense layers (and whether a ReLU follows each) of the run Dense [ReLU] Dense [ReLU] ... at layers[i:]."""
    denses, relus = [], []
    while i < len(layers) and isinstance(layers[i], Dense):
        relu = i + 1 < len(layers) and isinstance(layers[i + 1], ReLU)
        denses.append(layers[i])
        relus.append(relu)
        i += 2 if relu else 1
    return denses, relus


def compile_nodes(layers, fusions=FUSION_NAMES) -> list[Node]:
    """The node list for a list of layers, using the fusions named in `fusions`; then each node's ReLU-mask and
    in-place flags (see the module docstring)."""
    nodes, i, n_dropout = [], 0, 0
    while i < len(layers):
        if "dense_chain" in fusions:
            denses, relus = _dense_chain_at(layers, i)
            if len(denses) >= DENSE_CHAIN_MIN:
                nodes.append(DenseChainNode(denses, relus))
                i += len(denses) + sum(relus)
                continue
        for f in FUSIONS:
            run = layers[i:i + len(f.pattern)]
            if (f.name in fusions and len(run) == len(f.pattern)
                    and all(isinstance(layer, cls) for layer, cls in zip(run, f.pattern)) and f.accepts(run)):
                nodes.append(f.build(run))
                i += len(run)
                break
        else:
            layer = layers[i]
            if isinstance(layer, Dropout):
                nodes.append(DropoutNode(layer, n_dropout))
                n_dropout += 1
            else:
                make = next((node for cls, node in SINGLE if isinstance(layer, cls)), LayerNode)
                nodes.append(make(layer))
            i += 1
    pos = False
    for i, node in enumerate(nodes):
        if node.passes_pos:
            node.pos_out = pos
        elif not isinstance(node, ReluNode):
            node.mask_input = pos
        pos = node.pos_out
        # a fused BN -> ReLU -> pool or BN -> GELU may write its gradient over its input when that is a fresh output
        # of the node before, which nothing else reads (never the batch itself); not when it must also mask by that
        # input
        node.inplace = i > 0 and nodes[i - 1].fresh_output and not node.mask_input
    # a batch norm (-> GELU or own ReLU), GELU or convolution -> GELU whose output only a convolution's forward
    # reads, and not as a ReLU output: it may hand the output over in the convolution's own form (_feeds)
    for node, nxt in zip(nodes, nodes[1:]):
        if (isinstance(node, (BatchNormNode, BNGeluNode, GeluNode, ConvGeluNode)) and not node.pos_out
                and isinstance(nxt, (ConvNode, ConvPoolNode)) and not nxt.mask_input):
            node.feeds = nxt.layers[0]
    # and backwards: a batch norm (-> GELU or own ReLU) after a convolution (-> max pool) without bias or ReLU,
    # whose output only it reads, may hand its input gradient over in the form that node's backward reads
    for prev, node in zip(nodes, nodes[1:]):
        if (isinstance(node, (BatchNormNode, BNGeluNode)) and not node.mask_input
                and (isinstance(prev, ConvPoolNode) or (isinstance(prev, ConvNode) and prev.act is None))
                and not prev.layers[0].use_bias):
            node.grad_feeds = prev
    # and a convolution (-> max pool) without act whose output only the batch norm after it reads (not for a ReLU
    # mask): it may hand the output over in the form that backend's batch norms read (_to_norm)
    for prev, node in zip(nodes, nodes[1:]):
        if (isinstance(node, (BatchNormNode, BNGeluNode)) and not node.mask_input
                and (isinstance(prev, ConvPoolNode) or (isinstance(prev, ConvNode) and prev.act is None))):
            prev.to_norm = True
    # and backwards, a convolution (-> max pool) right after a batch norm: its input gradient's one reader is that
    # batch norm's backward
    for prev, node in zip(nodes, nodes[1:]):
        if isinstance(prev, (BatchNormNode, BNGeluNode)) and isinstance(node, (ConvNode, ConvPoolNode)):
            node.grad_to_norm = True
    return nodes


def first_trainable(nodes) -> int:
    """Index of the first node with a parameter that trains (requires_grad; len(nodes) if none): where a backward
    whose d(input) is not wanted stops (the nodes before it would only produce d(input) and frozen gradients)."""
    return next((i for i, node in enumerate(nodes) if any(p.requires_grad for p in node.params.values())),
                len(nodes))


class Plan:
    """A model's nodes per input shape and backend; forward / backward through them.

        >>> plan = model.plan                                       # doctest: +SKIP
        >>> y = plan.forward(x); dx = plan.backward(dy)             # doctest: +SKIP
    """

    def __init__(self, model, fuse: bool = True):
        self.model, self.fuse = model, fuse
        self._nodes: dict = {}      # (per-sample input shape, backend name, precision) -> node list
        self.nodes: list = []       # those of the last forward
        self.input_shape = None     # the per-sample shape of the last forward

    def nodes_for(self, input_shape) -> list[Node]:
        """The nodes for a per-sample input shape (no batch axis) on the model's backend; ValueError naming the
        first layer the shape does not fit."""
        be = self.model.backend
        key = (tuple(input_shape), be.name, getattr(be, "precision", "fp32"))
        nodes = self._nodes.get(key)
        if nodes is None:
            self.model.output_shape(tuple(input_shape))
            fusions = getattr(be, "fusions", frozenset()) if self.fuse else frozenset()
            nodes = self._nodes[key] = compile_nodes(list(self.model.layers), fusions)
        return nodes

    def logits_pos(self, nodes) -> bool:
        """Whether the last node's output is a ReLU output whose derivative nobody applied yet."""
        return bool(nodes) and nodes[-1].pos_out

    def forward(self, x, ctx=None, keep: bool = True):
        """The model's output for a batch; keep=False drops each node's cache as soon as the node has run (no
        backward follows: evaluation)."""
        be = self.model.backend
        nodes = self.nodes = self.nodes_for(x.shape[1:])
        self.input_shape = tuple(x.shape[1:])
        for node in nodes:
            node.layers[0].check_batch(x)
            node.x_shape = tuple(x.shape)
            x = node.forward(be, x, ctx)
            if not keep:
                node.cache = None
        self.output = x if keep else None
        return x

    def backward(self, dy, need_dx: bool = True, keep: bool = True, after_node: Callable | None = None):
        """dy = dE/d(output) back through the nodes of the last forward, accumulating parameter gradients; returns
        dE/d(input), or None when need_dx is False (then the backward stops at the first node with parameters).
        keep=False frees each node's cache as soon as its backward has run (a training step: the memory is reused
        by the rest of the backward); with keep the backward may run again. after_node(i) runs after node i's
        backward, when the gradients of its parameters are complete (a data-parallel step starts reducing them
        there, hetnet.parallel)."""
        be, nodes = self.model.backend, self.nodes
        if nodes and nodes[-1].pos_out:          # the model ends in a ReLU nobody took the derivative of
            dy = be.relu_mask(dy.copy(), self.output)
        first = 0 if need_dx else first_trainable(nodes)
        for i in range(len(nodes) - 1, first - 1, -1):
            dy = nodes[i].backward(be, dy, need_dx or i > first)
            if not keep:
                nodes[i].cache = None
            if after_node is not None:
                after_node(i)
        if not keep:
            for node in nodes[:first]:
                node.cache = None
            self.output = None
        return dy if need_dx else None


# --- steps -------------------------------------------------------------------------------------------------------


class EagerRunner:
    """How a step runs where the backend has no step_runner: it is called, and its ops take the optimiser's values
    and the dropout seeds as plain numbers (`scalars` is None: the update reads the optimiser's own attributes).

    A runner is also the step's context for its nodes: `seed(slot)` is the seed of dropout node `slot`."""

    scalars = None

    def __init__(self, backend, n_scalars: int, n_seeds: int):
        self.backend = backend
        self._seeds: list = []

    def set_scalars(self, values, seeds) -> None:
        """This step's optimiser values (the layout of Optimizer.scalars()) and one seed per dropout node."""
        self._seeds = seeds

    def reset(self) -> None:
        """Forget what was prepared for the step (a replaying runner drops its captured graphs); nothing here."""

    def seed(self, slot: int):
        return self._seeds[slot]

    def run(self, fn, x, y) -> None:
        fn(x, y)

    def read(self, *arrays) -> list:
        """Host copies of arrays the steps run so far wrote."""
        return [self.backend.to_numpy(a) for a in arrays]

    def read_and_reset(self, *arrays) -> list:
        out = self.read(*arrays)
        for a in arrays:
            a[...] = 0
        return out


def _runner(backend, n_scalars: int, n_seeds: int):
    make = getattr(backend, "step_runner", None)
    return make(n_scalars, n_seeds) if make is not None else EagerRunner(backend, n_scalars, n_seeds)


_warned: set = set()


def _say_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"note: {message}", file=sys.stderr)


class EvalStep:
    """Loss and correct predictions of batches without an update (the model in eval mode): step(xb, yb), then
    collect() -> (loss_sum, correct, count) since the last collect. While `predictions` is a list, each step also
    appends (predicted class, true class) of its batch, as host arrays (the confusion matrix of the evaluation)."""

    training = False

    def __init__(self, model, plan: Plan | None = None):
        self.model, self.backend = model, model.backend
        self.plan = plan if plan is not None else model.plan
        self.dropouts = [layer for layer in model.layers if isinstance(layer, Dropout)]    # DropoutNode slots
        self.runner = _runner(self.backend, self.n_scalars(), len(self.dropouts))
        self.loss_sum = self.backend.zeros((1,), np.float64)
        self.correct = self.backend.zeros((1,), np.int64)
        self.count = 0
        self.predictions: list | None = None
        self._out: dict = {}       # batch shape -> (logits, labels) of its last _run (a replayed graph's buffers)
        self._copies: dict = {}    # the backend's weight_copies store for this step's model

    def _weight_copies(self):
        """The backend's weight_copies scope for the model's parameters (op contract, optional), or none."""
        scope = getattr(self.backend, "weight_copies", None)
        if scope is None:
            return contextlib.nullcontext()
        return scope(self._copies, [p.data for p in self.model.parameters()])

    def n_scalars(self) -> int:
        return 0

    def _run(self, x, y) -> None:
        with self._weight_copies():
            logits = self.plan.forward(x, self.runner, keep=False)
        self.backend.softmax_cross_entropy_into(logits, y, None, self.loss_sum, self.correct)
        self._out[tuple(x.shape)] = (logits, y)

    def _draw_seeds(self) -> list:
        """A seed per dropout node, drawn (in node order) by those that draw one this step, as Dropout.forward
        would draw it; 0 for the others."""
        return [int(generator().integers(0, 2**32)) if d.training and d.p > 0 else 0 for d in self.dropouts]

    def step(self, xb, yb) -> None:
        self.runner.set_scalars([], self._draw_seeds())
        self.runner.run(self._run, xb, yb)
        self.count += int(xb.shape[0])
        if self.predictions is not None:
            logits, labels = self.runner.read(*self._out[tuple(xb.shape)])
            self.predictions.append((np.argmax(logits, axis=1).astype(np.int64), labels.astype(np.int64)))

    def collect(self) -> tuple[float, int, int]:
        loss, correct = self.runner.read_and_reset(self.loss_sum, self.correct)
        out = (float(loss[0]), int(correct[0]), self.count)
        self.count = 0
        return out


class TrainStep(EvalStep):
    """One optimisation step per batch: forward, loss, backward, the optimiser's update, the schedule's step.

    Gradients are zeroed first, except those a node writes instead of adding to (a dense chain whose parameters
    are the optimiser's and its alone: one memset less per step). An optimiser whose update is not its own
    `update()` (see hetnet.optim) runs its step() after the step, outside a captured graph, and says so once.

    A replayed step repeats the launches it was captured with. Before each batch the step compares what those
    depend on besides the scalars -- the optimiser's signature() (which parameters train, hyperparameters other than
    the learning rates) and the arrays the backward writes each parameter's gradient into (Parameter.grad_target:
    freezing or unfreezing a parameter changes it) -- with the last batch's, and on a change resets the runner:
    the next batch runs eagerly and is captured again (airbench freezes its whitening bias after a few epochs).

    reducer: None (one process), or a data-parallel job's gradient reduction (hetnet.parallel.GradReducer): the
    step calls `reducer.step_started()` before each step (outside a captured graph), `reducer.begin(nodes)` before
    the backward, `reducer.after_node(i)` after each node's backward and `reducer.finish()` before the update, which
    then sees the gradient averaged over the processes."""

    training = True
    written_grads = True    # False: zero every gradient first (tests and A/B timings of the shortcut)

    def __init__(self, model, optimizer, schedule=None, label_smoothing: float = 0.0, plan: Plan | None = None,
                 reducer=None):
        self.optimizer, self.schedule, self.reducer = optimizer, schedule, reducer
        self.label_smoothing = float(label_smoothing)
        self.fused = optimizer.fused
        if not self.fused:
            _say_once(f"{type(optimizer).__name__} has no update() of its own: its step() runs after each "
                      f"forward and backward, outside the captured step")
        super().__init__(model, plan)
        self._written: dict = {}    # id(node list) -> (node list, nodes that write their gradients, params to zero)
        self._params = model.parameters()
        self._layout = self._launch_layout()

    def _launch_layout(self) -> tuple:
        """What the step's launches depend on besides the scalars (see the class docstring)."""
        opt = self.optimizer.signature() if self.fused else None
        return opt, tuple(id(p.grad_target()) for p in self._params)

    def n_scalars(self) -> int:
        return self.optimizer.n_scalars if self.fused else 0

    def _written_nodes(self, nodes) -> tuple[list, list]:
        """(nodes that may write their gradients, the optimiser's parameters whose gradients must still be zeroed):
        a node may when every one of its parameters is the optimiser's and used by no other node (nor twice)."""
        if not self.written_grads:
            return [], self.optimizer.params
        entry = self._written.get(id(nodes))
        if entry is None:
            ids = [id(p) for nd in nodes for p in nd.params.values()]
            mine = {id(p) for p in self.optimizer.params}
            written = [nd for nd in nodes if nd.writes_grads and nd.params
                       and all(id(p) in mine and ids.count(id(p)) == 1 for p in nd.params.values())]
            done = {id(p) for nd in written for p in nd.params.values()}
            entry = self._written[id(nodes)] = (nodes, written, [p for p in self.optimizer.params
                                                                 if id(p) not in done])
        return entry[1], entry[2]

    def _run(self, x, y) -> None:
        be, opt, reducer = self.backend, self.optimizer, self.reducer
        with self._weight_copies():          # (closed before the update writes the weights)
            logits = self.plan.forward(x, self.runner)
            dlogits = be.xp.empty_like(logits)
            be.softmax_cross_entropy_into(logits, y, dlogits, self.loss_sum, self.correct, self.label_smoothing)
            written, zero = self._written_nodes(self.plan.nodes)
            if len(zero) == len(opt.params):
                opt.zero_grad()
            else:
                for p in zero:
                    p.zero_grad()
            for nd in written:
                nd.accumulate = False
            if reducer is not None:
                reducer.begin(self.plan.nodes)
            try:
                self.plan.backward(dlogits, need_dx=False, keep=False,
                                   after_node=None if reducer is None else reducer.after_node)
            finally:
                for nd in written:
                    nd.accumulate = True
        if reducer is not None:
            reducer.finish()
        if self.fused:
            opt.update(self.runner.scalars)

    def step(self, xb, yb) -> None:
        opt = self.optimizer
        if self.reducer is not None:
            self.reducer.step_started()
        layout = self._launch_layout()
        if layout != self._layout:
            self._layout = layout
            reset = getattr(self.runner, "reset", None)
            if reset is not None:
                reset()
        self.runner.set_scalars(opt.scalars() if self.fused else [], self._draw_seeds())
        self.runner.run(self._run, xb, yb)
        if self.fused:
            opt.count_step()
        else:
            opt.step()
        if self.schedule is not None:
            self.schedule.step()
        self.count += int(xb.shape[0])

    def collect(self) -> tuple[float, int, int]:
        out = super().collect()
        if not np.isfinite(out[0]):
            raise TrainingDiverged(f"the training loss became {out[0]}")
        return out
