"""Data-parallel scaling: training throughput of hetnet on 1, 2, 4, 8 GPUs (NCCL, `hetnet train --gpus N`'s code)
against PyTorch DDP (nccl backend) on the same model, precision, batch per GPU and machine; or on the CPU, hetnet
over MPI (`mpirun -n N`) against PyTorch DDP's gloo backend. A thin wrapper over hetnet's harness (hetnet.bench:
common.environment, write_result); import-safe without GPUs, CuPy, torch or MPI.

Each measurement is a job of N processes started the way users start them (hetnet: hetnet.parallel.launch, the
--gpus launcher, or mpirun; PyTorch: N processes with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, init_method
env://), each training on random data of its batch: warm-up steps (hetnet captures its CUDA graph there), then
BLOCKS blocks of about SECONDS each; a block's time is from a barrier to the last step's end on every rank (a
synchronisation, then a barrier); the median block gives img/s = N * batch * steps / seconds.

Rows of benchmarks/results/<card or host>/scaling.json:
    {"gpus", "model", "precision", "batch_per_gpu", "img_per_s", "efficiency", "torch_ddp_img_per_s", ...}
with efficiency = img/s at N / (N * img/s at 1) (torch_ddp_efficiency likewise); CPU rows have "gpus": null and
"processes": N.

    python benchmarks/scaling.py                                    # GPUs: cifar-wide and fashion-cnn, 1 2 4 8
    python benchmarks/scaling.py --gpus 1,2 --precisions fp32,bf16 --models cifar-wide
    python benchmarks/scaling.py --device cpu --gpus 1,2 --models fashion-cnn --batch 128     # MPI on the CPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

DEFAULT_MODELS = "cifar-wide,fashion-cnn"
DEFAULT_BATCH = {"cifar-wide": 512, "fashion-cnn": 512}      # per GPU (the target: cifar-wide at 512)
CPU_BATCH = 128
WARMUP_STEPS = 6
NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    ap.add_argument("--gpus", default="1,2,4,8", help="process counts (GPUs; on --device cpu: MPI processes); "
                                                      "counts above the GPUs present are skipped")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--precisions", default="fp32", help="fp32, tf32, bf16 (hetnet's side needs its precision "
                                                          "setting; a row without it records why)")
    ap.add_argument("--batch", type=int, default=None, help="batch per GPU / process (default: cifar-wide 512, "
                                                            f"fashion-cnn 512; {CPU_BATCH} on the CPU)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of a timed block")
    ap.add_argument("--blocks", type=int, default=3, help="timed blocks (the median counts)")
    ap.add_argument("--bucket-mb", type=float, default=None, help="hetnet's gradient bucket size (HETNET_BUCKET_MB)")
    ap.add_argument("--no-torch", action="store_true", help="hetnet only")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a job may take")
    ap.add_argument("--threads-per-process", type=int, default=None,
                    help="--device cpu: threads of each process, both sides (default: the cores / N, so every "
                         "N shares the same cores; 1: N processes on N cores, the efficiency of adding cores)")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="--device cpu: seconds to wait, before each "
                                                                      "job, for other processes to leave the CPUs")
    ap.add_argument("--out", default=None, help="folder (default benchmarks/results/<card or host>)")
    ap.add_argument("--worker", choices=("hetnet", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# --- workers: one per rank ---------------------------------------------------------------------------------------


def _blocks(step, sync, barrier, batch: int, world: int, seconds: float, blocks: int) -> dict:
    """Warm-up, then timed blocks of steps; img/s of the median block (every rank's images)."""
    for _ in range(WARMUP_STEPS):
        step()
    sync()
    barrier()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    per_step = max((time.perf_counter() - t0) / 3, 1e-6)
    steps = max(5, int(seconds / per_step))
    times = []
    for _ in range(blocks):
        barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        barrier()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"img_per_s": world * batch * steps / med, "steps_per_block": steps, "block_seconds": times}


def hetnet_worker(args) -> None:
    import numpy as np

    from hetnet import parallel
    from hetnet import random as hrandom
    from hetnet.backends.cpu import threads as cpu_threads
    from hetnet.bench.common import LR, MOMENTUM
    from hetnet.bench.models import resolve_model
    from hetnet.bench.sides import hetnet_to
    from hetnet.device import get_backend
    from hetnet.optim import SGD
    from hetnet.train import make_train_step

    dist = parallel.start("cpu" if args.device == "cpu" else None, timeout=args.timeout)

    def body():
        be = get_backend(dist.device)
        hrandom.seed(0)
        model, shape = resolve_model(args.model)
        note = hetnet_to(model, be, args.precision)
        if note is not None:
            out = {"error": note}
        else:
            dist.prepare_model(model)
            step = make_train_step(model, SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
                                   reducer=dist.reducer(model))
            rng = np.random.default_rng(dist.rank)
            x = be.asarray(rng.normal(0, 1, (args.batch, *shape)).astype(np.float32))
            y = be.labels(rng.integers(0, NUM_CLASSES, args.batch))
            out = _blocks(lambda: step.step(x, y), step.collect, dist.barrier, args.batch, dist.world,
                          args.seconds, args.blocks)
            out["threads_per_process"] = cpu_threads.threads() if args.device == "cpu" else None
        if dist.rank == 0:
            Path(args.result).write_text(json.dumps(out))
        return 0

    sys.exit(parallel.run(dist, body))


