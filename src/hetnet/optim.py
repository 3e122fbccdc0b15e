"""Optimisers (SGD with momentum/Nesterov/weight decay, Adam, AdamW) and learning-rate schedules.

Semantics are PyTorch's, so results can be compared step by step. Each optimiser owns its update (`update`): the
backend ops it calls, over one flat buffer when the parameters are views of one (a Sequential after `.to()`), so a
single call updates all of them. `scalars()` lists the values that change from step to step (learning rate, flags,
bias corrections) in the layout those ops read from a device array, which lets a replayed step (a CUDA graph,
hetnet.plan) follow the schedule.

    >>> import hetnet as hn
    >>> model = hn.Sequential([hn.Dense(4, 2)]).to("cpu")
    >>> opt = hn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> sched = hn.optim.CosineLR(opt, total_steps=100, warmup_steps=5)
"""
from __future__ import annotations

import math

import numpy as np


class Optimizer:
    """Base class. A subclass sets `state_names` and implements `update(scalars=None)` -- the parameter update of
    the coming step through backend ops -- and `scalars()`; `step()` is update + count. One that overrides only
    `step()` still trains: hetnet.plan then calls its step() after each (replayed) forward and backward."""

    state_names: tuple[str, ...] = ()
    n_scalars = 0       # len(scalars())

    def __init__(self, params, lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: no parameters to optimise")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"{type(self).__name__}: lr must be a positive finite number, got {lr!r}")
        self.lr = float(lr)
        self.steps = 0
        pack = self.params[0]._pack
        # one flat update when the parameters are exactly one FlatPack, in order
        self._flat = pack is not None and pack.params == self.params and all(p._pack is pack for p in self.params)
        self.backend = self.params[0].backend
        self.state: dict[str, list] = {}
        self._flat_state: dict[str, object] = {}
        for name in self.state_names:
            self._make_state(name)

    def _make_state(self, name: str) -> None:
        if self._flat:
            pack = self.params[0]._pack
            flat = self.backend.zeros(pack.data.shape)
            self._flat_state[name] = flat
            self.state[name] = pack.views(flat)
        else:
            self.state[name] = [self.backend.zeros(p.shape) for p in self.params]

    def _groups(self):
        """(p, g, {state name: array}) per update call: one for a flat pack, else one per parameter."""
        if self._flat:
            pack = self.params[0]._pack
            yield pack.data, pack.grad, dict(self._flat_state)
        else:
            for i, p in enumerate(self.params):
                yield p.data, p.grad, {k: v[i] for k, v in self.state.items()}

    def zero_grad(self) -> None:
        if self._flat:
            self.params[0]._pack.grad[...] = 0
        else:
            for p in self.params:
                p.zero_grad()

    def scalars(self) -> list[float]:
        """The per-step values `update(scalars)` reads, for the coming step (see hetnet.backends: optimiser updates)."""
        return []

    def update(self, scalars=None) -> None:  # pragma: no cover - abstract
        """Update the parameters from their gradients for the coming step (self.steps not yet counted). scalars: a
        backend array holding scalars(), which the ops read when they run."""
        raise NotImplementedError

    def step(self) -> None:
        self.update()
        self.count_step()

    def count_step(self) -> None:
        """Count a step whose update() has run (hetnet.plan runs update() inside a step it may replay)."""
        self.steps += 1

    @property
    def fused(self) -> bool:
        """Whether this optimiser's update is its own update() (so a captured step can include it)."""
        return type(self).update is not Optimizer.update and type(self).step is Optimizer.step

    def hyperparameters(self) -> dict:
        return {"lr": self.lr}

    def state_dict(self) -> dict:
        """Hyperparameters, step count and per-parameter state as NumPy arrays ('<name>.<index>')."""
        arrays = {f"{k}.{i}": self.backend.to_numpy(a).copy() for k, v in self.state.items() for i, a in enumerate(v)}
        return {"type": type(self).__name__, "steps": self.steps, "hyper": self.hyperparameters(), "arrays": arrays}

    def load_state_dict(self, state: dict) -> None:
        if state.get("type") != type(self).__name__:
            raise ValueError(f"optimizer state is for {state.get('type')!r}, not {type(self).__name__}")
        self.steps = int(state["steps"])
        for k, v in state["hyper"].items():
            setattr(self, k, v)
        for k, views in self.state.items():
            for i, a in enumerate(views):
                value = np.asarray(state["arrays"][f"{k}.{i}"])
                if value.shape != tuple(a.shape):
                    raise ValueError(f"optimizer state {k}.{i}: expected shape {tuple(a.shape)}, got {value.shape}")
                a[...] = self.backend.asarray(value)


class SGD(Optimizer):
    """Mini-batch SGD (the thesis's), with optional momentum, Nesterov momentum and L2 weight decay
    (as torch.optim.SGD)."""

    state_names = ("momentum_buffer",)

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        if momentum < 0 or weight_decay < 0:
            raise ValueError("SGD: momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.nesterov, self.weight_decay = bool(nesterov), float(weight_decay)
        if self.momentum == 0:
            self.state_names = ()
        super().__init__(params, lr)

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    n_scalars = 2

    def scalars(self) -> list[float]:
        return [self.lr, 1.0 if self.steps == 0 else 0.0]

    def update(self, scalars=None) -> None:
        for p, g, st in self._groups():
            self.backend.sgd_update(p, g, st.get("momentum_buffer"), self.lr, self.momentum, self.dampening,
                                    self.nesterov, self.weight_decay, self.steps == 0, scalars=scalars)


class Adam(Optimizer):
    """Adam (torch.optim.Adam: weight decay added to the gradient)."""

    state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.betas, self.eps, self.weight_decay = (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)
        super().__init__(params, lr)

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.betas = tuple(self.betas)

    n_scalars = 4

    def scalars(self) -> list[float]:
        t = self.steps + 1
        return [self.lr, 0.0, self.lr / (1 - self.betas[0] ** t), 1.0 / (1 - self.betas[1] ** t)]

    def update(self, scalars=None) -> None:
        for p, g, st in self._groups():
            self.backend.adam_update(p, g, st["exp_avg"], st["exp_avg_sq"], self.steps + 1, self.lr, self.betas[0],
                                     self.betas[1], self.eps, self.weight_decay, self.decoupled, scalars=scalars)


class AdamW(Adam):
    """AdamW (torch.optim.AdamW: decoupled weight decay, default 0.01)."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr, betas, eps, weight_decay)


# --- learning-rate schedules: call .step() once per optimiser step (per batch) -------------------------------------


class Schedule:
    """Sets optimizer.lr = base_lr * factor(t) for step t = 0, 1, ...; linear warm-up over warmup_steps first."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0):
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.warmup_steps = int(warmup_steps)
        self.t = 0
        self._apply()

    def factor(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self) -> None:
        t = self.t
        if t < self.warmup_steps:
            f = (t + 1) / self.warmup_steps
        else:
            f = self.factor(t - self.warmup_steps)
        self.optimizer.lr = self.base_lr * f

    def step(self) -> None:
        self.t += 1
        self._apply()

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "t": self.t, "base_lr": self.base_lr}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.base_lr = int(state["t"]), float(state["base_lr"])
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


SCHEDULES = {"constant": ConstantLR, "step": StepLR, "cosine": CosineLR, "onecycle": OneCycleLR}
