"""Data parallel without MPI or GPUs (hetnet.parallel): the shard arithmetic and the sharded loaders against the
single-process batches, the gradient buckets and their hook in the plan, synchronised BatchNorm between two
threads standing in for two ranks, and the launcher's watchdog with stand-in ranks (one error line naming the
rank, within the timeout). tests/test_parallel_mpi.py runs the real thing over MPI."""
from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import rel_err
from parallel_cases import ROOT, child_env, error_lines

import hetnet as hn
from hetnet import cli
from hetnet import random as hrandom
from hetnet.backends import cpu
from hetnet.backends import reference as ref
from hetnet.data import BatchLoader, ResidentLoader
from hetnet.optim import SGD
from hetnet.parallel import GradReducer, ShardedLoader, bucket_bounds, shard_rows, train_batch_sizes
from hetnet.plan import TrainStep

# --- shards of the seeded plan ---------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_rows_cover_a_batch_once_in_rank_order(world):
    for n in range(23):
        rows = [shard_rows(n, r, world) for r in range(world)]
        assert [lo for lo, _ in rows] == sorted(lo for lo, _ in rows)
        assert [i for lo, hi in rows for i in range(lo, hi)] == list(range(n))
        assert max(hi - lo for lo, hi in rows) - min(hi - lo for lo, hi in rows) <= 1


def test_train_batch_sizes_cut_the_last_batch_to_a_multiple_of_the_ranks():
    assert train_batch_sizes(1000, 128, 4) == [128] * 7 + [104]
    assert train_batch_sizes(1000, 128, 3 * 1) == [128] * 7 + [102]       # 104 - 104 % 3
    assert train_batch_sizes(1030, 128, 4) == [128] * 8                   # 6 left: one per rank -> dropped
    assert train_batch_sizes(1033, 128, 4) == [128] * 8 + [8]             # 9 -> 8: two per rank
    # one process: as BatchLoader's own rule (a last batch of one example is dropped)
    assert train_batch_sizes(129, 128, 1) == [128] and train_batch_sizes(130, 128, 1) == [128, 2]


def _host_loader(augment, batch=12, n=50, shuffle=True, seed=4):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 2, 7, 6), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    return BatchLoader(x, y, batch, mean=[0.4, 0.6], std=[0.2, 0.3], shuffle=shuffle, augment=augment, seed=seed,
                       prefetch=0)


