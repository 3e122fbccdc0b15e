"""The thesis's experiment redrawn: seconds per training epoch of thesis models 0-4 on 1000, 1000, 1000, 2000 and
2500 CIFAR-10 images resized to each model's input, for every backend here and PyTorch, beside the thesis's figures
-> benchmarks/results/<card or host>/thesis_epochs.json and thesis_epochs.md.

    python benchmarks/thesis_epochs.py --cifar-tar ../shared/datasets/cifar10-jpg-train.tar.gz
    python benchmarks/thesis_epochs.py --devices cuda

Without the CIFAR-10 JPEG archive it times random images of the same shapes and says so in the JSON.
"""
import sys

from models import threads_first

if __name__ == "__main__":
    threads_first(sys.argv[1:])
    from hetnet import bench

    sys.exit(bench.main(["--no-train-step", "--thesis-epochs", *sys.argv[1:]]))
