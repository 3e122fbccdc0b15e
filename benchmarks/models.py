"""Whole-model training step, hetnet vs PyTorch: `hetnet bench` with its default table (train_step.json / .md and
speedup.png in benchmarks/results/<card or host>/).

    python benchmarks/models.py                              # every model, batch 32/128/1024, every backend here
    python benchmarks/models.py --quick                      # 3 models, batch 32 and 128
    python benchmarks/models.py --devices cuda --tf32-row    # on a GPU machine
    python benchmarks/models.py --threads 1                  # one thread for both (BLAS and PyTorch)

Any `hetnet bench` flag works (`--help`).
"""
import os
import sys


def threads_first(argv: list[str]) -> None:
    """--threads N must reach the BLAS before NumPy is imported."""
    for i, a in enumerate(argv):
        if a.startswith("--threads="):
            value = a.split("=", 1)[1]
        elif a == "--threads" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        if value.isdigit():
            for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "HETNET_NUM_THREADS"):
                os.environ[var] = value


if __name__ == "__main__":
    threads_first(sys.argv[1:])
    from hetnet import bench

    sys.exit(bench.main(sys.argv[1:]))
