"""What the tensor-core GEMM tests share (tests/test_mma.py on a GPU, tests/test_mma_emulated.py on the CPU
emulator): inputs with views of every kind CudaBackend.gemm takes, NumPy versions of the kernels' roundings, and the
float64 result; and one forward and backward through a model's plan (plan_step, for the tests of the plan's
hand-overs on a GPU and on the emulated backend), and their model (pooled_cnn)."""
from __future__ import annotations

import numpy as np

import hetnet as hn

# (M, N, K): 1 and odd sizes, more than one tile each way, K tails, K = 0
SHAPES = [(1, 1, 1), (7, 33, 1), (33, 7, 127), (127, 129, 33), (129, 128, 7), (65, 63, 300)]


def round_tf32(x):
    """cvt.rna.tf32.f32: 10 mantissa bits, to nearest, ties away from zero (finite values)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def round_bf16(x):
    """cvt.rn.bf16.f32: 7 mantissa bits, to nearest even (finite values). A CuPy float32 array (contiguous) is rounded
    on its device; anything else as a NumPy float32 array."""
    if not hasattr(x, "__cuda_array_interface__"):
        x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)


ROUND = {"tf32": round_tf32, "bf16": round_bf16, None: lambda x: np.asarray(x, dtype=np.float32)}
ROUND["fp32"] = ROUND[None]     # the split (3xTF32) kernels: float32 inputs, products to about 3 x 2^-22


def stored(rng, rows: int, cols: int, transpose: bool, pad: int = 0):
    """A float32 matrix whose op() is rows x cols, stored as gemm takes it: (rows x cols) when not transposed, else
    (cols x rows); pad > 0: a column slice of a wider array (row stride > row length). Returns (the view, its
    parent array)."""
    shape = (cols, rows) if transpose else (rows, cols)
    parent = rng.standard_normal((shape[0], shape[1] + pad)).astype(np.float32)
    return parent[:, pad // 2: pad // 2 + shape[1]], parent


def op(x, transpose: bool, precision=None):
    """op(x) in float64, its elements rounded as `precision`'s kernels round them (None: exact)."""
    v = ROUND[precision](x).astype(np.float64)
    return v.T if transpose else v


def expected(a, ta, b, tb, c0, alpha, beta, precision=None):
    """alpha op(a) op(b) + beta c0 in float64 (beta == 0: c0 unused, may be NaN)."""
    out = alpha * (op(a, ta, precision) @ op(b, tb, precision))
    return out + beta * c0.astype(np.float64) if beta != 0 else out


# Convolutions (n, C, H, W, M, R, S, stride, pad) for the implicit-GEMM forward (mma.conv_tc): C not a multiple of 8,
# odd H and W, batch 1, 1x1 and 5x5, stride 2, padding larger than the stride, M and N tails in both tiles
CONV_SHAPES = [(2, 3, 7, 9, 5, 3, 3, 1, 1), (1, 5, 6, 6, 70, 1, 1, 1, 0), (3, 4, 9, 8, 6, 5, 5, 2, 2),
               (2, 9, 5, 7, 130, 3, 3, 2, 0), (2, 6, 13, 11, 130, 3, 3, 1, 1)]


def conv_inputs(rng, shape, bias: bool = True):
    """(x, w, b or None, y poisoned with NaN) in float32 for a CONV_SHAPES entry."""
    n, c, h, w, m, r, s, stride, pad = shape
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((m, c, r, s)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32) if bias else None
    p, q = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    return x, wt, b, np.full((n, m, p, q), np.nan, np.float32)


def conv_expected(x, w, b, stride: int, pad: int, act: int, precision=None):
    """act(conv(x, w) + b) in float64, x and w rounded as `precision`'s kernels round them (None: exact)."""
    from hetnet.backends import reference

    y, _ = reference.conv2d_forward(op(x, False, precision), op(w, False, precision),
                                    None if b is None else b.astype(np.float64), stride, pad)
    return np.maximum(y, 0.0) if act else y


