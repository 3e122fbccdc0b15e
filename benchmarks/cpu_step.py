"""hetnet `cpu` backend vs PyTorch CPU on the core-engine issue's rows: `hetnet bench --devices cpu` with this
script's defaults (thin wrapper over hetnet.bench, the one harness).

Rows: thesis-m1 at batch 32 and 128, the issue's two-conv Fashion-MNIST CNN (benchmarks/specs/fashion-2conv.json) at
128, and the fashion-cnn preset at 128. Each row waits for the other processes to leave the CPUs idle (the CPUs are
shared), is checked against PyTorch before timing, and times hetnet's trainer step, PyTorch's step and hetnet's
layer-by-layer step (model.forward / model.backward) in alternating blocks. Writes train_step.json / .md to
benchmarks/results/cpu/<hostname>[-1thread]/.

    python benchmarks/cpu_step.py                          # all rows, threads = CPUs available
    python benchmarks/cpu_step.py --threads 1 --rows thesis-m1:32
    python benchmarks/cpu_step.py --quiet-wait 0 -- --side-seconds 1      # after --: any `hetnet bench` flag
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

DEFAULT_ROWS = "thesis-m1:32,thesis-m1:128,fashion-2conv:128,fashion-cnn:128"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"MODEL:BATCH pairs (default {DEFAULT_ROWS})")
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: CPUs available)")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="seconds to wait, before each row, for the other processes to leave the CPUs idle")
    ap.add_argument("--out", default=None, help="folder (default benchmarks/results/cpu/<hostname>[-1thread])")
    args, rest = ap.parse_known_args(argv)
    return args, [a for a in rest if a != "--"]


def bench_argv(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The `hetnet bench` command line this script stands for."""
    out = args.out or str(Path(__file__).resolve().parent / "results" / "cpu"
                          / (socket.gethostname() + ("-1thread" if args.threads == 1 else "")))
    return (["--devices", "cpu", "--rows", args.rows, "--layer-by-layer", "--quiet-wait", str(args.quiet_wait),
             "--out", out] + (["--threads", str(args.threads)] if args.threads else []) + rest)


def main(argv: list[str] | None = None) -> int:
    from hetnet import bench

    return bench.main(bench_argv(*parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
