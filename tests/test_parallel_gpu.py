"""Data parallel on GPUs (hetnet.parallel over NCCL). Skipped without CuPy or a GPU (as in CI).

One GPU: synchronised BatchNorm's kernels (bn_sums, bn_stats_synced, the backward's reduced sums) with two threads
standing in for two ranks, against the float64 reference on the whole batch; NCCL with a world of one inside the
captured CUDA graph (the buckets' fork to the communication stream and join back, sync BN's all-reduces) against
the same steps without a reducer; `hetnet train --gpus 1` end to end against `hetnet train --device cuda`.
Several GPUs (skipped with fewer than two): `hetnet train --gpus 2` against one GPU at twice the batch, with and
without --sync-bn, a killed and a hung rank, resume on one GPU.
"""
from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy not installed")
try:
    N_GPUS = cupy.cuda.runtime.getDeviceCount()
except cupy.cuda.runtime.CUDARuntimeError:  # no driver
    N_GPUS = 0
if N_GPUS == 0:
    pytest.skip("no CUDA GPU", allow_module_level=True)

from conftest import RTOL, assert_close, rel_err
from parallel_cases import RUN_FILES, child_env, error_lines, final_weights, hetnet_cmd, make_work, train_args

import hetnet as hn
from hetnet import serialize
from hetnet.backends import reference as ref
from hetnet.device import get_backend
from hetnet.optim import SGD
from hetnet.parallel.comm import NcclComm, nccl_unique_id
from hetnet.parallel.reducer import GradReducer
from hetnet.plan import TrainStep

pytestmark = pytest.mark.gpu
F32 = np.float32
many_gpus = pytest.mark.skipif(N_GPUS < 2, reason="needs two GPUs")


class _Progress:
    def waiting(self):
        return contextlib.nullcontext()


@pytest.fixture(scope="module")
def be():
    return get_backend("cuda:0")


@pytest.fixture(scope="module")
def nccl_one(be):
    """An NCCL communicator of one rank on cuda:0."""
    return NcclComm(be, 0, 1, nccl_unique_id(), _Progress())


# --- synchronised BatchNorm's kernels, two thread-ranks on one GPU ------------------------------------------------


class _ThreadWorld:
    """reduce(a) for two threads on the same (legacy default) stream: both add their arrays, both get the sum."""

    def __init__(self):
        self.barrier, self.parts = threading.Barrier(2), {}

    def reduce_for(self, rank: int):
        def reduce(a):
            self.parts[rank] = a.copy()
            self.barrier.wait()
            total = self.parts[0] + self.parts[1]
            self.barrier.wait()
            a[...] = total
        return reduce


@pytest.mark.parametrize("shape,pool", [((6, 3, 5, 4), None), ((7, 5), None), ((6, 3, 6, 4), (2, 2)),
                                        ((6, 3, 7, 7), (3, 2))])
