"""Whole training epochs on the cuda backend: where the batches come from, and what that costs.

For each model and batch size, three timings on the same card in one run (SGD+momentum, the fast graph step):

  steps only     the training step replayed on one batch already on the GPU: the ceiling for an epoch
  host loader    hetnet.data.BatchLoader: batches gathered, augmented and normalised on the CPU by a background
                 thread, then copied to the GPU (backend.asarray) each step
  resident       hetnet.data.ResidentLoader: the uint8 set copied to the GPU once; per batch one kernel gathers,
                 crops, flips and normalises (data.cu); per epoch one plan upload and one read of the metrics

Training augmentation is crop (4 pixels) + flip on both loaders, which serve identical batches
(tests/test_resident_loader.py, tests/test_cuda.py). The data are random uint8 images of each model's input shape
(timings do not depend on pixel values): 60,000 for fashion-cnn (the Fashion-MNIST training set's size), 50,000 for
thesis-m1 (CIFAR-10's). Each loader runs one untimed epoch first (graph capture, conv algorithm choice), then
`--epochs` timed ones; the median is reported.

    PYTHONPATH=src python benchmarks/gpu_epoch.py --out /tmp/gpu_epoch.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

DEFAULT_ROWS = ("fashion-cnn:128", "fashion-cnn:1024", "thesis-m1:128", "thesis-m1:1024")
SIZES = {"fashion-cnn": 60000, "thesis-m1": 50000}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="MODEL:BATCH pairs (zoo presets)")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (median reported)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    return ap.parse_args(argv)


def run_row(model_name: str, batch: int, epochs: int) -> dict:
    import cupy

    import hetnet as hn
    from hetnet import train as T
    from hetnet import zoo
    from hetnet.data import BatchLoader, channel_stats, on_device

    shape = tuple(zoo.PRESETS[model_name].input_shape)
    n = SIZES.get(model_name, 50000)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, size=n)
    mean, std = channel_stats(x[:5000])
    row = {"model": model_name, "batch_size": batch, "images": n, "input_shape": list(shape)}

    def fresh():
        hn.seed(0)
        model = zoo.build(model_name).to("cuda")
        opt = T.make_optimizer("momentum", model.parameters(), 0.01)
        return model, opt, T.Trainer(model, opt, progress=False, log=None)

    for name in ("host", "resident"):
        model, opt, trainer = fresh()
        host = BatchLoader(x, y, batch, mean, std, augment="crop:4,flip", seed=0, drop_last=True)
        loader = on_device(host, model.backend) if name == "resident" else host
        assert (name == "resident") == getattr(loader, "on_device", False)
        trainer.train_epoch(loader, 0)                 # untimed: capture, algorithm choice, plan compile
        secs = []
        for e in range(1, epochs + 1):
            _, _, s, count = trainer.train_epoch(loader, e)
            secs.append(s)
        row[f"{name}_epoch_s"] = statistics.median(secs)
        row[f"{name}_img_per_s"] = count / row[f"{name}_epoch_s"]

    # steps only: the same step object replayed on one resident batch
    model, opt, trainer = fresh()
    step = T.make_train_step(model, opt)
    be = model.backend
    xb, yb = be.asarray(normalize_like(x[:batch], mean, std)), be.labels(y[:batch])
    steps = n // batch
    for _ in range(20):
        step.step(xb, yb)
    step.collect()
    secs = []
    for _ in range(epochs):
        cupy.cuda.runtime.deviceSynchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step.step(xb, yb)
        step.collect()
        secs.append(time.perf_counter() - t0)
    row["steps_only_s"] = statistics.median(secs)
    row["steps_only_img_per_s"] = steps * batch / row["steps_only_s"]
    for name in ("host", "resident"):
        row[f"{name}_vs_steps_only"] = row[f"{name}_img_per_s"] / row["steps_only_img_per_s"]
    return row


def normalize_like(x, mean, std):
    from hetnet.data import normalize

    return normalize(x, mean, std)


def main(argv=None) -> int:
    args = parse_args(argv)
    from hetnet.backends.cuda import describe

    info = describe()
    rows = []
    for spec in args.rows:
        model, _, b = spec.partition(":")
        rows.append(run_row(model, int(b), args.epochs))
        r = rows[-1]
        print(f"{model:12s} {int(b):5d}  steps only {r['steps_only_img_per_s']:9.0f} img/s  "
              f"host loader {r['host_img_per_s']:9.0f} ({r['host_vs_steps_only']:.2f})  "
              f"resident {r['resident_img_per_s']:9.0f} ({r['resident_vs_steps_only']:.2f})", flush=True)
    out = {"gpu": info["devices"][0]["name"] if info.get("devices") else None, "cupy": info.get("cupy"),
           "cuda": info.get("cuda_runtime"), "python": platform.python_version(), "augment": "crop:4,flip",
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
