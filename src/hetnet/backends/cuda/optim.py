"""The optimiser launchers of the cuda backend (optim.cu): one launch over a flat parameter buffer."""
from __future__ import annotations

import numpy as np

from .kernels import NULL, check

_i32, _i64, _f32 = np.int32, np.int64, np.float32


class OptimOps:
    """CudaBackend's optimiser updates."""

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

    def lookahead_update(self, live, ema, w):
        """ema += w * (live - ema); live = ema (hetnet.train.Lookahead), float32 arrays of one shape, in one kernel
        (optim.cu) with the array expression's roundings."""
        check(live, ema)
        if live.dtype != np.float32 or ema.dtype != np.float32 or live.shape != ema.shape:
            raise ValueError(f"lookahead_update: float32 arrays of one shape, got {live.dtype} {live.shape} and "
                             f"{ema.dtype} {ema.shape}")
        self.launch("optim", "lookahead_update", live.size, live, ema, _f32(w), _i64(live.size))
