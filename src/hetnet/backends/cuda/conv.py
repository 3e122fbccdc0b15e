"""Convolution and dense launchers: implicit GEMM (conv.cu; at tf32 / bf16 also on tensor cores, mma.conv_tc /
conv_data_tc / conv_filter_tc, and on channels-last copies of the operands, bf16 at bf16, tf32-rounded float32 at
tf32 and at fp32 split in two tf32 parts, mma.conv16 / conv16_data / conv16_filter) or im2col + cuBLAS (or our
tensor-core GEMMs), for a small convolution's forward (C R S <= 32 taps, K <= 64) a direct kernel
(conv_small_fwd), at bf16 for its forward and filter gradient direct kernels on tensor cores (mma.cu's
conv_small_fwd_tc, conv_small_filter_tc: "small_tc"), and at fp32 for 3 x 3 stride-1 convolutions Winograd's
algorithms (winograd.py: transforms on CUDA cores, cuBLAS's strided-batched GEMMs between), chosen per shape by
measurement.

Every op here has the op contract's optional fused epilogues (used by hetnet.plan): `act` (ReLU after bias in the
forward) and `relu_x` (the input of this layer is a ReLU output, so the data gradient is zeroed where relu_x <= 0).
Dense layers are 1x1 convolutions of 1x1 images for the implicit kernels; their second algorithm is a plain cuBLAS
GEMM.

Shapes: x[N,C,H,W], w[K,C,R,S], y[N,K,P,Q]; dense x[N,F], w[K,F], y[N,K].
"""
from __future__ import annotations

import math
import os

import numpy as np

from .. import compose
from . import mma, tune_cache, winograd
from .conv_tiles import BK, TILES, Tile
from .kernels import NULL, act_code, check, get_kernel, grid_for, wgmma_ok

# name: Tile, the tile configurations of each op that ship (conv_tiles.py: their parameters, what each wins, and
# `Tile.fits`, where the "c" ones apply). Each is tried at a few reduction splits over blocks ("<name>/<splits>",
# `tile_splits`).
FWD_CFGS: dict[str, Tile] = {t.name: t for t in TILES if t.op == "fwd"}
DATA_CFGS: dict[str, Tile] = {t.name: t for t in TILES if t.op == "data"}
FILTER_CFGS: dict[str, Tile] = {t.name: t for t in TILES if t.op == "filter"}
TUNE_RUNS = 4      # back-to-back runs per timed sample when measuring the algorithms
# im2col's column buffer is a workspace on top of the step's live tensors: it is built for a few images at a time
# (a GEMM and an im2col / col2im per chunk), each chunk's buffer at most the largest of: the op's own tensors (x and
# y, or x and dy), IM2COL_MIN_CHUNK bytes, and the headroom under the step's peak (be.workspace_headroom(): while a
# CUDA graph is captured, the first, eager step's high-water mark minus the bytes live now) -- never less than one
# image's columns. Unchunked, thesis-m1's second convolution would need 151 MiB at batch 1024 and fashion-cnn's
# 6.9 MiB at batch 32, more than the step's activations at that point. Each chunk costs two more launches, which
# show at batch 32 (fashion-cnn's step in `hetnet bench` on an H200: 0.39 ms in 1 MiB chunks, 0.35 unchunked),
# hence 4 MiB.
# The algorithm trials time im2col in the chunks of the moment (an eager call: no headroom), so the layer API gets the
# faster of the two as it runs it; a captured step, with its larger chunks, reuses that choice.
IM2COL_MIN_CHUNK = 4 << 20
_i32 = np.int32
# HETNET_CONV_ALGO / CudaBackend.force_conv_algo: skip the measurement (tests); "tc" (the tensor-core implicit GEMMs,
# mma.conv_tc / conv_data_tc / conv_filter_tc) exists at tf32 and bf16, "tc16" (the same on channels-last bf16
# copies, mma.conv16 / conv16_data / conv16_filter, on their large tile; "tc16s" their small one) at bf16 where
# mma.conv16_fits. At tf32 and fp32 the channels-last candidates are "tc32..." and "tc32x3..." (CL_PREFIX; not
# forceable).
FORCEABLE = ("implicit", "im2col", "tc", "tc16", "wino")
OWN_TC = ("tc", "tc16", "wino")   # the forceable names that exist only at some precisions and shapes
CUBLAS = ("im2col", "wino")  # the candidates that call cuBLAS (not where a graph capture could not take it)
# The candidates on channels-last copies (mma.COPY_DTYPE) start with their precision's prefix; at fp32 they are the
# tf32 kernels on split copies, three products for one (mma_tiles.Tc16Tile), float32's accuracy on tensor cores.
CL_PREFIX = {"bf16": "tc16", "tf32": "tc32", "fp32": "tc32x3"}
# Where a convolution's backward needs x itself (its ReLU mask), the forward also keeps its channels-last copy of x
# beside it for the filter gradient at these precisions, instead of copying x again in the backward: one more
# activation's bytes for one copy less (two at fp32, whose copies are split). At tf32 and fp32 cifar-wide's step stays
# within PyTorch's peak memory with it; at bf16 it would not (precision_step.json).
KEEP_BESIDE_X = ("tf32", "fp32")
# The precisions at which an op hands a convolution its input as the channels-last copy it reads (Nhwc16,
# takes_nhwc16), and a batch norm hands the convolution before it dE/dy so (takes_dy16).
HANDS_OVER = ("bf16", "tf32")


class Geometry:
    """The sizes of one convolution (dense: H = W = R = S = 1)."""

    def __init__(self, n, c, h, w, k, r, s, stride, pad):
        self.n, self.c, self.h, self.w, self.k, self.r, self.s = n, c, h, w, k, r, s
        self.stride, self.pad = stride, pad
        self.p = (h + 2 * pad - r) // stride + 1
        self.q = (w + 2 * pad - s) // stride + 1
        self.crs, self.krs = c * r * s, k * r * s
        self.npq = n * self.p * self.q

    def key(self):
        return (self.n, self.c, self.h, self.w, self.k, self.r, self.s, self.stride, self.pad)

    def ints(self):
        return tuple(_i32(v) for v in (self.n, self.c, self.h, self.w, self.k, self.p, self.q))


def _tables(be, g: Geometry):
    """Gather tables (see conv.cu), cached per shape: (tab over CRS, tab over KRS)."""
    key = ("tab", g.c, g.h, g.w, g.k, g.r, g.s, g.p, g.q)
    t = be._cache.get(key)
    if t is None:
        c, r, s = np.meshgrid(np.arange(g.c), np.arange(g.r), np.arange(g.s), indexing="ij")
        fwd = np.zeros((g.crs, 4), np.int32)
        fwd[:, 0] = (c * g.h * g.w + r * g.w + s).ravel()
        fwd[:, 1] = ((r << 16) | s).ravel()
        k, r2, s2 = np.meshgrid(np.arange(g.k), np.arange(g.r), np.arange(g.s), indexing="ij")
        dat = np.zeros((g.krs, 4), np.int32)
        dat[:, 0] = (k * g.p * g.q).ravel()
        dat[:, 1] = ((r2 << 16) | s2).ravel()
        dat[:, 2] = (k * g.c * g.r * g.s + r2 * g.s + s2).ravel()
        with be.persistent():
            t = be._cache[key] = (be.xp.asarray(fwd), be.xp.asarray(dat))
    return t


# --- the algorithms ------------------------------------------------------------------------------------------------


def _split_options(be, tiles: int, threads: int, length: int):
    """Split counts worth a trial for a grid of `tiles` blocks of `threads` summing `length` (see conv.cu's split
    reduction): only when the grid alone is less than one full load of threads on the SMs; each split at least 2
    tiles of BK long; at most two full loads in all. Distinct splits only (18 tiles in 4 splits of 5 are 4)."""
    full = be.sms * 2048
    if tiles * threads >= full:
        return []
    steps, out = math.ceil(length / BK), []
    for want in (2, 3, 4, 6, 9):
        per = math.ceil(steps / want)
        splits = math.ceil(steps / per)
        if per >= 2 and splits > 1 and tiles * threads * splits <= 2 * full and splits not in out:
            out.append(splits)
    return out


