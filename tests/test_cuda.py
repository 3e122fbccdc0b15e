"""The cuda backend on a GPU: each algorithm and fused epilogue against the float64 reference, the fast training
step (CUDA graph) against eager execution and against the cpu backend, and the user-facing errors.

Every op of the interface is also covered by tests/test_ops.py, which runs each op on cuda when a GPU is present.
Skips cleanly without CuPy or without a GPU (as in CI); on a GPU machine run scripts/gpu-check.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy not installed")
try:
    _N_GPUS = cupy.cuda.runtime.getDeviceCount()
except cupy.cuda.runtime.CUDARuntimeError:  # no driver
    _N_GPUS = 0
if _N_GPUS == 0:
    pytest.skip("no CUDA GPU", allow_module_level=True)

from conftest import assert_close
from mma_cases import bf16_bits

import hetnet as hn
from hetnet import train as T
from hetnet.backends import reference as ref
from hetnet.backends.cuda import conv as C
from hetnet.backends.cuda import describe
from hetnet.backends.cuda.graph import _oom_error
from hetnet.device import get_backend
from hetnet.errors import DeviceError
from hetnet.plan import Plan, compile_nodes
from hetnet.random import counter_uniform

F32 = np.float32


@pytest.fixture(scope="module")
def be():
    return get_backend("cuda")


def f32(rng, *shape, scale=1.0):
    return rng.normal(0, scale, size=shape).astype(F32).astype(np.float64)


# --- convolution: every algorithm and tile configuration, with the fused epilogues --------------------------------

CONV_CASES = [  # (N, C, H, W, K, kernel, stride, padding)
    (1, 1, 5, 5, 1, 1, 1, 0),
    (1, 3, 7, 5, 4, 3, 1, 1),
    (2, 2, 9, 6, 3, 3, 2, 0),
    (2, 3, 8, 11, 2, 5, 1, 2),
    (3, 2, 10, 7, 5, 3, 3, 2),
    (2, 4, 6, 9, 3, 1, 2, 1),
    (2, 17, 9, 13, 70, 3, 1, 1),     # more than one tile in every direction
    (1, 5, 12, 12, 33, 3, 2, 1),
    (2, 32, 7, 9, 48, 3, 1, 1),      # C and K multiples of 16: the "c" (channels inside taps) tiles apply
    (3, 16, 9, 8, 16, 3, 2, 1),
    (1, 32, 6, 7, 32, 5, 1, 2),
    (2, 16, 5, 7, 32, 1, 1, 0),
    (2, 48, 11, 10, 80, 3, 3, 0),
    (2, 64, 5, 6, 16, 3, 1, 1),
    (2, 3, 9, 11, 64, 3, 1, 1),      # C R S <= 32, K <= 64 a multiple of 8: the "small" forward applies
    (3, 1, 7, 8, 24, 5, 2, 2),
]
TABLES = {"fwd": C.FWD_CFGS, "data": C.DATA_CFGS, "filter": C.FILTER_CFGS}      # the shipped tiles (conv_tiles.py)
FWD = list(C.FWD_CFGS) + ["im2col", "small", "wino"]
DATA = list(C.DATA_CFGS) + ["im2col", "wino"]
FILTER = list(C.FILTER_CFGS) + ["im2col", "wino"]


def _fits(cfg, op, g):
    if cfg == "small":               # conv.cu's conv_small_fwd
        return op == "fwd" and C.small_fits(g)
    if cfg == "wino":                # winograd.py, at fp32 (this module's backend)
        return C.winograd.fits(g.c, g.k, g.r, g.s, g.stride, g.pad)
    return cfg == "im2col" or TABLES[op][cfg].fits(g.c, g.k)


def _pick(op, cfgs, i, g):
    """The i-th (cyclically) candidate of op, or where that one does not apply to g (a "c" tile the channels of g do
    not fill, the small forward beyond its sizes), the first tile that takes any channel count."""
    cfg = cfgs[i % len(cfgs)]
    return cfg if _fits(cfg, op, g) else next(name for name, t in TABLES[op].items() if not t.ci)


def _prior(shape, g):
    """Gradients the backward accumulates into: non-zero, and far enough from zero that the sum added (N*P*Q terms
    of size ~1) cannot cancel them to near zero, which would leave a float32 result's relative error meaningless
    (1 + the sum of 25 such terms came to 0.0024 for one seed: relative error 1.1e-4)."""
    return np.full(shape, 1.0 + 4.0 * math.sqrt(g.npq))


def _force(monkeypatch, fwd, data, filt):
    choice = {"fwd": fwd, "data": data, "filter": filt}
    monkeypatch.setattr(C, "_choose", lambda be_, op, g, cands, *run: choice[op])


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}".format(*c))
@pytest.mark.parametrize("algo", range(max(len(FWD), len(DATA), len(FILTER))))
def test_conv_algorithms(be, rng, monkeypatch, case, algo):
    n, c, h, w_, k, ks, stride, pad = case
    g = C.Geometry(n, c, h, w_, k, ks, ks, stride, pad)
    fwd, data, filt = _pick("fwd", FWD, algo, g), _pick("data", DATA, algo, g), _pick("filter", FILTER, algo, g)
    _force(monkeypatch, fwd, data, filt)
    x, w, b = f32(rng, n, c, h, w_), f32(rng, k, c, ks, ks), f32(rng, k)
    relu_x = f32(rng, n, c, h, w_)            # the mask of a fused ReLU backward
    y_ref, cache = ref.conv2d_forward(x, w, b, stride, pad)
    dy = f32(rng, *y_ref.shape)
    dw_ref, db_ref = _prior(w.shape, g), _prior(k, g)          # accumulate into non-zero gradients
    dx_ref = ref.conv2d_backward(dy, cache, dw_ref, db_ref) * (relu_x > 0)
    for act in (0, 1):
        y = C.conv_forward(be, be.asarray(x), be.asarray(w), be.asarray(b), stride, pad, act)
        assert_close(be.to_numpy(y), np.maximum(y_ref, 0) if act else y_ref, F32, f"{fwd} forward act={act}")
    dw, db = be.asarray(_prior(w.shape, g)), be.asarray(_prior(k, g))
    dx = C.conv_backward(be, be.asarray(dy), be.asarray(x), be.asarray(w), dw, db, stride, pad, True,
                         be.asarray(relu_x))
    assert_close(be.to_numpy(dx), dx_ref, F32, f"{data} data gradient (relu mask)")
    assert_close(be.to_numpy(dw), dw_ref, F32, f"{filt} filter gradient")
    assert_close(be.to_numpy(db), db_ref, F32, f"{filt} bias gradient")


SPLIT_CASES = [  # (N, C, H, W, K, kernel, stride, padding): grids of a few tiles with long reductions
    (2, 17, 9, 13, 70, 3, 1, 1),
    (2, 32, 7, 9, 48, 3, 1, 1),
    (3, 32, 12, 12, 32, 3, 1, 1),        # thesis-m4's third convolution's shape at batch 3
    (2, 48, 11, 10, 80, 3, 3, 0),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}".format(*c))
@pytest.mark.parametrize("cfg", sorted(set(C.FWD_CFGS) | set(C.DATA_CFGS)))
def test_split_reduction(be, rng, monkeypatch, case, cfg):
    """The forward and data gradient reduced in several splits (each split adds into the zeroed output, the last
    to arrive applies bias + ReLU / the ReLU mask) give the unsplit results, at every split count the launcher
    tries and twice in a row (the tile counters must be back at zero after each launch)."""
    n, c, h, w_, k, ks, stride, pad = case
    g = C.Geometry(n, c, h, w_, k, ks, ks, stride, pad)
    x, w, b = f32(rng, n, c, h, w_), f32(rng, k, c, ks, ks), f32(rng, k)
    relu_x = f32(rng, n, c, h, w_)
    y_ref, cache = ref.conv2d_forward(x, w, b, stride, pad)
    dy = f32(rng, *y_ref.shape)
    dx_ref = ref.conv2d_backward(dy, cache, np.zeros(w.shape), np.zeros(k)) * (relu_x > 0)
    ran = 0
    for op in ("fwd", "data"):
        if cfg not in TABLES[op] or not _fits(cfg, op, g):
            continue
        splits = C.tile_splits(be, TABLES[op][cfg], g)[1:]
        assert splits, f"no split for {cfg} {op} {case}"
        for sp in splits:
            _force(monkeypatch, f"{cfg}/{sp}", f"{cfg}/{sp}", _pick("filter", FILTER, 0, g))
            for _ in range(2):
                if op == "fwd":
                    y = C.conv_forward(be, be.asarray(x), be.asarray(w), be.asarray(b), stride, pad, 1)
                    assert_close(be.to_numpy(y), np.maximum(y_ref, 0), F32, f"{cfg}/{sp} forward + relu")
                else:
                    dx = C.conv_backward(be, be.asarray(dy), be.asarray(x), be.asarray(w), be.zeros(w.shape),
                                         be.zeros((k,)), stride, pad, True, be.asarray(relu_x))
                    assert_close(be.to_numpy(dx), dx_ref, F32, f"{cfg}/{sp} data gradient (relu mask)")
            ran += 1
    if ran == 0:
        pytest.skip(f"{cfg} does not apply to {case}")


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}".format(*c))
@pytest.mark.parametrize("cfg", list(C.FILTER_CFGS))
def test_filter_gradient_split_counts(be, rng, case, cfg):
    """The filter gradient's "<cfg>/<splits>" candidates (fewer, longer reduction runs than the default) give the
    same accumulated dw and db."""
    n, c, h, w_, k, ks, stride, pad = case
    g = C.Geometry(n, c, h, w_, k, ks, ks, stride, pad)
    if not _fits(cfg, "filter", g):
        pytest.skip(f"{cfg} does not apply to {case}")
    x, w = f32(rng, n, c, h, w_), f32(rng, k, c, ks, ks)
    y_ref, cache = ref.conv2d_forward(x, w, np.zeros(k), stride, pad)
    dy = f32(rng, *y_ref.shape)
    dw_ref, db_ref = _prior(w.shape, g), _prior(k, g)
    ref.conv2d_backward(dy, cache, dw_ref, db_ref)
    base = C.filter_splits(be, C.FILTER_CFGS[cfg], g)
    for sp in sorted({base, max(1, base // 2), 2, 1}):
        dw, db = be.asarray(_prior(w.shape, g)), be.asarray(_prior(k, g))
        C._filter_implicit(be, cfg, g, be.asarray(dy), be.asarray(x), dw, db, sp)
        assert_close(be.to_numpy(dw), dw_ref, F32, f"{cfg}/{sp} filter gradient")
        assert_close(be.to_numpy(db), db_ref, F32, f"{cfg}/{sp} bias gradient")


@pytest.mark.parametrize("n,f,k", [(1, 1, 1), (3, 7, 5), (33, 130, 70), (128, 2048, 100), (32, 256, 16)])
@pytest.mark.parametrize("algo", range(max(len(FWD), len(DATA), len(FILTER))))
def test_dense_algorithms(be, rng, monkeypatch, n, f, k, algo):
    g = C.Geometry(n, f, 1, 1, k, 1, 1, 1, 0)
    _force(monkeypatch, _pick("fwd", FWD, algo, g), _pick("data", DATA, algo, g), _pick("filter", FILTER, algo, g))
    x, w, b, relu_x = f32(rng, n, f), f32(rng, k, f), f32(rng, k), f32(rng, n, f)
    y_ref, cache = ref.dense_forward(x, w, b)
    dy = f32(rng, n, k)
    dw_ref, db_ref = np.zeros(w.shape), np.zeros(k)
    dx_ref = ref.dense_backward(dy, cache, dw_ref, db_ref) * (relu_x > 0)
    y = C.dense_forward(be, be.asarray(x), be.asarray(w), be.asarray(b), act=1)
    assert_close(be.to_numpy(y), np.maximum(y_ref, 0), F32, "dense forward + relu")
    dw, db = be.zeros(w.shape), be.zeros((k,))
    dx = C.dense_backward(be, be.asarray(dy), be.asarray(x), be.asarray(w), dw, db, True, be.asarray(relu_x))
    assert_close(be.to_numpy(dx), dx_ref, F32, "dense dx")
    assert_close(be.to_numpy(dw), dw_ref, F32, "dense dw")
    assert_close(be.to_numpy(db), db_ref, F32, "dense db")


def test_conv_choice_is_measured_once(be, rng):
    be.force_conv_algo = None
    x, w = be.asarray(f32(rng, 4, 3, 16, 16)), be.asarray(f32(rng, 8, 3, 3, 3))
    n_log = len(be.tune_log)
    be.conv2d_forward(x, w, None, 1, 1)
    be.conv2d_forward(x, w, None, 1, 1)
    new = [e for e in be.tune_log[n_log:] if e["op"] == "fwd"]
    g = C.Geometry(4, 3, 16, 16, 8, 3, 3, 1, 1)
    fits = [a for a in FWD if _fits(a, "fwd", g)]
    channels_last = {a for a in new[0]["ms"] if a.startswith(C.CL_PREFIX[be.precision])}   # mma.py's tiles
    assert len(new) == 1 and new[0]["choice"] in new[0]["ms"] and set(new[0]["ms"]) - channels_last == set(fits)
    assert channels_last == set(C._tiles16(be, "fwd", None))
    assert len(fits) < len(FWD)          # no channels-inside-taps tile for 3 input channels
    assert "small" in fits and be.conv_choice("fwd", g.key()) == new[0]["choice"]


def _geometry(case):
    n, c, h, w_, k, ks, stride, pad = case
    return C.Geometry(n, c, h, w_, k, ks, ks, stride, pad)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if C.small_fits(_geometry(c))],
                         ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}".format(*c))
def test_small_forward_bf16_output(be, rng, case):
    """conv_small_fwd with out16: y as bf16 bits (round to nearest even) at y's NCHW positions, equal to the bf16 of
    its float32 output (which test_conv_algorithms checks against the reference), with and without the ReLU."""
    n, c, h, w_, k, ks, stride, pad = case
    g = _geometry(case)
    x, w, b = (be.asarray(f32(rng, *s)) for s in ((n, c, h, w_), (k, c, ks, ks), (k,)))
    for act in (0, 1):
        y = be.xp.empty((n, k, g.p, g.q), dtype=F32)
        y16 = be.xp.full((n, k, g.p, g.q), 0xDEAD, dtype=np.uint16)
        C._fwd_small(be, g, x, w, b, y, act)
        C._fwd_small(be, g, x, w, b, y16, act, out16=True)
        np.testing.assert_array_equal(be.to_numpy(y16), bf16_bits(be.to_numpy(y)), f"act={act}")


def test_small_forward_hands_its_output_to_a_batch_norm_in_bf16(rng):
    """At bf16, a forward measured to run "small" and told that a batch norm alone reads its output (to_norm) returns
    that output stored in bf16 (conv.Nchw16): the bits of bf16 of the same kernel's float32 y. Another choice
    returns float32."""
    be16 = get_backend("cuda", "bf16")
    case = (2, 3, 9, 11, 64, 3, 1, 1)
    n, c, h, w_, k, ks, stride, pad = case
    key = _geometry(case).key()
    x, w = be16.asarray(f32(rng, n, c, h, w_)), be16.asarray(f32(rng, k, c, ks, ks))
    saved = be16._tune.get(("fwd", key))
    try:
        be16._tune[("fwd", key)] = "small"
        y32 = be16.conv2d_forward(x, w, None, stride, pad, relu_mask=False)[0]
        y16 = be16.conv2d_forward(x, w, None, stride, pad, relu_mask=False, to_norm=True)[0]
        assert isinstance(y16, C.Nchw16) and y16.shape == y32.shape
        np.testing.assert_array_equal(be16.to_numpy(y16.data), bf16_bits(be16.to_numpy(y32)))
        be16._tune[("fwd", key)] = "im2col"
        assert isinstance(be16.conv2d_forward(x, w, None, stride, pad, relu_mask=False, to_norm=True)[0],
                          cupy.ndarray)
    finally:
        be16._tune.pop(("fwd", key), None)
        if saved is not None:
            be16._tune[("fwd", key)] = saved


def test_conv_choice_is_kept_for_the_next_process(rng, tmp_path, monkeypatch):
    """A backend of a later process (a fresh CudaBackend) takes the choice from the tuning cache, measuring nothing;
    a cache that names an algorithm the call does not offer, or was measured without one the call offers, is
    measured again."""
    from hetnet.backends.cuda import CudaBackend, tune_cache

    monkeypatch.setenv("HETNET_TUNE_CACHE", "1")
    monkeypatch.setenv("HETNET_CACHE_DIR", str(tmp_path))
    x, w = f32(rng, 4, 3, 16, 16), f32(rng, 8, 3, 3, 3)
    first = CudaBackend(0)
    y1 = first.to_numpy(first.conv2d_forward(first.asarray(x), first.asarray(w), None, 1, 1)[0])
    assert [e["op"] for e in first.tune_log] == ["fwd"]
    later = CudaBackend(0)
    y2 = later.to_numpy(later.conv2d_forward(later.asarray(x), later.asarray(w), None, 1, 1)[0])
    assert later.tune_log == [] and later._tune == first._tune and later._tune_times == first._tune_times
    np.testing.assert_array_equal(y1, y2)
    tf = tune_cache.for_backend(later)
    key = next(iter(tf.choices))
    tf.put(key, "no-such-algorithm")
    again = CudaBackend(0)
    again.conv2d_forward(again.asarray(x), again.asarray(w), None, 1, 1)
    assert [e["op"] for e in again.tune_log] == ["fwd"]
    assert tune_cache.for_backend(again).get(key) == again.tune_log[0]["choice"]
    tf = tune_cache.for_backend(again)
    choice = tf.get(key)
    tf.put(key, choice, {choice: 1.0})                  # measured without the call's other candidates
    fourth = CudaBackend(0)
    fourth.conv2d_forward(fourth.asarray(x), fourth.asarray(w), None, 1, 1)
    assert [e["op"] for e in fourth.tune_log] == ["fwd"]


def test_conv_variant_runner(tmp_path):
    """The kernel sandbox's runner (benchmarks/kernels/run_conv_variants.py) checks every variant that does not ship
    against the float64 reference, then times it, on a 3x3 convolution and on a dense layer whose channel counts
    every tile takes; none fails the check."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels" / "run_conv_variants.py"
    spec = importlib.util.spec_from_file_location("run_conv_variants", path)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    out = tmp_path / "variants.json"
    assert run.main(["--shapes", "thesis-m4-conv2", "mlp-fc2", "--batch", "2", "--variants-only", "--out",
                     str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(r["ok"] and r["ms"] > 0 for r in rows)
    assert {(r["op"], r["variant"]) for r in rows} == {(t.op, t.number) for t in run.VARIANTS}


# --- fused pooling / batch norm / dropout variants ----------------------------------------------------------------


@pytest.mark.parametrize("shape,k,s", [((2, 3, 8, 8), 2, 2), ((1, 2, 9, 7), 3, 2), ((2, 1, 6, 6), 3, 1)])
def test_maxpool_relu_mask(be, rng, shape, k, s):
    x = np.maximum(f32(rng, *shape), 0)       # a ReLU output: many exact zeros
    y_ref, cache = ref.maxpool2d_forward(x, k, s)
    dy = f32(rng, *y_ref.shape)
    dx_ref = ref.maxpool2d_backward(dy, cache) * (x > 0)
    y, c = be.maxpool2d_forward(be.asarray(x), k, s)
    dx = be.maxpool2d_backward(be.asarray(dy), c, relu_mask=True)
    assert_close(be.to_numpy(y), y_ref, F32, "maxpool y")
    assert_close(be.to_numpy(dx), dx_ref, F32, "maxpool dx with relu mask")


@pytest.mark.parametrize("shape,k,s", [((2, 3, 8, 8), 2, 2), ((1, 2, 9, 7), 3, 2), ((2, 1, 6, 6), 3, 1)])
@pytest.mark.parametrize("relu_mask", [False, True])
def test_maxpool_backward_from_pooled_output(be, rng, shape, k, s, relu_mask):
    """The cache keeps y and the argmax bytes, not x (the layer before may free its output); dx from them equals
    the reference's, overlapping windows and exact zeros (ReLU outputs, masked or not) included."""
    x = np.maximum(f32(rng, *shape), 0)
    x[0, 0, :3, :3] = 0.0                       # a window that is all zeros: its maximum is 0
    xd = be.asarray(x)
    y, cache = be.maxpool2d_forward(xd, k, s)
    assert not any(a is xd for a in cache), "the cache holds x"
    dy = f32(rng, *y.shape)
    y_ref, c_ref = ref.maxpool2d_forward(x, k, s)
    expect = ref.maxpool2d_backward(dy, c_ref, relu_mask=relu_mask)
    dx = be.maxpool2d_backward(be.asarray(dy), cache, relu_mask=relu_mask)
    assert_close(be.to_numpy(dx), expect, F32, "dx")
    if relu_mask:
        assert not np.array_equal(expect, ref.maxpool2d_backward(dy, c_ref)), "the mask did nothing"


class _NaNEmpty:
    """CuPy, except that `empty` fills its arrays with 0xFF bytes (NaN as float32): an element a kernel leaves
    unwritten fails the comparison."""

    def __getattr__(self, name):
        return getattr(cupy, name)

    @staticmethod
    def empty(shape, dtype=float):
        a = cupy.empty(shape, dtype=dtype)
        a.view(cupy.uint8).fill(0xFF)
        return a


MAXPOOL_PATHS = {  # (N, C, H, W, kernel, stride)
    "k2": (2, 3, 8, 6, 2, 2),                   # stride == kernel: one thread per window (maxpool_bwd_tiled)
    "k2-margins": (2, 3, 7, 5, 2, 2),           # ... a row and a column past the last window
    "k2-margin-rows": (1, 2, 9, 8, 2, 2),
    "k3": (2, 2, 9, 6, 3, 3),
    "k3-margins": (1, 3, 11, 10, 3, 3),         # ... two rows and a column past the last window
    "k3-no-window": (1, 2, 2, 5, 3, 3),         # H < kernel: no output, dx all zeros (the gather)
    "k3s2-overlap": (2, 2, 9, 8, 3, 2),         # one thread per x element, gathering (maxpool_bwd_pooled)
    "k3s1-overlap": (1, 2, 6, 7, 3, 1),
    "k2s3-gaps": (2, 2, 8, 10, 2, 3),           # elements between windows
}


@pytest.mark.parametrize("case", list(MAXPOOL_PATHS.values()), ids=list(MAXPOOL_PATHS))
@pytest.mark.parametrize("relu_mask", [False, True])
@pytest.mark.parametrize("wide", [False, True], ids=["i32", "i64"])
def test_maxpool_backward_writes_all_of_dx(be, rng, monkeypatch, case, relu_mask, wide):
    """Each backward path, both index widths: dx written into NaN-filled memory equals the reference's, so the
    elements in no window (past the last one, between windows) are written zero. Small integers make ties in most
    windows (the first maximum, row-major, takes dy); with the mask, a window of zeros gets nothing."""
    n, c, h, w, k, s = case
    monkeypatch.setattr(be, "xp", _NaNEmpty())
    monkeypatch.setattr(be, "index64", wide)
    x = rng.integers(-2, 3, size=(n, c, h, w)).astype(np.float64)
    if relu_mask:
        x = np.maximum(x, 0.0)
        x[0, 0, :k, :k] = 0.0
    y, cache = be.maxpool2d_forward(be.asarray(x), k, s)
    dy = f32(rng, *y.shape)
    y_ref, c_ref = ref.maxpool2d_forward(x, k, s)
    expect = ref.maxpool2d_backward(dy, c_ref, relu_mask=relu_mask)
    dx = be.to_numpy(be.maxpool2d_backward(be.asarray(dy), cache, relu_mask=relu_mask))
    np.testing.assert_array_equal(be.to_numpy(y), y_ref)
    assert_close(dx, expect, F32, "dx")
    if relu_mask and dy.size:
        assert not np.array_equal(expect, ref.maxpool2d_backward(dy, c_ref)), "the mask did nothing"


def test_64_bit_index_kernels_match_the_32_bit_ones(be, rng, monkeypatch):
    """Pooling and batch norm use 32-bit index kernels below 2^31 elements; the 64-bit versions (larger tensors)
    give the same results (bit for bit where no atomics are involved)."""
    assert be.ix("maxpool_fwd", 10) == "maxpool_fwd_i32" and be.ix("maxpool_fwd", 2**31) == "maxpool_fwd"
    x = be.asarray(np.maximum(f32(rng, 2, 3, 9, 7), 0))
    dy_pool, dy_avg, dy_bn = f32(rng, 2, 3, 4, 3), f32(rng, 2, 3, 4, 3), f32(rng, 2, 3, 9, 7)
    g, b = be.asarray(f32(rng, 3)), be.asarray(f32(rng, 3))
    runs = {}
    for wide in (False, True):
        monkeypatch.setattr(be, "index64", wide)
        assert be.ix("bn_stats", 10) == ("bn_stats" if wide else "bn_stats_i32")
        y, cache = be.maxpool2d_forward(x, 3, 2)
        exact = [y, be.maxpool2d_backward(be.asarray(dy_pool), cache, relu_mask=True)]
        ya, ca = be.avgpool2d_forward(x, 3, 2)
        exact += [ya, be.avgpool2d_backward(be.asarray(dy_avg), ca)]
        close = []
        for k, s in ((2, 2), (3, 2)):
            rm, rv = be.zeros((3,)), be.asarray(np.ones(3))
            yb, cb = be.bn_relu_maxpool_forward(x, g, b, rm, rv, 0.1, 1e-5, True, k, s)
            dg, db = be.zeros((3,)), be.zeros((3,))
            dyb = be.asarray(f32(np.random.default_rng(k), *yb.shape))
            close += [yb, be.bn_relu_maxpool_backward(dyb, cb, dg, db), dg, db, rm, rv]
        yn, cn = be.batchnorm_forward(x, g, b, be.zeros((3,)), be.asarray(np.ones(3)), 0.1, 1e-5, True)
        close += [yn, be.batchnorm_backward(be.asarray(dy_bn), cn, be.zeros((3,)), be.zeros((3,)))]
        runs[wide] = ([be.to_numpy(a) for a in exact], [be.to_numpy(a) for a in close])
    for a, b_ in zip(runs[False][0], runs[True][0]):
        np.testing.assert_array_equal(a, b_)
    for i, (a, b_) in enumerate(zip(runs[False][1], runs[True][1])):
        assert_close(b_.astype(np.float64), a.astype(np.float64), F32, f"batch-norm output {i}")


def test_batchnorm_relu_epilogue(be, rng):
    x, g, b = f32(rng, 3, 4, 5, 6), f32(rng, 4), f32(rng, 4)
    y_ref, _ = ref.batchnorm_forward(x, g, b, np.zeros(4), np.ones(4), 0.1, 1e-5, True)
    y, _ = be.batchnorm_forward(be.asarray(x), be.asarray(g), be.asarray(b), be.zeros((4,)), be.asarray(np.ones(4)),
                                0.1, 1e-5, True, act="relu")
    assert_close(be.to_numpy(y), np.maximum(y_ref, 0), F32, "bn + relu")


def test_batchnorm_large_channel_count_and_repeat(be, rng):
    """Many blocks per channel (the last-block reduction) and the scratch reset between calls."""
    x = f32(rng, 64, 3, 40, 40, scale=3.0) + 5.0
    for _ in range(2):
        y, _ = be.batchnorm_forward(be.asarray(x), be.asarray(np.ones(3)), be.zeros((3,)), be.zeros((3,)),
                                    be.asarray(np.ones(3)), 0.1, 1e-5, True)
        y_ref, _ = ref.batchnorm_forward(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), 0.1, 1e-5, True)
        assert_close(be.to_numpy(y), y_ref, F32, "bn over 102400 values per channel")


def test_dropout_seed_from_device_memory(be, rng):
    seed = int(rng.integers(0, 2**32))
    x = be.asarray(f32(rng, 7, 300) + 3.0)
    dev_seed = cupy.asarray(np.array([seed], dtype=np.uint32))
    y1, _ = be.dropout_forward(x, 0.3, seed)
    y2, c2 = be.dropout_forward(x, 0.3, dev_seed)
    np.testing.assert_array_equal(be.to_numpy(y1), be.to_numpy(y2))
    keep = (counter_uniform(seed, 7 * 300) >= 0.3).reshape(7, 300)
    np.testing.assert_array_equal(be.to_numpy(y2) != 0, keep)
    dx = be.dropout_backward(be.asarray(np.ones((7, 300))), c2)
    np.testing.assert_array_equal(be.to_numpy(dx) != 0, keep)


# --- the fast training step --------------------------------------------------------------------------------------


def small_cnn(dropout=0.25):
    return hn.Sequential([
        hn.Conv2D(1, 6, 3, padding=1, bias=False), hn.BatchNorm2D(6), hn.ReLU(), hn.MaxPool2D(2),
        hn.Conv2D(6, 8, 3, padding=1), hn.ReLU(), hn.MaxPool2D(2),
        hn.Flatten(), hn.Dense(8 * 3 * 3, 16), hn.ReLU(), hn.Dropout(dropout), hn.Dense(16, 4)])


def test_plan_fuses_relus(be):
    nodes = compile_nodes(small_cnn().layers, be.fusions)
    names = [type(n).__name__ for n in nodes]
    assert names == ["ConvNode", "BNReluPoolNode", "ConvReluPoolNode", "FlattenNode", "DenseNode", "DropoutNode",
                     "DenseNode"]
    assert [n.mask_input for n in nodes] == [False, False, False, False, False, False, True]
    # without the pool after it, BN + ReLU is the batch norm owning its ReLU's derivative: its consumer does not mask
    nodes = compile_nodes([hn.BatchNorm1D(4), hn.ReLU(), hn.Dense(4, 2)], be.fusions)
    assert [type(n).__name__ for n in nodes] == ["BNReluNode", "DenseNode"] and not nodes[1].mask_input


def test_plan_bn_pool_backward_in_place_only_over_fresh_outputs(be):
    nodes = [n for n in compile_nodes(small_cnn().layers, be.fusions) if type(n).__name__ == "BNReluPoolNode"]
    assert [n.inplace for n in nodes] == [True]           # after a convolution, whose output nothing else keeps
    # never over the batch itself, nor over a generic layer's output (the layer's cache may hold it), nor over a
    # ReLU's output that its backward must read for the mask
    def bn_pool():
        return [hn.BatchNorm2D(2), hn.ReLU(), hn.MaxPool2D(2)]

    nodes = compile_nodes(bn_pool() + [hn.Tanh()] + bn_pool() + [hn.ReLU()] + bn_pool(), be.fusions)
    assert [type(n).__name__ for n in nodes] == ["BNReluPoolNode", "LayerNode", "BNReluPoolNode", "ReluNode",
                                                 "BNReluPoolNode"]
    assert [n.inplace for n in nodes if type(n).__name__ == "BNReluPoolNode"] == [False, False, False]


def _counting_trial_pool(be, monkeypatch):
    """Replace the backend's trial pool with one that records each allocation's size: (pool, sizes)."""
    pool, sizes = cupy.cuda.MemoryPool(), []

    class Counting:
        def malloc(self, n):
            sizes.append(n)
            return pool.malloc(n)

        def free_all_blocks(self):
            pool.free_all_blocks()

    monkeypatch.setattr(be, "_tune_pool", Counting())
    return pool, sizes


def test_trial_runs_use_their_own_pool_emptied_after(be, rng, monkeypatch):
    """The algorithm measurement's temporaries (here im2col's column buffer) never reach the step pool."""
    be.force_conv_algo = None
    pool, sizes = _counting_trial_pool(be, monkeypatch)
    x, w = be.asarray(f32(rng, 2, 3, 13, 11)), be.asarray(f32(rng, 5, 3, 3, 3))
    be.conv2d_forward(x, w, None, 1, 1)
    assert sizes and max(sizes) >= 4 * 27 * 2 * 13 * 11, "the column buffer was not allocated in the trial pool"
    assert pool.total_bytes() == 0, "the trial pool was not emptied"


def test_trial_times_im2col_in_the_chunks_it_will_run_in(be, rng, monkeypatch):
    """Outside a capture im2col runs a few images at a time; its trial must time that form, not the whole batch's
    column buffer (which once made the layer API pick im2col where its chunked form was the slower)."""
    be.force_conv_algo = None
    monkeypatch.setattr(C, "IM2COL_MIN_CHUNK", 0)    # budget = the op's tensors: a fraction of the batch
    _, sizes = _counting_trial_pool(be, monkeypatch)
    monkeypatch.setattr(be, "_tune", {})          # measure even if another test met this shape
    n, c, h, w_, k = 6, 8, 9, 9, 4
    be.conv2d_forward(be.asarray(f32(rng, n, c, h, w_)), be.asarray(f32(rng, k, c, 3, 3)), None, 1, 1)
    full_col = 4 * c * 9 * n * h * w_
    assert sizes and max(sizes) < full_col, "the trial built the whole batch's column buffer"


@pytest.mark.parametrize("op", ["fwd", "data", "filter"])
def test_im2col_in_chunks_of_images(be, rng, monkeypatch, op):
    """With a small workspace budget, im2col builds its column buffer a few images at a time: no buffer as large
    as the whole batch's, and the same results as the float64 reference (with the fused ReLU mask for data)."""
    n, c, h, w_, k = 5, 4, 7, 6, 8
    x = np.maximum(f32(rng, n, c, h, w_), 0)
    wt, b = f32(rng, k, c, 3, 3), f32(rng, k)
    y_ref, cache = ref.conv2d_forward(x, wt, b, 1, 1)
    dy = f32(rng, *y_ref.shape)
    dw_ref, db_ref = np.zeros_like(wt), np.zeros_like(b)
    dx_ref = ref.conv2d_backward(dy, cache, dw_ref, db_ref) * (x > 0)
    full_col = 4 * c * 9 * n * h * w_
    monkeypatch.setattr(C, "IM2COL_MIN_CHUNK", 0)    # budget = the op's tensors: 2 images per chunk here
    geom, tensors = C.Geometry(n, c, h, w_, k, 3, 3, 1, 1), 4 * (n * c + n * k) * h * w_
    assert C._chunks(be, geom, tensors) == [(0, 2), (2, 4), (4, 5)]
    with monkeypatch.context() as m:            # room under the step's peak (a capture): all images at once
        m.setattr(be, "workspace_headroom", lambda: full_col)
        assert C._chunks(be, geom, tensors) == [(0, n)]
    _force(monkeypatch, "im2col", "im2col", "im2col")
    xd, wd, bd, dyd = be.asarray(x), be.asarray(wt), be.asarray(b), be.asarray(dy)
    sizes = []

    def counting(size):
        sizes.append(size)
        return cupy.get_default_memory_pool().malloc(size)

    dw, db = be.zeros(wt.shape), be.zeros(b.shape)
    with cupy.cuda.using_allocator(counting):
        if op == "fwd":
            out, expect = C.conv_forward(be, xd, wd, bd, 1, 1), y_ref
        elif op == "data":
            out, expect = C.conv_backward(be, dyd, xd, wd, dw, db, 1, 1, True, relu_x=xd), dx_ref
        else:
            C.conv_backward(be, dyd, xd, wd, dw, db, 1, 1, False)
            out, expect = dw, dw_ref
    assert sizes and max(sizes) < full_col, f"a column buffer of the whole batch was allocated: {sizes}"
    assert_close(be.to_numpy(out), expect, F32, f"{op} in chunks")
    if op == "filter":
        assert_close(be.to_numpy(db), db_ref, F32, "db")


@pytest.mark.parametrize("shape,k,s", [((3, 4, 8, 8), 2, 2), ((2, 3, 9, 7), 3, 2), ((2, 2, 6, 5), 2, 1)])
def test_bn_relu_maxpool_fused(be, rng, shape, k, s):
    c = shape[1]
    x, g, b = f32(rng, *shape), f32(rng, c), f32(rng, c)
    rm, rv = np.zeros(c), np.ones(c)
    a, bn_cache = ref.batchnorm_forward(x, g, b, rm.copy(), rv.copy(), 0.1, 1e-5, True)
    r, relu_cache = ref.relu_forward(a)
    y_ref, pool_cache = ref.maxpool2d_forward(r, k, s)
    dy = f32(rng, *y_ref.shape)
    dg_ref, db_ref = np.zeros(c), np.zeros(c)
    dx_ref = ref.batchnorm_backward(ref.relu_backward(ref.maxpool2d_backward(dy, pool_cache), relu_cache),
                                    bn_cache, dg_ref, db_ref)
    rm_d, rv_d = be.zeros((c,)), be.asarray(np.ones(c))
    y, cache = be.bn_relu_maxpool_forward(be.asarray(x), be.asarray(g), be.asarray(b), rm_d, rv_d, 0.1, 1e-5, True,
                                          k, s)
    dg, db = be.zeros((c,)), be.zeros((c,))
    dx = be.bn_relu_maxpool_backward(be.asarray(dy), cache, dg, db)
    assert_close(be.to_numpy(y), y_ref, F32, "y")
    assert_close(be.to_numpy(dx), dx_ref, F32, "dx")
    assert_close(be.to_numpy(dg), dg_ref, F32, "dgamma")
    assert_close(be.to_numpy(db), db_ref, F32, "dbeta")
    # dgamma None (a frozen or constant scale): the same dx and dbeta, nothing written for dgamma
    db2 = be.zeros((c,))
    dx3 = be.bn_relu_maxpool_backward(be.asarray(dy), cache, None, db2)
    np.testing.assert_array_equal(be.to_numpy(dx3), be.to_numpy(dx))
    assert_close(be.to_numpy(db2), db_ref, F32, "dbeta without dgamma")
    # written over x (the fast step's plan; last, since x is gone after it): the same values, the same parameter
    # gradients added again
    dx2 = be.bn_relu_maxpool_backward(be.asarray(dy), cache, dg, db, inplace=True)
    assert dx2.data.ptr == cache[1].data.ptr, "not in place"
    np.testing.assert_array_equal(be.to_numpy(dx2), be.to_numpy(dx))
    assert_close(be.to_numpy(dg), 2 * dg_ref, F32, "dgamma, twice")


def _data(rng, n=96):
    x = rng.normal(size=(n, 1, 12, 12)).astype(F32)
    y = rng.integers(0, 4, size=n)
    x[np.arange(n), 0, y * 3, y * 3] += 3.0     # a learnable signal
    return x, y


def _cnn_from(state, device, seed, dropout=0.25):
    """small_cnn(dropout) with the weights `state` on `device`, built after hn.seed(seed) (which also seeds the
    dropout masks)."""
    hn.seed(seed)
    model = small_cnn(dropout)
    model.load_state_dict(state)
    return model.to(device)


def _run_steps(device, model_state, x, y, steps, opt_name, batch, use_graph=True, ls=0.0, dropout=0.25,
               fuse=True):
    """use_graph: capture and replay (cuda); fuse=False: every layer its own node."""
    model = _cnn_from(model_state, device, 123, dropout)
    model.plan = Plan(model, fuse=fuse)
    b = model.backend
    opt = T.make_optimizer(opt_name, model.parameters(), lr=0.05, weight_decay=5e-4)
    sched = T.make_schedule("cosine", opt, total_steps=steps, warmup_steps=1)
    step = T.make_train_step(model, opt, sched, ls)
    if device != "cpu":
        step.runner.use_graph = use_graph
    hn.seed(7)
    for i in range(steps):
        s = slice((i * batch) % len(x), (i * batch) % len(x) + batch)
        step.step(b.asarray(x[s]), b.labels(y[s]))
    loss, correct, count = step.collect()
    return model.state_dict(), loss, correct, count


@pytest.mark.parametrize("opt_name", ["momentum", "adamw"])
def test_graph_step_matches_eager_and_cpu(rng, opt_name):
    x, y = _data(rng)
    hn.seed(1)
    state = small_cnn().state_dict()
    cpu = _run_steps("cpu", state, x, y, 4, opt_name, 32)
    eager = _run_steps("cuda", state, x, y, 4, opt_name, 32, use_graph=False, ls=0.0)
    graph = _run_steps("cuda", state, x, y, 4, opt_name, 32, use_graph=True)
    unfused = _run_steps("cuda", state, x, y, 4, opt_name, 32, fuse=False)
    for name, run in (("eager plan", eager), ("graph", graph), ("unfused plan", unfused)):
        for k in cpu[0]:
            assert_close(run[0][k], cpu[0][k], F32, f"{name}: {k} after 4 steps")
        assert run[3] == cpu[3] == 128
        assert abs(run[1] - cpu[1]) <= 1e-4 * abs(cpu[1]), f"{name}: loss sum {run[1]} vs cpu {cpu[1]}"
        assert abs(run[2] - cpu[2]) <= 1, f"{name}: correct {run[2]} vs cpu {cpu[2]}"


def test_graph_captured_again_when_flags_flip_with_groups(rng):
    """Parameter groups (BatchNorm biases at 8x, Nesterov SGD with decoupled hyperparameters) under the triangular
    schedule, and flags flipped between steps (the second conv's bias frozen at step 3 and trained again at step
    6, the first dense weight frozen at step 5): each flip resets the runner, which drops its graphs (the step after
    a flip runs eagerly, the next is captured again); the replayed steps compute what the eager plan computes, and
    a frozen parameter does not move (weight decay and momentum included)."""
    x, y = _data(rng)
    hn.seed(11)
    state = small_cnn(0.0).state_dict()
    flips = {3: [(4, "bias", False)], 5: [(8, "weight", False)], 6: [(4, "bias", True)]}
    runs = []
    for use_graph in (False, True):
        model = _cnn_from(state, "cuda", 123, 0.0)
        b = model.backend
        groups = T.group_parameters(model, [{"params": "BatchNorm2D.bias", "lr_scale": 8}])
        opt = T.make_optimizer("nesterov-decoupled", groups, 2.0, 0.01, momentum=0.85, batch_size=32)
        step = T.make_train_step(model, opt, T.make_schedule("triangular", opt, 9))
        step.runner.use_graph = use_graph
        resets, real = [], step.runner.reset
        step.runner.reset = lambda real=real, resets=resets: (resets.append(1), real())[1]
        for i in range(9):
            for layer, name, trains in flips.get(i, []):
                model[layer].params[name].requires_grad = trains
            before = model.state_dict()
            s = slice((i * 32) % len(x), (i * 32) % len(x) + 32)
            step.step(b.asarray(x[s]), b.labels(y[s]))
            after = model.state_dict()
            for layer in (4, 8):
                for name, p in model[layer].params.items():
                    if not p.requires_grad:
                        np.testing.assert_array_equal(after[f"{layer}.{name}"], before[f"{layer}.{name}"],
                                                      err_msg=f"step {i}: frozen {layer}.{name} moved")
            if use_graph and i >= 1:
                assert (len(step.runner.graphs) == 0) == (i in flips), f"step {i}"
        step.collect()
        assert len(resets) == len(flips)
        runs.append(model.state_dict())
    for k in runs[0]:
        assert_close(runs[1][k], runs[0][k], F32, f"graph vs eager: {k}")


@pytest.mark.parametrize("algo", ["implicit", "im2col", "wino"])
def test_graph_replay_equals_eager_plan(rng, algo):
    """The captured graph computes what the same plan computes without capture, with each algorithm forced
    (im2col puts cuBLAS GEMMs into the graph, wino cuBLAS's strided-batched ones and workspaces)."""
    be = get_backend("cuda")
    x, y = _data(rng)
    hn.seed(11)
    state = small_cnn().state_dict()
    be.force_conv_algo = algo
    try:
        eager = _run_steps("cuda", state, x, y, 5, "momentum", 32, use_graph=False)
        graph = _run_steps("cuda", state, x, y, 5, "momentum", 32, use_graph=True)
    finally:
        be.force_conv_algo = None
    for k in eager[0]:
        assert_close(graph[0][k], eager[0][k], F32, f"{algo}: {k}")
    assert abs(graph[1] - eager[1]) <= 1e-5 * abs(eager[1]) and graph[2] == eager[2]
    assert be.graph_cublas, f"cuBLAS could not be captured: {getattr(be, 'capture_error', '')}"


def test_graph_step_odd_last_batch_and_label_smoothing(rng):
    """A second batch shape gets its own graph; label smoothing reaches the fused loss kernel."""
    x, y = _data(rng, 80)
    hn.seed(2)
    state = small_cnn().state_dict()
    results = []
    for device in ("cpu", "cuda"):
        model = _cnn_from(state, device, 123)
        b = model.backend
        opt = T.make_optimizer("momentum", model.parameters(), lr=0.05)
        step = T.make_train_step(model, opt, None, 0.1)
        hn.seed(9)
        for _ in range(2):
            for s in (slice(0, 32), slice(32, 64), slice(64, 80)):
                step.step(b.asarray(x[s]), b.labels(y[s]))
        results.append((model.state_dict(), step.collect()))
    for k in results[0][0]:
        assert_close(results[1][0][k], results[0][0][k], F32, k)
    assert abs(results[1][1][0] - results[0][1][0]) <= 1e-4 * abs(results[0][1][0])


def test_few_epochs_same_curve_as_cpu(rng):
    x, y = _data(rng, 256)
    hn.seed(3)
    state = small_cnn(0.0).state_dict()
    curves = {}
    for device in ("cpu", "cuda"):
        model = _cnn_from(state, device, 5, 0.0)
        b = model.backend
        opt = T.make_optimizer("momentum", model.parameters(), lr=0.05)
        step = T.make_train_step(model, opt, None, 0.0)
        curve = []
        for _ in range(4):
            for i in range(0, 256, 64):
                step.step(b.asarray(x[i:i + 64]), b.labels(y[i:i + 64]))
            loss, correct, count = step.collect()
            curve.append((loss / count, correct / count))
        curves[device] = np.array(curve)
    np.testing.assert_allclose(curves["cuda"][:, 0], curves["cpu"][:, 0], rtol=1e-3, err_msg="loss curve")
    np.testing.assert_allclose(curves["cuda"][:, 1], curves["cpu"][:, 1], atol=2 / 256, err_msg="accuracy curve")
    assert curves["cuda"][-1, 0] < curves["cuda"][0, 0], "the loss did not go down"


def test_eval_step_matches_cpu(rng):
    x, y = _data(rng, 100)
    hn.seed(4)
    model = small_cnn()
    state = model.state_dict()
    out = {}
    for device in ("cpu", "cuda"):
        m = small_cnn()
        m.load_state_dict(state)
        m.to(device).eval()
        b = m.backend
        step = T.make_eval_step(m)
        for _ in range(2):                          # the second pass replays the captured graphs
            for i in range(0, 100, 32):
                step.step(b.asarray(x[i:i + 32]), b.labels(y[i:i + 32]))
        out[device] = step.collect()
    assert out["cuda"][2] == out["cpu"][2] == 200 and abs(out["cuda"][1] - out["cpu"][1]) <= 1   # float32 near-ties
    assert abs(out["cuda"][0] - out["cpu"][0]) <= 1e-4 * abs(out["cpu"][0])


def test_train_and_eval_steps_share_the_step_pool(rng):
    """Train and eval graphs of two batch shapes, interleaved over epochs, run in one private pool that their
    temporaries share; weights, losses and counts stay those of the cpu backend."""
    x, y = _data(rng, 80)
    hn.seed(5)
    state = small_cnn(0.0).state_dict()
    out = {}
    for device in ("cpu", "cuda"):
        m = _cnn_from(state, device, 123, 0.0)
        b = m.backend
        opt = T.make_optimizer("momentum", m.parameters(), lr=0.05)
        train, results = T.make_train_step(m, opt, None, 0.0), []
        m.eval()
        ev = T.make_eval_step(m)
        for _ in range(3):
            m.train()
            for s in (slice(0, 32), slice(32, 64), slice(64, 80)):
                train.step(b.asarray(x[s]), b.labels(y[s]))
            m.eval()
            for s in (slice(0, 48), slice(48, 80)):
                ev.step(b.asarray(x[s]), b.labels(y[s]))
            results.append((train.collect(), ev.collect()))
        out[device] = (m.state_dict(), results)
        if device == "cuda":
            assert train.runner.pool is ev.runner.pool is b.step_pool()
    for k in out["cpu"][0]:
        assert_close(out["cuda"][0][k], out["cpu"][0][k], F32, k)
    for (tc, ec), (tg, eg) in zip(out["cpu"][1], out["cuda"][1]):
        assert tg[2] == tc[2] == 80 and eg[2] == ec[2] == 80
        assert abs(tg[0] - tc[0]) <= 1e-4 * abs(tc[0]) and abs(eg[0] - ec[0]) <= 1e-4 * abs(ec[0])


def airbench_like(whiten_images):
    """airbench94's pieces (issue 15): whitening conv (frozen weight), GELU, Dirac convs, pool -> BN with a frozen
    scale, BN without a scale, a frozen Dense bias, the logit Scale; and the BN -> ReLU -> pool the plan fuses."""
    from hetnet import init

    model = hn.Sequential([
        hn.Conv2D(1, 8, 2, init="whitening"), hn.GELU(),
        hn.Conv2D(8, 16, 3, padding=1, bias=False, init="dirac"), hn.MaxPool2D(2),
        hn.BatchNorm2D(16, momentum=0.4, eps=1e-12, scale="frozen"), hn.GELU(),
        hn.Conv2D(16, 16, 3, padding=1, bias=False, init="dirac"), hn.BatchNorm2D(16, scale="none"), hn.ReLU(),
        hn.MaxPool2D(2), hn.Flatten(), hn.Dense(16 * 2 * 2, 8), hn.ReLU(), hn.Dense(8, 4, bias=False),
        hn.Scale(1 / 9)])
    model[11].bias.requires_grad = False
    init.data_init(model, whiten_images)
    return model


def test_whitening_statistics_on_the_gpu(rng):
    """data_init of a model on cuda computes the patch statistics there (CuPy, float64): the same whitening weights
    as NumPy's on the host, to float64 rounding (the sums in another order)."""
    from hetnet import init

    images = rng.integers(0, 256, size=(300, 3, 12, 12), dtype=np.uint8)
    mean, std = [0.45, 0.5, 0.4], [0.2, 0.25, 0.22]
    want = init.whitening_weights(images, 2, 5e-4, mean, std)
    got = init.whitening_weights(images, 2, 5e-4, mean, std, xp=cupy)
    assert_close(got, want, np.float64, "patch statistics in CuPy vs NumPy")
    model = hn.Sequential([hn.Conv2D(3, 24, 2, init="whitening"), hn.GELU()]).to("cuda")
    assert init.data_init(model, images, mean, std) == ["0"]
    assert_close(cupy.asnumpy(model[0].weight.data), want, np.float32, "data_init on cuda")


def test_graph_step_with_airbench_layers_matches_cpu(rng):
    """GELU, Scale, frozen and absent BN scales and frozen weights through the captured cuda step: the weights of
    the cpu backend's generic step after four SGD steps (no weight decay: frozen parameters get zero gradients, so
    they stay where they are)."""
    x, y = _data(rng, 64)
    x = x[:, :, :11, :11].copy()
    hn.seed(6)
    start = airbench_like(x[:32]).state_dict()
    out = {}
    for device in ("cpu", "cuda"):
        hn.seed(6)
        model = airbench_like(x[:32])
        model.load_state_dict(start)
        model.to(device)
        b = model.backend
        opt = T.make_optimizer("momentum", model.parameters(), lr=0.05)
        step = T.make_train_step(model, opt)
        for i in range(4):
            s = slice(16 * i, 16 * i + 16)
            step.step(b.asarray(x[s]), b.labels(y[s]))
        out[device] = (model.state_dict(), step.collect())
    for k in start:
        assert_close(out["cuda"][0][k], out["cpu"][0][k], F32, k)
    for k in ("0.weight", "4.weight", "11.bias"):
        np.testing.assert_array_equal(out["cuda"][0][k], start[k], err_msg=f"frozen {k} changed")
    assert abs(out["cuda"][1][0] - out["cpu"][1][0]) <= 1e-4 * abs(out["cpu"][1][0])


def test_tta_matches_cpu_and_runs_in_the_captured_eval_step(rng):
    """Test-time augmentation on the GPU (hetnet.train.tta_logits: mirrors and reflect-padded translations made by
    slicing, so they run inside the eval step's CUDA graph): the cpu backend's logits, loss and accuracy, also when
    the second pass replays the captured graphs."""
    x, y = _data(rng, 96)
    hn.seed(7)
    state = small_cnn().state_dict()
    out = {}
    for device in ("cpu", "cuda"):
        m = _cnn_from(state, device, 7)
        m.eval()
        b = m.backend
        logits = [b.to_numpy(T.tta_logits(m, b.asarray(x[:32]), level)) for level in (0, 1, 2)]
        step = T.make_eval_step(m, 2)
        sums = []
        for _ in range(2):                              # the second pass replays the captured graphs
            for i in range(0, 96, 32):
                step.step(b.asarray(x[i:i + 32]), b.labels(y[i:i + 32]))
            sums.append(step.collect())
        out[device] = (logits, sums)
    for level in (0, 1, 2):
        assert_close(out["cuda"][0][level], out["cpu"][0][level], F32, f"TTA level {level} logits")
    for (lg, cg, ng), (lc, cc, nc) in zip(out["cuda"][1], out["cpu"][1]):
        assert ng == nc == 96 and abs(cg - cc) <= 1 and abs(lg - lc) <= 1e-4 * abs(lc)


def test_fit_uses_the_fast_step(rng):
    x, y = _data(rng, 128)
    model = small_cnn().to("cuda")
    history = model.fit(x, y, epochs=2, batch_size=32, optimizer="momentum", lr=0.05, progress=False)
    assert len(history) == 2 and np.isfinite(history[-1]["train_loss"])


# --- the data set on the GPU (hetnet.data.ResidentLoader, data.cu) ------------------------------------------------


@pytest.mark.parametrize("augment", ["", "flip", "crop:2,flip", "flip,crop:4", "crop:1", "translate:2,altflip",
                                     "altflip,translate:2", "flip,translate:9", "altflip"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 7, 11)])