def conv_data_inputs(rng, shape, mask: bool = True):
    """(dy, w, relu_x or None, dx poisoned with NaN) in float32 for a CONV_SHAPES entry (the data gradient)."""
    n, c, h, w, m, r, s, stride, pad = shape
    p, q = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    dy = rng.standard_normal((n, m, p, q)).astype(np.float32)
    wt = rng.standard_normal((m, c, r, s)).astype(np.float32)
    relu_x = rng.standard_normal((n, c, h, w)).astype(np.float32) if mask else None
    return dy, wt, relu_x, np.full((n, c, h, w), np.nan, np.float32)


def conv_data_expected(dy, w, relu_x, shape, precision=None):
    """dE/dx of the convolution for dE/dy = dy, in float64, dy and w rounded as `precision`'s kernels round them,
    zeroed where relu_x <= 0 when given."""
    from hetnet.backends import reference

    n, c, h, wd, _, _, _, stride, pad = shape
    _, cache = reference.conv2d_forward(np.zeros((n, c, h, wd)), op(w, False, precision), None, stride, pad)
    dx = reference.conv2d_backward(op(dy, False, precision), cache, np.zeros(w.shape), None, need_dx=True)
    return dx if relu_x is None else dx * (relu_x > 0)


def conv_filter_inputs(rng, shape):
    """(dy, x, dw0) in float32 for a CONV_SHAPES entry (the filter gradient, which adds into dw0)."""
    n, c, h, w, m, r, s, stride, pad = shape
    p, q = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    return (rng.standard_normal((n, m, p, q)).astype(np.float32), rng.standard_normal((n, c, h, w)).astype(np.float32),
            rng.standard_normal((m, c, r, s)).astype(np.float32))


def conv_filter_expected(dy, x, dw0, shape, precision=None):
    """dw0 + dE/dw of the convolution for dE/dy = dy, in float64, dy and x rounded as `precision`'s kernels round
    them."""
    from hetnet.backends import reference

    stride, pad = shape[7:]
    _, cache = reference.conv2d_forward(op(x, False, precision), np.zeros(dw0.shape), None, stride, pad)
    dw = dw0.astype(np.float64)
    reference.conv2d_backward(op(dy, False, precision), cache, dw, None, need_dx=False)
    return dw


# The channels-last bf16 convolutions (mma.cu HN_CONV16): (n, C, H, W, O, R, S, stride, pad) (each op takes those
# mma.conv16_fits allows: the gradients need O a multiple of 8, the data gradient stride 1): M tails (O 12, 72, 136),
# batch 1, odd H and W, stride 2, pad 0 under a 3x3 kernel, 1x1 and 5x5, and an image's 3 channels (the copies of x
# and w padded to 8)
CONV16_SHAPES = [(2, 8, 7, 9, 16, 3, 3, 1, 1), (1, 16, 6, 6, 72, 1, 1, 1, 0), (3, 8, 9, 8, 24, 5, 5, 2, 2),
                 (2, 24, 5, 7, 136, 3, 3, 2, 0), (2, 40, 13, 11, 12, 3, 3, 1, 1), (1, 8, 4, 4, 8, 5, 5, 1, 2),
                 (2, 16, 6, 5, 8, 3, 3, 1, 0), (3, 3, 10, 9, 16, 3, 3, 1, 1)]


