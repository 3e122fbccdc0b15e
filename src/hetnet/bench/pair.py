"""The same model on both sides, and the check every row passes before it is timed.

A Pair is one model, its weights, one batch and an SGD+momentum optimiser in hetnet (on a backend, at a precision)
and in PyTorch. `gate` runs the check: logits, loss, every parameter gradient and the updates of two timed steps
must agree with PyTorch's within a tolerance (common.RTOL_*), else the row is refused and never timed.
`hetnet_peak` / `torch_peak` measure each side's peak memory on a fresh model.

    >>> pair, info, reason = gate(lambda seed: Pair("mlp", 32, get_backend("cpu"), "cpu", seed), 32, 1e-4)
    ...                                                                            # doctest: +SKIP
"""
from __future__ import annotations

import copy
import gc

import numpy as np

from .. import interop, losses, optim
from .. import seed as hn_seed
from ..device import get_backend
from ..layers import Dropout
from ..train import make_eval_step
from .common import (
    FULL_BATCH_RTOL,
    LR,
    MOMENTUM,
    PEER_BOUND_MAX,
    PEER_FACTOR,
    CupyPoolPeak,
    RssPeak,
    TorchCudaPeak,
    rel_err,
    short_error,
)
from .models import resolve_model
from .sides import TorchGraphStep, autocast_for, for_precision, hetnet_to, make_step

CHECK_IMAGES = 32        # the tight check's batch (see Pair.check)


def set_dropout(hmodel, tmodels, p_or_saved):
    """Set every dropout probability to p (a float), or restore saved values (a list); returns the old values."""
    import torch

    hd = [m for m in hmodel.layers if isinstance(m, Dropout)]
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


