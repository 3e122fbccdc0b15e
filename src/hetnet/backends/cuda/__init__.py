"""The cuda backend: hetnet's own CUDA kernels (the .cu files beside this module), CuPy arrays, cuBLAS for GEMMs.

`hetnet.device.get_backend("cuda:N")` creates one `CudaBackend(N)` per device. It implements every op of the
interface in `hetnet.backends` (float32, NCHW), and `step_runner()`: hetnet.plan's training and evaluation steps
captured once as a CUDA graph and replayed (graph.py).

    >>> import hetnet as hn                                        # doctest: +SKIP
    >>> model = hn.zoo.build("thesis-m1").to("cuda")               # doctest: +SKIP

Environment: HETNET_CUDA_GRAPH=0 runs the fast step without graph capture; HETNET_CONV_ALGO=implicit|im2col forces a
convolution algorithm instead of measuring.
"""
from __future__ import annotations

import ctypes
import math
import os

import numpy as np

from ...errors import DeviceError
from .. import compose
from . import conv as _conv
from .graph import GraphRunner
from .mma import gemm_tc
from .kernels import NULL, check, device_props, gemm_operands, get_kernel, grid_for
from .kernels import leading_dim as _ld

_i32, _i64, _f32 = np.int32, np.int64, np.float32
_ACT = {None: 0, "relu": 1}     # the activation code of the kernels' epilogues


def describe() -> dict:
    """GPU name, memory and CuPy/CUDA versions for `hetnet info`; never raises (says why CUDA is unusable)."""
    info: dict = {"available": False}
    try:
        import cupy
    except ImportError as e:  # also a CuPy whose CUDA libraries are missing
        info["reason"] = f"CuPy is not installed ({type(e).__name__}: {e})".splitlines()[0]
        return info
    info["cupy"] = cupy.__version__
    try:
        info["cuda_runtime"] = _version(cupy.cuda.runtime.runtimeGetVersion())
        info["cuda_driver"] = _version(cupy.cuda.runtime.driverGetVersion())
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        info["reason"] = f"no usable CUDA driver or GPU ({type(e).__name__}: {e})".splitlines()[0]
        return info
    if n == 0:
        info["reason"] = "no CUDA GPU found"
        return info
    info["available"] = True
    info["devices"] = []
    for i in range(n):
        try:
            p = device_props(i)
            with cupy.cuda.Device(i):
                free, total = cupy.cuda.runtime.memGetInfo()
            info["devices"].append({"index": i, "name": p["name"], "compute_capability": p["cc"],
                                    "memory_total_gib": round(total / 2**30, 2),
                                    "memory_free_gib": round(free / 2**30, 2), "multiprocessors": p["sms"]})
        except cupy.cuda.runtime.CUDARuntimeError as e:
            info["devices"].append({"index": i, "error": str(e).splitlines()[0]})
    return info


_sgemm = None


def _raw_sgemm():
    """cublasSgemm_v2 from the libcublas CuPy has loaded (found in /proc/self/maps), through ctypes."""
    global _sgemm
    if _sgemm is None:
        path = None
        with open("/proc/self/maps") as f:
            for line in f:
                name = line.rsplit(" ", 1)[-1].strip()
                if "/libcublas.so" in name:
                    path = name
                    break
        if path is None:
            raise RuntimeError("libcublas is not loaded")
        fn = ctypes.CDLL(path).cublasSgemm_v2
        p, i = ctypes.c_void_p, ctypes.c_int
        fn.argtypes = [p, i, i, i, i, i, p, p, i, p, i, p, p, i]
        fn.restype = i
        _sgemm = fn
    return _sgemm


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return default
    return v.strip().lower() not in ("0", "false", "no", "off")


def _no_headroom() -> int:
    return 0


class _WatchedPool:
    """A CuPy memory pool that calls on_malloc() after each allocation (see CudaBackend.fresh_step_pool)."""

    def __init__(self, pool, on_malloc):
        self.pool, self.on_malloc = pool, on_malloc

    def malloc(self, size):
        mem = self.pool.malloc(size)
        self.on_malloc()
        return mem

    def __getattr__(self, name):
        return getattr(self.pool, name)


def _act(act) -> int:
    if act not in _ACT:
        raise ValueError(f"unknown activation {act!r} (expected None or 'relu')")
    return _ACT[act]