def max_pool_2x2(y):
    """maxpool2d_forward's (y, argmax bytes) over 2 x 2 windows at stride 2 of y [n, C, H, W], in NumPy: the first
    maximum in window order (the rows and columns past 2 (H // 2), 2 (W // 2) in no window)."""
    n, c, h, w = y.shape
    win = y[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    win = win.reshape(n, c, h // 2, w // 2, 4)
    return win.max(axis=-1), win.argmax(axis=-1).astype(np.uint8)


# the pooled forward's (2 x 2 windows at stride 2 over the output)
POOL16_SHAPES = [(2, 8, 7, 9, 16, 3, 3, 1, 1), (3, 8, 9, 8, 24, 5, 5, 2, 2), (2, 24, 5, 7, 136, 3, 3, 2, 0),
                 (4, 8, 16, 18, 16, 3, 3, 1, 1)]


def bf16_bits(a):
    """The bf16 (round to nearest even) of float32 values, as their 16 bits (uint16)."""
    return (round_bf16(a).view(np.uint32) >> 16).astype(np.uint16)


def bf16_values(bits):
    """The float32 values bf16 bits (uint16) stand for."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def batch_norm_sums(y):
    """A batch norm's sums of NCHW values y in float64, as mma.folded_sums gives them: [sum per channel, sum of
    squares per channel, count per channel]."""
    v = np.asarray(y).astype(np.float64)
    return np.concatenate([v.sum(axis=(0, 2, 3)), (v * v).sum(axis=(0, 2, 3)), [v.size // v.shape[1]]])


def nhwc16(a, chunk: int = 1):
    """a [n, C, *spatial] (or weights [O, C, R, S]) channels-last as bf16 bits, as the kernels that write a copy of
    its C channels make it; chunk 8: what mma.to_nhwc16 makes (C padded with zeros to a multiple of 8)."""
    return bf16_bits(channels_last(a, chunk))


def channels_last(a, chunk: int):
    """a [n, C, *spatial] as float32 [n, *spatial, Cp], Cp = C rounded up to chunk, the channels past C zero."""
    c = a.shape[1]
    cp = -(-c // chunk) * chunk
    last = np.zeros((a.shape[0], *a.shape[2:], cp), np.float32)
    last[..., :c] = np.moveaxis(a, 1, -1)
    return last


def turned16(w):
    """The data gradient's turned weights wt[c][r][s][o] = w[o][c][R-1-r][S-1-s] as bf16 bits (mma.turn_weights16)."""
    return bf16_bits(np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)))


# The tf32 channels-last convolutions (HN_CONV32W, HN_CONV32F): their copies are float32 rounded to tf32, O of the
# gradients a multiple of 4 (C padded to one); shapes as CONV16_SHAPES (M tails, batch 1, odd H and W, stride 2, 1x1
# and 5x5, 3 channels) with channel counts that are not multiples of 8.
CONV32_SHAPES = [(2, 4, 7, 9, 12, 3, 3, 1, 1), (1, 12, 6, 6, 72, 1, 1, 1, 0), (3, 4, 9, 8, 20, 5, 5, 2, 2),
                 (2, 20, 5, 7, 132, 3, 3, 2, 0), (2, 36, 13, 11, 12, 3, 3, 1, 1), (1, 8, 4, 4, 4, 5, 5, 1, 2),
                 (3, 3, 10, 9, 12, 3, 3, 1, 1)]
POOL32_SHAPES = [(2, 4, 7, 9, 12, 3, 3, 1, 1), (2, 20, 5, 7, 132, 3, 3, 2, 0)]


