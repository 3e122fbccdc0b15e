"""Weight initialisation: He normal for layers followed by ReLU (the thesis's choice), Glorot uniform otherwise;
the identity (Dirac) initialisation of a convolution; and the whitening initialisation of a first convolution from
the statistics of training-image patches (airbench's).

The random ones draw from hetnet's one generator (`hetnet.seed`), so a seeded model is reproducible.

    >>> import hetnet as hn, numpy as np
    >>> from hetnet import init
    >>> w = init.dirac_(np.empty((4, 2, 3, 3)))                  # w[i, i, 1, 1] = 1 for i < 2, all else 0
    >>> model = hn.Sequential([hn.Conv2D(3, 24, 2, init="whitening"), hn.GELU()])
    >>> images = np.random.default_rng(0).integers(0, 256, size=(64, 3, 8, 8), dtype=np.uint8)
    >>> init.data_init(model, images)                            # the first conv whitened, its weight frozen
    ['0']
"""
from __future__ import annotations

import contextlib

import numpy as np

from .random import generator


def fans(shape: tuple) -> tuple[int, int]:
    """(fan_in, fan_out) for Dense (out, in) and Conv2D (out, in, kh, kw) weights."""
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def he_normal(shape: tuple) -> np.ndarray:
    """N(0, 2 / fan_in)."""
    fan_in, _ = fans(shape)
    return generator().normal(0.0, np.sqrt(2.0 / fan_in), size=shape)


