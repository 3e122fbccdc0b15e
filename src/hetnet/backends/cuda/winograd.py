"""float32 3 x 3, stride-1 convolutions by Winograd's algorithms (winograd.cu, where the maths is), the fp32
candidates "wino" of conv.py's forward, data gradient and filter gradient.

The filter gradient by F(3 x 3, 2 x 2): x and dy transformed a chunk of images at a time into V and U, laid out
[parts][16][C or O][L] (the chunk's T tiles of dy cut into `parts` runs of L, zero-padded), the 16 x parts GEMMs
M[part, xi] += U V^T (O x C, K = L) accumulated over the chunks, then dw = G^T (sum of the parts) G. The forward and
the data gradient by F(2 x 2, 3 x 3): U = G w G^T once, then per chunk V, the 16 GEMMs M = U V (OUT x T) and y =
A^T M A. The functions run wherever `launch` runs winograd.cu's kernels (the cuda backend; the CPU emulator in the
tests) and `gemm` computes a chunk's GEMMs (one strided-batched cuBLAS call on the GPU, NumPy in the tests).

    filter_gradient(xp, launch, gemm, dw, x, dy, pad)       # dw [O, C, 3, 3] = dE/dw
    conv_forward(xp, launch, gemm, y, x, w, b, pad, act)    # y = act(conv(x, w) + b)
    data_gradient(xp, launch, gemm, dx, dy, w, pad)         # dx = dE/dx
"""
from __future__ import annotations

import numpy as np

from .kernels import NULL

THREADS = 256
WORKSPACE = 256 << 20       # bytes of U and V a chunk of images may take


def fits(c: int, o: int, r: int, s: int, stride: int, pad: int) -> bool:
    """Whether these algorithms compute this convolution: 3 x 3 at stride 1 with padding at most 2 (the data
    gradient is the forward of dy at padding 2 - pad)."""
    return (r, s, stride) == (3, 3, 1) and 0 <= pad <= 2 and c > 0 and o > 0


