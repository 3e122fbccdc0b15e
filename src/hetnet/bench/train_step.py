"""The train-step table: one SGD+momentum step and one inference pass per model x batch x backend, hetnet vs
PyTorch, gated on agreement before it is timed -> train_step.json / .md and speedup.png."""
from __future__ import annotations

import copy
import gc
import json
import time
from pathlib import Path

import numpy as np

from .. import interop, optim, zoo
from ..device import get_backend
from .common import (
    LR,
    MOMENTUM,
    RTOL_F32,
    RTOL_TF32,
    Clock,
    CupyPoolPeak,
    RssPeak,
    TorchCudaPeak,
    TorchGraphStep,
    fmt,
    fmt_ms,
    hetnet_tf32,
    load_average,
    make_step,
    md_header,
    plan,
    rel_err,
    short_error,
    threads_text,
    time_sides,
    torch_flags,
)

MODELS = ("thesis-m0", "thesis-m1", "thesis-m2", "thesis-m3", "thesis-m4", "fashion-cnn", "mlp")
BATCHES = (32, 128, 1024)
QUICK_MODELS = ("thesis-m1", "fashion-cnn", "mlp")
QUICK_BATCHES = (32, 128)
# the float64 reference backend is an oracle, not a fast path: it is timed only at these (model, batch) pairs
REFERENCE_ROWS = ("thesis-m0:32", "mlp:32")
TF32_ROW = ("thesis-m1", 1024)
CHECK_IMAGES = 32        # the tight check's batch (see _Pair.check)
FULL_BATCH_RTOL = 1e-2   # the whole-batch check of the timed step's update


def _set_dropout(hmodel, tmodels, p_or_saved):
    """Set every dropout probability to p (a float), or restore saved values (a list); returns the old values."""
    import torch

    hd = [m for m in hmodel.layers if type(m).__name__ == "Dropout"]
    td = [[m for m in t.modules() if isinstance(m, torch.nn.Dropout)] for t in tmodels]
    old = [m.p for m in hd]
    new = p_or_saved if isinstance(p_or_saved, list) else [p_or_saved] * len(hd)
    for i, m in enumerate(hd):
        m.p = new[i]
        for t in td:
            t[i].p = new[i]
    return old


def _named_grads(model) -> dict:
    out = {}
    for i, layer in enumerate(model.layers):
        for k, p in layer.params.items():
            out[f"{i}.{k}"] = model.backend.to_numpy(p.grad)
    return out


def _named_weights(model) -> dict:
    out = {}
    for i, layer in enumerate(model.layers):
        for k, p in layer.params.items():
            out[f"{i}.{k}"] = np.array(model.backend.to_numpy(p.data), dtype=np.float64)
    return out


def _torch_weights(tmodel) -> dict:
    """Copies (a float64 CPU model's arrays would otherwise be views of its parameters)."""
    return {k: np.array(v) for k, v in interop.torch_state(tmodel).items()
            if not k.endswith(("running_mean", "running_var"))}


