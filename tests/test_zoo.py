"""Model zoo: the thesis's five CNNs exactly, the MLP, fashion-cnn and its recipe, JSON specs."""
from __future__ import annotations

import json

import numpy as np
import pytest

import hetnet as hn
from hetnet import zoo
from hetnet.errors import ModelFileError, UsageError

THESIS = {  # preset: (input, conv channels, dense widths, learning rate)
    "thesis-m0": ((3, 12, 12), [16, 32], [100], 0.01),
    "thesis-m1": ((3, 32, 32), [16, 32], [100], 0.01),
    "thesis-m2": ((3, 40, 40), [16, 32], [100], 0.001),
    "thesis-m3": ((3, 40, 40), [16, 32, 32], [128, 50], 0.00001),
    "thesis-m4": ((3, 50, 50), [32, 32, 32], [200, 50], 0.00001),
}


@pytest.mark.parametrize("name", list(THESIS))
def test_thesis_models_are_exactly_as_described(name):
    shape, convs, dense, lr = THESIS[name]
    preset = zoo.PRESETS[name]
    assert preset.input_shape == shape and preset.lr == lr
    assert preset.optimizer == "sgd" and preset.batch_size == 32 and preset.schedule == "constant"
    assert preset.weight_decay == 0 and not preset.augment
    model = zoo.build(name)
    kinds = [type(layer).__name__ for layer in model.layers]
    conv = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.out_channels for c in conv] == convs
    assert all(c.kernel_size == 3 and c.padding == 1 and c.stride == 1 for c in conv)
    for i, k in enumerate(kinds):
        if k == "Conv2D":
            assert kinds[i + 1:i + 3] == ["ReLU", "MaxPool2D"] and model.layers[i + 2].kernel_size == 2
    dense_layers = [layer for layer in model.layers if type(layer).__name__ == "Dense"]
    assert [d.out_features for d in dense_layers] == dense + [10]
    assert kinds[-1] == "Dense" and kinds.count("ReLU") == len(convs) + len(dense)
    assert model.output_shape(shape) == (10,)


def test_mlp_and_fashion_cnn():
    assert zoo.build("mlp").output_shape((1, 28, 28)) == (10,)
    assert [d.out_features for d in zoo.build("mlp").layers if type(d).__name__ == "Dense"] == [512, 256, 10]
    model = zoo.build("fashion-cnn")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert "BatchNorm2D" in kinds and model.output_shape((1, 28, 28)) == (10,)


def test_fashion_cnn_recipe_is_valid_for_the_trainer():
    from hetnet.data.transforms import parse_augment
    from hetnet.optim import SCHEDULES
    from hetnet.train import OPTIMIZERS

    p = zoo.PRESETS["fashion-cnn"]
    assert p.optimizer in OPTIMIZERS and p.schedule in SCHEDULES and p.lr > 0 and p.epochs >= 10
    assert 0 < p.weight_decay < 1e-2 and p.batch_size == 128
    parse_augment(p.augment)                         # names the data loader understands


def test_every_preset_recipe_passes_the_run_checks_and_airbench_fields_are_shown():
    """Each preset's recipe, new fields included, is what hetnet.runs accepts; recipe_line names the fields of an
    airbench-style recipe (parameter groups, momentum, lookahead, whitening-bias epochs)."""
    from hetnet.runs import RunConfig, _recipe

    for name, preset in zoo.PRESETS.items():
        r = _recipe(RunConfig(model=name), preset)
        assert r["param_groups"] == [{"weight_decay_scale": 1.0, "lr_scale": 1.0, **g,
                                      "params": [g["params"]] if isinstance(g["params"], str) else g["params"]}
                                     for g in preset.param_groups], name
    p = zoo.Preset((3, 32, 32), [], lr=11.5, optimizer="nesterov-decoupled", momentum=0.85, schedule="triangular",
                   param_groups=({"params": "BatchNorm*.bias", "lr_scale": 64.0},), lookahead=5,
                   whiten_bias_epochs=3)
    line = zoo.recipe_line(p)
    for part in ("nesterov-decoupled lr 11.5", "triangular schedule", "momentum 0.85", "BatchNorm*.bias at lr x64",
                 "lookahead every 5 steps (decay 0.95)", "first bias frozen after 3 epochs"):
        assert part in line, part


def test_spec_round_trip_and_seeded_build(tmp_path):
    spec = zoo.spec_of("fashion-cnn")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    hn.seed(3)
    a, shape, spec_a = zoo.resolve(str(path))
    hn.seed(3)
    b = zoo.build("fashion-cnn")
    assert shape == (1, 28, 28) and spec_a == spec
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and np.array_equal(va, vb)


