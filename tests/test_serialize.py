"""Model files and checkpoints: exact round trips; corrupt, truncated and foreign files are ModelFileErrors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy as stnp

import hetnet as hn
from hetnet import serialize, train, zoo
from hetnet.errors import ModelFileError

SPEC = {"input_shape": [1, 8, 8], "layers": [
    {"type": "Conv2D", "in_channels": 1, "out_channels": 3, "kernel_size": 3, "padding": 1, "bias": False},
    {"type": "BatchNorm2D", "num_features": 3}, {"type": "ReLU"}, {"type": "MaxPool2D", "kernel_size": 2},
    {"type": "Flatten"}, {"type": "Dense", "in_features": 48, "out_features": 4}]}
NAMES = ["a", "b", "c", "d"]


def _trained_model():
    hn.seed(1)
    model, _ = zoo.build_from_spec(SPEC)
    model.to("cpu")
    x = np.random.default_rng(0).random((16, 1, 8, 8)).astype(np.float32)
    model.fit(x, np.arange(16) % 4, epochs=1, batch_size=8, optimizer="momentum", lr=0.1, log=None)
    return model, x


def test_model_round_trip_is_exact(tmp_path):
    model, x = _trained_model()
    path = tmp_path / "m.safetensors"
    serialize.save_model(path, model, SPEC, [0.25], [0.5], NAMES, {"dataset": "toy"})
    lm = serialize.load_model(path, device="cpu")
    for (k, a), (k2, b) in zip(model.state_dict().items(), lm.model.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and np.array_equal(a, b), k
    assert lm.class_names == NAMES and lm.mean == [0.25] and lm.std == [0.5] and lm.input_shape == (1, 8, 8)
    assert lm.info == {"dataset": "toy"} and lm.spec == SPEC
    model.eval()
    assert np.array_equal(model.forward(x), lm.model.forward(x))      # BN running statistics came along
    assert not list(tmp_path.glob(".*tmp"))                              # no temporary file left behind


def test_safetensors_bytes_are_the_format_and_the_same_for_the_same_contents(tmp_path):
    """files.safetensors_bytes: the safetensors package reads every dtype, shape (0-d and empty included) and the
    metadata back exactly; the same arrays and metadata given in another order are the same bytes."""
    from safetensors import safe_open

    from hetnet.files import safetensors_bytes
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((3, 4)).astype(np.float32), "d": rng.standard_normal(5),
              "h": rng.standard_normal(7).astype(np.float16), "n": np.arange(6, dtype=np.int64).reshape(2, 3),
              "i": np.arange(3, dtype=np.int32), "u": np.arange(9, dtype=np.uint8), "b": np.array([True, False]),
              "big": np.arange(4, dtype=">f8"), "s": np.float32(2.5), "e": np.zeros((0, 3), np.float32),
              "t": rng.standard_normal((4, 6)).astype(np.float32).T}
    meta = {"z": "1", "format": "x", "a": json.dumps({"k": [1, 2]})}
    data = safetensors_bytes(arrays, meta)
    back = stnp.load(data)
    assert back.keys() == arrays.keys()
    for k, a in arrays.items():
        a = np.asarray(a)
        assert back[k].dtype == a.dtype.newbyteorder("=") and back[k].shape == a.shape and np.array_equal(back[k], a), k
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == meta
    assert safetensors_bytes(dict(reversed(list(arrays.items()))), dict(reversed(list(meta.items())))) == data
    with pytest.raises(TypeError, match="complex64"):
        safetensors_bytes({"c": np.zeros(2, np.complex64)}, {})


def test_the_same_model_saved_twice_is_the_same_file(tmp_path):
    model, _ = _trained_model()
    for name in ("a", "b"):
        serialize.save_model(tmp_path / f"{name}.safetensors", model, SPEC, [0.25], [0.5], NAMES,
                             {"dataset": "toy", "epochs": 1, "seed": 0})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_new_layers_and_frozen_parameters_round_trip(tmp_path):
    """A spec with GELU, Scale, BatchNorm without a scale (no 'weight' array) and frozen parameters: the file
    holds exactly the model's arrays, and the loaded model has the same flags (they come from the spec)."""
    rng = np.random.default_rng(0)
    spec = {"input_shape": [1, 6, 6], "layers": [
        {"type": "Conv2D", "in_channels": 1, "out_channels": 4, "kernel_size": 1, "frozen": ["weight"]},
        {"type": "BatchNorm2D", "num_features": 4, "momentum": 0.4, "eps": 1e-12, "scale": "none"},
        {"type": "GELU"}, {"type": "BatchNorm2D", "num_features": 4, "scale": "frozen"}, {"type": "Flatten"},
        {"type": "Dense", "in_features": 144, "out_features": 4, "bias": False}, {"type": "Scale", "factor": 0.125}]}
    model, _ = zoo.build_from_spec(spec)
    model.to("cpu")
    x = rng.random((8, 1, 6, 6)).astype(np.float32)
    model.fit(x, np.arange(8) % 4, epochs=1, batch_size=4, optimizer="sgd", lr=0.1, log=None)
    path = tmp_path / "m.safetensors"
    serialize.save_model(path, model, spec, [0.5], [0.5], NAMES)
    arrays, _ = serialize.read_safetensors(path)
    assert sorted(arrays) == sorted(model.state_dict()) and "1.weight" not in arrays and "3.weight" in arrays
    lm = serialize.load_model(path, device="cpu")
    assert [p.requires_grad for p in lm.model.parameters()] == [p.requires_grad for p in model.parameters()] == \
        [False, True, True, False, True, True]
    model.eval()
    assert np.array_equal(model.forward(x), lm.model.forward(x))


