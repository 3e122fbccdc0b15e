"""The fast training step of the cuda backend: a fused plan of the model, captured once as a CUDA graph.

`CudaBackend.make_train_step(model, optimizer, schedule, label_smoothing)` returns a `GraphTrainStep`:

- The model's layers are compiled into a plan with the element-wise work fused into the producing kernels:
  bias + ReLU in the convolution / dense / batch-norm epilogue, and each ReLU's backward folded into the data
  gradient of the next convolution, dense layer or max pooling (a tensor is marked `pos` when it is a ReLU output,
  possibly reshaped or passed through dropout, so the consumer masks its input gradient where the tensor is <= 0).
- Loss + gradient are one kernel that also adds the loss and the correct count to device accumulators; the
  optimiser is one launch over the flat parameter buffer; gradients are zeroed with one memset.
- The first batch of each shape runs eagerly (this also measures the convolution algorithms), then the same plan is
  captured into a CUDA graph and replayed for every later batch of that shape. The learning rate, the first-step
  flag, Adam's bias corrections and the dropout seeds are read by the kernels from a small device buffer uploaded
  before each replay, so the schedule and hetnet's random generator behave as in eager mode.
- Memory: the eager steps and the graphs run in the backend's private step pool (`CudaBackend.step_pool`), which
  every train and eval step object of the device shares, so it grows to the largest working set among them, not
  to their sum. Max pooling keeps its output and argmax bytes, not its input (the backward reads the ReLU mask from
  the pooled output), so a convolution's full-size output is freed right after the pooling; BatchNorm -> ReLU ->
  MaxPool writes its dE/dx over its input, which nothing reads afterwards (`inplace`); an evaluation plan drops each
  node's cache as soon as the node has run; im2col's column buffers may fill the room under the eager step's
  high-water mark while a graph is captured (conv._chunks).

No host synchronisation happens in `step`; `collect()` reads the accumulators once (and raises TrainingDiverged
when the loss sum is not finite). HETNET_CUDA_GRAPH=0 (or use_graph=False) runs the same plan without capture.
"""
from __future__ import annotations

import re

import numpy as np

from ...errors import DeviceError, TrainingDiverged
from ...layers.base import first_with_params
from ...random import generator
from . import conv as _conv

HP_SLOTS = 4          # lr, first step, lr / bc1, 1 / bc2 (optim.cu)
RING = 64             # pinned host slots for the per-step parameters


class _Node:
    """One fused stage of the plan. fwd(x) -> y; bwd(dy) -> dx (None when not needed)."""

    pos_out = False       # the output is a ReLU output (see module docstring)
    mask_input = False    # the input is `pos`: this node's bwd must zero dx where x <= 0


class _ConvNode(_Node):
    def __init__(self, be, layer, act, dense):
        self.be, self.layer, self.act, self.dense = be, layer, act, dense
        self.pos_out = act == 1

    def fwd(self, x, ctx):
        lyr, be = self.layer, self.be
        b = lyr.bias.data if lyr.use_bias else None
        self.x = x
        if self.dense:
            return _conv.dense_forward(be, x, lyr.weight.data, b, self.act)
        return _conv.conv_forward(be, x, lyr.weight.data, b, lyr.stride, lyr.padding, self.act)

    def bwd(self, dy, need_dx, ctx):
        lyr, be = self.layer, self.be
        dw, db = lyr.grad_targets()
        relu_x = self.x if self.mask_input else None
        if self.dense:
            dx = _conv.dense_backward(be, dy, self.x, lyr.weight.data, dw, db, need_dx, relu_x)
        else:
            dx = _conv.conv_backward(be, dy, self.x, lyr.weight.data, dw, db, lyr.stride, lyr.padding, need_dx,
                                     relu_x)
        self.x = None
        return dx


class _BNNode(_Node):
    def __init__(self, be, layer, act):
        self.be, self.layer, self.act = be, layer, act
        self.pos_out = act == 1

    def fwd(self, x, ctx):
        lyr = self.layer
        y, self.cache = self.be.batchnorm_forward(x, lyr.gamma, lyr.bias.data, lyr.running_mean,
                                                  lyr.running_var, lyr.momentum, lyr.eps, lyr.training, self.act)
        return y

    def bwd(self, dy, need_dx, ctx):
        # with act, the ReLU's backward was applied by the consumer (pos_out), so dy is already masked
        dx = self.be.batchnorm_backward(dy, self.cache, *self.layer.grad_targets())
        self.cache = None
        return _mask(self.be, dx, ctx, self) if need_dx else None


