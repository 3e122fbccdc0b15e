"""This process's place in a data-parallel job: its rank, its transport and its watchdog (`Dist`), found from the
environment of whatever started it.

    >>> dist = start(device=None, timeout=120)    # None: a single process (no launcher in the environment)
    >>> dist.rank, dist.world, dist.device        # doctest: +SKIP
    (1, 4, 'cuda:1')

Launchers, in the order they are recognised:
- `hetnet train --gpus N` (HETNET_LAUNCHER=1 and the variables below, set by the launcher, which runs the watchdog);
- mpirun / srun with MPI (OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK, and mpi4py): ranks from MPI.COMM_WORLD,
  the local rank from a shared-memory split; rank 0 runs the watchdog and broadcasts its address (and on GPUs the
  NCCL unique id) through MPI;
- torchrun-style variables RANK, WORLD_SIZE, LOCAL_RANK (default: RANK), MASTER_ADDR, MASTER_PORT; or Slurm's
  SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID with MASTER_ADDR and MASTER_PORT: rank 0 runs the watchdog on
  MASTER_PORT (all interfaces), the others connect to MASTER_ADDR:MASTER_PORT and get the NCCL id from it.
On the GPU each rank uses cuda:LOCAL_RANK and NCCL; on the CPU the transport is MPI (mpirun is required).
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import traceback

import numpy as np

from .. import random as hrandom
from ..device import best_device, get_backend, parse_device
from ..errors import HetnetError, UsageError
from .comm import MPIComm, NcclComm, mpi_bcast_json, nccl_unique_id
from .reducer import GradReducer
from .shard import ShardedLoader
from .watchdog import DEFAULT_TIMEOUT_S, Heartbeat, Monitor, exit_now, store_get, store_set

_current = None

MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def current() -> Dist | None:
    """The Dist of this process (None: a single process)."""
    return _current


class Dist:
    """A rank of a data-parallel job (see the module docstring); made by start()."""

    def __init__(self, mode: str, rank: int, world: int, local_rank: int, hb: Heartbeat, monitor: Monitor | None):
        self.mode, self.rank, self.world, self.local_rank = mode, rank, world, local_rank
        self.hb, self.monitor = hb, monitor
        self.comm = None
        self.device = None
        self.sync_bn = False

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Dist(rank {self.rank} of {self.world}, {self.device}, {self.mode})"

    # -- collectives on the host side (each one a unit of progress for the watchdog)

    def sum(self, values) -> list[float]:
        """Numbers summed over the ranks (metrics)."""
        self.hb.tick += 1
        return [float(v) for v in self.comm.host_sum(values)]

    def average_arrays(self, backend, arrays) -> None:
        """Arrays of `backend` replaced by their mean over the ranks, in place (BatchNorm's running statistics:
        the checkpoint and the evaluation then see one global state)."""
        if not arrays:
            return
        host = [backend.to_numpy(a).astype(np.float64).ravel() for a in arrays]
        total = self.comm.host_sum(np.concatenate(host)) / self.world
        self.hb.tick += 1
        at = 0
        for a, h in zip(arrays, host):
            a[...] = backend.asarray(total[at:at + h.size].reshape(a.shape))
            at += h.size

    def broadcast_arrays(self, arrays) -> None:
        """Rank 0's values of these (contiguous) arrays on every rank."""
        self.hb.tick += 1
        for a in arrays:
            self.comm.broadcast(a)

    def barrier(self) -> None:
        self.hb.tick += 1
        self.comm.barrier()

    # -- training

    def prepare_model(self, model) -> None:
        """Start every rank from rank 0's parameters and BatchNorm statistics (as PyTorch DDP does), and make the
        BatchNorm layers synchronised when sync_bn is set (their statistics over every rank's batch)."""
        pack = model._pack
        self.broadcast_arrays(([pack.data] if pack is not None else [])
                              + [b for layer in model.layers for b in layer.buffers.values()])
        for layer in model.layers:
            if hasattr(layer, "running_var"):
                layer.sync_stats = self.comm.allreduce if self.sync_bn else None

    def reducer(self, model) -> GradReducer:
        """The gradient reduction of a training step of `model` (hetnet.plan.TrainStep's reducer); bfloat16 on
        the wire where the model computes in bf16."""
        bf16 = getattr(model.backend, "precision", "fp32") == "bf16"
        return GradReducer(self.comm, model, bf16=bf16, on_step=self.hb.step)

    def buffers_of(self, model, *shadows) -> list:
        """The arrays that differ between ranks after an epoch: BatchNorm's running statistics (each rank normalised
        its own batches), and their copies in a weight average or a lookahead (hetnet.train; None: none)."""
        live = [b for layer in model.layers for b in layer.buffers.values()]
        ids = {id(b) for b in live}
        return live + [copy for shadow in shadows if shadow is not None
                       for arr, copy in shadow.pairs if id(arr) in ids]

    def shard(self, loader, train: bool):
        return None if loader is None else ShardedLoader(loader, self.rank, self.world, train)

    def fork_random(self) -> None:
        """Give ranks other than 0 their own stream of hetnet's generator (dropout masks), derived from rank 0's
        state and the rank; rank 0 keeps its stream (the one a checkpoint saves)."""
        if self.rank:
            draw = int(hrandom.generator().integers(2**63))
            hrandom.seed(int(np.random.SeedSequence([draw, self.rank]).generate_state(1, np.uint64)[0]))

    @contextlib.contextmanager
    def solo(self):
        """Work only rank 0 does (files): the watchdog does not time it."""
        with self.hb.solo():
            yield

    # -- the end

    def fail(self, message: str, status: int) -> None:
        """Report this rank's failure to the watchdog, which prints one error line and ends the job; never
        returns."""
        self.hb.error(" ".join(message.split()), status)

    def close(self, interrupted: bool = False) -> None:
        """The end of this rank's work (interrupted: Ctrl-C)."""
        global _current
        self.hb.bye(interrupted)
        if self.monitor is not None:
            if interrupted:
                self.monitor.end(130)
            else:
                self.monitor.wait_for_goodbyes(self.monitor.timeout)
        self.hb.close()
        if self.monitor is not None:
            self.monitor.close()
        _current = None


