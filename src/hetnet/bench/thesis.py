"""The thesis's experiment redrawn: seconds per training epoch of thesis models 0-4 on 1000/1000/1000/2000/2500
CIFAR-10 images, hetnet's backends and PyTorch, beside the thesis's own figures -> thesis_epochs.json / .md."""
from __future__ import annotations

import copy
import functools
import gc
import io
import math
import os
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .. import interop, optim, zoo
from .. import seed as hn_seed
from ..device import get_backend
from .common import fmt, load_average, md_header, short_error, write_result, write_text
from .sides import TorchGraphStep, make_step

# the thesis's experiment: model, number of CIFAR-10 training images, and its own figures (seconds per epoch)
THESIS_EPOCHS = (("thesis-m0", 1000), ("thesis-m1", 1000), ("thesis-m2", 1000), ("thesis-m3", 2000),
                 ("thesis-m4", 2500))
THESIS_FIGURES = {
    "thesis-m0": {"sequential_s": 101.0, "openmp_8_threads_s": 12.76,
                  "machine": "Intel Xeon Silver 4214R (sequential; OpenMP with 8 threads)"},
}
THESIS_NOTE = ("The thesis timed model 0 at 101 s per epoch sequentially and 12.76 s with 8 OpenMP threads on a Xeon "
               "Silver 4214R; its CUDA and cuDNN runs were on an RTX 2080 Ti. Only these figures are recorded here.")
CIFAR_TAR = "cifar10-jpg-train.tar.gz"


def find_cifar_tar(explicit: str | None) -> Path | None:
    cands = [explicit] if explicit else []
    cands += [os.environ.get("HETNET_CIFAR_TAR"), f"../shared/datasets/{CIFAR_TAR}", f"shared/datasets/{CIFAR_TAR}",
              f"/work/shared/datasets/{CIFAR_TAR}"]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


@functools.lru_cache(maxsize=2)
def _cifar_bytes(tar_path: Path, per_class: int) -> dict[str, tuple[bytes, ...]]:
    """The encoded bytes of the first per_class images of each class, in the archive's order (one pass)."""

    found: dict[str, list[bytes]] = {}
    with tarfile.open(tar_path, "r:*") as tf:
        for m in tf:
            if not m.isfile() or not m.name.lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            parts = m.name.split("/")
            if len(parts) < 2:
                continue
            lst = found.setdefault(parts[-2], [])
            if len(lst) < per_class:
                lst.append(tf.extractfile(m).read())
            if len(found) >= 10 and all(len(v) >= per_class for v in found.values()):
                break
    return {k: tuple(v) for k, v in found.items()}