def test_resolve_errors(tmp_path):
    with pytest.raises(UsageError, match="--model"):
        zoo.resolve("no-such-model")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"input_shape": [1, 28, 28], "layers": [{"type": "Flatten"},
                                                                      {"type": "Dense", "in_features": 100,
                                                                       "out_features": 10}]}))
    with pytest.raises(ModelFileError, match="chain"):
        zoo.resolve(str(bad))
    for content in ({"layers": []}, {"input_shape": [1, 28], "layers": [{"type": "Flatten"}]},
                    {"input_shape": [1, 2, 2], "layers": [{"type": "Warp"}]},
                    {"input_shape": [1, 2, 2], "layers": [{"type": "Dense", "in_features": -1}]}):
        bad.write_text(json.dumps(content))
        with pytest.raises(ModelFileError, match="bad.json"):
            zoo.resolve(str(bad))


# --- cifar-speed: airbench94's network and recipe ---------------------------------------------------------------


def test_cifar_speed_is_airbench94():
    p = zoo.PRESETS["cifar-speed"]
    model = zoo.build("cifar-speed")
    kinds = [type(layer).__name__ for layer in model.layers]
    group = ["Conv2D", "MaxPool2D", "BatchNorm2D", "GELU", "Conv2D", "BatchNorm2D", "GELU"]
    assert kinds == ["Conv2D", "GELU"] + group * 3 + ["MaxPool2D", "Flatten", "Dense", "Scale"]
    # airbench 0.1.8's make_net94() has 1,972,792 parameters (torch, BN weights counted as here)
    assert sum(int(np.prod(prm.shape)) for prm in model.parameters()) == 1_972_792
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.out_channels for c in convs] == [24, 64, 64, 256, 256, 256, 256]
    assert convs[0].init == "whitening" and convs[0].use_bias and all(c.init == "dirac" for c in convs[1:])
    assert not any(c.use_bias for c in convs[1:])
    bns = [layer for layer in model.layers if type(layer).__name__ == "BatchNorm2D"]
    assert {(b.momentum, b.eps, b.scale) for b in bns} == {(0.4, 1e-12, "frozen")}
    assert model.layers[-1].factor == pytest.approx(1 / 9) and not model.layers[-2].use_bias
    assert model.output_shape((3, 32, 32)) == (10,)
    assert (p.batch_size, p.label_smoothing, p.tta, p.augment) == (1024, 0.2, 2, ("translate:2", "altflip"))
    # airbench94's hyp['opt'] through the recipe fields of hetnet.train (decoupled Nesterov, groups, lookahead)
    assert (p.optimizer, p.lr, p.weight_decay, p.momentum) == ("nesterov-decoupled", 11.5, 0.0153, 0.85)
    assert p.param_groups == ({"params": "BatchNorm2D.bias", "lr_scale": 64.0},)
    assert (p.lookahead, p.lookahead_decay, p.whiten_bias_epochs) == (5, 0.95, 3)
    assert p.schedule.startswith("triangular") and p.precision == "bf16"


def test_cifar_speed_trains_airbenchs_426_steps():
    """airbench94 on the peer run's 45,000 training images: drop_last, 43 batches of 1024 an epoch, 9.9 epochs =
    ceil(9.9 x 43) = 426 steps, the tenth epoch cut after 39 batches."""
    from hetnet.data import BatchLoader
    from hetnet.runs import RunConfig, _recipe, train_drop_last
    from hetnet.train import steps_in_epoch, total_steps

    p = zoo.PRESETS["cifar-speed"]
    recipe = _recipe(RunConfig(model="cifar-speed"), p)
    assert (recipe["epochs"], recipe["drop_last"]) == (9.9, True)
    n = 45_000
    loader = BatchLoader(np.zeros((n, 1, 1, 1), np.uint8), np.zeros(n, np.int64), recipe["batch_size"],
                         drop_last=train_drop_last(recipe, n))
    assert len(loader) == 43 and total_steps(recipe["epochs"], len(loader)) == 426
    assert steps_in_epoch(recipe["epochs"], 43, 9) == 39
    assert zoo.recipe_line(p).startswith("9.9 epochs, batch 1024 (last partial batch dropped), ")


def test_cifar_speed_trains_end_to_end_on_cpu(tmp_path):
    from test_data_folder import classes_tree, make_tree

    from hetnet.runs import RunConfig, evaluate_model, train_run

    root = make_tree(tmp_path / "imgs", classes_tree(n_per_class=7))        # 3 classes, resized to 32x32
    res = train_run(RunConfig(model="cifar-speed", dataset="folder", data=str(root), epochs=1, device="cpu",
                              out=str(tmp_path / "run")), log=None, progress=False)
    rec = res.history[-1]
    assert rec["tta"] == 2 and 0 <= rec["val_accuracy"] <= 1 and np.isfinite(rec["train_loss"])
    lm = hn.load(res.model_path)
    assert lm.model.output_shape((3, 32, 32)) == (3,)                        # the classifier fitted to 3 classes
    w = lm.model.layers[0].weight
    assert not w.requires_grad and np.abs(w.data).max() > 0                   # whitened from the training images
    ev = evaluate_model(res.run_dir, device="cpu", log=None)
    assert ev["tta"] == 2 and ev["accuracy"] == pytest.approx(rec["val_accuracy"])