class CudaBackend:
    """The backend object for one GPU. Attributes and ops as documented in `hetnet.backends`."""

    # the fusions of hetnet.plan this backend runs faster than their parts; a dense chain runs layer by layer
    fusions = frozenset({"conv_relu_pool", "bn_relu_pool", "conv_act", "bn_act", "dense_act"})

    # bytes a workspace may take right now without raising the step's peak (conv._chunks); a step object sets it
    # on the instance while it captures a graph
    workspace_headroom = staticmethod(_no_headroom)

    def __init__(self, device_id: int = 0, precision: str = "fp32"):
        try:
            import cupy
        except ImportError as e:
            raise DeviceError(f"device 'cuda:{device_id}' needs CuPy, which is not installed or does not load "
                              f"({type(e).__name__}); install it with pip install hetnet[cuda] (CUDA 12) "
                              f"or hetnet[cuda13] (CUDA 13)") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DeviceError(f"device 'cuda:{device_id}': no usable NVIDIA driver or GPU ({msg})") from None
        if count == 0:
            raise DeviceError(f"device 'cuda:{device_id}': no CUDA GPU found")
        if not 0 <= device_id < count:
            raise DeviceError(f"device 'cuda:{device_id}': only {count} GPU(s) found (cuda:0 .. cuda:{count - 1})")
        self.cupy = cupy
        self.xp = cupy
        self.device_id = int(device_id)
        self.name = f"cuda:{device_id}"
        self.dtype = np.dtype(np.float32)
        self.device = cupy.cuda.Device(device_id)
        props = device_props(device_id)
        self.gpu_name, self.sms = props["name"], props["sms"]
        # the matrix products' precision (hetnet.device): fp32, our FMA kernels and cuBLAS sgemm; tf32 / bf16, every
        # GEMM on our tensor-core kernels (mma.cu), the convolutions' algorithm chosen by measurement between the
        # fp32 implicit-GEMM kernels and im2col + those GEMMs
        self.precision = precision
        self.cuda_graph = _env_flag("HETNET_CUDA_GRAPH", True)
        self.force_conv_algo: str | None = None   # "implicit" | "im2col" to skip the measurement (tests)
        self._cache: dict = {}                     # gather tables, scratch buffers
        self._tune: dict = {}                      # (op, shape) -> chosen algorithm
        self._tune_times: dict = {}                # (op, shape) -> {algorithm: ms}
        self.tune_log: list = []                   # the measurements behind each choice
        self._alpha_beta = {}
        self.capturing = None                      # the stream a graph capture runs on, while it does
        self.index64 = False                       # True: always the 64-bit index kernels (see ix())
        self.graph_cublas = True                   # False after cuBLAS failed inside a capture: own kernels only
        self._stream = None                        # see compute_stream()
        self._step_pool = None                     # see step_pool()
        self._tune_pool = None                     # see tune_pool()

    def __repr__(self) -> str:
        return f"CudaBackend({self.device_id}: {self.gpu_name})"

    # --- helpers ---------------------------------------------------------------------------------------------------

    def launch(self, module: str, kernel: str, n: int, *args) -> None:
        """A grid-stride kernel over n elements."""
        if n <= 0:
            return
        get_kernel(self.device_id, module, kernel)((grid_for(int(n), self.sms),), (256,), args)

    def ix(self, kernel: str, size: int) -> str:
        """The version of a pooling / batch-norm kernel for tensors of `size` elements: 32-bit indices below 2^31
        (common.cuh, HN_TWO_INDEX_KERNELS), unless index64 is set (tests of the 64-bit versions)."""
        return kernel if self.index64 or size >= 2**31 else kernel + "_i32"

    def gemm(self, c, a, trans_a: bool, b, trans_b: bool, alpha: float = 1.0, beta: float = 0.0) -> None:
        """Row-major c[M,N] = alpha * op(a) @ op(b) + beta * c on the current stream: cuBLAS sgemm in fp32, our
        tensor-core kernels (mma.cu) in tf32 / bf16. Each matrix is row-major with contiguous rows and any row
        stride (a column slice such as yk[:, i:j]), or the transpose of such a view (a and b only)."""
        from cupy_backends.cuda.libs import cublas

        if self.precision != "fp32":
            gemm_tc(self, c, a, trans_a, b, trans_b, alpha, beta, self.precision)
            return
        a, trans_a, b, trans_b, m, n, k = gemm_operands(c, a, trans_a, b, trans_b)
        handle = self.cupy.cuda.device.get_cublas_handle()
        key = (float(alpha), float(beta))
        ab = self._alpha_beta.get(key)
        if ab is None:
            ab = self._alpha_beta[key] = np.array([alpha, beta], dtype=np.float32)
        op_a = cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N
        op_b = cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N
        # column-major view: c^T[N,M] = op(b)^T op(a)^T
        args = (handle, op_b, op_a, n, m, k, ab.ctypes.data, b.data.ptr, _ld(b), a.data.ptr, _ld(a),
                ab.ctypes.data + 4, c.data.ptr, _ld(c))
        if self.capturing is not None:
            # CuPy's cuBLAS wrappers refuse to run inside a stream capture (they re-bind the stream first), so
            # the captured call goes to libcublas directly; the handle was bound to the capture stream before.
            status = _raw_sgemm()(*args)
            if status != 0:
                raise RuntimeError(f"cublasSgemm_v2 failed with status {status} during graph capture")
            return
        cublas.setStream(handle, self.cupy.cuda.get_current_stream().ptr)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        if hasattr(cublas, "setMathMode"):
            cublas.setMathMode(handle, getattr(cublas, "CUBLAS_DEFAULT_MATH", 0))
        cublas.sgemm(*args)

    def prepare_capture(self, stream) -> None:
        """Bind the cuBLAS handle to `stream` (host scalars, math mode) before a capture on it begins."""
        from cupy_backends.cuda.libs import cublas

        handle = self.cupy.cuda.device.get_cublas_handle()
        cublas.setStream(handle, stream.ptr)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        if hasattr(cublas, "setMathMode"):
            cublas.setMathMode(handle, getattr(cublas, "CUBLAS_DEFAULT_MATH", 0))

    def compute_stream(self):
        """The stream training runs on: the train and eval steps' graphs and the data kernels that feed them, in
        order on one stream, so a batch's gather needs no synchronisation with the step before it. A blocking
        stream (ordered with CuPy's default stream, which everything else uses)."""
        if self._stream is None:
            with self.device:
                self._stream = self.cupy.cuda.Stream(non_blocking=False)
        return self._stream

    def step_pool(self):
        """The private memory pool of hetnet.plan's steps on this device (graph.py's runners): their first,
        eager steps and their captured graphs, train and eval alike. They all run in order on compute_stream(), no
        step reads what an earlier step freed, and buffers kept across steps come from elsewhere (see persistent()),
        so a block one step frees can serve the next step of any step object: the pool grows to the largest working
        set among them, not to their sum. Never emptied while a step object that took it lives (its graphs keep
        using the addresses they were captured with)."""
        if self._step_pool is None:
            with self.device:
                self._step_pool = self.cupy.cuda.MemoryPool()
        return self._step_pool

    def tune_pool(self):
        """The pool of the convolution algorithms' trial runs (conv._choose), emptied after each measurement, so
        that a workspace tried once and not chosen is not kept by the step pool."""
        if self._tune_pool is None:
            with self.device:
                self._tune_pool = self.cupy.cuda.MemoryPool()
        return self._tune_pool

    def fresh_step_pool(self, on_malloc=None):
        """Start a new step pool for the step objects made from now on (benchmarks that measure one model's
        memory); the old one is released when the last step object that uses it is gone. on_malloc: called
        after each allocation from the new pool (a memory probe)."""
        self._step_pool = None
        pool = self.step_pool()
        if on_malloc is not None:
            self._step_pool = pool = _WatchedPool(pool, on_malloc)
        return pool

    def persistent(self):
        """Context for allocations that outlive a step (cached tables and scratch buffers): they come from CuPy's
        default pool even inside a step, never from the step pool, whose free blocks a captured graph may still
        be using as its temporaries."""
        return self.cupy.cuda.using_allocator(self.cupy.get_default_memory_pool().malloc)

    def scratch(self, name: str, shape, dtype):
        """A persistent zeroed device buffer (kernels that use it leave it zeroed)."""
        key = ("scratch", name, tuple(shape), np.dtype(dtype).str)
        buf = self._cache.get(key)
        if buf is None:
            with self.persistent():
                buf = self._cache[key] = self.xp.zeros(shape, dtype=dtype)
        return buf

    # --- conversions and allocation --------------------------------------------------------------------------------

    def asarray(self, a):
        if isinstance(a, self.cupy.ndarray):
            return self.cupy.array(a, dtype=self.cupy.float32, order="C", copy=True)
        return self.cupy.asarray(np.ascontiguousarray(a, dtype=np.float32))

    def to_numpy(self, arr) -> np.ndarray:
        if isinstance(arr, np.ndarray):
            return arr.copy()
        return self.cupy.asnumpy(arr)

    def zeros(self, shape, dtype=None):
        return self.cupy.zeros(shape, dtype=self.cupy.float32 if dtype is None else dtype)

    def labels(self, a):
        if isinstance(a, self.cupy.ndarray):
            return self.cupy.ascontiguousarray(a, dtype=self.cupy.int32)
        return self.cupy.asarray(np.ascontiguousarray(a, dtype=np.int32))

    def synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()

    # --- data sets kept on the GPU (hetnet.data.ResidentLoader) ------------------------------------------------------

    resident_data = True     # train from uint8 images in device memory: no host copy per batch

    def upload(self, a):
        """a copied to the GPU with its dtype (uint8 images, int32 plans); running out of memory is one line."""
        a = np.ascontiguousarray(a)
        try:
            with self.device:
                return self.cupy.asarray(a)
        except self.cupy.cuda.memory.OutOfMemoryError:
            free, total = self.cupy.cuda.runtime.memGetInfo()
            raise DeviceError(f"out of GPU memory on {self.name} copying {a.nbytes / 2**20:.1f} MiB of data to "
                              f"the GPU ({free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB)") from None

    def gather_images(self, images, labels, plan, start, count, scale, shift, reflect=False):
        """One batch from the plan, as the op interface says: one launch of data.cu's gather_images."""
        cp = self.cupy
        _, c, h, w = images.shape
        if images.dtype != cp.uint8 or plan.dtype != cp.int32 or labels.dtype != cp.int32:
            raise ValueError(f"gather_images: expected uint8 images, int32 plan and labels, got {images.dtype}, "
                             f"{plan.dtype}, {labels.dtype}")
        check(images, labels, plan, scale, shift)
        with self.device, self.compute_stream():
            x = cp.empty((int(count), c, h, w), dtype=cp.float32)
            y = cp.empty((int(count),), dtype=cp.int32)
            self.launch("data", "gather_images", x.size, images, labels, plan, np.int64(plan.shape[1]),
                        np.int64(start), scale, shift, x, y, np.int32(count), np.int32(c), np.int32(h), np.int32(w),
                        np.int32(1 if reflect else 0))
        return x, y

    def _c(self, a):
        return a if a.flags.c_contiguous else self.cupy.ascontiguousarray(a)

    # --- dense and convolution -------------------------------------------------------------------------------------

    def dense_forward(self, x, w, b, act=None):
        x = self._c(x)
        return _conv.dense_forward(self, x, w, b, _act(act)), (x, w)

    def dense_backward(self, dy, cache, dw, db, need_dx=True, relu_mask=False):
        x, w = cache
        return _conv.dense_backward(self, self._c(dy), x, w, dw, db, need_dx, x if relu_mask else None)

    def conv2d_forward(self, x, w, b, stride, padding, act=None):
        x = self._c(x)
        y = _conv.conv_forward(self, x, w, b, int(stride), int(padding), _act(act))
        return y, (x, w, int(stride), int(padding))

    def conv2d_backward(self, dy, cache, dw, db, need_dx=True, relu_mask=False):
        x, w, stride, padding = cache
        return _conv.conv_backward(self, self._c(dy), x, w, dw, db, stride, padding, need_dx,
                                   x if relu_mask else None)

    def relu_mask(self, dx, x):
        """dx * (x > 0), written over dx."""
        self.launch("conv", "relu_mask_inplace", dx.size, dx, self._c(x), np.int64(dx.size))
        return dx

    # the fused ops that are this backend's own ops in a row (their caches keep what each op keeps)
    def conv2d_relu_maxpool_forward(self, x, w, b, stride, padding, pool_kernel, pool_stride):
        return compose.conv2d_relu_maxpool_forward(self, x, w, b, stride, padding, pool_kernel, pool_stride)

    def conv2d_relu_maxpool_backward(self, dy, cache, dw, db, need_dx=True, relu_mask=False):
        return compose.conv2d_relu_maxpool_backward(self, dy, cache, dw, db, need_dx, relu_mask)

    def dense_chain_forward(self, x, layers):
        return compose.dense_chain_forward(self, x, layers)

    def dense_chain_backward(self, dy, cache, grads, need_dx=True, relu_mask=False, accumulate=True):
        return compose.dense_chain_backward(self, dy, cache, grads, need_dx, relu_mask, accumulate)

    # --- pooling ---------------------------------------------------------------------------------------------------

    def maxpool2d_forward(self, x, kernel, stride):
        """The cache keeps (x's shape, y, argmax bytes), not x: the backward reads the ReLU mask from y, and the
        layer before may free its output after the forward."""
        x = self._c(x)
        n, c, h, w = x.shape
        p, q = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        if kernel * kernel > 256:
            raise ValueError(f"maxpool2d: kernel {kernel} too large for the cuda backend (at most 16)")
        y = self.xp.empty((n, c, p, q), dtype=self.xp.float32)
        arg = self.xp.empty((n, c, p, q), dtype=self.xp.uint8)
        self.launch("pool", self.ix("maxpool_fwd", x.size), y.size, x, y, arg, _i32(n * c), _i32(h), _i32(w), _i32(p),
                    _i32(q), _i32(kernel), _i32(stride))
        return y, (x.shape, y, arg, kernel, stride)

    def maxpool2d_backward(self, dy, cache, relu_mask=False):
        """dE/dx from the pooled output y and the argmax bytes; relu_mask: x is a ReLU output (dx = 0 where the
        window's maximum y <= 0)."""
        x_shape, y, arg, kernel, stride = cache
        dy = self._c(dy)
        n, c, h, w = x_shape
        dx = self.xp.empty(x_shape, dtype=self.xp.float32)
        self.launch("pool", self.ix("maxpool_bwd_pooled", dx.size), dx.size, dy, arg, y, dx, _i32(n * c), _i32(h),
                    _i32(w), _i32(y.shape[2]), _i32(y.shape[3]), _i32(kernel), _i32(stride),
                    _i32(1 if relu_mask else 0))
        return dx

    def avgpool2d_forward(self, x, kernel, stride):
        x = self._c(x)
        n, c, h, w = x.shape
        p, q = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        y = self.xp.empty((n, c, p, q), dtype=self.xp.float32)
        self.launch("pool", self.ix("avgpool_fwd", x.size), y.size, x, y, _i32(n * c), _i32(h), _i32(w), _i32(p),
                    _i32(q), _i32(kernel), _i32(stride))
        return y, (x.shape, kernel, stride)

    def avgpool2d_backward(self, dy, cache):
        (n, c, h, w), kernel, stride = cache
        dy = self._c(dy)
        dx = self.xp.empty((n, c, h, w), dtype=self.xp.float32)
        self.launch("pool", self.ix("avgpool_bwd", dx.size), dx.size, dy, dx, _i32(n * c), _i32(h), _i32(w),
                    _i32(dy.shape[2]), _i32(dy.shape[3]), _i32(kernel), _i32(stride))
        return dx

    def global_avgpool2d_forward(self, x):
        x = self._c(x)
        n, c, h, w = x.shape
        y = self.xp.empty((n, c), dtype=self.xp.float32)
        rows = n * c
        get_kernel(self.device_id, "pool", "global_avgpool_fwd")((math.ceil(rows * 32 / 256),), (256,),
                                                                  (x, y, _i32(rows), _i32(h * w)))
        return y, x.shape

    def global_avgpool2d_backward(self, dy, cache):
        n, c, h, w = cache
        dx = self.xp.empty(cache, dtype=self.xp.float32)
        self.launch("pool", "global_avgpool_bwd", dx.size, self._c(dy), dx, _i32(n * c), _i32(h * w))
        return dx

    # --- activations -----------------------------------------------------------------------------------------------

    def _unary(self, kernel, x):
        x = self._c(x)
        y = self.xp.empty_like(x)
        self.launch("elementwise", kernel, x.size, x, y, _i64(x.size))
        return y

    def _binary(self, kernel, dy, c):
        dy = self._c(dy)
        dx = self.xp.empty_like(dy)
        self.launch("elementwise", kernel, dy.size, dy, c, dx, _i64(dy.size))
        return dx

    def relu_forward(self, x):
        # the cache is y, not x: y > 0 exactly where x > 0, and the layer before may then free its output
        y = self._unary("relu_fwd", self._c(x))
        return y, y

    def relu_backward(self, dy, cache):
        return self._binary("relu_bwd", dy, cache)

    def sigmoid_forward(self, x):
        y = self._unary("sigmoid_fwd", x)
        return y, y

    def sigmoid_backward(self, dy, cache):
        return self._binary("sigmoid_bwd", dy, cache)

    def tanh_forward(self, x):
        y = self._unary("tanh_fwd", x)
        return y, y

    def tanh_backward(self, dy, cache):
        return self._binary("tanh_bwd", dy, cache)

    def gelu_forward(self, x):
        x = self._c(x)
        return self._unary("gelu_fwd", x), x

    def gelu_backward(self, dy, cache):
        return self._binary("gelu_bwd", dy, cache)

    def _scaled(self, a, factor):
        a = self._c(a)
        out = self.xp.empty_like(a)
        self.launch("elementwise", "scale_apply", a.size, a, out, _f32(factor), _i64(a.size))
        return out

    def scale_forward(self, x, factor):
        return self._scaled(x, factor), float(factor)

    def scale_backward(self, dy, cache):
        return self._scaled(dy, cache)

    def softmax_forward(self, x):
        x = self._c(x)
        n, k = x.shape
        y = self.xp.empty_like(x)
        get_kernel(self.device_id, "elementwise", "softmax_fwd")((max(1, math.ceil(n * 32 / 256)),), (256,),
                                                                  (x, y, _i32(n), _i32(k)))
        return y, y

    def softmax_backward(self, dy, cache):
        y = cache
        dy = self._c(dy)
        n, k = y.shape
        dx = self.xp.empty_like(y)
        get_kernel(self.device_id, "elementwise", "softmax_bwd")((max(1, math.ceil(n * 32 / 256)),), (256,),
                                                                  (dy, y, dx, _i32(n), _i32(k)))
        return dx

    # --- batch normalisation ---------------------------------------------------------------------------------------

    def _bn_grid(self, n, c, hw):
        return (c, max(1, min(math.ceil(n * hw / 1024), math.ceil(4 * self.sms / c))), 1)

    def _bn_batch_stats(self, x, running_mean, running_var, momentum, training, reduce=None):
        """(mean, var, sync) per channel of x[N, C, ...]: in training the batch's (one kernel, which also updates the
        running statistics), else copies of the running ones. With `reduce` (synchronised BatchNorm), the statistics
        of every process's batch together: this batch's sums (bn_sums), all-reduced, then bn_stats_synced; sync is
        then (reduce, the all-reduced count: a device array of one double) for the backward, else None."""
        if not training:
            return running_mean.copy(), running_var.copy(), None
        n, c = x.shape[0], x.shape[1]
        hw = x.size // max(n * c, 1)
        stats = self.xp.empty((2 * c,), dtype=self.xp.float32)
        acc = self.scratch("bn_acc", (2 * c,), np.float64)
        cnt = self.scratch("bn_cnt", (c,), np.uint32)
        if reduce is None:
            get_kernel(self.device_id, "norm", self.ix("bn_stats", x.size))(self._bn_grid(n, c, hw), (256,), (
                x, stats, running_mean, running_var, acc, cnt, _i32(n), _i32(c), _i32(hw), _f32(momentum)))
            return stats[:c], stats[c:], None
        sums = self.xp.empty((2 * c + 1,), dtype=self.xp.float64)      # [sum x, sum x^2, count]
        get_kernel(self.device_id, "norm", self.ix("bn_sums", x.size))(self._bn_grid(n, c, hw), (256,), (
            x, sums, acc, cnt, _i32(n), _i32(c), _i32(hw)))
        reduce(sums)
        get_kernel(self.device_id, "norm", "bn_stats_synced")((math.ceil(c / 256),), (256,), (
            sums, stats, running_mean, running_var, _i32(c), _f32(momentum)))
        return stats[:c], stats[c:], (reduce, sums[2 * c:])

    def _bn_sync_grad_sums(self, red, m: int, sync) -> None:
        """Synchronised BatchNorm's backward: red = this process's [sum g, sum g * xhat] per channel (already added
        to dgamma, dbeta) becomes every process's sums times m / M, so that the dx kernels' 1/m (this batch's count)
        divides them by M, the count of all the batches."""
        reduce, count = sync
        reduce(red)
        red *= (m / count).astype(self.xp.float32)

    def batchnorm_forward(self, x, gamma, beta, running_mean, running_var, momentum, eps, training, act=None,
                          reduce=None):
        x = self._c(x)
        n, c = x.shape[0], x.shape[1]
        hw = x.size // max(n * c, 1)
        y = self.xp.empty_like(x)
        mean, var, sync = self._bn_batch_stats(x, running_mean, running_var, momentum, training, reduce)
        self.launch("norm", self.ix("bn_apply", x.size), x.size, x, y, mean, var, gamma, beta, _i32(n), _i32(c),
                    _i32(hw), _f32(eps), _i32(_act(act)))
        return y, (x, mean, var, gamma, float(eps), bool(training), sync)

    def batchnorm_backward(self, dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False):
        x, mean, var, gamma, eps, training, sync = cache
        dy = self._c(dy)
        n, c = x.shape[0], x.shape[1]
        hw = x.size // max(n * c, 1)
        red = self.xp.empty((2 * c,), dtype=self.xp.float32)
        acc = self.scratch("bn_acc", (2 * c,), np.float64)
        cnt = self.scratch("bn_cnt", (c,), np.uint32)
        get_kernel(self.device_id, "norm", self.ix("bn_bwd_reduce", x.size))(self._bn_grid(n, c, hw), (256,), (
            dy, x, mean, var, red, dgamma if dgamma is not None else NULL, dbeta, acc, cnt, _i32(n), _i32(c), _i32(hw),
            _f32(eps)))
        if sync is not None:
            self._bn_sync_grad_sums(red, n * hw, sync)
        if not need_dx:
            return None
        dx = self.xp.empty_like(x)
        self.launch("norm", self.ix("bn_bwd_dx", x.size), x.size, dy, x, mean, var, gamma, red if training else NULL,
                    dx, _i32(n), _i32(c), _i32(hw), _f32(eps))
        return self.relu_mask(dx, x) if relu_mask else dx

    def bn_relu_maxpool_forward(self, x, gamma, beta, running_mean, running_var, momentum, eps, training, pool_kernel,
                                pool_stride, reduce=None):
        """maxpool(relu(batchnorm(x))) in two kernels (statistics, then normalise + ReLU + pool); the BN output is
        never stored. Same statistics and running-stat update as batchnorm_forward. Windows of more than 256
        elements run the three ops (backends.compose)."""
        kernel, stride = int(pool_kernel), int(pool_stride)
        if kernel * kernel > 256:
            return compose.bn_relu_maxpool_forward(self, x, gamma, beta, running_mean, running_var, momentum, eps,
                                                   training, kernel, stride, reduce)
        x = self._c(x)
        n, c, h, w = x.shape
        p, q = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        mean, var, sync = self._bn_batch_stats(x, running_mean, running_var, momentum, training, reduce)
        y = self.xp.empty((n, c, p, q), dtype=self.xp.float32)
        arg = self.xp.empty((n, c, p, q), dtype=self.xp.uint8)
        self.launch("norm", self.ix("bn_relu_maxpool_fwd", x.size), y.size, x, y, arg, mean, var, gamma, beta, _i32(n),
                    _i32(c), _i32(h), _i32(w), _i32(p), _i32(q), _i32(kernel), _i32(stride), _f32(eps))
        return y, ("native", x, arg, mean, var, gamma, beta, float(eps), bool(training), kernel, stride, y, sync)

    def bn_relu_maxpool_backward(self, dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False, inplace=False):
        """dE/dx of maxpool(relu(batchnorm(x))); dgamma += (unless None) and dbeta += as
        batchnorm_backward. inplace: dx may be
        written over x (the plan says so where nothing reads x after this; not with relu_mask, which reads x)."""
        if cache[0] == "native" and not cache[8]:
            # evaluation mode has no fused backward: the unfused ops' caches are these arrays
            _, x, arg, mean, var, gamma, beta, eps, training, kernel, stride, y, sync = cache
            cache = ((x, mean, var, gamma, eps, training, sync), (x.shape, y, arg, kernel, stride))
        if cache[0] != "native":
            return compose.bn_relu_maxpool_backward(self, dy, cache, dgamma, dbeta, need_dx, relu_mask)
        _, x, arg, mean, var, gamma, beta, eps, _, kernel, stride, _, sync = cache
        dy = self._c(dy)
        n, c, h, w = x.shape
        p, q = dy.shape[2], dy.shape[3]
        red = self.xp.empty((2 * c,), dtype=self.xp.float32)
        acc = self.scratch("bn_acc", (2 * c,), np.float64)
        cnt = self.scratch("bn_cnt", (c,), np.uint32)
        dims = (_i32(n), _i32(c), _i32(h), _i32(w), _i32(p), _i32(q), _i32(kernel), _i32(stride), _f32(eps))
        reduce = get_kernel(self.device_id, "norm", self.ix("bn_relu_maxpool_bwd_reduce", x.size))
        reduce(self._bn_grid(n, c, h * w), (256,), (dy, arg, x, mean, var, gamma, beta, red,
                                                     dgamma if dgamma is not None else NULL, dbeta, acc, cnt, *dims))
        if sync is not None:
            self._bn_sync_grad_sums(red, n * h * w, sync)
        if not need_dx:
            return None
        dx = x if inplace and not relu_mask else self.xp.empty_like(x)
        self.launch("norm", self.ix("bn_relu_maxpool_bwd_dx", x.size), x.size, dy, arg, x, mean, var, gamma, beta, red,
                    dx, *dims)
        return self.relu_mask(dx, x) if relu_mask else dx

    # --- dropout ---------------------------------------------------------------------------------------------------

    @staticmethod
    def dropout_threshold(p: float) -> tuple[int, float]:
        """(hash threshold, scale): keep iff hash >= ceil(p * 2^32), i.e. hash / 2^32 >= p exactly."""
        return math.ceil(float(p) * 4294967296.0), float(np.float32(1.0 / (1.0 - p)))

    def dropout_forward(self, x, p, seed):
        """seed: an int, or a device array of one uint32 read when the kernel runs (a replayed step fills it)."""
        x = self._c(x)
        seed_ptr = seed if isinstance(seed, self.cupy.ndarray) else None
        seed = 0 if seed_ptr is not None else seed
        thr, scale = self.dropout_threshold(p)
        y = self.xp.empty_like(x)
        self.launch("elementwise", "dropout_apply", x.size, x, y, seed_ptr if seed_ptr is not None else NULL,
                    np.uint32(int(seed) & 0xFFFFFFFF), np.uint64(thr), _f32(scale), _i64(x.size))
        return y, (int(seed) & 0xFFFFFFFF, thr, scale, seed_ptr)

    def dropout_backward(self, dy, cache):
        seed, thr, scale, seed_ptr = cache
        dy = self._c(dy)
        dx = self.xp.empty_like(dy)
        self.launch("elementwise", "dropout_apply", dy.size, dy, dx, seed_ptr if seed_ptr is not None else NULL,
                    np.uint32(seed), np.uint64(thr), _f32(scale), _i64(dy.size))
        return dx

    # --- losses ----------------------------------------------------------------------------------------------------

    def softmax_xent_into(self, logits, labels, dlogits, loss_acc, correct, label_smoothing=0.0):
        """The fused loss kernel: dlogits (or None), loss_acc += sum of losses, correct += right argmaxes."""
        n, k = logits.shape
        get_kernel(self.device_id, "loss", "softmax_xent")((max(1, math.ceil(n * 32 / 256)),), (256,), (
            logits, labels, dlogits if dlogits is not None else NULL, loss_acc if loss_acc is not None else NULL,
            correct if correct is not None else NULL, _i32(n), _i32(k), _f32(label_smoothing),
            _f32(1.0 / max(n, 1))))

    def _labels32(self, labels):
        if isinstance(labels, np.ndarray) or not isinstance(labels, self.cupy.ndarray):
            return self.labels(np.asarray(labels))
        return labels if labels.dtype == self.cupy.int32 and labels.flags.c_contiguous else \
            self.cupy.ascontiguousarray(labels, dtype=self.cupy.int32)

    def softmax_cross_entropy_into(self, logits, labels, dlogits, loss_sum, correct, label_smoothing=0.0):
        self.softmax_xent_into(self._c(logits), self._labels32(labels), dlogits, loss_sum, correct, label_smoothing)

    def softmax_cross_entropy(self, logits, labels, label_smoothing=0.0):
        logits = self._c(logits)
        n = logits.shape[0]
        d = self.xp.empty_like(logits)
        acc = self.xp.zeros((1,), dtype=self.xp.float64)
        self.softmax_xent_into(logits, self._labels32(labels), d, acc, None, label_smoothing)
        return (float(acc.get()[0]) / n if n else 0.0), d

    def softmax_cross_entropy_stats(self, logits, labels):
        logits = self._c(logits)
        acc = self.xp.zeros((1,), dtype=self.xp.float64)
        correct = self.xp.zeros((1,), dtype=self.xp.uint64)
        self.softmax_xent_into(logits, self._labels32(labels), None, acc, correct)
        return float(acc.get()[0]), int(correct.get()[0])

    def binary_cross_entropy_with_logits(self, logits, targets):
        z = self._c(logits)
        t = self.cupy.ascontiguousarray(targets, dtype=self.cupy.float32)
        d = self.xp.empty_like(z)
        acc = self.xp.zeros((1,), dtype=self.xp.float64)
        n = z.size
        get_kernel(self.device_id, "loss", "bce_logits")((grid_for(n, self.sms),), (256,), (
            z, t, d, acc, _i64(n), _f32(1.0 / max(n, 1))))
        return (float(acc.get()[0]) / n if n else 0.0), d

    # --- optimiser updates -----------------------------------------------------------------------------------------

    def sgd_update(self, p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step, scalars=None):
        check(p, g, buf)
        self.launch("optim", "sgd_update", p.size, p, g, buf if buf is not None and momentum else NULL,
                    scalars if scalars is not None else NULL, _f32(lr), _i32(1 if first_step else 0), _f32(momentum),
                    _f32(dampening), _f32(weight_decay), _i32(1 if nesterov else 0), _i64(p.size))

    def adam_update(self, p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, scalars=None):
        check(p, g, m, v)
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        self.launch("optim", "adam_update", p.size, p, g, m, v, scalars if scalars is not None else NULL, _f32(lr),
                    _f32(lr / bc1), _f32(1.0 / bc2), _f32(beta1), _f32(beta2), _f32(eps), _f32(weight_decay),
                    _i32(1 if decoupled else 0), _i64(p.size))

    # --- replayed steps ------------------------------------------------------------------------------------------

    def step_runner(self, n_scalars: int, n_seeds: int):
        """hetnet.plan's step runner here: the step captured as a CUDA graph per batch shape and replayed (graph.py);
        HETNET_CUDA_GRAPH=0 runs it eagerly on the same stream."""
        return GraphRunner(self, n_scalars, n_seeds, use_graph=self.cuda_graph)
