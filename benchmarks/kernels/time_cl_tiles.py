"""Time every channels-last wgmma tile -- conv.py's candidates (mma_tiles.TILES16W), the TMA-fed tiles (TILES16T) and
the sandbox's warp-specialised "ws" tiles (conv16_ws.TILES16WS), halo "h" / "hf" tiles (conv16_halo.TILES16H) and
filter gradients in clusters, "mc" (conv16_mc.TILES16MC), and tf32 filter gradients on wgmma through a transposing
stage, "fx" (conv32_fx.TILES32FX), and on mma.sync from row tables, "fv" (conv32_fv.TILES32FV), each launched from its
own module -- on cifar-wide's 3x3 convolutions at batch 512 in bf16 (or tf32, fp32: --precision):
the forward, the data gradient, the pooled forward and the filter gradient, each planned by mma.py (the h tiles then
by conv16_halo.plan) on copies made once (mma.to_nhwc, turn_weights), so that only the kernels are timed.

Each tile's forward and data gradient (filter gradient) are first checked against the first wgmma tile's (relative
error within RTOL_TC_ROUNDED of the norm; a tile that fails is reported, never timed). Times: run_conv_variants.time_ms
(CUDA events around back-to-back launches queued behind a spin kernel, median of several samples). --out writes the
rows as JSON with the card, hetnet's commit and the date (hetnet.bench.common.environment). --precision tf32 or fp32
times the shipped tf32 / fp32 tiles (wgmma forward, mma.sync filter gradient) and the halo tiles of that precision
(on an sm_90a GPU); --no-sandbox leaves those out, --sandbox picks some (ws, halo, mc, fx, fv). --out16 stores the
forwards' and data gradient's outputs as bf16, as a bf16 training step does (float32 otherwise).

    PYTHONPATH=src python benchmarks/kernels/time_cl_tiles.py [--batch 512] [--precision bf16] [--no-sandbox]
        [--sandbox ws,halo,mc,fx,fv] [--ops fwd,filter] [--layers 128x16x16->128] [--out16] [--out tiles.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# cifar-wide's 3x3 convolutions at pad 1 (benchmarks/specs/cifar-wide.json): (C, H, W, O), the pooled ones marked
LAYERS = [(64, 32, 32, 128, True), (128, 16, 16, 128, False), (128, 16, 16, 256, True), (256, 8, 8, 256, False),
          (256, 8, 8, 256, True), (256, 4, 4, 256, False)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--precision", choices=("bf16", "tf32", "fp32"), default="bf16",
                    help="the copies' precision (tf32, fp32: the shipped wgmma forward tiles and mma.sync filter "
                         "tiles, the halo tiles of TILES32H; no ws tiles)")
    ap.add_argument("--no-sandbox", action="store_true", help="leave out the sandbox's tiles")
    ap.add_argument("--sandbox", default="ws,halo",
                    help="the sandboxes whose tiles are timed (ws, halo, mc: the filter gradient in clusters, "
                         "fx: the tf32 filter gradient on wgmma, fv: on mma.sync from row tables)")
    ap.add_argument("--ops", default="fwd,filter",
                    help="fwd (the forward, data gradient and pooled forward), filter (the filter gradient), or both")
    ap.add_argument("--layers", default="",
                    help="only these layers, as the rows name them (e.g. 128x16x16->128,256x8x8->256; default all)")
    ap.add_argument("--out16", action="store_true",
                    help="the forwards' and data gradient's outputs stored as bf16 (as a bf16 step stores them)")
    ap.add_argument("--out", type=Path, default=None, help="write the times as JSON (card, commit, date)")
    args = ap.parse_args(argv)
    import cupy

    import conv16_halo as halo
    import conv16_mc as mc
    import conv16_ws as ws
    import conv32_fv as fv
    import conv32_fx as fx
    from run_conv_variants import time_ms
    from run_tc_conv_nhwc import RTOL_TC_ROUNDED

    from hetnet.backends.cuda import mma
    from hetnet.backends.cuda.mma_tiles import TILES16T, TmaTile, tma_fits
    from hetnet.backends.cuda.kernels import get_kernel
    from hetnet.bench.common import environment, write_result
    from hetnet.device import get_backend

    be = get_backend("cuda", args.precision)
    bf16 = args.precision == "bf16"
    halo_fwd = halo.TILES16H["fwd"] if bf16 else [t for t in halo.TILES32H["fwd"] if t.precision == args.precision]
    picked = set(args.sandbox.split(",")) - {""}
    if args.no_sandbox or not picked <= {"ws", "halo", "mc", "fx", "fv"}:
        picked = set()
    ws_fwd, ws_filter = (ws.TILES16WS["fwd"], ws.TILES16WS["filter"]) if bf16 and "ws" in picked else ((), ())
    halo_filter = (halo.TILES16H["filter"] if bf16 else
                   [t for t in halo.TILES32H["filter"] if t.precision == args.precision])
    if "halo" not in picked:
        halo_fwd = halo_filter = ()
    mc_filter = mc.TILES16MC["filter"] if bf16 and "mc" in picked else ()
    fx_filter = fx.TILES32FX["filter"] if args.precision == "tf32" and "fx" in picked else ()
    fv_filter = fv.TILES32FV["filter"] if args.precision == "tf32" and "fv" in picked else ()
    sandbox = {"fwd": [*ws_fwd, *halo_fwd], "filter": [*ws_filter, *halo_filter, *mc_filter, *fx_filter, *fv_filter]}
    spin = get_kernel(be.device_id, "elementwise", "hn_spin")
    rng = np.random.default_rng(0)
    rows = []
    only = set(args.layers.split(",")) - {""}
    for c, h, w, o, pooled in LAYERS:
        if only and f"{c}x{h}x{w}->{o}" not in only:
            continue
        x = cupy.asarray(rng.standard_normal((args.batch, c, h, w)).astype(np.float32))
        wt = cupy.asarray((rng.standard_normal((o, c, 3, 3)) * 0.05).astype(np.float32))
        dy = cupy.asarray(rng.standard_normal((args.batch, o, h, w)).astype(np.float32))
        x16, w16, dy16, wt16 = mma.to_nhwc(be, x), mma.to_nhwc(be, wt), mma.to_nhwc(be, dy), mma.turn_weights(be, wt)
        out_dtype = np.uint16 if args.out16 else np.float32        # (bf16 bits)
        y = cupy.empty((args.batch, o, h, w), out_dtype)
        dx = cupy.empty((args.batch, c, h, w), out_dtype)
        act = mma.OUT16 if args.out16 else 0
        part = cupy.zeros((o, 3, 3, c), np.float32)      # (c a multiple of 8: the copies' padding is none)
        buf, _, _ = mma.pooled_outputs(cupy, args.batch, o, h // 2, w // 2, args.out16)

        def forward_calls(tile):          # tile: a Tc16Tile
            calls = {"fwd": mma.plan_conv16(y, x16, w16, None, 1, 1, act, tile, be.sms),
                     "data": mma.plan_conv16_data(dx, dy16, wt16, None, 1, tile, out16=args.out16,
                                                  sms=be.sms)}
            if pooled:
                calls["pool"] = mma.plan_conv16_pool(buf, x16, w16, None, 1, 1, act, tile, be.sms)
            if isinstance(tile, halo.HaloTile):      # (the halo's grid and shared memory)
                return {name: halo.plan(call) for name, call in calls.items()}
            if isinstance(tile, TmaTile):            # (no pooled forward; channels in whole boxes)
                return {name: call for name, call in calls.items() if tma_fits(name, call.geometry[0])}
            return calls

        kept = []                         # the r tiles' K-major copy of dy, made once (outside the timed launches)

        def k_major():
            if not kept:
                kept.append(mma.dy_t(be, dy16))
            return kept[0]

        def filter_calls(tile):           # (it adds into part: the timed launches only add more)
            if isinstance(tile, (halo.HaloFilterTile, halo.HaloSyncFilterTile)):
                return {"filter": halo.plan(mma.plan_conv16_filter(part, dy16, x16, 1, 1, be.sms, tile, 1), be.sms)}
            if isinstance(tile, TmaTile) and not tma_fits("filter", c):
                return {}
            return {"filter": mma.plan_conv16_filter(part, dy16, x16, 1, 1, be.sms, tile, k_major=k_major)}

        for op, outs, make_calls in (("fwd", {"fwd": y, "data": dx}, forward_calls),
                                     ("filter", {"filter": part}, filter_calls)):
            if op not in args.ops.split(","):
                continue
            refs = {}
            shipped = [t for t in mma.tiles16(op, args.precision) if t.wgmma or (op == "filter" and not bf16)]
            shipped += list(TILES16T[op]) if bf16 else []
            for tile in shipped + sandbox[op]:
                kind = ("ws" if isinstance(tile, ws.WsTile) else "mc" if isinstance(tile, mc.McTile) else
                        "fx" if isinstance(tile, fx.FxTile) else "fv" if isinstance(tile, fv.FvTile) else
                        "halo" if isinstance(tile, (halo.HaloTile, halo.HaloFilterTile, halo.HaloSyncFilterTile))
                        else "")
                launch = {"ws": ws.launch, "halo": halo.launch, "mc": mc.launch, "fx": fx.launch, "fv": fv.launch}.get(
                    kind, mma.launch_conv)
                calls = make_calls(tile)
                errs = {}
                for name, out in outs.items():          # each output checked against the first tile's
                    if name not in calls:
                        continue
                    out.fill(0)
                    launch(be, calls[name])
                    got = cupy.asnumpy(out)
                    if got.dtype == np.uint16:                  # bf16 bits
                        got = (got.astype(np.uint32) << 16).view(np.float32)
                    ref = refs.setdefault(name, got)
                    errs[name] = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
                    if not np.all(np.isfinite(got)):
                        errs[name] = float("inf")
                row = {"layer": f"{c}x{h}x{w}->{o}", "tile": tile.name, "sandbox": kind,
                       "check_rel_err": max(errs.values(), default=0.0)}
                if row["check_rel_err"] > RTOL_TC_ROUNDED:
                    row["status"] = "wrong"
                else:
                    for name, call in calls.items():
                        ms = time_ms(cupy, spin, lambda call=call, launch=launch: launch(be, call))
                        row[f"{name}_ms"] = round(ms, 4)
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.out:
        write_result(args.out, {"environment": environment(threads=1, want_gpu=True), "batch": args.batch,
                                "precision": args.precision, "out16": args.out16,
                                "method": " ".join(__doc__.split("\n\n")[:2]).replace("\n", " "), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
