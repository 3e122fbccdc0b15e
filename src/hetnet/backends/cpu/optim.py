"""Optimiser updates on the cpu backend, in place on (often flat) parameter buffers: torch.optim.SGD and Adam /
AdamW semantics.
"""
from __future__ import annotations

import numpy as np

from . import _jit as jit
from . import threads as _thr
from ._common import _F, _f32c, _jit_parallel


# --- optimiser updates ----------------------------------------------------------------------------------------------


def sgd_update(p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step, scalars=None):
    """torch.optim.SGD, in place on p and buf: compiled, one pass split over the threads (the same float32
    operations as the NumPy version below, which uses one scratch array and a pass per operation). scalars:
    [lr, first step] read now, instead of the arguments."""
    if scalars is not None:
        lr, first_step = float(scalars[0]), bool(scalars[1])
    if jit.available() and p.flags.c_contiguous and g.flags.c_contiguous and (buf is None or buf.flags.c_contiguous):
        pf, gf = p.reshape(-1), _f32c(g).reshape(-1)
        has_buf = bool(momentum) and buf is not None
        bf = buf.reshape(-1) if has_buf else pf
        args = (has_buf, _F(lr), _F(momentum), _F(1 - dampening), bool(dampening), bool(nesterov),
                _F(weight_decay), bool(first_step))
        _jit_parallel(pf.size, 20, lambda s, e, _: sgd_update_loop(pf[s:e], gf[s:e], bf[s:e], *args))
        return
    t = _thr.scratch("sgd_t", p.shape)
    if weight_decay:
        np.multiply(p, _F(weight_decay), out=t)
        t += g                                       # d = g + wd * p
        d = t
    else:
        d = g
    if momentum:
        if first_step:
            np.copyto(buf, d)                        # buf = d
        else:
            buf *= _F(momentum)                      # buf = momentum * buf + (1 - dampening) * d
            buf += _F(1 - dampening) * d if dampening else d
        if nesterov:                                 # d = d + momentum * buf
            if d is t:
                t += _F(momentum) * buf
            else:
                np.multiply(buf, _F(momentum), out=t)
                t += d
            d = t
        else:
            d = buf
    if d is t:
        t *= _F(lr)
    else:
        np.multiply(d, _F(lr), out=t)
    p -= t                                           # p = p - lr * d


def adam_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, scalars=None):
    """torch Adam / AdamW, in place on p, m and v. scalars: [lr, -, lr / (1 - beta1^step), 1 / (1 - beta2^step)]
    read now, instead of lr and step."""
    if scalars is not None:
        lr, step_size, inv_bc2 = float(scalars[0]), float(scalars[2]), float(scalars[3])
    else:
        step_size, inv_bc2 = lr / (1 - beta1 ** step), 1.0 / (1 - beta2 ** step)
    if weight_decay and decoupled:
        p *= _F(1 - lr * weight_decay)
        d = g
    elif weight_decay:
        d = g + _F(weight_decay) * p
    else:
        d = g
    m *= _F(beta1)
    m += _F(1 - beta1) * d
    v *= _F(beta2)
    v += _F(1 - beta2) * (d * d)
    denom = np.sqrt(v * _F(inv_bc2))
    denom += _F(eps)
    p -= _F(step_size) * (m / denom)


# --- compiled loops -------------------------------------------------------------------------------------------------

if jit.available():
    _jit = jit.kernel

    # --- SGD (torch.optim.SGD), one pass over the flat parameter buffer ----------------------------------------------
    # The float32 operations of cpu.py's NumPy version, in the same order: d = p*wd + g; buf = d (first step) or
    # buf*momentum + (damp1*d, or d without dampening); d = buf*momentum + d (Nesterov) or buf; p = p - d*lr.

    @_jit
    def sgd_update_loop(p, g, buf, has_buf, lr, momentum, damp1, dampening, nesterov, wd, first):
        zero = _F(0)
        for i in range(p.size):
            d = g[i]
            if wd != zero:
                d = p[i] * wd + d
            if has_buf:
                if first:
                    b = d
                else:
                    b = buf[i] * momentum + (damp1 * d if dampening else d)
                buf[i] = b
                d = b * momentum + d if nesterov else b
            p[i] = p[i] - d * lr