class _Pair:
    """The same model, weights, batch and SGD+momentum optimiser in hetnet (on `backend`) and PyTorch (on `tdev`),
    plus, on a GPU, a second PyTorch copy for the CUDA-graph side."""

    def __init__(self, model_name: str, batch: int, backend, tdev: str, data_seed: int, gpu: bool):
        import torch

        from .. import seed as hn_seed

        hn_seed(0)
        self.hmodel, shape, _ = zoo.resolve(model_name)
        self.hmodel.to(backend).train()
        self.backend = backend
        self.tmodel = interop.to_torch(self.hmodel, device=tdev)
        self.tmodel.train()
        rng = np.random.default_rng(data_seed)
        self.x = rng.standard_normal((batch,) + tuple(shape)).astype(np.float32)
        self.y = rng.integers(0, self.hmodel.output_shape(tuple(shape))[0], batch)
        self.hx, self.hy = backend.asarray(self.x), backend.labels(self.y)
        self.tx = torch.from_numpy(self.x).to(tdev)
        self.ty = torch.from_numpy(self.y.astype(np.int64)).to(tdev)
        self.hopt = optim.SGD(self.hmodel.parameters(), lr=LR, momentum=MOMENTUM)
        self.topt = torch.optim.SGD(self.tmodel.parameters(), lr=LR, momentum=MOMENTUM)
        self.hstep, self.path = make_step(self.hmodel, self.hopt)
        self.tgraph_model = copy.deepcopy(self.tmodel) if gpu else None

    def _float64(self):
        """A float64 PyTorch copy of the model (hetnet's weights as they are now) and its SGD+momentum optimiser."""
        import torch

        t64 = interop.to_torch(self.hmodel, device=self.tx.device.type, dtype=torch.float64)
        t64.train()
        return t64, torch.optim.SGD(t64.parameters(), lr=LR, momentum=MOMENTUM)

    def check(self, n: int | None = None, float64: bool = False) -> dict:
        """Relative errors of logits, loss, every gradient and the updates of two timed steps, on the first n images
        of the batch (all when None), dropout off; against PyTorch in float32, or (float64) in float64.

        A float32 forward may route a max-pool window whose two largest inputs differ in the 7th digit differently
        from PyTorch's (the two round to the same float32 on one side and not on the other); that moves the gradients
        upstream of it by ~1e-4-1e-3 without either side being wrong. Such near-ties grow with the batch, so the
        tight check runs on at most 32 images, and a failing one is repeated on a second batch, and that against
        PyTorch in float64, before the row is refused (bench_train_step)."""
        import torch.nn.functional as F

        hmodel, backend = self.hmodel, self.backend
        tmodel, topt = self._float64() if float64 else (self.tmodel, self.topt)
        hx, hy, tx, ty = (a[:n] for a in (self.hx, self.hy, self.tx, self.ty))
        tx = tx.double() if float64 else tx
        others = [tmodel] + ([self.tgraph_model] if self.tgraph_model is not None else [])
        saved = _set_dropout(hmodel, others, 0.0)
        try:
            hmodel.zero_grad()
            logits = hmodel.forward(hx)
            hloss, dlogits = backend.softmax_cross_entropy(logits, hy, 0.0)
            hmodel.backward(dlogits, need_dx=False)
            topt.zero_grad(set_to_none=True)
            tlogits = tmodel(tx)
            tloss = F.cross_entropy(tlogits, ty)
            tloss.backward()
            errs = {"logits": rel_err(backend.to_numpy(logits), tlogits.detach().cpu().numpy()),
                    "loss": abs(float(hloss) - tloss.item()) / max(abs(tloss.item()), 1e-30)}
            tg = interop.torch_grads(tmodel)
            for k, g in _named_grads(hmodel).items():
                errs[f"grad {k}"] = rel_err(g, tg[k])
            hmodel.zero_grad()
            topt.zero_grad(set_to_none=True)
            errs.update(self.check_updates(hx, hy, tx, ty, tmodel=tmodel, topt=topt))
        finally:
            _set_dropout(hmodel, others, saved)
        return errs

    def check_updates(self, hx, hy, tx, ty, prefix: str = "", tmodel=None, topt=None) -> dict:
        """Relative errors of the updates two timed steps make (from hetnet's weights on both sides): on the
        optimiser's first steps the plain SGD update, then one with momentum; a fast path that runs a batch shape
        eagerly first and replays a captured CUDA graph after is checked both ways. PyTorch's side: the pair's
        float32 model and optimiser unless others are given."""
        import torch.nn.functional as F

        tmodel, topt = (tmodel, topt) if tmodel is not None else (self.tmodel, self.topt)
        errs = {}
        for s in (1, 2):
            interop.copy_weights_to_torch(self.hmodel, tmodel)
            w0, tw0 = _named_weights(self.hmodel), _torch_weights(tmodel)
            self.hstep.step(hx, hy)
            self.hstep.collect()
            self.backend.synchronize()
            topt.zero_grad(set_to_none=True)
            F.cross_entropy(tmodel(tx), ty).backward()
            topt.step()
            w1, tw1 = _named_weights(self.hmodel), _torch_weights(tmodel)
            for k in w0:
                errs[f"{prefix}step {s} update {k}"] = rel_err(w1[k] - w0[k], tw1[k] - tw0[k])
        return errs

    def check_full_batch(self) -> dict:
        """The updates of two timed steps on the whole timed batch (dropout off)."""
        others = [self.tmodel] + ([self.tgraph_model] if self.tgraph_model is not None else [])
        saved = _set_dropout(self.hmodel, others, 0.0)
        try:
            return self.check_updates(self.hx, self.hy, self.tx, self.ty, "full batch ")
        finally:
            _set_dropout(self.hmodel, others, saved)