class _BNPoolNode(_Node):
    """BatchNorm2D -> ReLU -> MaxPool2D in one forward kernel (after the statistics) and two backward kernels."""

    inplace = False       # write dx over x (set by compile_plan)

    def __init__(self, be, bn, pool):
        self.be, self.layer, self.pool = be, bn, pool

    def fwd(self, x, ctx):
        lyr = self.layer
        y, self.cache = self.be.bn_relu_maxpool_forward(x, lyr.gamma, lyr.bias.data, lyr.running_mean,
                                                        lyr.running_var, lyr.momentum, lyr.eps, lyr.training,
                                                        self.pool.kernel_size, self.pool.stride)
        return y

    def bwd(self, dy, need_dx, ctx):
        dx = self.be.bn_relu_maxpool_backward(dy, self.cache, *self.layer.grad_targets(), inplace=self.inplace)
        self.cache = None
        return _mask(self.be, dx, ctx, self) if need_dx else None


class _MaxPoolNode(_Node):
    """Keeps (x's shape, y, argmax), not x: the backward takes the ReLU mask from y (maxpool2d_backward_pooled)."""

    def __init__(self, be, layer):
        self.be, self.layer = be, layer

    def fwd(self, x, ctx):
        y, (_, arg, _, _) = self.be.maxpool2d_forward(x, self.layer.kernel_size, self.layer.stride)
        self.cache = (x.shape, y, arg)
        return y

    def bwd(self, dy, need_dx, ctx):
        shape, y, arg = self.cache
        dx = self.be.maxpool2d_backward_pooled(dy, y, arg, shape, self.layer.kernel_size, self.layer.stride,
                                               relu_mask=self.mask_input)
        self.cache = None
        return dx


class _ReshapeNode(_Node):
    """Flatten (a view) or an identity (dropout in eval mode); passes the `pos` property through."""

    def __init__(self, layer, flatten=True):
        self.layer, self.flatten = layer, flatten

    def fwd(self, x, ctx):
        self.shape = x.shape
        return x.reshape(x.shape[0], -1) if self.flatten else x

    def bwd(self, dy, need_dx, ctx):
        return dy.reshape(self.shape)


class _ReluNode(_Node):
    """A ReLU that no producer absorbed: forward only; its backward is the consumer's mask (identity here)."""
    pos_out = True

    def __init__(self, be):
        self.be = be

    def fwd(self, x, ctx):
        y, _ = self.be.relu_forward(x)
        return y

    def bwd(self, dy, need_dx, ctx):
        return dy


class _DropoutNode(_Node):
    """Dropout with its seed in device memory (slot `slot` of the per-step parameters). Passes `pos` through:
    y > 0 exactly where x > 0 and the element is kept, so the consumer's mask covers the ReLU before it."""

    def __init__(self, be, layer, slot):
        self.be, self.layer, self.slot = be, layer, slot

    def fwd(self, x, ctx):
        y, self.cache = self.be.dropout_forward(x, self.layer.p, 0, seed_ptr=ctx["seeds"][self.slot:self.slot + 1])
        return y

    def bwd(self, dy, need_dx, ctx):
        dx = self.be.dropout_backward(dy, self.cache)
        self.cache = None
        return dx


class _LayerNode(_Node):
    """Any other layer: its own forward/backward (the backend's generic ops), then the input mask if needed."""

    def __init__(self, be, layer):
        self.be, self.layer = be, layer

    def fwd(self, x, ctx):
        return self.layer.forward(x)

    def bwd(self, dy, need_dx, ctx):
        return _mask(self.be, self.layer.backward(dy), ctx, self) if need_dx else None


def _mask(be, dx, ctx, node):
    if node.mask_input and dx is not None:
        be.launch("conv", "relu_mask_inplace", dx.size, dx, node.input_ref(), np.int64(dx.size))
    return dx


