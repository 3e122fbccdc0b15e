"""Optimisers (SGD with momentum/Nesterov/weight decay, Adam, AdamW) with parameter groups, airbench's decoupled
SGD hyperparameters, and learning-rate schedules.

Semantics are PyTorch's, so results can be compared step by step. An optimiser takes parameters, or parameter
groups as torch.optim does (`[{"params": [...], "lr": 6.4, "weight_decay": 0.0}, ...]`; a key a group leaves out
comes from the constructor's arguments). A schedule scales every group's learning rate by the same factor, each
from its own base learning rate (torch's LambdaLR). A parameter with `requires_grad = False` never changes -- no
weight decay, no momentum -- as torch skips a parameter that has no gradient; its optimiser state is left as it
was and used again if it trains later.

Each optimiser owns its update (`update`): the backend ops it calls. When the parameters are views of one flat
buffer (a Sequential after `.to()`), it updates runs of parameters that lie next to each other in that buffer, are
in the same group and train: one op call per (group, run), usually one per group; frozen parameters are the gaps
between runs. Otherwise one call per parameter that trains.

`scalars()` lists the values that change from step to step (learning rates, flags, bias corrections) in the
layout the ops read from a device array, which lets a replayed step (a CUDA graph, hetnet.plan) follow the
schedule. It holds one block of `n_group_scalars` values per group, in group order; group k's block starts at
k * n_group_scalars and is exactly what the backend op reads (hetnet.backends, optimiser updates):

    SGD        [lr_k, first_step]
    Adam(W)    [lr_k, 0, lr_k / (1 - beta1_k^t), 1 / (1 - beta2_k^t)]        t = steps + 1

Everything else an update reads (momentum, weight decay, betas, which parameters train) is fixed in its launches:
`signature()` changes when any of it changes, and hetnet.plan's TrainStep then captures its step again.

    >>> import hetnet as hn
    >>> model = hn.Sequential([hn.Conv2D(3, 8, 3), hn.BatchNorm2D(8), hn.Flatten(), hn.Dense(8, 2)]).to("cpu")
    >>> opt = hn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> sched = hn.optim.CosineLR(opt, total_steps=100, warmup_steps=5)
    >>> bn_biases = [model[1].bias]
    >>> rest = [p for p in model.parameters() if p is not model[1].bias]
    >>> opt = hn.optim.SGD([{"params": rest}, {"params": bn_biases, "lr": 6.4, "weight_decay": 0.0}], lr=0.1,
    ...                    momentum=0.85, nesterov=True, weight_decay=5e-4)
    >>> sched = hn.optim.TriangularLR(opt, total_steps=100)      # both groups at 0.2x their lr, up, then down
"""
from __future__ import annotations

import math

import numpy as np


def _as_groups(params, name: str) -> list[dict]:
    """torch's two forms: an iterable of parameters (one group), or of dicts {"params": [...], hyperparameters}."""
    items = list(params)
    if not any(isinstance(x, dict) for x in items):
        return [{"params": items}]
    if not all(isinstance(x, dict) for x in items):
        raise ValueError(f"{name}: expected parameters or parameter groups (dicts), not a mix of both")
    groups = []
    for i, g in enumerate(items):
        ps = g.get("params")
        if not isinstance(ps, (list, tuple)):
            raise TypeError(f"{name}: parameter group {i} needs 'params', a list of parameters")
        groups.append({**g, "params": list(ps)})
    return groups


def _unique(params: list) -> list:
    """params without repeats (a layer used twice lists its parameters twice), first occurrence kept."""
    seen: set = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]


def pack_spans(pack) -> dict[int, tuple[int, int]]:
    """id(parameter) -> (start, end) of its elements in a FlatPack's flat buffers (data, grad, and any buffer laid
    out like them)."""
    spans, offset = {}, 0
    for p in pack.params:
        n = int(np.prod(p.shape))
        spans[id(p)] = (offset, offset + n)     # a parameter listed twice: its views are the last ones bound
        offset += n
    return spans


def contiguous_runs(spans) -> list[tuple[int, int]]:
    """(start, end) spans merged where one ends where the next starts, in order; empty ones dropped.

        >>> contiguous_runs([(4, 6), (0, 4), (8, 9)])
        [(0, 6), (8, 9)]
    """
    runs: list[list[int]] = []
    for s, e in sorted(spans):
        if runs and runs[-1][1] == s:
            runs[-1][1] = e
        else:
            runs.append([s, e])
    return [(s, e) for s, e in runs if e > s]


def _positive(v, what: str) -> float:
    if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f"{what} must be a positive finite number, got {v!r}")
    return float(v)


