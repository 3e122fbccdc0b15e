"""Per-layer table, as the thesis's: thesis-m4's conv, pool and dense layers at batch 32, forward and backward,
hetnet's kernels vs PyTorch's (cuDNN/cuBLAS on a GPU), with GFLOP/s or GB/s beside this machine's measured GEMM and
copy ceilings -> benchmarks/results/<card or host>/layers.json and layers.md.

    python benchmarks/layers.py                       # cpu (and cuda when a GPU is usable)
    python benchmarks/layers.py --devices cuda
"""
import sys

from models import threads_first

if __name__ == "__main__":
    threads_first(sys.argv[1:])
    from hetnet import bench

    sys.exit(bench.main(["--no-train-step", "--layers", *sys.argv[1:]]))