def compile_plan(be, model):
    """The fused node list for a Sequential (see module docstring); (nodes, number of dropout seeds)."""
    layers = list(model.layers)
    nodes, seeds, i = [], 0, 0
    while i < len(layers):
        lyr = layers[i]
        t = type(lyr).__name__
        nxt = type(layers[i + 1]).__name__ if i + 1 < len(layers) else None
        if t in ("Conv2D", "Dense"):
            act = 1 if nxt == "ReLU" else 0
            nodes.append(_ConvNode(be, lyr, act, t == "Dense"))
            i += 1 + act
            continue
        nxt2 = layers[i + 2] if i + 2 < len(layers) else None
        if (t == "BatchNorm2D" and nxt == "ReLU" and type(nxt2).__name__ == "MaxPool2D"
                and nxt2.kernel_size ** 2 <= 256):
            nodes.append(_BNPoolNode(be, lyr, nxt2))
            i += 3
            continue
        if t in ("BatchNorm1D", "BatchNorm2D"):
            act = 1 if nxt == "ReLU" else 0
            nodes.append(_BNNode(be, lyr, act))
            i += 1 + act
            continue
        if t == "MaxPool2D":
            nodes.append(_MaxPoolNode(be, lyr))
        elif t == "Flatten":
            nodes.append(_ReshapeNode(lyr))
        elif t == "ReLU":
            nodes.append(_ReluNode(be))
        elif t == "Dropout" and lyr.training and lyr.p > 0:
            nodes.append(_DropoutNode(be, lyr, seeds))
            seeds += 1
        elif t == "Dropout":
            nodes.append(_ReshapeNode(lyr, flatten=False))    # identity in eval mode / p == 0
        else:
            nodes.append(_LayerNode(be, lyr))
        i += 1
    pos = False
    for i, node in enumerate(nodes):
        node.mask_input = pos and not isinstance(node, (_ReshapeNode, _DropoutNode, _ReluNode))
        if isinstance(node, (_ReshapeNode, _DropoutNode)):
            node.pos_out = pos
        pos = node.pos_out
        # the fused BN pooling backward may overwrite its input when that input is a fresh output of the node
        # before, which that node does not keep (a convolution keeps its input, a BatchNorm its input, a ReLU
        # nothing) -- never the batch itself, a view of a tensor kept elsewhere, or a generic layer's output (its
        # cache may hold it)
        if isinstance(node, _BNPoolNode) and i > 0:
            prev = nodes[i - 1]
            node.inplace = isinstance(prev, (_BNNode, _ReluNode)) or (isinstance(prev, _ConvNode) and not prev.dense)
        # generic nodes read their input back for the ReLU mask (_mask); the others keep what they need themselves
        node.ref_input = node.mask_input and isinstance(node, (_LayerNode, _BNNode, _BNPoolNode))
    return nodes, seeds, pos