def cifar_subset(tar_path: Path, n: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n images, the first n/10 of each class in the archive's order (ROOT/<class>/<image>.jpg), interleaved by
    class and resized to size (bilinear), as uint8 NHWC, with int labels and the class names."""


    per_class = math.ceil(n / 10)
    found = _cifar_bytes(Path(tar_path), max(per_class, 250))  # one read serves every model
    classes = sorted(found)
    imgs, labels = [], []
    for i in range(per_class):
        for k, cls in enumerate(classes):
            if i < len(found[cls]) and len(imgs) < n:
                im = Image.open(io.BytesIO(found[cls][i])).convert("RGB")
                if im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                imgs.append(np.asarray(im, dtype=np.uint8))
                labels.append(k)
    return np.stack(imgs), np.array(labels, dtype=np.int64), classes


def thesis_data(model_name: str, n: int, tar: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Float32 NCHW images normalised per channel, labels, and where they came from."""
    shape = zoo.PRESETS[model_name].input_shape
    if tar is not None:
        try:
            imgs, labels, _ = cifar_subset(tar, n, shape[1:])
            x = imgs.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
            mean, std = x.mean(axis=(0, 2, 3), keepdims=True), x.std(axis=(0, 2, 3), keepdims=True) + 1e-6
            return np.ascontiguousarray((x - mean) / std, dtype=np.float32), labels, f"CIFAR-10 JPEG ({tar.name})"
        except Exception as e:
            src = f"random images: reading {tar} failed ({short_error(e)})"
    else:
        src = f"random images: {CIFAR_TAR} not found (pass --cifar-tar)"
    rng = np.random.default_rng(3)
    return rng.standard_normal((n,) + tuple(shape)).astype(np.float32), rng.integers(0, 10, n), src


def _epoch_sides(model_name: str, device: str, x: np.ndarray, y: np.ndarray, batch: int):
    """(name, run(n_steps or None) -> seconds, steps) for hetnet on `device` and its PyTorch peers."""
    import torch
    import torch.nn.functional as F


    lr = zoo.PRESETS[model_name].lr
    backend = get_backend(device)
    gpu = device.startswith("cuda")
    n = x.shape[0]
    bounds = [(i, min(n, i + batch)) for i in range(0, n, batch)]
    hn_seed(0)
    hm, _, _ = zoo.resolve(model_name)
    hm.to(backend).train()
    hx, hy = backend.asarray(x), backend.labels(y)
    st, _ = make_step(hm, optim.SGD(hm.parameters(), lr=lr))
    hb = [(hx[a:b], hy[a:b]) for a, b in bounds]

    def hetnet_epoch(limit=None):
        backend.synchronize()
        t0 = time.perf_counter()
        for xb, yb in hb[:limit]:
            st.step(xb, yb)
        st.collect()
        backend.synchronize()
        return time.perf_counter() - t0

    sides = [(f"hetnet {backend.name}", hetnet_epoch)]
    tdev = "cuda" if gpu else "cpu"
    tm = interop.to_torch(hm, device=tdev)
    topt = torch.optim.SGD(tm.parameters(), lr=lr)
    tx, ty = torch.from_numpy(x).to(tdev), torch.from_numpy(y).to(tdev)
    tb = [(tx[a:b], ty[a:b]) for a, b in bounds]
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def torch_epoch(limit=None):
        sync()
        t0 = time.perf_counter()
        for xb, yb in tb[:limit]:
            topt.zero_grad(set_to_none=True)
            F.cross_entropy(tm(xb), yb).backward()
            topt.step()
        sync()
        return time.perf_counter() - t0

    sides.append((f"torch {tdev}" + (" eager" if gpu else ""), torch_epoch))
    if gpu:
        gm = copy.deepcopy(tm)
        gopt = torch.optim.SGD(gm.parameters(), lr=lr)
        graphs = {}
        for xb, yb in tb:  # one graph per batch shape (the last batch may be short)
            if xb.shape[0] not in graphs:
                graphs[xb.shape[0]] = TorchGraphStep(gm, gopt, xb, yb, warmup=2)

        def graph_epoch(limit=None):
            sync()
            t0 = time.perf_counter()
            for xb, yb in tb[:limit]:
                g = graphs[xb.shape[0]]
                g.sx.copy_(xb)
                g.sy.copy_(yb)
                g.step()
            sync()
            return time.perf_counter() - t0

        sides.append(("torch cuda graph", graph_epoch))
    return sides, len(bounds)


def run_thesis_epochs(args, devices: list[str], env: dict, out: Path, deadline: float) -> dict:
    tar = find_cifar_tar(args.cifar_tar)
    rows, errors, sources = [], [], {}
    torch_cpu_done = set()
    for model_name, n in THESIS_EPOCHS:
        if model_name not in args.thesis_models:
            continue
        x, y, src = thesis_data(model_name, n, tar)
        sources[model_name] = src
        for device in devices:
            if time.monotonic() > deadline:
                errors.append(f"{model_name} on {device}: skipped, the run's time budget was spent")
                continue
            try:
                sides, steps = _epoch_sides(model_name, device, x, y, 32)
            except Exception as e:
                errors.append(f"{model_name} on {device}: {short_error(e)}")
                continue
            gpu = device.startswith("cuda")
            live = []  # (name, run, limit) after warm-up
            for name, run in sides:
                if name == "torch cpu" and model_name in torch_cpu_done:
                    continue  # the reference and cpu backends share one PyTorch CPU peer
                limit = None
                if name == "hetnet reference" and steps > args.reference_epoch_steps:
                    limit = args.reference_epoch_steps
                try:
                    if gpu:
                        run(None)  # warm-up: the first batch of each shape runs eagerly (and tunes), ...
                        run(None)  # ... the second is captured
                    else:
                        run(2)
                    live.append((name, run, limit))
                except Exception as e:
                    errors.append(f"{model_name} {name}: {short_error(e)}")
            # the sides take turns, epoch by epoch; GPU: median of 3, CPU: best of 2 (a shared machine's load
            # comes in bursts); the slow float64 reference: once, on its first steps
            times: dict[str, list[float]] = {name: [] for name, _, _ in live}
            for r in range(3 if gpu else 2):
                for name, run, limit in live:
                    if limit and r:
                        continue
                    try:
                        times[name].append(run(limit))
                    except Exception as e:
                        errors.append(f"{model_name} {name}: {short_error(e)}")
            for name, _, limit in live:
                if not times[name]:
                    continue
                secs = statistics.median(times[name]) if gpu else min(times[name])
                per_epoch = secs * steps / limit if limit else secs
                rows.append({"model": model_name, "images": n, "input_shape": list(x.shape[1:]), "side": name,
                             "batch_size": 32, "steps": steps, "seconds_per_epoch": round(per_epoch, 4),
                             "images_per_s": round(n / per_epoch, 1), "epochs_timed": len(times[name]),
                             "extrapolated_from_steps": limit})
                if name == "torch cpu":
                    torch_cpu_done.add(model_name)
                print(f"  {model_name} ({n} images) {name}: {per_epoch:.3f} s/epoch"
                      + (f" (from {limit} steps)" if limit else ""), flush=True)
            gc.collect()
    experiment = ("one training epoch at batch 32, plain SGD at the preset's learning rate, images already in memory "
                  "(on the device); the sides take turns epoch by epoch; CPU: the better of 2 epochs after a 2-step "
                  "warm-up; GPU: the median of 3 epochs after 2 warm-up epochs")
    doc = {"environment": env, "experiment": experiment,
           "data": sources, "thesis": THESIS_FIGURES, "thesis_note": THESIS_NOTE, "errors": errors, "rows": rows}
    doc["load_average_at_end"] = load_average()
    write_result(out / "thesis_epochs.json", doc)
    write_text(out / "thesis_epochs.md", thesis_markdown(doc))
    return doc


def thesis_markdown(doc: dict) -> str:
    sides = list(dict.fromkeys(r["side"] for r in doc["rows"]))
    lines = ["# The thesis's experiment: seconds per training epoch", ""] + md_header(doc["environment"])
    lines += [doc["experiment"] + ". " + doc["thesis_note"], "",
              "| model | images | input | " + " | ".join(sides) + " | thesis sequential | thesis OpenMP 8 thr |",
              "|---|---:|---|" + "---:|" * (len(sides) + 2)]
    for model_name, n in THESIS_EPOCHS:
        rs = {r["side"]: r for r in doc["rows"] if r["model"] == model_name}
        if not rs:
            continue
        shape = "x".join(map(str, next(iter(rs.values()))["input_shape"]))
        cells = []
        for s in sides:
            r = rs.get(s)
            cells.append("—" if r is None else f"{r['seconds_per_epoch']:.3f}"
                         + ("*" if r.get("extrapolated_from_steps") else ""))
        th = doc["thesis"].get(model_name, {})
        lines.append(f"| {model_name} | {n} | {shape} | " + " | ".join(cells) +
                     f" | {fmt(th.get('sequential_s'))} | {fmt(th.get('openmp_8_threads_s'))} |")
    sources = set(doc["data"].values())
    lines += ["", "Data: " + (next(iter(sources)) + ", every model" if len(sources) == 1
                              else "; ".join(f"{k}: {v}" for k, v in doc["data"].items()))]
    if any(r.get("extrapolated_from_steps") for r in doc["rows"]):
        lines.append("\n\\* extrapolated from the first steps of the epoch (the float64 reference backend is slow).")
    for e in doc.get("errors", []):
        lines.append(f"- {e}")
    return "\n".join(lines) + "\n"