class Optimizer:
    """Base class: parameter groups, state arrays, the runs each update covers, state_dict.

    A subclass passes its hyperparameters' defaults to __init__ (lr, then keywords), checks a group in
    `_check_group`, names its state arrays in `_state_names()` and implements `_group_scalars(group)` (its block of
    scalars()) and `_update_run(group, p, g, state, scalars)`: one op call over the arrays of a run (p, g and each
    state array the same shape). `step()` is update + count. One that overrides only `step()` still trains:
    hetnet.plan then calls its step() after each (replayed) forward and backward.

    Attributes named after a hyperparameter (`opt.lr`, `opt.momentum`, ...) read the first group's value (the
    only one without groups); setting one needs a single group (else set `param_groups[i][name]`)."""

    n_group_scalars = 0     # len(scalars()) per group

    def __init__(self, params, lr: float, **defaults):
        name = type(self).__name__
        self.defaults = {"lr": lr, **defaults}
        self.param_groups: list[dict] = []
        groups = _as_groups(params, name)
        for i, g in enumerate(groups):
            unknown = sorted(set(g) - {"params"} - set(self.defaults))
            if unknown:
                raise ValueError(f"{name}: parameter group {i} has unknown key(s) {', '.join(unknown)} (known: "
                                 f"params, {', '.join(self.defaults)})")
            group = {"params": _unique(g["params"]), **self.defaults, **{k: v for k, v in g.items() if k != "params"}}
            self._check_group(group, f"{name} (parameter group {i})" if len(groups) > 1 else name)
            self.param_groups.append(group)
        self.params = [p for g in self.param_groups for p in g["params"]]
        if not self.params:
            raise ValueError(f"{name}: no parameters to optimise")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError(f"{name}: a parameter appears in more than one parameter group")
        self.steps = 0
        self.backend = self.params[0].backend
        # the parameters' flat buffers, when all of them are views of one FlatPack: updates then run over slices
        pack = self.params[0]._pack
        self._pack = pack if pack is not None and all(p._pack is pack for p in self.params) else None
        self._flat = self._pack is not None
        self._span = pack_spans(pack) if self._flat else {}
        self.state_names = self._state_names()
        self.state: dict[str, list] = {}
        self._flat_state: dict[str, object] = {}
        for state_name in self.state_names:
            self._make_state(state_name)
        self._runs_key, self._runs = None, []

    # -- hyperparameters as attributes (the first group's)
    def __getattr__(self, name):
        d = self.__dict__
        if "param_groups" in d and name in d.get("defaults", ()):
            return d["param_groups"][0][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        d = self.__dict__
        if "param_groups" in d and name in d.get("defaults", ()):
            if len(d["param_groups"]) > 1:
                raise ValueError(f"{type(self).__name__} has {len(d['param_groups'])} parameter groups: set "
                                 f"param_groups[i][{name!r}] instead of .{name}")
            d["param_groups"][0][name] = value
        else:
            object.__setattr__(self, name, value)

    def _check_group(self, group: dict, where: str, loading: bool = False) -> None:
        """Check and normalise a group's hyperparameters in place (ValueError naming `where`). A state being loaded
        may hold lr 0 (where a schedule ended)."""
        if not (loading and group["lr"] == 0):
            group["lr"] = _positive(group["lr"], f"{where}: lr")

    def _state_names(self) -> tuple[str, ...]:
        return ()

    def _make_state(self, name: str) -> None:
        if self._flat:
            flat = self.backend.zeros(self._pack.data.shape)
            self._flat_state[name] = flat
            self.state[name] = [flat[slice(*self._span[id(p)])].reshape(p.shape) for p in self.params]
        else:
            self.state[name] = [self.backend.zeros(p.shape) for p in self.params]

    # -- what an update covers
    def _update_runs(self) -> list:
        """(group index, p, g, {state name: array}) per op call of an update, over the parameters that train;
        recomputed when a requires_grad flag has changed."""
        key = tuple(p.requires_grad for p in self.params)
        if key != self._runs_key:
            self._runs_key, self._runs = key, self._make_runs()
        return self._runs

    def _make_runs(self) -> list:
        out = []
        if self._flat:
            pack = self._pack
            for k, group in enumerate(self.param_groups):
                for s, e in contiguous_runs(self._span[id(p)] for p in group["params"] if p.requires_grad):
                    out.append((k, pack.data[s:e], pack.grad[s:e], {n: f[s:e] for n, f in self._flat_state.items()}))
            return out
        i = 0
        for k, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    out.append((k, p.data, p.grad, {n: v[i] for n, v in self.state.items()}))
                i += 1
        return out

    def signature(self) -> tuple:
        """What the update's op calls depend on besides scalars(): which parameters train and every group's
        hyperparameters other than lr. A captured step that included the update is stale when it changes."""
        return (tuple(p.requires_grad for p in self.params),
                tuple(tuple((k, v) for k, v in g.items() if k not in ("params", "lr")) for g in self.param_groups))

    def zero_grad(self) -> None:
        if self._flat and len(self.params) == len(self._pack.params):
            self._pack.grad[...] = 0
        else:
            for p in self.params:
                p.zero_grad()

    # -- the update
    @property
    def n_scalars(self) -> int:
        """len(scalars())."""
        return len(self.param_groups) * self.n_group_scalars

    def _group_scalars(self, group: dict) -> list[float]:
        return []

    def scalars(self) -> list[float]:
        """The per-step values `update(scalars)` reads, for the coming step: one block per group (module docstring)."""
        return [v for g in self.param_groups for v in self._group_scalars(g)]

    def _update_run(self, group: dict, p, g, state: dict, scalars) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, scalars=None) -> None:
        """Update the parameters that train from their gradients for the coming step (self.steps not yet counted).
        scalars: a backend array holding scalars(), which the ops read when they run (group k reads its block)."""
        n = self.n_group_scalars
        for k, p, g, st in self._update_runs():
            block = None if scalars is None else scalars[k * n:(k + 1) * n]
            self._update_run(self.param_groups[k], p, g, st, block)

    def step(self) -> None:
        self.update()
        self.count_step()

    def count_step(self) -> None:
        """Count a step whose update() has run (hetnet.plan runs update() inside a step it may replay)."""
        self.steps += 1

    @property
    def fused(self) -> bool:
        """Whether this optimiser's update is its own update() (so a captured step can include it)."""
        cls = type(self)
        own = cls.update is not Optimizer.update or cls._update_run is not Optimizer._update_run
        return own and cls.step is Optimizer.step

    # -- state
    def hyperparameters(self) -> dict:
        """The first group's hyperparameters (all of them without groups; each group's: param_groups)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.param_groups[0].items() if k != "params"}

    def state_dict(self) -> dict:
        """Hyperparameters (per group, with the indices of its parameters in self.params), step count and
        per-parameter state as NumPy arrays ('<name>.<index>')."""
        arrays = {f"{k}.{i}": self.backend.to_numpy(a).copy() for k, v in self.state.items() for i, a in enumerate(v)}
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        return {"type": type(self).__name__, "steps": self.steps, "hyper": self.hyperparameters(),
                "groups": groups, "arrays": arrays}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict of an optimiser with the same groups (sizes and order): each group's
        hyperparameters, the step count, the state arrays. A state without 'groups' (one group) is read too."""
        name = type(self).__name__
        if state.get("type") != name:
            raise ValueError(f"optimizer state is for {state.get('type')!r}, not {name}")
        groups = state.get("groups")
        if groups is None:
            groups = [{**state["hyper"], "params": list(range(len(self.params)))}]
        if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
            raise ValueError("optimizer state: 'groups' must be a list of parameter groups")
        sizes = [len(g["params"]) for g in self.param_groups]
        if [len(g.get("params", ())) for g in groups] != sizes:
            raise ValueError(f"optimizer state has parameter groups of sizes {[len(g['params']) for g in groups]}, "
                             f"this {name} {sizes}")
        for i, (group, saved) in enumerate(zip(self.param_groups, groups)):
            for k, v in saved.items():
                if k == "params":
                    continue
                if k not in self.defaults:
                    raise ValueError(f"optimizer state: unknown {name} hyperparameter {k!r}")
                group[k] = tuple(v) if isinstance(self.defaults[k], tuple) else v
            self._check_group(group, f"optimizer state (parameter group {i})", loading=True)
        self.steps = int(state["steps"])
        for k, views in self.state.items():
            for i, a in enumerate(views):
                value = np.asarray(state["arrays"][f"{k}.{i}"])
                if value.shape != tuple(a.shape):
                    raise ValueError(f"optimizer state {k}.{i}: expected shape {tuple(a.shape)}, got {value.shape}")
                a[...] = self.backend.asarray(value)


