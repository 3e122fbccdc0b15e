"""The CIFAR-10 peer run: airbench94 (PyPI airbench 0.1.8, unmodified) and hetnet's cifar-speed preset on the same
card, the same decoded images and the same held-out split, 5 runs each -> benchmarks/results/<card>/cifar_speedrun.json
(`hetnet bench --cifar-speedrun` with this script's defaults; hetnet.bench.speedrun says how each side is timed).

    python benchmarks/cifar_speedrun.py                                  # on a GPU machine, torch + torchvision + airbench
    python benchmarks/cifar_speedrun.py --cifar-tar PATH --runs 10
    python benchmarks/cifar_speedrun.py -- --devices cpu --speedrun-epochs 1 --speedrun-limit 500   # a CPU smoke run
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cifar-tar", default=None, help="the CIFAR-10 JPEG archive (default: ../shared/datasets/"
                                                      "cifar10-jpg-train.tar.gz or $HETNET_CIFAR_TAR)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each side (default 5)")
    ap.add_argument("--out", default=None, help="folder (default benchmarks/results/<card>)")
    args, rest = ap.parse_known_args(argv)
    return args, [a for a in rest if a != "--"]


def bench_argv(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The `hetnet bench` command line this script stands for."""
    return (["--cifar-speedrun", "--speedrun-runs", str(args.runs)]
            + (["--cifar-tar", args.cifar_tar] if args.cifar_tar else []) + (["--out", args.out] if args.out else [])
            + rest)


def main(argv: list[str] | None = None) -> int:
    from hetnet import bench

    return bench.main(bench_argv(*parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
