"""What one rounding of a model's weights and inputs to a reduced precision does to its gradients on a small batch, and
how many ReLU decisions it flips: the precision table's gate (hetnet.bench.pair._gate_against_peer) holds hetnet and
PyTorch at tf32 / bf16 against float64 on 32 images, where one ReLU input within the rounding of 0 that decides the
other way moves the gradient of the weights before it by about 1 / sqrt(their rows x the images).

All in float64 on the reference backend: for each batch (standard normal images, uniform labels, drawn from seeds
0, 1, ...), the gradients of the mean cross-entropy with the weights and the images rounded once to the precision's
mantissa (tf32: 10 bits, bf16: 7; to nearest, ties to even) against those of the unrounded ones (relative error
||a - b|| / ||b||), and for each ReLU the number of its inputs whose sign the rounding changed. Dropout off. ->
relu_flips.json, one row per batch.

    PYTHONPATH=src python benchmarks/relu_flips.py --model fashion-cnn --precision tf32 --batches 12 \\
        --out benchmarks/results/cpu/relu_flips.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import hetnet as hn  # noqa: E402
from hetnet import losses  # noqa: E402
from hetnet.bench.common import environment, rel_err, write_result  # noqa: E402
from hetnet.bench.models import resolve_model  # noqa: E402
from hetnet.layers import Dropout, ReLU  # noqa: E402

MANTISSA = {"tf32": 10, "bf16": 7}


def round_mantissa(a, bits: int) -> np.ndarray:
    """float32 a rounded to `bits` mantissa bits, to nearest with ties to even (as cvt.rn does)."""
    a = np.array(a, dtype=np.float32)
    u = a.view(np.uint32)
    drop = np.uint32(23 - bits)
    u += np.uint32((1 << (23 - bits - 1)) - 1) + ((u >> drop) & np.uint32(1))
    u &= ~np.uint32((1 << (23 - bits)) - 1)
    return a


def _model(name: str, state: dict | None = None):
    hn.seed(0)
    model, shape = resolve_model(name)
    model = model.to("reference")
    if state is not None:
        model.load_state_dict(state)
    for layer in model.layers:
        if isinstance(layer, Dropout):
            layer.p = 0.0
    model.train()
    return model, shape


def _relu_inputs(model, x) -> dict:
    """{layer index: the input of each ReLU layer} of one forward, layer by layer."""
    out, be = {}, model.backend
    for i, layer in enumerate(model.layers):
        if isinstance(layer, ReLU):
            out[i] = be.to_numpy(x)
        x = layer.forward(x)
    return out


def _gradients(model, x, y) -> dict:
    model.zero_grad()
    logits = model.forward(x)
    _, dlogits = losses.softmax_cross_entropy(logits, y)
    model.backward(dlogits, need_dx=False)
    return {f"{i}.{k}": model.backend.to_numpy(p.grad) for i, layer in enumerate(model.layers)
            for k, p in layer.params.items()}


def measure(name: str, precision: str, batches: int, images: int) -> list[dict]:
    exact, shape = _model(name)
    state = exact.state_dict()
    bits = MANTISSA[precision]
    rounded, _ = _model(name, {k: v if k.endswith(("running_mean", "running_var")) else round_mantissa(v, bits)
                               for k, v in state.items()})
    classes = exact.output_shape(shape)[0]
    rows = []
    for seed in range(batches):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((images, *shape)).astype(np.float32)
        y = rng.integers(0, classes, images)
        xr = round_mantissa(x, bits)
        be = exact.backend
        flips = {i: int(np.sum((a > 0) != (b > 0))) for (i, a), b in
                 zip(_relu_inputs(exact, be.asarray(x)).items(), _relu_inputs(rounded, be.asarray(xr)).values())}
        g, gr = _gradients(exact, be.asarray(x), be.labels(y)), _gradients(rounded, be.asarray(xr), be.labels(y))
        rows.append({"data_seed": seed, "relu_flips": flips,
                     "grad_rel_err": {k: float(f"{rel_err(gr[k], g[k]):.3g}") for k in g}})
        print(f"batch {seed}: ReLU flips {flips}; " + ", ".join(f"{k} {v:.2g}" for k, v in
                                                               rows[-1]["grad_rel_err"].items()), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fashion-cnn")
    ap.add_argument("--precision", choices=sorted(MANTISSA), default="tf32")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("relu_flips.json"))
    args = ap.parse_args(argv)
    rows = measure(args.model, args.precision, args.batches, args.images)
    write_result(args.out, {"environment": environment(1, False), "model": args.model, "precision": args.precision,
                            "images": args.images, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
