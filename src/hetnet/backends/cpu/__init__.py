"""The fast CPU backend: float32, vectorised NumPy with BLAS (the thesis's OpenMP version).

One file per op family -- dense.py, conv.py, pool.py, norm.py, elementwise.py, loss.py, optim.py -- each with its
NumPy path and its compiled loops (Numba, _jit.py) side by side. The batch is cut into chunks that a small thread
pool works through (threads.py). With Numba installed, convolution, ReLU, 2x2 max pooling and BatchNorm are
compiled loops, one GIL-free call per thread (convolution: im2col + OpenBLAS sgemm + col2im per image); without it
the NumPy paths do the same arithmetic: convolution is im2col fused per chunk + BLAS GEMMs, 2x2 max pooling works on
strided views with bit masks, BatchNorm takes its sums from BLAS. benchmarks/README-cpu.md records which variants
were measured and why these won. Every op follows the interface in `hetnet.backends` (shape legend there: N batch,
C input channels, K filters, H/W input, P/Q output, R/S kernel).

    >>> from hetnet.backends import cpu
    >>> import numpy as np
    >>> y, cache = cpu.relu_forward(cpu.asarray(np.array([-1.0, 2.0])))
    >>> y.tolist()
    [0.0, 2.0]
"""
from __future__ import annotations

import numpy as np

from ._common import _F
from .conv import (conv2d_backward, conv2d_forward, conv2d_gelu_backward, conv2d_gelu_forward, conv2d_maxpool_backward,
                   conv2d_maxpool_forward, conv2d_relu_maxpool_backward, conv2d_relu_maxpool_forward)
from .dense import dense_backward, dense_chain_backward, dense_chain_forward, dense_forward
from .elementwise import (dropout_backward, dropout_forward, gelu_backward, gelu_forward, relu_backward, relu_forward,
                          relu_mask, scale_backward, scale_forward, sigmoid_backward, sigmoid_forward,
                          softmax_backward, softmax_forward, tanh_backward, tanh_forward)
from .loss import (binary_cross_entropy_with_logits, softmax_cross_entropy, softmax_cross_entropy_into,
                   softmax_cross_entropy_stats)
from .norm import (batchnorm_backward, batchnorm_forward, bn_gelu_backward, bn_gelu_forward, bn_relu_backward,
                   bn_relu_forward, bn_relu_maxpool_backward, bn_relu_maxpool_forward)
from .optim import adam_update, sgd_update
from .pool import (avgpool2d_backward, avgpool2d_forward, global_avgpool2d_backward, global_avgpool2d_forward,
                   maxpool2d_backward, maxpool2d_forward)
from .threads import set_threads
from ..gather import gather_images

name = "cpu"
precision = "fp32"
dtype = np.dtype(np.float32)
xp = np
# the fusions of hetnet.plan this backend runs faster than their parts (the others run as separate ops)
fusions = frozenset({"conv_relu_pool", "bn_relu_pool", "dense_chain", "conv_act", "bn_act", "dense_act"})


# --- conversions and allocation -------------------------------------------------------------------------------------


def asarray(a) -> np.ndarray:
    """A fresh C-contiguous float32 copy of a."""
    return np.array(a, dtype=_F, order="C", copy=True)


def to_numpy(arr) -> np.ndarray:
    return np.array(arr, copy=True)


def zeros(shape, dtype=None) -> np.ndarray:
    return np.zeros(shape, dtype=_F if dtype is None else dtype)


def labels(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def synchronize() -> None:
    return None


# --- data-set batches from a plan (hetnet.data.ResidentLoader; the host loader is the default on this backend) -----

resident_data = False       # host batches come from BatchLoader's background thread, which is faster here


def upload(a) -> np.ndarray:
    """a as a C-contiguous array of its own dtype (uint8 images, int32 plans)."""
    return np.ascontiguousarray(a)


