"""The per-layer table, as the thesis's: thesis-m4's conv, pool and dense layers at batch 32, forward and backward,
hetnet's kernels vs PyTorch's, beside this machine's measured GEMM and copy ceilings -> layers.json / .md."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import zoo
from ..device import get_backend
from .common import (
    RTOL_F32,
    RTOL_TF32,
    Clock,
    capture_torch_graph,
    fmt_ms,
    load_average,
    md_header,
    plan,
    rel_err,
    short_error,
    time_sides,
    torch_flags,
)


def layer_shapes(model_name: str = "thesis-m4", batch: int = 32) -> list[dict]:
    """The conv, pool and dense layers of a model with their input shapes at a batch size."""
    model, shape, _ = zoo.resolve(model_name)
    out, cur = [], tuple(shape)
    counts: dict[str, int] = {}
    for layer in model.layers:
        t = type(layer).__name__
        if t in ("Conv2D", "MaxPool2D", "Dense"):
            counts[t] = counts.get(t, 0) + 1
            out.append({"name": f"{t.lower().replace('maxpool2d', 'pool').replace('conv2d', 'conv')}{counts[t]}",
                        "type": t, "input": (batch,) + cur, "layer": layer})
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


def bench_layers(device: str, args) -> dict:
    """Each of thesis-m4's conv, pool and dense layers at batch 32, forward and backward, hetnet vs PyTorch."""
    backend = get_backend(device)
    gpu = device.startswith("cuda")
    tdev = "cuda" if gpu else "cpu"
    if gpu:
        torch_flags(False)
    tol = RTOL_TF32 if gpu else RTOL_F32
    hclock = Clock("cupy", backend) if gpu else Clock("cpu", backend)
    tclock = Clock("torch") if gpu else Clock("cpu")
    rng = np.random.default_rng(2)
    rows = []
    make = {"Conv2D": _conv_ops, "MaxPool2D": _pool_ops, "Dense": _dense_ops}
    for spec in layer_shapes("thesis-m4", args.layer_batch):
        shape = spec["input"]
        ops = make[spec["type"]](spec["layer"], shape, backend, tdev, rng)
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
                for _ in range(2):
                    hfn(), tfn()
                per_call, hc = 1, hclock
                if gpu:
                    # kernels, not launch overhead: each side's op captured GRAPH_CALLS times in one CUDA graph
                    try:
                        hg, hstream = _graphed_hetnet(backend, hfn, GRAPH_CALLS)
                        tg = _graphed_torch(tfn, GRAPH_CALLS)
                        hfn, tfn, per_call = hg, tg, GRAPH_CALLS
                        hc = Clock("cupy", backend, hstream)
                        r["timing"] = f"CUDA graph of {GRAPH_CALLS} calls per side"
                    except Exception as e:
                        r["timing"] = f"eager (graph capture failed: {short_error(e)})"
                est = max(hc(hfn, 1), tclock(tfn, 1))
                reps, inner = plan(est, gpu, args.repeats, args.side_seconds / 2, args.block_ms)
                med = time_sides({"hetnet": (hfn, hc), "torch": (tfn, tclock)}, reps, inner, settle=not gpu)
                med = {k: v / per_call for k, v in med.items()}
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
    return {"device": backend.name, "torch_device": tdev, "batch": args.layer_batch, "model": "thesis-m4",
            "check_tolerance": tol, "rows": rows}


def layers_markdown(doc: dict) -> str:
    lines = ["# thesis-m4's layers at batch 32: hetnet kernels vs PyTorch", ""] + md_header(doc["environment"])
    lines += [("Each op is checked against PyTorch's before it is timed. Pool GB/s count input + output bytes "
               "(forward: x read, y written; backward: dy read, dx written). On a GPU each side's op is captured "
               f"{GRAPH_CALLS} times in one CUDA graph and the graph is timed with CUDA events, so the table compares "
               "kernels (GPU time per call), not the host's launch overhead (see `timing` in the JSON)."), ""]
    for sec in doc["devices"]:
        lines += [f"## hetnet `{sec['device']}` vs PyTorch {sec['torch_device']}", ""]
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


def run_layers(args, devices: list[str], env: dict, out: Path) -> dict:
    doc = {"environment": env, "devices": [], "errors": []}
    for device in devices:
        if device == "reference":
            continue  # the oracle's speed is not the point of this table
        try:
            sec = bench_layers(device, args)
            try:
                sec["ceilings"] = ceilings(device.startswith("cuda"))
            except Exception as e:
                doc["errors"].append(f"ceilings on {device}: {short_error(e)}")
            doc["devices"].append(sec)
            print(f"  layers on {device}: done", flush=True)
        except Exception as e:
            doc["errors"].append(f"{device}: {short_error(e)}")
    doc["load_average_at_end"] = load_average()
    (out / "layers.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "layers.md").write_text(layers_markdown(doc))
    return doc