def test_checkpoint_round_trip(tmp_path):
    model, _ = _trained_model()
    opt = train.make_optimizer("momentum", model.parameters(), 0.1, 1e-4)
    sched = train.make_schedule("cosine", opt, 100, 5)
    model.zero_grad()
    for p in model.parameters():
        p.grad = np.ones(p.shape)
    for _ in range(3):
        opt.step()
        sched.step()
    serialize.save_checkpoint(tmp_path, model, opt, sched, {"epoch": 3, "rng": hn.random.get_state()})
    hn.seed(99)
    model2, _ = zoo.build_from_spec(SPEC)
    model2.to("cpu")
    opt2 = train.make_optimizer("momentum", model2.parameters(), 0.1, 1e-4)
    sched2 = train.make_schedule("cosine", opt2, 100, 5)
    ck = serialize.read_checkpoint(tmp_path)
    serialize.restore_checkpoint(ck, model2, opt2, sched2)
    assert ck.state["epoch"] == 3
    assert sched2.t == 3 and opt2.steps == 3 and opt2.lr == opt.lr
    for a, b in zip(opt.state["momentum_buffer"], opt2.state["momentum_buffer"]):
        assert np.array_equal(a, b)
    for (_, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert np.array_equal(a, b)


def _good_file(tmp_path):
    model, _ = _trained_model()
    path = tmp_path / "good.safetensors"
    serialize.save_model(path, model, SPEC, [0.25], [0.5], NAMES)
    return path


def _foreign(tmp_path, arrays, metadata=None):
    path = tmp_path / "foreign.safetensors"
    stnp.save_file(arrays, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated", "header-only", "directory",
                                  "foreign-safetensors", "checkpoint-as-model", "wrong-shape", "missing-array",
                                  "bad-spec", "nan-weights", "bad-class-names"])
def test_bad_model_files_name_the_file(tmp_path, case):
    good = _good_file(tmp_path)
    data = good.read_bytes()
    bad = tmp_path / f"{case}.safetensors"
    arrays, meta = serialize.read_safetensors(good)
    meta_str = {k: json.dumps(v) for k, v in meta.items()}
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "text":
        bad.write_text("this is not a model\n" * 10)
    elif case == "truncated":
        bad.write_bytes(data[:len(data) - 50])
    elif case == "header-only":
        bad.write_bytes(data[:20])
    elif case == "directory":
        bad.mkdir()
    elif case == "foreign-safetensors":
        bad = _foreign(tmp_path, {"weight": np.zeros((3, 3), np.float32)}, {"framework": "pt"})
    elif case == "checkpoint-as-model":
        model, _ = _trained_model()
        opt = train.make_optimizer("sgd", model.parameters(), 0.1)
        serialize.save_checkpoint(tmp_path / "run", model, opt, None, {"epoch": 0})
        bad = serialize.checkpoint_path(tmp_path / "run")
    elif case == "wrong-shape":
        arrays["5.weight"] = np.zeros((4, 47), np.float32)
        bad = _foreign(tmp_path, arrays, meta_str)
    elif case == "missing-array":
        del arrays["1.running_var"]
        bad = _foreign(tmp_path, arrays, meta_str)
    elif case == "bad-spec":
        meta_str["spec"] = json.dumps({"input_shape": [1, 8, 8], "layers": [{"type": "Nope"}]})
        bad = _foreign(tmp_path, arrays, meta_str)
    elif case == "nan-weights":
        arrays["0.weight"] = np.full_like(arrays["0.weight"], np.nan)
        bad = _foreign(tmp_path, arrays, meta_str)
    elif case == "bad-class-names":
        meta_str["class_names"] = json.dumps(["a", "b"])
        bad = _foreign(tmp_path, arrays, meta_str)
    with pytest.raises(ModelFileError) as err:
        serialize.load_model(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_corrupt_checkpoint_is_a_model_file_error(tmp_path):
    path = serialize.checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ModelFileError, match="state.safetensors"):
        serialize.read_checkpoint(tmp_path)
    good = _good_file(tmp_path)
    path.write_bytes(good.read_bytes())            # a model file where a checkpoint belongs
    with pytest.raises(ModelFileError, match="expected a checkpoint"):
        serialize.read_checkpoint(tmp_path)