class SGD(Optimizer):
    """Mini-batch SGD (the thesis's), with optional momentum, Nesterov momentum and L2 weight decay, per group
    (as torch.optim.SGD). airbench's decoupled hyperparameters map onto it exactly: see decoupled_sgd.

    The momentum buffer starts as the first gradient on the optimiser's first step; a parameter that first trains
    later starts from a zero buffer, which is the same without dampening (torch starts each parameter's buffer at
    its own first gradient)."""

    n_group_scalars = 2

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                         weight_decay=weight_decay)

    def _check_group(self, group: dict, where: str, loading: bool = False) -> None:
        super()._check_group(group, where, loading)
        for k in ("momentum", "dampening", "weight_decay"):
            group[k] = float(group[k])
        group["nesterov"] = bool(group["nesterov"])
        if group["momentum"] < 0 or group["weight_decay"] < 0:
            raise ValueError(f"{where}: momentum and weight_decay must be >= 0")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{where}: Nesterov momentum needs momentum > 0 and dampening = 0")

    def _state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if any(g["momentum"] for g in self.param_groups) else ()

    def _group_scalars(self, group: dict) -> list[float]:
        return [group["lr"], 1.0 if self.steps == 0 else 0.0]

    def _update_run(self, group, p, g, state, scalars) -> None:
        buf = state.get("momentum_buffer") if group["momentum"] else None
        self.backend.sgd_update(p, g, buf, group["lr"], group["momentum"], group["dampening"], group["nesterov"],
                                group["weight_decay"], self.steps == 0, scalars=scalars)


