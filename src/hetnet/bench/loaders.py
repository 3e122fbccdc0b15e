"""Whole training epochs: where the batches come from, and what that costs -> loader_epochs.json / .md.

For each model and batch size, three timings on the same device in one run (Nesterov SGD as `hetnet train`'s
"momentum", the trainer's step object, hetnet.train.make_train_step):

  steps only     the training step replayed on one batch already on the device: the ceiling for an epoch
  host loader    hetnet.data.BatchLoader: batches gathered, augmented and normalised on the CPU by a background
                 thread, then copied to the device (backend.asarray) each step
  resident       hetnet.data.on_device(...): on a backend that keeps data sets on its device (cuda), the uint8 set is
                 copied there once and each batch is one gather/crop/flip/normalise kernel; elsewhere the row says
                 the backend has no resident path

Augmentation is crop (4 pixels) + flip on both loaders, which serve identical batches. The images are random uint8
of each model's input shape (timings do not depend on pixel values): 60,000 for Fashion-MNIST-shaped models, 50,000
otherwise (CIFAR-10's size), or --loader-images. Each loader runs one untimed epoch first (graph capture, algorithm
choice), then --epochs timed ones; the median is reported.

    hetnet bench --devices cuda --no-train-step --loader-epochs           # fashion-cnn, thesis-m1 at 128 and 1024
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from .. import optim
from .. import seed as hn_seed
from ..data import BatchLoader, channel_stats, normalize, on_device
from ..device import get_backend
from ..train import make_train_step
from .common import fmt, load_average, md_header, short_error, write_result, write_text
from .models import model_label, resolve_model

LOADER_ROWS = (("fashion-cnn", 128), ("fashion-cnn", 1024), ("thesis-m1", 128), ("thesis-m1", 1024))
AUGMENT = "crop:4,flip"


def _images(shape: tuple) -> int:
    return 60000 if tuple(shape) == (1, 28, 28) else 50000


def _epoch(step, loader, epoch: int, backend) -> tuple[float, int]:
    """(seconds, images) of one pass over loader.epoch(epoch): host batches copied with backend.asarray/labels, a
    resident loader's served as they are; one collect and one synchronize at the end, as the trainer does."""
    resident = getattr(loader, "on_device", False)
    backend.synchronize()
    t0 = time.perf_counter()
    for xb, yb in loader.epoch(epoch):
        if resident:
            step.step(xb, yb)
        else:
            step.step(backend.asarray(xb), backend.labels(yb))
    _, _, count = step.collect()
    backend.synchronize()
    return time.perf_counter() - t0, count


def bench_loader_epochs(model_name: str, batch: int, device: str, epochs: int, images: int | None = None) -> dict:

    backend = get_backend(device)
    _, shape = resolve_model(model_name)
    n = images or _images(shape)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, size=n)
    mean, std = channel_stats(x[:5000])
    row = {"model": model_label(model_name), "batch_size": batch, "hetnet_backend": backend.name, "images": n,
           "input_shape": list(shape), "augment": AUGMENT, "status": "ok", "reason": None}

    def fresh_step():
        hn_seed(0)
        model, _ = resolve_model(model_name)
        model.to(backend).train()
        return make_train_step(model, optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True))

    for name in ("host", "resident"):
        host = BatchLoader(x, y, batch, mean, std, augment=AUGMENT, seed=0, drop_last=True)
        loader = on_device(host, backend) if name == "resident" else host
        if name == "resident" and not getattr(loader, "on_device", False):
            row["resident_note"] = f"{backend.name} keeps no data set on its device"
            continue
        step = fresh_step()
        _epoch(step, loader, 0, backend)          # untimed: capture, algorithm choice
        runs = [_epoch(step, loader, e, backend) for e in range(1, epochs + 1)]
        secs = statistics.median(s for s, _ in runs)
        row[f"{name}_epoch_s"] = round(secs, 4)
        row[f"{name}_img_per_s"] = round(runs[0][1] / secs, 1)

    step = fresh_step()                           # steps only: one resident batch, replayed
    xb, yb = backend.asarray(normalize(x[:batch], mean, std)), backend.labels(y[:batch])
    steps = n // batch
    for _ in range(20):
        step.step(xb, yb)
    step.collect()
    secs = []
    for _ in range(epochs):
        backend.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step.step(xb, yb)
        step.collect()
        backend.synchronize()
        secs.append(time.perf_counter() - t0)
    row["steps_only_s"] = round(statistics.median(secs), 4)
    row["steps_only_img_per_s"] = round(steps * batch / statistics.median(secs), 1)
    for name in ("host", "resident"):
        if f"{name}_img_per_s" in row:
            row[f"{name}_vs_steps_only"] = round(row[f"{name}_img_per_s"] / row["steps_only_img_per_s"], 3)
    return row


def _share(row: dict, name: str) -> str:
    v = row.get(f"{name}_img_per_s")
    return "—" if v is None else f"{fmt(v, 0)} ({row[f'{name}_vs_steps_only']:.2f})"


def loader_markdown(doc: dict) -> str:
    lines = ["# Whole training epochs: host loader vs data set on the device", ""] + md_header(doc["environment"])
    lines += [doc["method"], "", "| model | batch | backend | steps only img/s | host loader img/s (share) | "
              "resident img/s (share) |", "|---|---:|---|---:|---:|---:|"]
    for r in doc["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['batch_size']} | {r.get('hetnet_backend')} | {r['status']}: "
                         f"{r['reason']} | | |")
            continue
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['hetnet_backend']} | "
                     f"{fmt(r['steps_only_img_per_s'], 0)} | {_share(r, 'host')} | {_share(r, 'resident')} |")
    for e in doc.get("errors", []):
        lines.append(f"- {e}")
    return "\n".join(lines) + "\n"


def run_loader_epochs(args, devices: list[str], env: dict, out: Path, rows_to_run) -> dict:
    rows = []
    for device in devices:
        if device == "reference":
            continue
        for model_name, batch in rows_to_run:
            try:
                row = bench_loader_epochs(model_name, batch, device, args.epochs, args.loader_images)
            except Exception as e:
                row = {"model": model_label(model_name), "batch_size": batch, "hetnet_backend": device,
                       "status": "error", "reason": short_error(e)}
            rows.append(row)
            if row["status"] == "ok":
                print(f"  {row['model']:<12} {batch:5d} {device}: steps only {row['steps_only_img_per_s']:9.0f} img/s, "
                      f"host loader {row['host_img_per_s']:9.0f}, resident {row.get('resident_img_per_s') or '—'}",
                      flush=True)
            else:
                print(f"  {row['model']:<12} {batch:5d} {device}: {row['status']}: {row['reason']}", flush=True)
    method = ("Per model and batch size, Nesterov SGD (lr 0.01, momentum 0.9) through the trainer's step object: "
              "'steps only' replays the step on one batch already on the device; 'host loader' is "
              "hetnet.data.BatchLoader (a background thread gathers, augments and normalises each batch, copied to "
              "the device per step); 'resident' is hetnet.data.on_device (the uint8 set copied to the device once, "
              "one kernel per batch). Augmentation crop 4 + flip; random uint8 images of the model's input shape; "
              "one untimed epoch per loader, then the median of the timed ones; the share is img/s over 'steps "
              "only'.")
    doc = {"environment": env, "method": method, "augment": AUGMENT,
           "epochs_timed": args.epochs, "errors": [], "rows": rows, "load_average_at_end": load_average()}
    write_result(out / "loader_epochs.json", doc)
    write_text(out / "loader_epochs.md", loader_markdown(doc))
    return doc
