"""ONNX export: every preset and every layer type run by onnxruntime (CPU) give hetnet's logits; the graph is
checker-clean, opset >= 17, batch-dynamic, normalises inside; `hetnet export` and its errors."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import EVERY_LAYER_SPECS, ONNX_RTOL, randomize_batchnorm, rel_err

import hetnet as hn
from hetnet import zoo
from hetnet.cli import main
from hetnet.data.transforms import normalize

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'hetnet[test]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'hetnet[test]')")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_against_hetnet(model, shape, path, mean, std, batch=3, seed=0):
    """ONNX logits on images in [0, 1] vs hetnet's cpu backend on the same uint8 images normalised on the host."""
    u = np.random.default_rng(seed).integers(0, 256, (batch, *shape)).astype(np.uint8)
    model.eval()
    expected = model.forward(normalize(u, mean, std))
    got = _session(path).run(["logits"], {"images": (u / np.float32(255)).astype(np.float32)})[0]
    assert got.shape == expected.shape
    err = rel_err(got, expected)
    assert err <= ONNX_RTOL, f"relative error {err:.3g} > {ONNX_RTOL:.0e}"
    return got


@pytest.mark.parametrize("name", list(zoo.PRESETS))
def test_every_preset_runs_in_onnxruntime_as_in_hetnet(tmp_path, name):
    hn.seed(1)
    model, shape, _ = zoo.resolve(name)
    model.to("cpu")
    randomize_batchnorm(model, np.random.default_rng(2))
    c = shape[0]
    mean, std = [0.3, 0.4, 0.5][:c], [0.2, 0.25, 0.3][:c]
    model.export_onnx(tmp_path / "m.onnx", shape, mean=mean, std=std)
    for batch in (1, 4):                                            # one graph, any batch size
        _check_against_hetnet(model, shape, tmp_path / "m.onnx", mean, std, batch=batch)


@pytest.mark.parametrize("which", range(len(EVERY_LAYER_SPECS)))
@pytest.mark.parametrize("device", ["cpu", "reference"])
def test_every_layer_type_in_eval_mode(tmp_path, which, device):
    spec = EVERY_LAYER_SPECS[which]
    hn.seed(which)
    model, shape = zoo.build_from_spec(spec)
    model.to(device)
    randomize_batchnorm(model, np.random.default_rng(which))
    model.train()                                  # exported in eval mode whatever mode the model is in
    model.export_onnx(tmp_path / "m.onnx", shape)  # no mean/std: the graph takes x / 255 as it is
    model.to("cpu")
    _check_against_hetnet(model, shape, tmp_path / "m.onnx", None, None, batch=5, seed=which)


def test_the_graph_is_checked_named_and_carries_its_metadata(tmp_path):
    model, shape, _ = zoo.resolve("fashion-cnn")
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    path = model.export_onnx(tmp_path / "f.onnx", shape, mean=[0.286], std=[0.353], class_names=names)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "images" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 1, 28, 28] and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 10]
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta == {"class_names": names, "mean": [0.286], "std": [0.353], "input_shape": [1, 28, 28]}
    assert {n.op_type for n in proto.graph.node} >= {"Mul", "Add", "Conv", "BatchNormalization", "Gemm"}
    assert "Dropout" not in {n.op_type for n in proto.graph.node}


def test_a_layer_without_converter_is_refused(tmp_path):
    class Custom(hn.Layer):
        pass

    with pytest.raises(hn.errors.UsageError, match="layer 1 .Custom. has no ONNX converter"):
        hn.Sequential([hn.Flatten(), Custom()]).export_onnx(tmp_path / "x.onnx", (1, 2, 2))
    assert not list(tmp_path.iterdir())


# --- the command ----------------------------------------------------------------------------------------------


@pytest.fixture
def model_file(tmp_path):
    hn.seed(0)
    model, shape, _ = zoo.resolve("fashion-cnn")
    model.to("cpu")
    randomize_batchnorm(model, np.random.default_rng(0))
    path = tmp_path / "run" / "model.safetensors"
    path.parent.mkdir()
    hn.save(model, path, classes=list("abcdefghij"), mean=[0.29], std=[0.35], input_shape=shape)
    return path


def test_hetnet_export_run_dir_and_model_file(model_file, tmp_path, capsys):
    assert main(["export", str(model_file.parent), "--format", "onnx", "--out", str(tmp_path / "a.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", str(model_file)]) == 0                    # default: beside the model file
    assert (model_file.parent / "model.onnx").is_file()
    lm = hn.load(model_file)
    got = _check_against_hetnet(lm.model, lm.input_shape, tmp_path / "a.onnx", lm.mean, lm.std)
    assert got.shape == (3, 10)


def _one_error_line(rc, err, *needles):
    lines = [s for s in err.splitlines() if s.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_export_without_the_onnx_package_says_what_to_install(model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)                  # import onnx -> ImportError
    rc = main(["export", str(model_file), "--out", str(tmp_path / "x.onnx")])
    _one_error_line(rc, capsys.readouterr().err, "onnx", "pip install")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("case", ["missing-model", "not-a-model", "out-is-a-directory", "out-under-a-file",
                                  "bad-format"])
def test_export_bad_input(model_file, tmp_path, capsys, case):
    argv = ["export", str(model_file), "--out", str(tmp_path / "x.onnx")]
    needle = str(model_file)
    if case == "missing-model":
        argv[1] = needle = str(tmp_path / "absent.safetensors")
    elif case == "not-a-model":
        (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
        argv[1] = needle = str(tmp_path / "junk.safetensors")
    elif case == "out-is-a-directory":
        argv[3] = str(tmp_path)
        needle = "--out"
    elif case == "out-under-a-file":
        (tmp_path / "notes.txt").write_text("a file")
        argv[3] = str(tmp_path / "notes.txt" / "x.onnx")
        needle = f"{tmp_path / 'notes.txt'} is a file, not a folder"
    else:
        argv += ["--format", "tflite"]
        needle = "--format"
    if case == "bad-format":
        with pytest.raises(SystemExit) as e:
            main(argv)
        rc = e.value.code
    else:
        rc = main(argv)
    _one_error_line(rc, capsys.readouterr().err, needle)
    assert not (tmp_path / "x.onnx").exists()