def test_resident_batches_equal_host_batches(be, rng, augment, shape):
    from hetnet.data import BatchLoader, ResidentLoader, channel_stats, on_device

    x = rng.integers(0, 256, size=(203, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, size=203)
    host = BatchLoader(x, y, 64, *channel_stats(x), augment=augment, seed=11, prefetch=0)
    dev = on_device(host, be)
    assert isinstance(dev, ResidentLoader) and dev.images.dtype == cupy.uint8
    for epoch in (0, 1):
        n = 0
        for (gx, gy), (wx, wy) in zip(dev.epoch(epoch), host.epoch(epoch)):
            assert isinstance(gx, cupy.ndarray) and gx.dtype == cupy.float32 and gy.dtype == cupy.int32
            np.testing.assert_array_equal(cupy.asnumpy(gx), wx)        # identical bits, not just close
            np.testing.assert_array_equal(cupy.asnumpy(gy), wy)
            n += 1
        assert n == len(host)


def test_training_on_resident_data_matches_host_batches(be, rng):
    from hetnet.data import BatchLoader, ResidentLoader, channel_stats

    x = rng.integers(0, 256, size=(160, 1, 12, 12), dtype=np.uint8)
    y = rng.integers(0, 4, size=160)
    x[np.arange(160), 0, y * 3, y * 3] = 255                  # a learnable signal
    hn.seed(2)
    state = small_cnn().state_dict()
    out = []
    for resident in (False, True):
        model = _cnn_from(state, be, 9)
        opt = T.make_optimizer("momentum", model.parameters(), lr=0.05)
        host = BatchLoader(x, y, 32, *channel_stats(x), augment="crop:1,flip", seed=3)
        loader = ResidentLoader(host, be) if resident else host
        hist = T.Trainer(model, opt, progress=False, log=None).fit(loader, 3, val_loader=loader)
        out.append((model.state_dict(), hist))
    (w0, h0), (w1, h1) = out
    for k in w0:
        assert_close(w1[k], w0[k], F32, k)
    np.testing.assert_allclose([r["train_loss"] for r in h1], [r["train_loss"] for r in h0], rtol=1e-5)


def test_cli_train_on_gpu_keeps_the_data_on_the_device(tmp_path, monkeypatch):
    """`hetnet train --device cuda` end to end; the training loader must be the device-resident one."""
    from test_cli import make_idx

    from hetnet import data as hdata
    from hetnet.cli import main

    made = []
    real = hdata.ResidentLoader.__init__

    def spy(self, host, backend):
        made.append(host.shuffle)
        real(self, host, backend)

    monkeypatch.setattr(hdata.ResidentLoader, "__init__", spy)
    data = make_idx(tmp_path / "idx")
    rc = main(["train", "--device", "cuda", "--data", str(data), "--epochs", "2", "--batch-size", "32",
               "--augment", "crop:1,flip", "--out", str(tmp_path / "run")])
    assert rc == 0
    assert True in made and False in made                      # training and test loaders both on the GPU
    assert (tmp_path / "run" / "model.safetensors").exists()
    rc = main(["evaluate", str(tmp_path / "run"), "--device", "cuda"])
    assert rc == 0


# --- user-facing information and errors --------------------------------------------------------------------------


def test_describe(be):
    info = describe()
    assert info["available"] and info["devices"][0]["name"] and info["cupy"]
    assert info["devices"][0]["memory_total_gib"] > 0


def test_bad_device_index_is_one_line_error():
    with pytest.raises(DeviceError, match=r"cuda:\d+': only \d+ GPU"):
        get_backend(f"cuda:{_N_GPUS + 3}")


def test_out_of_memory_message(be):
    err = _oom_error(be, 4096, cupy.cuda.memory.OutOfMemoryError(3 * 2**30, 0))
    msg = str(err)
    assert "batch size 4096" in msg and "3072.0 MiB" in msg and "\n" not in msg


def test_train_step_out_of_memory_is_device_error(be, monkeypatch):
    model = small_cnn().to("cuda")
    opt = T.make_optimizer("sgd", model.parameters(), lr=0.01)
    step = T.make_train_step(model, opt)

    def boom(*a, **k):
        raise cupy.cuda.memory.OutOfMemoryError(2**40, 0)

    monkeypatch.setattr(step, "_run", boom)
    with pytest.raises(DeviceError, match="batch size 8"):
        step.step(be.asarray(np.zeros((8, 1, 12, 12))), be.labels(np.zeros(8, dtype=np.int64)))


def test_model_state_is_independent_of_the_step_object(rng):
    """The fast step updates the model's own parameters (views of the flat buffer) in place."""
    model = small_cnn().to("cuda")
    before = copy.deepcopy(model.state_dict())
    opt = T.make_optimizer("sgd", model.parameters(), lr=0.1)
    step = T.make_train_step(model, opt)
    x, y = _data(rng, 16)
    step.step(model.backend.asarray(x), model.backend.labels(y))
    after = model.state_dict()
    assert any(not np.array_equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_step_asks_no_input_gradient_of_the_first_dense_layer(be, rng, monkeypatch):
    """Flatten -> Dense first (the mlp): the fast step's backward stops at that Dense and asks it for no d(input),
    as model.backward(dy, need_dx=False) does; the update still equals the cpu backend's."""
    calls = []
    real = C.dense_backward

    def spy(be_, dy, x, w, dw, db, need_dx=True, relu_x=None):
        calls.append(need_dx)
        return real(be_, dy, x, w, dw, db, need_dx, relu_x)

    monkeypatch.setattr(C, "dense_backward", spy)
    hn.seed(3)
    layers = [hn.Flatten(), hn.Dense(2 * 3 * 3, 8), hn.ReLU(), hn.Dense(8, 4)]
    state = hn.Sequential(layers).state_dict()
    x, y = f32(rng, 8, 2, 3, 3), rng.integers(0, 4, 8)
    weights = {}
    for dev in ("cpu", "cuda"):
        hn.seed(3)
        model = hn.Sequential([hn.Flatten(), hn.Dense(2 * 3 * 3, 8), hn.ReLU(), hn.Dense(8, 4)]).to(dev)
        model.load_state_dict(state)
        opt = T.make_optimizer("momentum", model.parameters(), lr=0.1)
        step = T.make_train_step(model, opt, None, 0.0)
        b = model.backend
        step.step(b.asarray(x), b.labels(y))
        step.collect()
        weights[dev] = model.state_dict()
    # last layer first; a capture after the eager step runs the plan again
    assert calls[:2] == [True, False] and calls[1::2] == [False] * (len(calls) // 2), f"need_dx: {calls}"
    for k in weights["cpu"]:
        assert_close(weights["cuda"][k], weights["cpu"][k], F32, k)


def test_lookahead_update_is_the_array_expression_bit_for_bit(rng):
    """optim.cu's lookahead_update: ema += w (live - ema), live = ema in one kernel, with the roundings of the array
    expression train.Lookahead runs elsewhere (NumPy float32: subtract, multiply, add): equal bits; and a cuda
    model's lookahead step gives the cpu model's weights bit for bit."""
    be = get_backend("cuda")
    live = rng.standard_normal(10_001).astype(np.float32)
    ema = rng.standard_normal(10_001).astype(np.float32)
    w = np.float32(1 - 0.95 ** 5 * 0.3 ** 3)
    want_ema = ema + w * (live - ema)
    g_live, g_ema = cupy.asarray(live), cupy.asarray(ema)
    be.lookahead_update(g_live, g_ema, w)
    np.testing.assert_array_equal(cupy.asnumpy(g_ema), want_ema)
    np.testing.assert_array_equal(cupy.asnumpy(g_live), want_ema)
    models = {}
    for device in ("cpu", "cuda"):
        hn.seed(4)
        models[device] = hn.Sequential([hn.Conv2D(2, 4, 3, bias=False), hn.BatchNorm2D(4), hn.Flatten(),
                                        hn.Dense(4 * 4 * 4, 3)]).to(device)
    models["cuda"].load_state_dict(models["cpu"].state_dict())
    state = {k: v * 1.5 + 0.25 for k, v in models["cpu"].state_dict().items()}
    looks = {device: T.Lookahead(m, 10, every=1) for device, m in models.items()}
    for device, m in models.items():
        m.load_state_dict(state)                    # the weights move away from the lookahead's copy
        looks[device].step()
    got, want = models["cuda"].state_dict(), models["cpu"].state_dict()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
