"""Training and evaluation loops: epochs, progress, metrics, weight averaging, and fit on arrays.

The work of one batch is a step object of hetnet.plan (`make_train_step` / `make_eval_step`):
`step(xb, yb)` -- forward, loss, backward, optimiser and schedule step for one batch of device arrays; loss and
number of correct predictions are accumulated on the device -- and `collect() -> (loss_sum: float, correct: int,
count: int)`: the sums since the previous `collect()` (or since creation), which it then resets to zero. `loss_sum`
is the sum of the per-example losses. Batches reach the device through `backend.asarray(xb)` and
`backend.labels(yb)`, or come from a loader that serves device arrays (hetnet.data.ResidentLoader).

    >>> import hetnet as hn, numpy as np
    >>> model = hn.Sequential([hn.Flatten(), hn.Dense(4, 3)]).to("cpu")
    >>> x, y = np.random.rand(64, 1, 2, 2).astype(np.float32), np.arange(64) % 3
    >>> history = model.fit(x, y, epochs=2, batch_size=16, optimizer="sgd", lr=0.1)      # doctest: +SKIP
    >>> history[-1]["train_accuracy"]                                                      # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import fnmatch
import itertools
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from fractions import Fraction

import numpy as np
from tqdm import tqdm

from . import optim
from .errors import TrainingDiverged, UsageError
from .plan import EvalStep, TrainStep

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "nesterov-decoupled")
METRIC_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
               "seconds", "images_per_second", "warmup_seconds", "tta", "steps")
# The first steps at a new batch shape compile (the cpu backend's Numba functions), select kernels and capture a CUDA
# graph (the cuda backend: the first call of a shape tunes, the second captures). They are timed on their own
# (device synchronised around them), reported as an epoch's `warmup_seconds` and left out of `images_per_second`,
# which is the rate of the training steps alone. Nothing else changes: the same steps run on the same batches.
WARMUP_STEPS_PER_SHAPE = 2


# --- optimiser and schedule by name ----------------------------------------------------------------------------

GROUP_KEYS = ("params", "lr_scale", "weight_decay_scale")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                   batch_size: int | None = None):
    """'sgd' (plain, the thesis's), 'momentum' (SGD with Nesterov momentum), 'adam', 'adamw', or
    'nesterov-decoupled': Nesterov SGD with airbench's decoupled hyperparameters -- lr and weight_decay per 1024
    examples, the step size independent of momentum and the decay of lr (hetnet.optim.decoupled_sgd maps them onto
    SGD's; needs batch_size).

    params: a list of parameters, or groups [{"params": [...], "lr_scale": 64.0, "weight_decay_scale": 1.0}, ...]
    (both scales default to 1; group_parameters builds them from a recipe's rules). A group trains at lr * lr_scale
    with weight decay weight_decay * weight_decay_scale; under 'nesterov-decoupled' lr_scale scales the step only
    and the decay per step stays the same (airbench's 64x learning rate for BatchNorm biases).

        >>> opt = make_optimizer("nesterov-decoupled", group_parameters(model, [{"params": "BatchNorm*.bias",
        ...                      "lr_scale": 64}]), lr=11.5, weight_decay=0.0153, momentum=0.85, batch_size=1024)
        ...                                                                          # doctest: +SKIP
    """
    if name not in OPTIMIZERS:
        raise UsageError(f"--optimizer: unknown optimizer {name!r} (expected one of {', '.join(OPTIMIZERS)})")
    items = list(params)
    grouped = bool(items) and all(isinstance(g, dict) for g in items)
    groups = items if grouped else [{"params": items}]
    for i, g in enumerate(groups):
        unknown = sorted(set(g) - set(GROUP_KEYS))
        if unknown:
            raise UsageError(f"parameter group {i}: unknown key(s) {', '.join(unknown)} (expected "
                             f"{', '.join(GROUP_KEYS)})")
    if name in ("momentum", "nesterov-decoupled") and not 0 < momentum < 1:
        raise UsageError(f"--momentum: expected a number in (0, 1), got {momentum!r}")
    if name == "nesterov-decoupled":
        if batch_size is None:
            raise UsageError("--optimizer: nesterov-decoupled needs the batch size (its lr and weight decay are per "
                             "1024 examples)")
        hyper = [optim.decoupled_sgd(lr, weight_decay * g.get("weight_decay_scale", 1.0), momentum, batch_size,
                                     g.get("lr_scale", 1.0)) for g in groups]
    else:
        hyper = [{"lr": lr * g.get("lr_scale", 1.0), "weight_decay": weight_decay * g.get("weight_decay_scale", 1.0)}
                 for g in groups]
    torch_groups = [{"params": g["params"], **h} for g, h in zip(groups, hyper)]
    first = hyper[0]
    if name == "sgd":
        return optim.SGD(torch_groups, lr=first["lr"])
    if name in ("momentum", "nesterov-decoupled"):
        return optim.SGD(torch_groups, lr=first["lr"], momentum=momentum, nesterov=True)
    if name == "adam":
        return optim.Adam(torch_groups, lr=first["lr"])
    return optim.AdamW(torch_groups, lr=first["lr"])


def group_parameters(model, rules) -> list:
    """Parameter groups for make_optimizer from a recipe's rules (see check_param_groups), in rule order, then the
    parameters no rule took (scale 1). A rule takes the parameters not taken before whose name matches one of its
    patterns (fnmatch): '<layer index>.<name>', the state_dict key ('3.bias'), or '<layer type>.<name>'
    ('BatchNorm2D.bias'). UsageError for a rule that matches no parameter; groups left empty are dropped.

        >>> group_parameters(model, [{"params": "BatchNorm*.bias", "lr_scale": 64}])    # doctest: +SKIP
        [{'params': [...], 'lr_scale': 64.0, 'weight_decay_scale': 1.0}, {'params': [...]}]
    """
    rules = check_param_groups(rules)
    named, seen = [], set()
    for i, layer in enumerate(model.layers):
        for k, p in layer.params.items():
            if id(p) not in seen:
                seen.add(id(p))
                named.append(({f"{i}.{k}", f"{type(layer).__name__}.{k}"}, p))
    taken: set = set()
    groups = []
    for i, rule in enumerate(rules):
        hits = [p for names, p in named if any(fnmatch.fnmatchcase(n, pat) for n in names for pat in rule["params"])]
        if not hits:
            raise UsageError(f"recipe field param_groups, rule {i}: {', '.join(rule['params'])} matches none of the "
                             f"model's parameters (names like '0.weight' or 'Conv2D.weight')")
        mine = [p for p in hits if id(p) not in taken]
        taken.update(id(p) for p in mine)
        groups.append({**rule, "params": mine})
    groups.append({"params": [p for _, p in named if id(p) not in taken]})
    return [g for g in groups if g["params"]]


def check_param_groups(rules) -> list[dict]:
    """A recipe's parameter-group rules, checked: a list of {"params": pattern or [patterns], "lr_scale": s > 0,
    "weight_decay_scale": w >= 0} (scales default to 1), returned with a list of patterns and float scales."""
    if not isinstance(rules, (list, tuple)):
        raise UsageError(f"recipe field param_groups: expected a list of rules, got {rules!r}")
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or "params" not in rule:
            raise UsageError(f"recipe field param_groups, rule {i}: expected {{\"params\": PATTERN, \"lr_scale\": ..., "
                             f"\"weight_decay_scale\": ...}}, got {rule!r}")
        unknown = sorted(set(rule) - set(GROUP_KEYS))
        if unknown:
            raise UsageError(f"recipe field param_groups, rule {i}: unknown key(s) {', '.join(unknown)} (expected "
                             f"{', '.join(GROUP_KEYS)})")
        pats = [rule["params"]] if isinstance(rule["params"], str) else rule["params"]
        if not (isinstance(pats, (list, tuple)) and pats and all(isinstance(p, str) and p for p in pats)):
            raise UsageError(f"recipe field param_groups, rule {i}: 'params' must be a name pattern or a list of "
                             f"them, got {rule['params']!r}")
        scales = {}
        for key in ("lr_scale", "weight_decay_scale"):
            v = rule.get(key, 1.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    (v <= 0 if key == "lr_scale" else v < 0):
                raise UsageError(f"recipe field param_groups, rule {i}: {key} must be a finite number "
                                 f"{'> 0' if key == 'lr_scale' else '>= 0'}, got {v!r}")
            scales[key] = float(v)
        out.append({"params": list(pats), **scales})
    return out


SCHEDULE_ARGS = {"triangular": ("start", "peak", "end")}


def parse_schedule(text: str) -> tuple[str, dict]:
    """(name, keyword arguments) of a schedule: a name of hetnet.optim.SCHEDULES, optionally with arguments where
    the schedule has some: 'triangular:start=0.2,peak=0.23,end=0.07' (airbench94's, also triangular's defaults)."""
    if not isinstance(text, str):
        raise UsageError(f"--schedule: expected a schedule name, got {text!r}")
    name, _, args = text.partition(":")
    if name not in optim.SCHEDULES:
        raise UsageError(f"--schedule: unknown schedule {name!r} (expected one of {', '.join(optim.SCHEDULES)})")
    allowed = SCHEDULE_ARGS.get(name, ())
    kwargs = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if key not in allowed or not eq:
            raise UsageError(f"--schedule: {name} takes " + (f"{', '.join(k + '=X' for k in allowed)}"
                             if allowed else "no arguments") + f", got {item!r}")
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise UsageError(f"--schedule: {key} must be a number, got {value!r}") from None
    return name, kwargs


def make_schedule(name: str, optimizer, total_steps: int, warmup_steps: int = 0):
    """A per-batch schedule from hetnet.optim.SCHEDULES: constant, step (x0.1 at 1/3 and 2/3), cosine, onecycle,
    triangular (airbench's; arguments as parse_schedule reads them). onecycle and triangular have their own
    warm-up and ignore warmup_steps."""
    name, kwargs = parse_schedule(name)
    total_steps, warmup_steps = max(1, int(total_steps)), max(0, int(warmup_steps))
    if name == "constant":
        return optim.ConstantLR(optimizer, warmup_steps=warmup_steps)
    if name == "step":
        return optim.StepLR(optimizer, step_size=max(1, (total_steps - warmup_steps) // 3), gamma=0.1,
                            warmup_steps=warmup_steps)
    if name == "cosine":
        return optim.CosineLR(optimizer, total_steps=total_steps, warmup_steps=warmup_steps)
    if name == "triangular":
        try:
            return optim.TriangularLR(optimizer, total_steps=total_steps, **kwargs)
        except ValueError as e:
            raise UsageError(f"--schedule: {e}") from None
    return optim.OneCycleLR(optimizer, total_steps=total_steps)


# --- fractional epochs -----------------------------------------------------------------------------------------
# A run of E epochs over B batches an epoch trains T = ceil(E * B) steps (airbench's total_train_steps): epochs
# 1 .. ceil(E), the last one stopping after T - (ceil(E) - 1) * B of its batches (in 1 .. B). E = 9.9, B = 43:
# T = 426, nine whole epochs and 39 batches of the tenth. A whole E gives T = E * B and every epoch whole. The
# product is taken on E as written in decimal (Fraction(str(E))): 0.14 epochs of 100 batches are 14 steps, not the
# 15 that the float product 14.000000000000002 would give.


def total_steps(epochs, steps_per_epoch: int) -> int:
    """T = ceil(epochs * steps_per_epoch): the steps of a run, which its schedules and lookahead span.

        >>> total_steps(9.9, 43), total_steps(10, 44)
        (426, 440)
    """
    return math.ceil(Fraction(str(epochs)) * int(steps_per_epoch))


def steps_in_epoch(epochs, steps_per_epoch: int, e: int) -> int:
    """Batches that epoch e (0-based, e < ceil(epochs)) trains: all steps_per_epoch, but the rest of total_steps in
    the last epoch of a fractional run.

        >>> steps_in_epoch(9.9, 43, 8), steps_in_epoch(9.9, 43, 9)
        (43, 39)
    """
    return min(int(steps_per_epoch), total_steps(epochs, steps_per_epoch) - e * int(steps_per_epoch))


def format_epochs(epochs) -> str:
    """A number of epochs as given: 9.9 -> '9.9', 10 and 10.0 -> '10'."""
    return str(int(epochs)) if float(epochs).is_integer() else repr(float(epochs))


# --- Ctrl-C that cannot get lost -----------------------------------------------------------------------------------
# A KeyboardInterrupt raised while the main thread is inside a ctypes callback is printed as "Exception ignored"
# (with a traceback) and dropped. Numba's llvmlite calls back into Python that way while it loads compiled code in a
# process's first steps, so a Ctrl-C landing there let training run on (seen as a 60 s timeout of
# test_ctrl_c_exits_130_with_one_line in a fresh clone). Under `interruptible()` the SIGINT handler records the
# signal and, while Numba / llvmlite code is on the stack, does not raise; the training and evaluation loops raise
# it after the batch (`check_interrupt`).

_sigint_seen = [False]


@contextlib.contextmanager
def interruptible():
    """Ctrl-C raises KeyboardInterrupt as usual, except while Numba / llvmlite code runs, where it is kept for
    check_interrupt (main thread with Python's default handler only; otherwise a no-op)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def handler(signum, frame):
        _sigint_seen[0] = True
        f = frame
        while f is not None:
            if _in_jit_loader(f.f_code.co_filename):
                return                      # raised by check_interrupt after this batch
            f = f.f_back
        raise KeyboardInterrupt

    _sigint_seen[0] = False
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _sigint_seen[0] = False


def _in_jit_loader(filename: str) -> bool:
    parts = filename.replace("\\", "/").split("/")
    return "numba" in parts or "llvmlite" in parts


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived under interruptible() (even one whose exception was dropped)."""
    if _sigint_seen[0]:
        raise KeyboardInterrupt


# --- the step objects ----------------------------------------------------------------------------------------


def make_train_step(model, optimizer, schedule=None, label_smoothing: float = 0.0, reducer=None) -> TrainStep:
    """The step object training runs: hetnet.plan.TrainStep (forward, loss, backward, update through the model's
    plan; on the GPU captured once as a CUDA graph and replayed). reducer: a data-parallel job's gradient
    reduction (hetnet.parallel.Dist.reducer), None for one process."""
    return TrainStep(model, optimizer, schedule, label_smoothing, reducer=reducer)


def make_eval_step(model, tta: int = 0) -> EvalStep:
    """The step object evaluation runs (call model.eval() first): hetnet.plan.EvalStep; with test-time augmentation
    (tta 1 or 2, see tta_logits) a TTAEvalStep, whose loss and accuracy are those of the averaged logits."""
    tta = check_tta(tta)
    return TTAEvalStep(model, tta) if tta else EvalStep(model)


# --- test-time augmentation --------------------------------------------------------------------------------------
#
# airbench's `infer` (tta_level 0, 1, 2), in hetnet's terms. With f the model's logits and m(v) = (f(v) + f(v'))/2,
# v' the mirror image of v (left-right):
#   level 0: f(x)
#   level 1: m(x)
#   level 2: m(x)/2 + (m(t-) + m(t+))/4, t-/t+ the image translated by one pixel towards / away from the top-left
#            corner, reflect-padded: t-[i, j] = x[r(i - 1), r(j - 1)], t+[i, j] = x[r(i + 1), r(j + 1)], r
#            reflecting an index at the border without repeating it (r(-1) = 1, r(H) = H - 2), as torch's F.pad
#            'reflect' and airbench's crops of it (rows/columns 0..H-1 and 2..H+1 of the image padded by 1).
# So level 2 weighs f(x), f(x') by 1/4 and f(t-), f(t-'), f(t+), f(t+') by 1/8.
# Level 3 ("shift", for images that are not mirror-symmetric, such as Fashion-MNIST's shoes, which all point one
# way): (f(x) + f(x moved one pixel up) + ... down, left, right) / 5, the border row or column repeated
# (edge_shift), the views a training crop of one pixel produces (crop:1) where the border is the background.

TTA_LEVELS = (0, 1, 2, 3)
TTA_NAMES = {0: "none", 1: "mirror", 2: "mirror + translate", 3: "shift"}


def check_tta(level) -> int:
    if isinstance(level, bool) or level not in TTA_LEVELS:
        raise UsageError(f"--tta: expected 0 (none), 1 (mirror), 2 (mirror + translate) or 3 (shift), got "
                         f"{level!r}")
    return int(level)


def reflect_shift(xp, x, axis: int, s: int):
    """out[..., i, ...] = x[..., r(i + s), ...] along `axis`, r reflecting at the borders (|s| < size): x moved by
    -s, the pixels that come in mirrored from inside. Slices and copies only (no index arrays to upload), so it can
    run inside a captured CUDA graph."""
    n = x.shape[axis]
    if s == 0:
        return x
    if abs(s) >= n:
        raise UsageError(f"--tta 2: images of {n} pixels along an axis cannot be translated by {abs(s)} with "
                         f"reflection")

    def sl(lo, hi, step=1):
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(lo, hi, step)
        return tuple(idx)

    out = xp.empty_like(x)
    if s > 0:               # out[:n-s] = x[s:]; out[n-s+k] = x[n-2-k], k < s
        out[sl(0, n - s)] = x[sl(s, n)]
        out[sl(n - s, n)] = x[sl(n - 1 - s, n - 1)][sl(None, None, -1)]
    else:                   # out[t:] = x[:n-t]; out[k] = x[t-k], k < t
        t = -s
        out[sl(t, n)] = x[sl(0, n - t)]
        out[sl(0, t)] = x[sl(1, t + 1)][sl(None, None, -1)]
    return out


def edge_shift(xp, x, axis: int, s: int):
    """out[..., i, ...] = x[..., clamp(i + s), ...] along `axis`: x moved by -s, the border row or column repeated
    where pixels come in (|s| < size). Slices and copies only, as reflect_shift."""
    n = x.shape[axis]
    if s == 0:
        return x
    if abs(s) >= n:
        raise UsageError(f"--tta 3: images of {n} pixels along an axis cannot be shifted by {abs(s)}")

    def sl(lo, hi):
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(lo, hi)
        return tuple(idx)

    out = xp.empty_like(x)
    if s > 0:               # out[:n-s] = x[s:]; out[n-s:] = x[n-1]
        out[sl(0, n - s)] = x[sl(s, n)]
        out[sl(n - s, n)] = x[sl(n - 1, n)]
    else:                   # out[t:] = x[:n-t]; out[:t] = x[0]
        t = -s
        out[sl(t, n)] = x[sl(0, n - t)]
        out[sl(0, t)] = x[sl(0, 1)]
    return out


def tta_views(xp, x, level: int) -> list:
    """[(weight, input batch)] whose weighted logits make the TTA logits of batch x (N, C, H, W) at `level`."""
    def mirror(v):
        return xp.ascontiguousarray(v[..., ::-1])

    if level == 0:
        return [(1.0, x)]
    if level == 1:
        return [(0.5, x), (0.5, mirror(x))]
    if level == 3:
        return [(0.2, x)] + [(0.2, edge_shift(xp, x, axis, s)) for axis in (2, 3) for s in (1, -1)]
    views = [(0.25, x), (0.25, mirror(x))]
    for s in (-1, 1):
        t = reflect_shift(xp, reflect_shift(xp, x, 2, s), 3, s)
        views += [(0.125, t), (0.125, mirror(t))]
    return views


def tta_logits(model, x, level: int, ctx=None):
    """The model's logits for batch x (a device array, eval mode) averaged over the views of test-time augmentation
    level 0 (x alone), 1 (x and its mirror) or 2 (also x translated by one pixel each way, and their mirrors), as
    airbench's infer(model, loader, tta_level), or 3 (x and its four one-pixel shifts). Each view runs through the
    model's plan as evaluation does.

        >>> model.eval(); logits = tta_logits(model, backend.asarray(xb), 1)          # doctest: +SKIP
    """
    xp = model.backend.xp
    out = None
    for w, v in tta_views(xp, x, check_tta(level)):
        y = model.plan.forward(v, ctx, keep=False)
        if out is None:
            out = y * w                 # a new array: the next forward may reuse its output's memory
        else:
            out += y * w
    return out


class TTAEvalStep(EvalStep):
    """EvalStep on logits averaged by test-time augmentation (tta_logits): loss and correct predictions of the
    averaged logits."""

    def __init__(self, model, level: int):
        self.level = check_tta(level)
        super().__init__(model)

    def _run(self, x, y) -> None:
        logits = tta_logits(self.model, x, self.level, self.runner)
        self.backend.softmax_cross_entropy_into(logits, y, None, self.loss_sum, self.correct)
        self._out[tuple(x.shape)] = (logits, y)


# --- loaders for plain arrays (model.fit on NumPy data) ----------------------------------------------------------


class ArrayLoader:
    """Batches of float arrays already normalised; the order of epoch e depends only on (seed, e)."""

    def __init__(self, x, y, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self.x, self.y = np.asarray(x), np.asarray(y, dtype=np.int64)
        if self.x.shape[0] != self.y.shape[0]:
            raise UsageError(f"fit: {self.x.shape[0]} inputs but {self.y.shape[0]} labels")
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), shuffle, int(seed), drop_last

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, e: int):
        n = self.x.shape[0]
        order = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else np.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def device_batches(loader, epoch: int, backend):
    """The (xb, yb) of loader.epoch(epoch) as device arrays of `backend`: host batches are copied with
    backend.asarray / backend.labels; a loader with `on_device` (hetnet.data.ResidentLoader) serves them already."""
    if getattr(loader, "on_device", False):
        yield from loader.epoch(epoch)
        return
    for xb, yb in loader.epoch(epoch):
        yield backend.asarray(xb), backend.labels(yb)


def _num_batches(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


# --- progress --------------------------------------------------------------------------------------------------


def _bar(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)


def default_log(line: str) -> None:
    """Print a line to stdout, above any progress bar."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def format_epoch(rec: dict, epochs, elapsed: float | None = None) -> str:
    """One line per epoch: 'epoch 3/10  train loss ...'; the partial last epoch of a fractional run says its batches
    ('epoch 10/9.9 (partial: 39 batches)  ...')."""
    head = f"epoch {rec['epoch']}/{format_epochs(epochs)}"
    if rec["epoch"] > epochs and rec.get("steps") is not None:
        head += f" (partial: {rec['steps']} batches)"
    parts = [head, f"train loss {rec['train_loss']:.4f} acc {100 * rec['train_accuracy']:.2f}%"]
    for split in ("val", "test"):
        if rec.get(f"{split}_loss") is not None:
            parts.append(f"{split} loss {rec[f'{split}_loss']:.4f} acc {100 * rec[f'{split}_accuracy']:.2f}%")
    if rec.get("tta"):
        parts[-1] += f" (TTA {rec['tta']}: {TTA_NAMES[rec['tta']]})"
    parts.append(f"{rec['seconds']:.1f} s" + (f" (warm-up {rec['warmup_seconds']:.1f} s)"
                                             if rec.get("warmup_seconds") else ""))
    ips = rec.get("images_per_second")
    parts.append("- img/s" if ips is None else f"{ips:.0f} img/s")
    if elapsed is not None:
        parts.append(f"elapsed {int(elapsed) // 60}:{int(elapsed) % 60:02d}")
    return "  ".join(parts)


# --- weight averaging and lookahead ----------------------------------------------------------------------------


class _Shadow:
    """A second copy of a model's parameters and buffers (BN statistics) on its device, kept beside the live
    arrays: `pairs` of (live, copy) -- the parameters as one flat pair when the model has a flat buffer -- and
    `named`, the copies under their state_dict names (views into the flat copy for parameters). The copy starts
    as the live values."""

    def __init__(self, model):
        self.model = model
        pack = getattr(model, "_pack", None)
        params = model.parameters()
        self._flat = pack is not None and pack.params == params and pack.backend is model.backend
        # (live array, copy) pairs; the parameters' pieces of them: (parameter, live, copy)
        self.pairs, self.param_pieces = [], []
        if self._flat:
            flat = pack.data.copy()
            self.pairs.append((pack.data, flat))
            spans = optim.pack_spans(pack)
            self._spans = [(p, *spans[id(p)]) for p in dict.fromkeys(params)]
            views = {id(p.data): flat[s:e].reshape(p.shape) for p, s, e in self._spans}
        param_ids = {id(p.data): p for p in params}
        self.named = {}      # state_dict name -> copy, in state_dict order
        for name, arr in model.named_arrays():
            if self._flat and id(arr) in views:
                self.named[name] = views[id(arr)]
                continue
            copy = arr.copy()
            self.pairs.append((arr, copy))
            self.named[name] = copy
            if id(arr) in param_ids:
                self.param_pieces.append((param_ids[id(arr)], arr, copy))
        self.buffer_pairs = [(live, copy) for live, copy in self.pairs[1 if self._flat else 0:]
                             if not any(live is piece[1] for piece in self.param_pieces)]

    def split(self) -> tuple[list, list]:
        """((live, copy) pairs of the parameters that train and of the buffers, the same of the frozen parameters),
        the flat pair cut into runs of neighbouring parameters that train (hetnet.optim.contiguous_runs)."""
        if self._flat:
            live, copy = self.pairs[0]
            trained = [(live[s:e], copy[s:e]) for s, e in
                       optim.contiguous_runs((s, e) for p, s, e in self._spans if p.requires_grad)]
            frozen = [(live[s:e], copy[s:e]) for p, s, e in self._spans if not p.requires_grad]
        else:
            trained = [(live, copy) for p, live, copy in self.param_pieces if p.requires_grad]
            frozen = [(live, copy) for p, live, copy in self.param_pieces if not p.requires_grad]
        return trained + self.buffer_pairs, frozen

    def _swap(self) -> None:
        for live, avg in self.pairs:
            tmp = live.copy()
            live[...] = avg
            avg[...] = tmp

    def applied(self):
        """Context manager: the model holds the copy's weights inside, its own weights again outside."""

        @contextlib.contextmanager
        def ctx():
            self._swap()
            try:
                yield self.model
            finally:
                self._swap()
        return ctx()

    def _arrays(self) -> dict:
        to_numpy = self.model.backend.to_numpy
        return {k: to_numpy(v).copy() for k, v in self.named.items()}

    def _load_arrays(self, arrays: dict, what: str) -> None:
        for k, v in self.named.items():
            value = np.asarray(arrays[k])
            if value.shape != tuple(v.shape):
                raise ValueError(f"{what} {k}: expected shape {tuple(v.shape)}, got {value.shape}")
            v[...] = self.model.backend.asarray(value)


class WeightAverage(_Shadow):
    """Exponential moving average of a model's parameters and buffers (BN statistics), updated after every step:
    avg = d * avg + (1 - d) * w with d = min(decay, (1 + n) / (10 + n)) at update n (short memory at the start).

    Evaluating with the average instead of the latest weights smooths the noise of a high learning rate: test
    accuracy rises earlier in a run, and the end of a cosine schedule loses nothing. The arrays live on the model's
    device; parameters are averaged as one flat buffer when the model has one (two device ops per step).

        >>> avg = WeightAverage(model, 0.998)                                            # doctest: +SKIP
        >>> avg.update()                    # after each optimiser step                  # doctest: +SKIP
        >>> with avg.applied(): loss, acc = evaluate(model, loader)                      # doctest: +SKIP
    """

    def __init__(self, model, decay: float):
        if not 0.0 < float(decay) < 1.0:
            raise UsageError(f"weight averaging: decay must be in (0, 1), got {decay!r}")
        super().__init__(model)
        self.decay, self.updates = float(decay), 0

    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for live, avg in self.pairs:
            avg *= d
            avg += (1 - d) * live
        self.updates += 1

    def copy_to_model(self) -> None:
        """Make the averaged weights the model's (the end of training)."""
        for live, avg in self.pairs:
            live[...] = avg

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "arrays": self._arrays()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self._load_arrays(state["arrays"], "weight average")


class Lookahead(_Shadow):
    """airbench's lookahead (its LookaheadState): every `every` optimiser steps an exponential moving average of the
    weights moves toward them, and the weights are reset to it. At step t (a multiple of `every`):

        ema = ema + (1 - d) * (w - ema);   w = ema;      d = decay ** every * min(1, t / total_steps) ** 3

    so the memory is short early in training and grows to decay ** every (airbench94: decay 0.95, every 5, its
    alpha_schedule = 0.95**5 * (t / total)**3). `finish()` -- the end of training -- sets the weights to the EMA, as
    airbench's last update (d = 1). Parameters and BatchNorm statistics are covered. A frozen parameter
    (requires_grad False) is not reset: its EMA is set to it instead, so it never changes.

        >>> lookahead = Lookahead(model, total_steps(epochs, len(loader)))               # doctest: +SKIP
        >>> lookahead.step()                # after each optimiser step                  # doctest: +SKIP
    """

    def __init__(self, model, total_steps: int, every: int = 5, decay: float = 0.95):
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every <= 0:
            raise UsageError(f"lookahead: every must be a positive integer, got {every!r}")
        if not 0.0 <= float(decay) <= 1.0:
            raise UsageError(f"lookahead: decay must be in [0, 1], got {decay!r}")
        super().__init__(model)
        self.total_steps, self.every, self.decay = max(1, int(total_steps)), int(every), float(decay)
        self.steps = 0

    def decay_at(self, t: int) -> float:
        return self.decay ** self.every * min(1.0, t / self.total_steps) ** 3

    def step(self) -> None:
        """Count an optimiser step; every `every` steps, update (decay_at(steps))."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.update(self.decay_at(self.steps))

    def update(self, d: float) -> None:
        trained, frozen = self.split()
        fused = getattr(self.model.backend, "lookahead_update", None)     # the same bits in one launch (cuda)
        for live, ema in trained:
            if fused is not None and live.dtype == np.float32 == ema.dtype:
                fused(live, ema, np.float32(1 - d))
                continue
            ema += (1 - d) * (live - ema)
            live[...] = ema
        for live, ema in frozen:
            ema[...] = live

    def finish(self) -> None:
        """The end of training: the weights become the EMA (airbench's update with d = 1)."""
        self.update(1.0)

    def state_dict(self) -> dict:
        return {"every": self.every, "decay": self.decay, "steps": self.steps, "arrays": self._arrays()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self._load_arrays(state["arrays"], "lookahead")


# --- the trainer -----------------------------------------------------------------------------------------------


class Trainer:
    """Runs epochs: train on a loader, then evaluate on the validation and test loaders; one record per epoch.

    A loader is anything with `epoch(e) -> iterable of (xb, yb)` (host arrays; float inputs, int labels) and,
    ideally, `len()` in batches (hetnet.data.BatchLoader, ArrayLoader); or one with `on_device = True` whose batches
    are already device arrays of the model's backend (hetnet.data.ResidentLoader, see device_batches).

        >>> trainer = Trainer(model, optimizer, schedule)                                  # doctest: +SKIP
        >>> history = trainer.fit(train_loader, epochs=5, test_loader=test_loader)       # doctest: +SKIP

    dist: this process's rank of a data-parallel job (hetnet.parallel.Dist; the loaders then serve its shards):
    the step averages gradients over the ranks, the records hold the sums over every rank (the progress bar the
    global rate), and BatchNorm's running statistics are averaged over the ranks before each evaluation.
    """

    def __init__(self, model, optimizer, schedule=None, label_smoothing: float = 0.0, progress: bool | None = None,
                 log: Callable[[str], None] | None = default_log, ema: float = 0.0,
                 average: WeightAverage | None = None, lookahead: Lookahead | None = None,
                 frozen_after: Iterable = (), tta: int = 0, dist=None):
        self.model, self.optimizer, self.schedule, self.dist = model, optimizer, schedule, dist
        self.tta = check_tta(tta)     # test-time augmentation of the last epoch's evaluation (tta_logits)
        self.label_smoothing = float(label_smoothing)
        # evaluate (and finally keep) an exponential moving average of the weights; 0: the weights themselves
        self.average = average if average is not None else (WeightAverage(model, ema) if ema else None)
        # stepped after each optimiser step; finished (weights = its EMA) before the last epoch's evaluation
        self.lookahead = lookahead
        # (parameter, n): it trains in the first n epochs and is frozen from then on (airbench's whitening bias)
        self.frozen_after = [(p, int(n)) for p, n in frozen_after]
        self.progress = sys.stderr.isatty() if progress is None else bool(progress)
        self.log = log
        self._train_step = None
        self._eval_steps: dict = {}                     # TTA level -> eval step object
        # split ("val", "test") -> (predicted class, true class) of fit's last evaluation (one process)
        self.final_predictions: dict = {}
        self._steps_at_shape: dict[tuple, int] = {}     # train steps made per batch shape (warm-up accounting)
        self.last_warmup = (0.0, 0)                     # (seconds, images) of the last epoch's warm-up steps
        self.last_steps = 0                             # batches the last epoch trained

    @property
    def backend(self):
        return self.model.backend

    def train_epoch(self, loader, epoch: int, epochs=None,
                    steps: int | None = None) -> tuple[float, float, float, int]:
        """One pass over loader.epoch(epoch) (0-based), or its first `steps` batches (the last epoch of a fractional
        run); (mean loss, accuracy, seconds, images). epochs: the run's, for the progress bar."""
        dist = self.dist
        self._set_frozen(epoch)
        if self._train_step is None:
            self._train_step = make_train_step(self.model, self.optimizer, self.schedule, self.label_smoothing,
                                               reducer=dist.reducer(self.model) if dist is not None else None)
        step, backend = self._train_step, self.backend
        world = dist.world if dist is not None else 1
        self.model.train()
        bar = _bar(_num_batches(loader) if steps is None else steps,
                   f"epoch {epoch + 1}" + (f"/{format_epochs(epochs)}" if epochs else ""), self.progress)
        loss_sum, correct, count = 0.0, 0, 0
        warm_s, warm_n = 0.0, 0
        batches, done = device_batches(loader, epoch, backend), 0
        t0 = time.perf_counter()
        # overflow in a diverging run is reported once, as TrainingDiverged, not as NumPy warnings
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                for i, (xb, yb) in enumerate(itertools.islice(batches, steps)):
                    shape = tuple(xb.shape)
                    seen = self._steps_at_shape.get(shape, 0)
                    if seen < WARMUP_STEPS_PER_SHAPE:       # see WARMUP_STEPS_PER_SHAPE
                        self._steps_at_shape[shape] = seen + 1
                        backend.synchronize()
                        tw = time.perf_counter()
                        step.step(xb, yb)
                        backend.synchronize()
                        warm_s, warm_n = warm_s + time.perf_counter() - tw, warm_n + int(shape[0])
                    else:
                        step.step(xb, yb)
                    check_interrupt()
                    done = i + 1
                    if self.lookahead is not None:
                        self.lookahead.step()
                    if self.average is not None:
                        self.average.update()
                    if bar is not None:
                        bar.update(1)
                        if i % 20 == 19:  # a device sync every 20 batches, only when someone watches
                            ls, c, n = step.collect()
                            loss_sum, correct, count = loss_sum + ls, correct + c, count + n
                            rate = world * count / max(time.perf_counter() - t0, 1e-9)
                            bar.set_postfix_str(f"loss {loss_sum / max(count, 1):.4f} "
                                                f"acc {100 * correct / max(count, 1):.2f}% {rate:.0f} img/s",
                                                refresh=False)
                ls, c, n = step.collect()
                backend.synchronize()
            finally:
                batches.close()             # a loader's worker thread stops after a cut epoch too
                if bar is not None:
                    bar.close()
        loss_sum, correct, count = loss_sum + ls, correct + c, count + n
        if dist is not None:            # every rank's batches (they all ran the same steps, at the same time)
            loss_sum, correct, count, warm_n = dist.sum([loss_sum, correct, count, warm_n])
            correct, count, warm_n = int(correct), int(count), int(warm_n)
        seconds = time.perf_counter() - t0
        self.last_warmup, self.last_steps = (warm_s, warm_n), done
        if count == 0:
            raise UsageError("training set is empty (check --limit and --batch-size)")
        loss = loss_sum / count
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the training loss became {loss}")
        return loss, correct / count, seconds, count

    def _set_frozen(self, epoch: int) -> None:
        """requires_grad of the frozen_after parameters for this epoch, changed only where it changes (a changed
        flag makes the train step capture again: its first batches count as warm-up once more)."""
        changed = False
        for p, n in self.frozen_after:
            trains = epoch < n
            if p.requires_grad != trains:
                p.requires_grad = trains
                changed = True
        if changed:
            self._steps_at_shape.clear()

    def evaluate(self, loader, tta: int = 0, predictions: list | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) over loader.epoch(0), model in eval mode, with test-time augmentation level `tta`;
        one eval step object per level, reused. predictions: a list that gets each batch's (predicted class, true
        class) (EvalStep.predictions)."""
        step = self._eval_steps.get(tta)
        if step is None:
            self.model.eval()
            step = self._eval_steps[tta] = make_eval_step(self.model, tta)
        step.predictions = predictions
        try:
            with self.average.applied() if self.average is not None else contextlib.nullcontext():
                loss_sum, correct, count = evaluate_sums(self.model, loader, step)
        finally:
            step.predictions = None
        if self.dist is not None:       # each rank scored its shard
            loss_sum, correct, count = self.dist.sum([loss_sum, correct, count])
        return (loss_sum / count, correct / count) if count else (float("nan"), float("nan"))

    def finish(self) -> None:
        """End of training: the model keeps the weights that were evaluated (the lookahead's EMA, the average)."""
        if self.lookahead is not None:
            self.lookahead.finish()
        if self.average is not None:
            self.average.copy_to_model()

    def fit(self, train_loader, epochs, val_loader=None, test_loader=None, start_epoch: int = 0,
            history: list | None = None, on_epoch_end: Callable[[dict, list], None] | None = None) -> list[dict]:
        """Train epochs start_epoch+1 .. ceil(epochs) (1-based in the records); returns the history of records.
        A fractional `epochs` (9.9) trains total_steps(epochs, len(train_loader)) batches in all: its last epoch
        stops there (its record's "steps" says how many it trained).

        A non-finite loss raises TrainingDiverged naming the epoch. `on_epoch_end(record, history)` runs after each
        epoch (the run directory writes its checkpoint there). The last epoch is evaluated with the trainer's
        test-time augmentation (its record's "tta"), the others without, as airbench does."""
        history = list(history or [])
        last = math.ceil(epochs)
        per_epoch = _num_batches(train_loader)
        if epochs != last and per_epoch is None:
            raise UsageError(f"--epochs {format_epochs(epochs)}: a fraction of an epoch needs a loader with a length "
                             f"in batches")
        t_start = time.perf_counter()
        for e in range(start_epoch, last):
            t0 = time.perf_counter()
            steps = None if epochs == last else steps_in_epoch(epochs, per_epoch, e)
            try:
                loss, acc, train_s, n = self.train_epoch(train_loader, e, epochs, steps)
            except TrainingDiverged as err:
                raise TrainingDiverged(f"training diverged in epoch {e + 1}: {err} "
                                       f"(try a lower --lr)") from None
            if self.lookahead is not None and e == last - 1:
                self.lookahead.finish()          # the weights evaluated and saved are the final ones
            if self.dist is not None:
                self.dist.average_arrays(self.backend,
                                         self.dist.buffers_of(self.model, self.average, self.lookahead))
            rec = {"epoch": e + 1, "train_loss": loss, "train_accuracy": acc,
                   "val_loss": None, "val_accuracy": None, "test_loss": None, "test_accuracy": None}
            tta = self.tta if e == last - 1 and (val_loader is not None or test_loader is not None) else 0
            for split, loader in (("val", val_loader), ("test", test_loader)):
                if loader is not None:
                    # the last evaluation keeps its predictions (one process: a rank sees only its shard)
                    kept = [] if e == last - 1 and self.dist is None else None
                    rec[f"{split}_loss"], rec[f"{split}_accuracy"] = self.evaluate(loader, tta, kept)
                    if kept is not None:
                        self.final_predictions[split] = joined_predictions(kept)
            rec["seconds"] = time.perf_counter() - t0
            warm_s, warm_n = self.last_warmup
            # training steps only: no evaluation, no warm-up steps (None when every step of the epoch was one)
            rec["images_per_second"] = (n - warm_n) / max(train_s - warm_s, 1e-9) if n > warm_n else None
            rec["warmup_seconds"] = warm_s if warm_n else None
            rec["tta"] = tta
            rec["steps"] = self.last_steps
            history.append(rec)
            if self.log is not None:
                self.log(format_epoch(rec, epochs, time.perf_counter() - t_start))
            if on_epoch_end is not None:
                on_epoch_end(rec, history)
        self.finish()
        return history


def evaluate(model, loader, step=None, tta: int = 0) -> tuple[float, float]:
    """(mean loss, accuracy) of a model over loader.epoch(0), in eval mode (mode restored afterwards), with
    test-time augmentation level `tta` (tta_logits). `step`: an eval step object of this model to reuse (from
    make_eval_step, which fixes the level)."""
    loss_sum, correct, count = evaluate_sums(model, loader, step, tta)
    if count == 0:
        return float("nan"), float("nan")
    return loss_sum / count, correct / count


def evaluate_sums(model, loader, step=None, tta: int = 0) -> tuple[float, int, int]:
    """(sum of the losses, correct predictions, examples) over loader.epoch(0), as evaluate()."""
    backend = model.backend
    was_training = model.training
    model.eval()
    try:
        step = step if step is not None else make_eval_step(model, tta)
        step.collect()  # start from zero
        for xb, yb in device_batches(loader, 0, backend):
            step.step(xb, yb)
            check_interrupt()
        loss_sum, correct, count = step.collect()
        backend.synchronize()
    finally:
        model.train(was_training)
    return loss_sum, correct, count


def predict_labels(model, loader, tta: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, true class) for every example of loader.epoch(0), eval mode, with test-time augmentation
    level `tta` (tta_logits)."""
    backend = model.backend
    was_training = model.training
    model.eval()
    batches = []
    try:
        for xb, yb in device_batches(loader, 0, backend):
            logits = tta_logits(model, xb, tta)
            batches.append((backend.to_numpy(backend.xp.argmax(logits, axis=1)).astype(np.int64),
                            backend.to_numpy(yb).astype(np.int64)))
    finally:
        model.train(was_training)
    return joined_predictions(batches)


def joined_predictions(batches: list) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, true class) of all examples from EvalStep.predictions' per-batch pairs."""
    if not batches:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([p for p, _ in batches]), np.concatenate([t for _, t in batches])


def confusion_matrix(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """m[t, p] = number of examples of class t predicted as p."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (true, pred), 1)
    return m


# --- model.fit / model.evaluate on arrays ------------------------------------------------------------------------


def fit(model, x, y, epochs=1, batch_size: int = 32, optimizer: str = "sgd", lr: float = 0.01,
        schedule: str = "constant", weight_decay: float = 0.0, warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0, validation_data: tuple | None = None, seed: int = 0, ema: float = 0.0,
        progress: bool | None = None, log: Callable[[str], None] | None = ..., verbose: bool = True) -> list[dict]:
    """Train `model` (already on its device) on arrays x (N, ...) float, y (N,) int; returns one record per epoch
    (validation columns filled from validation_data=(x_val, y_val)). ema: decay of a weight average that is
    evaluated and kept at the end (0: none). epochs: a whole or fractional number (total_steps). verbose: print one
    line per epoch (as Keras); log: a function that gets those lines instead (None: silent)."""
    if log is ...:
        log = default_log if verbose else None
    epochs = check_epochs(epochs)
    check_positive_int(batch_size, "batch_size")
    check_lr(lr, "lr")
    loader = ArrayLoader(x, y, batch_size, shuffle=True, seed=seed)
    val = ArrayLoader(*validation_data, batch_size=max(batch_size, 256), shuffle=False) if validation_data else None
    opt = make_optimizer(optimizer, model.parameters(), lr, weight_decay, batch_size=batch_size)
    steps = len(loader)
    sched = make_schedule(schedule, opt, total_steps(epochs, steps), int(round(warmup_epochs * steps)))
    trainer = Trainer(model, opt, sched, label_smoothing, progress=progress, log=log, ema=ema)
    return trainer.fit(loader, epochs, val_loader=val)


def evaluate_arrays(model, x, y, batch_size: int = 256) -> tuple[float, float]:
    """(mean loss, accuracy) on arrays."""
    return evaluate(model, ArrayLoader(x, y, batch_size, shuffle=False))


# --- argument checks shared with the command line --------------------------------------------------------------


def check_positive_int(v, flag: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise UsageError(f"--{flag.replace('_', '-')}: expected a positive integer, got {v!r}")
    return int(v)


def check_positive_float(v, flag: str) -> float:
    """A number (int or float, not a string or bool) that is finite and > 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or \
            not (math.isfinite(v) and v > 0):
        raise UsageError(f"--{flag.replace('_', '-')}: expected a positive finite number, got {v!r}")
    return float(v)


def check_epochs(v, flag: str = "epochs") -> int | float:
    """A run's epochs, whole or fractional (total_steps): an int when whole, so that 10.0 is the run of 10."""
    f = check_positive_float(v, flag)
    return int(f) if f.is_integer() else f


def check_lr(v, flag: str = "lr") -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UsageError(f"--{flag}: expected a positive finite number, got {v!r}") from None
    if not (math.isfinite(f) and f > 0):
        raise UsageError(f"--{flag}: expected a positive finite number, got {v!r}")
    return f


def records_iter(history: Iterable[dict]) -> list[dict]:
    """Records with exactly METRIC_KEYS, in that order (None where not applicable)."""
    return [{k: r.get(k) for k in METRIC_KEYS} for r in history]