def test_sync_batchnorm_kernels_of_two_ranks_are_batchnorm_of_the_whole_batch(be, shape, pool):
    rng = np.random.default_rng(9)
    c = shape[1]
    x = rng.normal(2.0, 3.0, shape).astype(F32).astype(np.float64)
    g, b = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.5, c)
    if pool:
        k, s = pool
        out_shape = (shape[0], c, (shape[2] - k) // s + 1, (shape[3] - k) // s + 1)
    dy = rng.normal(0, 1, out_shape if pool else shape).astype(F32).astype(np.float64)

    def run(backend, xs, dys, reduce, out, key):
        rm, rv = backend.asarray(np.zeros(c)), backend.asarray(np.ones(c))
        dg, db = backend.zeros((c,)), backend.zeros((c,))
        args = (backend.asarray(xs), backend.asarray(g), backend.asarray(b), rm, rv, 0.1, 1e-5, True)
        kw = {} if reduce is None else {"reduce": reduce}
        if pool:
            y, cache = backend.bn_relu_maxpool_forward(*args, *pool, **kw)
            dx = backend.bn_relu_maxpool_backward(backend.asarray(dys), cache, dg, db)
        else:
            y, cache = backend.batchnorm_forward(*args, **kw)
            dx = backend.batchnorm_backward(backend.asarray(dys), cache, dg, db)
        out[key] = [backend.to_numpy(v) for v in (y, dx, rm, rv, dg, db)]

    out, world, cut = {}, _ThreadWorld(), shape[0] // 2
    threads = [threading.Thread(target=run, args=(be, x[sl], dy[sl], world.reduce_for(r), out, r))
               for sl, r in ((slice(0, cut), 0), (slice(cut, None), 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run(ref, x, dy, None, out, "whole")
    y, dx, rm, rv, dg, db = out["whole"]
    assert_close(np.concatenate([out[0][0], out[1][0]]), y, F32, "y")
    assert_close(np.concatenate([out[0][1], out[1][1]]), dx, F32, "dx")
    for r in (0, 1):
        assert_close(out[r][2], rm, F32, "running mean")
        assert_close(out[r][3], rv, F32, "running var")
    assert_close(out[0][4] + out[1][4], dg, F32, "dgamma")
    assert_close(out[0][5] + out[1][5], db, F32, "dbeta")


# --- NCCL inside the captured step, a world of one -------------------------------------------------------------


def _bn_cnn():
    return hn.Sequential([hn.Conv2D(1, 6, 3, padding=1, bias=False), hn.BatchNorm2D(6), hn.ReLU(), hn.MaxPool2D(2),
                          hn.Conv2D(6, 8, 3, padding=1), hn.ReLU(), hn.MaxPool2D(2), hn.Flatten(),
                          hn.Dense(8 * 3 * 3, 16), hn.BatchNorm1D(16), hn.ReLU(), hn.Dense(16, 4)])


@pytest.mark.parametrize("sync_bn", [False, True])
def test_nccl_reducer_in_the_captured_graph_changes_nothing_in_a_world_of_one(be, nccl_one, sync_bn):
    rng = np.random.default_rng(4)
    batches = [(rng.normal(0, 1, (16, 1, 12, 12)).astype(F32), rng.integers(0, 4, 16)) for _ in range(6)]
    be.force_conv_algo = "implicit"         # the same kernels in both runs
    try:
        runs = []
        for reducer_on in (False, True):
            hn.seed(3)
            model = _bn_cnn().to(be)
            for layer in model.layers:
                if hasattr(layer, "running_var"):
                    layer.sync_stats = nccl_one.allreduce if reducer_on and sync_bn else None
            reducer = GradReducer(nccl_one, model, bucket_bytes=2048) if reducer_on else None
            step = TrainStep(model, SGD(model.parameters(), lr=0.05, momentum=0.9), reducer=reducer)
            for x, y in batches:            # the first step eager, the second captured, the rest replayed
                step.step(be.asarray(x), be.labels(y))
            step.collect()
            assert step.runner.graphs, "the step was not captured"
            if reducer is not None:
                assert len(reducer.bounds) > 1
            runs.append(model.state_dict())
    finally:
        be.force_conv_algo = None
    for k in runs[0]:
        assert_close(runs[1][k], runs[0][k], F32, k)


def _bf16_rounded(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest, ties to even) and widened back, on the host."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    top = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32)
    return (top << 16).view(np.float32)


def test_bf16_gradients_travel_as_bfloat16(be, nccl_one):
    """A world of one: the buffer after the reduction is the gradient rounded to bfloat16, bucket by bucket."""
    hn.seed(5)
    model = _bn_cnn().to(be)
    reducer = GradReducer(nccl_one, model, bucket_bytes=512, bf16=True)
    grad = np.random.default_rng(2).normal(0, 1e-2, model._pack.grad.size).astype(F32)
    grad[:3] = [1.00390625, 1.01171875, -2.0 ** -130]       # a tie to even each way, a subnormal
    model._pack.grad[...] = be.asarray(grad)
    with be.device, be.compute_stream():
        reducer.begin(model.plan.nodes_for((1, 12, 12)))
        reducer.finish()
    be.compute_stream().synchronize()
    assert len(reducer.bounds) > 2
    assert np.array_equal(be.to_numpy(model._pack.grad), _bf16_rounded(grad))


# --- the command line -------------------------------------------------------------------------------------------

GPU_RTOL = 10 * RTOL[np.dtype(F32)]         # two GPU runs: tuned kernels and atomics may add in other orders


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("gpu-dp"))


def _hetnet(work: Path, args: list[str], **env) -> tuple:
    t0 = time.monotonic()
    r = subprocess.run(hetnet_cmd(*args), check=False, capture_output=True, text=True, timeout=600, cwd=work,
                       env=child_env(**env))
    return r, time.monotonic() - t0


def _args(work: Path, spec: str, batch: int, out: str, epochs: int = 2) -> list[str]:
    return train_args(work, batch, out, epochs, spec)


def test_gpus_1_trains_as_one_gpu(work):
    one, _ = _hetnet(work, [*_args(work, "spec.json", 64, "plain"), "--device", "cuda"])
    assert one.returncode == 0, one.stderr
    launched, _ = _hetnet(work, [*_args(work, "spec.json", 64, "gpus1"), "--gpus", "1"])
    assert launched.returncode == 0, launched.stderr
    assert "batch 64 (1 rank x 64)" in launched.stdout
    assert rel_err(final_weights(work / "gpus1"), final_weights(work / "plain")) < GPU_RTOL


@many_gpus
def test_two_gpus_train_as_one_gpu_at_twice_the_batch(work):
    one, _ = _hetnet(work, [*_args(work, "spec.json", 64, "one64"), "--device", "cuda"])
    assert one.returncode == 0, one.stderr
    two, _ = _hetnet(work, [*_args(work, "spec.json", 32, "two32"), "--gpus", "2"])
    assert two.returncode == 0, two.stderr
    assert rel_err(final_weights(work / "two32"), final_weights(work / "one64")) < GPU_RTOL
    assert sorted(p.name for p in (work / "two32").iterdir()) == RUN_FILES


@many_gpus
def test_sync_bn_on_two_gpus_is_batchnorm_of_the_whole_batch(work):
    one, _ = _hetnet(work, [*_args(work, "bn.json", 64, "bn-one64"), "--device", "cuda"])
    assert one.returncode == 0, one.stderr
    two, _ = _hetnet(work, [*_args(work, "bn.json", 32, "bn-two32"), "--gpus", "2", "--sync-bn"])
    assert two.returncode == 0, two.stderr
    assert "synchronised BatchNorm" in two.stdout
    assert rel_err(final_weights(work / "bn-two32"), final_weights(work / "bn-one64")) < GPU_RTOL


@many_gpus
def test_a_killed_rank_on_two_gpus_is_one_line_and_resume_on_one_gpu(work):
    r, seconds = _hetnet(work, [*_args(work, "spec.json", 32, "killed", epochs=3), "--gpus", "2"],
                         HETNET_TEST_FAULT="die@1:16")
    assert r.returncode == 1
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "rank 1 " in errors[0] and "killed by signal 9" in errors[0], r.stderr
    assert seconds < 120
    assert serialize.read_checkpoint(work / "killed").state["epoch"] >= 1
    resumed, _ = _hetnet(work, ["--resume", str(work / "killed"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr


@many_gpus
def test_a_hung_rank_on_two_gpus_is_one_line_within_the_timeout(work):
    r, seconds = _hetnet(work, [*_args(work, "spec.json", 32, "hung", epochs=3), "--gpus", "2", "--dist-timeout",
                                "10"], HETNET_TEST_FAULT="hang@1:16")
    assert r.returncode == 1
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "rank 1 " in errors[0] and "no progress for 10 s" in errors[0], r.stderr
    assert seconds < 120