class Adam(Optimizer):
    """Adam (torch.optim.Adam: weight decay added to the gradient). Steps are counted per optimiser: a parameter
    that starts training later has its bias corrections at the optimiser's step, not at its own (torch counts
    per parameter)."""

    decoupled = False
    n_group_scalars = 4

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def _check_group(self, group: dict, where: str, loading: bool = False) -> None:
        super()._check_group(group, where, loading)
        betas = tuple(float(b) for b in group["betas"])
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {group['betas']!r}")
        group["betas"], group["eps"], group["weight_decay"] = betas, float(group["eps"]), float(group["weight_decay"])
        if group["weight_decay"] < 0:
            raise ValueError(f"{where}: weight_decay must be >= 0")

    def _state_names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _group_scalars(self, group: dict) -> list[float]:
        t = self.steps + 1
        b1, b2 = group["betas"]
        return [group["lr"], 0.0, group["lr"] / (1 - b1 ** t), 1.0 / (1 - b2 ** t)]

    def _update_run(self, group, p, g, state, scalars) -> None:
        b1, b2 = group["betas"]
        self.backend.adam_update(p, g, state["exp_avg"], state["exp_avg_sq"], self.steps + 1, group["lr"], b1, b2,
                                 group["eps"], group["weight_decay"], self.decoupled, scalars=scalars)


class AdamW(Adam):
    """AdamW (torch.optim.AdamW: decoupled weight decay, default 0.01)."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr, betas, eps, weight_decay)


# --- airbench's decoupled hyperparameters ---------------------------------------------------------------------------


def decoupled_sgd(lr: float, weight_decay: float, momentum: float, batch_size: int, lr_scale: float = 1.0) -> dict:
    """torch.optim.SGD's lr and weight_decay (Nesterov, `momentum`) that train exactly as airbench's decoupled
    hyperparameters, for hetnet's loss (the batch mean); lr_scale multiplies the step, not the decay (airbench's
    bias_scaler for BatchNorm biases).

    airbench (airbench94: lr 11.5 and weight_decay 0.0153 "per 1024 examples", momentum 0.85) sums the loss over the
    batch of B examples and gives torch.optim.SGD(nesterov=True), for a group whose lr is scaled by s:

        kilostep = 1024 * (1 + 1 / (1 - momentum))   (a Nesterov step's size over constant gradients, per 1024)
        lr_g = s * lr / kilostep,    weight_decay_g = (weight_decay * B / kilostep) / lr_g

    so that lr_g * weight_decay_g, the decay per step, is the same in every group and does not depend on lr. Our
    gradient is that of the mean, 1/B of airbench's. With lr'_g = B lr_g and weight_decay'_g = weight_decay_g / B
    torch's update is the same: d' = g/B + weight_decay_g p / B = d / B, so the momentum buffer is buf / B at every
    step and lr'_g (d' + momentum buf') = lr_g (d + momentum buf). Hence

        lr'_g = s * lr * B / kilostep,    weight_decay'_g = weight_decay / (s * lr).

    A schedule scales lr'_g (and so the decay per step) as airbench's LambdaLR scales lr_g.

        >>> decoupled_sgd(11.5, 0.0153, 0.85, 1024)         # doctest: +ELLIPSIS
        {'lr': 1.5..., 'weight_decay': 0.00133...}
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"decoupled_sgd: momentum must be in [0, 1), got {momentum!r}")
    lr, lr_scale = _positive(lr, "decoupled_sgd: lr"), _positive(lr_scale, "decoupled_sgd: lr_scale")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"decoupled_sgd: batch_size must be a positive integer, got {batch_size!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"decoupled_sgd: weight_decay must be >= 0, got {weight_decay!r}")
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    return {"lr": lr_scale * lr * batch_size / kilostep, "weight_decay": weight_decay / (lr_scale * lr)}


