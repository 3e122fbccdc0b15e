"""A/B timing of the trainer's step across commits: the hetnet on sys.path (point PYTHONPATH at another checkout's
src/) builds a preset, and its training step (hetnet.train.make_train_step, SGD + momentum) is timed: on the GPU with
CUDA events, on the CPU with the host clock; 20 warm-up steps, then the median of 5 runs of --steps steps. Prints one
JSON line per (model, batch).

    PYTHONPATH=old/src python benchmarks/kernels/ab_step.py --tag before
    PYTHONPATH=src python benchmarks/kernels/ab_step.py --tag after

Only hetnet.train.make_train_step, hetnet.zoo, optim.SGD and backend.asarray/labels are used, which every version
since the step objects has.
"""
from __future__ import annotations

import argparse
import json
import statistics


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="")
    ap.add_argument("--models", default="thesis-m1,fashion-cnn")
    ap.add_argument("--batch-sizes", default="32,128,1024")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    import time

    import numpy as np

    import hetnet as hn
    from hetnet import train, zoo
    from hetnet.optim import SGD

    for name in args.models.split(","):
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            hn.seed(0)
            model = zoo.build(name).to(args.device)
            be = model.backend
            step = train.make_train_step(model, SGD(model.parameters(), lr=0.01, momentum=0.9))
            rng = np.random.default_rng(0)
            shape = zoo.PRESETS[name].input_shape
            x = be.asarray(rng.normal(size=(bs, *shape)).astype(np.float32))
            y = be.labels(rng.integers(0, 10, size=bs))
            for _ in range(20):
                step.step(x, y)
            step.collect()
            times = []
            for _ in range(5):
                if args.device.startswith("cuda"):
                    import cupy

                    s, e = cupy.cuda.Event(), cupy.cuda.Event()
                    s.record()
                    for _ in range(args.steps):
                        step.step(x, y)
                    e.record()
                    e.synchronize()
                    times.append(cupy.cuda.get_elapsed_time(s, e) / args.steps)
                else:
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        step.step(x, y)
                    times.append(1e3 * (time.perf_counter() - t0) / args.steps)
            loss, correct, count = step.collect()
            print(json.dumps({"tag": args.tag, "model": name, "batch": bs, "ms": round(statistics.median(times), 4),
                              "spread": [round(min(times), 4), round(max(times), 4)],
                              "loss": round(loss / max(count, 1), 4)}), flush=True)


if __name__ == "__main__":
    main()