@pytest.mark.parametrize("augment", ["", "crop:2,flip", "translate:2,altflip", "crop:1,crop:2"])  # the last: no plan
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_batches_together_are_the_single_process_batches(augment, world):
    whole = _host_loader(augment, batch=12)
    shards = [ShardedLoader(whole, r, world, train=True) for r in range(world)]
    for epoch in (0, 3):
        single = list(whole.epoch(epoch))
        parts = [list(s.epoch(epoch)) for s in shards]
        assert all(len(p) == len(shards[0]) for p in parts)
        for b, (xb, yb) in enumerate(single[:len(shards[0])]):
            n = train_batch_sizes(len(whole.x), 12, world)[b]
            assert [len(p[b][1]) for p in parts] == [n // world] * world
            assert np.array_equal(np.concatenate([p[b][0] for p in parts]), xb[:n])
            assert np.array_equal(np.concatenate([p[b][1] for p in parts]), yb[:n])


@pytest.mark.parametrize("world", [2, 4])
def test_evaluation_shards_score_every_example_once(world):
    whole = _host_loader("", batch=16, n=37, shuffle=False)        # a last batch of 5: some ranks get 1, one 2
    parts = [list(ShardedLoader(whole, r, world, train=False).epoch(0)) for r in range(world)]
    got = np.sort(np.concatenate([yb for p in parts for _, yb in p]))
    assert np.array_equal(got, np.sort(whole.y))


@pytest.mark.parametrize("augment", ["crop:2,flip", "translate:1,altflip"])
def test_device_shards_gather_the_same_batches(augment):
    host = _host_loader(augment, batch=12)
    resident = ResidentLoader(host, cpu)
    for world in (2, 3):
        for r in range(world):
            on_host = list(ShardedLoader(host, r, world, train=True).epoch(1))
            on_device = list(ShardedLoader(resident, r, world, train=True).epoch(1))
            assert len(on_host) == len(on_device)
            for (xh, yh), (xd, yd) in zip(on_host, on_device):
                assert np.array_equal(xh, xd) and np.array_equal(yh, yd)


def test_a_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        ShardedLoader(_host_loader("", batch=16), 0, 3, train=True)


# --- gradient buckets ------------------------------------------------------------------------------------------


def test_bucket_bounds_cut_from_the_end_on_parameter_boundaries():
    assert bucket_bounds([4, 4, 4], 6) == [(4, 12, 1, 3), (0, 4, 0, 1)]
    assert bucket_bounds([10, 1, 1], 2) == [(10, 12, 1, 3), (0, 10, 0, 1)]
    assert bucket_bounds([3, 3], 100) == [(0, 6, 0, 2)]
    sizes = [5, 17, 1, 64, 3, 3, 40]
    b = bucket_bounds(sizes, 16)
    assert b[0][1] == sum(sizes) and b[-1][0] == 0
    assert all(b[i][0] == b[i + 1][1] for i in range(len(b) - 1))      # contiguous, from the end down


class _RecordingComm:
    """A world of one that records when each bucket starts (after which node's backward)."""

    average_op, size, overlap = False, 1, True

    def __init__(self):
        self.started, self.node, self.waits = [], None, 0

    def prepare(self, largest, bf16):
        pass

    def start_allreduce(self, buf, bf16=False):
        self.started.append((buf.size, self.node))

    def wait(self, handles):
        self.waits += 1


def _model():
    hrandom.seed(2)
    return hn.Sequential([hn.Conv2D(1, 3, 3, padding=1), hn.ReLU(), hn.MaxPool2D(2), hn.Flatten(),
                          hn.Dense(48, 8), hn.ReLU(), hn.Dropout(0.0), hn.Dense(8, 4)]).to("cpu")


def test_buckets_start_during_the_backward_and_change_nothing_in_one_process():
    rng = np.random.default_rng(1)
    batches = [(rng.normal(0, 1, (6, 1, 8, 8)).astype(np.float32), rng.integers(0, 4, 6)) for _ in range(3)]
    results = []
    for use_reducer in (False, True):
        model = _model()
        comm = _RecordingComm()
        reducer = GradReducer(comm, model, bucket_bytes=64) if use_reducer else None
        step = TrainStep(model, SGD(model.parameters(), lr=0.1, momentum=0.9), reducer=reducer)
        if reducer is not None:
            hook = reducer.after_node

            def after_node(i, hook=hook, comm=comm):
                comm.node = i
                hook(i)
            reducer.after_node = after_node
        for x, y in batches:
            step.step(x, y)
        results.append(np.concatenate([a.ravel() for _, a in model.named_arrays()]))
    assert np.array_equal(results[0], results[1])          # a world of one: the reducer changes nothing
    total = int(model._pack.grad.size)
    per_step = comm.started[:len(comm.started) // 3]
    assert sum(n for n, _ in per_step) == total and comm.waits == 3
    nodes = [node for _, node in per_step]
    assert nodes[0] == len(model.plan.nodes) - 1            # the last node's gradients go first, right away
    assert nodes == sorted(nodes, reverse=True) and len(set(nodes)) > 1


# --- synchronised BatchNorm between two "ranks" (threads) ---------------------------------------------------


class _ThreadWorld:
    """reduce(a) for two threads: both add their arrays, both get the sum (a barrier on each side)."""

    def __init__(self, n: int = 2):
        self.barrier, self.parts, self.n = threading.Barrier(n), {}, n

    def reduce_for(self, rank: int):
        def reduce(a):
            self.parts[rank] = np.array(a, copy=True)
            self.barrier.wait()
            total = sum(self.parts[r] for r in range(self.n))
            self.barrier.wait()
            a[...] = total
        return reduce


@pytest.mark.parametrize("shape,fused", [((6, 3, 5, 4), False), ((7, 5), False), ((6, 3, 6, 4), True)])
def test_sync_batchnorm_of_two_ranks_is_batchnorm_of_the_whole_batch(shape, fused):
    rng = np.random.default_rng(7)
    c = shape[1]
    x = rng.normal(2.0, 3.0, shape)
    dy = rng.normal(0, 1, (shape[0], c, shape[2] // 2, shape[3] // 2) if fused else shape)
    g, b = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.5, c)

    def run(xs, dys, reduce, out, key):
        rm, rv, dg, db = np.zeros(c), np.ones(c), np.zeros(c), np.zeros(c)
        if fused:
            y, cache = ref.bn_relu_maxpool_forward(xs, g, b, rm, rv, 0.1, 1e-5, True, 2, 2, reduce=reduce)
            dx = ref.bn_relu_maxpool_backward(dys, cache, dg, db)
        else:
            y, cache = ref.batchnorm_forward(xs, g, b, rm, rv, 0.1, 1e-5, True, reduce=reduce)
            dx = ref.batchnorm_backward(dys, cache, dg, db)
        out[key] = (y, dx, rm, rv, dg, db)

    out, world, cut = {}, _ThreadWorld(), shape[0] // 2
    halves = [(slice(0, cut), 0), (slice(cut, None), 1)]
    threads = [threading.Thread(target=run, args=(x[s], dy[s], world.reduce_for(r), out, r)) for s, r in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run(x, dy, None, out, "whole")
    y, dx, rm, rv, dg, db = out["whole"]
    tol = 1e-12
    assert rel_err(np.concatenate([out[0][0], out[1][0]]), y) < tol
    assert rel_err(np.concatenate([out[0][1], out[1][1]]), dx) < tol
    for r in (0, 1):                        # the same running statistics on both ranks
        assert rel_err(out[r][2], rm) < tol and rel_err(out[r][3], rv) < tol
    assert rel_err(out[0][4] + out[1][4], dg) < tol and rel_err(out[0][5] + out[1][5], db) < tol


def test_identity_reduce_changes_nothing():
    rng = np.random.default_rng(3)
    x, dy = rng.normal(0, 1, (4, 3, 5, 5)).astype(np.float32), rng.normal(0, 1, (4, 3, 5, 5)).astype(np.float32)
    outs = []
    for reduce in (None, lambda a: None):
        rm, rv, dg, db = cpu.zeros((3,)), cpu.asarray(np.ones(3)), cpu.zeros((3,)), cpu.zeros((3,))
        y, cache = cpu.batchnorm_forward(x, cpu.asarray(np.ones(3)), cpu.zeros((3,)), rm, rv, 0.1, 1e-5, True,
                                         reduce=reduce)
        outs.append([y, cpu.batchnorm_backward(dy, cache, dg, db), rm, rv, dg, db])
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-6


# --- the launcher and its watchdog, with stand-in ranks -------------------------------------------------------


def _launch(world: int, mode: str, fault: str = "", timeout: float = 3.0):
    env = child_env(**({"HETNET_TEST_FAULT": fault} if fault else {}))
    code = ("import sys; from hetnet.parallel import launch; "
            f"sys.exit(launch([], {world}, timeout={timeout}, "
            f"command=[sys.executable, {str(ROOT / 'tests' / 'parallel_fake_rank.py')!r}, {mode!r}]))")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                       env=env)
    return r, time.monotonic() - t0


def test_launcher_runs_the_ranks_to_the_end():
    r, _ = _launch(3, "ok")
    assert r.returncode == 0, r.stderr
    assert error_lines(r.stderr) == [] and r.stdout.splitlines() == ["rank 0 done"]     # the others' output: discarded


def test_a_rank_that_dies_ends_the_job_at_once_with_one_line():
    r, seconds = _launch(3, "ok", fault="die@1:5", timeout=60.0)
    assert r.returncode == 1
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "rank 1 " in errors[0] and "killed by signal 9 (SIGKILL)" in errors[0], r.stderr
    assert seconds < 20                     # not the 60 s hang timeout: a death is noticed at once


def test_a_rank_that_hangs_ends_the_job_within_the_timeout_with_one_line():
    r, seconds = _launch(2, "ok", fault="hang@1:5", timeout=2.0)
    assert r.returncode == 1
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "rank 1 " in errors[0] and "no progress for 2 s" in errors[0], r.stderr
    assert seconds < 20


def test_a_rank_error_is_the_one_line():
    r, _ = _launch(2, "error")
    assert r.returncode == 2
    assert error_lines(r.stderr) == ["error: rank 1: the data went missing"], r.stderr


def test_gpus_without_a_gpu_is_one_line(capsys):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: --gpus may find GPUs here")
    assert cli.main(["train", "--gpus", "2", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gpus 2: no CUDA GPU found"), err


def test_scaling_benchmark_imports_without_gpus():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks" / "scaling.py")
    mod = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(None):
        spec.loader.exec_module(mod)
    assert callable(mod.main)


def test_a_transport_that_does_not_overlap_starts_every_bucket_after_the_backward():
    """NcclComm.overlap is False (see comm.py): every bucket starts in finish(), after the whole backward."""
    from hetnet.parallel.comm import MPIComm, NcclComm

    assert MPIComm.overlap and not NcclComm.overlap
    comm = _RecordingComm()
    comm.overlap = False
    hn.seed(1)
    model = hn.Sequential([hn.Flatten(), hn.Dense(12, 8), hn.ReLU(), hn.Dense(8, 3)]).to("cpu")
    reducer = GradReducer(comm, model, bucket_bytes=64)
    nodes = model.plan.nodes_for((3, 2, 2))
    reducer.begin(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        comm.node = i
        reducer.after_node(i)
    assert comm.started == []
    comm.node = "finish"
    reducer.finish()
    assert len(comm.started) == len(reducer.bounds) and all(n == "finish" for _, n in comm.started)