def bench_train_step(model_name: str, batch: int, device: str, args, tf32: bool = False) -> dict:
    """One row of train_step.json. Raises nothing a caller must handle except programming errors in hetnet."""
    import torch
    import torch.nn.functional as F

    backend = get_backend(device)
    gpu = device.startswith("cuda")
    tdev = "cuda" if gpu else "cpu"
    row = {"model": model_name, "batch_size": batch, "hetnet_backend": backend.name, "torch_device": tdev,
           "tf32": tf32, "status": "ok", "reason": None}
    if gpu:
        torch_flags(tf32)
        row["hetnet_tf32"] = hetnet_tf32(backend, tf32)
        row["torch_tf32"] = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                             "cudnn": bool(torch.backends.cudnn.allow_tf32),
                             "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}
    tol = RTOL_TF32 if (gpu or tf32) else RTOL_F32
    row["check_tolerance"] = tol

    # the gate: tight on <= 32 images (a second batch when the first fails, see _Pair.check); when both fail, the
    # second batch against PyTorch in float64, the exact result rounded once: a max-pool near-tie that PyTorch's
    # float32 routes away from it is PyTorch's rounding, not hetnet's error (the row records both). Then the timed
    # step's updates on the whole batch at a tolerance float32 max-pool near-ties cannot reach.
    n_check = min(batch, CHECK_IMAGES)
    first = None
    for data_seed in (1, 2):
        pair = _Pair(model_name, batch, backend, tdev, data_seed, gpu)
        errs = pair.check(n_check)
        worst = max(errs, key=errs.get)
        if errs[worst] <= tol:
            break
        first = first or {"data_seed": data_seed, "worst": worst, "rel_err": float(f"{errs[worst]:.3g}")}
    if not errs[worst] <= tol:
        pair = _Pair(model_name, batch, backend, tdev, data_seed, gpu)   # the last batch afresh: no momentum yet
        e64 = pair.check(n_check, float64=True)
        w64 = max(e64, key=e64.get)
        row["check_float64"] = {"data_seed": data_seed,
                                "against_float32": {"worst": worst, "rel_err": float(f"{errs[worst]:.3g}")},
                                "worst": w64, "rel_err": float(f"{e64[w64]:.3g}")}
        if e64[w64] <= tol:
            errs, worst = e64, w64
    row["check_images"] = n_check
    row["check_max_rel_err"] = float(f"{errs[worst]:.3g}")
    row["check_worst"] = worst
    row["hetnet_path"] = pair.path
    if first:
        row["check_first_batch_failed"] = first
    if not errs[worst] <= tol:
        row["status"] = "refused"
        row["reason"] = (f"hetnet and PyTorch disagree before timing, on two different batches and in float64: "
                         f"{worst} relative error {errs[worst]:.3g} > {tol:g}")
        return row
    if batch > n_check:
        full = pair.check_full_batch()
        fworst = max(full, key=full.get)
        row["check_full_batch_max_rel_err"] = float(f"{full[fworst]:.3g}")
        row["check_full_batch_tolerance"] = FULL_BATCH_RTOL
        if not full[fworst] <= FULL_BATCH_RTOL:
            row["status"] = "refused"
            row["reason"] = (f"the timed step's update on the whole batch disagrees with PyTorch's: {fworst} "
                             f"relative error {full[fworst]:.3g} > {FULL_BATCH_RTOL:g}")
            return row
    hmodel, tmodel, tgraph_model = pair.hmodel, pair.tmodel, pair.tgraph_model
    hx, hy, tx, ty, x, y = pair.hx, pair.hy, pair.tx, pair.ty, pair.x, pair.y
    hstep, topt = pair.hstep, pair.topt

    def hetnet_train():
        hstep.step(hx, hy)

    def torch_train():
        topt.zero_grad(set_to_none=True)
        F.cross_entropy(tmodel(tx), ty).backward()
        topt.step()

    def hetnet_infer():
        hmodel.forward(hx)

    def torch_infer():
        with torch.inference_mode():
            tmodel(tx)

    hclock = Clock("cupy", backend, getattr(hstep, "stream", None)) if gpu else Clock("cpu", backend)
    iclock = Clock("cupy", backend) if gpu else hclock
    tclock = Clock("torch") if gpu else Clock("cpu")
    sides = {"hetnet": (hetnet_train, hclock), "torch_eager": (torch_train, tclock)}

    if gpu:
        try:
            gopt = torch.optim.SGD(tgraph_model.parameters(), lr=LR, momentum=MOMENTUM)
            with TorchCudaPeak() as gm:
                tgraph = TorchGraphStep(tgraph_model, gopt, tx, ty)
                tgraph.step()
            row["torch_graph_peak_mib"] = gm.mib
            sides["torch_graph"] = (tgraph.step, tclock)
        except Exception as e:  # a capture that fails is recorded, the rest of the row still runs
            row["torch_graph_error"] = short_error(e)

    # warm-up (also gives the per-step estimate that sets the number of repetitions)
    est = 0.0
    for fn, clock in sides.values():
        for _ in range(max(0, args.warmup - 1)):
            fn()
        est = max(est, clock(fn, 1))
    reps, inner = plan(est, gpu, args.repeats, args.side_seconds, args.block_ms)
    med = time_sides(sides, reps, inner, settle=not gpu and est < 0.25)
    row["repeats"], row["steps_per_repeat"] = reps, inner

    # inference (eval mode; PyTorch under inference_mode): a backend's own evaluation step when it has one (the
    # trainer's path: on the GPU a captured graph, with loss and accuracy accumulated on the device), else forward
    hmodel.eval()
    tmodel.eval()
    try:
        infer = hetnet_infer
        factory = getattr(backend, "make_eval_step", None)
        row["hetnet_infer_path"] = "forward" if factory is None else "backend.make_eval_step"
        if factory is not None:
            ev = factory(hmodel)

            def infer():
                ev.step(hx, hy)

            iclock = Clock("cupy", backend, getattr(ev, "stream", None)) if gpu else iclock
        isides = {"hetnet": (infer, iclock), "torch": (torch_infer, tclock)}
        for fn, _ in isides.values():
            for _ in range(max(2, args.warmup - 1)):  # a fast path's first call of a shape tunes, the second captures
                fn()
        iest = max(clock(fn, 1) for fn, clock in isides.values())
        ireps, iinner = plan(iest, gpu, args.repeats, args.side_seconds / 2, args.block_ms)
        imed = time_sides(isides, ireps, iinner, settle=not gpu and iest < 0.25)
    finally:
        hmodel.train()
        tmodel.train()

    if hclock.fallbacks or iclock.fallbacks:
        row["hetnet_timer"] = "wall clock (CuPy events were not on the backend's stream)"

    # peak memory, each side on its own fresh model; ratio > 1: hetnet needs less
    row.update(_peak_memory(model_name, backend, x, y, tdev, gpu))
    for kind in ("peak", "reserved"):
        h, t = row.get(f"hetnet_{kind}_mib"), row.get(f"torch_{kind}_mib")
        if h and t:
            row[f"{kind}_memory_ratio"] = round(t / h, 3)

    def ms(s):
        return round(s * 1e3, 4)

    def ips(s):
        return round(batch / s, 1)

    row.update({"hetnet_ms_per_step": ms(med["hetnet"]), "hetnet_img_per_s": ips(med["hetnet"]),
                "torch_eager_ms_per_step": ms(med["torch_eager"]), "torch_eager_img_per_s": ips(med["torch_eager"]),
                "torch_graph_ms_per_step": ms(med["torch_graph"]) if "torch_graph" in med else None,
                "torch_graph_img_per_s": ips(med["torch_graph"]) if "torch_graph" in med else None,
                "hetnet_infer_img_per_s": ips(imed["hetnet"]), "torch_infer_img_per_s": ips(imed["torch"]),
                "speedup_vs_torch_eager": round(med["torch_eager"] / med["hetnet"], 3)})
    row["speedup_vs_torch_graph"] = (round(med["torch_graph"] / med["hetnet"], 3) if "torch_graph" in med else None)
    return row


