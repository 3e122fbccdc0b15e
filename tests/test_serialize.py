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
