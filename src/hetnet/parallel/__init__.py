"""Data-parallel training: one process per GPU (NCCL) or per CPU rank (MPI), each on its shard of every batch.

Every rank holds the whole model and trains on its slice of each global batch (the same seeded plan everywhere,
hetnet.parallel.shard); after the backward, the gradient is averaged over the ranks in buckets that start while
the backward is still running (hetnet.parallel.reducer, through the hook hetnet.plan.TrainStep offers), so N ranks
at batch B train like one process at batch N*B: equal up to floating-point order for a model without BatchNorm.
BatchNorm normalises each rank's batch by default; `--sync-bn` uses the statistics of all the ranks' batches
(the `reduce` argument of batchnorm_forward in hetnet.backends). Rank 0 alone writes the run directory (config,
metrics, checkpoints, plots, model files); checkpoints hold the global state, so `--resume` continues with the same
or another number of ranks (the global batch stays; each rank takes global / N). The epoch lines and progress bar
(global images per second) come from rank 0.

One host, one process per GPU, started by hetnet:

    hetnet train --gpus 8 --model cifar-wide --dataset cifar10 --batch-size 512       # 512 per GPU

CPUs, over MPI (pip install 'hetnet[mpi]', with Open MPI or MPICH installed):

    mpirun -n 2 hetnet train --device cpu --batch-size 64                              # = one process at 128

Two hosts, 8 GPUs each, with MPI (the NCCL id and the watchdog's address go through MPI):

    mpirun -n 16 -H node1:8,node2:8 -x PATH -x LD_LIBRARY_PATH \\
        hetnet train --model cifar-wide --dataset cifar10 --data /shared/cifar10 --out /shared/runs/wide16

Two hosts without MPI, torchrun-style variables (run the same command on each host; rank 0 listens on
MASTER_PORT, the others find it at MASTER_ADDR):

    # on node1 (10.0.0.1), for its GPUs 0..7:
    for i in 0 1 2 3 4 5 6 7; do
        RANK=$i LOCAL_RANK=$i WORLD_SIZE=16 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \\
            hetnet train --model cifar-wide --dataset cifar10 --data /shared/cifar10 --out /shared/runs/wide16 &
    done; wait
    # on node2: the same with RANK=$((8 + i))
    # or on each host K = 0, 1 (torchrun's agent keeps MASTER_PORT; hetnet's watchdog takes MASTER_PORT + 1):
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank K --master-addr 10.0.0.1 --master-port 29500 \
        --no-python hetnet train --model cifar-wide --dataset cifar10 --data /shared/cifar10 --out /shared/runs/wide16
    # with srun, SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are read, with MASTER_ADDR and MASTER_PORT exported

Data and (for --resume) the run directory must be at the same path on every host (a shared file system).

Faults: a rank that dies ends the job at once, one that hangs within `--dist-timeout` seconds (default 120; a
rank's own work between epochs, rank 0's checkpoints, is not timed), each with one `error:` line naming the rank
(hetnet.parallel.watchdog). The last checkpoint stays readable: it is written atomically by rank 0 after each epoch.
"""
from .dist import Dist, current, run, start
from .launch import launch
from .reducer import GradReducer, bucket_bounds
from .shard import ShardedLoader, shard_rows, train_batch_sizes
from .watchdog import DEFAULT_TIMEOUT_S, Heartbeat, Monitor

__all__ = ["DEFAULT_TIMEOUT_S", "Dist", "GradReducer", "Heartbeat", "Monitor", "ShardedLoader", "bucket_bounds",
           "current", "launch", "run", "shard_rows", "start", "train_batch_sizes"]
