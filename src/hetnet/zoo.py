"""Named models: the thesis's five CNNs, an MLP and the default Fashion-MNIST CNN; and JSON specs.

Thesis models: every convolution 3x3 with padding 1, followed by ReLU and 2x2 max pooling; hidden dense layers use
ReLU; trained with softmax cross-entropy and plain SGD at batch 32.

    >>> from hetnet import zoo
    >>> model = zoo.build("thesis-m1")
    >>> zoo.PRESETS["thesis-m1"].input_shape
    (3, 32, 32)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import layers as L
from .model import Sequential
from .errors import ModelFileError, UsageError


@dataclass(frozen=True)
class Preset:
    """A named model and its default training recipe."""
    input_shape: tuple
    layers: list                       # JSON-style layer specs: {"type": "Conv2D", ...constructor arguments}
    lr: float = 0.01
    optimizer: str = "sgd"             # sgd | momentum | adam | adamw
    batch_size: int = 32
    epochs: int | float = 10           # a fraction trains ceil(epochs * batches) steps (hetnet.train.total_steps)
    schedule: str = "constant"         # constant | step | cosine | onecycle
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    ema: float = 0.0                   # decay of the evaluated and kept weight average (0: none)
    augment: tuple = field(default=())  # hetnet.data.BatchLoader's: "crop[:P]", "translate[:P]", "flip", "altflip"
    tta: int = 0                       # test-time augmentation of the final evaluation: 0 none, 1 mirror,
                                       # 2 mirror + translate, 3 shift (hetnet.train.tta_logits)
    precision: str = "fp32"            # the matrix products' precision on cuda: fp32 | tf32 | bf16 (hetnet.device)
    description: str = ""
    momentum: float = 0.9              # of momentum and nesterov-decoupled
    # parameter groups, hetnet.train.group_parameters' rules: ({"params": "BatchNorm*.bias", "lr_scale": 64.0,
    # "weight_decay_scale": 1.0}, ...), names '<layer index>.<name>' or '<layer type>.<name>'; the rest at scale 1
    param_groups: tuple = field(default=())
    lookahead: int = 0                 # every k steps the weights reset to their EMA (hetnet.train.Lookahead); 0: off
    lookahead_decay: float = 0.95      # the lookahead's decay per step
    whiten_bias_epochs: int = 0        # the first layer's bias trains this many epochs, then is frozen (0: always)
    drop_last: bool = False            # the training loader drops its last partial batch (hetnet.runs.train_drop_last)


def _thesis(input_shape: tuple, convs: list[int], dense: list[int], lr: float, classes: int = 10) -> list:
    c, h, w = input_shape
    specs = []
    for k in convs:
        specs += [{"type": "Conv2D", "in_channels": c, "out_channels": k, "kernel_size": 3, "padding": 1},
                  {"type": "ReLU"}, {"type": "MaxPool2D", "kernel_size": 2}]
        c, h, w = k, h // 2, w // 2
    specs.append({"type": "Flatten"})
    f = c * h * w
    for d in dense:
        specs += [{"type": "Dense", "in_features": f, "out_features": d}, {"type": "ReLU"}]
        f = d
    specs.append({"type": "Dense", "in_features": f, "out_features": classes})
    return specs


def _thesis_preset(shape, convs, dense, lr, name) -> Preset:
    return Preset(shape, _thesis(shape, convs, dense, lr), lr=lr, optimizer="sgd", batch_size=32, epochs=10,
                  description=f"thesis {name}: conv {'-'.join(map(str, convs))}, dense {'-'.join(map(str, dense))}-10")


def airbench94_layers(widths: tuple = (64, 256, 256), classes: int = 10) -> list:
    """airbench94's network (Keller Jordan's `make_net94`, airbench 0.1.8) as layer specs: a 2x2 whitening
    convolution (24 = 2 * 3 * 2 * 2 filters from the training patches' statistics, bias trained) and GELU; three
    groups of conv 3x3 (identity-initialised on its first filters) -> 2x2 max pool -> BN -> GELU -> conv 3x3 -> BN ->
    GELU, widths 64/256/256 (its 'block1/2/3'); 3x3 max pool, a dense layer without bias, logits times 1/9. Its
    BatchNorm: momentum 0.6 in airbench's convention, 0.4 in PyTorch's (and ours), eps 1e-12, scale frozen at 1.
    On 32x32 inputs: 31 -> 15 -> 7 -> 3 -> 1 pixels."""
    bn = {"type": "BatchNorm2D", "momentum": 0.4, "eps": 1e-12, "scale": "frozen"}
    specs = [{"type": "Conv2D", "in_channels": 3, "out_channels": 24, "kernel_size": 2, "bias": True,
              "init": "whitening"}, {"type": "GELU"}]
    c = 24
    for k in widths:
        specs += [{"type": "Conv2D", "in_channels": c, "out_channels": k, "kernel_size": 3, "padding": 1,
                   "bias": False, "init": "dirac"}, {"type": "MaxPool2D", "kernel_size": 2},
                  {**bn, "num_features": k}, {"type": "GELU"},
                  {"type": "Conv2D", "in_channels": k, "out_channels": k, "kernel_size": 3, "padding": 1,
                   "bias": False, "init": "dirac"},
                  {**bn, "num_features": k}, {"type": "GELU"}]
        c = k
    return specs + [{"type": "MaxPool2D", "kernel_size": 3}, {"type": "Flatten"},
                    {"type": "Dense", "in_features": c, "out_features": classes, "bias": False},
                    {"type": "Scale", "factor": 1 / 9}]


PRESETS: dict[str, Preset] = {
    "thesis-m0": _thesis_preset((3, 12, 12), [16, 32], [100], 0.01, "model 0"),
    "thesis-m1": _thesis_preset((3, 32, 32), [16, 32], [100], 0.01, "model 1"),
    "thesis-m2": _thesis_preset((3, 40, 40), [16, 32], [100], 0.001, "model 2"),
    "thesis-m3": _thesis_preset((3, 40, 40), [16, 32, 32], [128, 50], 0.00001, "model 3"),
    "thesis-m4": _thesis_preset((3, 50, 50), [32, 32, 32], [200, 50], 0.00001, "model 4"),
    "mlp": Preset((1, 28, 28), [
        {"type": "Flatten"},
        {"type": "Dense", "in_features": 784, "out_features": 512}, {"type": "ReLU"},
        {"type": "Dense", "in_features": 512, "out_features": 256}, {"type": "ReLU"},
        {"type": "Dense", "in_features": 256, "out_features": 10},
    ], lr=0.05, optimizer="momentum", batch_size=128, epochs=10, schedule="cosine", weight_decay=5e-4,
        description="MLP 784-512-256-10"),
    # fashion-cnn: the layers were chosen with a PyTorch replica of the model and recipe on the full Fashion-MNIST
    # (a third conv adds about 0.2 %; flips and 2-pixel crops cost accuracy on this small model), the recipe by
    # benchmarks/fashion_recipes.py's trials of hetnet itself (benchmarks/results/NVIDIA-H200/fashion_recipes*.txt,
    # 27 variants of the same per-image cost): one-cycle at lr 0.1 with dropout 0.1 beat the earlier recipe (cosine
    # at lr 0.05, dropout 0.3) at each of 5 seeds, 93.46 % +- 0.14 against 93.21 % +- 0.08 after 15 epochs. The final
    # evaluation averages the image and its four one-pixel shifts (TTA level 3, the views its 1-pixel crops train
    # on; a mirror costs accuracy: the shoes all point one way): +0.3 to +0.4 points at each seed tried on the VM.
    "fashion-cnn": Preset((1, 28, 28), [
        {"type": "Conv2D", "in_channels": 1, "out_channels": 32, "kernel_size": 3, "padding": 1, "bias": False},
        {"type": "BatchNorm2D", "num_features": 32}, {"type": "ReLU"}, {"type": "MaxPool2D", "kernel_size": 2},
        {"type": "Conv2D", "in_channels": 32, "out_channels": 64, "kernel_size": 3, "padding": 1, "bias": False},
        {"type": "BatchNorm2D", "num_features": 64}, {"type": "ReLU"}, {"type": "MaxPool2D", "kernel_size": 2},
        {"type": "Conv2D", "in_channels": 64, "out_channels": 64, "kernel_size": 3, "padding": 1, "bias": False},
        {"type": "BatchNorm2D", "num_features": 64}, {"type": "ReLU"}, {"type": "MaxPool2D", "kernel_size": 2},
        {"type": "Flatten"},
        {"type": "Dense", "in_features": 64 * 3 * 3, "out_features": 128}, {"type": "ReLU"},
        {"type": "Dropout", "p": 0.1},
        {"type": "Dense", "in_features": 128, "out_features": 10},
    ], lr=0.1, optimizer="momentum", batch_size=128, epochs=15, schedule="onecycle", weight_decay=5e-4,
        label_smoothing=0.0, augment=("crop:1",), tta=3,  # one-cycle warms up on its own (30 % of the steps)
        description="conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, conv64-BN-ReLU-pool, dense 128, dropout 0.1, "
                    "dense 10; Nesterov SGD, one-cycle to lr 0.1, random 1-pixel shifts, shifted views at test time"),
    # airbench94's network and recipe (airbench 0.1.8's hyp): batch 1024, label smoothing 0.2, reflect-padded
    # translation by up to 2 pixels and alternating flips, TTA level 2; Nesterov SGD with decoupled hyperparameters
    # (lr 11.5 and weight decay 0.0153 per 1024 examples, momentum 0.85), the BatchNorm biases at 64x the learning
    # rate (bias_scaler), a triangular schedule 0.2 -> 1 (at 23%) -> 0.07, lookahead every 5 steps (decay 0.95), the
    # whitening layer's bias trained for the first 3 epochs. 9.9 epochs without the last partial batch, as airbench:
    # on the peer run's 45,000 training images (hetnet.bench.speedrun) 43 batches an epoch, ceil(9.9 * 43) = 426
    # steps, which the schedule and lookahead span; the tenth epoch stops after 39 batches. bf16 on cuda (the
    # tensor-core kernels: same held-out accuracy as fp32 in 5 runs each, benchmarks/HISTORY.md), float32 on the CPU.
    "cifar-speed": Preset((3, 32, 32), airbench94_layers(), lr=11.5, optimizer="nesterov-decoupled", momentum=0.85,
                          batch_size=1024, epochs=9.9, drop_last=True,
                          schedule="triangular:start=0.2,peak=0.23,end=0.07",
                          weight_decay=0.0153, label_smoothing=0.2,
                          param_groups=({"params": "BatchNorm2D.bias", "lr_scale": 64.0},),
                          lookahead=5, lookahead_decay=0.95, whiten_bias_epochs=3,
                          augment=("translate:2", "altflip"), tta=2, precision="bf16",
                          description="airbench94's network: whitening conv 2x2 (24) + GELU, three groups conv-pool-"
                                      "BN-GELU-conv-BN-GELU of 64/256/256 (BN scale frozen, momentum 0.4, eps "
                                      "1e-12), max pool 3, dense 10 without bias, x1/9; and its recipe"),
}

LAYER_TYPES = L.LAYER_TYPES


def layers_from_specs(specs: list, source: str = "spec") -> Sequential:
    """Build a Sequential from JSON-style layer specs; UsageError/ModelFileError naming the bad entry.

    A spec is {"type": <layer class>, ...its constructor arguments}, plus "frozen": [parameter names] for
    parameters that do not train (requires_grad False), e.g. the recipe of airbench's layers:
        {"type": "Conv2D", "in_channels": 3, "out_channels": 24, "kernel_size": 2, "init": "whitening"}
        {"type": "Conv2D", "in_channels": 24, "out_channels": 64, "kernel_size": 3, "padding": 1, "bias": false,
         "init": "dirac"}
        {"type": "BatchNorm2D", "num_features": 64, "momentum": 0.4, "eps": 1e-12, "scale": "frozen"}
        {"type": "GELU"}    {"type": "Scale", "factor": 0.1111111111111111}
        {"type": "Dense", "in_features": 256, "out_features": 10, "bias": false, "frozen": ["weight"]}
    """
    if not isinstance(specs, list) or not specs:
        raise ModelFileError(f"{source}: 'layers' must be a non-empty list")
    built = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "type" not in spec:
            raise ModelFileError(f"{source}: layer {i} must be an object with a 'type'")
        kind = spec["type"]
        if kind not in LAYER_TYPES:
            raise ModelFileError(f"{source}: layer {i} has unknown type {kind!r} "
                                 f"(known: {', '.join(sorted(LAYER_TYPES))})")
        kwargs = {k: v for k, v in spec.items() if k not in ("type", "frozen")}
        try:
            layer = LAYER_TYPES[kind](**kwargs)
        except (TypeError, ValueError) as e:
            raise ModelFileError(f"{source}: layer {i} ({kind}): {e}") from None
        frozen = spec.get("frozen", [])
        if not (isinstance(frozen, list) and all(isinstance(n, str) for n in frozen)):
            raise ModelFileError(f"{source}: layer {i} ({kind}): 'frozen' must be a list of parameter names, "
                                 f"got {frozen!r}")
        for name in frozen:
            if name not in layer.params:
                raise ModelFileError(f"{source}: layer {i} ({kind}): 'frozen' names {name!r}, which is not one of "
                                     f"its parameters ({', '.join(layer.params) or 'none'})")
            layer.params[name].requires_grad = False
        if getattr(layer, "init", None) == "whitening" and i != 0:
            raise ModelFileError(f"{source}: layer {i} ({kind}): init 'whitening' is for the first layer (its "
                                 f"filters come from the statistics of the images)")
        built.append(layer)
    return Sequential(built)


def build_from_spec(spec: dict, source: str = "spec") -> tuple[Sequential, tuple]:
    """(model, input_shape) from a spec dict {"input_shape": [C, H, W], "layers": [...]}; shapes checked now."""
    if not isinstance(spec, dict) or "layers" not in spec or "input_shape" not in spec:
        raise ModelFileError(f"{source}: a model spec needs 'input_shape' and 'layers'")
    shape = spec["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise ModelFileError(f"{source}: 'input_shape' must be [C, H, W] of positive integers, got {shape!r}")
    model = layers_from_specs(spec["layers"], source)
    try:
        model.output_shape(tuple(shape))
    except ValueError as e:
        raise ModelFileError(f"{source}: layer shapes do not chain: {e}") from None
    return model, tuple(shape)


def load_spec_file(path: str | Path) -> dict:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read model spec: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{p}: not a JSON model spec: {e}") from None


def spec_of(name: str) -> dict:
    """The JSON spec of a preset."""
    preset = PRESETS[name]
    return {"input_shape": list(preset.input_shape), "layers": [dict(s) for s in preset.layers]}


def recipe_line(preset: Preset) -> str:
    """A preset's training recipe in one line (`hetnet train --help`, `hetnet info PRESET`)."""
    parts = [f"{preset.epochs} epochs", f"batch {preset.batch_size}"
             + (" (last partial batch dropped)" if preset.drop_last else ""),
             f"{preset.optimizer} lr {preset.lr:g}", f"{preset.schedule} schedule"]
    if preset.warmup_epochs:
        parts.append(f"warm-up {preset.warmup_epochs:g} epochs")
    if preset.weight_decay:
        parts.append(f"weight decay {preset.weight_decay:g}")
    if preset.label_smoothing:
        parts.append(f"label smoothing {preset.label_smoothing:g}")
    if preset.optimizer in ("momentum", "nesterov-decoupled") and preset.momentum != 0.9:
        parts.append(f"momentum {preset.momentum:g}")
    for rule in preset.param_groups:
        pats = rule["params"] if isinstance(rule["params"], str) else "|".join(rule["params"])
        parts.append(f"{pats} at lr x{rule.get('lr_scale', 1):g}"
                     + (f" wd x{rule['weight_decay_scale']:g}" if rule.get("weight_decay_scale", 1) != 1 else ""))
    if preset.ema:
        parts.append(f"weight average {preset.ema:g}")
    if preset.lookahead:
        parts.append(f"lookahead every {preset.lookahead} steps (decay {preset.lookahead_decay:g})")
    if preset.whiten_bias_epochs:
        parts.append(f"first bias frozen after {preset.whiten_bias_epochs} epochs")
    parts.append(f"augment {','.join(preset.augment) or 'none'}")
    if preset.tta:
        parts.append(f"test-time augmentation {preset.tta}")
    return ", ".join(parts)


def describe(name_or_path: str) -> list[str]:
    """`hetnet info PRESET|SPEC.json`: the layers with their output shapes and parameter counts, the total, and the
    recipe (presets)."""
    model, shape, _ = resolve(name_or_path)
    preset = PRESETS.get(name_or_path)
    lines = [f"{name_or_path}: {preset.description}" if preset and preset.description else name_or_path]
    lines += describe_layers(model, shape)
    if preset is not None:
        lines.append(f"recipe: {recipe_line(preset)}")
        lines.append(f"train it: hetnet train --model {name_or_path}   (flags override the recipe)")
    return lines


def describe_layers(model, shape) -> list[str]:
    """The input shape, a table of the layers with their output shapes and parameter counts, and the total."""
    lines = [f"input {'x'.join(map(str, shape))} (C x H x W)"]
    rows, total = [("#", "layer", "output", "parameters")], 0
    for i, layer in enumerate(model.layers):
        shape = layer.output_shape(shape)
        n = sum(int(math.prod(prm.shape)) for prm in layer.parameters())
        total += n
        rows.append((str(i), repr(layer), "x".join(map(str, shape)), f"{n:,}" if n else ""))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    lines += ["  " + "  ".join(v.rjust(w) if k in (0, 3) else v.ljust(w) for k, (v, w) in enumerate(zip(r, widths)))
              .rstrip() for r in rows]
    lines.append(f"parameters: {total:,}")
    return lines


def build(name_or_path: str) -> Sequential:
    """A fresh model from a preset name or a JSON spec file path (weights drawn from hetnet's generator)."""
    return resolve(name_or_path)[0]


def names_a_model(name_or_path: str) -> bool:
    """Whether resolve takes it: a preset's name, or a path that is a spec file (or may be one: a .json name)."""
    return name_or_path in PRESETS or name_or_path.endswith(".json") or Path(name_or_path).exists()


def resolve(name_or_path: str) -> tuple[Sequential, tuple, dict]:
    """(model, input_shape, spec) for a preset name or a spec file path."""
    if name_or_path in PRESETS:
        spec = spec_of(name_or_path)
        model, shape = build_from_spec(spec, name_or_path)
        return model, shape, spec
    if names_a_model(name_or_path):
        spec = load_spec_file(name_or_path)
        model, shape = build_from_spec(spec, str(name_or_path))
        return model, shape, spec
    raise UsageError(f"--model: unknown model {name_or_path!r} (presets: {', '.join(PRESETS)}; or a SPEC.json)")