def dy_t_host(dy16):
    """mma.dy_t's K-major copy of a tf32 channels-last copy dy16 [n, P, Q, O], on the host: [O, ldk], column k = (img,
    p, q), ldk = n P Q rounded up to 4, zeros past n P Q."""
    o = dy16.shape[-1]
    k = dy16.size // o
    out = np.zeros((o, -(-k // 4) * 4), np.float32)
    out[:, :k] = dy16.reshape(k, o).T
    return out


def split_copy(a):
    """The split copy of float32 a [..., C] (C a multiple of 4) as the fp32 kernels read it: each value as hi =
    tf32(v) and lo = tf32(v - hi), each chunk of 4 channels as its hi chunk then its lo chunk: [..., C / 4, 2, 4]."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    hi = round_tf32(a)
    lo = round_tf32(a - hi)
    shape = (*a.shape[:-1], a.shape[-1] // 4, 1, 4)
    return np.ascontiguousarray(np.concatenate([hi.reshape(shape), lo.reshape(shape)], axis=-2))


def nhwc_copy(a, precision: str, padded: bool = True):
    """a [n, C, *spatial] (or weights [O, C, R, S]) channels-last as mma.to_nhwc makes it at `precision`: bf16 bits,
    float32 rounded to tf32, or at fp32 the split copy (split_copy), C padded with zeros to a multiple of 8 (bf16) or
    4; padded False: of C channels, as the copies other kernels write (pool_grad_nhwc)."""
    if precision == "bf16":
        return nhwc16(a, 8 if padded else 1)
    last = channels_last(a, 4 if padded else 1)
    return split_copy(last) if precision == "fp32" else round_tf32(last)


def turned_copy(w, precision: str):
    """The data gradient's turned weights as mma.turn_weights makes them at `precision`."""
    if precision == "bf16":
        return turned16(w)
    turned = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 2, 3, 0))
    return split_copy(turned) if precision == "fp32" else round_tf32(turned)


def pooled_cnn(device, widths: tuple, seed: int):
    """The plan tests' model of 8 x 8 images (no biases): conv 3 -> widths[0], BN, ReLU; conv -> widths[1], MaxPool 2,
    BN, ReLU; a conv, BN, ReLU to each further width; MaxPool 4, Flatten, Dense to 16; weights from hetnet's seed."""
    hn.seed(seed)
    layers = [hn.Conv2D(3, widths[0], 3, padding=1, bias=False), hn.BatchNorm2D(widths[0]), hn.ReLU(),
              hn.Conv2D(widths[0], widths[1], 3, padding=1, bias=False), hn.MaxPool2D(2), hn.BatchNorm2D(widths[1]),
              hn.ReLU()]
    for c, k in zip(widths[1:], widths[2:]):
        layers += [hn.Conv2D(c, k, 3, padding=1, bias=False), hn.BatchNorm2D(k), hn.ReLU()]
    return hn.Sequential(layers + [hn.MaxPool2D(4), hn.Flatten(), hn.Dense(widths[-1], 16, bias=False)]).to(device)


def tma_choices(n: int) -> dict:
    """pooled_cnn(widths (64, 64, 64, 64)) on n 8 x 8 images, its convolutions' choices as if measured ({(N, C, H, W,
    K, R, S, stride, padding): {op: candidate}}): the second and third forwards (the second pooled, on the persistent
    tile) on TMA tiles, each handing its bf16 output to the batch norm after it (the fourth's batch norm runs fused
    with its ReLU and pooling, bn_relu_pool, which takes no hand-over; it shares the third's shape)."""
    return {(n, 3, 8, 8, 64, 3, 3, 1, 1): {"fwd": "tc16", "filter": "tc16"},
            (n, 64, 8, 8, 64, 3, 3, 1, 1): {"fwd": "tc16w128x256s4t", "pool": "tc16w128x256s3tp", "filter": "tc16",
                                            "data": "tc16"},
            (n, 64, 4, 4, 64, 3, 3, 1, 1): {"fwd": "tc16w128x256s4t", "filter": "tc16", "data": "tc16"}}


def plan_step(model, x, y):
    """(logits, {parameter index: gradient}) of one forward and backward of the mean cross-entropy through the model's
    plan, as NumPy."""
    be = model.backend
    logits = model.plan.forward(be.asarray(x))
    dlogits = be.xp.empty_like(logits)
    be.softmax_cross_entropy_into(logits, be.labels(y), dlogits, be.zeros((1,), np.float64),
                                  be.zeros((1,), np.int64))
    model.zero_grad()
    model.plan.backward(dlogits, need_dx=False)
    return be.to_numpy(logits), {i: be.to_numpy(p.grad) for i, p in enumerate(model.parameters())}