def _peak_memory(model_name, backend, x, y, tdev, gpu) -> dict:
    """hetnet_peak_mib / torch_peak_mib (and on the GPU hetnet_reserved_mib / torch_reserved_mib): a fresh model
    per side, its first training steps and evaluation passes, each side on the path it is timed on (hetnet: the
    trainer's train and eval step objects; PyTorch: eager, inference_mode). Peak = the high-water mark of bytes
    allocated and live (torch.cuda.max_memory_allocated; hetnet: CuPy's default pool plus the private step pool);
    reserved = of bytes the allocators hold, cached blocks included (the memory CUDA graphs keep is held).
    Algorithm measurement is left out on both sides (see method_text)."""
    import torch
    import torch.nn.functional as F

    from .. import seed as hn_seed

    out = {"hetnet_peak_mib": None, "torch_peak_mib": None}
    passes = 2 if gpu else 1      # on the GPU the second step is the captured graph's first replay
    try:
        with (CupyPoolPeak(backend) if gpu else RssPeak()) as m:
            hn_seed(0)
            hm, _, _ = zoo.resolve(model_name)
            hm.to(backend).train()
            hx, hy = backend.asarray(x), backend.labels(y)
            st, _ = make_step(hm, optim.SGD(hm.parameters(), lr=LR, momentum=MOMENTUM))
            for _ in range(passes):
                st.step(hx, hy)
            st.collect()
            hm.eval()
            factory = getattr(backend, "make_eval_step", None)
            if factory is None:
                hm.forward(hx)
            else:
                ev = factory(hm)
                for _ in range(passes):
                    ev.step(hx, hy)
                ev.collect()
            backend.synchronize()
        out["hetnet_peak_mib"] = m.mib
        if gpu:
            out["hetnet_reserved_mib"] = m.reserved_mib
        del hm, st, hx, hy
        with (TorchCudaPeak() if gpu else RssPeak()) as m:
            hn_seed(0)
            tm = interop.to_torch(zoo.resolve(model_name)[0], device=tdev)
            tx, ty = torch.from_numpy(x).to(tdev), torch.from_numpy(y.astype(np.int64)).to(tdev)
            to = torch.optim.SGD(tm.parameters(), lr=LR, momentum=MOMENTUM)
            for _ in range(passes):
                to.zero_grad(set_to_none=True)
                F.cross_entropy(tm(tx), ty).backward()
                to.step()
            with torch.inference_mode():
                tm.eval()
                for _ in range(passes):
                    tm(tx)
        out["torch_peak_mib"] = m.mib
        if gpu:
            out["torch_reserved_mib"] = m.reserved_mib
    except Exception:
        pass
    return out