class Pair:
    """The same model, weights, batch and SGD+momentum optimiser in hetnet (on `backend`, moved at `precision`
    through sides.hetnet_to: `hetnet_note` says why when hetnet cannot run it) and in PyTorch float32 (on `tdev`).
    Inputs: standard normal images and uniform labels drawn from `data_seed`; weights: hetnet's, seed 0."""

    def __init__(self, model_name: str, batch: int, backend, tdev: str, data_seed: int, precision: str = "fp32"):
        import torch

        hn_seed(0)
        self.hmodel, shape = resolve_model(model_name)
        self.input_shape = shape
        self.precision = precision
        self.hetnet_note = hetnet_to(self.hmodel, backend, precision)
        self.hmodel.train()
        self.backend = backend
        self.data_seed = data_seed
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

    def torch_copy(self, precision: str = "fp32"):
        """(model, optimizer, input) for another PyTorch side: a copy of the float32 twin, laid out for `precision`
        (sides.for_precision)."""
        import torch

        tm, tx = for_precision(copy.deepcopy(self.tmodel), self.tx, precision)
        return tm, torch.optim.SGD(tm.parameters(), lr=LR, momentum=MOMENTUM), tx

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
        PyTorch in float64, before the row is refused (gate)."""
        import torch.nn.functional as F

        hmodel = self.hmodel
        tmodel, topt = self._float64() if float64 else (self.tmodel, self.topt)
        hx, hy, tx, ty = (a[:n] for a in (self.hx, self.hy, self.tx, self.ty))
        tx = tx.double() if float64 else tx
        saved = set_dropout(hmodel, [tmodel], 0.0)
        try:
            hmodel.zero_grad()
            logits = hmodel.forward(hx)
            hloss, dlogits = losses.softmax_cross_entropy(logits, hy)
            hmodel.backward(dlogits, need_dx=False)
            topt.zero_grad(set_to_none=True)
            tlogits = tmodel(tx)
            tloss = F.cross_entropy(tlogits, ty)
            tloss.backward()
            errs = {"logits": rel_err(self.backend.to_numpy(logits), tlogits.detach().cpu().numpy()),
                    "loss": abs(float(hloss) - tloss.item()) / max(abs(tloss.item()), 1e-30)}
            tg = interop.torch_grads(tmodel)
            for k, g in _named_grads(hmodel).items():
                errs[f"grad {k}"] = rel_err(g, tg[k])
            hmodel.zero_grad()
            topt.zero_grad(set_to_none=True)
            errs.update(self.check_updates(hx, hy, tx, ty, tmodel=tmodel, topt=topt))
        finally:
            set_dropout(hmodel, [tmodel], saved)
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
            errs.update(_update_errors(f"{prefix}step {s} update ", w0, w1, tw0, tw1))
        return errs

    def check_full_batch(self, float64: bool = False) -> dict:
        """The updates of two timed steps on the whole timed batch (dropout off), against PyTorch in float32 or
        (float64) in float64."""
        tmodel, topt = self._float64() if float64 else (self.tmodel, self.topt)
        tx = self.tx.double() if float64 else self.tx
        saved = set_dropout(self.hmodel, [tmodel], 0.0)
        try:
            return self.check_updates(self.hx, self.hy, tx, self.ty, "full batch ", tmodel=tmodel, topt=topt)
        finally:
            set_dropout(self.hmodel, [tmodel], saved)

    def peer_errors(self, n: int | None = None, prefix: str = "") -> dict:
        """PyTorch at this pair's precision, run as its users run it (the allow_tf32 flags as set; bf16: autocast and
        channels_last), against PyTorch in float64, both from hetnet's current weights, on the first n images (all
        when None), dropout off: the keys of check(n, float64=True) -- logits, loss, every gradient, the updates of
        two steps (prefixed with `prefix`). The yardstick of tf32 and bf16 rows (gate); hetnet is not stepped."""
        import torch
        import torch.nn.functional as F

        tp, popt, px = self.torch_copy(self.precision)
        t64, opt64 = self._float64()
        x, y, x64 = px[:n], self.ty[:n], self.tx[:n].double()
        device_type = self.tx.device.type

        def forward_backward(model, opt, inputs, amp):
            opt.zero_grad(set_to_none=True)
            with autocast_for(self.precision if amp else "fp32", device_type):
                logits = model(inputs)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            return logits.detach().double().cpu().numpy(), loss.item()

        def align():   # the precision's model takes the float64 model's weights (rounded to float32 once)
            with torch.no_grad():
                for a, b in zip(tp.parameters(), t64.parameters()):
                    a.copy_(b)

        saved = set_dropout(self.hmodel, [tp, t64], 0.0)
        try:
            align()
            plogits, ploss = forward_backward(tp, popt, x, True)
            logits64, loss64 = forward_backward(t64, opt64, x64, False)
            errs = {f"{prefix}logits": rel_err(plogits, logits64),
                    f"{prefix}loss": abs(ploss - loss64) / max(abs(loss64), 1e-30)}
            gp = interop.torch_grads(tp)
            for k, g in interop.torch_grads(t64).items():
                errs[f"{prefix}grad {k}"] = rel_err(gp[k], g)
            for s in (1, 2):
                align()
                w0, w0_64 = _torch_weights(tp), _torch_weights(t64)
                for model, opt, inputs, amp in ((tp, popt, x, True), (t64, opt64, x64, False)):
                    forward_backward(model, opt, inputs, amp)
                    opt.step()
                w1, w1_64 = _torch_weights(tp), _torch_weights(t64)
                errs.update(_update_errors(f"{prefix}step {s} update ", w0, w1, w0_64, w1_64))
        finally:
            set_dropout(self.hmodel, [tp, t64], saved)
        return errs


ALL = "(all parameters)"


def _update_errors(label: str, w0: dict, w1: dict, r0: dict, r1: dict) -> dict:
    """Relative errors of the update w1 - w0 against the reference's r1 - r0, per parameter and of all of them
    together (keys: label + name, label + ALL)."""
    errs = {label + k: rel_err(w1[k] - w0[k], r1[k] - r0[k]) for k in w0}
    errs[label + ALL] = rel_err(np.concatenate([(w1[k] - w0[k]).ravel() for k in w0]),
                                np.concatenate([(r1[k] - r0[k]).ravel() for k in w0]))
    return errs


def _sig(v: float) -> float:
    return float(f"{v:.3g}")


def gate(make_pair, batch: int, tol: float, float32_first: bool = True,
         full_tol: float = FULL_BATCH_RTOL) -> tuple[Pair, dict, str | None]:
    """The check before timing: (the pair to time, the row's check fields, None) or (..., the reason to refuse).

    float32_first (fp32 rows): tight on <= 32 images against PyTorch float32, a second batch when the first fails;
    when both fail, the second batch against PyTorch in float64, the exact result rounded once: a max-pool near-tie
    that PyTorch's float32 routes away from it is PyTorch's rounding, not hetnet's error (the row records both).
    Then the timed step's updates on the whole batch at `full_tol`; where the two float32 steps are further apart,
    each against PyTorch in float64, hetnet within the larger of full_tol and PEER_FACTOR times PyTorch float32's
    own error (a float32 algorithm's rounding flips max-pool near-ties on either side; the row records both), on a
    second batch where the first fails (_full_batch_float32). Otherwise (tf32 and bf16 rows: _gate_against_peer)
    against float64, each quantity within the larger of the tolerance and PEER_FACTOR times PyTorch's own error at
    that precision. make_pair(seed) builds a fresh Pair on
    the batch drawn from `seed`."""
    if not float32_first:
        return _gate_against_peer(make_pair, batch, tol, full_tol)
    n_check = min(batch, CHECK_IMAGES)
    info: dict = {"check_images": n_check, "check_reference": "float32"}
    first = last32 = None
    for data_seed, f64 in ((1, False), (2, False), (2, True)):
        pair = make_pair(data_seed)        # afresh for every attempt: no momentum yet
        errs = pair.check(n_check, float64=f64)
        worst = max(errs, key=errs.get)
        rec = {"data_seed": data_seed, "worst": worst, "rel_err": _sig(errs[worst])}
        if f64:
            info["check_float64"] = {"data_seed": data_seed, "against_float32": last32[1],
                                     "worst": worst, "rel_err": rec["rel_err"]}
            if not errs[worst] <= tol:
                errs, worst = last32[0], last32[1]["worst"]   # the row reports its float32 errors
        if errs[worst] <= tol:
            break
        if not f64:
            last32 = (errs, {"worst": worst, "rel_err": rec["rel_err"]})
        first = first or rec
    info.update(check_max_rel_err=_sig(errs[worst]), check_worst=worst, hetnet_path=pair.path)
    if first:
        info["check_first_batch_failed"] = first
    if not errs[worst] <= tol:
        return pair, info, (f"hetnet and PyTorch disagree before timing, on two different batches and in float64: "
                            f"{worst} relative error {errs[worst]:.3g} > {tol:g}")
    if batch > n_check:
        # fresh pairs: the check above stepped hetnet's optimiser and only the PyTorch model it checked against
        # (float32 or float64), so their momenta would no longer match on the timed pair
        pair, full_info, reason = _full_batch_float32(make_pair, (data_seed, data_seed + 1), full_tol)
        info.update(full_info)
        if reason:
            return pair, info, reason
    return pair, info, None


def _full_batch_float32(make_pair, seeds, full_tol: float) -> tuple[Pair, dict, str | None]:
    """gate's whole-batch check of an fp32 row: the updates of two timed steps against PyTorch float32 within
    full_tol; where they are further apart, both float32 steps against float64, hetnet within the larger of full_tol
    and PEER_FACTOR times PyTorch float32's own error (each side's float32 rounding routes some max-pool near-ties
    away from the exact step's). Refused only when one quantity is over its bound on the batch of each seed: a
    near-tie routed the other way falls on one batch, a defect repeats. Returns the pair to time: the one the
    float32 check stepped alike on both sides, else a fresh one (the float64 check steps hetnet alone)."""
    info: dict = {}
    failing = None                     # the quantities over their bound on every batch so far
    for seed in seeds:
        pair = make_pair(seed)
        full = pair.check_full_batch()
        fworst = max(full, key=full.get)
        info.update(check_full_batch_max_rel_err=_sig(full[fworst]), check_full_batch_tolerance=full_tol)
        info.pop("check_full_batch_float64", None)
        if full[fworst] <= full_tol:
            return pair, info, None        # both sides stepped alike: their momenta still match
        pair = make_pair(seed)
        peer = pair.peer_errors(None, prefix="full batch ")
        full = pair.check_full_batch(float64=True)
        fworst, fbound, ok = _against_peer(full, peer, full_tol)
        judged = {"data_seed": seed, "worst": fworst, "rel_err": _sig(full[fworst]), "bound": _sig(fbound),
                  "peer_rel_err": _sig(peer.get(fworst, 0.0))}
        info["check_full_batch_float64"] = judged
        if ok:
            return make_pair(seed), info, None
        over = {k for k in full if full[k] > _peer_bound(peer, k, full_tol)}
        failing = over if failing is None else failing & over
        if not failing:
            return make_pair(seed), info, None
        info.setdefault("check_full_batch_first_failed", judged)
    return pair, info, (f"the timed step's update on the whole batch disagrees with PyTorch's in float32 and is "
                        f"further from float64 than {PEER_FACTOR:g}x PyTorch float32's on each of {len(seeds)} "
                        f"batches: {fworst} relative error {full[fworst]:.3g} > {fbound:.3g}")


def _against_peer(errs: dict, peer: dict, floor: float) -> tuple[str, float, bool]:
    """(the key nearest its bound or over it, that bound, whether every key is within its bound): key k's bound is
    max(floor, min(PEER_FACTOR * peer[k], PEER_BOUND_MAX)): hetnet's error against float64 within a multiple of
    PyTorch's, and never a bound of 1 or more."""
    bounds = {k: _peer_bound(peer, k, floor) for k in errs}
    worst = max(errs, key=lambda k: errs[k] / bounds[k])
    return worst, bounds[worst], all(errs[k] <= bounds[k] for k in errs)


def _peer_bound(peer: dict, key: str, floor: float) -> float:
    return max(floor, min(PEER_FACTOR * peer.get(key, 0.0), PEER_BOUND_MAX))


PEER_BATCHES = (1, 2, 3)   # the data seeds of the tf32 / bf16 rows' small checks (_gate_against_peer)


def _gate_against_peer(make_pair, batch: int, tol: float, full_tol: float) -> tuple[Pair, dict, str | None]:
    """gate for tf32 and bf16 rows: hetnet at the row's precision and PyTorch at it (Pair.peer_errors) are each
    held against PyTorch in float64 on the same <= 32 images, then on the whole batch (the update of all parameters
    together: a parameter whose gradient terms cancel, such as a batch norm's scale, has a large relative error at any
    precision, and the small check has looked at each one).

    A row is refused only when one quantity is over its bound on each of the batches of PEER_BATCHES (checked until
    every quantity has been within its bound on one of them). A ReLU whose input is within the precision's rounding
    of 0 decides differently on the two sides and moves the gradients of the weights before it: in float64 with
    fashion-cnn's weights and 32 images rounded to tf32 once, its first dense weight gradient (13.weight) is 3e-4 to
    4e-4 from float64 on the 9 of 12 batches where no ReLU after it flips, 7e-3 to 2.6e-2 on the 3 where one does
    (benchmarks/relu_flips.py; results/vm/relu_flips.json). Such a flip falls on one batch and not the next, on either
    side; a defect repeats on every batch."""
    n_check = min(batch, CHECK_IMAGES)
    info: dict = {"check_images": n_check, "check_reference": "float64", "check_peer_factor": PEER_FACTOR}
    failing, seen = None, []          # the quantities over their bound on every batch so far; each batch's figures
    for data_seed in PEER_BATCHES:
        pair = make_pair(data_seed)
        peer = pair.peer_errors(n_check)   # first: it reads hetnet's weights before the check steps them
        errs = pair.check(n_check, float64=True)
        worst, bound, ok = _against_peer(errs, peer, tol)
        over = {k for k in errs if errs[k] > _peer_bound(peer, k, tol)}
        failing = over if failing is None else failing & over
        seen.append((errs, peer))
        if not failing:
            break
        info.setdefault("check_first_batch_failed", {"data_seed": data_seed, "worst": worst,
                                                     "rel_err": _sig(errs[worst]), "bound": _sig(bound)})
    info.update(check_max_rel_err=_sig(errs[worst]), check_worst=worst, check_bound=_sig(bound),
                check_peer_rel_err=_sig(peer.get(worst, 0.0)), check_batches=len(seen), hetnet_path=pair.path)
    if failing:
        key = max(failing, key=lambda k: min(e[k] / _peer_bound(p, k, tol) for e, p in seen))
        figures = ", ".join(f"{e[key]:.3g} > {_peer_bound(p, key, tol):.3g} (PyTorch's {p.get(key, 0.0):.3g})"
                            for e, p in seen)
        return pair, info, (f"hetnet is further from float64 than {PEER_FACTOR:g}x PyTorch at the same precision "
                            f"(or the tolerance {tol:g}) on each of {len(seen)} batches: {key} relative error "
                            f"{figures}")
    if batch > n_check:
        pair = make_pair(data_seed)        # a fresh pair, as in gate
        peer = pair.peer_errors(None, prefix="full batch ")
        full = {k: v for k, v in pair.check_full_batch(float64=True).items() if k.endswith(ALL)}
        fworst, fbound, ok = _against_peer(full, peer, full_tol)
        info.update(check_full_batch_max_rel_err=_sig(full[fworst]), check_full_batch_tolerance=full_tol,
                    check_full_batch_bound=_sig(fbound), check_full_batch_peer_rel_err=_sig(peer[fworst]))
        if not ok:
            return pair, info, (f"the timed step's update on the whole batch is further from float64 than "
                                f"{PEER_FACTOR:g}x PyTorch's at the same precision: {fworst} relative error "
                                f"{full[fworst]:.3g} > {fbound:.3g}")
    return pair, info, None


# --- peak memory: a fresh model per side, each on the path it is timed on -------------------------------------


def hetnet_peak(model_name: str, backend, x, y, gpu: bool, precision: str = "fp32", with_eval: bool = True
                ) -> dict:
    """{"hetnet_peak_mib"[, "hetnet_reserved_mib"]}: a fresh model's first training steps (two on a GPU: the second
    is the captured graph's first replay) and, with_eval, as many evaluation passes, through the trainer's step
    objects (hetnet.train.make_train_step / make_eval_step). GPU: the high-water mark of bytes live in CuPy's pools
    (common.CupyPoolPeak), and of bytes they hold (reserved); CPU: the rise of the RSS high-water mark (RssPeak).
    Empty when hetnet cannot run the model at `precision`."""

    passes = 2 if gpu else 1
    backend = get_backend(backend.name, precision)   # the backend the model moves to: its step pool is measured
    with (CupyPoolPeak(backend) if gpu else RssPeak()) as m:
        hn_seed(0)
        hm, _ = resolve_model(model_name)
        if hetnet_to(hm, backend, precision) is not None:
            return {}
        hm.train()
        hx, hy = backend.asarray(x), backend.labels(y)
        st, _ = make_step(hm, optim.SGD(hm.parameters(), lr=LR, momentum=MOMENTUM))
        for _ in range(passes):
            st.step(hx, hy)
        st.collect()
        if with_eval:
            hm.eval()
            ev = make_eval_step(hm)
            for _ in range(passes):
                ev.step(hx, hy)
            ev.collect()
        backend.synchronize()
    out = {"hetnet_peak_mib": m.mib}
    if gpu:
        out["hetnet_reserved_mib"] = m.reserved_mib
    return out


def torch_peak(model_name: str, x, y, tdev: str, gpu: bool, precision: str = "fp32", graph: bool = False,
               with_eval: bool = True) -> dict:
    """{"torch_peak_mib"[, "torch_reserved_mib"]}: a fresh PyTorch twin at `precision`, its first training steps
    (eager, or graph: captured as a CUDA graph and replayed once) and, with_eval, evaluation passes under
    inference_mode. GPU: torch.cuda.max_memory_allocated (and _reserved) over the span; CPU: RssPeak."""
    import torch
    import torch.nn.functional as F


    passes = 2 if gpu else 1
    with (TorchCudaPeak() if gpu else RssPeak()) as m:
        hn_seed(0)
        tm = interop.to_torch(resolve_model(model_name)[0], device=tdev)
        tx, ty = torch.from_numpy(x).to(tdev), torch.from_numpy(y.astype(np.int64)).to(tdev)
        tm, tx = for_precision(tm, tx, precision)
        to = torch.optim.SGD(tm.parameters(), lr=LR, momentum=MOMENTUM)
        if graph:
            TorchGraphStep(tm, to, tx, ty, precision=precision).step()
        else:
            for _ in range(passes):
                to.zero_grad(set_to_none=True)
                with autocast_for(precision, tx.device.type):
                    loss = F.cross_entropy(tm(tx), ty)
                loss.backward()
                to.step()
        if with_eval:
            with torch.inference_mode(), autocast_for(precision, tx.device.type):
                tm.eval()
                for _ in range(passes):
                    tm(tx)
    out = {"torch_peak_mib": m.mib}
    if gpu:
        out["torch_reserved_mib"] = m.reserved_mib
    return out


def peak_memory(model_name: str, backend, x, y, tdev: str, gpu: bool, precision: str = "fp32",
                torch_graph: bool = False, with_eval: bool = True) -> dict:
    """hetnet_peak and torch_peak one after the other (hetnet's freed first); a side that fails leaves its keys
    out and records why in "peak_memory_error"."""

    out, errors = {}, []
    for name, fn in (("hetnet", lambda: hetnet_peak(model_name, backend, x, y, gpu, precision, with_eval)),
                     ("torch", lambda: torch_peak(model_name, x, y, tdev, gpu, precision, torch_graph, with_eval))):
        try:
            out.update(fn())
        except Exception as e:  # memory is one column of the row: the rest stands
            errors.append(f"{name}: {short_error(e)}")
        gc.collect()
    if errors:
        out["peak_memory_error"] = "; ".join(errors)
    return out
