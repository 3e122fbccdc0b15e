"""Evaluating and predicting on what people have: folders and archives of <class>/..., test/<class>/... or both,
IDX folders with only the t10k files; classes matched by name; every image scored; notes when images are adapted;
`hetnet predict --json` on files, folders and archives with one error line per bad file."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_data_folder import classes_tree, image_bytes, make_tar, make_tree

import hetnet as hn
from hetnet import zoo
from hetnet.cli import main
from hetnet.data.folder import load_image_folder
from hetnet.data.idx import FASHION_MNIST_CLASSES, write_idx
from hetnet.data.transforms import normalize
from hetnet.errors import UsageError
from hetnet.runs import evaluate_model

CLASSES = ["cat", "dog", "emu"]
SPEC = {"input_shape": [3, 5, 6], "layers": [
    {"type": "Conv2D", "in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1},
    {"type": "ReLU"}, {"type": "Flatten"}, {"type": "Dense", "in_features": 120, "out_features": 3}]}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    hn.seed(0)
    model, shape = zoo.build_from_spec(SPEC)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    hn.save(model.to("cpu"), path, classes=CLASSES, mean=[0.5] * 3, std=[0.3] * 3, input_shape=shape,
            info={"dataset": "folder", "data": "/nowhere/trained-on", "val_fraction": 0.1, "seed": 0})
    return path


def _expected_accuracy(model_file, x, y) -> float:
    lm = hn.load(model_file)
    pred = np.argmax(lm.model.forward(normalize(x, lm.mean, lm.std)), axis=1)
    return float(np.mean(pred == y))


def _one_error_line(rc, err, *needles):
    lines = [s for s in err.splitlines() if s.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# --- evaluate -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["folder", "tar.gz"])
def test_class_folders_are_all_scored(tmp_path, model_file, layout):
    files = classes_tree(n_per_class=7)
    root = make_tree(tmp_path / "imgs", files) if layout == "folder" else make_tar(tmp_path / "i.tar.gz", files,
                                                                                    "w:gz")
    res = evaluate_model(model_file, dataset="folder", data=str(root), device="cpu", log=None)
    d = load_image_folder(root, input_shape=(3, 5, 6))
    assert res["images"] == 21 and res["split"] == "images"                         # all of them, not 10%
    assert res["accuracy"] == pytest.approx(_expected_accuracy(model_file, d.train_x, d.train_y))
    assert res["classes_scored"] == CLASSES and res["notes"] == []


def test_a_test_split_alone_folder_or_archive(tmp_path, model_file):
    files = classes_tree(n_per_class=4, prefix="test/")
    for root in (make_tree(tmp_path / "t", files), make_tar(tmp_path / "t.tar", files, "w")):
        res = evaluate_model(model_file, dataset="folder", data=str(root), device="cpu", log=None)
        assert res["images"] == 12 and res["split"] == "test set"


def test_both_splits_and_split_flag(tmp_path, model_file, capsys):
    files = {**classes_tree(n_per_class=5, prefix="train/"), **classes_tree(n_per_class=2, prefix="test/")}
    root = make_tree(tmp_path / "both", files)
    counts = {}
    for split in (None, "train", "test", "all"):
        res = evaluate_model(model_file, dataset="folder", data=str(root), device="cpu", log=None, split=split)
        counts[split] = res["images"]
    assert counts == {None: 6, "train": 15, "test": 6, "all": 21}
    # --split names a split the data do not have
    only = make_tree(tmp_path / "only", classes_tree(n_per_class=2))
    rc = main(["evaluate", str(model_file), "--dataset", "folder", "--data", str(only), "--split", "test"])
    _one_error_line(rc, capsys.readouterr().err, "--split", str(only))


def test_classes_are_matched_by_name(tmp_path, model_file, capsys):
    # the same images with the folders in another order of names: labels follow the names, not the positions
    files = classes_tree(n_per_class=4)
    renamed = {f.replace("cat/", "zcat/"): b for f, b in files.items()}
    a = evaluate_model(model_file, dataset="folder", data=str(make_tree(tmp_path / "a", files)), device="cpu",
                       log=None)
    # a renamed class folder is a class the model does not know
    rc = main(["evaluate", str(model_file), "--dataset", "folder", "--data", str(make_tree(tmp_path / "b", renamed))])
    _one_error_line(rc, capsys.readouterr().err, "zcat", "does not know")
    # a subset of the classes is scored on that subset, with one note
    subset = {f: b for f, b in files.items() if not f.startswith("dog/")}
    assert main(["evaluate", str(model_file), "--dataset", "folder", "--data",
                 str(make_tree(tmp_path / "c", subset)), "--json"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert res["classes_scored"] == ["cat", "emu"] and res["images"] == 8 and res["per_class_accuracy"]["dog"] is None
    assert [s for s in err.splitlines() if s.startswith("note:")] == [f"note: {res['notes'][0]}"]
    assert "2 of the model's 3 classes" in err and "dog" in err
    cm = np.array(res["confusion"])           # rows: true class in the model's order; emu is the data's class 1
    assert cm[:, :].sum(axis=1).tolist() == [4, 0, 4]
    d = load_image_folder(tmp_path / "c", input_shape=(3, 5, 6))
    assert res["accuracy"] == pytest.approx(_expected_accuracy(model_file, d.train_x, np.array([0, 2])[d.train_y]))
    cm = np.array(a["confusion"])
    assert cm.sum() == 12 and cm.shape == (3, 3)


def test_idx_folder_with_only_the_t10k_files(tmp_path):
    hn.seed(0)
    model, shape = zoo.build_from_spec({"input_shape": [1, 28, 28], "layers": [
        {"type": "Flatten"}, {"type": "Dense", "in_features": 784, "out_features": 10}]})
    path = tmp_path / "f.safetensors"
    hn.save(model.to("cpu"), path, classes=list(FASHION_MNIST_CLASSES), input_shape=shape,
            info={"dataset": "fashion-mnist"})
    rng = np.random.default_rng(0)
    folder = tmp_path / "t10k"
    folder.mkdir()
    x, y = rng.integers(0, 256, (30, 28, 28)).astype(np.uint8), rng.integers(0, 10, 30).astype(np.uint8)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", y)
    res = evaluate_model(path, data=str(folder), device="cpu", log=None)
    assert res["images"] == 30 and res["split"] == "test set"
    assert res["accuracy"] == pytest.approx(_expected_accuracy(path, x[:, None], y.astype(np.int64)))
    # training still needs the training files
    with pytest.raises(hn.errors.DataError, match="train-images"):
        hn.data.load_dataset("fashion-mnist", folder)


def test_grey_images_for_an_rgb_model_are_converted_with_a_note(tmp_path, model_file, capsys):
    files = {f"{c}/{i}.png": image_bytes("PNG", size=(9, 7), mode="L", seed=i) for c in CLASSES for i in range(2)}
    assert main(["evaluate", str(model_file), "--dataset", "folder", "--data", str(make_tree(tmp_path / "g", files))]) \
        == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1
    assert "6 converted from grey to RGB" in err and "6 resized from 7x9 to 5x6" in err


# --- predict --------------------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    root = make_tree(tmp_path / "imgs", {"a/1.png": image_bytes("PNG", seed=1), "a/2.jpg": image_bytes("JPEG", seed=2),
                                         "b/3.bmp": image_bytes("BMP", seed=3)})
    tar = make_tar(tmp_path / "more.tar.gz", {"x/4.png": image_bytes("PNG", seed=4),
                                              "x/5.png": image_bytes("PNG", seed=5)}, "w:gz")
    single = tmp_path / "6.png"
    single.write_bytes(image_bytes("PNG", seed=6))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return root, tar, single, bad


def test_predict_json_files_folders_archives_and_bad_files(model_file, images, tmp_path, capsys):
    root, tar, single, bad = images
    rc = main(["predict", str(model_file), str(root), str(bad), str(tar), str(tmp_path / "absent.png"), str(single),
               "--json", "--top-k", "2"])
    out, err = capsys.readouterr()
    assert rc == 2
    rows = [json.loads(s) for s in out.splitlines()]
    assert [r["path"] for r in rows] == [str(root / "a/1.png"), str(root / "a/2.jpg"), str(root / "b/3.bmp"),
                                         f"{tar}:x/4.png", f"{tar}:x/5.png", str(single)]
    for r in rows:
        assert list(r) == ["path", "top_k"] and len(r["top_k"]) == 2 and r["top_k"][0][0] in CLASSES
        assert r["top_k"][0][1] >= r["top_k"][1][1] and 0 < sum(p for _, p in r["top_k"]) <= 1 + 1e-6
    errors = [s for s in err.splitlines() if s.startswith("error:")]
    assert len(errors) == 2 and str(bad) in errors[0] and str(tmp_path / "absent.png") in errors[1]
    assert "Traceback" not in err
    # images are 6x5 as the model's input: nothing adapted, no note
    assert "note:" not in err


def test_predict_batches_devices_and_one_note(model_file, images, capsys):
    from hetnet.predict import predict_images

    root, tar, single, _ = images
    big, failed = predict_images(model_file, [str(root), str(tar)], top_k=3, batch_size=256)
    small, _ = predict_images(model_file, [str(root), str(tar)], top_k=3, batch_size=2)
    ref, _ = predict_images(model_file, [str(root), str(tar)], top_k=3, device="reference")
    assert failed == 0 and len(big) == 5
    for (n1, t1), (n2, t2), (n3, t3) in zip(big, small, ref):
        assert n1 == n2 == n3 and [c for c, _ in t1] == [c for c, _ in t2] == [c for c, _ in t3]
        assert np.allclose([p for _, p in t1], [p for _, p in t3], rtol=1e-4)
    capsys.readouterr()
    # a grey image of another size, for an RGB model: one note naming from and to
    grey = root.parent / "grey.png"
    grey.write_bytes(image_bytes("PNG", size=(12, 10), mode="L"))
    assert main(["predict", str(model_file), str(grey), str(single), "--device", "reference"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and err.count("note:") == 1
    assert "1 converted from grey to RGB" in err and "1 resized from 10x12 to 5x6" in err


def test_predict_bad_device_and_empty_folder(model_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["predict", str(model_file), str(tmp_path / "empty")])
    _one_error_line(rc, capsys.readouterr().err, str(tmp_path / "empty"), "no images")
    rc = main(["predict", str(model_file), str(tmp_path / "empty"), "--device", "tpu"])
    _one_error_line(rc, capsys.readouterr().err, "tpu")
    with pytest.raises(UsageError):
        evaluate_model(model_file, dataset="folder", data=str(tmp_path), split="val", log=None)
