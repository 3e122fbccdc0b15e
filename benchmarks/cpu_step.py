"""hetnet `cpu` backend vs PyTorch CPU: time of one SGD+momentum training step (forward, softmax cross-entropy,
backward, update) on the same model, weights, batch and thread count, measured in the same run with alternating
repetitions (median of many after warm-up). hetnet's step is the one `hetnet train` runs (the backend's step object,
hetnet.train.make_train_step: on the cpu backend Conv2D -> ReLU -> MaxPool2D(2) fused); the same step through the
public layer API (model.forward / model.backward, layer by layer) is timed beside it ("layer by layer").

    python benchmarks/cpu_step.py                 # all rows, threads = CPUs available
    python benchmarks/cpu_step.py --threads 1 --reps 20 --rows thesis-m1:32

Writes benchmarks/results/cpu/<hostname>.json (<hostname>-1thread.json with --threads 1) and prints a table. The CPUs
are shared: each row first waits (--quiet-wait) for the other processes to go idle and records how busy they were;
"pairs" is the median of per-repetition ratios (each hetnet step and its torch neighbour ran under the same load).
Before timing, one step on each side is checked to give the same loss and updated weights (dropout off for that
check, since torch draws its own masks).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

# the core-engine issue's three rows (its Fashion-MNIST CNN, two conv blocks, is benchmarks/specs/fashion-2conv.json),
# then the fashion-cnn preset that `hetnet train` uses by default (three conv blocks and dropout)
DEFAULT_ROWS = ("thesis-m1:32", "thesis-m1:128", "benchmarks/specs/fashion-2conv.json:128", "fashion-cnn:128")


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="MODEL:BATCH pairs (zoo presets or SPEC.json paths)")
    ap.add_argument("--threads", type=int, default=0, help="threads for both (default: CPUs available)")
    ap.add_argument("--reps", type=int, default=40, help="timed repetitions per side and row")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per side before timing")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/cpu/<hostname>.json, <hostname>-1thread.json for 1)")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="idle pause before each timed step (lets the other library's worker threads go to sleep)")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="seconds to wait, before each row, for the other processes to leave the CPUs idle")
    return ap.parse_args(argv)


ARGS = _parse_args()
THREADS = ARGS.threads or len(os.sched_getaffinity(0))
# BLAS and hetnet's own pool read these at import time, so set them before numpy is imported.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "HETNET_NUM_THREADS"):
    os.environ[var] = str(THREADS)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hetnet as hn  # noqa: E402
from hetnet import zoo  # noqa: E402
from hetnet.bench.common import cpu_model  # noqa: E402
from hetnet.interop import to_torch, torch_state  # noqa: E402
from hetnet.train import make_train_step  # noqa: E402

LR, MOMENTUM = 0.01, 0.9


def blas_info() -> str:
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return blas.get("openblas configuration", blas["name"])
    except Exception:
        return "unknown"


class Pair:
    """The same model, batch and optimiser in hetnet (cpu backend) and torch."""

    def __init__(self, model_name: str, batch: int):
        hn.seed(0)
        if model_name.endswith(".json") and not Path(model_name).exists():
            model_name = str(Path(__file__).resolve().parent.parent / model_name)   # relative to the repository
        self.model, shape, _ = zoo.resolve(model_name)
        self.model.to("cpu").train()
        self.tmodel = to_torch(self.model)
        self.tmodel.train()
        rng = np.random.default_rng(1)
        x = rng.standard_normal((batch,) + tuple(shape)).astype(np.float32)
        n_classes = self.model.output_shape(tuple(shape))[0]
        y = rng.integers(0, n_classes, batch)
        self.x, self.y = hn.get_backend("cpu").asarray(x), hn.get_backend("cpu").labels(y)
        self.tx, self.ty = torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))
        self.opt = hn.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        # the step `hetnet train` runs: the backend's step object (cpu: conv + ReLU + 2x2 pool fused)
        self.train_step = make_train_step(self.model, self.opt)
        self.topt = torch.optim.SGD(self.tmodel.parameters(), lr=LR, momentum=MOMENTUM)

    def step(self) -> float:
        """The trainer's step: zero_grad, forward, loss, backward, SGD update (and its loss / accuracy sums)."""
        self.train_step.step(self.x, self.y)
        loss_sum, _, count = self.train_step.collect()
        return loss_sum / count

    def layer_step(self) -> float:
        """The same step through the public layer API, layer by layer (model.forward / model.backward)."""
        logits = self.model.forward(self.x)
        loss, dlogits = hn.losses.softmax_cross_entropy(logits, self.y)
        self.model.backward(dlogits, need_dx=False)
        self.opt.step()
        self.opt.zero_grad()
        return loss

    def tstep(self) -> float:
        self.topt.zero_grad()
        loss = F.cross_entropy(self.tmodel(self.tx), self.ty)
        loss.backward()
        self.topt.step()
        return loss.item()

    def check(self) -> float:
        """One step on each side from equal weights, dropout off; returns the largest relative weight difference."""
        drops = [m for m in self.model.layers if type(m).__name__ == "Dropout"]
        tdrops = [m for m in self.tmodel if isinstance(m, torch.nn.Dropout)]
        saved = [m.p for m in drops]
        for m in drops + tdrops:
            m.p = 0.0
        try:
            l1, l2 = self.step(), self.tstep()
        finally:
            for m, p in zip(drops, saved):
                m.p = p
            for m, p in zip(tdrops, saved):
                m.p = p
        if abs(l1 - l2) > 1e-4 * max(1.0, abs(l2)):
            raise SystemExit(f"check failed: loss hetnet {l1} vs torch {l2}")
        ours, theirs = self.model.state_dict(), torch_state(self.tmodel)
        worst = 0.0
        for k, v in theirs.items():
            err = float(np.linalg.norm(ours[k] - v) / max(np.linalg.norm(v), 1e-30))
            worst = max(worst, err)
        if worst > 1e-4:
            raise SystemExit(f"check failed: weights differ after one step (relative {worst:.3g})")
        return worst


