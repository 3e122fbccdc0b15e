"""Host cost of one fast training step vs its GPU time, and how the length of a timed block changes the measured
ms/step (a block of a few steps also pays the host latency of its first step).

    PYTHONPATH=src python benchmarks/kernels/host_overhead.py
"""
from __future__ import annotations

import statistics
import time

import numpy as np


def main():
    import cupy

    import hetnet as hn
    from hetnet import zoo
    from hetnet.bench.common import Clock
    from hetnet.optim import SGD
    from hetnet.train import make_train_step

    for name, batch in (("thesis-m1", 32), ("fashion-cnn", 32), ("fashion-cnn", 128)):
        hn.seed(0)
        model = zoo.build(name).to("cuda")
        be = model.backend
        step = make_train_step(model, SGD(model.parameters(), lr=0.01, momentum=0.9))
        rng = np.random.default_rng(0)
        x = be.asarray(rng.normal(size=(batch, *zoo.PRESETS[name].input_shape)).astype(np.float32))
        y = be.labels(rng.integers(0, 10, size=batch))
        for _ in range(30):
            step.step(x, y)
        cupy.cuda.runtime.deviceSynchronize()
        t0 = time.perf_counter()
        for _ in range(100):
            step.step(x, y)
        host = (time.perf_counter() - t0) / 100
        cupy.cuda.runtime.deviceSynchronize()
        out = {}
        for block in (1, 5, 50):
            clock = Clock("cupy", be, step.stream)      # CUDA events on the step's stream
            runs = [clock(lambda: step.step(x, y), block) * 1e3 for _ in range(7)]
            out[block] = statistics.median(runs)
        step.collect()
        print(f"{name:<12} b{batch:<4} host {host * 1e3:.3f} ms/step (no sync) | events, block of 1 / 5 / 50 steps: "
              f"{out[1]:.3f} / {out[5]:.3f} / {out[50]:.3f} ms/step", flush=True)


if __name__ == "__main__":
    main()
