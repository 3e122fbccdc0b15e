"""The models a bench row names, and what one step of them costs in FLOPs.

A row's model is a zoo preset ("thesis-m1"), a spec file path ("benchmarks/specs/cifar-wide.json") or the name of
a spec in benchmarks/specs/ ("cifar-wide"), looked up in the working directory's benchmarks/specs/ and then in the
checkout hetnet runs from.

    >>> model, shape = resolve_model("cifar-wide")                     # doctest: +SKIP
    >>> train_step_flops(model, shape, batch=512) / 1e12               # doctest: +SKIP
    0.846...
"""
from __future__ import annotations

from pathlib import Path

from .. import zoo
from ..errors import ModelFileError, UsageError
from ..layers import Conv2D, Dense
from .common import REPO_ROOT

SPEC_DIRS = (Path("benchmarks") / "specs", REPO_ROOT / "benchmarks" / "specs")


def spec_path(name: str) -> Path | None:
    """benchmarks/specs/<name>.json, in the working directory or in hetnet's checkout; None when neither has it."""
    for folder in SPEC_DIRS:
        p = folder / f"{name}.json"
        if p.is_file():
            return p
    return None


def resolve_model(name: str) -> tuple:
    """(a fresh model, its input shape (C, H, W)) for a preset, a spec path or a spec name; weights drawn from
    hetnet's generator (seed it first for the same weights every time)."""
    if name not in zoo.PRESETS and not name.endswith(".json") and not Path(name).exists():
        p = spec_path(name)
        if p is None:
            raise UsageError(f"unknown model {name!r} (presets: {', '.join(zoo.PRESETS)}; or a SPEC.json, or the "
                             "name of one in benchmarks/specs/)")
        name = str(p)
    model, shape, _ = zoo.resolve(name)
    return model, tuple(shape)


def check_model(name: str, flag: str) -> None:
    """UsageError naming `flag` when `name` is not a model resolve_model can build."""
    try:
        resolve_model(name)
    except (UsageError, ModelFileError) as e:
        raise UsageError(f"{flag}: {e}") from None


def model_label(name: str) -> str:
    """The name a row shows: a spec file's stem ("cifar-wide"), else the name as given."""
    return Path(name).stem if name.endswith(".json") else name


def parameter_count(model) -> int:
    return sum(int(p.data.size) for p in model.parameters())


def forward_flops(model, input_shape: tuple) -> int:
    """FLOPs of one image's forward pass through the Conv2D and Dense layers, 2 per multiply-add:
    Conv2D 2*K*P*Q*C*R*S (output K x P x Q, C input channels, R x S kernel), Dense 2*in*out. Everything else
    (bias, BN, activations, pooling, the loss) is left out, as in the usual count of dense FLOPs."""
    total, shape = 0, tuple(input_shape)
    for layer in model.layers:
        out = layer.output_shape(shape)
        if isinstance(layer, Conv2D):
            k, p, q = out
            total += 2 * k * p * q * layer.in_channels * layer.kernel_size ** 2
        elif isinstance(layer, Dense):
            total += 2 * layer.in_features * layer.out_features
        shape = out
    return total


def train_step_flops(model, input_shape: tuple, batch: int) -> int:
    """FLOPs of one training step at `batch`: 3x the forward's (forward, data gradient, filter gradient: each the
    same GEMM size), the convention behind achieved-TFLOP/s figures. The first layer's data gradient is counted
    too, although neither side computes it."""
    return 3 * batch * forward_flops(model, input_shape)