def _cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy (any process) over `interval` seconds, from /proc/stat; 0 where unavailable."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]   # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


QUIET_THRESHOLD = 0.1


def wait_quiet(limit_s: float, threshold: float = QUIET_THRESHOLD) -> float:
    """Wait (up to limit_s) until other processes use under `threshold` of the CPUs; returns the last reading."""
    deadline = time.monotonic() + limit_s
    busy = _cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(1.0)
        busy = _cpu_busy()
    return busy


def time_row(model_name: str, batch: int, reps: int, warmup: int) -> dict:
    pair = Pair(model_name, batch)
    busy_before = wait_quiet(ARGS.quiet_wait)
    load_before = os.getloadavg()[0]
    err = pair.check()
    for _ in range(warmup):
        pair.step()
        pair.tstep()
        pair.layer_step()
    ours, theirs, ours_cpu, theirs_cpu, layered = [], [], [], [], []
    for i in range(reps):
        order = (pair.step, pair.tstep) if i % 2 == 0 else (pair.tstep, pair.step)
        for fn in order + (pair.layer_step,):
            if ARGS.gap_ms:
                time.sleep(ARGS.gap_ms / 1e3)
            c0 = time.thread_time()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            dc = time.thread_time() - c0
            if fn == pair.layer_step:
                layered.append(dt)
                continue
            (ours if fn == pair.step else theirs).append(dt)
            (ours_cpu if fn == pair.step else theirs_cpu).append(dc)
    h, t = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    # each repetition's hetnet and torch steps ran back to back, under the same load: the median of their ratios
    pair_ratio = statistics.median(a / b for a, b in zip(ours, theirs))
    name = Path(model_name).stem if model_name.endswith(".json") else model_name
    row = {"model": name, "batch": batch, "hetnet_ms": round(h, 3), "torch_ms": round(t, 3),
           "ratio": round(h / t, 3), "hetnet_min_ms": round(min(ours) * 1e3, 3),
           "torch_min_ms": round(min(theirs) * 1e3, 3), "min_ratio": round(min(ours) / min(theirs), 3),
           "pair_median_ratio": round(pair_ratio, 3), "cpu_busy_before": round(busy_before, 3),
           # False: other processes kept the CPUs busy, the timings are not a fair comparison (torch's OpenMP
           # threads stall when a core is taken; hetnet's dynamically scheduled chunks much less)
           "idle_cpus": busy_before <= QUIET_THRESHOLD,
           "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "reps": reps,
           "check_rel_err": err,
           # model.forward / model.backward layer by layer (no fusion), timed after each pair
           "hetnet_layers_ms": round(statistics.median(layered) * 1e3, 3),
           "layers_ratio": round(statistics.median(layered) * 1e3 / t, 3)}
    if THREADS == 1:
        # both libraries then compute on this thread alone: its CPU time is the work done, whatever the load
        row.update(hetnet_cpu_ms=round(min(ours_cpu) * 1e3, 3), torch_cpu_ms=round(min(theirs_cpu) * 1e3, 3),
                   cpu_ratio=round(min(ours_cpu) / min(theirs_cpu), 3))
    return row


def main() -> None:
    torch.set_num_threads(THREADS)
    rows = []
    for spec in ARGS.rows:
        model_name, batch = spec.rsplit(":", 1)
        rows.append(time_row(model_name, int(batch), ARGS.reps, ARGS.warmup))
        r = rows[-1]
        print(f"{r['model']:<12} batch {r['batch']:>4}: hetnet {r['hetnet_ms']:8.2f} ms  torch {r['torch_ms']:8.2f} ms"
              f"  ratio {r['ratio']:.2f}  (pairs {r['pair_median_ratio']:.2f}, min {r['min_ratio']:.2f}, "
              f"busy before {r['cpu_busy_before']:.0%}, load {r['loadavg_1min']}; layer by layer {r['hetnet_layers_ms']:.2f} ms,"
              f" ratio {r['layers_ratio']:.2f})"
              + (f"  CPU-time ratio {r['cpu_ratio']:.2f}" if "cpu_ratio" in r else ""), flush=True)
    result = {
        "host": socket.gethostname(), "cpu": cpu_model(), "threads": THREADS, "python": platform.python_version(),
        "numpy": np.__version__, "torch": torch.__version__, "blas": blas_info(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "step": f"SGD lr={LR} momentum={MOMENTUM}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
    }
    print()
    print(f"| model | batch | hetnet ms/step | torch ms/step | ratio |   ({result['cpu']}, {THREADS} threads)")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        note = "" if r["idle_cpus"] else " (CPUs busy: not comparable)"
        print(f"| {r['model']} | {r['batch']} | {r['hetnet_ms']:.2f} | {r['torch_ms']:.2f} | {r['ratio']:.2f}{note} |")
    if not ARGS.no_save:
        stem = socket.gethostname() + ("-1thread" if THREADS == 1 else "")
        out = Path(ARGS.out) if ARGS.out else Path(__file__).resolve().parent / "results" / "cpu" / f"{stem}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