class GraphTrainStep:
    """step(xb, yb) / collect() as hetnet.train expects; see the module docstring."""

    def __init__(self, be, model, optimizer, schedule=None, label_smoothing: float = 0.0, use_graph: bool = True):
        import cupy
        import cupyx

        self.be, self.model, self.optimizer, self.schedule = be, model, optimizer, schedule
        self.label_smoothing = float(label_smoothing)
        self.cp = cupy
        self.nodes, self.n_seeds, self.logits_pos = compile_plan(be, model)
        # the backward stops at the first node with parameters, which is told that its d(input) is not wanted (a
        # leading Flatten would otherwise pull a first Dense layer's unused d(input) GEMM along), as backward_chain
        self.first_param = first_with_params(self.nodes,
                                             lambda n: getattr(getattr(n, "layer", None), "params", None))
        for node in self.nodes:             # for _mask on generic nodes: the input seen in the last forward
            node.input_ref = (lambda n=node: n._x)
        kind = type(optimizer).__name__
        self.opt_kind = kind if kind in ("SGD", "Adam", "AdamW") and optimizer._flat else None
        # graphs need every per-step value in device memory: only for optimisers we can drive that way
        self.use_graph = bool(use_graph) and (self.opt_kind is not None or optimizer is None)
        self.stream = be.compute_stream()    # shared with the batch kernels of hetnet.data.ResidentLoader
        self.hp = cupy.zeros((HP_SLOTS + max(1, self.n_seeds),), dtype=cupy.float32)
        self.seeds = self.hp[HP_SLOTS:].view(cupy.uint32)
        self.ctx = {"seeds": self.seeds}
        self.host = cupyx.empty_pinned((RING, self.hp.size), dtype=np.float32)
        self.events = [cupy.cuda.Event(disable_timing=True) for _ in range(RING)]
        self.recorded = [False] * RING
        self.slot = 0
        self.loss_acc = cupy.zeros((1,), dtype=cupy.float64)
        self.correct = cupy.zeros((1,), dtype=cupy.uint64)
        self.count = 0
        self.graphs: dict = {}              # (x shape) -> (graph, static x, static y)
        self.seen: set = set()
        self.eager_high: dict = {}          # (x shape) -> the pool's bytes in use at most in the eager step
        # the backend's private step pool (see CudaBackend.step_pool): the first, eager step of each batch shape
        # and the graphs run in it; it is never released while this object lives (the graphs keep using the
        # addresses they were captured with)
        self.pool = be.step_pool()

    # --- one step ----------------------------------------------------------------------------------------------

    def _run_plan(self, x, y):
        """Forward, loss, backward, update: only device work, no host synchronisation."""
        be, ctx = self.be, self.ctx
        evaluating = self.optimizer is None
        for node in self.nodes:
            node._x = x if node.ref_input and not evaluating else None
            x = node.fwd(x, ctx)
            if evaluating:              # no backward: drop what the node kept for it at once
                node.__dict__.pop("cache", None)
                node.__dict__.pop("x", None)
        logits = x
        if evaluating:                  # loss sum and correct count only
            be.softmax_xent_into(logits, y, None, self.loss_acc, self.correct, 0.0)
            return
        dlogits = be.xp.empty_like(logits)
        be.softmax_xent_into(logits, y, dlogits, self.loss_acc, self.correct, self.label_smoothing)
        if self.logits_pos:
            be.launch("conv", "relu_mask_inplace", dlogits.size, dlogits, logits, np.int64(dlogits.size))
        pack = self.optimizer.params[0]._pack if self.opt_kind else None
        if pack is not None:
            pack.grad.fill(0)
        else:
            self.optimizer.zero_grad()
        d = dlogits
        for i in range(len(self.nodes) - 1, self.first_param - 1, -1):    # the nodes before it only make d(input)
            node = self.nodes[i]
            d = node.bwd(d, i > self.first_param, ctx)
        for node in self.nodes:
            node._x = None
        self._update(pack)

    def _update(self, pack):
        opt, be = self.optimizer, self.be
        if self.opt_kind == "SGD":
            st = opt._flat_state.get("momentum_buffer")
            be.sgd_update(pack.data, pack.grad, st, opt.lr, opt.momentum, opt.dampening, opt.nesterov,
                          opt.weight_decay, opt.steps == 0, hp=self.hp)
        elif self.opt_kind in ("Adam", "AdamW"):
            be.adam_update(pack.data, pack.grad, opt._flat_state["exp_avg"], opt._flat_state["exp_avg_sq"],
                           max(opt.steps, 1), opt.lr, opt.betas[0], opt.betas[1], opt.eps, opt.weight_decay,
                           opt.decoupled, hp=self.hp)
        else:
            opt.step()

    def _upload(self) -> None:
        """This step's learning rate, flags and dropout seeds into self.hp (drawn in eager order)."""
        opt = self.optimizer
        if opt is None:
            return
        vals = self.host[self.slot]
        ev = self.events[self.slot]
        if self.recorded[self.slot]:
            ev.synchronize()          # the copy that last read this pinned slot has run
        if self.opt_kind == "SGD":
            vals[0], vals[1] = opt.lr, 1.0 if opt.steps == 0 else 0.0
        elif self.opt_kind in ("Adam", "AdamW"):
            t = opt.steps + 1
            vals[0], vals[1] = opt.lr, 0.0
            vals[2] = opt.lr / (1 - opt.betas[0] ** t)
            vals[3] = 1.0 / (1 - opt.betas[1] ** t)
        seeds = vals[HP_SLOTS:].view(np.uint32)
        for j in range(self.n_seeds):
            seeds[j] = int(generator().integers(0, 2**32))
        self.cp.cuda.runtime.memcpyAsync(self.hp.data.ptr, vals.ctypes.data, vals.nbytes,
                                         self.cp.cuda.runtime.memcpyHostToDevice, self.stream.ptr)
        ev.record(self.stream)
        self.recorded[self.slot] = True
        self.slot = (self.slot + 1) % RING

    def step(self, xb, yb) -> None:
        cp = self.cp
        n = int(xb.shape[0])
        try:
            with self.be.device, self.stream:
                if xb.dtype != cp.float32 or not xb.flags.c_contiguous:
                    xb = cp.ascontiguousarray(xb, dtype=cp.float32)
                yb = self.be._labels32(yb)
                self._upload()
                key = tuple(xb.shape)
                if not self.use_graph:
                    self._run_plan(xb, yb)
                elif key not in self.seen:
                    # eager: first batch of a shape (measures conv algorithms); its high-water mark in the pool
                    # bounds the captured graph's workspaces (see _capture)
                    pool, high = self.pool, [self.pool.used_bytes()]

                    def malloc(size):
                        mem = pool.malloc(size)
                        high[0] = max(high[0], pool.used_bytes())
                        return mem

                    with cp.cuda.using_allocator(malloc):
                        self._run_plan(xb, yb)
                    self.seen.add(key)
                    self.eager_high[key] = high[0]
                else:
                    g = self.graphs.get(key)
                    if g is None:
                        g = self.graphs[key] = self._capture(xb, yb, self.eager_high.get(key, 0))
                    graph, sx, sy = g
                    sx.data.copy_from_device_async(xb.data, xb.nbytes, self.stream)
                    sy.data.copy_from_device_async(yb.data, yb.nbytes, self.stream)
                    graph.launch(self.stream)
        except cp.cuda.memory.OutOfMemoryError as e:
            raise _oom_error(self.be, n, e) from None
        opt = self.optimizer
        if self.opt_kind is not None:
            opt.steps += 1
        if opt is None:
            self.count += n
            return
        if self.schedule is not None:
            self.schedule.step()
        self.count += n

    def _capture(self, xb, yb, high: int):
        """Record the plan into a CUDA graph. If a cuBLAS GEMM cannot be recorded, record again with our own
        kernels only (the fastest measured implicit-GEMM variant for each such layer). im2col's column buffers
        may fill the room under `high`, the eager step's high-water mark (conv._chunks)."""
        cp, be = self.cp, self.be
        sx, sy = cp.empty_like(xb), cp.empty_like(yb)
        pool = self.pool
        for attempt in range(2):
            be.prepare_capture(self.stream)
            be.capturing = self.stream
            be.workspace_headroom = lambda: max(0, high - pool.used_bytes())
            graph, error = None, None
            try:
                with cp.cuda.using_allocator(self.pool.malloc):
                    self.stream.begin_capture()
                    try:
                        self._run_plan(sx, sy)
                    finally:
                        graph = self.stream.end_capture()
            except (RuntimeError, OSError, NotImplementedError, cp.cuda.runtime.CUDARuntimeError) as e:
                error = e
            finally:
                be.capturing = None
                del be.workspace_headroom       # back to the class default (no headroom)
            if error is None:
                break
            if attempt == 1 or not be.graph_cublas:
                raise error
            be.graph_cublas = False
            be.capture_error = f"{type(error).__name__}: {error}"
        return graph, sx, sy

    def collect(self) -> tuple[float, int, int]:
        with self.be.device:
            self.stream.synchronize()
            loss = float(self.loss_acc.get()[0])
            correct = int(self.correct.get()[0])
            self.loss_acc.fill(0)
            self.correct.fill(0)
            self.stream.synchronize()
        out = (loss, correct, self.count)
        self.count = 0
        if not np.isfinite(loss) and self.optimizer is not None:
            raise TrainingDiverged(f"the training loss became {loss}")
        return out


def _oom_error(be, batch: int, e) -> DeviceError:
    m = re.search(r"allocating ([\d,]+) bytes", str(e))
    need = f"{int(m.group(1).replace(',', '')) / 2**20:.1f} MiB more" if m else "more memory"
    try:
        free, total = be.cupy.cuda.runtime.memGetInfo()
        have = f" ({free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB)"
    except be.cupy.cuda.runtime.CUDARuntimeError:
        have = ""
    return DeviceError(f"out of GPU memory on {be.name} at batch size {batch}: needed {need}{have}; "
                       f"try a smaller --batch-size")


class GraphEvalStep(GraphTrainStep):
    """Evaluation with the same plan (model in eval mode: BN uses running statistics, dropout is the identity):
    forward and the loss/correct sums only, captured as a CUDA graph per batch shape."""

    def __init__(self, be, model, use_graph: bool = True):
        super().__init__(be, model, None, None, 0.0, use_graph)