def targets(rows: list[dict]) -> list[dict]:
    """The issues' performance targets, judged on the rows measured (a target with no rows is left out)."""
    ok = [r for r in rows if r.get("status") == "ok" and not r.get("tf32")]
    gpu = [r for r in ok if r["hetnet_backend"].startswith("cuda") and r["model"] in ("thesis-m1", "fashion-cnn")]
    checks = [
        ("GPU: hetnet >= 2x PyTorch eager at batch <= 128 (thesis-m1, fashion-cnn)",
         [r for r in gpu if r["batch_size"] <= 128], "speedup_vs_torch_eager", 2.0),
        ("GPU: hetnet >= 1x PyTorch CUDA graph at every batch size (thesis-m1, fashion-cnn)",
         [r for r in gpu if r.get("speedup_vs_torch_graph")], "speedup_vs_torch_graph", 1.0),
        ("CPU: hetnet cpu step time <= PyTorch CPU's", [r for r in ok if r["hetnet_backend"] == "cpu"],
         "speedup_vs_torch_eager", 1.0),
        ("GPU: hetnet peak memory allocated <= PyTorch eager's (thesis-m1, fashion-cnn; torch/hetnet)",
         [r for r in gpu if r.get("peak_memory_ratio")], "peak_memory_ratio", 1.0),
        ("GPU, indicative: hetnet memory reserved <= PyTorch eager's (thesis-m1, fashion-cnn; torch/hetnet; "
         "PyTorch's rise is a lower bound: it can reuse segments held for live tensors)",
         [r for r in gpu if r.get("reserved_memory_ratio")], "reserved_memory_ratio", 1.0),
    ]
    out = []
    for text, sel, key, need in checks:
        if sel:
            missed = [f"{r['model']}@{r['batch_size']}: {r[key]:.2f}x" for r in sel if r[key] < need]
            out.append({"target": text, "rows": len(sel), "met": not missed, "missed": missed})
    return out