def torch_worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from hetnet import random as hrandom
    from hetnet.bench.common import LR, MOMENTUM
    from hetnet.bench.models import resolve_model
    from hetnet.bench.sides import autocast_for, for_precision, torch_precision
    from hetnet.interop import to_torch

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    gpu = args.device != "cpu"
    if gpu:
        torch.cuda.set_device(local)
        dev = f"cuda:{local}"
    else:
        dev = "cpu"
        torch.set_num_threads(int(os.environ.get("HETNET_NUM_THREADS") or
                                  max(1, len(os.sched_getaffinity(0)) // world)))
    tdist.init_process_group("nccl" if gpu else "gloo", init_method="env://", rank=rank, world_size=world)
    hrandom.seed(0)
    model, shape = resolve_model(args.model)
    torch_precision(args.precision)
    rng = np.random.default_rng(rank)
    tm = to_torch(model, dev)
    x = torch.tensor(rng.normal(0, 1, (args.batch, *shape)).astype(np.float32), device=dev)
    y = torch.tensor(rng.integers(0, NUM_CLASSES, args.batch), device=dev)
    tm, x = for_precision(tm, x, args.precision)
    ddp = DistributedDataParallel(tm, device_ids=[local] if gpu else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_for(args.precision, "cuda" if gpu else "cpu"):
            loss = loss_fn(ddp(x), y)
        loss.backward()
        opt.step()

    out = _blocks(step, torch.cuda.synchronize if gpu else (lambda: None), tdist.barrier, args.batch, world,
                  args.seconds, args.blocks)
    out["threads_per_process"] = None if gpu else torch.get_num_threads()
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))
    tdist.destroy_process_group()


# --- the parent: one job per (model, precision, N, side) -------------------------------------------------------


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_cmd(args, side: str, model: str, precision: str, batch: int, result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--model", model, "--precision",
            precision, "--batch", str(batch), "--device", args.device, "--seconds", str(args.seconds), "--blocks",
            str(args.blocks), "--timeout", str(args.timeout), "--result", str(result)]


def _run_job(args, side: str, n: int, model: str, precision: str, batch: int) -> dict:
    """One measurement: {"img_per_s": ...} or {"error": ...}."""
    from hetnet import parallel

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = _worker_cmd(args, side, model, precision, batch, result)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        if args.bucket_mb is not None:
            env["HETNET_BUCKET_MB"] = str(args.bucket_mb)
        if args.threads_per_process:
            env["HETNET_NUM_THREADS"] = str(args.threads_per_process)
        try:
            if side == "hetnet" and args.device == "cpu":
                mpirun = shutil.which("mpirun")
                if mpirun is None:
                    return {"error": "mpirun not found (apt-get install openmpi-bin; pip install 'hetnet[mpi]')"}
                root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
                # no binding: each rank takes its share of the cores in threads (hetnet.parallel.dist), as
                # PyTorch's side does with torch.set_num_threads
                status = subprocess.run([mpirun, "-n", str(n), "--oversubscribe", "--bind-to", "none", *root, *cmd],
                                        check=False, env=env, timeout=args.timeout).returncode
            elif side == "hetnet":
                status = parallel.launch([], n, timeout=min(args.timeout, parallel.DEFAULT_TIMEOUT_S), command=cmd,
                                         env=env)
            else:
                env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(n))
                procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(n)]
                deadline = time.monotonic() + args.timeout
                for p in procs:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                status = max(abs(p.returncode) for p in procs)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout:.0f} s"}
        if not result.exists():
            return {"error": f"the job ended with status {status} and no result"}
        return json.loads(result.read_text())


def _gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except (ImportError, RuntimeError):       # no CuPy, or no driver (CUDARuntimeError)
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "hetnet":
        hetnet_worker(args)
    if args.worker == "torch":
        torch_worker(args)
        return 0
    from hetnet.bench.common import environment, wait_quiet, write_result

    counts = sorted({int(v) for v in args.gpus.split(",") if v.strip()})
    gpu = args.device == "cuda"
    if gpu:
        present = _gpu_count()
        skipped = [n for n in counts if n > present]
        counts = [n for n in counts if n <= present]
        if skipped:
            print(f"note: {present} GPU(s) here: skipping {', '.join(map(str, skipped))}", file=sys.stderr)
        if not counts:
            print("error: no GPU to measure on (use --device cpu for MPI on the CPU)", file=sys.stderr)
            return 2
    env = environment(threads=os.cpu_count() or 1, want_gpu=gpu)
    machine = (env.get("card") or "").replace(" ", "-") if gpu else env["host"]
    out = Path(args.out) if args.out else HERE / "results" / (machine or env["host"])
    doc = {"environment": env, "benchmark": "scaling", "device": args.device, "method": __doc__.split("\n\n")[2],
           "rows": []}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        batch = args.batch or (DEFAULT_BATCH.get(model, 256) if gpu else CPU_BATCH)
        for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
            base = {}
            for n in counts:
                row = {"gpus": n if gpu else None, "processes": n, "device": args.device, "model": model,
                       "precision": precision, "batch_per_gpu": batch}
                for side in ("hetnet",) + (() if args.no_torch else ("torch",)):
                    if not gpu:         # the CPUs may be shared: say how busy they were
                        row[f"{side}_cpus_busy_before"] = round(wait_quiet(args.quiet_wait), 3)
                    got = _run_job(args, side, n, model, precision, batch)
                    key = "img_per_s" if side == "hetnet" else "torch_ddp_img_per_s"
                    row[key] = got.get("img_per_s")
                    row[f"{side}_detail"] = got
                    if n == 1 and row[key]:
                        base[side] = row[key]
                    eff = "efficiency" if side == "hetnet" else "torch_ddp_efficiency"
                    row[eff] = row[key] / (n * base[side]) if row[key] and base.get(side) else None
                row.setdefault("torch_ddp_img_per_s", None)
                doc["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("_detail")}), flush=True)
                out.mkdir(parents=True, exist_ok=True)
                write_result(out / "scaling.json", doc)
    print(f"wrote {out / 'scaling.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
