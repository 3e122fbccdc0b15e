"""Run by tests/test_parallel_mpi.py as `mpirun -n 2 python tests/mpi_checks.py`: data-parallel pieces over real MPI
against one process at twice the batch. Rank 0 prints one JSON object: the relative differences measured.

    - BatchNorm ops with reduce (synchronised) on the cpu and reference backends: each rank normalises its half of
      a batch; gathered, y, dx and the running statistics are those of the op on the whole batch, and the ranks'
      dgamma / dbeta add up to the whole batch's.
    - TrainStep with the MPI gradient reducer: 3 SGD-momentum steps of each rank on its half of each batch against
      3 steps of one process on the whole batches, for a model without BatchNorm (cpu, reference), with
      synchronised BatchNorm (cpu), and with per-rank BatchNorm (cpu: must differ, the statistics are not those of
      the whole batch).
"""
from __future__ import annotations

import contextlib
import json
import sys

import numpy as np
from mpi4py import MPI

import hetnet as hn
from hetnet import random as hrandom
from hetnet.device import get_backend
from hetnet.optim import SGD
from hetnet.parallel.comm import MPIComm
from hetnet.parallel.reducer import GradReducer
from hetnet.plan import TrainStep

COMM = MPI.COMM_WORLD
RANK, WORLD = COMM.Get_rank(), COMM.Get_size()


class _Progress:
    def waiting(self):
        return contextlib.nullcontext()


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def gather_rows(a) -> np.ndarray:
    """Every rank's rows, in rank order (equal shapes)."""
    a = np.ascontiguousarray(a)
    out = np.empty((WORLD,) + a.shape, a.dtype)
    COMM.Allgather(a, out)
    return out.reshape((-1,) + a.shape[1:])


def bn_ops(be, comm, shape, fused: bool) -> float:
    rng = np.random.default_rng(5)
    c = shape[1]
    x = rng.normal(1.5, 2.0, shape)
    dy = rng.normal(0, 1, (shape[0], c, shape[2] // 2, shape[3] // 2) if fused else shape)
    g, b = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.5, c)
    lo, hi = RANK * shape[0] // WORLD, (RANK + 1) * shape[0] // WORLD
    errs = []
    outs = {}
    for part, reduce in (("mine", comm.allreduce), ("whole", None)):
        xs, dys = (x[lo:hi], dy[lo:hi]) if part == "mine" else (x, dy)
        rm, rv = be.asarray(np.zeros(c)), be.asarray(np.ones(c))
        dg, db = be.zeros((c,)), be.zeros((c,))
        args = (be.asarray(xs), be.asarray(g), be.asarray(b), rm, rv, 0.1, 1e-5, True)
        if fused:
            y, cache = be.bn_relu_maxpool_forward(*args, 2, 2, reduce=reduce)
            dx = be.bn_relu_maxpool_backward(be.asarray(dys), cache, dg, db)
        else:
            y, cache = be.batchnorm_forward(*args, reduce=reduce)
            dx = be.batchnorm_backward(be.asarray(dys), cache, dg, db)
        outs[part] = [be.to_numpy(v) for v in (y, dx, rm, rv, dg, db)]
    y, dx, rm, rv, dg, db = outs["mine"]
    wy, wdx, wrm, wrv, wdg, wdb = outs["whole"]
    errs += [rel(gather_rows(y), wy), rel(gather_rows(dx), wdx), rel(rm, wrm), rel(rv, wrv)]
    errs += [rel(comm.host_sum(dg), wdg), rel(comm.host_sum(db), wdb)]
    return max(errs)


def model_for(kind: str):
    hrandom.seed(3)
    if kind == "plain":
        layers = [hn.Conv2D(1, 4, 3, padding=1), hn.ReLU(), hn.MaxPool2D(2), hn.Flatten(), hn.Dense(64, 16), hn.ReLU(),
                  hn.Dense(16, 5)]
    else:
        layers = [hn.Conv2D(1, 4, 3, padding=1, bias=False), hn.BatchNorm2D(4), hn.ReLU(), hn.MaxPool2D(2),
                  hn.Flatten(), hn.Dense(64, 16), hn.BatchNorm1D(16), hn.ReLU(), hn.Dense(16, 5)]
    return hn.Sequential(layers)


def train(kind: str, device: str, comm, sync: bool, shard: bool, steps: int = 3) -> list:
    be = get_backend(device)
    model = model_for(kind).to(be)
    for layer in model.layers:
        if hasattr(layer, "running_var"):
            layer.sync_stats = comm.allreduce if sync else None
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    reducer = GradReducer(comm, model, bucket_bytes=1024) if shard else None
    step = TrainStep(model, opt, reducer=reducer)
    rng = np.random.default_rng(11)
    for _ in range(steps):
        x, y = rng.normal(0, 1, (16, 1, 8, 8)), rng.integers(0, 5, 16)
        if shard:
            x, y = x[RANK * 8:(RANK + 1) * 8], y[RANK * 8:(RANK + 1) * 8]
        step.step(be.asarray(x), be.labels(y))
    return [be.to_numpy(a) for _, a in model.named_arrays()]


def trained(kind: str, device: str, comm, sync: bool) -> float:
    """Relative difference of the model's arrays (parameters and BatchNorm statistics, all together: a Dense bias
    before a BatchNorm has a gradient of zero up to rounding) after training on two ranks and in one process at
    the whole batch."""
    mine = train(kind, device, comm, sync, shard=True)
    whole = train(kind, device, comm, sync=False, shard=False)
    return rel(np.concatenate([a.ravel() for a in mine]), np.concatenate([a.ravel() for a in whole]))


def main() -> None:
    comm = MPIComm(_Progress())
    out = {}
    for dev in ("reference", "cpu"):
        be = get_backend(dev)
        out[f"bn2d_{dev}"] = bn_ops(be, comm, (6, 3, 5, 4), fused=False)
        out[f"bn1d_{dev}"] = bn_ops(be, comm, (6, 5), fused=False)
        out[f"bn_relu_pool_{dev}"] = bn_ops(be, comm, (6, 3, 6, 4), fused=True)
        out[f"plain_{dev}"] = trained("plain", dev, comm, sync=False)
    out["sync_bn_cpu"] = trained("bn", "cpu", comm, sync=True)
    out["local_bn_cpu"] = trained("bn", "cpu", comm, sync=False)
    if RANK == 0:
        print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
