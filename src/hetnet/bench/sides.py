"""The two sides of every row: hetnet's training step (the trainer's step object, or the public layer API layer by
layer) and PyTorch's (eager, captured as a CUDA graph, or compiled), each at a numeric precision the way its users
run it.

    >>> step, path = make_step(model, optim.SGD(model.parameters(), lr=0.01, momentum=0.9))   # doctest: +SKIP
    >>> note = hetnet_to(model, "cuda", "bf16")    # None, or why hetnet has no bf16 side   # doctest: +SKIP
    >>> tstep = TorchGraphStep(tmodel, topt, tx, ty, precision="bf16")                       # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from collections.abc import Callable

from .. import losses
from ..train import make_train_step
from .common import Clock

# --- hetnet ------------------------------------------------------------------------------------------------------


def make_step(model, opt):
    """(step object, its name): the step `hetnet train` runs, hetnet.train.make_train_step."""

    ts = make_train_step(model, opt, None, 0.0)
    return ts, f"{type(ts).__module__}.{type(ts).__qualname__}"


class LayerByLayerStep:
    """The same SGD step through the public layer API, one layer after another (model.forward, softmax
    cross-entropy, model.backward, optimizer.step): what a user's own loop costs, no fusion, no captured graph."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def step(self, x, y) -> None:

        self.opt.zero_grad()
        _, dlogits = losses.softmax_cross_entropy(self.model.forward(x), y)
        self.model.backward(dlogits, need_dx=False)
        self.opt.step()

    def collect(self) -> tuple[float, int, int]:
        return (0.0, 0, 0)


HETNET_PRECISION_UNSUPPORTED = "hetnet precision not supported"


def hetnet_to(model, device, precision: str) -> str | None:
    """Move `model` to `device` computing at `precision` ("fp32", "tf32", "bf16"); returns None when it does, else
    why not. Precision is passed as `model.to(device, precision=...)`, and only when it is not fp32; a model whose
    `to` takes no precision is moved in fp32 and the row records HETNET_PRECISION_UNSUPPORTED (its hetnet side is
    then left empty: an fp32 time is never reported as another precision's)."""
    if precision == "fp32":
        model.to(device)
        return None
    try:
        params = inspect.signature(model.to).parameters.values()
    except (TypeError, ValueError):
        params = ()
    if not any(p.name == "precision" or p.kind is p.VAR_KEYWORD for p in params):
        model.to(device)
        return HETNET_PRECISION_UNSUPPORTED
    model.to(getattr(device, "name", device), precision=precision)   # the public form: a device string
    return None


# --- PyTorch -----------------------------------------------------------------------------------------------------


def torch_flags(tf32: bool) -> None:
    """TF32 on or off for cuBLAS and cuDNN, cudnn.benchmark on (a no-op without a GPU)."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True


def torch_precision(precision: str) -> dict:
    """PyTorch's global switches as its users set them for `precision` (tf32: allow_tf32 on for cuBLAS and cuDNN;
    fp32 and bf16: off -- under bf16 autocast the convolutions and GEMMs are bf16 anyway); returns them as set."""
    import torch

    torch_flags(precision == "tf32")
    return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "autocast": "bfloat16" if precision == "bf16" else None,
            "channels_last": precision == "bf16"}


def autocast_for(precision: str, device_type: str):
    """torch.autocast to bfloat16 for bf16 (without its weight-cast cache, which CUDA-graph capture does not
    support), else a null context."""
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def for_precision(tmodel, x, precision: str):
    """(model, input) laid out as PyTorch's bf16 users run them: channels_last (NHWC in memory) for bf16."""
    import torch

    if precision == "bf16":
        tmodel = tmodel.to(memory_format=torch.channels_last)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return tmodel, x


def capture_torch_graph(body: Callable, warmup: int = 3):
    """A torch.cuda.CUDAGraph of `body()`, after `warmup` calls of it on a side stream (as the torch.cuda.graphs
    documentation shows: the warm-up lets lazy initialisation and cuDNN's algorithm search happen uncaptured)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


class TorchGraphStep:
    """PyTorch's fastest mode for these models: forward, loss, backward and SGD step captured once as a CUDA graph
    (static input tensors; SGD keeps no step counter, so it needs no `capturable` flag) and replayed. Gradients are
    set to None at the start of the body, so the captured backward allocates them in the graph's pool. precision
    "bf16": forward and loss under bf16 autocast (pass the model and input through `for_precision` first); "tf32"
    is the global switches (`torch_precision`)."""

    def __init__(self, tmodel, topt, x, y, warmup: int = 3, precision: str = "fp32"):
        import torch.nn.functional as F

        self.sx, self.sy = x.clone(), y.clone()   # clone keeps the memory format (channels_last for bf16)

        def body():
            topt.zero_grad(set_to_none=True)
            with autocast_for(precision, self.sx.device.type):
                self.loss = F.cross_entropy(tmodel(self.sx), self.sy)
            self.loss.backward()
            topt.step()

        self.graph = capture_torch_graph(body, warmup)

    def step(self):
        self.graph.replay()


class TorchCompileStep:
    """The same step with the model compiled by torch.compile(mode="max-autotune") (inductor's kernels, and its
    CUDA graphs of the forward and backward), the SGD update eager; `warmup` steps compile and autotune (their
    time: compile_seconds). Raises what torch.compile raises; the caller records it."""

    def __init__(self, tmodel, topt, x, y, precision: str = "fp32", warmup: int = 3):
        import torch

        torch._dynamo.reset()          # a fresh cache per row: each shape is compiled and tuned on its own
        self.cmodel = torch.compile(tmodel, mode="max-autotune")
        self.topt, self.x, self.y, self.precision = topt, x, y, precision
        self.mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
        t0 = time.perf_counter()
        for _ in range(warmup):
            self.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        self.compile_seconds = round(time.perf_counter() - t0, 1)

    def step(self):
        import torch.nn.functional as F

        if self.mark is not None and self.x.is_cuda:
            self.mark()                # a new training iteration: the last one's graph outputs may be overwritten
        self.topt.zero_grad(set_to_none=True)
        with autocast_for(self.precision, self.x.device.type):
            loss = F.cross_entropy(self.cmodel(self.x), self.y)
        loss.backward()
        self.topt.step()


def torch_graph_ms(fn: Callable, calls: int = 20, replays: int = 5) -> float:
    """GPU milliseconds per call of a PyTorch op: `calls` calls captured in one CUDA graph (warmed up first), the
    median of `replays` replays timed with CUDA events -- kernels, not Python's launch overhead."""
    def body():
        for _ in range(calls):
            fn()

    replay = capture_torch_graph(body, warmup=1).replay
    clock = Clock("torch")
    replay()
    return statistics.median(clock(replay, 1) for _ in range(replays)) * 1e3 / calls