def tiles(p: int, q: int) -> tuple[int, int]:
    """(TH, TW): dy's P x Q cut into 2 x 2 tiles, the last row and column half zero when P or Q is odd."""
    return -(-p // 2), -(-q // 2)


def chunk_images(n: int, c: int, o: int, th: int, tw: int, workspace: int = WORKSPACE) -> int:
    """Images a chunk takes so that its U and V (16 x (C + O) x tiles x 4 bytes) fit in `workspace` (at least 1)."""
    per_image = 16 * (c + o) * th * tw * 4
    return max(1, min(n, workspace // per_image))


def _grid(elements: int, sms: int = 132) -> tuple[int]:
    return (max(1, min(-(-elements // THREADS), 32 * sms)),)


MIN_PART = 256             # the filter gradient's shortest K run (tiles)


def filter_parts(o: int, c: int, tiles_: int, sms: int = 132) -> int:
    """The runs the filter gradient cuts a chunk's K (its T tiles) into: enough GEMMs side by side for four blocks
    an SM at 64 x 64 outputs a block, each run at least MIN_PART tiles long."""
    blocks = 16 * -(-o // 64) * -(-c // 64)
    return max(1, min(-(-4 * sms // blocks), tiles_ // MIN_PART))


def filter_gradient(xp, launch, gemm, dw, x, dy, pad: int, add: bool = False, workspace: int = WORKSPACE,
                    sms: int = 132, parts: int | None = None) -> None:
    """dw [O, C, 3, 3] float32 = (add: dw +) the filter gradient of a 3 x 3 stride-1 convolution with padding `pad`
    from x [n, C, H, W] and dy [n, O, P, Q] (float32, contiguous). launch(name, grid, block, args) runs a kernel of
    winograd.cu (args: arrays and NumPy int32 scalars); gemm(m, u, v, beta) computes m[i] = u[i] v[i]^T + beta m[i]
    for every i on row-major arrays u [B, O, L], v [B, C, L], m [B, O, C] (B = 16 parts). parts: K's runs a chunk
    (default filter_parts)."""
    n, c, h, w = x.shape
    o, p, q = dy.shape[1:]
    if dy.shape[0] != n or (p, q) != (h + 2 * pad - 2, w + 2 * pad - 2) or tuple(dw.shape) != (o, c, 3, 3):
        raise ValueError(f"winograd: x {x.shape}, dy {dy.shape}, dw {dw.shape} do not fit a 3 x 3 stride-1 conv")
    th, tw = tiles(p, q)
    nb = chunk_images(n, c, o, th, tw, workspace)
    t_max = nb * th * tw
    parts = parts or filter_parts(o, c, t_max, sms)
    room = parts * -(-t_max // parts)                   # the slots of the longest chunk's parts
    v = xp.empty(16 * c * room, np.float32)
    u = xp.empty(16 * o * room, np.float32)
    m = xp.zeros((parts * 16, o, c), np.float32)
    i32 = np.int32
    for n0 in range(0, n, nb):
        k = min(nb, n - n0)
        t = k * th * tw
        ln = -(-t // parts)                            # L: a part's tiles (the last part zero-padded)
        launch("wino_x", _grid(c * parts * ln, sms), (THREADS,), (x, v, i32(n0), i32(k), i32(c), i32(h), i32(w),
                                                                   i32(pad), i32(th), i32(tw), i32(parts)))
        launch("wino_dy", _grid(o * parts * ln, sms), (THREADS,), (dy, u, i32(n0), i32(k), i32(o), i32(p), i32(q),
                                                                    i32(th), i32(tw), i32(parts)))
        gemm(m, u[:16 * o * parts * ln].reshape(parts * 16, o, ln), v[:16 * c * parts * ln].reshape(parts * 16, c, ln),
             0.0 if n0 == 0 else 1.0)
    launch("wino_dw", _grid(o * c, sms), (THREADS,), (m, dw, i32(o), i32(c), i32(parts), i32(1 if add else 0)))


def conv_forward(xp, launch, gemm, y, x, w, bias, pad: int, act: int = 0, relu_x=None, turn: bool = False,
                 workspace: int = WORKSPACE, sms: int = 132) -> None:
    """y [n, OUT, P, Q] float32 = act(conv(x, w) + bias) of a 3 x 3 stride-1 convolution with padding `pad` by
    F(2 x 2, 3 x 3), times (relu_x > 0) where relu_x [n, OUT, P, Q] is given; x [n, IN, H, W], w [OUT, IN, 3, 3], or
    (turn) w [IN, OUT, 3, 3] used turned (w'[a][b][r][s] = w[b][a][2 - r][2 - s]: the data gradient, data_gradient).
    bias [OUT] or None; act 0 or 1 (ReLU). gemm(m, u, v) computes m[xi] = u[xi] v[xi] for xi < 16 on row-major arrays
    u [16, OUT, IN], v [16, IN, T], m [16, OUT, T]; launch as in filter_gradient."""
    n, cin, h, wd = x.shape
    cout, p, q = y.shape[1:]
    want_w = (cin, cout, 3, 3) if turn else (cout, cin, 3, 3)
    if y.shape[0] != n or (p, q) != (h + 2 * pad - 2, wd + 2 * pad - 2) or tuple(w.shape) != want_w:
        raise ValueError(f"winograd: x {x.shape}, w {w.shape}, y {y.shape} do not fit a 3 x 3 stride-1 conv")
    th, tw = tiles(p, q)
    nb = chunk_images(n, cin, cout, th, tw, workspace)
    t_max = nb * th * tw
    v = xp.empty(16 * cin * t_max, np.float32)
    m = xp.empty(16 * cout * t_max, np.float32)
    u = xp.empty((16, cout, cin), np.float32)
    i32 = np.int32
    launch("wino_w", _grid(cout * cin, sms), (THREADS,), (w, u, i32(cout), i32(cin), i32(1 if turn else 0)))
    for n0 in range(0, n, nb):
        k = min(nb, n - n0)
        t = k * th * tw
        launch("wino_x", _grid(cin * t, sms), (THREADS,), (x, v, i32(n0), i32(k), i32(cin), i32(h), i32(wd),
                                                            i32(pad), i32(th), i32(tw), i32(1)))
        mm = m[:16 * cout * t].reshape(16, cout, t)
        gemm(mm, u, v[:16 * cin * t].reshape(16, cin, t))
        launch("wino_y", _grid(cout * t, sms), (THREADS,), (mm, NULL if bias is None else bias,
                                                             NULL if relu_x is None else relu_x, y, i32(n0), i32(k),
                                                             i32(cout), i32(p), i32(q), i32(th), i32(tw), i32(act)))


def data_gradient(xp, launch, gemm, dx, dy, w, pad: int, relu_x=None, workspace: int = WORKSPACE,
                  sms: int = 132) -> None:
    """dx [n, C, H, W] float32 = dE/dx of a 3 x 3 stride-1 convolution with padding `pad` and weights w [O, C, 3, 3]
    for dE/dy = dy [n, O, P, Q], times (relu_x > 0) where given: the forward of dy with w turned at padding 2 - pad."""
    conv_forward(xp, launch, gemm, dx, dy, w, None, 2 - pad, relu_x=relu_x, turn=True, workspace=workspace, sms=sms)
