"""The cuda backend: hetnet's own CUDA kernels (the .cu files beside this module), CuPy arrays, cuBLAS for GEMMs.

`hetnet.device.get_backend("cuda:N", precision)` creates one `CudaBackend` per device and precision. It implements
every op of the interface in `hetnet.backends` (float32 storage, NCHW): each op family's launchers sit beside its
.cu file as a class CudaBackend inherits (conv.py: ConvOps, pool.py: PoolOps, norm.py: NormOps, elementwise.py:
ElementwiseOps, loss.py: LossOps, optim.py: OptimOps, data.py: DataOps; mma.py the tensor-core GEMMs); this module
holds the device, its streams, memory pools and GEMM dispatch; graph.py captures hetnet.plan's steps as CUDA graphs
and replays them (`step_runner()`).

    >>> import hetnet as hn                                        # doctest: +SKIP
    >>> model = hn.zoo.build("thesis-m1").to("cuda")               # doctest: +SKIP

Environment: HETNET_CUDA_GRAPH=0 runs the fast step without graph capture; HETNET_CONV_ALGO=implicit|im2col forces a
convolution algorithm instead of measuring.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os

import numpy as np

from ...errors import DeviceError
from .conv import ConvOps
from .data import DataOps
from .elementwise import ElementwiseOps
from .graph import GraphRunner
from .kernels import NULL, check, device_props, gemm_operands, get_kernel, grid_for
from .kernels import leading_dim as _ld
from .loss import LossOps
from .mma import StepCopies, gemm_tc
from .norm import NormOps
from .optim import OptimOps
from .pool import PoolOps

_i32, _i64, _f32 = np.int32, np.int64, np.float32


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


_cublas_fns: dict = {}


def _raw_cublas(name: str):
    """cuBLAS's `name` (cublasSgemm_v2, cublasSgemmStridedBatched) from the libcublas CuPy has loaded (found in
    /proc/self/maps), through ctypes: what a graph capture calls (CuPy's wrappers re-bind the stream first)."""
    fn = _cublas_fns.get(name)
    if fn is None:
        path = None
        with open("/proc/self/maps") as f:
            for line in f:
                lib = line.rsplit(" ", 1)[-1].strip()
                if "/libcublas.so" in lib:
                    path = lib
                    break
        if path is None:
            raise RuntimeError("libcublas is not loaded")
        fn = getattr(ctypes.CDLL(path), name)
        p, i, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        fn.argtypes = ([p, i, i, i, i, i, p, p, i, p, i, p, p, i] if name == "cublasSgemm_v2"
                       else [p, i, i, i, i, i, p, p, i, s, p, i, s, p, p, i, s, i])
        fn.restype = i
        _cublas_fns[name] = fn
    return fn


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


class CudaBackend(ConvOps, PoolOps, NormOps, ElementwiseOps, LossOps, OptimOps, DataOps):
    """The backend object for one GPU. Attributes and ops as documented in `hetnet.backends`."""

    # the fusions of hetnet.plan this backend runs faster than their parts; a dense chain runs layer by layer
    # (bn_relu, not bn_act: the batch norm's backward applies the ReLU's derivative from x, which it reads anyway,
    # so the consumer keeps no x for a mask)
    fusions = frozenset({"conv_relu_pool", "conv_pool", "conv_gelu", "bn_relu_pool", "bn_gelu", "conv_act", "bn_relu",
                         "dense_act"})
    # the batch-norm, GELU and convolution -> GELU forwards take the contract's hand-over to a convolution (`feeds`:
    # norm.py, elementwise.py, conv.py; conv.Nhwc16)
    takes_feeds = True

    # bytes a workspace may take right now without raising the step's peak (conv._chunks); a step object sets it
    # on the instance while it captures a graph
    workspace_headroom = staticmethod(_no_headroom)
    # the open weight_copies scope's mma.StepCopies (None outside a step's scope)
    copy_scope = None

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
        # fp32 implicit-GEMM kernels and im2col + those GEMMs (and at fp32 Winograd's algorithms, winograd.py)
        self.precision = precision
        self.cuda_graph = _env_flag("HETNET_CUDA_GRAPH", True)
        self.force_conv_algo: str | None = None   # a name of conv.FORCEABLE: no measurement (tests)
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
        self._tune_file = None                     # the choices kept between processes (tune_cache.for_backend)

    def __repr__(self) -> str:
        return f"CudaBackend({self.device_id}: {self.gpu_name})"

    # --- helpers ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def weight_copies(self, store: dict, params):
        """The op contract's weight_copies: inside, the convolutions read the copies of their weights (mma.weight_copy)
        that one launch made on entry (mma.StepCopies, kept in store per device and precision)."""
        copies = store.get((self.name, self.precision))
        if copies is None:
            copies = store[(self.name, self.precision)] = StepCopies(params, self.precision)
        copies.enter(self)
        self.copy_scope = copies
        try:
            yield
        finally:
            self.copy_scope = None
            copies.exit(self)

    def launch(self, module: str, kernel: str, n: int, *args) -> None:
        """A grid-stride kernel over n elements."""
        if n <= 0:
            return
        get_kernel(self.device_id, module, kernel)((grid_for(int(n), self.sms),), (256,), args)

    def ix(self, kernel: str, size: int) -> str:
        """The version of a pooling / batch-norm kernel for tensors of `size` elements: 32-bit indices below 2^31
        (common.cuh, HN_TWO_INDEX_KERNELS), unless index64 is set (tests of the 64-bit versions)."""
        return kernel if self.index64 or size >= 2**31 else kernel + "_i32"

    def _host_scalars(self, alpha: float, beta: float):
        """cuBLAS's alpha and beta in host memory: float32 [alpha, beta], made once per pair (gemm, gemm_batched)."""
        key = (float(alpha), float(beta))
        ab = self._alpha_beta.get(key)
        if ab is None:
            ab = self._alpha_beta[key] = np.array([alpha, beta], dtype=np.float32)
        return ab

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
        ab = self._host_scalars(alpha, beta)
        op_a = cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N
        op_b = cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N
        # column-major view: c^T[N,M] = op(b)^T op(a)^T
        args = (handle, op_b, op_a, n, m, k, ab.ctypes.data, b.data.ptr, _ld(b), a.data.ptr, _ld(a),
                ab.ctypes.data + 4, c.data.ptr, _ld(c))
        if self.capturing is not None:
            # CuPy's cuBLAS wrappers refuse to run inside a stream capture (they re-bind the stream first), so
            # the captured call goes to libcublas directly; the handle was bound to the capture stream before.
            status = _raw_cublas("cublasSgemm_v2")(*args)
            if status != 0:
                raise RuntimeError(f"cublasSgemm_v2 failed with status {status} during graph capture")
            return
        self.prepare_capture(self.cupy.cuda.get_current_stream())
        cublas.sgemm(*args)

    def gemm_batched(self, c, a, trans_a: bool, b, trans_b: bool, alpha: float = 1.0, beta: float = 0.0) -> None:
        """c[i] = alpha * op(a[i]) @ op(b[i]) + beta * c[i] for every i of C-contiguous float32 arrays [B, rows,
        cols]: one cuBLAS sgemmStridedBatched in float32 on the current stream, at any precision (the fp32
        convolutions by Winograd's algorithms, winograd.py)."""
        check(c, a, b)
        if not (c.ndim == a.ndim == b.ndim == 3 and c.shape[0] == a.shape[0] == b.shape[0]):
            raise ValueError(f"gemm_batched: c {c.shape}, a {a.shape}, b {b.shape} are not batches of one length")
        _, trans_a, _, trans_b, m, n, k = gemm_operands(c[0], a[0], trans_a, b[0], trans_b, "gemm_batched")
        ab = self._host_scalars(alpha, beta)
        op = {False: 0, True: 1}                        # CUBLAS_OP_N, CUBLAS_OP_T
        # column-major view: c^T[N,M] = op(b)^T op(a)^T, batch after batch
        args = (self.cupy.cuda.device.get_cublas_handle(), op[trans_b], op[trans_a], n, m, k, ab.ctypes.data,
                b.data.ptr, b.shape[2], b.shape[1] * b.shape[2], a.data.ptr, a.shape[2], a.shape[1] * a.shape[2],
                ab.ctypes.data + 4, c.data.ptr, c.shape[2], c.shape[1] * c.shape[2], c.shape[0])
        if self.capturing is None:
            self.prepare_capture(self.cupy.cuda.get_current_stream())
        status = _raw_cublas("cublasSgemmStridedBatched")(*args)
        if status != 0:
            raise RuntimeError(f"cublasSgemmStridedBatched failed with status {status}")

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

    def conv_choice(self, op: str, shape) -> str | None:
        """The algorithm chosen for a convolution op ("fwd", "data", "filter", "pool") of shape (N, C, H, W, K, R,
        S, stride, padding), measured by this process or taken from the tune cache; None before the op has run."""
        return self._tune.get((op, tuple(int(v) for v in shape)))

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

    def _c(self, a):
        return a if a.flags.c_contiguous else self.cupy.ascontiguousarray(a)

    # --- replayed steps ------------------------------------------------------------------------------------------

    def step_runner(self, n_scalars: int, n_seeds: int):
        """hetnet.plan's step runner here: the step captured as a CUDA graph per batch shape and replayed (graph.py);
        HETNET_CUDA_GRAPH=0 runs it eagerly on the same stream."""
        return GraphRunner(self, n_scalars, n_seeds, use_graph=self.cuda_graph)