def glorot_uniform(shape: tuple) -> np.ndarray:
    """U(-a, a) with a = sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(shape)
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return generator().uniform(-a, a, size=shape)


def initial_weight(shape: tuple, kind: str) -> np.ndarray:
    if kind == "he":
        return he_normal(shape)
    if kind == "glorot":
        return glorot_uniform(shape)
    raise ValueError(f"unknown initialisation {kind!r}: expected 'he' or 'glorot'")


# --- identity ------------------------------------------------------------------------------------------------------


def dirac_(weight, groups: int = 1):
    """Fill a convolution weight (K, C, *kernel) in place with the identity, as torch.nn.init.dirac_: all zeros,
    then w[g*K/groups + i, i, centre] = 1 for i < min(K/groups, C) in each group g (centre = size // 2 along each
    kernel axis). Returns the weight. airbench applies it to the first C filters only: `dirac_(w[:C])`.

        >>> dirac_(np.empty((2, 3, 3, 3)))[:, :, 1, 1].tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    """
    if not 3 <= weight.ndim <= 5:
        raise ValueError(f"dirac_: expected a 3-, 4- or 5-dimensional weight, got shape {tuple(weight.shape)}")
    k, c = weight.shape[0], weight.shape[1]
    if groups < 1 or k % groups:
        raise ValueError(f"dirac_: {k} filters do not split into {groups} groups")
    per = k // groups
    centre = tuple(s // 2 for s in weight.shape[2:])
    weight[...] = 0
    for g in range(groups):
        for i in range(min(per, c)):
            weight[(g * per + i, i) + centre] = 1
    return weight


# --- whitening from patch statistics -------------------------------------------------------------------------------
# A patch is the (C, k, k) window x[n, :, p:p+k, q:q+k] of an image, flattened to a vector v of m = C*k*k values in
# the (c, r, s) order of a conv weight row. With S = E[v v^T] (the second moment over every window of every image,
# stride 1, no padding; not centred, as airbench: the images are normalised) and S = U diag(lambda) U^T:
#   w_i = u_i / sqrt(lambda_i + eps)   (eigenvalues in decreasing order),  weight = [w; -w]  (2m filters)
# so the conv's outputs w_i . v satisfy E[(w_i . v)(w_j . v)] = delta_ij lambda_i / (lambda_i + eps): whitened
# patches, with directions of variance below eps damped rather than blown up; the negated copies let a following
# GELU/ReLU pass both signs.


def _model_input(images, mean, std, xp=np):
    """images as float64 model input (an array of xp): uint8 -> (x/255 - mean) / std per channel as hetnet's loaders
    normalise (mean/std in [0, 1] units; None: x/255); float images are taken as they are."""
    x = xp.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float64) / 255.0
        if mean is not None:
            c = x.shape[1]
            x = (x - xp.asarray(mean, np.float64).reshape(1, c, 1, 1)) / xp.asarray(std, np.float64).reshape(1, c, 1, 1)
        return x
    if mean is not None or std is not None:
        raise ValueError("whitening: mean/std normalise uint8 images; float images are used as they are")
    return x.astype(np.float64, copy=False)


def patch_moment(images, kernel_size: int, mean=None, std=None, chunk: int = 128, xp=np) -> np.ndarray:
    """S = E[v v^T] over every k x k patch v (stride 1, no padding) of images (N, C, H, W), float64 (m, m) with
    m = C*k*k in the (c, r, s) order of a conv weight. Accumulated a chunk of images at a time: the patches of a
    chunk as the columns of an (m, B*P*Q) matrix (im2col, P = H-k+1, Q = W-k+1), each of its rows (c, r, s) copied
    from the images shifted by (r, s) in runs of Q, then S += cols @ cols^T. xp: the array module that computes it
    (NumPy, or CuPy on the model's GPU: the same float64 arithmetic, summed in another order); S is a NumPy array."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"whitening: expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    k = int(kernel_size)
    if n < 1 or h < k or w < k or k < 1:
        raise ValueError(f"whitening: {n} image(s) of {h}x{w} hold no {k}x{k} patch")
    m, p, q = c * k * k, h - k + 1, w - k + 1
    acc, count = xp.zeros((m, m)), 0
    for i in range(0, n, chunk):
        xb = _model_input(x[i:i + chunk], mean, std, xp)                           # [B, C, H, W] float64
        cols = xp.empty((c, k, k, xb.shape[0], p, q))
        for r in range(k):
            for s in range(k):
                cols[:, r, s] = xb[:, :, r:r + p, s:s + q].transpose(1, 0, 2, 3)
        cols = cols.reshape(m, -1)                                                  # one patch per column
        acc += cols @ cols.T
        count += cols.shape[1]
    acc = acc / count
    return acc if xp is np else xp.asnumpy(acc)


def whitening_weights(images, kernel_size: int, eps: float = 5e-4, mean=None, std=None, xp=np) -> np.ndarray:
    """The whitening filters (2m, C, k, k), m = C*k*k, float64, for a first convolution with kernel k (airbench's
    init_whitening_conv, in float64): the eigenvectors u_i of the patch second-moment matrix in decreasing order of
    their eigenvalue lambda_i, scaled by 1/sqrt(lambda_i + eps), then the same filters negated. images: uint8
    (normalised here with mean/std as hetnet's loaders do) or float (as the model sees them). Each eigenvector's
    sign is fixed so that its largest-magnitude entry is positive (eigh's sign depends on the LAPACK build; both
    signs are in the result anyway). xp: the array module of the patch statistics (patch_moment).

        >>> x = np.random.default_rng(0).normal(size=(8, 3, 6, 6))
        >>> whitening_weights(x, 2).shape
        (24, 3, 2, 2)
    """
    if not float(eps) >= 0.0:
        raise ValueError(f"whitening: eps must be >= 0, got {eps}")
    c, k = np.asarray(images).shape[1], int(kernel_size)
    s = patch_moment(images, k, mean, std, 1024 if xp is not np else 128, xp)
    lam, u = np.linalg.eigh(s, UPLO="U")                 # ascending
    lam, u = lam[::-1], u[:, ::-1]                       # decreasing, as airbench (.flip(0))
    if not np.all(lam + eps > 0):
        raise ValueError(f"whitening: the patch covariance is singular (smallest eigenvalue {lam[-1]:.3g}); "
                         f"use eps > 0")
    big = np.argmax(np.abs(u), axis=0)
    u = u * np.where(u[big, np.arange(u.shape[1])] < 0, -1.0, 1.0)
    w = (u.T / np.sqrt(lam + eps)[:, None]).reshape(-1, c, k, k)     # row i = u_i / sqrt(lambda_i + eps)
    return np.concatenate([w, -w])


def whiten_(conv, images, eps: float = 5e-4, mean=None, std=None, freeze: bool = True, xp=np):
    """Set a Conv2D's weight to whitening_weights(images, its kernel size, eps) and (freeze) stop training it
    (weight.requires_grad = False); the bias keeps training. The layer needs out_channels = 2 * C * k^2 and sees
    the images directly (the first layer). xp: the array module of the patch statistics (whitening_weights).
    Returns the layer.

        >>> import hetnet as hn
        >>> conv = whiten_(hn.Conv2D(3, 24, 2), np.random.default_rng(0).normal(size=(8, 3, 6, 6)))
        >>> conv.weight.requires_grad, conv.bias.requires_grad
        (False, True)
    """
    w = whitening_weights(images, conv.kernel_size, eps, mean, std, xp)
    if tuple(w.shape) != tuple(conv.weight.shape):
        raise ValueError(f"{conv!r}: whitening {np.asarray(images).shape[1]}-channel images with a "
                         f"{conv.kernel_size}x{conv.kernel_size} kernel gives weights {tuple(w.shape)}, the layer "
                         f"has {tuple(conv.weight.shape)}")
    conv.weight.data = w
    if freeze:
        conv.weight.requires_grad = False
    conv.awaiting_data = False
    return conv


def data_init(model, images, mean=None, std=None, eps: float = 5e-4, limit: int = 5000) -> list[str]:
    """Fill every layer of `model` that waits for data (Conv2D(init="whitening"), which must be the first layer)
    from the first `limit` images (airbench: 5,000 training images); returns the names of the layers filled.
    images uint8 with the loaders' mean/std, or float as the model sees them (see whitening_weights). The patch
    statistics are computed on the model's device (its backend's array module)."""
    layers = list(getattr(model, "layers", [model]))
    backend = getattr(model, "backend", None)
    xp = getattr(backend, "xp", np) if backend is not None else np
    done = []
    for i, layer in enumerate(layers):
        if getattr(layer, "init", None) != "whitening":
            continue
        if i != 0:
            raise ValueError(f"layer {i} {layer!r}: init 'whitening' is for the first layer (its statistics are "
                             f"those of the images)")
        with backend.device if xp is not np else contextlib.nullcontext():     # a CuPy device: made current
            whiten_(layer, np.asarray(images)[:limit], eps, mean, std, xp=xp)
        done.append(str(i))
    return done


def needs_data(model) -> bool:
    """Whether data_init has layers to fill (a Conv2D(init="whitening") not yet whitened or loaded)."""
    return any(getattr(layer, "awaiting_data", False) for layer in getattr(model, "layers", [model]))
