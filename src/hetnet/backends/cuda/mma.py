"""Tensor-core GEMMs (mma.cu) with CudaBackend.gemm's conventions: row-major c[M,N] = alpha * op(a) @ op(b) + beta * c,
each matrix float32 with contiguous rows and any row stride, or a transposed view of such a matrix (a and b), the
products on tensor cores in tf32 or bf16 and accumulated in float32.

    >>> from hetnet.backends.cuda.mma import gemm_tc                                      # doctest: +SKIP
    >>> gemm_tc(be, yk[:, n0:n1], w2, False, col, False, precision="bf16")              # doctest: +SKIP
    >>> gemm_tc(be, dw2, dyk, False, col, True, beta=1.0, precision="tf32")             # doctest: +SKIP
    >>> gemm_tc_batched(be, y3, w3[None], False, x3, False, precision="tf32")           # doctest: +SKIP

`plan` does everything but the launch (views, checks, tile, split-K, the kernel's arguments) on array metadata
alone, so it runs without a GPU (tests/test_mma_emulated.py feeds its plans to the CPU emulator). The tile is
chosen by problem size (`choose`); where the tiles would not fill the GPU, the K sum is split over blockIdx.z and the
parts are added into C with float atomics (C is scaled by beta first), so such results are not bit-reproducible.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, replace

import numpy as np

from .kernels import NULL, address, gemm_operands, get_kernel, leading_dim, wgmma_ok
from .mma_tiles import (CONV_CHOICE, FrTile, LAYOUTS, PRECISIONS, TILES, TILES16, TILES16T, TILES16W, TILES32, TILES32W,
                        TILES32X3, TILES32X3W, Tc16Tile, TcTile, TmaTile, tma_fits, tma_pool_fits)

_i32, _i64, _f32 = np.int32, np.int64, np.float32
DEFAULT_SMEM = 48 * 1024       # dynamic shared memory a launch gets without raising the kernel's limit
MIN_SPLIT_TILES = 8            # split-K: at least this many BK steps per part
MAX_SPLITS = 64
GRID_YZ = 65535                # CUDA's limit on gridDim.y and gridDim.z
OUT16 = 16                     # mma.cu's HN_OUT16: in the act word, the output (y or dx) stored as bf16 bits (uint16)
# The tiles the launcher picks from, (large, small) (`choose`): on the H200 the fastest of their kinds over
# cifar-wide's 18 convolution GEMMs (benchmarks/results/NVIDIA-H200/tc_gemm_conv.json, geometric means in TFLOP/s:
# tf32 128x128x32s3 57 against 48 for "l"; bf16 128x128x32s2a 69; the large tile split over K beats the small one on
# every filter gradient, 2x and more; the small tile where M or N fits in it, except bf16 64 x 512K x 27: 18 against
# 22).
CHOICE = {"tf32": ("128x128x32s3", "64x64x32s4"), "bf16": ("128x128x32s2a", "64x64x32")}


@dataclass
class GemmCall:
    """One launch of an mma.cu kernel: which, its grid, and its arguments (a, b, c: the views the kernel reads
    from their first element)."""

    tile: TcTile
    layout: str
    grid: tuple
    a: object
    b: object
    c: object                  # the first item's c
    c_all: object              # every item's (what a split-K launch scales first)
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldc: int
    stride_a: int              # elements between batch items (0: one matrix for every item)
    stride_b: int
    stride_c: int
    alpha: float
    beta: float
    splits: int
    kchunk: int

    @property
    def kernel(self) -> str:
        return self.tile.kernel(self.layout)

    @property
    def block(self) -> tuple:
        return (self.tile.threads,)

    @property
    def prescale(self) -> float | None:
        """What C must be multiplied by before a split-K launch (0: set to zero, never read), else None."""
        return self.beta if self.splits > 1 else None

    def args(self, ptr) -> tuple:
        """The kernel's arguments, ptr(x) giving an array's pointer argument."""
        return (ptr(self.a), ptr(self.b), ptr(self.c), _i32(self.m), _i32(self.n), _i32(self.k), _i32(self.lda),
                _i32(self.ldb), _i32(self.ldc), _i64(self.stride_a), _i64(self.stride_b), _i64(self.stride_c),
                _f32(self.alpha), _f32(0.0 if self.splits > 1 else self.beta), _i32(self.splits),
                _i32(self.kchunk))


def tiles_of(precision: str) -> list[TcTile]:
    return [t for t in TILES if t.precision == precision]


def tile_named(precision: str, name: str) -> TcTile:
    found = [t for t in tiles_of(precision) if t.name == name]
    if not found:
        raise ValueError(f"gemm_tc: no {precision} tile {name!r} (have "
                         f"{', '.join(t.name for t in tiles_of(precision))})")
    return found[0]


def choose(precision: str, m: int, n: int, table: dict = CHOICE) -> TcTile:
    """The small tile of `table` (CHOICE, or CONV_CHOICE for the convolutions) when M or N fits in it (the large one
    would compute mostly padding: cifar-wide's first convolution, 64 filters over 27 taps), else the large tile, whose
    K sum `split_k` splits where its blocks leave SMs idle."""
    large, small = (tile_named(precision, name) for name in table[precision])
    return by_size(large, small, m, n)


def by_size(large, small, m: int, n: int):
    """`small` when M or N fits in it, else `large` (the rule of `choose` and of the channels-last tiles)."""
    return small if m <= small.bm or n <= small.bn else large


def split_k(t: TcTile, m: int, n: int, k: int, batch: int, sms: int) -> int:
    """Parts of the K sum when the tiles alone leave SMs idle: about two blocks per SM, each part at least
    MIN_SPLIT_TILES steps of BK."""
    blocks = math.ceil(m / t.bm) * math.ceil(n / t.bn) * batch
    if blocks >= sms:
        return 1
    return max(1, min(math.ceil(2 * sms / blocks), k // (MIN_SPLIT_TILES * t.bk), MAX_SPLITS))


# split_k_waves: the tiles a block spends outside its K loop (the pipeline's fill, the epilogue's atomic adds of its
# float32 tile), counted as K tiles of work
SPLIT_OVERHEAD_TILES = 4
# At fp32 (split copies, three products a term) a part of the filter gradient's K sum is at most FP32_PART terms: the
# tensor cores' float32 accumulation loses about 6e-9 of the result per term of a part, linearly in the part's length
# (it does not average out as rounding to nearest would), so 2048 terms keep it near 1.3e-5, under float32's 1e-4
# (benchmarks/kernels/NOTES.md, "float32's filter gradient on tensor cores").
FP32_PART = 2048


def split_k_waves(t, m: int, n: int, k: int, sms: int) -> int:
    """Parts of a convolution filter gradient's K sum (K = the batch's pixels, long) for tile t: the count that
    minimises waves x (K tiles a part + SPLIT_OVERHEAD_TILES), a wave being t.min_blocks blocks on each of `sms` SMs
    (__launch_bounds__'s blocks per SM, which the tiles' shared memory and registers also come to), so that the last
    wave is not a few blocks that keep the rest of the card idle; each part at least MIN_SPLIT_TILES steps of BK, at
    most MAX_SPLITS parts; the fewest parts among equals (fewer atomics). At fp32 (t.split) at least k / FP32_PART
    parts, whatever they cost."""
    blocks = math.ceil(m / t.bm) * math.ceil(n / t.bn)
    tiles = math.ceil(k / t.bk)
    wave = sms * max(1, t.min_blocks)
    least = min(math.ceil(k / FP32_PART), GRID_YZ) if getattr(t, "split", 0) else 1
    best, best_cost = least, None
    for parts in range(least, max(least, min(MAX_SPLITS, tiles // MIN_SPLIT_TILES)) + 1):
        cost = math.ceil(blocks * parts / wave) * (math.ceil(tiles / parts) + SPLIT_OVERHEAD_TILES)
        if best_cost is None or cost < best_cost:
            best, best_cost = parts, cost
    return best


def plan(c, a, trans_a: bool, b, trans_b: bool, alpha: float = 1.0, beta: float = 0.0, precision: str = "tf32",
         sms: int = 132, tile: str | None = None, splits: int | None = None, batch: int = 1,
         strides: tuple = (0, 0, 0), c_all=None) -> GemmCall | None:
    """The launch for c = alpha op(a) op(b) + beta c (None when c is empty). tile: a tile's name (default `choose`);
    splits: K parts (default `split_k`). batch, strides: grid.z items, the elements between them in a, b, c (as
    gemm_tc_batched passes them; a, b and c here are the first item's matrices, c_all all of c)."""
    if precision not in PRECISIONS:
        raise ValueError(f"gemm_tc: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    a, trans_a, b, trans_b, m, n, k = gemm_operands(c, a, trans_a, b, trans_b, "gemm_tc")
    if m == 0 or n == 0 or batch == 0:
        return None
    t = choose(precision, m, n) if tile is None else tile_named(precision, tile)
    parts = split_k(t, m, n, k, batch, sms) if splits is None else max(1, int(splits))
    kchunk = math.ceil(math.ceil(k / parts) / t.bk) * t.bk if k > 0 else 0
    parts = math.ceil(k / kchunk) if k > 0 else 1      # no empty part
    grid = (math.ceil(n / t.bn), math.ceil(m / t.bm), batch * parts)
    if grid[1] > GRID_YZ or grid[2] > GRID_YZ or max(m, n, k) >= 2**31:
        raise ValueError(f"gemm_tc: [{m} x {k}] @ [{k} x {n}] (batch {batch}, {parts} K parts) is past the grid's "
                         "limits")
    layout = ("t" if trans_a else "n") + ("t" if trans_b else "n")
    assert layout in LAYOUTS
    return GemmCall(t, layout, grid, a, b, c, c if c_all is None else c_all, m, n, k, leading_dim(a), leading_dim(b),
                    leading_dim(c), *strides, float(alpha), float(beta), parts, kchunk)


_raised: set = set()   # (device, kernel) whose dynamic shared-memory limit was raised


def launch(be, call: GemmCall) -> None:
    """Run a plan on `be`'s device (current stream)."""
    if call.prescale is not None:          # split-K parts add into C
        if call.prescale == 0.0:
            call.c_all.fill(0)
        elif call.prescale != 1.0:
            call.c_all *= _f32(call.prescale)
    _launch_kernel(be, call, call.args(lambda x: x))


def _raise_smem(be, name: str, smem: int):
    """mma.cu's kernel `name`, its dynamic shared-memory limit raised to smem first where that is over the
    default."""
    kern = get_kernel(be.device_id, "mma", name)
    if smem > DEFAULT_SMEM and (be.device_id, name) not in _raised:
        kern.max_dynamic_shared_size_bytes = smem
        _raised.add((be.device_id, name))
    return kern


def _launch_kernel(be, call, args: tuple) -> None:
    """Launch a plan's kernel (a GemmCall or ConvCall) with `args`, its tile's dynamic shared memory allowed first
    where it is over the default."""
    _raise_smem(be, call.kernel, call.tile.smem_bytes)(call.grid, call.block, args, shared_mem=call.tile.smem_bytes)


def gemm_tc(be, c, a, trans_a: bool, b, trans_b: bool, alpha: float = 1.0, beta: float = 0.0,
            precision: str = "tf32", tile: str | None = None, splits: int | None = None) -> None:
    """CudaBackend.gemm on tensor cores: row-major c[M,N] = alpha * op(a) @ op(b) + beta * c, the products in
    `precision` ("tf32" or "bf16"), sums in float32; same views as CudaBackend.gemm. tile / splits: force a tile
    (mma_tiles.TILES, by name) or a split-K count (tests, benchmarks)."""
    call = plan(c, a, trans_a, b, trans_b, alpha, beta, precision, be.sms, tile, splits)
    if call is not None:
        launch(be, call)


def batch_operand(x, batch: int, name: str):
    """(one item's 2-D matrix, elements between items) of a 3-D view [batch or 1, rows, cols] (1: the same matrix
    for every item, stride 0)."""
    if x.ndim != 3 or x.shape[0] not in (1, batch):
        raise ValueError(f"gemm_tc_batched: {name} of shape {x.shape} is not [{batch} or 1, rows, cols]")
    if x.strides[0] % x.itemsize:
        raise ValueError(f"gemm_tc_batched: {name}'s batch stride {x.strides[0]} is not whole elements")
    return x[0], (x.strides[0] // x.itemsize if x.shape[0] > 1 else 0)


def plan_batched(c, a, trans_a: bool, b, trans_b: bool, alpha: float = 1.0, beta: float = 0.0,
                 precision: str = "tf32", sms: int = 132, tile: str | None = None,
                 splits: int | None = None) -> GemmCall | None:
    """`plan` for 3-D views: c[i] = alpha op(a[i]) op(b[i]) + beta c[i] over c's first axis, a or b of batch 1 for
    the same matrix in every item. Each item's matrices as in `plan` (one layout for all items)."""
    if c.ndim != 3:
        raise ValueError(f"gemm_tc_batched: c of shape {c.shape} is not [batch, rows, cols]")
    n_items = c.shape[0]
    (a2, sa), (b2, sb), (c2, sc) = (batch_operand(x, n_items, name) for x, name in ((a, "a"), (b, "b"), (c, "c")))
    if n_items > 1 and sc == 0:
        raise ValueError("gemm_tc_batched: c's items overlap (batch stride 0)")
    # a transposed view of an item (rows not contiguous) is taken as its transpose (gemm_operands, in plan); the
    # batch strides stay those of the 3-D views
    return plan(c2, a2, trans_a, b2, trans_b, alpha, beta, precision, sms, tile, splits, n_items, (sa, sb, sc), c)


def gemm_tc_batched(be, c, a, trans_a: bool, b, trans_b: bool, alpha: float = 1.0, beta: float = 0.0,
                    precision: str = "tf32", tile: str | None = None, splits: int | None = None) -> None:
    """gemm_tc over the first axis of 3-D views in one launch (grid.z): c[i] = alpha op(a[i]) op(b[i]) + beta c[i];
    a or b with a first axis of 1 is the same matrix for every i (e.g. a convolution's weights against each image's
    columns)."""
    call = plan_batched(c, a, trans_a, b, trans_b, alpha, beta, precision, be.sms, tile, splits)
    if call is not None:
        launch(be, call)


# --- convolutions as implicit GEMMs (mma.cu, HN_CONV): the forward and the data gradient -----------------------


@dataclass
class ConvCall:
    """One launch of an HN_CONV kernel. op "fwd": y = act(conv(x, w) + b), the GEMM M = output channels, N = images
    x P x Q, K = C x R x S, x gathered; op "data": dx = conv_backward_data(dy, w) * (relu_x > 0), M = input channels,
    N = images x H x W, K = output channels x R x S, dy and w gathered; op "filter": dw += conv_backward_filter(dy, x),
    M = output channels, N = C x R x S, K = images x P x Q, dy and x gathered, K split over grid.z (mma.cu)."""

    op: str
    tile: TcTile | Tc16Tile
    grid: tuple
    src: object                # x (fwd) or dy (data)
    w: object
    aux: object                # b (fwd) or relu_x (data), or None
    out: object                # y or dx
    m: int
    n: int
    k: int
    geometry: tuple            # C, H, W, R, S, P, Q, O, stride, pad
    act: int                   # kernels.ACTS code (fwd)
    splits: int = 1            # K parts over grid.z (filter), each kchunk long
    kchunk: int = 0
    sums: object = None        # a TMA tile's forward or pooled forward: its bf16 output's batch-norm statistics
    #                            (zeroed_sums; epilogue_sums_fit), else None

    @property
    def kernel(self) -> str:
        return self.tile.conv_kernel(self.op)

    @property
    def block(self) -> tuple:
        return (self.tile.threads,)

    def args(self, ptr, null) -> tuple:
        """The kernel's arguments, ptr(x) giving an array's pointer argument, `null` the null pointer."""
        return (ptr(self.src), ptr(self.w), null if self.aux is None else ptr(self.aux), ptr(self.out),
                *(_i32(v) for v in (self.m, self.n, self.k, *self.geometry, self.act, self.splits,
                                    self.kchunk or self.k)))


def conv_fits(src, out_size: int) -> bool:
    """Whether the kernels' int32 offsets hold: the gathered tensor (x for the forward, dy for the data gradient)
    with one image more, and the output (of out_size elements), below 2^31 elements."""
    per_image = src.size // max(src.shape[0], 1)
    return src.size + per_image < 2**31 and out_size < 2**31


def _conv_tile(precision: str, tile: str | None, m: int, n: int) -> TcTile:
    if tile is None:
        return choose(precision, m, n, CONV_CHOICE)
    if tile not in CONV_CHOICE[precision]:
        raise ValueError(f"conv_tc: no convolution kernel on tile {tile!r} (have {', '.join(CONV_CHOICE[precision])})")
    return tile_named(precision, tile)


def _conv_call(op: str, precision: str, tile: str | None, src, w, aux, out, m: int, n: int, k: int, geometry: tuple,
               act: int = 0, sms: int | None = None, splits: int | None = None) -> ConvCall | None:
    """The ConvCall of an op whose shapes were checked: every tensor contiguous float32, the int32 offsets holding
    (conv_fits), the tile, the grid (the filter gradient's K split as `split_k_waves` says for `sms` SMs, or in `splits`
    parts); None when the output is empty."""
    if precision not in PRECISIONS:
        raise ValueError(f"conv_tc: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    for a in (src, w, aux, out):
        if a is not None and (a.dtype != np.float32 or not a.flags.c_contiguous):
            raise ValueError("conv_tc: every tensor must be contiguous float32")
    if not conv_fits(src, out.size):
        raise ValueError(f"conv_tc: a tensor of shape {src.shape} is past the kernel's 32-bit offsets")
    if m == 0 or n == 0 or k == 0:          # (k == 0: a filter gradient of no images adds nothing)
        return None
    return _tile_call(op, _conv_tile(precision, tile, m, n), src, w, aux, out, m, n, k, geometry, act, sms, splits)


def _tile_call(op: str, t, src, w, aux, out, m: int, n: int, k: int, geometry: tuple, act: int, sms: int | None,
               splits: int | None) -> ConvCall:
    """The ConvCall of op on tile t (a TcTile or Tc16Tile): the filter gradient's K split as `split_k_waves` says
    for `sms` SMs, or in `splits` parts; a persistent tile's grid at most its min_blocks on each of `sms` SMs."""
    parts = 1 if op != "filter" else (split_k_waves(t, m, n, k, sms) if splits is None else max(1, int(splits)))
    kchunk = math.ceil(math.ceil(k / parts) / t.bk) * t.bk
    parts = math.ceil(k / kchunk)                      # no empty part
    grid = (math.ceil(n / t.bn), math.ceil(m / t.bm), parts)
    if getattr(t, "persistent", False):                # min_blocks blocks an SM, each taking tiles in turn
        grid = (min(grid[0] * grid[1], sms * t.min_blocks), 1, 1)
    if grid[2] > GRID_YZ:
        raise ValueError(f"conv_tc: {parts} K parts are past the grid's limit")
    return ConvCall(op, t, grid, src, w, aux, out, m, n, k, geometry, int(act), parts, kchunk)


def _conv_sizes(x_shape, w_shape, stride: int, pad: int) -> tuple:
    """(n, C, H, W, O, R, S, P, Q) of a convolution of x_shape [n, C, H, W] with w_shape [O, C, R, S]."""
    n, c, h, wd = x_shape
    o, _, r, s = w_shape
    return n, c, h, wd, o, r, s, (h + 2 * pad - r) // stride + 1, (wd + 2 * pad - s) // stride + 1


def plan_conv(y, x, w, b, stride: int, pad: int, act: int = 0, precision: str = "tf32",
              tile: str | None = None) -> ConvCall | None:
    """The launch for y = act(conv(x, w) + b) (x [n, C, H, W], w [O, C, R, S], b [O] or None, y [n, O, P, Q], all
    contiguous float32; act 0 none, 1 ReLU); None when y is empty. tile: a CONV_CHOICE tile's name (default
    `choose` from CONV_CHOICE)."""
    n, c, h, wd, o, r, s, p, q = _conv_sizes(x.shape, w.shape, stride, pad)
    if tuple(y.shape) != (n, o, p, q) or w.shape[1] != c or (b is not None and tuple(b.shape) != (o,)):
        raise ValueError(f"conv_tc: x {x.shape}, w {w.shape}, b {None if b is None else b.shape}, y {y.shape} do not "
                         f"fit together")
    return _conv_call("fwd", precision, tile, x, w, b, y, o, n * p * q, c * r * s,
                      (c, h, wd, r, s, p, q, o, stride, pad), act)


def plan_conv_data(dx, dy, w, relu_x, stride: int, pad: int, precision: str = "tf32",
                   tile: str | None = None) -> ConvCall | None:
    """The launch for dx = conv_backward_data(dy, w), zeroed where relu_x <= 0 when relu_x is given (dy [n, O, P, Q],
    w [O, C, R, S], dx and relu_x [n, C, H, W], all contiguous float32); None when dx is empty."""
    n, c, h, wd, o, r, s, p, q = _conv_sizes(dx.shape, w.shape, stride, pad)
    if (tuple(dy.shape) != (n, o, p, q) or w.shape[1] != c
            or (relu_x is not None and tuple(relu_x.shape) != tuple(dx.shape))):
        raise ValueError(f"conv_tc: dy {dy.shape}, w {w.shape}, dx {dx.shape} do not fit together")
    return _conv_call("data", precision, tile, dy, w, relu_x, dx, c, n * h * wd, o * r * s,
                      (c, h, wd, r, s, p, q, o, stride, pad))


def plan_conv_filter(dw, dy, x, stride: int, pad: int, precision: str = "tf32", sms: int = 132,
                     tile: str | None = None, splits: int | None = None) -> ConvCall | None:
    """The launch for dw += conv_backward_filter(dy, x) (dy [n, O, P, Q], x [n, C, H, W], dw [O, C, R, S], all
    contiguous float32): the K sum over images x P x Q split over grid.z (`split_k_waves`, or `splits` parts) and added
    into dw with atomics; None when dw is empty. The bias gradient is not its job (conv.channel_sum)."""
    n, c, h, wd, o, r, s, p, q = _conv_sizes(x.shape, dw.shape, stride, pad)
    if tuple(dy.shape) != (n, o, p, q):
        raise ValueError(f"conv_tc: dy {dy.shape}, x {x.shape}, dw {dw.shape} do not fit together")
    if dy.size >= 2**31:                     # (K = n * P * Q with it)
        raise ValueError(f"conv_tc: dy of shape {dy.shape} is past the kernel's 32-bit offsets")
    return _conv_call("filter", precision, tile, x, dy, None, dw, o, c * r * s, n * p * q,
                      (c, h, wd, r, s, p, q, o, stride, pad), sms=sms, splits=splits)


def launch_conv(be, call: ConvCall | None) -> None:
    """Run a convolution plan on `be`'s device (current stream); a wgmma tile only where the device runs it, a TMA
    tile with its sums (or null) and its two tensor maps (tensor_maps) as the kernel's last parameters."""
    if call is not None:
        if getattr(call.tile, "wgmma", False) and not wgmma_ok(be.device_id):
            raise ValueError(f"conv16: tile {call.tile.name} needs wgmma (sm_90a), which this device's build lacks")
        if isinstance(call.tile, TmaTile):
            kern = _raise_smem(be, call.kernel, call.tile.smem_bytes)
            args = call.args(lambda a: ctypes.c_void_p(a.data.ptr), ctypes.c_void_p(0))
            launch_raw(be, kern, call.grid, call.block, call.tile.smem_bytes,
                       [ctypes.c_int32(int(a)) if isinstance(a, np.integer) else a for a in args]
                       + [ctypes.c_void_p(0 if call.sums is None else call.sums.data.ptr)] + list(tensor_maps(call)))
        elif call.sums is not None:
            raise ValueError(f"conv16: tile {call.tile.name} makes no batch-norm statistics (epilogue_sums_fit)")
        else:
            _launch_kernel(be, call, call.args(lambda a: a, NULL))


# --- the TMA-fed convolutions (mma.cu HN_CONV16T): tensor maps and the launch ----------------------------------------
# A tensor map (CUtensorMap, 128 bytes) is encoded on the host by the driver (cuTensorMapEncodeTiled / Im2col, from
# libcuda through ctypes) for the call's own arrays, and passed by value as a kernel parameter: nothing is written to
# the device, so a launch inside a graph capture keeps its maps in the graph. cuda.h's enumerators:
_BFLOAT16, _SWIZZLE_128B, _L2_128B, _OOB_ZERO, _INTERLEAVE_NONE = 9, 3, 2, 0, 0
_libcuda = None


def _driver():
    global _libcuda
    if _libcuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        for name in ("cuTensorMapEncodeTiled", "cuTensorMapEncodeIm2col", "cuLaunchKernel"):
            getattr(lib, name).restype = ctypes.c_int
        _libcuda = lib
    return _libcuda


class TensorMap(ctypes.Structure):
    """A CUtensorMap: 128 opaque bytes, 64-byte aligned where the encoder writes them (_encode)."""
    _fields_ = [("bits", ctypes.c_uint64 * 16)]


def _encode(fn: str, *args) -> TensorMap:
    raw = ctypes.create_string_buffer(128 + 64)               # the encoder wants 64-byte alignment; ctypes gives 16
    addr = (ctypes.addressof(raw) + 63) & ~63
    rc = getattr(_driver(), fn)(ctypes.c_void_p(addr), *args)
    if rc != 0:
        raise RuntimeError(f"conv16: {fn} failed with CUresult {rc}")
    return TensorMap.from_buffer_copy(ctypes.string_at(addr, 128))


def rows_spec(a16, cols: int, box_rows: int) -> dict:
    """A tile-mode map of a contiguous bf16 tensor as a 2D [rows][cols] one, boxes of 64 columns x box_rows rows,
    128-byte swizzle, zeros past its edges: the weights [M][R][S][C] as [M][K] (the forward's A), dy [n][P][Q][O] as
    [n P Q][O] (the filter gradient's). A spec holds the encoder's parameters (encode_map; the CPU emulator's
    encoder, tests/emu_tma.py, reads the same)."""
    return {"mode": "tile", "array": a16, "dims": (cols, a16.size // cols), "strides": (2 * cols,),
            "box": (64, box_rows)}


def im2col_spec(x16, r: int, s: int, stride: int, pad: int, pixels: int) -> dict:
    """An im2col-mode map of the channels-last input x [n][H][W][C] bf16: boxes of `pixels` output pixels x 64
    channels of an R x S convolution (stride, padding pad), 128-byte swizzle, zeros outside the image and past the
    last one; the corners (W, H) {-pad, -pad} and {pad - (S-1), pad - (R-1)} bound the first tap's input corners."""
    n, h, w, c = x16.shape
    return {"mode": "im2col", "array": x16, "dims": (c, w, h, n), "strides": (2 * c, 2 * c * w, 2 * c * w * h),
            "lower": (-pad, -pad), "upper": (pad - (s - 1), pad - (r - 1)), "channels": 64, "pixels": pixels,
            "element_strides": (1, stride, stride, 1)}


def encode_map(spec: dict) -> TensorMap:
    """The driver's CUtensorMap of a rows_spec or im2col_spec."""
    args = (_BFLOAT16, len(spec["dims"]), ctypes.c_void_p(spec["array"].data.ptr), _u64(*spec["dims"]),
            _u64(*spec["strides"]))
    if spec["mode"] == "tile":
        return _encode("cuTensorMapEncodeTiled", *args, _u32(*spec["box"]), _u32(1, 1), _INTERLEAVE_NONE,
                       _SWIZZLE_128B, _L2_128B, _OOB_ZERO)
    return _encode("cuTensorMapEncodeIm2col", *args, (ctypes.c_int * 2)(*spec["lower"]),
                   (ctypes.c_int * 2)(*spec["upper"]), spec["channels"], spec["pixels"],
                   _u32(*spec["element_strides"]), _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_128B, _OOB_ZERO)


def _u64(*v):
    return (ctypes.c_uint64 * len(v))(*v)


def _u32(*v):
    return (ctypes.c_uint32 * len(v))(*v)


def map_specs(call: ConvCall) -> tuple:
    """A TMA tile's two maps, (A's, B's), as specs: the forward's, pooled forward's and data gradient's A is the
    weights [M][K] in boxes of 64 K x BM, B the input in im2col boxes of BN pixels; the filter gradient's A is dy
    [n P Q][O] in boxes of 64 x 64, B x in im2col boxes of 64 pixels."""
    c, h, w, r, s, p, q, o, stride, pad = call.geometry     # (the pooled forward's p, q: its pooled sizes)
    if call.op == "filter":
        return rows_spec(call.w, o, 64), im2col_spec(call.src, r, s, stride, pad, 64)
    return (rows_spec(call.w, call.w.size // call.w.shape[0], call.tile.bm),
            im2col_spec(call.src, r, s, stride, pad, call.tile.bn))


def tensor_maps(call: ConvCall) -> tuple:
    """(A's map, B's map) of a TMA tile's call, encoded by the driver."""
    return tuple(encode_map(spec) for spec in map_specs(call))


def launch_raw(be, kern, grid: tuple, block: tuple, smem: int, params: list) -> None:
    """Launch a compiled kernel (kernels.get_kernel's) with cuLaunchKernel on the current stream, `params` its
    parameters as ctypes values in order (structures such as TensorMap passed by value)."""
    grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
    ptrs = (ctypes.c_void_p * len(params))(*(ctypes.addressof(v) for v in params))
    stream = be.cupy.cuda.get_current_stream().ptr
    rc = _driver().cuLaunchKernel(ctypes.c_void_p(kern.kernel.ptr), *(ctypes.c_uint(v) for v in grid + block),
                                  ctypes.c_uint(smem), ctypes.c_void_p(stream), ptrs, None)
    if rc != 0:
        raise RuntimeError(f"cuLaunchKernel failed with CUresult {rc}")


def conv_tc(be, y, x, w, b, stride: int, pad: int, act: int = 0, tile: str | None = None) -> None:
    """y = act(conv(x, w) + b) on tensor cores at `be`'s precision (tf32 or bf16), sums in float32 (plan_conv)."""
    launch_conv(be, plan_conv(y, x, w, b, stride, pad, act, be.precision, tile))


def conv_data_tc(be, dx, dy, w, relu_x, stride: int, pad: int, tile: str | None = None) -> None:
    """dx = conv_backward_data(dy, w) (* (relu_x > 0)) on tensor cores at `be`'s precision (plan_conv_data)."""
    launch_conv(be, plan_conv_data(dx, dy, w, relu_x, stride, pad, be.precision, tile))


def conv_filter_tc(be, dw, dy, x, stride: int, pad: int, tile: str | None = None, splits: int | None = None) -> None:
    """dw += conv_backward_filter(dy, x) on tensor cores at `be`'s precision (plan_conv_filter)."""
    launch_conv(be, plan_conv_filter(dw, dy, x, stride, pad, be.precision, be.sms, tile, splits))


# --- the channels-last convolutions (mma.cu, HN_CONV16 / HN_CONV16W at bf16, HN_CONV32W / HN_CONV32F at tf32):
# conv.py's "tc16" and "tc32" ---------------------------------------------------------------------------------------
# x, dy and w are read as copies stored channels-last, x [n, H, W, C], w [O, R, S, C], dy [n, P, Q, O]: bf16 bits
# (uint16 arrays), float32 already rounded to tf32 (float32 arrays), or at fp32 split copies, each value as two tf32
# parts hi + lo, each chunk of 4 channels as its hi chunk then its lo chunk (float32 arrays [..., C / 4, 2, 4]: six
# dimensions); the copy says which kernels run (_copy_precision).
# Outputs are float32 as the other kernels write them (y, dx NCHW; the filter gradient [O, R, S, C], added into the
# weights' layout by conv.cu's add_from_nhwc). The plans take the channels-last arrays (the emulator feeds them NumPy
# ones); conv16, conv16_data and conv16_filter make them on the GPU from NCHW float32 at `be`'s precision (to_nhwc).
# Each precision's copies: the suffix of conv.cu's kernels that make them (to_nhwc<s>, turn_weights<s>,
# pool_grad_nhwc<s>), their storage, and the multiple of the channel count they need (bf16 pairs, fp32's chunks).
# A plan's `tile` is a tile of these tables by name (None: by size, `_tile16`), or a Tc16Tile itself: a kernel sandbox's
# (benchmarks/kernels/conv16_ws.py), which launches the plan from its own module.
COPIES = {"bf16": ("16", np.uint16, 2), "tf32": ("32", np.float32, 1), "fp32": ("32x3", np.float32, 4)}
COPY_DTYPE = {precision: dtype for precision, (_, dtype, _) in COPIES.items()}
# the channels of one 16-byte chunk, the kernels' unit along C: to_nhwc pads its copies' channels to a multiple of it
# with zeros (a 3-channel image as 8 channels at bf16), so that a convolution's forward and filter gradient take any C
CHUNK = {"bf16": 8, "tf32": 4, "fp32": 4}
TILES_CL = {"bf16": (TILES16, TILES16W), "tf32": (TILES32, TILES32W),   # (mma.sync tiles, wgmma tiles) per op
            "fp32": (TILES32X3, TILES32X3W)}


def conv16_fits(op: str, c: int, o: int, r: int, s: int, stride: int, pad: int, precision: str = "bf16") -> bool:
    """Whether the channels-last kernels of `precision` compute `op` on this shape: channels read in whole 16-byte
    chunks (CHUNK: 8 bf16 or 4 float32): C of x for the forward and filter gradient any (to_nhwc pads the copies of x
    and w), O of dy for the filter and data gradients a multiple of the chunk (dy's copies come from other kernels
    too, unpadded); the data gradient, a forward over dy, at stride 1 with a square kernel and pad < R."""
    e = CHUNK[precision]
    if op in ("fwd", "pool"):
        return True
    if op == "filter":
        return o % e == 0
    return o % e == 0 and stride == 1 and r == s and 0 <= pad < r


def tiles16(op: str, precision: str = "bf16", wgmma: bool = True) -> tuple:
    """The channels-last tiles of op at precision: the mma.sync ones, then (with wgmma) the wgmma ones."""
    sync, wg = TILES_CL[precision]
    return tuple(sync.get(op, ())) + (tuple(wg.get(op, ())) if wgmma else ())


def _tile16(op: str, tile: str | Tc16Tile | None, m: int, n: int, precision: str = "bf16") -> Tc16Tile:
    """The channels-last tile of op at precision: `tile` itself when it is a Tc16Tile (of that precision), the
    tile named `tile`, or by size (`by_size`) from the mma.sync pair."""
    if isinstance(tile, Tc16Tile):
        if tile.precision != precision:
            raise ValueError(f"conv16: tile {tile.name} is {tile.precision}, the copies {precision}")
        return tile
    have = tiles16(op, precision) + (TILES16T.get(op, ()) if precision == "bf16" else ())
    if tile is not None:
        found = [t for t in have if t.name == tile]
        if not found:
            raise ValueError(f"conv16: no {precision} {op} tile {tile!r} (have {', '.join(t.name for t in have)})")
        return found[0]
    sync = TILES_CL[precision][0].get(op)
    if not sync:
        raise ValueError(f"conv16: no {precision} {op} tile by size; name one of {', '.join(t.name for t in have)}")
    return by_size(sync[0], sync[1], m, n)


def _copy_precision(a) -> str:
    """The precision whose channels-last copy `a` is: bf16 (uint16), tf32 (float32), fp32 (float32 split, 6-D)."""
    if a.dtype == np.uint16:
        return "bf16"
    if a.dtype == np.float32:
        return "fp32" if a.ndim == 6 else "tf32"
    raise ValueError(f"conv16: a channels-last copy is uint16 (bf16) or float32 (tf32, fp32), not {a.dtype}")


def _nhwc_shape(a) -> tuple:
    """The [n, H, W, C] (or [O, R, S, C]) a channels-last copy stands for (a split copy's last three dimensions are
    C / 4, 2, 4)."""
    return (*a.shape[:3], a.shape[3] * 4) if a.ndim == 6 else tuple(a.shape)


def _call16(op, tile, src, w, aux, out, m, n, k, geometry, act=0, sms=None, splits=None) -> ConvCall | None:
    precision = _copy_precision(src)
    out_dtype = np.uint16 if act & OUT16 else np.float32
    for name, a, dtype in (("input", src, COPY_DTYPE[precision]), ("weights", w, COPY_DTYPE[precision]),
                           ("aux", aux, np.float32), ("output", out, out_dtype)):
        if a is not None and (a.dtype != dtype or not a.flags.c_contiguous):
            raise ValueError(f"conv16: the {name} must be contiguous {np.dtype(dtype).name}")
    if not conv_fits(src, out.size) or w.size >= 2**31:
        raise ValueError(f"conv16: a tensor of shape {src.shape} is past the kernel's 32-bit offsets")
    if m == 0 or n == 0 or k == 0:
        return None
    t = _tile16(op, tile, m, n, precision)
    if isinstance(t, TmaTile) and not tma_fits(op, geometry[0]):       # geometry[0]: the gathered channels
        raise ValueError(f"conv16: the TMA tile {t.name} runs the forward, data and filter gradients on channels a "
                         f"multiple of 64, not the {op} op on {geometry[0]}")
    return _tile_call(op, t, src, w, aux, out, m, n, k, geometry, act, sms, splits)


def plan_conv16(y, x16, w16, b, stride: int, pad: int, act: int = 0, tile: str | Tc16Tile | None = None,
                sms: int = 132) -> ConvCall | None:
    """y [n, O, P, Q] = act(conv(x, w) + b) from the channels-last copies x16 [n, H, W, C] and w16 [O, R, S, C]
    (COPY_DTYPE), b [O] float32 or None; act 0 none, 1 ReLU, plus OUT16 for y uint16 (bf16 bits) instead of float32;
    sms: the device's SMs (a persistent tile's grid). None when y is empty."""
    n, h, wd, c = _nhwc_shape(x16)
    o, r, s, c2 = _nhwc_shape(w16)
    *_, p, q = _conv_sizes((n, c, h, wd), (o, c, r, s), stride, pad)
    if (c2 != c or tuple(y.shape) != (n, o, p, q) or (b is not None and tuple(b.shape) != (o,))
            or not conv16_fits("fwd", c, o, r, s, stride, pad, _copy_precision(x16))):
        raise ValueError(f"conv16: x {x16.shape}, w {w16.shape}, y {y.shape} do not fit together")
    return _call16("fwd", tile, x16, w16, b, y, o, n * p * q, r * s * c, (c, h, wd, r, s, p, q, o, stride, pad), act,
                   sms)


def pooled_outputs(xp, n: int, o: int, p: int, q: int, out16: bool = False):
    """(buf, y, arg): the pooled forward's output buffer (plan_conv16_pool), and its two views, y [n, O, P, Q]
    float32 (out16: uint16, bf16 bits) and the argmax bytes arg [n, O, P, Q] uint8 after it (maxpool2d_forward's
    pair)."""
    size, item = n * o * p * q, 2 if out16 else 4
    buf = xp.empty(-(-(item + 1) * size // item), dtype=np.uint16 if out16 else np.float32)
    return buf, buf[:size].reshape(n, o, p, q), buf.view(np.uint8)[item * size:(item + 1) * size].reshape(n, o, p, q)


def plan_conv16_pool(buf, x16, w16, b, stride: int, pad: int, act: int = 0, tile: str | Tc16Tile | None = None,
                     sms: int = 132) -> ConvCall | None:
    """max_pool2d(act(conv(x, w) + b), 2, 2) and its argmax bytes into buf (pooled_outputs), from x16 [n, H, W, C]
    and w16 [O, R, S, C] (copies, COPY_DTYPE), b [O] float32 or None: the forward's GEMM on its tile, its columns in window
    order, pooled in the epilogue (mma.cu, EPI 4); act and sms as plan_conv16's (OUT16: buf is pooled_outputs' out16
    buffer). None when the pooled output is empty."""
    n, h, wd, c = _nhwc_shape(x16)
    o, r, s, c2 = _nhwc_shape(w16)
    *_, p, q = _conv_sizes((n, c, h, wd), (o, c, r, s), stride, pad)
    pp, pq = p // 2, q // 2
    count = n * pp * pq
    item = 2 if act & OUT16 else 4
    if (c2 != c or buf.ndim != 1 or buf.size * item < (item + 1) * o * count
            or (b is not None and tuple(b.shape) != (o,))
            or not conv16_fits("pool", c, o, r, s, stride, pad, _copy_precision(x16))):
        raise ValueError(f"conv16: x {x16.shape}, w {w16.shape}, pooled buffer {buf.shape} do not fit together")
    if not conv_fits(x16, buf.size) or count * 4 >= 2**31:
        raise ValueError(f"conv16: a tensor of shape {x16.shape} is past the kernel's 32-bit offsets")
    columns = 16 * (-(-count // 4))          # in window order
    t = _tile16("pool", tile, o, columns, _copy_precision(x16)) if tile is not None else None
    if isinstance(t, TmaTile):
        if p != 2 * pp or q != 2 * pq or not tma_pool_fits(t, p, q):
            raise ValueError(f"conv16: the TMA tile {t.name} pools an even output of 8, 16 or 32 columns, whole pairs "
                             f"of rows to a warpgroup, not {p} x {q}")
        columns = n * p * q                  # the convolution's output pixels, in rows
    call = _call16("pool", tile, x16, w16, b, buf, o, columns, r * s * c, (c, h, wd, r, s, pp, pq, o, stride, pad),
                   act, sms)
    if call is not None:
        call.kchunk = count          # the kernel's count of pooled outputs (HN_CONV16's EPI 4)
    return call


def epilogue_sums_fit(call: ConvCall | None) -> bool:
    """Whether the call's epilogue can add its output's batch-norm statistics (mma.cu hn_add_row_sums, ConvCall.sums):
    a TMA tile's forward or pooled forward with bf16 output (OUT16) through its staged epilogue, which runs where the
    output is 16-byte aligned and its planes whole multiples of 8 (forward) or 16 (pooled) outputs (hn_convt_fwd,
    hn_convt_pool_epilogue_of)."""
    if call is None or not isinstance(call.tile, TmaTile) or call.op not in ("fwd", "pool") or not call.act & OUT16:
        return False
    p, q = call.geometry[5:7]                  # (the pooled forward's: its pooled sizes)
    return p * q % (8 if call.op == "fwd" else 16) == 0 and address(call.out) % 16 == 0


SUMS_COPIES = 32        # mma.cu's HN_SUMS_COPIES: the copies of a batch norm's sums that a convolution adds into


def zeroed_sums(xp, channels: int):
    """The float64 sums a convolution adds its output's batch-norm statistics into (conv_small_fwd_tc, the TMA
    tiles' staged epilogues), zeroed: SUMS_COPIES copies of [sum per channel, sum of squares per channel], each block
    adding into one, then the count (mma.cu's HN_SUMS_COPIES; norm.py's batch norm adds the copies up)."""
    return xp.zeros((SUMS_COPIES * 2 * channels + 1,), dtype=np.float64)


def folded_sums(sums: np.ndarray, channels: int) -> np.ndarray:
    """[sum per channel, sum of squares per channel, count] of zeroed_sums' copies, copied to the host."""
    return np.append(sums[:-1].reshape(-1, 2 * channels).sum(axis=0), sums[-1])


def with_sums(xp, call: ConvCall | None) -> ConvCall | None:
    """The call with zeroed sums (zeroed_sums) for its output's batch-norm statistics where epilogue_sums_fit, else
    as it is."""
    if epilogue_sums_fit(call):
        call.sums = zeroed_sums(xp, call.m)
    return call


def plan_conv16_data(dx, dy16, wt16, relu_x, pad: int, tile: str | Tc16Tile | None = None, out16: bool = False,
                     sms: int = 132) -> ConvCall | None:
    """dx [n, C, H, W] = conv_backward_data(dy, w) (* (relu_x > 0) when relu_x is given) of a stride-1 convolution
    with padding `pad`, from the copies dy16 [n, P, Q, O] and wt16, the turned weights [C, R, S, O] (turn_weights),
    as the forward over dy with padding R - 1 - pad; dx float32, or with out16 uint16 (bf16 bits); sms as
    plan_conv16's. None when dx is empty."""
    n, p, q, o = _nhwc_shape(dy16)
    c, r, s, o2 = _nhwc_shape(wt16)
    h, wd = dx.shape[2:]
    if (o2 != o or tuple(dx.shape) != (n, c, p + r - 1 - 2 * pad, q + s - 1 - 2 * pad)
            or (relu_x is not None and tuple(relu_x.shape) != tuple(dx.shape))
            or not conv16_fits("data", c, o, r, s, 1, pad, _copy_precision(dy16))):
        raise ValueError(f"conv16: dy {dy16.shape}, turned w {wt16.shape}, dx {dx.shape} do not fit together")
    return _call16("data", tile, dy16, wt16, relu_x, dx, c, n * h * wd, r * s * o,
                   (o, p, q, r, s, h, wd, c, 1, r - 1 - pad), OUT16 if out16 else 0, sms)


def plan_conv16_filter(dw16, dy16, x16, stride: int, pad: int, sms: int = 132, tile: str | Tc16Tile | None = None,
                       splits: int | None = None, k_major=None) -> ConvCall | None:
    """dw16 [O, R, S, C] float32 += conv_backward_filter(dy, x) from the copies dy16 [n, P, Q, O] and x16 [n, H, W,
    C], the K sum over images x P x Q split over grid.z (`split_k_waves`, or `splits` parts) and added with
    atomics. An r tile (FrTile) reads dy from its K-major copy instead: k_major() makes it (dy_t's layout), called
    only for such a tile."""
    n, h, wd, c = _nhwc_shape(x16)
    o, r, s, c2 = dw16.shape
    *_, p, q = _conv_sizes((n, c, h, wd), (o, c, r, s), stride, pad)
    if (c2 != c or _nhwc_shape(dy16) != (n, p, q, o) or _copy_precision(dy16) != _copy_precision(x16)
            or not conv16_fits("filter", c, o, r, s, stride, pad, _copy_precision(x16))):
        raise ValueError(f"conv16: dy {dy16.shape}, x {x16.shape}, dw {dw16.shape} do not fit together")
    call = _call16("filter", tile, x16, dy16, None, dw16, o, r * s * c, n * p * q,
                   (c, h, wd, r, s, p, q, o, stride, pad), sms=sms, splits=splits)
    if call is None or not isinstance(call.tile, FrTile):
        return call
    if k_major is None:
        raise ValueError(f"conv16: the r tile {call.tile.name} reads dy's K-major copy (dy_t): give k_major")
    dyt = k_major()
    if tuple(dyt.shape) != (o, _k_major_ld(n * p * q)) or dyt.dtype != np.float32 or not dyt.flags.c_contiguous:
        raise ValueError(f"conv16: dy's K-major copy {dyt.shape} is not dy_t's of dy {dy16.shape}")
    return replace(call, w=dyt)


def _k_major_ld(k: int) -> int:
    """dy_t's row length for K = n P Q: K rounded up to 4 (rows of whole 16-byte chunks)."""
    return -(-k // 4) * 4


def reads_k_major(tile) -> bool:
    """Whether filter-gradient tile `tile` (a name or a tile) reads dy's K-major copy (an r tile: plan_conv16_filter's
    k_major)."""
    if isinstance(tile, str):
        tile = next((t for t in tiles16("filter", "tf32") if t.name == tile), None)
    return isinstance(tile, FrTile)


def _k_major_copy(be, c: int, k: int):
    """An uninitialised K-major copy [c, ldk] of a channels-last tf32 copy of c channels over k pixels."""
    return be.xp.empty((c, _k_major_ld(k)), dtype=np.float32)


def dy_t(be, dy16):
    """The K-major copy the r tiles read of the tf32 channels-last copy dy16 [n, P, Q, O]: [O, ldk], column k = (img,
    p, q), ldk = n P Q rounded up to 4, zeros past n P Q (conv.cu's nhwc32_t). to_nhwc and pool_grad_nhwc make it
    beside the channels-last copy in the same launch (k_major): this transpose is for a copy made without it."""
    o = dy16.shape[-1]
    k = dy16.size // max(o, 1)
    out = _k_major_copy(be, o, k)
    if out.size:
        get_kernel(be.device_id, "conv", "nhwc32_t")((math.ceil(out.shape[1] / 32), math.ceil(o / 32)), (256,),
                                                     (dy16, out, _i32(k), _i32(o), _i32(out.shape[1])))
    return out


def to_nhwc16(be, x):
    """x [n, C, *spatial] float32 (contiguous) as bf16 bits [n, *spatial, Cp] (conv.cu's to_nhwc16), Cp = C rounded
    up to CHUNK (the channels past C zero): an activation NCHW -> NHWC, or weights [O, C, R, S] -> [O, R, S, Cp]."""
    return _to_nhwc(be, x, "bf16")


def to_nhwc(be, x, k_major: bool = False):
    """x's channels-last copy at `be`'s precision, its channels C padded with zeros to Cp, a multiple of CHUNK:
    to_nhwc16 at bf16; at tf32 float32 rounded to tf32 [n, *spatial, Cp] (conv.cu's to_nhwc32); at fp32 the split
    copy [n, *spatial, Cp / 4, 2, 4] (to_nhwc32x3). k_major (tf32 only): the pair (that copy, its K-major copy as
    dy_t's, the r tiles' dy), both from one launch."""
    return _to_nhwc(be, x, be.precision, k_major)


def padded_channels(c: int, precision: str) -> int:
    """The channels of to_nhwc's copy of a tensor of c channels at precision: c rounded up to CHUNK."""
    return -(-c // CHUNK[precision]) * CHUNK[precision]


def _copy_shape(shape: tuple, precision: str) -> tuple:
    """The array shape of the channels-last copy of a tensor [..., C] at precision (fp32: split, C / 4, 2, 4)."""
    return (*shape[:-1], shape[-1] // 4, 2, 4) if precision == "fp32" else tuple(shape)


def _copies_at(precision: str) -> None:
    if precision not in COPY_DTYPE:
        raise ValueError(f"channels-last copies exist at {' and '.join(COPY_DTYPE)}, not at {precision}")


def _to_nhwc(be, x, precision: str, k_major: bool = False):
    _copies_at(precision)
    suffix, dtype, _ = COPIES[precision]
    n, c = x.shape[:2]
    hw = x.size // max(n * c, 1)
    cp = padded_channels(c, precision)
    name = "to_nhwc" + suffix
    if n * hw >= 2**31 or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError(f"{name}: x of shape {x.shape} must be contiguous float32 under 2^31 pixels")
    out = be.xp.empty(_copy_shape((n, *x.shape[2:], cp), precision), dtype=dtype)
    args, out_t = k_major_args(precision, k_major, be, cp, n * hw)
    if out.size:
        get_kernel(be.device_id, "conv", name)((math.ceil(n * hw / 32), math.ceil(cp / 64)), (256,),
                                                (x, out, _i32(n), _i32(c), _i32(hw), _i32(cp), *args))
    return (out, out_t) if k_major else out


def k_major_args(precision: str, k_major: bool, be, c: int, k: int):
    """The K-major copy's kernel arguments (yt, ldk) of to_nhwc32, pool_grad_nhwc32 and norm.cu's bn_bwd_dx_nhwc32
    (none at other precisions), and that copy of c channels over k pixels (None unless k_major)."""
    if k_major and precision != "tf32":
        raise ValueError(f"K-major copies (the r tiles' dy) exist at tf32, not at {precision}")
    if precision != "tf32":
        return (), None
    out_t = _k_major_copy(be, c, k) if k_major else None
    return (NULL, _i32(0)) if out_t is None else (out_t, _i32(out_t.shape[1])), out_t


def pool_grad_nhwc16(be, dy, arg, z_shape, k: int):
    """to_nhwc16(maxpool2d_backward(dy)) for k x k windows at stride k over z [n, C, H, W] (z_shape), from the pooled
    gradient dy and argmax bytes arg [n, C, P, Q] (conv.cu's pool_grad_nhwc16), without the float32 gradient."""
    return _pool_grad_at(be, dy, arg, z_shape, k, "bf16")


def pool_grad_nhwc(be, dy, arg, z_shape, k: int, k_major: bool = False):
    """pool_grad_nhwc16 at bf16; at tf32 and fp32 the same gradient as to_nhwc's copy (conv.cu's pool_grad_nhwc32,
    pool_grad_nhwc32x3); k_major as to_nhwc's."""
    return _pool_grad_at(be, dy, arg, z_shape, k, be.precision, k_major)


def _pool_grad_at(be, dy, arg, z_shape, k: int, precision: str, k_major: bool = False):
    """The copy at `precision` of the pooling gradient from float32 dy (conv.cu's pool_grad_nhwc<suffix>)."""
    _copies_at(precision)
    name = "pool_grad_nhwc" + COPIES[precision][0]
    if dy.dtype != np.float32 or tuple(dy.shape) != tuple(arg.shape):
        raise ValueError(f"{name}: dy of shape {dy.shape} must be float32 of the argmax's shape {arg.shape}")
    n, c, h, w = z_shape
    args, out_t = k_major_args(precision, k_major, be, c, n * h * w)
    out = _pool_grad16(name, be, dy, arg, z_shape, k, precision, extra=args)
    return (out, out_t) if k_major else out


def pool_grad16_nhwc16(be, dy16, arg, z_shape, k: int):
    """pool_grad_nhwc16 from dy16 [n, P, Q, C], the pooled gradient already channels-last in bf16 (a batch norm's
    hand-over): the same bits (conv.cu's pool_grad16_nhwc16)."""
    n, c = z_shape[:2]
    if dy16.dtype != np.uint16 or tuple(dy16.shape) != (n, *arg.shape[2:], c):
        raise ValueError(f"pool_grad16_nhwc16: dy16 of shape {dy16.shape} must be bf16 bits [n, P, Q, C] of the "
                         f"argmax's [n, C, P, Q] {arg.shape}")
    if c % 8 == 0 and address(dy16) % 16 == 0:         # 8 channels a 16-byte vector (pool_grad16_nhwc16v)
        return _pool_grad16("pool_grad16_nhwc16v", be, dy16, arg, z_shape, k, pooled_tiles=64)
    return _pool_grad16("pool_grad16_nhwc16", be, dy16, arg, z_shape, k, pooled_tiles=32)


def _pool_grad16(kernel: str, be, dy, arg, z_shape, k: int, precision: str = "bf16", pooled_tiles: int = 0,
                 extra: tuple = ()):
    """The channels-last copy at `precision` (COPIES) of dE/dz [n, H, W, C] of a k x k max pooling at stride k over z
    (z_shape) from its pooled gradient dy and argmax bytes arg [n, C, P, Q], by conv.cu's `kernel` (its further
    arguments `extra`): its blocks take 32 pixels of z x 64 channels, or with pooled_tiles that many pooled pixels x
    64 channels and their windows (a pooling with no window, P or Q 0, is all zeros)."""
    n, c, h, w = z_shape
    p, q = arg.shape[2], arg.shape[3]
    if c % COPIES[precision][2] or n * h * w >= 2**31 or not dy.flags.c_contiguous or not arg.flags.c_contiguous:
        raise ValueError(f"{kernel}: contiguous inputs, C even (bf16) or a multiple of 4 (fp32) and z under 2^31 "
                         f"pixels, got z {tuple(z_shape)}")
    shape, dtype = _copy_shape((n, h, w, c), precision), COPY_DTYPE[precision]
    if pooled_tiles and p * q == 0:
        return be.xp.zeros(shape, dtype=dtype)
    out = be.xp.empty(shape, dtype=dtype)
    if out.size:
        blocks = math.ceil(n * p * q / pooled_tiles) if pooled_tiles else math.ceil(n * h * w / 32)
        get_kernel(be.device_id, "conv", kernel)((blocks, math.ceil(c / 64)), (256,), (
            dy, arg, out, _i32(n), _i32(c), _i32(h), _i32(w), _i32(p), _i32(q), _i32(k), *extra))
    return out


def turn_weights(be, w):
    """w [O, C, R, S] float32 as the data gradient's turned weights [C, R, S, O]: wt[c][r][s][o] = w[o][c][R-1-r]
    [S-1-s], copied at `be`'s precision (COPIES: conv.cu's turn_weights16, turn_weights32, turn_weights32x3)."""
    if w.ndim != 4 or w.dtype != np.float32 or not w.flags.c_contiguous:
        raise ValueError(f"turn_weights: w of shape {w.shape} must be contiguous float32 [O, C, R, S]")
    _copies_at(be.precision)
    o, c, r, s = w.shape
    if be.precision == "fp32" and o % 4:
        raise ValueError(f"turn_weights: O = {o} must be a multiple of 4 at fp32 (the split copy's chunks)")
    out = be.xp.empty(_copy_shape((c, r, s, o), be.precision), dtype=COPY_DTYPE[be.precision])
    be.launch("conv", "turn_weights" + COPIES[be.precision][0], w.size, w, out, _i32(o), _i32(c), _i32(r * s))
    return out


def weight_copy(be, w, turned: bool = False):
    """The copy of w [O, C, R, S] that the convolutions read at be's precision: channels-last (to_nhwc) or turned
    (turn_weights). Inside a step's weight_copies scope (be.copy_scope, a StepCopies) the one made when the step
    started, else made now."""
    if be.copy_scope is None:
        return turn_weights(be, w) if turned else to_nhwc(be, w)
    return be.copy_scope.copy(be, w, turned)


WC_CHUNK = 4096     # conv.cu's HN_WC_CHUNK: the floats of w a channels-last unit of weight_copies<s> reads at most


def _copy_units(o: int, c: int, rs: int, cp: int, nhwc: bool, turned: bool) -> int:
    """The units of work (a block's each) of one weight's row of conv.cu's weight_copies<s> (hn_weight_copies): o
    times the chunks of its channels-last copy, the 32 x 32 tiles of its turned one."""
    ch = max(1, WC_CHUNK // rs)
    return (o * -(-cp // ch) if nhwc else 0) + (-(-c * rs // 32) * -(-o // 32) if turned else 0)


class StepCopies:
    """The copies of a model's weights that one kind of step reads (the op contract's weight_copies(store): this is
    what the store holds), made in one launch when the step starts (conv.cu's weight_copies<s>) instead of one
    launch per convolution.

    A copy a convolution asks for (weight_copy) that the launch did not make is made on the spot and remembered
    (`entries`); the launch makes it from the next step on. The launch's table ([rows, 8] int64, a row per weight:
    its address, its copies' addresses, O, C, R S, Cp) is uploaded when a step ends with new entries, outside a CUDA
    graph capture; a captured step's launch reads that table and writes the copies at the same addresses on every
    replay, so the entries (and the weights they read) live as long as the store. Only the model's parameters
    (`params`, their data arrays, or a view of one of the same size) are copied so; any other array, which the step
    itself may write before the convolution reads it, is copied where asked, as outside a step. The table and the
    parameters' copies outlive the step that made them: they come from be.persistent(), never from the step pool,
    whose free blocks a graph captured earlier may still use as its temporaries."""

    def __init__(self, params, precision: str):
        self.params = {(address(p), p.size) for p in params}
        self.precision = precision
        self.entries: dict = {}        # (address, shape, turned) -> (w, copy)
        self.made: set = set()         # the keys whose copies this step has made (the launch, or on demand)
        self.table, self.covers, self.longest = None, set(), 0    # longest: units
        self.kept: list = []           # tables and copies replaced since: a captured graph may still use them

    def enter(self, be) -> None:
        self.made = set()
        if self.table is not None:
            grid = (max(1, min(4 * be.sms, self.longest)), self.table.shape[0])
            get_kernel(be.device_id, "conv", "weight_copies" + COPIES[self.precision][0])(grid, (256,), (self.table,))
            self.made = set(self.covers)

    def exit(self, be) -> None:
        if len(self.covers) < len(self.entries) and be.capturing is None:
            rows: dict = {}            # (address, shape) -> [w, channels-last copy, turned copy]
            for (addr, shape, turned), (w, out) in self.entries.items():
                rows.setdefault((addr, shape), [w, None, None])[2 if turned else 1] = out
            table = np.zeros((len(rows), 8), dtype=np.int64)
            sizes = []
            for i, (w, w16, wt) in enumerate(rows.values()):
                o, c, r, s = w.shape
                cp = _nhwc_shape(w16)[3] if w16 is not None else c
                table[i] = (address(w), 0 if w16 is None else address(w16), 0 if wt is None else address(wt),
                            o, c, r * s, cp, 0)
                sizes.append(_copy_units(o, c, r * s, cp, w16 is not None, wt is not None))
            with be.persistent():
                self.table = be.xp.asarray(table)
            self.covers, self.longest = set(self.entries), max(sizes)
            self.kept.append(self.table)

    def copy(self, be, w, turned: bool):
        key = (address(w), tuple(w.shape), bool(turned))
        if key in self.made:
            return self.entries[key][1]
        if (key[0], w.size) not in self.params or w.shape[2] * w.shape[3] > WC_CHUNK:
            # not a parameter (nor a view of one: Dense): this step's own; or a filter past the launch's
            return turn_weights(be, w) if turned else to_nhwc(be, w)
        with be.persistent():
            out = turn_weights(be, w) if turned else to_nhwc(be, w)
        if key in self.entries:              # (made anew where the last launch did not make it)
            self.kept.append(self.entries[key])
            self.covers.discard(key)         # the next table writes the new one
        self.entries[key] = (w, out)         # the launch makes it too from the table made when a step next ends
        self.made.add(key)
        return out


def conv16(be, y, x, w, b, stride: int, pad: int, act: int = 0, tile: str | None = None) -> None:
    """y = act(conv(x, w) + b) from NCHW float32 x and w, copied channels-last first (to_nhwc, plan_conv16)."""
    launch_conv(be, plan_conv16(y, to_nhwc(be, x), weight_copy(be, w), b, stride, pad, act, tile, be.sms))


def conv16_pool(be, x, w, b, stride: int, pad: int, act: int = 0, tile: str | None = None, x16=None,
                stats: bool = False):
    """(y, arg, sums): (y, arg) = maxpool2d_forward(act(conv(x, w) + b), 2, 2) from NCHW float32 x (or its copy x16)
    and w, on the channels-last copies (to_nhwc), pooled in the forward's epilogue (plan_conv16_pool); act & OUT16: y
    uint16 (bf16 bits). sums: y's batch-norm statistics from the epilogue where `stats` asks for them and it makes
    them (with_sums), else None."""
    n, c, h, wd, o, r, s, p, q = _conv_sizes(x.shape, w.shape, stride, pad)
    buf, y, arg = pooled_outputs(be.xp, n, o, p // 2, q // 2, bool(act & OUT16))
    x16 = to_nhwc(be, x) if x16 is None else x16
    call = plan_conv16_pool(buf, x16, weight_copy(be, w), b, stride, pad, act, tile, be.sms)
    if stats:
        with_sums(be.xp, call)
    launch_conv(be, call)
    return y, arg, None if call is None else call.sums


def conv16_data(be, dx, dy16, w, relu_x, pad: int, tile: str | None = None, out16: bool = False) -> None:
    """dx = conv_backward_data(dy, w) (* (relu_x > 0)) at stride 1 from dy16 = to_nhwc(dy) and w [O, C, R, S]
    float32 (plan_conv16_data; out16: dx uint16, bf16 bits)."""
    wt = weight_copy(be, w, turned=True)
    launch_conv(be, plan_conv16_data(dx, dy16, wt, relu_x, pad, tile, out16, be.sms))


def conv16_filter(be, dw, dy16, x16, stride: int, pad: int, tile: str | None = None,
                  splits: int | None = None, k_major=None) -> None:
    """dw [O, C, R, S] += conv_backward_filter(dy, x) from dy16 = to_nhwc(dy) and x16 = to_nhwc(x): summed
    channels-last into a zeroed scratch over x16's Cp channels (C padded: those past C are dropped), then added into
    dw (plan_conv16_filter). An r tile reads dy's K-major copy: k_major() (default: dy_t of dy16)."""
    o, c, r, s = dw.shape
    cp = _nhwc_shape(x16)[3]
    part = be.xp.zeros((o, r, s, cp), dtype=np.float32)
    launch_conv(be, plan_conv16_filter(part, dy16, x16, stride, pad, be.sms, tile, splits,
                                       k_major or (lambda: dy_t(be, dy16))))
    be.launch("conv", "add_from_nhwc", dw.size, dw, part, _i32(o), _i32(c), _i32(r * s), _i32(cp))
