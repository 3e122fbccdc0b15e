"""The batch-normalisation launchers of the cuda backend (norm.cu): statistics, apply (+ ReLU or GELU), backward, and
BatchNorm -> ReLU -> max pooling fused. The input x of batchnorm_forward, bn_relu_forward and bn_gelu_forward may be
stored in bf16 (an Nchw16: the convolution before hands its output over so, the op contract's to_norm); their kernels
read it as float32 ("_x16" versions) and the cache keeps it for the backward. So may their backward's dy (the data
gradient of the convolution after, grad_to_norm; "_dy16" versions)."""
from __future__ import annotations

import math

import numpy as np

from .. import compose
from .conv import Nchw16, Nhwc16, dy16_k_major, takes_dy16, takes_dy16_nchw, takes_nhwc16
from .kernels import NULL, address, get_kernel
from .mma import k_major_args
from .kernels import act_code as _act

_i32, _i64, _f32 = np.int32, np.int64, np.float32
GELU = 2          # norm.cu's act code of the fused BatchNorm -> GELU (common.cuh's HN_GELU; the contract's acts: _act)


def _or_null(a):
    """A gradient array, or the kernels' null pointer for a skipped one (a frozen parameter)."""
    return NULL if a is None else a


def _x(x) -> tuple:
    """(the array a batch-norm kernel reads as x, the suffix of that kernel's name): float32 x, or an Nchw16's bf16
    bits and "_x16"."""
    return (x.data, "_x16") if isinstance(x, Nchw16) else (x, "")


BN_BLOCKS = 6       # norm.cu's HN_BN_BLOCKS: the per-channel kernels' blocks of 256 threads an SM
NHWC16_TILES = 2    # norm.cu's HN_NHWC16_TILES: the channels-last kernels' tiles (32 or 64 pixels x 64 channels)


def _nhwc16_grid(pixels: int, c: int, vectors: bool = False) -> tuple:
    """The grid of bn_apply_nhwc16 and bn_bwd_dx_nhwc16 over `pixels` (n * HW) and c channels; vectors: of their
    16-byte vector versions (bn_apply_nhwc16v, bn_bwd_dx_nhwc16v: tiles of 64 pixels)."""
    return (math.ceil(pixels / ((64 if vectors else 32) * NHWC16_TILES)), math.ceil(c / 64))


def _nhwc16_vectors(hw: int, c: int, *arrays) -> bool:
    """Whether the channels-last bf16 kernels' vector versions apply: planes and channels multiples of 8 (a vector
    of 8 pixels never crosses an image; 8 channels are one 16-byte store) and every array 16-byte aligned."""
    return hw % 8 == 0 and c % 8 == 0 and all(address(a) % 16 == 0 for a in arrays)