def train_step_markdown(doc: dict) -> str:
    lines = ["# One training step: hetnet vs PyTorch", ""] + md_header(doc["environment"])
    lines += [doc["method"], "",
              "| model | batch | hetnet backend | hetnet ms/step | torch eager ms/step | torch graph ms/step | "
              "speed-up vs eager | vs graph | hetnet img/s | hetnet infer img/s | torch infer img/s | "
              "hetnet peak MiB | torch peak MiB | check rel. err |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    bad = []
    for r in doc["rows"]:
        if r.get("status") != "ok":
            bad.append(r)
            continue
        name = r["model"] + (" (TF32)" if r.get("tf32") else "")
        lines.append(f"| {name} | {r['batch_size']} | {r['hetnet_backend']} | {fmt_ms(r['hetnet_ms_per_step'])} | "
                     f"{fmt_ms(r['torch_eager_ms_per_step'])} | {fmt_ms(r.get('torch_graph_ms_per_step'))} | "
                     f"{fmt(r['speedup_vs_torch_eager'])}x | "
                     f"{fmt(r.get('speedup_vs_torch_graph')) + 'x' if r.get('speedup_vs_torch_graph') else '—'} | "
                     f"{fmt(r['hetnet_img_per_s'], 0)} | {fmt(r['hetnet_infer_img_per_s'], 0)} | "
                     f"{fmt(r['torch_infer_img_per_s'], 0)} | {fmt(r.get('hetnet_peak_mib'), 1)} | "
                     f"{fmt(r.get('torch_peak_mib'), 1)} | {r['check_max_rel_err']:.1e} |")
    retried = [r for r in doc["rows"] if r.get("status") == "ok" and r.get("check_first_batch_failed")
               and not r.get("check_float64")]
    if retried:
        lines += ["", "Checked on a second batch (the first one's check failed; see `check_first_batch_failed`, and "
                  "the method: a float32 max-pool near-tie can route a gradient differently from PyTorch):", ""]
        lines += [f"- {r['model']} batch {r['batch_size']} on {r['hetnet_backend']}: first batch "
                  f"{r['check_first_batch_failed']['worst']} {r['check_first_batch_failed']['rel_err']:.2g}"
                  for r in retried]
    judged = [r for r in doc["rows"] if r.get("status") == "ok" and r.get("check_float64")]
    if judged:
        lines += ["", "Checked against PyTorch in float64 (both batches' float32 checks failed; hetnet agrees with the "
                  "float64 result within the tolerance, as when PyTorch's float32 rounds a max-pool near-tie the "
                  "other way; see `check_float64`):", ""]
        lines += [f"- {r['model']} batch {r['batch_size']} on {r['hetnet_backend']}: float32 "
                  f"{r['check_float64']['against_float32']['worst']} "
                  f"{r['check_float64']['against_float32']['rel_err']:.2g}; float64 "
                  f"{r['check_float64']['worst']} {r['check_float64']['rel_err']:.2g}" for r in judged]
    if doc.get("targets"):
        lines += ["", "Targets:", ""]
        lines += [f"- {t['target']}: {'met' if t['met'] else 'not met'}, {t['rows'] - len(t['missed'])} of "
                  f"{t['rows']} rows reach it" + (f" (short: {', '.join(t['missed'])})" if t["missed"] else "")
                  for t in doc["targets"]]
    if bad:
        lines += ["", "Rows not timed:", ""]
        lines += [f"- {r['model']} batch {r['batch_size']} on {r['hetnet_backend']}: {r['status']}: {r['reason']}"
                  for r in bad]
    for e in doc.get("errors", []):
        lines.append(f"- {e}")
    return "\n".join(lines) + "\n"


def speedup_chart(rows: list[dict], path: Path, title: str) -> bool:
    """Bars of PyTorch time / hetnet time per model, one bar per batch size; one panel per (backend, baseline)."""
    ok = [r for r in rows if r.get("status") == "ok" and not r.get("tf32")]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for be in dict.fromkeys(r["hetnet_backend"] for r in ok):
        for key, label in (("speedup_vs_torch_eager", "PyTorch eager"), ("speedup_vs_torch_graph",
                                                                          "PyTorch CUDA graph")):
            if any(r.get(key) for r in ok if r["hetnet_backend"] == be):
                panels.append((be, key, label))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, (be, key, label) in zip(axes[:, 0], panels, strict=True):
        sel = [r for r in ok if r["hetnet_backend"] == be and r.get(key)]
        models = list(dict.fromkeys(r["model"] for r in sel))
        batches = sorted({r["batch_size"] for r in sel})
        width = 0.8 / max(1, len(batches))
        for j, b in enumerate(batches):
            vals = [next((r[key] for r in sel if r["model"] == m and r["batch_size"] == b), 0.0) for m in models]
            xs = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(models))]
            bars = ax.bar(xs, vals, width, label=f"batch {b}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(models)), models, fontsize=8)
        ax.set_ylabel("speed-up (x)")
        ax.set_title(f"hetnet {be} vs {label}: training step (higher is faster)", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_train_step(args, devices: list[str], env: dict, out: Path, deadline: float) -> dict:
    rows, errors = [], []
    reference_rows = set(args.reference_rows)
    for device in devices:
        try:
            get_backend(device)
        except Exception as e:
            errors.append(f"{device}: backend unavailable: {short_error(e)}")
            continue
        for model_name in args.models:
            for batch in args.batch_sizes:
                if device == "reference" and f"{model_name}:{batch}" not in reference_rows:
                    continue
                if time.monotonic() > deadline:
                    rows.append({"model": model_name, "batch_size": batch, "hetnet_backend": device,
                                 "status": "skipped", "reason": "the run's time budget (--time-budget) was spent"})
                    continue
                rows.append(_safe_row(model_name, batch, device, args, False))
                _progress(rows[-1])
        if device.startswith("cuda") and args.tf32_row and time.monotonic() <= deadline:
            rows.append(_safe_row(TF32_ROW[0], TF32_ROW[1], device, args, True))
            _progress(rows[-1])
            try:
                torch_flags(False)
                hetnet_tf32(get_backend(device), False)
            except Exception:
                pass
    gpu = any(d.startswith("cuda") for d in devices)
    doc = {"environment": env, "method": method_text(gpu), "tolerances": {"float32": RTOL_F32, "tf32": RTOL_TF32},
           "optimizer": f"SGD lr={LR} momentum={MOMENTUM}", "errors": errors, "targets": targets(rows), "rows": rows}
    doc["load_average_at_end"] = load_average()
    for device in devices:  # the cuda backend's convolution-algorithm measurements, when it keeps them
        try:
            log = getattr(get_backend(device), "tune_log", None) if device.startswith("cuda") else None
            if log:
                doc.setdefault("tune_log", {})[device] = json.loads(json.dumps(list(log)[:300], default=str))
        except Exception as e:
            errors.append(f"tune_log of {device}: {short_error(e)}")
    (out / "train_step.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "train_step.md").write_text(train_step_markdown(doc))
    try:
        where = env.get("card") or env["host"]
        if speedup_chart(rows, out / "speedup.png", f"{where} — {env['cpu']}, {threads_text(env['threads'])}"):
            doc["chart"] = "speedup.png"
    except Exception as e:
        errors.append(f"chart: {short_error(e)}")
    return doc


def method_text(gpu: bool) -> str:
    text = (f"One step = forward, softmax cross-entropy, backward, SGD (lr {LR}, momentum {MOMENTUM}) update, "
            "float32. "
            "Same weights and inputs on both sides; before timing, on up to 32 images, logits, loss, every gradient "
            "and the updates of two timed steps must agree with PyTorch within the tolerance in the row (float32 "
            "1e-4 relative; 1e-2 where TF32 may be in use: GPU rows), on the first batch drawn or, failing that, on "
            "a second one, or, failing that too, with PyTorch's side in float64 (`check_float64`); then the timed "
            "step's updates on the whole batch within 1e-2 (float32 max-pool "
            "near-ties, more of them the larger the batch, route a few gradients differently from PyTorch without "
            "either being wrong). A row failing is refused. Median over repetitions after warm-up, sides "
            "alternating. ")
    if gpu:
        text += ("GPU: CUDA events around blocks of steps; PyTorch with cudnn.benchmark on and TF32 off except in "
                 "the row marked TF32; 'graph' = the whole PyTorch step captured as a CUDA graph. Peak memory, over a "
                 "fresh model's first two training steps and two evaluation passes on the paths timed here (hetnet: "
                 "the trainer's step objects and their CUDA graphs; PyTorch: eager), as the high-water mark of "
                 "bytes allocated and live (torch.cuda.max_memory_allocated; hetnet: CuPy's default pool plus its "
                 "private step pool) and, in the JSON, of bytes reserved (cached blocks included; "
                 "max_memory_reserved). Neither side counts its one-time algorithm measurement: PyTorch's "
                 "cudnn.benchmark cache is warm from the timing, and hetnet's trial runs use a pool of their own, "
                 "emptied after each measurement.")
    else:
        text += ("CPU: perf_counter per step, each block after untimed steps for at least 15 ms (the other side's "
                 "threads may still be spinning, or one's own asleep); PyTorch with the same thread count. Peak "
                 "memory: rise of the RSS high-water mark (VmHWM) over a fresh model's build, one step and one "
                 "evaluation pass.")
    return text


def _safe_row(model_name, batch, device, args, tf32) -> dict:
    try:
        return bench_train_step(model_name, batch, device, args, tf32)
    except Exception as e:
        return {"model": model_name, "batch_size": batch, "hetnet_backend": device, "tf32": tf32,
                "status": "error", "reason": short_error(e)}
    finally:
        gc.collect()


def _progress(row: dict) -> None:
    if row.get("status") == "ok":
        g = row.get("torch_graph_ms_per_step")
        print(f"  {row['model']:<12} batch {row['batch_size']:>5} {row['hetnet_backend']:<9}"
              f"{' TF32' if row.get('tf32') else ''}: hetnet {row['hetnet_ms_per_step']:9.3f} ms, "
              f"torch eager {row['torch_eager_ms_per_step']:9.3f} ms"
              + (f", graph {g:8.3f} ms" if g else "") + f"  (x{row['speedup_vs_torch_eager']:.2f} vs eager)",
              flush=True)
    else:
        print(f"  {row['model']:<12} batch {row['batch_size']:>5} {row['hetnet_backend']:<9}: "
              f"{row['status']}: {row.get('reason')}", flush=True)