# --- learning-rate schedules: call .step() once per optimiser step (per batch) -------------------------------------


class Schedule:
    """Sets every group's lr to its base lr times factor(t) for step t = 0, 1, ... (torch's LambdaLR); linear
    warm-up over warmup_steps first. The base learning rates are the groups' when the schedule is made."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0):
        self.optimizer = optimizer
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.warmup_steps = int(warmup_steps)
        self.t = 0
        self._apply()

    @property
    def base_lr(self) -> float:
        """The first group's base learning rate."""
        return self.base_lrs[0]

    def factor(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self) -> None:
        t = self.t
        if t < self.warmup_steps:
            f = (t + 1) / self.warmup_steps
        else:
            f = self.factor(t - self.warmup_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:
        self.t += 1
        self._apply()

    @property
    def lr(self) -> float:
        """The first group's learning rate now."""
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "t": self.t, "base_lr": self.base_lrs[0], "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        base = [float(v) for v in state.get("base_lrs", [state["base_lr"]])]
        if len(base) != len(self.base_lrs):
            raise ValueError(f"schedule state has {len(base)} base learning rates, the optimiser "
                             f"{len(self.base_lrs)} parameter groups")
        self.t, self.base_lrs = int(state["t"]), base
        self._apply()


class ConstantLR(Schedule):
    def factor(self, t: int) -> float:
        return 1.0


class StepLR(Schedule):
    """lr = base * gamma ** (t // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, warmup_steps: int = 0):
        self.step_size, self.gamma = int(step_size), float(gamma)
        super().__init__(optimizer, warmup_steps)

    def factor(self, t: int) -> float:
        return self.gamma ** (t // self.step_size)


class CosineLR(Schedule):
    """Cosine decay from base to min_factor*base over total_steps (warm-up included), then flat."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0):
        self.total_steps, self.min_factor = int(total_steps), float(min_factor)
        super().__init__(optimizer, warmup_steps)

    def factor(self, t: int) -> float:
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, t / span)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class OneCycleLR(Schedule):
    """Triangular one-cycle: linear warm-up from base/div to base over pct_start of total_steps, then linear
    annealing down to base/final_div at total_steps."""

    def __init__(self, optimizer: Optimizer, total_steps: int, pct_start: float = 0.3, div: float = 25.0,
                 final_div: float = 1e4):
        self.total_steps, self.pct_start = int(total_steps), float(pct_start)
        self.div, self.final_div = float(div), float(final_div)
        super().__init__(optimizer, 0)

    def factor(self, t: int) -> float:
        up = max(1, int(self.pct_start * self.total_steps))
        lo = 1.0 / self.div
        if t < up:
            return lo + (1 - lo) * t / up
        down = max(1, self.total_steps - up)
        end = 1.0 / self.final_div
        return max(end, 1 - (1 - end) * (t - up) / down)


class TriangularLR(Schedule):
    """airbench's triangle: the factor is piecewise linear in the step t through (0, start), (up, 1) and
    (total_steps, end), up = int(peak * total_steps); flat at `end` after total_steps. airbench94 uses start 0.2,
    peak 0.23, end 0.07 (its `triangle(total_train_steps, start=0.2, end=0.07, peak=0.23)` under LambdaLR).

        >>> sched = TriangularLR(opt, total_steps=100)          # doctest: +SKIP
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, peak: float = 0.23, start: float = 0.2,
                 end: float = 0.07):
        if not 0 <= peak < 1:
            raise ValueError(f"TriangularLR: peak must be in [0, 1), got {peak!r}")
        if not (start >= 0 and end >= 0):
            raise ValueError(f"TriangularLR: start and end must be >= 0, got {start!r}, {end!r}")
        self.total_steps = max(1, int(total_steps))
        self.peak, self.start, self.end = float(peak), float(start), float(end)
        super().__init__(optimizer, 0)

    def factor(self, t: int) -> float:
        total = self.total_steps
        up = int(self.peak * total)
        if t >= total:
            return self.end
        if t < up:
            return self.start + (1 - self.start) * t / up
        return 1 + (self.end - 1) * (t - up) / (total - up)


SCHEDULES = {"constant": ConstantLR, "step": StepLR, "cosine": CosineLR, "onecycle": OneCycleLR,
             "triangular": TriangularLR}