def run(dist: Dist, fn) -> int:
    """fn() as this rank's work: errors go to the watchdog (one line for the whole job), Ctrl-C and the end are
    reported; returns fn's exit status."""
    try:
        status = int(fn() or 0)
    except HetnetError as e:
        dist.fail(str(e), 2)
    except KeyboardInterrupt:
        status = 130
    except BaseException as e:     # noqa: BLE001 - a bug: its traceback here, one line for the job
        traceback.print_exc()
        dist.fail(f"internal error: {type(e).__name__}: {e}", 1)
    dist.close(interrupted=status == 130)
    return status


# --- finding the job from the environment --------------------------------------------------------------------


def _env_int(name: str, default=None) -> int:
    v = os.environ.get(name, "")
    if not v.strip():
        if default is None:
            raise UsageError(f"{name} is not set (a data-parallel launch needs RANK, WORLD_SIZE, MASTER_ADDR and "
                             f"MASTER_PORT)")
        return int(default)
    try:
        return int(v)
    except ValueError:
        raise UsageError(f"{name}: expected an integer, got {v!r}") from None


def _detect() -> tuple | None:
    """(mode, rank, world, local_rank) from the environment, or None for a single process."""
    env = os.environ
    if env.get("HETNET_LAUNCHER") == "1":
        return "launcher", _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if any(k in env for k in MPI_MARKERS):
        return "mpi", None, None, None
    if "WORLD_SIZE" in env and "RANK" in env:
        rank = _env_int("RANK")
        return "env", rank, _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", rank)
    if _env_int("SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in env:
        return "env", _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID", 0)
    return None


def _master() -> tuple[str, int]:
    """(MASTER_ADDR, the watchdog's port): HETNET_WATCHDOG_PORT, else MASTER_PORT, or MASTER_PORT + 1 under
    torchrun (whose agent keeps MASTER_PORT for its own store)."""
    addr = os.environ.get("MASTER_ADDR", "").strip()
    if not addr:
        raise UsageError("MASTER_ADDR is not set (the host name or address of rank 0)")
    if os.environ.get("HETNET_WATCHDOG_PORT", "").strip():
        return addr, _env_int("HETNET_WATCHDOG_PORT")
    return addr, _env_int("MASTER_PORT") + (1 if "TORCHELASTIC_RUN_ID" in os.environ else 0)


def start(device: str | None, timeout: float = DEFAULT_TIMEOUT_S, sync_bn: bool = False) -> Dist | None:
    """Join the data-parallel job this process was started into (None when there is none): connect to the
    watchdog (running it on rank 0 when no launcher does), pick the device, make the transport, and meet every
    other rank once. Errors after the watchdog is reached end the whole job with one line."""
    global _current
    found = _detect()
    if found is None:
        return None
    mode, rank, world, local_rank = found
    mpi = None
    if mode == "mpi":
        mpi = _mpi_world()
        rank, world, local_rank = mpi.Get_rank(), mpi.Get_size(), _mpi_local(mpi)[0]
    if not (0 <= rank < world):
        raise UsageError(f"RANK {rank} is not in 0 .. WORLD_SIZE-1 = {world - 1}")
    monitor = None
    if mode == "launcher":
        addr = _master()
    elif rank == 0:
        port = 0 if mode == "mpi" else _master()[1]
        try:
            monitor = Monitor(world, timeout, on_abort=exit_now, host="", port=port)
        except OSError as e:
            raise UsageError(f"MASTER_PORT: rank 0 cannot listen on port {port} ({e.strerror or e})") from None
    if mode == "mpi":     # the others reach rank 0 by its host name
        addr = tuple(mpi_bcast_json(mpi, [socket.gethostname(), monitor.address[1]] if rank == 0 else None))
    elif mode == "env" and rank:
        addr = _master()
    if monitor is not None:
        addr = ("127.0.0.1", monitor.address[1])
    lost = ("the hetnet launcher went away; ending the job" if mode == "launcher"
            else "rank 0 died (its watchdog went away); ending the job")
    hb = Heartbeat(addr, rank, world, reporter=0 if mode == "launcher" else 1, lost_message=lost)
    if mode == "mpi":
        hb.catch_sigterm()
    dist = _current = Dist(mode, rank, world, local_rank, hb, monitor)
    dist.sync_bn = bool(sync_bn)
    try:
        _connect(dist, device, addr, mpi)
    except HetnetError as e:
        dist.fail(str(e), 2)
    except BaseException as e:      # noqa: BLE001 - a bug, or NCCL failing: one line for the whole job
        traceback.print_exc()
        dist.fail(f"could not set up the data-parallel job: {type(e).__name__}: {e}", 1)
    return dist


def _mpi_world():
    try:
        from mpi4py import MPI
    except ImportError:
        if any(os.environ.get(k, "0") != "0" for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
            exit_now(2)                # one line is enough: rank 0 says it
        raise UsageError("this process was started by mpirun/srun, but mpi4py is not installed: "
                         "pip install 'hetnet[mpi]' (with an MPI library such as Open MPI)") from None
    return MPI.COMM_WORLD


def _mpi_local(comm) -> tuple[int, int]:
    """(rank, number of ranks) among the ranks on this host."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return local.Get_rank(), local.Get_size()


def _connect(dist: Dist, device: str | None, addr, mpi) -> None:
    """Device, transport and a first collective (everyone is there; NCCL connects outside any capture)."""
    device = device or best_device()
    kind, index = parse_device(device)
    if kind == "cuda":
        if dist.world > 1 and ":" in device and index != dist.local_rank:
            raise UsageError(f"--device {device}: in a data-parallel job each process uses cuda:LOCAL_RANK; give "
                             f"--device cuda (or none)")
        dist.device = f"cuda:{dist.local_rank}"
        backend = get_backend(dist.device)
        if dist.rank == 0:
            uid = nccl_unique_id()
            if mpi is None:
                store_set(addr, "nccl_id", uid)
        if mpi is not None:
            uid = mpi_bcast_json(mpi, uid if dist.rank == 0 else None)
        elif dist.rank:
            uid = store_get(addr, "nccl_id")
        dist.comm = NcclComm(backend, dist.rank, dist.world, uid, dist.hb)
    else:
        if mpi is None:
            raise UsageError(f"--device {device}: data-parallel training on CPUs runs over MPI: start it with "
                             f"mpirun -n N hetnet train ... (pip install 'hetnet[mpi]')")
        dist.device = device
        if "HETNET_NUM_THREADS" not in os.environ:      # the cores of this host shared by its ranks
            local = _mpi_local(mpi)[1]
            cores = len(os.sched_getaffinity(0))
            get_backend("cpu").set_threads(max(1, cores // local if cores == os.cpu_count() else cores))
        dist.comm = MPIComm(dist.hb)
    dist.barrier()
    if dist.rank:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the process's life: one rank speaks, rank 0