class NormOps:
    """CudaBackend's batch-normalisation ops (norm.cu)."""

    def _bn_grid(self, n, c, hw):
        """The per-channel kernels' grid (c, G): at most BN_BLOCKS blocks of 256 threads an SM (norm.cu compiles them
        to fit that many), so that they run in one wave of blocks with equal shares, each thread at least HN_BN_ILP =
        4 values; G = 1 where c alone fills more than a wave."""
        return (c, max(1, min(math.ceil(n * hw / 1024), BN_BLOCKS * self.sms // c)), 1)

    def _bn_batch_stats(self, x, running_mean, running_var, momentum, training, reduce=None):
        """(mean, var, sync) per channel of x[N, C, ...]: in training the batch's (one kernel, which also updates the
        running statistics), else copies of the running ones. From the sums that came with x where the convolution
        that wrote it made them (an Nchw16's sums): bn_stats_synced alone. With `reduce` (synchronised BatchNorm),
        the statistics of every process's batch together: this batch's sums (bn_sums, or x's), all-reduced, then
        bn_stats_synced; sync is then (reduce, the all-reduced count: a device array of one double) for the
        backward, else None."""
        if not training:
            return running_mean.copy(), running_var.copy(), None
        n, c = x.shape[0], x.shape[1]
        hw = x.size // max(n * c, 1)
        stats = self.xp.empty((2 * c,), dtype=self.xp.float32)
        acc = self.scratch("bn_acc", (2 * c,), np.float64)
        cnt = self.scratch("bn_cnt", (c,), np.uint32)
        xa, xs = _x(x)
        sums = x.sums if isinstance(x, Nchw16) else None       # copies of [sum x, sum x^2], count (mma.zeroed_sums)
        if sums is None and reduce is None:
            get_kernel(self.device_id, "norm", self.ix("bn_stats" + xs, x.size))(self._bn_grid(n, c, hw), (256,), (
                xa, stats, running_mean, running_var, acc, cnt, _i32(n), _i32(c), _i32(hw), _f32(momentum)))
            return stats[:c], stats[c:], None
        if sums is None:
            sums = self.xp.empty((2 * c + 1,), dtype=self.xp.float64)
            get_kernel(self.device_id, "norm", self.ix("bn_sums" + xs, x.size))(self._bn_grid(n, c, hw), (256,), (
                xa, sums, acc, cnt, _i32(n), _i32(c), _i32(hw)))
        if reduce is not None:
            reduce(sums)
        get_kernel(self.device_id, "norm", "bn_stats_synced")((math.ceil(c / 256),), (256,), (
            sums, stats, running_mean, running_var, _i32(c), _i32((sums.size - 1) // (2 * c)), _f32(momentum)))
        return stats[:c], stats[c:], None if reduce is None else (reduce, sums[-1:])

    def _bn_sync_grad_sums(self, red, m: int, sync) -> None:
        """Synchronised BatchNorm's backward: red = this process's [sum g, sum g * xhat] per channel (already added
        to dgamma, dbeta) becomes every process's sums times m / M, so that the dx kernels' 1/m (this batch's count)
        divides them by M, the count of all the batches."""
        reduce, count = sync
        reduce(red)
        red *= (m / count).astype(self.xp.float32)

    def batchnorm_forward(self, x, gamma, beta, running_mean, running_var, momentum, eps, training, act=None,
                          reduce=None, feeds=None):
        return self._bn_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training, _act(act), reduce,
                                feeds)

    def batchnorm_backward(self, dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False, grad_feeds=None):
        return self._bn_backward(dy, cache, dgamma, dbeta, need_dx, relu_mask, False, grad_feeds)

    def bn_relu_forward(self, x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce=None,
                        feeds=None):
        """relu(batchnorm(x)) owning its ReLU's derivative: batchnorm_forward's kernels (ReLU in bn_apply); the
        backward recomputes z = batchnorm(x) from x for the mask z > 0, so a consumer needs no x (with feeds, y may
        be handed over as the copy its convolution reads)."""
        return self._bn_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training, _act("relu"),
                                reduce, feeds, owns_act=True)

    def bn_relu_backward(self, dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False, inplace=False,
                         grad_feeds=None):
        """dE/dx of relu(batchnorm(x)) from dy = dE/dy: batchnorm_backward's two kernels, each taking dE/dz =
        dy * (z > 0) where it reads dy. inplace as bn_gelu_backward."""
        return self._bn_backward(dy, cache, dgamma, dbeta, need_dx, relu_mask, inplace, grad_feeds)

    def bn_gelu_forward(self, x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce=None,
                        feeds=None):
        """gelu(batchnorm(x)) in the kernels of batchnorm_forward (GELU in bn_apply); z = batchnorm(x) is not
        stored: the backward recomputes it from x."""
        return self._bn_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training, GELU, reduce,
                                feeds, owns_act=True)

    def bn_gelu_backward(self, dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False, inplace=False,
                         grad_feeds=None):
        """dE/dx of gelu(batchnorm(x)) from dy = dE/dy: batchnorm_backward's two kernels, each taking dE/dz =
        dy * gelu'(z) where it reads dy. inplace: dx may be written over x (not with relu_mask, which reads x)."""
        return self._bn_backward(dy, cache, dgamma, dbeta, need_dx, relu_mask, inplace, grad_feeds)

    def _bn_forward(self, x, gamma, beta, running_mean, running_var, momentum, eps, training, act: int, reduce,
                    feeds=None, owns_act=False):
        """owns_act: the backward applies act's derivative (norm.cu's backward act), else a ReLU's is the consumer's.
        feeds (the op contract's hand-over to a convolution): y as the channels-last copy that convolution reads
        (Nhwc16, _apply_nhwc16) where it takes one (conv.takes_nhwc16) and no consumer masks by y. x may be
        an Nchw16 (the module's docstring)."""
        x = x if isinstance(x, Nchw16) else self._c(x)
        n, c = x.shape[0], x.shape[1]
        hw = x.size // max(n * c, 1)
        mean, var, sync = self._bn_batch_stats(x, running_mean, running_var, momentum, training, reduce)
        cache = (x, mean, var, gamma, beta, float(eps), bool(training), sync, act if owns_act else 0)
        if (owns_act or act != _act("relu")) and takes_nhwc16(self, x.shape, feeds):
            return self._apply_nhwc16(x, (mean, var, gamma, beta), eps, act), cache
        y = self.xp.empty(x.shape, dtype=self.xp.float32)
        xa, xs = _x(x)
        get_kernel(self.device_id, "norm", self.ix("bn_apply" + xs, x.size))(self._bn_grid(n, c, hw), (256,), (
            xa, y, mean, var, gamma, beta, _i32(n), _i32(c), _i32(hw), _f32(eps), _i32(act)))
        return y, cache

    def _apply_nhwc16(self, x, stats, eps, act: int) -> Nhwc16:
        """act(batchnorm(x)) of x [n, C, H, W] (float32 or an Nchw16) with stats = (mean, var, gamma, beta), or act(x)
        with stats None, written as the channels-last copy a convolution reads: in bf16 (norm.cu's bn_apply_nhwc16),
        at tf32 float32 rounded to tf32 (bn_apply_nhwc32)."""
        n, c = x.shape[:2]
        hw = x.size // max(n * c, 1)
        tf32 = self.precision == "tf32"
        y16 = self.xp.empty((n, *x.shape[2:], c), dtype=self.xp.float32 if tf32 else self.xp.uint16)
        xa, xs = _x(x)
        if y16.size:
            v = not tf32 and _nhwc16_vectors(hw, c, xa, y16)
            get_kernel(self.device_id, "norm", ("bn_apply_nhwc32" if tf32 else "bn_apply_nhwc16") + ("v" if v else "")
                       + xs)(_nhwc16_grid(n * hw, c, v), (256,),
                             (xa, y16, *(stats or (NULL,) * 4), _i32(n), _i32(c), _i32(hw), _f32(eps), _i32(act)))
        return Nhwc16(y16, x.shape)

    def _bn_backward(self, dy, cache, dgamma, dbeta, need_dx, relu_mask, inplace, grad_feeds=None):
        """The backward of _bn_forward's act: the derivative of an act the op owns is applied here (dy is dE/dy),
        else there is none to apply (dy is dE/dz; a ReLU's is the consumer's). grad_feeds (the op contract's backward
        hand-over): dx as the channels-last copy of dE/dy that the convolution (-> max pool) whose output x is
        reads (Nhwc16: bn_bwd_dx_nhwc16 in bf16; bn_bwd_dx_nhwc32 in tf32, with its K-major copy where
        conv.dy16_k_major) where it takes one (conv.takes_dy16), or stored in bf16 (Nchw16,
        bn_bwd_dx16) where it reads that (conv.takes_dy16_nchw). x (the cache's) may be an Nchw16,
        which is never written over and cannot give a ReLU mask; dy may be an Nchw16 too."""
        x, mean, var, gamma, beta, eps, training, sync, act = cache
        xa, xs = _x(x)
        if relu_mask and xs:
            raise ValueError("batchnorm_backward: relu_mask=True on an input stored in bf16")
        dy, ds = (dy.data, "_dy16") if isinstance(dy, Nchw16) else (self._c(dy), "")
        ks = xs + ds                    # the kernels' versions for x's and dy's storage
        n, c = x.shape[0], x.shape[1]
        hw = x.size // max(n * c, 1)
        red = self.xp.empty((2 * c,), dtype=self.xp.float32)
        acc = self.scratch("bn_acc", (2 * c,), np.float64)
        cnt = self.scratch("bn_cnt", (c,), np.uint32)
        get_kernel(self.device_id, "norm", self.ix("bn_bwd_reduce" + ks, x.size))(self._bn_grid(n, c, hw), (256,), (
            dy, xa, mean, var, gamma, beta, red, _or_null(dgamma), _or_null(dbeta), acc, cnt, _i32(n),
            _i32(c), _i32(hw), _f32(eps), _i32(act)))
        if sync is not None:
            self._bn_sync_grad_sums(red, n * hw, sync)
        if not need_dx:
            return None
        if not relu_mask and takes_dy16(self, x.shape, grad_feeds):
            tf32 = self.precision == "tf32"
            dx16 = self.xp.empty((n, *x.shape[2:], c), dtype=self.xp.float32 if tf32 else self.xp.uint16)
            k_major, dx_t = k_major_args(self.precision, tf32 and dy16_k_major(self, grad_feeds), self, c, n * hw)
            v = not tf32 and _nhwc16_vectors(hw, c, dy, xa, dx16)
            name = "bn_bwd_dx_nhwc32" if tf32 else "bn_bwd_dx_nhwc16" + ("v" if v else "") + ks
            get_kernel(self.device_id, "norm", name)(_nhwc16_grid(n * hw, c, v), (256,), (
                dy, xa, mean, var, gamma, beta, red if training else NULL, dx16, _i32(n), _i32(c), _i32(hw),
                _f32(eps), _i32(act), *k_major))
            return Nhwc16(dx16, x.shape, dx_t)
        dx16 = not relu_mask and takes_dy16_nchw(self, x.shape, grad_feeds)      # dx stored in bf16 (Nchw16)
        if dx16:
            dx = self.xp.empty(x.shape, dtype=self.xp.uint16)
        else:
            dx = x if inplace and not relu_mask and not xs else self.xp.empty(x.shape, dtype=self.xp.float32)
        get_kernel(self.device_id, "norm", self.ix(("bn_bwd_dx16" if dx16 else "bn_bwd_dx") + ks, x.size))(
            self._bn_grid(n, c, hw), (256,), (dy, xa, mean, var, gamma, beta, red if training else NULL, dx, _i32(n),
                                              _i32(c), _i32(hw), _f32(eps), _i32(act)))
        if dx16:
            return Nchw16(dx)
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
            cache = ((x, mean, var, gamma, beta, eps, training, sync, 0), (x.shape, y, arg, kernel, stride))
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
        reduce(self._bn_grid(n, c, p * q), (256,), (dy, arg, x, mean, var, gamma, beta, red,     # (a window a step)
                                                     _or_null(dgamma), _or_null(dbeta), acc, cnt, *dims))
        if sync is not None:
            self._bn_sync_grad_sums(red, n * h * w, sync)
        if not need_dx:
            return None
        dx = x if inplace and not relu_mask else self.xp.empty_like(x)
        # a row of a window's block (k elements) a step where the windows do not overlap, else an element
        steps = n * c * h * -(-w // kernel) if kernel == stride else x.size
        self.launch("norm", self.ix("bn_relu_maxpool_bwd_dx", x.size), steps, dy, arg, x, mean, var, gamma, beta, red,
                    dx, *dims)
        return self.relu_mask(dx, x) if relu_mask else dx
