"""The per-layer tables.

- layers.json / .md (--layers), as the thesis's: a model's conv, pool and dense layers (thesis-m4 at batch 32 by
  default), forward and backward, hetnet's kernels vs PyTorch's, beside this machine's measured GEMM and copy
  ceilings.
- precision_layers.json / .md (--layers --precision ...): each convolution of a model (cifar-wide at batch 512 by
  default) in each precision, forward, data gradient and filter gradient, hetnet (a one-layer model moved at the
  precision) vs cuDNN (PyTorch's convolution ops on tensors of that precision), with achieved TFLOP/s.

    hetnet bench --devices cuda --no-train-step --layers --model cifar-wide --precision fp32,tf32,bf16
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import seed as hn_seed
from ..device import get_backend
from ..layers import Conv2D, Dense, MaxPool2D
from ..model import Sequential
from .common import (
    PRECISIONS,
    RTOL_F32,
    RTOL_PRECISION,
    RTOL_TF32,
    Clock,
    fmt,
    fmt_ms,
    load_average,
    md_header,
    plan,
    rel_err,
    short_error,
    sig,
    time_sides,
    write_result,
    write_text,
)
from .models import model_label, resolve_model
from .sides import capture_torch_graph, hetnet_to, torch_flags, torch_precision

LAYER_KINDS = ((Conv2D, "conv"), (MaxPool2D, "pool"), (Dense, "dense"))


def layer_shapes(model_name: str = "thesis-m4", batch: int = 32) -> list[dict]:
    """The conv, pool and dense layers of a model with their input shapes at a batch size (conv1, pool1, ...)."""
    model, shape = resolve_model(model_name)
    out, cur = [], tuple(shape)
    counts: dict[str, int] = {}
    for layer in model.layers:
        kind = next((name for cls, name in LAYER_KINDS if isinstance(layer, cls)), None)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
            out.append({"name": f"{kind}{counts[kind]}", "kind": kind, "input": (batch,) + cur, "layer": layer})
        cur = layer.output_shape(cur)
    return out


def ceilings(gpu: bool) -> dict:
    """This machine's measured GEMM rate (float32) and copy bandwidth, the roofs the layer numbers sit under."""
    import torch

    res = {}
    if gpu:
        n, nbytes = 8192, 1 << 30
        torch_flags(False)
        a = torch.randn(n, n, device="cuda")
        b = torch.randn(n, n, device="cuda")
        clock = Clock("torch")
        clock(lambda: a @ b, 2)
        t = min(clock(lambda: a @ b, 5) for _ in range(3))
        res["gemm_gflops"] = round(2 * n**3 / t / 1e9, 1)
        res["gemm"] = f"torch.mm {n}x{n}x{n} float32, TF32 off"
        src = torch.empty(nbytes // 4, device="cuda")
        dst = torch.empty_like(src)
        clock(lambda: dst.copy_(src), 2)
        t = min(clock(lambda: dst.copy_(src), 10) for _ in range(3))
        res["copy_gbps"] = round(2 * nbytes / t / 1e9, 1)
        res["copy"] = "device-to-device copy of 1 GiB (read + write bytes)"
        del a, b, src, dst
        torch.cuda.empty_cache()
    else:
        n = 1024
        a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        ta = torch.from_numpy(a)
        clock = Clock("cpu")
        t_np = min(clock(lambda: a @ a, 1) for _ in range(5))
        t_t = min(clock(lambda: ta @ ta, 1) for _ in range(5))
        res["gemm_gflops"] = round(2 * n**3 / min(t_np, t_t) / 1e9, 1)
        res["gemm"] = (f"best of NumPy ({2 * n**3 / t_np / 1e9:.1f} GFLOP/s) and torch "
                       f"({2 * n**3 / t_t / 1e9:.1f} GFLOP/s) {n}x{n}x{n} float32 matmul")
        src = np.ones(64 * 2**20 // 4, dtype=np.float32)
        dst = np.empty_like(src)
        t = min(clock(lambda: np.copyto(dst, src), 1) for _ in range(5))
        res["copy_gbps"] = round(2 * src.nbytes / t / 1e9, 1)
        res["copy"] = "np.copyto of 64 MiB (read + write bytes)"
    return res


def _conv_ops(layer, shape, backend, tdev, rng) -> list[tuple]:
    """(op, hetnet fn, torch fn, hetnet check fn, torch check fn, FLOPs, bytes) for a Conv2D layer."""
    import torch
    import torch.nn.functional as F

    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal(layer.weight.shape) * 0.1).astype(np.float32)
    b = rng.standard_normal(layer.out_channels).astype(np.float32)
    hx, hw, hb = backend.asarray(x), backend.asarray(w), backend.asarray(b)
    tx, tw, tb = (torch.from_numpy(a).to(tdev) for a in (x, w, b))
    st, pad = layer.stride, layer.padding
    y, cache = backend.conv2d_forward(hx, hw, hb, st, pad)
    dy = rng.standard_normal(tuple(y.shape)).astype(np.float32)
    hdy, tdy = backend.asarray(dy), torch.from_numpy(dy).to(tdev)
    hdw, hdb = backend.zeros(w.shape), backend.zeros(b.shape)
    n, k, p, q = y.shape
    flops = 2.0 * n * k * p * q * layer.in_channels * layer.kernel_size ** 2

    def hfwd():
        return backend.conv2d_forward(hx, hw, hb, st, pad)[0]

    def tfwd():
        return F.conv2d(tx, tw, tb, st, pad)

    def hbwd():  # dw, db accumulate: their values matter only in the check below
        return backend.conv2d_backward(hdy, cache, hdw, hdb, need_dx=True)

    def tbwd():
        return torch.ops.aten.convolution_backward(tdy, tx, tw, [layer.out_channels], [st, st], [pad, pad],
                                                   [1, 1], False, [0, 0], 1, [True, True, True])

    def hbwd_check():
        hdw[...] = 0
        hdb[...] = 0
        return [hbwd(), hdw, hdb]

    return [("forward", hfwd, tfwd, lambda: [hfwd()], lambda: [tfwd()], flops, None),
            ("backward (data + filter)", hbwd, tbwd, hbwd_check, lambda: list(tbwd()), 2 * flops, None)]


def _pool_ops(layer, shape, backend, tdev, rng) -> list[tuple]:
    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    x = rng.standard_normal(shape).astype(np.float32)
    hx, tx = backend.asarray(x), torch.from_numpy(x).to(tdev)
    kk, st = layer.kernel_size, layer.stride
    y, cache = backend.maxpool2d_forward(hx, kk, st)
    dy = rng.standard_normal(tuple(y.shape)).astype(np.float32)
    hdy, tdy = backend.asarray(dy), torch.from_numpy(dy).to(tdev)
    _, tidx = aten.max_pool2d_with_indices(tx, [kk, kk], [st, st])
    nbytes = 4.0 * (x.size + dy.size)

    def hfwd():
        return backend.maxpool2d_forward(hx, kk, st)[0]

    def tfwd():
        return F.max_pool2d(tx, kk, st)

    def hbwd():
        return backend.maxpool2d_backward(hdy, cache)

    def tbwd():
        return aten.max_pool2d_with_indices_backward(tdy, tx, [kk, kk], [st, st], [0, 0], [1, 1], False, tidx)

    return [("forward", hfwd, tfwd, lambda: [hfwd()], lambda: [tfwd()], None, nbytes),
            ("backward", hbwd, tbwd, lambda: [hbwd()], lambda: [tbwd()], None, nbytes)]


def _dense_ops(layer, shape, backend, tdev, rng) -> list[tuple]:
    import torch
    import torch.nn.functional as F

    x = rng.standard_normal((shape[0], int(np.prod(shape[1:])))).astype(np.float32)
    w = (rng.standard_normal(layer.weight.shape) * 0.05).astype(np.float32)
    b = rng.standard_normal(layer.out_features).astype(np.float32)
    hx, hw, hb = backend.asarray(x), backend.asarray(w), backend.asarray(b)
    tx, tw, tb = (torch.from_numpy(a).to(tdev) for a in (x, w, b))
    y, cache = backend.dense_forward(hx, hw, hb)
    dy = rng.standard_normal(tuple(y.shape)).astype(np.float32)
    hdy, tdy = backend.asarray(dy), torch.from_numpy(dy).to(tdev)
    hdw, hdb = backend.zeros(w.shape), backend.zeros(b.shape)
    flops = 2.0 * x.shape[0] * layer.in_features * layer.out_features

    def hfwd():
        return backend.dense_forward(hx, hw, hb)[0]

    def tfwd():
        return F.linear(tx, tw, tb)

    def hbwd():
        return backend.dense_backward(hdy, cache, hdw, hdb, True)

    def tbwd():  # what autograd runs for nn.Linear: dx = dy w, dw = dy^T x, db = sum_n dy
        return tdy.mm(tw), tdy.t().mm(tx), tdy.sum(0)

    def hbwd_check():
        hdw[...] = 0
        hdb[...] = 0
        return [hbwd(), hdw, hdb]

    return [("forward", hfwd, tfwd, lambda: [hfwd()], lambda: [tfwd()], flops, None),
            ("backward (data + weights)", hbwd, tbwd, hbwd_check, lambda: list(tbwd()), 2 * flops, None)]


GRAPH_CALLS = 20   # on a GPU, calls of one op per captured CUDA graph


def _graphed_hetnet(backend, fn, calls: int):
    """(launch, stream): `calls` calls of a hetnet op captured as one CUDA graph on the backend's compute stream,
    in a private pool, so that timing it measures the kernels and not Python's launch overhead."""
    import cupy

    stream, pool = backend.compute_stream(), cupy.cuda.MemoryPool()
    with backend.device, stream:
        fn()                                   # outside the capture: algorithm choice, scratch buffers
        stream.synchronize()
        backend.prepare_capture(stream)
        backend.capturing = stream
        try:
            with cupy.cuda.using_allocator(pool.malloc):
                stream.begin_capture()
                try:
                    for _ in range(calls):
                        fn()
                finally:
                    graph = stream.end_capture()
        finally:
            backend.capturing = None

    def launch():
        graph.launch(stream)
    launch.keep = (graph, pool)                # the graph's memory lives as long as the callable
    return launch, stream


def _graphed_torch(fn, calls: int):
    """`calls` calls of a PyTorch op captured as one CUDA graph."""

    def body():
        for _ in range(calls):
            fn()

    return capture_torch_graph(body, warmup=1).replay


def time_op(hfn, tfn, backend, gpu: bool, args) -> tuple[dict, dict]:
    """Median seconds per call of one op on each side ({"hetnet", "torch"}; hetnet left out when hfn is None) and
    {"repeats", "how"}. On a GPU each side's op is captured GRAPH_CALLS times in one CUDA graph (kernels, not the
    launch overhead), falling back to eager calls when a capture fails (`how` says which)."""
    for _ in range(2):
        if hfn is not None:
            hfn()
        tfn()
    per_call, how = 1, "eager"
    hclock = Clock("cupy", backend) if gpu else Clock("cpu", backend)
    tclock = Clock("torch") if gpu else Clock("cpu")
    if gpu:
        try:
            hg = hstream = None
            if hfn is not None:
                hg, hstream = _graphed_hetnet(backend, hfn, GRAPH_CALLS)
            tg = _graphed_torch(tfn, GRAPH_CALLS)
            hfn, tfn, per_call = hg, tg, GRAPH_CALLS
            hclock = Clock("cupy", backend, hstream)
            how = f"CUDA graph of {GRAPH_CALLS} calls per side"
        except Exception as e:
            how = f"eager (graph capture failed: {short_error(e)})"
    sides = {"torch": (tfn, tclock)} if hfn is None else {"hetnet": (hfn, hclock), "torch": (tfn, tclock)}
    est = max(clock(fn, 1) for fn, clock in sides.values())
    reps, inner = plan(est, gpu, args.repeats, args.side_seconds / 2, args.block_ms)
    med = time_sides(sides, reps, inner, settle=not gpu)
    return {k: v / per_call for k, v in med.items()}, {"repeats": reps, "how": how}


def bench_layers(device: str, args, model_name: str = "thesis-m4") -> dict:
    """Each of a model's conv, pool and dense layers at batch args.layer_batch, forward and backward, hetnet vs
    PyTorch."""
    backend = get_backend(device)
    gpu = device.startswith("cuda")
    tdev = "cuda" if gpu else "cpu"
    if gpu:
        torch_flags(False)
    tol = RTOL_TF32 if gpu else RTOL_F32
    rng = np.random.default_rng(2)
    rows = []
    make = {"conv": _conv_ops, "pool": _pool_ops, "dense": _dense_ops}
    for spec in layer_shapes(model_name, args.layer_batch):
        shape = spec["input"]
        ops = make[spec["kind"]](spec["layer"], shape, backend, tdev, rng)
        for op_name, hfn, tfn, hcheck, tcheck, flops, nbytes in ops:
            r = {"layer": spec["name"], "op": op_name, "input_shape": list(shape)}
            try:
                pairs = zip(hcheck(), tcheck(), strict=True)
                err = max(rel_err(backend.to_numpy(h), t.detach().cpu().numpy()) for h, t in pairs)
                r["check_max_rel_err"] = float(f"{err:.3g}")
                if not err <= tol:
                    r.update(status="refused", reason=f"outputs disagree: relative error {err:.3g} > {tol:g}")
                    rows.append(r)
                    continue
                med, timing = time_op(hfn, tfn, backend, gpu, args)
                reps = timing["repeats"]
                r["timing"] = timing["how"]
                r.update(status="ok", hetnet_ms=round(med["hetnet"] * 1e3, 4), torch_ms=round(med["torch"] * 1e3, 4),
                         hetnet_vs_torch=round(med["torch"] / med["hetnet"], 3), repeats=reps)
                if flops:
                    r.update(gflop=round(flops / 1e9, 4), hetnet_gflops=round(flops / med["hetnet"] / 1e9, 1),
                             torch_gflops=round(flops / med["torch"] / 1e9, 1))
                if nbytes:
                    r.update(mbytes=round(nbytes / 1e6, 2), hetnet_gbps=round(nbytes / med["hetnet"] / 1e9, 1),
                             torch_gbps=round(nbytes / med["torch"] / 1e9, 1))
            except Exception as e:
                r.update(status="error", reason=short_error(e))
            rows.append(r)
    return {"device": backend.name, "torch_device": tdev, "batch": args.layer_batch, "model": model_label(model_name),
            "check_tolerance": tol, "rows": rows}


def layers_markdown(doc: dict) -> str:
    models = ", ".join(dict.fromkeys(sec["model"] for sec in doc["devices"])) or "no model"
    batch = next((sec["batch"] for sec in doc["devices"]), "")
    lines = [f"# {models}: layers at batch {batch}, hetnet kernels vs PyTorch", ""] + md_header(doc["environment"])
    lines += [("Each op is checked against PyTorch's before it is timed. Pool GB/s count input + output bytes "
               "(forward: x read, y written; backward: dy read, dx written). On a GPU each side's op is captured "
               f"{GRAPH_CALLS} times in one CUDA graph and the graph is timed with CUDA events, so the table compares "
               "kernels (GPU time per call), not the host's launch overhead (see `timing` in the JSON)."), ""]
    for sec in doc["devices"]:
        lines += [f"## {sec['model']}: hetnet `{sec['device']}` vs PyTorch {sec['torch_device']}", ""]
        c = sec.get("ceilings", {})
        if c:
            lines += [(f"Measured ceilings: GEMM {c.get('gemm_gflops')} GFLOP/s ({c.get('gemm')}); copy "
                       f"{c.get('copy_gbps')} GB/s ({c.get('copy')})."), ""]
        lines += [("| layer | input | op | hetnet ms | torch ms | torch/hetnet | hetnet GFLOP/s or GB/s | "
                   "torch GFLOP/s or GB/s |"), "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in sec["rows"]:
            shape = "x".join(map(str, r["input_shape"]))
            if r.get("status") != "ok":
                lines.append(f"| {r['layer']} | {shape} | {r['op']} | {r.get('status')}: {r.get('reason')} "
                             "| | | | |")
                continue
            unit = "GFLOP/s" if "hetnet_gflops" in r else "GB/s"
            hv = r.get("hetnet_gflops", r.get("hetnet_gbps"))
            tv = r.get("torch_gflops", r.get("torch_gbps"))
            lines.append(f"| {r['layer']} | {shape} | {r['op']} | {fmt_ms(r['hetnet_ms'])} | {fmt_ms(r['torch_ms'])} | "
                         f"{r['hetnet_vs_torch']:.2f}x | {hv} {unit} | {tv} {unit} |")
        lines.append("")
    for e in doc.get("errors", []):
        lines.append(f"- {e}")
    return "\n".join(lines) + "\n"


def run_layers(args, devices: list[str], env: dict, out: Path, models: list[str]) -> dict:
    doc = {"environment": env, "devices": [], "errors": []}
    for device in devices:
        if device == "reference":
            continue  # the oracle's speed is not the point of this table
        roofs = None
        for model_name in models:
            try:
                sec = bench_layers(device, args, model_name)
                if roofs is None:
                    try:
                        roofs = ceilings(device.startswith("cuda"))
                    except Exception as e:
                        roofs = {}
                        doc["errors"].append(f"ceilings on {device}: {short_error(e)}")
                sec["ceilings"] = roofs
                doc["devices"].append(sec)
                print(f"  layers of {model_label(model_name)} on {device}: done", flush=True)
            except Exception as e:
                doc["errors"].append(f"{model_label(model_name)} on {device}: {short_error(e)}")
    doc["load_average_at_end"] = load_average()
    write_result(out / "layers.json", doc)
    write_text(out / "layers.md", layers_markdown(doc))
    return doc


# --- the precision table: each convolution of a model, per precision, against cuDNN ---------------------------

PRECISION_LAYER_MODEL, PRECISION_LAYER_BATCH = "cifar-wide", 512
CONV_OPS = ("forward", "data gradient", "filter gradient", "data + filter gradient")


def _conv_precision_rows(spec: dict, backend, tdev: str, precision: str, gpu: bool, args, rng) -> list[dict]:
    """The four ops of one convolution at `precision`, hetnet vs cuDNN (PyTorch's own kernels on a CPU), each checked
    against float64 first; PyTorch's columns are named torch_*.

    hetnet: a one-layer model (Sequential([Conv2D])) with the layer's shape and fixed weights, moved with
    sides.hetnet_to; forward = model.forward, filter gradient = model.backward(dy, need_dx=False), data + filter
    gradient = model.backward(dy). The op contract has no data-gradient-only call, so hetnet's data gradient is
    (data + filter) - filter, marked `hetnet_derived`. cuDNN: F.conv2d and aten.convolution_backward with one
    output mask per op, on tensors in the precision's dtype and layout (bf16: bfloat16, channels_last; tf32:
    float32 with the TF32 switches; fp32: float32, TF32 off)."""
    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    layer = spec["layer"]
    n, c, h, w = spec["input"]
    k, r, st, pad, bias = layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.use_bias
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = (rng.standard_normal((k, c, r, r)) * np.sqrt(2.0 / (c * r * r))).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32) if bias else None
    _, p, q = layer.output_shape((c, h, w))
    dy = rng.standard_normal((n, k, p, q)).astype(np.float32)
    flops = 2.0 * n * k * p * q * c * r * r
    base = {"layer": spec["name"], "input_shape": [n, c, h, w], "conv": f"{c}->{k} {r}x{r} stride {st} pad {pad}",
            "precision": precision, "gflop": round(flops / 1e9, 3)}

    # the exact result, float64
    x64, w64, dy64 = (torch.from_numpy(a).to(tdev, torch.float64) for a in (x, wt, dy))
    b64 = torch.from_numpy(b).to(tdev, torch.float64) if bias else None
    y64 = F.conv2d(x64, w64, b64, st, pad)
    dx64, dw64, _ = aten.convolution_backward(dy64, x64, w64, [k] if bias else None, [st, st], [pad, pad], [1, 1],
                                              False, [0, 0], 1, [True, True, False])
    exact = {"forward": [y64], "filter gradient": [dw64], "data + filter gradient": [dx64, dw64],
             "data gradient": [dx64]}

    # cuDNN (PyTorch's convolution ops) at the precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    fmt_ = torch.channels_last if precision == "bf16" else torch.contiguous_format
    tx, tw, tdy = (torch.from_numpy(a).to(tdev, dtype).contiguous(memory_format=fmt_) for a in (x, wt, dy))
    tb = torch.from_numpy(b).to(tdev, dtype) if bias else None

    def grad(mask):
        return lambda: aten.convolution_backward(tdy, tx, tw, [k] if bias else None, [st, st], [pad, pad], [1, 1],
                                                 False, [0, 0], 1, mask)

    tfns = {"forward": lambda: F.conv2d(tx, tw, tb, st, pad), "data gradient": grad([True, False, False]),
            "filter gradient": grad([False, True, bias]), "data + filter gradient": grad([True, True, bias])}

    def torch_out(op):
        res = tfns[op]()
        return [res] if op == "forward" else [t for t, m in zip(res, (True, True, False), strict=True)
                                              if t is not None and m]

    # hetnet at the precision

    hn_seed(0)
    hm = Sequential([Conv2D(c, k, r, stride=st, padding=pad, bias=bias)])
    hm.load_state_dict({"0.weight": wt, **({"0.bias": b} if bias else {})})
    note = hetnet_to(hm, backend, precision)
    hm.train()
    conv = hm.layers[0]
    hx, hdy = backend.asarray(x), backend.asarray(dy)

    def hfwd():
        return hm.forward(hx)

    def hwgrad():
        return hm.backward(hdy, need_dx=False)

    def hboth():
        return hm.backward(hdy, need_dx=True)

    def hetnet_out(op):
        hm.zero_grad()
        if op == "forward":
            return [hfwd()]
        hfwd()
        if op == "filter gradient":
            hwgrad()
            return [conv.weight.grad]
        return [hboth(), conv.weight.grad]

    def algos(op):
        """{conv op: the algorithm the cuda backend chose} for this layer's shape ({} on a backend that chooses
        none)."""
        choice = getattr(getattr(hm, "backend", None), "conv_choice", None)
        wanted = {"forward": ("fwd",), "filter gradient": ("filter",), "data + filter gradient": ("data", "filter")}
        got = {o: choice(o, (n, c, h, w, k, r, r, st, pad)) for o in wanted[op]} if choice else {}
        return {o: a for o, a in got.items() if a is not None}

    tol = RTOL_PRECISION[precision]
    rows, times = [], {}
    for op in ("forward", "filter gradient", "data + filter gradient", "data gradient"):
        row = dict(base, op=op, status="ok", reason=None, hetnet_ms=None, torch_ms=None)
        try:
            cerr = max(rel_err(t.float().cpu().numpy(), e.cpu().numpy())
                       for t, e in zip(torch_out(op), exact[op], strict=True))
            row["torch_rel_err"] = float(f"{cerr:.3g}")
            hfn = None
            if note is not None:
                row.update(status="torch only", reason=note)
            elif op != "data gradient":
                err = max(rel_err(np.asarray(backend.to_numpy(hv), dtype=np.float64), e.cpu().numpy())
                          for hv, e in zip(hetnet_out(op), exact[op], strict=True))
                row.update(check_max_rel_err=float(f"{err:.3g}"), check_tolerance=tol)
                chosen = algos(op)
                if chosen:
                    row["hetnet_algorithms"] = chosen
                if not err <= tol:
                    row.update(status="refused", reason=f"hetnet disagrees with float64: relative error {err:.3g} > "
                               f"{tol:g}")
                    rows.append(row)
                    continue
                hfwd()                       # the backward ops read this forward's cache
                hfn = {"forward": hfwd, "filter gradient": hwgrad, "data + filter gradient": hboth}[op]
            med, timing = time_op(hfn, tfns[op], backend, gpu, args)
            row.update(torch_ms=round(med["torch"] * 1e3, 4),
                       torch_tflops=sig(flops * _mult(op) / med["torch"] / 1e12),
                       repeats=timing["repeats"], timing=timing["how"])
            if "hetnet" in med:
                times[op] = med["hetnet"]
            if op == "data gradient" and {"filter gradient", "data + filter gradient"} <= set(times):
                # hetnet's: the two backward calls' difference (no data-gradient-only call in the op contract);
                # none when the difference is not positive (within the timing noise)
                diff = times["data + filter gradient"] - times["filter gradient"]
                row.update(hetnet_derived="(data + filter gradient) - filter gradient" + (
                               "" if diff > 0 else f": {diff * 1e3:.4f} ms, not positive (timing noise)"),
                           check_max_rel_err=next((x["check_max_rel_err"] for x in rows
                                                   if x["op"] == "data + filter gradient"), None))
                if diff > 0:
                    times[op] = diff
            if op in times:
                row.update(hetnet_ms=round(times[op] * 1e3, 4),
                           hetnet_tflops=sig(flops * _mult(op) / times[op] / 1e12),
                           torch_vs_hetnet=round(med["torch"] / times[op], 3))
        except Exception as e:
            row.update(status="error", reason=short_error(e))
        rows.append(row)
    order = {op: i for i, op in enumerate(CONV_OPS)}
    return sorted(rows, key=lambda x: order[x["op"]])


def _mult(op: str) -> int:
    """GEMMs of the forward's size an op runs (data + filter: two)."""
    return 2 if op == "data + filter gradient" else 1


def conv_layers(model_name: str, batch: int) -> list[dict]:
    return [spec for spec in layer_shapes(model_name, batch) if spec["kind"] == "conv"]


def bench_conv_precision(device: str, args, model_name: str, precision: str) -> dict:
    """One section of precision_layers.json: every convolution of the model at `precision` on `device`."""
    backend = get_backend(device)
    gpu = device.startswith("cuda")
    tdev = "cuda" if gpu else "cpu"
    flags = torch_precision(precision) if gpu else None
    batch = args.layer_batch or PRECISION_LAYER_BATCH
    rng = np.random.default_rng(2)
    rows = []
    for spec in conv_layers(model_name, batch):
        rows += _conv_precision_rows(spec, backend, tdev, precision, gpu, args, rng)
    return {"device": backend.name, "torch_device": tdev, "model": model_label(model_name), "batch": batch,
            "precision": precision, "torch_flags": flags, "check_tolerance": RTOL_PRECISION[precision], "rows": rows}


def precision_layers_method() -> str:
    tols = ", ".join(f"{p} {t:g}" for p, t in RTOL_PRECISION.items())
    return ("Each convolution of the model at each precision: forward, data gradient, filter gradient, and data + "
            "filter gradient (the one backward call of a layer whose input gradient is wanted). hetnet: a one-layer "
            "model moved with `model.to(device, precision=...)`, through model.forward / model.backward (its data "
            "gradient alone is (data + filter) - filter, `hetnet_derived`: the op contract has no call for it); a "
            "model that takes no precision leaves hetnet's columns empty. cuDNN: F.conv2d and "
            "aten.convolution_backward with one output mask per op, fp32 with TF32 off, tf32 with the TF32 "
            "switches on, bf16 on bfloat16 channels_last tensors (what autocast + channels_last run). Before "
            f"timing, hetnet's outputs against the float64 result within the precision's tolerance ({tols}); "
            "cuDNN's own error is recorded beside it (`torch_rel_err`; PyTorch's columns are torch_*). On a GPU "
            f"each side's op is captured {GRAPH_CALLS} times in one CUDA graph, timed with CUDA events (median of "
            "repetitions). TFLOP/s count 2 FLOPs per multiply-add of the op's GEMMs (2*N*K*P*Q*C*R*S each). "
            "`hetnet_algorithms`: the algorithm hetnet chose for each convolution op it ran (cuda).")


def precision_layers_markdown(doc: dict) -> str:
    lines = ["# Convolutions per precision: hetnet vs cuDNN", ""] + md_header(doc["environment"])
    lines += [doc["method"], ""]
    for sec in doc["sections"]:
        peer = "cuDNN" if sec["torch_device"] == "cuda" else "PyTorch"
        head = (f"| layer | input | conv | op | hetnet ms | {peer} ms | {peer}/hetnet | hetnet TFLOP/s | {peer} "
                "TFLOP/s | check rel. err |")
        lines += [f"## {sec['model']} at batch {sec['batch']}, {sec['precision']}: hetnet `{sec['device']}` vs "
                  f"{peer} ({sec['torch_device']})", "", head, "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in sec["rows"]:
            shape = "x".join(map(str, r["input_shape"]))
            if r["status"] not in ("ok", "torch only"):
                lines.append(f"| {r['layer']} | {shape} | {r['conv']} | {r['op']} | {r['status']}: {r['reason']} "
                             "| | | | | |")
                continue
            mark = "*" if r.get("hetnet_derived") else ""
            ratio = r.get("torch_vs_hetnet")
            lines.append(f"| {r['layer']} | {shape} | {r['conv']} | {r['op']} | {fmt_ms(r['hetnet_ms'])}{mark} | "
                         f"{fmt_ms(r['torch_ms'])} | {fmt(ratio) + 'x' if ratio else '—'} | "
                         f"{fmt(r.get('hetnet_tflops'), 3)} | {fmt(r.get('torch_tflops'), 3)} | "
                         + (f"{r['check_max_rel_err']:.1e} |" if r.get("check_max_rel_err") is not None else "— |"))
        notes = sorted({r["reason"] for r in sec["rows"] if r["status"] == "torch only"})
        if notes:
            lines += ["", "No hetnet columns: " + "; ".join(notes) + "."]
        if any(r.get("hetnet_derived") for r in sec["rows"]):
            lines += ["", "\\* (data + filter gradient) - filter gradient."]
        lines.append("")
    for e in doc.get("errors", []):
        lines.append(f"- {e}")
    return "\n".join(lines) + "\n"


def run_conv_precision(args, devices: list[str], env: dict, out: Path, models: list[str]) -> dict:
    """precision_layers.json / .md: each model's convolutions x args.precision on each device."""
    doc = {"environment": env, "method": precision_layers_method(), "tolerances": dict(RTOL_PRECISION),
           "sections": [], "errors": []}
    for device in devices:
        if device == "reference":
            continue
        for model_name in models:
            for precision in args.precision:
                if not device.startswith("cuda") and precision != "fp32":
                    doc["errors"].append(f"{model_label(model_name)} {precision} on {device}: skipped (tf32 and bf16 "
                                         "are GPU rows)")
                    continue
                try:
                    doc["sections"].append(bench_conv_precision(device, args, model_name, precision))
                    print(f"  convolutions of {model_label(model_name)} at {precision} on {device}: done", flush=True)
                except Exception as e:
                    doc["errors"].append(f"{model_label(model_name)} {precision} on {device}: {short_error(e)}")
        if device.startswith("cuda"):
            torch_flags(False)
    doc["load_average_at_end"] = load_average()
    write_result(out / "precision_layers.json", doc)
    write_text(out / "precision_layers.md", precision_layers_markdown(doc))
    return doc


__all__ = ["PRECISIONS", "bench_layers", "run_layers", "bench_conv_precision", "run_conv_precision", "layer_shapes"]