def test_never_pickle():
    with open(serialize.__file__) as f:
        src = f.read()
    assert "pickle" not in src.replace("Never pickle", "")


# --- saving any model from Python: model.spec(), hn.save / hn.load ------------------------------------------------


@pytest.mark.parametrize("name", list(zoo.PRESETS))
def test_spec_of_every_preset_rebuilds_it(name):
    preset = zoo.PRESETS[name]
    model = zoo.build(name)
    spec = model.spec(preset.input_shape)
    assert json.loads(json.dumps(spec)) == spec
    assert spec["input_shape"] == list(preset.input_shape) and len(spec["layers"]) == len(preset.layers)
    for written, given in zip(spec["layers"], preset.layers):
        assert {k: written[k] for k in given} == given           # what the preset says, plus the defaults
    twin, shape = zoo.build_from_spec(spec)
    assert twin.spec(shape) == spec and repr(twin) == repr(model)


def test_every_layer_type_is_covered_by_the_specs_of_the_tests():
    from conftest import EVERY_LAYER_SPECS

    covered = {layer["type"] for spec in EVERY_LAYER_SPECS for layer in spec["layers"]}
    assert covered == set(zoo.LAYER_TYPES)


@pytest.mark.parametrize("which", [0, 1])
def test_hn_save_and_load_round_trip_exactly(tmp_path, which):
    from conftest import EVERY_LAYER_SPECS, randomize_batchnorm

    spec = EVERY_LAYER_SPECS[which]
    hn.seed(3)
    built, shape = zoo.build_from_spec(spec)
    # the same architecture written in Python, weights copied in
    model = zoo.layers_from_specs(spec["layers"]).to("cpu")
    model.load_state_dict(built.state_dict())
    randomize_batchnorm(model, np.random.default_rng(which))
    x = np.random.default_rng(5).random((4, *shape)).astype(np.float32)
    model.eval()
    expected = model.forward(x)
    names = [f"class {i}" for i in range(model.output_shape(shape)[0])]
    c = shape[0]
    state_before = hn.random.get_state()
    hn.save(model, tmp_path / "m.safetensors", classes=names, mean=[0.5] * c, std=[0.25] * c, input_shape=shape)
    assert hn.random.get_state() == state_before                 # saving draws nothing from hetnet's generator
    lm = hn.load(tmp_path / "m.safetensors")
    assert lm.spec == model.spec(shape) and lm.input_shape == tuple(shape) and lm.class_names == names
    assert lm.mean == [0.5] * c and lm.std == [0.25] * c
    for (k, a), (k2, b) in zip(model.state_dict().items(), lm.model.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and np.array_equal(a, b), k
    assert np.array_equal(lm.model.forward(x), expected)
    # the input shape defaults to the one the model last ran on; class names and normalisation have defaults
    hn.save(model, tmp_path / "d.safetensors")
    d = hn.load(tmp_path / "d.safetensors")
    assert d.input_shape == tuple(shape) and d.class_names == [str(i) for i in range(len(names))]
    assert d.mean == [0.0] * c and d.std == [1.0] * c


class _Custom(hn.ReLU):
    pass


@pytest.mark.parametrize("case", ["spec-none", "spec-empty", "spec-other-model", "empty-model", "custom-layer",
                                  "no-input-shape", "shape-does-not-chain", "class-count", "std-zero",
                                  "mean-length", "not-a-model"])
def test_saving_what_cannot_be_loaded_is_refused(tmp_path, case):
    from hetnet.errors import UsageError

    model, _ = _trained_model()
    path = tmp_path / "m.safetensors"
    args = {"classes": NAMES, "mean": [0.25], "std": [0.5], "input_shape": (1, 8, 8)}
    if case.startswith("spec-"):
        spec = {"spec-none": None, "spec-empty": {}, "spec-other-model": zoo.spec_of("mlp")}[case]
        def call():
            serialize.save_model(path, model, spec, [0.25], [0.5], NAMES)
    else:
        if case == "empty-model":
            model = hn.Sequential([])
        elif case == "custom-layer":
            model = hn.Sequential([hn.Flatten(), _Custom()])
            args["classes"] = [str(i) for i in range(64)]
        elif case == "no-input-shape":
            model, _ = zoo.build_from_spec(SPEC)
            del args["input_shape"]
        elif case == "shape-does-not-chain":
            args["input_shape"] = (1, 10, 8)
        elif case == "class-count":
            args["classes"] = NAMES[:3]
        elif case == "std-zero":
            args["std"] = [0.0]
        elif case == "mean-length":
            args["mean"] = [0.1, 0.2]
        elif case == "not-a-model":
            model = {"weight": np.zeros(3)}
        def call():
            hn.save(model, path, **args)
    with pytest.raises(UsageError) as err:
        call()
    assert str(path) in str(err.value) and "cannot save" in str(err.value) and "\n" not in str(err.value)
    assert not path.exists() and not list(tmp_path.iterdir())