def tile_splits(be, t: Tile, g: Geometry) -> list[int]:
    """The reduction splits tile t is tried at on g, the first its plain candidate ("<cfg>"), the others
    "<cfg>/<splits>": forward and data gradient unsplit, then `_split_options`; filter gradient its default split
    (`filter_splits`), then a half and a quarter of it (longer runs, fewer atomics)."""
    if t.op == "filter":
        base = filter_splits(be, t, g)
        return [base, *sorted({base // 2, base // 4} - {0, 1}, reverse=True)]
    m, n, length = (g.npq, g.k, g.crs) if t.op == "fwd" else (g.n * g.h * g.w, g.c, g.krs)
    return [1, *_split_options(be, math.ceil(m / t.bm) * math.ceil(n / t.bn), t.threads, length)]


def _split_cands(be, cfgs, g, run):
    """{name: fn} of the tile configurations that fit g, each at the splits of `tile_splits`; run(cfg, splits, ...)
    launches one."""
    out = {}
    for cfg, t in cfgs.items():
        if not t.fits(g.c, g.k):
            continue
        for i, sp in enumerate(tile_splits(be, t, g)):
            out[cfg if i == 0 else f"{cfg}/{sp}"] = lambda *a, cfg=cfg, sp=sp: run(cfg, sp, *a)
    return out


def _split_launch(be, grid_xy, splits, length, out):
    """(grid, chunk, tickets) of an implicit forward / data-gradient launch reduced in `splits` parts; a split
    launch adds into `out`, which is zeroed here first (a memset: one graph node)."""
    steps = math.ceil(length / BK)
    chunk = math.ceil(steps / splits) * BK
    if splits == 1:
        return (*grid_xy, 1), chunk, NULL
    tickets = be.scratch("conv_split_tickets", (grid_xy[0] * grid_xy[1],), np.int32)
    be.cupy.cuda.runtime.memsetAsync(out.data.ptr, 0, out.nbytes, be.cupy.cuda.get_current_stream().ptr)
    return (*grid_xy, splits), chunk, tickets


def _kernel(be, t: Tile):
    return get_kernel(be.device_id, "conv", t.kernel())


def fwd_implicit(be, t: Tile, kern, splits, g, x, w, b, y, act):
    """y = act(conv(x, w) + b) by tile `t` through `kern`, its compiled entry point, the reduction in `splits`
    parts (the kernel sandbox, benchmarks/kernels/run_conv_variants.py, launches its variants through this too)."""
    tab, _ = _tables(be, g)
    grid, chunk, tickets = _split_launch(be, (math.ceil(g.npq / t.bm), math.ceil(g.k / t.bn)), splits, g.crs, y)
    kern(grid, (t.threads,), (x, w, b if b is not None else NULL, y, tab, *g.ints(), _i32(g.crs), _i32(g.stride),
                              _i32(g.pad), _i32(g.s), _i32(act), _i32(chunk), tickets))


def _fwd_implicit(be, cfg, splits, g, x, w, b, y, act):
    t = FWD_CFGS[cfg]
    fwd_implicit(be, t, _kernel(be, t), splits, g, x, w, b, y, act)


def small_fits(g: Geometry) -> bool:
    """Whether conv.cu's conv_small_fwd computes g's forward: C R S <= 32 taps a pixel, K <= 64 outputs, a multiple
    of 8 (a thread's 8 channels), N P Q + 128 <= 2^31 (its pixel indices, up to a block past the last, are int)."""
    return g.crs <= 32 and g.k <= 64 and g.k % 8 == 0 and g.npq + 128 <= 2**31


SMALL_TC_SMEM = 64 * 132 * 4               # mma.cu's HN_SMALL_TC_SMEM: conv_small_fwd_tc's dynamic shared memory
SMALL_TC_FSMEM = (64 + 32) * 136 * 2       # HN_SMALL_TC_FSMEM: conv_small_filter_tc's
SMALL_TC_BLOCKS_PER_SM = 2                 # conv_small_filter_tc's blocks (its grid-stride loop over 128-pixel tiles)


def _fwd_small(be, g, x, w, b, y, act, out16: bool = False, tc: bool = False, sums=None):
    """y = act(conv(x, w) + b) by conv.cu's conv_small_fwd (small_fits), or with tc by mma.cu's conv_small_fwd_tc
    from x and w rounded to bf16 (small_tc_fits), 128 output pixels a block: y float32 [N, K, P, Q], or with out16
    uint16 of that shape, the bf16 bits (round to nearest even) of the same values. sums (tc only): mma.zeroed_sums
    of K channels, which the kernel adds y's per-channel sums and sums of squares into, and its count (a batch norm's
    statistics, Nchw16.sums)."""
    name = "conv_small_fwd_tc" if tc else "conv_small_fwd"
    want = np.uint16 if out16 else np.float32
    if y.dtype != want or y.shape != (g.n, g.k, g.p, g.q):
        raise ValueError(f"{name}: y must be {np.dtype(want).name} of shape {(g.n, g.k, g.p, g.q)}, "
                         f"not {y.dtype} of shape {y.shape}")
    check(x, w, b, y)
    get_kernel(be.device_id, "mma" if tc else "conv", name)((math.ceil(g.npq / 128),), (256,), (
        x, w, b if b is not None else NULL, y, *(_i32(v) for v in (g.n, g.c, g.h, g.w, g.k, g.r, g.s, g.stride,
                                                                    g.pad, g.p, g.q, act, out16)),
        *((NULL if sums is None else sums,) if tc else ())), shared_mem=SMALL_TC_SMEM if tc else 0)


def small_tc_fits(be, g: Geometry, *arrays) -> bool:
    """Whether mma.cu's conv_small_fwd_tc / conv_small_filter_tc ("small_tc") run g: at bf16 (they round x, w and
    dy to bf16), C R S <= 32 taps, K <= 64, N P Q + 128 <= 2^31, an image's C H W < 2^31 (int offsets within it),
    contiguous float32 operands."""
    return (be.precision == "bf16" and g.crs <= 32 and g.k <= 64 and g.npq + 128 <= 2**31 and g.c * g.h * g.w < 2**31
            and _contiguous(*arrays)
            and all(a is None or a.dtype == np.float32 for a in arrays))


def _filter_small_tc(be, g, dy, x, dw, db):
    """dw += dE/dw from dy and x rounded to bf16 by mma.cu's conv_small_filter_tc (small_tc_fits): each block's part
    over its 128-pixel tiles, then added into dw in block order (conv_small_filter_tc_add); db from dy. dy may be
    bf16 bits (uint16: conv_small_filter_tc_dy16, the batch norm's hand-over; then no db)."""
    check(dy, x, dw)
    blocks = max(1, min(SMALL_TC_BLOCKS_PER_SM * be.sms, math.ceil(g.npq / 128)))
    part = be.xp.empty((blocks, 64, 32), dtype=be.xp.float32)
    name = "conv_small_filter_tc" + ("_dy16" if dy.dtype == np.uint16 else "")
    get_kernel(be.device_id, "mma", name)((blocks,), (256,), (
        dy, x, part, *(_i32(v) for v in (g.n, g.c, g.h, g.w, g.k, g.r, g.s, g.stride, g.pad, g.p, g.q))),
        shared_mem=SMALL_TC_FSMEM)
    get_kernel(be.device_id, "mma", "conv_small_filter_tc_add")((math.ceil(g.k * 32 / 256),), (256,), (
        part, dw, _i32(blocks), _i32(g.k), _i32(g.crs)))
    if db is not None:
        channel_sum(be, dy, db, g.n, g.k, g.p * g.q)


def _chunks(be, g, tensor_bytes: int):
    """Image ranges [n0, n1) for im2col: each chunk's column buffer (CRS x n*PQ floats) within the budget above, and
    never less than one image; equal chunks but the last."""
    per_image = 4 * g.crs * g.p * g.q
    budget = max(tensor_bytes, IM2COL_MIN_CHUNK, be.workspace_headroom())
    count = max(1, min(g.n, math.ceil(per_image * g.n / budget)))
    nb = math.ceil(g.n / count)
    return [(n0, min(g.n, n0 + nb)) for n0 in range(0, g.n, nb)]


def _fwd_im2col(be, g, x, w, b, y, act, budget):
    xp = be.xp
    pq = g.p * g.q
    if g.h == g.w == g.r == g.s == 1 and g.pad == 0:           # dense: y = x w^T, then bias + activation
        be.gemm(y.reshape(g.n, g.k), x.reshape(g.n, g.c), False, w.reshape(g.k, g.c), True)
        be.launch("conv", "bias_act_rows", g.n * g.k, y, b if b is not None else NULL, _i32(g.n), _i32(g.k),
                  _i32(act))
        return
    yk = xp.empty((g.k, g.npq), dtype=xp.float32)
    w2 = w.reshape(g.k, g.crs)
    for n0, n1 in _chunks(be, g, budget):                                # yk[K, NPQ] = w2[K, CRS] @ col[CRS, NPQ]
        col = _im2col(be, g, x[n0:n1], n1 - n0)
        be.gemm(yk[:, n0 * pq:n1 * pq], w2, False, col, False)
        del col
    be.launch("conv", "km_to_nchw_bias_act", g.n * g.k * pq, yk, b if b is not None else NULL, y, _i32(g.n),
              _i32(g.k), _i32(pq), _i32(act))


def _im2col(be, g, x, n):
    """col[CRS, n*PQ] of the n images x[0:n]."""
    col = be.xp.empty((g.crs, n * g.p * g.q), dtype=be.xp.float32)
    tab, _ = _tables(be, g)
    be.launch("conv", "im2col", col.size, x, col, tab, _i32(n), _i32(g.c), _i32(g.h), _i32(g.w), _i32(g.p),
              _i32(g.q), _i32(g.crs), _i32(g.stride), _i32(g.pad))
    return col


def _dyk(be, g, dy):
    pq = g.p * g.q
    if pq == 1:
        return dy.reshape(g.n, g.k).T           # a transposed view; gemm takes it as such
    dyk = be.xp.empty((g.k, g.npq), dtype=be.xp.float32)
    be.launch("conv", "nchw_to_km", g.n * g.k * pq, dy, dyk, _i32(g.n), _i32(g.k), _i32(pq))
    return dyk


def data_implicit(be, t: Tile, kern, splits, g, dy, w, dx, relu_x):
    """dx = conv_backward_data(dy, w), zeroed where relu_x <= 0 when given, by tile `t` through `kern` (as
    `fwd_implicit`)."""
    _, tab = _tables(be, g)
    grid, chunk, tickets = _split_launch(be, (math.ceil(g.n * g.h * g.w / t.bm), math.ceil(g.c / t.bn)), splits,
                                         g.krs, dx)
    kern(grid, (t.threads,), (dy, w, relu_x if relu_x is not None else NULL, dx, tab, *g.ints(), _i32(g.krs),
                              _i32(g.stride), _i32(g.pad), _i32(g.s), _i32(chunk), tickets))


def _data_implicit(be, cfg, splits, g, dy, w, dx, relu_x):
    t = DATA_CFGS[cfg]
    data_implicit(be, t, _kernel(be, t), splits, g, dy, w, dx, relu_x)


def _data_im2col(be, g, dy, w, dx, relu_x, budget):
    xp = be.xp
    if g.h == g.w == g.r == g.s == 1 and g.pad == 0:           # dense: dx = dy w
        be.gemm(dx.reshape(g.n, g.c), dy.reshape(g.n, g.k), False, w.reshape(g.k, g.c), False)
    else:
        pq = g.p * g.q
        dyk = _dyk(be, g, dy)
        w2 = w.reshape(g.k, g.crs)
        for n0, n1 in _chunks(be, g, budget):                      # dcol[CRS, NPQ] = w2^T @ dyk, a chunk at a time
            dcol = xp.empty((g.crs, (n1 - n0) * pq), dtype=xp.float32)
            be.gemm(dcol, w2, True, dyk[:, n0 * pq:n1 * pq], False)
            be.launch("conv", "col2im", (n1 - n0) * g.c * g.h * g.w, dcol,
                      relu_x[n0:n1] if relu_x is not None else NULL, dx[n0:n1], _i32(n1 - n0), _i32(g.c),
                      _i32(g.h), _i32(g.w), _i32(g.p), _i32(g.q), _i32(g.r), _i32(g.s), _i32(g.stride), _i32(g.pad))
            del dcol
        return
    if relu_x is not None:
        be.launch("conv", "relu_mask_inplace", dx.size, dx, relu_x, np.int64(dx.size))


def filter_splits(be, t: Tile, g):
    """How many parts the filter gradient's N*P*Q sum is split into over blockIdx.z (partial sums added with
    atomics) by default: until there are about 4 x 256 threads per SM, each split at least 4 tiles long. Fewer
    splits ("<cfg>/<splits>" candidates) mean longer runs and fewer atomics."""
    gx, gy = math.ceil(g.k / t.bm), math.ceil(g.crs / t.bn)
    return max(1, min(math.ceil(4 * be.sms * (256 // t.threads) / (gx * gy)), math.ceil(g.npq / (4 * BK))))


def filter_implicit(be, t: Tile, kern, g, dy, x, dw, db, splits=None):
    """dw += dE/dw, db += dE/db (when given) by tile `t` through `kern` (as `fwd_implicit`), the N*P*Q sum in
    `splits` parts (default: filter_splits)."""
    tab, _ = _tables(be, g)
    splits = splits or filter_splits(be, t, g)
    chunk = math.ceil(math.ceil(g.npq / splits) / BK) * BK
    grid = (math.ceil(g.k / t.bm), math.ceil(g.crs / t.bn), math.ceil(g.npq / chunk))
    kern(grid, (t.threads,), (dy, x, dw, db if db is not None else NULL, tab, *g.ints(), _i32(g.crs),
                              _i32(g.stride), _i32(g.pad), _i32(g.s), _i32(chunk)))


def _filter_implicit(be, cfg, g, dy, x, dw, db, splits=None):
    t = FILTER_CFGS[cfg]
    filter_implicit(be, t, _kernel(be, t), g, dy, x, dw, db, splits)


def _filter_im2col(be, g, dy, x, dw, db, budget):
    if g.h == g.w == g.r == g.s == 1 and g.pad == 0:           # dense: dw += dy^T x
        be.gemm(dw.reshape(g.k, g.c), dy.reshape(g.n, g.k), True, x.reshape(g.n, g.c), False, beta=1.0)
    else:
        pq = g.p * g.q
        dyk = _dyk(be, g, dy)
        for n0, n1 in _chunks(be, g, budget):                      # dw += dyk @ col^T, a chunk at a time
            col = _im2col(be, g, x[n0:n1], n1 - n0)
            be.gemm(dw.reshape(g.k, g.crs), dyk[:, n0 * pq:n1 * pq], False, col, True, beta=1.0)
            del col
    if db is not None:
        channel_sum(be, dy, db, g.n, g.k, g.p * g.q)


def _filter_tc(be, g, dy, x, dw, db):
    mma.conv_filter_tc(be, dw, dy, x, g.stride, g.pad)
    if db is not None:
        channel_sum(be, dy, db, g.n, g.k, g.p * g.q)


def _filter_tc16(be, g, copies, dy, dw, db, tile):
    """The filter gradient on the channels-last copies (copies: _Copies16) on `tile`, and db from dy."""
    if mma.reads_k_major(tile):
        dy16, dy_t = copies.k_major()
        mma.conv16_filter(be, dw, dy16, copies("x"), g.stride, g.pad, tile, k_major=lambda: dy_t)
    else:
        mma.conv16_filter(be, dw, copies("dy"), copies("x"), g.stride, g.pad, tile)
    if db is not None:
        channel_sum(be, dy, db, g.n, g.k, g.p * g.q)


def wino_fits(be, g: Geometry, *arrays) -> bool:
    """Whether the Winograd candidates ("wino") run g: at fp32, where winograd.fits, contiguous operands."""
    return (be.precision == "fp32" and winograd.fits(g.c, g.k, g.r, g.s, g.stride, g.pad) and g.n > 0
            and _contiguous(*arrays))


def _wino(be, *operands) -> dict:
    """winograd.py's launch and its workspace for one call on be: at most the bytes of the call's operands (so that
    the transforms never take more than twice the memory of the tensors they read and write), at most WORKSPACE."""
    def launch(name, grid, block, args):
        get_kernel(be.device_id, "winograd", name)(grid, block, args)

    return {"launch": launch, "sms": be.sms,
            "workspace": min(winograd.WORKSPACE, sum(a.nbytes for a in operands if a is not None))}


def _fwd_wino(be, g, x, w, b, y, act):
    winograd.conv_forward(be.xp, gemm=lambda m, u, v: be.gemm_batched(m, u, False, v, False), y=y, x=x, w=w,
                          bias=b, pad=g.pad, act=act, **_wino(be, x, y))


def _data_wino(be, g, dy, w, dx, relu_x):
    winograd.data_gradient(be.xp, gemm=lambda m, u, v: be.gemm_batched(m, u, False, v, False), dx=dx, dy=dy, w=w,
                           pad=g.pad, relu_x=relu_x, **_wino(be, dy, dx))


def _filter_wino(be, g, dy, x, dw, db):
    winograd.filter_gradient(be.xp, gemm=lambda m, u, v, beta: be.gemm_batched(m, u, False, v, True, 1.0, beta),
                             dw=dw, x=x, dy=dy, pad=g.pad, add=True, **_wino(be, x, dy))
    if db is not None:
        channel_sum(be, dy, db, g.n, g.k, g.p * g.q)


def _tiles16(be, op: str, run, g: Geometry | None = None) -> dict:
    """The channels-last candidates of op at be's precision (CL_PREFIX p): p on the large mma.sync tile of
    mma.tiles16(op), p + "s" on the small one, and where the device runs wgmma (kernels.wgmma_ok) p + the name of each
    wgmma tile (run(tile name, *outputs) launches one), and at bf16 on a convolution g that they fit (mma.tma_fits) p
    + the name of each TMA-fed tile. All are measured on every shape: the large tile can win even where M fits the
    small one (64 channels), which a rule by size would not try."""
    wgmma = wgmma_ok(be.device_id)
    names = _names16(be.precision, op, wgmma)
    if wgmma and g is not None and be.precision == "bf16" and mma.tma_fits(op, g.k if op == "data" else g.c):
        names += [CL_PREFIX["bf16"] + t.name for t in mma.TILES16T[op]
                  if op != "pool" or mma.tma_pool_fits(t, g.p, g.q)]
    tiles = {name: _tile16_of(op, name) for name in names}
    return {name: lambda *a, tile=tile: run(tile, *a) for name, tile in tiles.items()}


def _names16(precision: str, op: str, wgmma: bool) -> list[str]:
    """The channels-last candidates' names: the prefix alone for the large mma.sync tile, + "s" for the small one,
    + the tile's name for any other (and for each wgmma tile)."""
    prefix, (sync, wg) = CL_PREFIX[precision], mma.TILES_CL[precision]
    sync = sync.get(op, ())
    return ([prefix, prefix + "s"][:len(sync)] + [prefix + t.name for t in sync[2:]]
            + ([prefix + t.name for t in wg.get(op, ())] if wgmma else []))


def _tile16_of(op: str, candidate: str) -> str:
    """The mma_tiles tile name of a channels-last candidate of op (see _tiles16)."""
    precision = max((p for p, prefix in CL_PREFIX.items() if candidate.startswith(prefix)),
                    key=lambda p: len(CL_PREFIX[p]))                  # "tc32x3..." is fp32's, not tf32's
    rest, sync = candidate[len(CL_PREFIX[precision]):], mma.TILES_CL[precision][0].get(op, ())
    return {"": sync[0].name, "s": sync[1].name}[rest] if rest in ("", "s") else rest


def _fits16(be, op: str, g: Geometry) -> bool:
    return (be.precision in CL_PREFIX and mma.conv16_fits(op, g.c, g.k, g.r, g.s, g.stride, g.pad, be.precision)
            and bool(_names16(be.precision, op, wgmma_ok(be.device_id))))


class _Copies16:
    """dy and x of one backward call copied channels-last (mma.to_nhwc) for the channels-last gradients: a
    measured trial makes its own (so that its time includes them); the final filter and data gradients share one
    copy of dy once `share` is set. x16: the forward's copy of x, kept for this backward (conv_forward_kept).
    made["dy_t"]: dy's K-major copy for the r tiles (k_major)."""

    def __init__(self, be, dy, x, x16=None):
        self.be, self.src, self.share, self.made, self.x16 = be, {"dy": dy, "x": x}, False, {}, x16

    def __call__(self, name: str):
        if name == "x" and self.x16 is not None:
            return self.x16
        if not self.share:
            return mma.to_nhwc(self.be, self.src[name])
        if name not in self.made:
            self.made[name] = mma.to_nhwc(self.be, self.src[name])
        return self.made[name]

    def k_major(self):
        """(dy's channels-last copy, its K-major copy) for an r tile: both from one to_nhwc launch where neither is
        made yet, else the K-major copy transposed from the channels-last one (mma.dy_t)."""
        if not self.share or ("dy" not in self.made and self.src["dy"] is not None):
            pair = mma.to_nhwc(self.be, self.src["dy"], k_major=True)
            if self.share:
                self.made["dy"], self.made["dy_t"] = pair
            return pair
        dy16 = self("dy")
        if "dy_t" not in self.made:
            self.made["dy_t"] = mma.dy_t(self.be, dy16)
        return dy16, self.made["dy_t"]

    def drop(self, name: str) -> None:
        self.made.pop(name, None)


def channel_sum(be, x, out, n, c, hw):
    """out[c] += sum over n and hw of x[n, c, hw]."""
    splits = max(1, min(math.ceil(n * hw / 1024), math.ceil(4 * be.sms / c)))
    get_kernel(be.device_id, "conv", "channel_sum")((c, splits, 1), (256,), (x, out, _i32(n), _i32(c), _i32(hw)))


# --- choice by measurement -----------------------------------------------------------------------------------------


def _forced() -> str | None:
    v = os.environ.get("HETNET_CONV_ALGO", "").strip().lower()
    return v if v in FORCEABLE else None


def _forced_candidate(forced: str, candidates: dict) -> str:
    """The candidate a forced algorithm names: "im2col"; "tc" / "tc16" (the tensor-core implicit GEMMs, where they
    exist for the op, precision and shape, else "tc", else as "implicit"); "wino" (Winograd's, where it runs g,
    else as "implicit"); "implicit" (our first fp32 implicit-GEMM tile)."""
    if forced in candidates:
        return forced
    if forced == "tc16" and "tc" in candidates:
        return "tc"
    return next(n for n in candidates if n not in (*CUBLAS, *OWN_TC))


def _choose(be, op: str, g: Geometry, candidates: dict, run_scratch):
    """The fastest candidate for (op, shape), measured once with CUDA events (median of 3 after a warm-up) and
    cached, in the backend and on disk (tune_cache: a later process takes it from there). `run_scratch(fn)` runs a
    candidate on scratch outputs. Never measures during a graph capture."""
    key = (op, g.key())
    forced = be.force_conv_algo or _forced()
    if forced:
        if be.capturing is not None and not be.graph_cublas and forced in CUBLAS:
            forced = "implicit"
        return _forced_candidate(forced, candidates)
    remembered = tune_cache.for_backend(be)
    stored = (remembered.standing(key, candidates, be.capturing is not None)
              if key not in be._tune and remembered is not None else None)
    if stored is not None:
        be._tune[key] = stored                        # measured by an earlier process on this card (tune_cache)
        be._tune_times[key] = remembered.times(key)
    choice = be._tune.get(key)
    if choice is not None and (be.capturing is None or be.graph_cublas or choice not in CUBLAS):
        return choice
    if be.capturing is not None:     # no measuring inside a capture; the best of our own kernels
        times = be._tune_times.get(key, {})
        own = [n for n in candidates if n not in CUBLAS]
        return min(own, key=lambda n: times.get(n, float("inf")))
    import cupy

    spin = get_kernel(be.device_id, "elementwise", "hn_spin")
    times = {}
    pool = be.tune_pool()       # the trials' temporaries (column buffers, scratch gradients), released after
    try:
        with cupy.cuda.using_allocator(pool.malloc):
            for name, fn in candidates.items():
                try:
                    run_scratch(fn)
                    ts = []
                    for _ in range(3):
                        # GPU time only: the timed runs queue up behind a ~1 ms spin kernel while Python launches
                        spin((1,), (1,), (np.int64(2_000_000),))
                        start, end = cupy.cuda.Event(), cupy.cuda.Event()
                        start.record()
                        for _ in range(TUNE_RUNS):
                            run_scratch(fn)
                        end.record()
                        end.synchronize()
                        ts.append(cupy.cuda.get_elapsed_time(start, end) / TUNE_RUNS)
                    times[name] = sorted(ts)[1]
                except cupy.cuda.memory.OutOfMemoryError:
                    continue
    finally:
        cupy.cuda.get_current_stream().synchronize()
        if hasattr(run_scratch, "release"):
            run_scratch.release()      # the trials' outputs back to the pool, so that emptying it takes them too
        pool.free_all_blocks()
    choice = min(times, key=times.get)
    be._tune[key] = choice
    be._tune_times[key] = times
    be.tune_log.append({"op": op, "shape": list(g.key()), "ms": times, "choice": choice})
    if remembered is not None:
        remembered.put(key, choice, times)
    return choice


def _contiguous(*arrays) -> bool:
    return all(a is None or a.flags.c_contiguous for a in arrays)


def conv_forward(be, x, w, b, stride, pad, act=0, geometry=None, out16=False):
    """y = act(conv(x, w) + b) (act 1 = ReLU); out16: y as an Nchw16 where the measured choice writes bf16 ("small",
    "small_tc"), else float32."""
    check(x, w, b)
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    g = geometry or Geometry(n, c, h, wd, k, r, s, stride, pad)
    shape = (n, k, g.p, g.q)
    size = n * k * g.p * g.q
    cands = _split_cands(be, FWD_CFGS, g, lambda cfg, sp, out: _fwd_implicit(be, cfg, sp, g, x, w, b, out, act))
    cands["im2col"] = lambda out: _fwd_im2col(be, g, x, w, b, out, act, x.nbytes + 4 * size)
    if _contiguous(x, w, b) and small_fits(g):
        cands["small"] = lambda out: _fwd_small(be, g, x, w, b, out, act)
    if small_tc_fits(be, g, x, w, b):
        cands["small_tc"] = lambda out: _fwd_small(be, g, x, w, b, out, act, tc=True)
    if act in (0, 1) and wino_fits(be, g, x, w, b):
        cands["wino"] = lambda out: _fwd_wino(be, g, x, w, b, out, act)
    if _contiguous(x, w, b) and mma.conv_fits(x, size):
        if be.precision != "fp32":
            cands["tc"] = lambda out: mma.conv_tc(be, out, x, w, b, stride, pad, act)
        if _fits16(be, "fwd", g):
            cands.update(_tiles16(be, "fwd", lambda tile, out: mma.conv16(be, out, x, w, b, stride, pad, act, tile),
                                  g))
    choice = _choose(be, "fwd", g, cands, _float32_outputs(be, shape))
    if out16 and choice in ("small", "small_tc"):
        y16 = be.xp.empty(shape, dtype=be.xp.uint16)
        sums = mma.zeroed_sums(be.xp, g.k) if choice == "small_tc" else None
        _fwd_small(be, g, x, w, b, y16, act, out16=True, tc=choice == "small_tc", sums=sums)
        return Nchw16(y16, sums)
    y = be.xp.empty(shape, dtype=be.xp.float32)
    cands[choice](y)
    return y


class _TrialOutputs:
    """_choose's run_scratch: the candidates' outputs for their trials, make() at the first trial (nothing where the
    choice is known), the same ones for every trial, dropped by release() (before _choose empties the trial pool
    they come from)."""

    def __init__(self, make):
        self.make, self.out = make, []

    def __call__(self, fn):
        if not self.out:
            self.out.extend(self.make())
        fn(*self.out)

    def release(self) -> None:
        self.out.clear()


def _float32_outputs(be, shape):
    """_TrialOutputs for candidates that write one float32 output of shape."""
    return _TrialOutputs(lambda: (be.xp.empty(shape, dtype=be.xp.float32),))


def _filter_backward(be, g, copies, dy, x, dw, db):
    """dw += dE/dw and db += dE/db (unless None) by the filter-gradient algorithm chosen for g; leaves copies
    sharing its channels-last copy of dy with the data gradient."""
    fc = _split_cands(be, FILTER_CFGS, g, lambda cfg, sp, dw_, db_: _filter_implicit(be, cfg, g, dy, x, dw_, db_, sp))
    fc["im2col"] = lambda dw_, db_: _filter_im2col(be, g, dy, x, dw_, db_, x.nbytes + dy.nbytes)
    if small_tc_fits(be, g, dy, x, dw):
        fc["small_tc"] = lambda dw_, db_: _filter_small_tc(be, g, dy, x, dw_, db_)
    if wino_fits(be, g, dy, x, dw):
        fc["wino"] = lambda dw_, db_: _filter_wino(be, g, dy, x, dw_, db_)
    if _contiguous(dy, x, dw) and mma.conv_fits(x, dw.size) and dy.size < 2**31:
        if be.precision != "fp32":
            fc["tc"] = lambda dw_, db_: _filter_tc(be, g, dy, x, dw_, db_)
        if _fits16(be, "filter", g):
            fc.update(_tiles16(be, "filter", lambda tile, dw_, db_: _filter_tc16(be, g, copies, dy, dw_, db_, tile),
                               g))
    # the filter gradient accumulates: measured on zeroed outputs of its own
    choice = _choose(be, "filter", g, fc, _TrialOutputs(
        lambda: (be.xp.zeros_like(dw), be.xp.zeros_like(db) if db is not None else None)))
    copies.share = True
    fc[choice](dw, db)
    copies.drop("x")


def _measured16(be, op: str, g: Geometry) -> str | None:
    """The measured choice of op for g when it is a channels-last candidate (one that reads the copies of
    mma.to_nhwc: CL_PREFIX)."""
    choice = be.conv_choice(op, g.key())
    prefix = CL_PREFIX.get(be.precision)
    return choice if prefix and choice and choice.startswith(prefix) and not (be.force_conv_algo or _forced()) else None


class Nhwc16:
    """An activation handed over to a convolution as the channels-last copy its kernels read (mma.to_nhwc's layout,
    unpadded) instead of NCHW float32: `data` [n, H, W, C], bf16 bits (uint16) at bf16 or float32 rounded to tf32 at
    tf32, `shape` the NCHW shape it stands for.
    The op before makes it for its one reader, a convolution that keeps that copy (takes_nhwc16), and so does a batch
    norm's backward for the gradient of the convolution before it (takes_dy16); only the convolution forwards and
    conv2d_backward read it. `k_major`: None, or a gradient's K-major copy too (mma.dy_t's layout, tf32), made where
    the convolution's filter gradient runs an r tile (dy16_k_major)."""

    __slots__ = ("data", "shape", "k_major")

    def __init__(self, data, shape, k_major=None):
        self.data, self.shape, self.k_major = data, tuple(shape), k_major


class Nchw16:
    """An activation stored in bf16: `data` [n, C, H, W] bf16 bits (uint16, NCHW as the float32 it stands for).
    A bf16 convolution forward writes its output so where that output's one reader is the batch norm after it (the op
    contract's `to_norm`); only the batch-norm ops read it (norm.cu's "_x16" kernels), forward and backward. `sums`:
    None, or float64 sums per channel and sums of squares of those values, and their count (mma.zeroed_sums' copies),
    which the convolution made as it wrote them ("small_tc"; a TMA tile's forward or pooled forward where
    mma.epilogue_sums_fit), so that the batch norm's statistics need no pass over them (norm.py). A batch norm's
    dE/dx handed to a convolution's backward (takes_dy16_nchw) is one too, without sums."""

    __slots__ = ("data", "sums")

    def __init__(self, data, sums=None):
        self.data, self.sums = data, sums

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def size(self) -> int:
        return self.data.size


def conv_gelu_fits(be, x, w, b, g: Geometry) -> bool:
    """Whether conv.cu's conv_gelu_nhwc16 computes this convolution: float32 contiguous x, w (and b), C R S <= 32
    taps a pixel (3 x 3 x 3 included), K <= 64 outputs, a multiple of 8 (16-byte stores of 8 bf16 channels), under
    2^31 output pixels and elements."""
    return (be.precision == "bf16" and _contiguous(x, w, b) and x.dtype == w.dtype == np.float32
            and g.c * g.r * g.s <= 32 and g.k <= 64 and g.k % 8 == 0 and g.n * g.k * g.p * g.q < 2**31
            and x.size < 2**31)


def takes_nhwc16(be, x_shape, feeds) -> bool:
    """Whether the convolution forward that `feeds` names ((w_shape, stride, padding), the op contract's hand-over;
    None: no hand-over) reads an Nhwc16 of x_shape (N, C, H, W): at bf16 and tf32, where its forward and filter
    gradient were measured on channels-last copies (_kept16), so that it keeps x's copy, not x; C a multiple of the
    chunk (the hand-over's copy is not padded as to_nhwc's would be)."""
    if feeds is None or len(x_shape) != 4 or be.precision not in HANDS_OVER:
        return False
    w_shape, stride, pad = feeds
    n, c, h, wd = x_shape
    k, c2, r, s = w_shape
    return (c2 == c and c % mma.CHUNK[be.precision] == 0 and 0 < n <= mma.GRID_YZ
            and n * h * wd < 2**31
            and _kept16(be, Geometry(n, c, h, wd, k, r, s, int(stride), int(pad))) is not None)


def _fed_geometry(grad_feeds) -> Geometry:
    """The geometry of the convolution that grad_feeds names (takes_dy16's layout)."""
    w_shape, stride, pad, x_shape, _ = grad_feeds
    return Geometry(*x_shape, w_shape[0], w_shape[2], w_shape[3], int(stride), int(pad))


def takes_dy16(be, y_shape, grad_feeds) -> bool:
    """Whether the convolution backward that `grad_feeds` names reads the gradient of y_shape (N, K, P, Q) as an
    Nhwc16 alone: grad_feeds = (w_shape, stride, padding, x_shape, pool) of the Conv2D (-> MaxPool2D, pool = (kernel,
    stride), else None) whose output y is, its input of x_shape (the op contract's backward hand-over; None: none).
    At bf16 and tf32, where the convolution's filter and data gradients were both measured on channels-last copies
    (conv_backward16), and a pooling's windows tile its input (pool_grad16_nhwc16), at bf16 only: at tf32 the
    pooled gradient's copy would take as many bytes as the float32 that pool_grad_nhwc32 reads."""
    if grad_feeds is None or len(y_shape) != 4 or be.precision not in HANDS_OVER:
        return False
    w_shape, _, _, x_shape, pool = grad_feeds
    if x_shape is None or len(x_shape) != 4 or len(w_shape) != 4:
        return False
    n, c, h, wd = x_shape
    k, c2 = w_shape[:2]
    chunk = 2 if be.precision == "bf16" else mma.CHUNK[be.precision]    # (bf16 pairs; tf32's 16-byte chunks)
    if c2 != c or k % chunk or not 0 < n <= mma.GRID_YZ or n * h * wd >= 2**31:
        return False
    if pool is not None and be.precision != "bf16":
        return False
    g = _fed_geometry(grad_feeds)
    if pool is None:
        want = (n, k, g.p, g.q)
    else:
        kernel, pool_stride = (int(v) for v in pool)
        if kernel != pool_stride or kernel < 1:
            return False
        want = (n, k, g.p // kernel, g.q // kernel)
    return (tuple(y_shape) == want and _measured16(be, "filter", g) is not None
            and _measured16(be, "data", g) is not None)


def dy16_k_major(be, grad_feeds) -> bool:
    """Whether a gradient handed over by takes_dy16 comes with its K-major copy (Nhwc16.k_major): where the
    convolution's filter gradient runs an r tile (filter_reads_k_major; the batch norm cannot tell frozen weights,
    so it makes the copy for any)."""
    return filter_reads_k_major(be, _fed_geometry(grad_feeds))


def takes_dy16_nchw(be, y_shape, grad_feeds) -> bool:
    """Whether the convolution backward that `grad_feeds` names reads the gradient of y_shape (N, K, P, Q) stored in
    bf16 (an Nchw16): at bf16, where no pooling follows the convolution and its filter gradient was measured to run
    "small_tc" (mma.cu's conv_small_filter_tc, which rounds dy to bf16 itself: the same values, half the bytes)."""
    if grad_feeds is None or len(y_shape) != 4 or be.precision != "bf16" or be.force_conv_algo or _forced():
        return False
    w_shape, _, _, x_shape, pool = grad_feeds
    if pool is not None or x_shape is None or len(x_shape) != 4 or len(w_shape) != 4 or w_shape[1] != x_shape[1]:
        return False
    g = _fed_geometry(grad_feeds)
    return tuple(y_shape) == (g.n, g.k, g.p, g.q) and be.conv_choice("filter", g.key()) == "small_tc"


def conv_backward_nchw16(be, g: Geometry, dy16, x, w, dw, need_dx=True, relu_x=None, out16=False):
    """conv_backward from dy16, dE/dy in bf16 (uint16 NCHW, the batch norm's hand-over: takes_dy16_nchw; no bias
    gradient): the filter gradient on "small_tc" (unless dw is None), the data gradient (if need_dx) by the measured
    choice from dy16's float32 values."""
    if dw is not None:
        _filter_small_tc(be, g, dy16, x, dw, None)
    if not need_dx:
        return None
    dy = (dy16.astype(be.xp.uint32) << 16).view(be.xp.float32)
    return conv_backward(be, dy, x, w, None, None, g.stride, g.pad, True, relu_x, None, x.shape, out16)


def _kept16(be, g: Geometry) -> str | None:
    """The forward's channels-last candidate for g when the forward and the filter gradient were both measured to run on
    channels-last copies (so the forward's copy of x can serve the backward instead of x), else None."""
    return _measured16(be, "fwd", g) if _measured16(be, "filter", g) else None


def conv_forward_kept(be, x, w, b, stride, pad, act=0, out16=False):
    """(y, x16): y = conv_forward(...), and x16 the channels-last copy of x it read where _kept16 says the
    backward can use it in place of x (None otherwise: the backward needs x). x may be that copy (Nhwc16). out16: y
    as an Nchw16 where the forward runs on the copies or "small" (conv_forward), else float32."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    g = Geometry(n, c, h, wd, k, r, s, stride, pad)
    fwd = _kept16(be, g)
    if fwd is None:
        if isinstance(x, Nhwc16):
            raise ValueError("conv2d_forward: a channels-last input where the forward does not keep that copy")
        return conv_forward(be, x, w, b, stride, pad, act, g, out16), None
    check(w, b)
    if not isinstance(x, Nhwc16):
        check(x)
    y = be.xp.empty((n, k, g.p, g.q), dtype=be.xp.uint16 if out16 else be.xp.float32)
    x16 = x.data if isinstance(x, Nhwc16) else mma.to_nhwc(be, x)
    call = mma.plan_conv16(y, x16, mma.weight_copy(be, w), b, stride, pad, act | (mma.OUT16 if out16 else 0),
                           _tile16_of("fwd", fwd), be.sms)
    if out16:             # the batch norm's statistics from the epilogue where it makes them (a TMA tile's)
        mma.with_sums(be.xp, call)
    mma.launch_conv(be, call)
    return (Nchw16(y, None if call is None else call.sums) if out16 else y), x16


def conv_maxpool_forward(be, x, w, b, stride, pad, act, kernel, pool_stride, keep, out16=False):
    """maxpool2d_forward(act(conv(x, w) + b), kernel, pool_stride) as ((y, arg), x16) with the pooling in the
    convolution's epilogue (mma.conv16_pool) where the windows are 2 x 2 at stride 2 and the forward was measured to
    run on channels-last copies, on the tile measured for the pooled forward itself ("pool": its output is a quarter
    of the forward's, so the two need not share a tile); x16 (keep: the backward is to use x's copy) the copy of x that
    serves the backward (conv_forward_kept's rule; always for an Nhwc16 x, the only copy there is), else None. None
    where the fused kernel does not apply. out16: y as an Nchw16."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    g = Geometry(n, c, h, wd, k, r, s, stride, pad)
    if kernel != pool_stride or kernel != 2 or not _contiguous(w, b) or not (isinstance(x, Nhwc16) or _contiguous(x)):
        return None
    if (("fwd", g.key()) not in be._tune and be.capturing is None and not isinstance(x, Nhwc16)
            and not (be.force_conv_algo or _forced())):
        conv_forward(be, x, w, b, stride, pad, act, g)      # the forward measured first (a batch's first step)
    fwd = _measured16(be, "fwd", g)
    if fwd is None:
        return None
    x16 = x.data if isinstance(x, Nhwc16) else mma.to_nhwc(be, x)
    act |= mma.OUT16 if out16 else 0
    cands = _tiles16(be, "pool", lambda tile, out: out.append(
        mma.conv16_pool(be, x, w, b, stride, pad, act, tile, x16, stats=out16)), g)
    # measured where it can be (not inside a graph capture: there an unmeasured shape takes the forward's tile)
    measure = be.capturing is None or ("pool", g.key()) in be._tune
    choice = (_choose(be, "pool", g, cands, lambda fn: fn([])) if measure
              else _pool_as_forward(fwd, cands, be._tune_times.get(("fwd", g.key()), {})))
    out = []
    cands[choice](out)
    y, arg, sums = out[0]
    return (Nchw16(y, sums) if out16 else y, arg), (x16 if isinstance(x, Nhwc16) or (keep and _kept16(be, g)) else None)


def _pool_as_forward(fwd: str, cands: dict, fwd_times: dict) -> str:
    """The pooled forward's tile where it is not measured (inside a capture): the forward's measured choice, or where
    that is not among them (a TMA tile whose pooled forward does not fit) the fastest of the forward's measured times
    among the pooled candidates."""
    if fwd in cands:
        return fwd
    return min(cands, key=lambda name: fwd_times.get(name, float("inf")))


def conv_backward(be, dy, x, w, dw, db, stride, pad, need_dx=True, relu_x=None, x16=None, x_shape=None,
                  out16=False):
    """dw += dE/dw, db += dE/db (each unless None: a frozen parameter); returns dE/dx (zeroed where relu_x <= 0 when
    given) or None. x may be None where conv_forward_kept kept x16, its copy (x_shape: x's shape): the filter
    gradient then runs the measured "tc16" candidate on it. out16: dE/dx as an Nchw16 where the measured data
    gradient runs on channels-last copies, else float32."""
    check(dy, x, w, dw, db, relu_x)
    n, c, h, wd = x.shape if x is not None else x_shape
    k, _, r, s = w.shape
    g = Geometry(n, c, h, wd, k, r, s, stride, pad)
    xp = be.xp
    copies = _Copies16(be, dy, x, x16)
    if dw is not None and x is None:
        copies.share = True
        _filter_tc16(be, g, copies, dy, dw, db, _tile16_of("filter", _measured16(be, "filter", g)))
    elif dw is not None:
        _filter_backward(be, g, copies, dy, x, dw, db)
    elif db is not None:
        channel_sum(be, dy, db, g.n, g.k, g.p * g.q)
    if not need_dx:
        return None
    size = n * c * h * wd
    dc = _split_cands(be, DATA_CFGS, g, lambda cfg, sp, out: _data_implicit(be, cfg, sp, g, dy, w, out, relu_x))
    dc["im2col"] = lambda out: _data_im2col(be, g, dy, w, out, relu_x, 4 * size + dy.nbytes)
    if wino_fits(be, g, dy, w, relu_x):
        dc["wino"] = lambda out: _data_wino(be, g, dy, w, out, relu_x)
    if _contiguous(dy, w, relu_x) and mma.conv_fits(dy, size):
        if be.precision != "fp32":
            dc["tc"] = lambda out: mma.conv_data_tc(be, out, dy, w, relu_x, stride, pad)
        if _fits16(be, "data", g):
            dc.update(_tiles16(be, "data", lambda tile, out: mma.conv16_data(be, out, copies("dy"), w, relu_x, pad,
                                                                               tile), g))
    copies.share = False
    choice = _choose(be, "data", g, dc, _float32_outputs(be, (n, c, h, wd)))
    copies.share = True
    if out16 and _measured16(be, "data", g) == choice:
        return _data16(be, g, copies("dy"), w, relu_x, choice)
    dx = xp.empty((n, c, h, wd), dtype=xp.float32)
    dc[choice](dx)
    return dx


def _data16(be, g: Geometry, dy16, w, relu_x, choice: str):
    """dE/dx as an Nchw16 by the data gradient's channels-last candidate `choice`, from the copy dy16 of dy."""
    dx16 = be.xp.empty((g.n, g.c, g.h, g.w), dtype=be.xp.uint16)
    mma.conv16_data(be, dx16, dy16, w, relu_x, g.pad, _tile16_of("data", choice), out16=True)
    return Nchw16(dx16)


def conv_backward16(be, g: Geometry, dy16, x, x16, w, dw, need_dx=True, relu_x=None, out16=False, dy_t=None):
    """conv_backward from dy16, the channels-last copy of dy alone (mma.to_nhwc's; no float32 dy, so no bias gradient
    here): the filter gradient (unless dw is None) and the data gradient (if need_dx) by their measured channels-last
    choices, which must exist (conv_backward16_ready); out16: dE/dx as an Nchw16. dy_t: dy's K-major copy where its
    maker wrote it (filter_reads_k_major)."""
    copies = _Copies16(be, None, x, x16)
    copies.made["dy"], copies.share = dy16, True
    if dy_t is not None:
        copies.made["dy_t"] = dy_t
    if dw is not None:
        _filter_tc16(be, g, copies, None, dw, None, _tile16_of("filter", _measured16(be, "filter", g)))
    if not need_dx:
        return None
    if out16:
        return _data16(be, g, dy16, w, relu_x, _measured16(be, "data", g))
    dx = be.xp.empty((g.n, g.c, g.h, g.w), dtype=be.xp.float32)
    mma.conv16_data(be, dx, dy16, w, relu_x, g.pad, _tile16_of("data", _measured16(be, "data", g)))
    return dx


def filter_reads_k_major(be, g: Geometry) -> bool:
    """Whether conv_backward16's filter gradient of g (measured on a channels-last candidate) runs an r tile, which
    reads dy's K-major copy as well: then dy16's maker writes that copy too (mma.pool_grad_nhwc's k_major)."""
    return mma.reads_k_major(_tile16_of("filter", _measured16(be, "filter", g)))


def conv_backward16_ready(be, g: Geometry, dw, need_dx: bool) -> bool:
    """Whether conv_backward16 can run g: the gradients asked for were measured to run on channels-last copies."""
    return ((dw is None or _measured16(be, "filter", g) is not None)
            and (not need_dx or _measured16(be, "data", g) is not None))


def dense_forward(be, x, w, b, act=0):
    n, f = x.shape
    k = w.shape[0]
    y = conv_forward(be, x.reshape(n, f, 1, 1), w.reshape(k, f, 1, 1), b, 1, 0, act)
    return y.reshape(n, k)


def dense_backward(be, dy, x, w, dw, db, need_dx=True, relu_x=None):
    n, f = x.shape
    k = w.shape[0]
    dx = conv_backward(be, dy.reshape(n, k, 1, 1), x.reshape(n, f, 1, 1), w.reshape(k, f, 1, 1),
                       dw.reshape(k, f, 1, 1) if dw is not None else None, db, 1, 0, need_dx,
                       relu_x.reshape(n, f, 1, 1) if relu_x is not None else None)
    return dx.reshape(n, f) if dx is not None else None


# --- the backend's dense and convolution ops (CudaBackend inherits them) ---------------------------------------
# The methods call this module's functions of the same names (a method's body looks names up in the module).


class ConvOps:
    """CudaBackend's dense and convolution ops (the launchers above; implicit GEMM or im2col + GEMM by
    measurement)."""

    def dense_forward(self, x, w, b, act=None):
        x = self._c(x)
        return dense_forward(self, x, w, b, act_code(act)), (x, w)

    def dense_backward(self, dy, cache, dw, db, need_dx=True, relu_mask=False):
        x, w = cache
        return dense_backward(self, self._c(dy), x, w, dw, db, need_dx, x if relu_mask else None)

    def conv2d_forward(self, x, w, b, stride, padding, act=None, relu_mask=None, to_norm=False):
        """The cache keeps x, or with relu_mask False (and a measured channels-last forward) only its channels-last copy
        (conv_forward_kept), or at KEEP_BESIDE_X precisions maybe both; x may be that copy already (an Nhwc16 handed
        over by the op before, which then keeps only it). to_norm (the op contract's hand-over to a batch norm): at
        bf16, y as an Nchw16 where the forward runs on the copies."""
        x = x if isinstance(x, Nhwc16) else self._c(x)
        if isinstance(x, Nhwc16) or (self.precision in CL_PREFIX and self._keeps_copy(relu_mask is False)):
            y, x16 = conv_forward_kept(self, x, w, b, int(stride), int(padding), act_code(act),
                                       self._out16(to_norm, act))
        else:
            y, x16 = conv_forward(self, x, w, b, int(stride), int(padding), act_code(act), None,
                                  self._out16(to_norm, act)), None
        return y, (self._kept_x(x, x16, relu_mask is False), w, int(stride), int(padding), x16, x.shape)

    def _out16(self, to_norm: bool, act) -> bool:
        """Whether a convolution's output goes to the batch norm after it in bf16 (Nchw16): at bf16, to_norm, no act."""
        return bool(to_norm) and act is None and self.precision == "bf16"

    def _keeps_copy(self, alone: bool) -> bool:
        """Whether a convolution forward keeps its channels-last copy of x for the backward where it can: alone (the
        backward needs no x: relu_mask False), or beside x at KEEP_BESIDE_X precisions."""
        return alone or self.precision in KEEP_BESIDE_X

    @staticmethod
    def _kept_x(x, x16, alone: bool):
        """x as a convolution's cache keeps it: None where its copy x16 serves alone (or x is that copy)."""
        return None if x16 is not None and (alone or isinstance(x, Nhwc16)) else x

    def conv2d_backward(self, dy, cache, dw, db, need_dx=True, relu_mask=False, grad_to_norm=False):
        """dy may be the channels-last bf16 copy of dE/dy (an Nhwc16 handed over by the batch norm after the
        convolution, takes_dy16): its gradients then run on it alone (conv_backward16); or dE/dy in bf16 (an Nchw16,
        takes_dy16_nchw: conv_backward_nchw16); either way no bias gradient.
        grad_to_norm (the op contract's hand-over to the batch norm before): at bf16, dE/dx as an Nchw16 where the
        data gradient runs on channels-last copies."""
        x, w, stride, padding, x16, x_shape = cache
        out16 = bool(grad_to_norm) and self.precision == "bf16"
        if relu_mask and x is None:
            raise ValueError("conv2d_backward: relu_mask=True after a forward given relu_mask=False")
        relu_x = x if relu_mask else None
        if not isinstance(dy, (Nhwc16, Nchw16)):
            return conv_backward(self, self._c(dy), x, w, dw, db, stride, padding, need_dx, relu_x, x16, x_shape,
                                 out16)
        g = Geometry(*x_shape, *(w.shape[i] for i in (0, 2, 3)), stride, padding)
        if isinstance(dy, Nhwc16):
            if db is not None or not conv_backward16_ready(self, g, dw, need_dx):
                raise ValueError("conv2d_backward: a channels-last dy where its gradients do not run on it")
            return conv_backward16(self, g, dy.data, x, x16, w, dw, need_dx, relu_x, out16, dy.k_major)
        # the batch norm's hand-over in bf16 (takes_dy16_nchw)
        if db is not None or x is None or self.conv_choice("filter", g.key()) != "small_tc":
            raise ValueError("conv2d_backward: a bf16 dy where the filter gradient does not run on it")
        return conv_backward_nchw16(self, g, dy.data, x, w, dw, need_dx, relu_x, out16)

    def conv2d_gelu_forward(self, x, w, b, stride, padding, relu_mask=None, feeds=None):
        """gelu(conv2d(x)) in one kernel (conv.cu's conv_gelu_nhwc16) where the GELU hands its output over as the
        next convolution's channels-last copy (feeds, takes_nhwc16) and the convolution is small (conv_gelu_fits):
        z = conv2d(x) in float32 for the backward, y the Nhwc16. Else the two ops (compose)."""
        x = self._c(x)
        k, _, r, s = w.shape
        n, c, h, wd = x.shape
        g = Geometry(n, c, h, wd, k, r, s, int(stride), int(padding))
        if not conv_gelu_fits(self, x, w, b, g) or not takes_nhwc16(self, (n, k, g.p, g.q), feeds):
            return compose.conv2d_gelu_forward(self, x, w, b, stride, padding, relu_mask, feeds)
        z = self.xp.empty((n, k, g.p, g.q), dtype=self.xp.float32)
        y16 = self.xp.empty((n, g.p, g.q, k), dtype=self.xp.uint16)
        get_kernel(self.device_id, "conv", "conv_gelu_nhwc16")((grid_for(n * g.p * g.q, self.sms),), (256,), (
            x, w, NULL if b is None else b, z, y16, *(_i32(v) for v in (n, c, h, wd, k, r, s, stride, padding, g.p,
                                                                       g.q))))
        conv_cache = (x, w, int(stride), int(padding), None, x.shape)      # conv2d_forward's, keeping x
        return Nhwc16(y16, z.shape), (conv_cache, z)                      # z: gelu_forward's cache

    def conv2d_gelu_backward(self, dy, cache, dw, db, need_dx=True, relu_mask=False):
        return compose.conv2d_gelu_backward(self, dy, cache, dw, db, need_dx, relu_mask)

    # the fused ops that are this backend's own ops in a row (their caches keep what each op keeps)
    def _conv_pool_forward(self, x, w, b, stride, padding, pool_kernel, pool_stride, act, alone, to_norm=False):
        """The conv2d -> maxpool2d caches of (conv2d_forward, maxpool2d_forward) from one kernel where
        conv_maxpool_forward applies, else None; alone: the backward needs no x (conv2d_forward's relu_mask False).
        x may be an Nhwc16 (as conv2d_forward's); y an Nchw16 (to_norm, as conv2d_forward's)."""
        x = x if isinstance(x, Nhwc16) else self._c(x)
        fused = None
        if self.precision in CL_PREFIX:
            fused = conv_maxpool_forward(self, x, w, b, int(stride), int(padding), act_code(act), int(pool_kernel),
                                         int(pool_stride), self._keeps_copy(alone), self._out16(to_norm, act))
        if fused is None:
            return None
        (y, arg), x16 = fused
        k = w.shape[0]
        g = Geometry(*x.shape, k, w.shape[2], w.shape[3], int(stride), int(padding))
        conv_cache = (self._kept_x(x, x16, alone), w, int(stride), int(padding), x16, x.shape)
        return y, (conv_cache, ((x.shape[0], k, g.p, g.q), y, arg, int(pool_kernel), int(pool_stride)))

    def conv2d_relu_maxpool_forward(self, x, w, b, stride, padding, pool_kernel, pool_stride):
        fused = self._conv_pool_forward(x, w, b, stride, padding, pool_kernel, pool_stride, "relu", False)
        if fused is not None:
            return fused
        return compose.conv2d_relu_maxpool_forward(self, x, w, b, stride, padding, pool_kernel, pool_stride)

    def conv2d_relu_maxpool_backward(self, dy, cache, dw, db, need_dx=True, relu_mask=False):
        return compose.conv2d_relu_maxpool_backward(self, dy, cache, dw, db, need_dx, relu_mask)

    def conv2d_maxpool_forward(self, x, w, b, stride, padding, pool_kernel, pool_stride, relu_mask=None,
                               to_norm=False):
        fused = self._conv_pool_forward(x, w, b, stride, padding, pool_kernel, pool_stride, None, relu_mask is False,
                                        to_norm)
        if fused is not None:
            return fused
        return compose.conv2d_maxpool_forward(self, x, w, b, stride, padding, pool_kernel, pool_stride, relu_mask)

    def conv2d_maxpool_backward(self, dy, cache, dw, db, need_dx=True, relu_mask=False, grad_to_norm=False):
        """The two ops' backward, except where the windows tile z (stride == kernel) and the convolution's gradients
        run on channels-last copies (measured): then the pooled gradient goes straight to the channels-last copy of
        dE/dz (mma.pool_grad_nhwc) that they read, and the bias gradient is the sum of dy. dy may be
        that pooled gradient channels-last in bf16 already (an Nhwc16 handed over by the batch norm after the
        pooling, takes_dy16; no bias gradient). grad_to_norm as conv2d_backward's."""
        conv_cache, pool_cache = cache
        x, w, stride, padding, x16, x_shape = conv_cache
        z_shape, _, arg, kernel, pool_stride = pool_cache
        g = Geometry(*x_shape, *(w.shape[i] for i in (0, 2, 3)), stride, padding)
        direct = (self.precision in CL_PREFIX and kernel == pool_stride and not (relu_mask and x is None)
                  and conv_backward16_ready(self, g, dw, need_dx))
        if isinstance(dy, Nhwc16):          # the batch norm's hand-over (takes_dy16): the pooled gradient in bf16
            if db is not None or not direct:
                raise ValueError("conv2d_maxpool_backward: a channels-last dy where its gradients do not run on it")
            dz16, dz_t = mma.pool_grad16_nhwc16(self, dy.data, arg, z_shape, kernel), None
        elif not direct:
            return compose.conv2d_maxpool_backward(self, dy, cache, dw, db, need_dx, relu_mask)
        else:
            dy = self._c(dy)
            if db is not None:
                channel_sum(self, dy, db, g.n, g.k, dy.shape[2] * dy.shape[3])
            k_major = dw is not None and filter_reads_k_major(self, g)     # dz's K-major copy, in the same launch
            dz = mma.pool_grad_nhwc(self, dy, arg, z_shape, kernel, k_major)
            dz16, dz_t = dz if k_major else (dz, None)
        return conv_backward16(self, g, dz16, x, x16, w, dw, need_dx, x if relu_mask else None,
                               bool(grad_to_norm) and self.precision == "bf16", dz_t)

    def dense_chain_forward(self, x, layers):
        return compose.dense_chain_forward(self, x, layers)

    def dense_chain_backward(self, dy, cache, grads, need_dx=True, relu_mask=False, accumulate=True):
        return compose.dense_chain_backward(self, dy, cache, grads, need_dx, relu_mask, accumulate)
