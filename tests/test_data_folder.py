"""Image folders and tar archives of them: layouts, formats, conversion, bad images."""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hetnet.data import load_dataset
from hetnet.data.folder import load_image_folder
from hetnet.errors import DataError, UsageError


def image_bytes(fmt: str, size=(6, 5), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format=fmt)
    return buf.getvalue()


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def classes_tree(n_per_class=3, classes=("cat", "dog", "emu"), prefix="") -> dict[str, bytes]:
    fmts = [("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp")]
    files = {}
    for k, c in enumerate(classes):
        for i in range(n_per_class):
            fmt, ext = fmts[(k + i) % 3]
            files[f"{prefix}{c}/{i:03d}.{ext}"] = image_bytes(fmt, seed=10 * k + i)
    return files


def make_tar(path: Path, files: dict[str, bytes], mode: str) -> Path:
    with tarfile.open(path, mode) as tf:
        for rel, data in files.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_class_folders(tmp_path):
    files = classes_tree()
    files["README.txt"] = b"not an image, ignored"
    files["cat/.hidden.png"] = b"ignored"
    d = load_image_folder(make_tree(tmp_path / "root", files))
    assert d.class_names == ["cat", "dog", "emu"]
    assert d.train_x.shape == (9, 3, 5, 6) and d.train_x.dtype == np.uint8
    assert d.train_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert d.test_x is None and d.skipped == 0
    # PNG and BMP are lossless: the pixels are exactly those written
    png = np.asarray(Image.open(io.BytesIO(files["cat/000.png"])))
    np.testing.assert_array_equal(d.train_x[0].transpose(1, 2, 0), png)


def test_split_folders_and_conversion(tmp_path):
    files = {**classes_tree(prefix="train/"), **classes_tree(n_per_class=1, classes=("dog", "emu"), prefix="test/")}
    root = make_tree(tmp_path / "root", files)
    d = load_dataset("folder", root, input_shape=(1, 8, 10))
    assert d.train_x.shape == (9, 1, 8, 10) and d.test_x.shape == (2, 1, 8, 10)
    assert d.test_y.tolist() == [1, 2] and d.class_names == ["cat", "dog", "emu"]
    ref = np.asarray(Image.open(io.BytesIO(files["train/cat/000.png"])).convert("L").resize((10, 8), Image.BILINEAR))
    np.testing.assert_array_equal(d.train_x[0, 0], ref)


def test_grey_images_stay_grey_and_sizes_follow_first(tmp_path):
    files = {"a/1.png": image_bytes("PNG", (4, 4), "L"), "b/1.png": image_bytes("PNG", (8, 6), "L", seed=1)}
    d = load_image_folder(make_tree(tmp_path, files))
    assert d.train_x.shape == (2, 1, 4, 4)
    d = load_image_folder(tmp_path, input_shape=(3, 5, 5))
    assert d.train_x.shape == (2, 3, 5, 5) and np.array_equal(d.train_x[:, 0], d.train_x[:, 1])


@pytest.mark.parametrize("mode, name", [("w", "set.tar"), ("w:gz", "set.tar.gz"), ("w:gz", "set.tgz")])
def test_tar_archives(tmp_path, mode, name):
    files = {**classes_tree(prefix="mydata/train/"), **classes_tree(n_per_class=1, prefix="mydata/test/")}
    tar = make_tar(tmp_path / name, files, mode)
    d = load_dataset("folder", tar)
    tree = load_dataset("folder", make_tree(tmp_path / "tree", files) / "mydata")
    assert d.class_names == tree.class_names == ["cat", "dog", "emu"]
    np.testing.assert_array_equal(d.train_x, tree.train_x)
    np.testing.assert_array_equal(d.train_y, tree.train_y)
    np.testing.assert_array_equal(d.test_x, tree.test_x)
    assert d.source == str(tar)


def test_corrupt_tar(tmp_path):
    good = make_tar(tmp_path / "a.tar.gz", classes_tree(), "w:gz").read_bytes()
    (tmp_path / "b.tar.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="b.tar.gz: corrupt or unreadable tar"):
        load_image_folder(tmp_path / "b.tar.gz")


def _bad_images() -> dict[str, bytes]:
    jpg = image_bytes("JPEG", (40, 40))
    png = image_bytes("PNG", (40, 40))
    return {"unreadable": b"this is not a PNG at all", "empty": b"", "truncated-jpg": jpg[: len(jpg) // 2],
            "truncated-png": png[: len(png) // 2]}


@pytest.mark.parametrize("kind", list(_bad_images()))
@pytest.mark.parametrize("as_tar", [False, True])
def test_bad_image_named(tmp_path, kind, as_tar):
    ext = "jpg" if "jpg" in kind else "png"
    files = {**classes_tree(), f"dog/bad.{ext}": _bad_images()[kind]}
    root = make_tar(tmp_path / "x.tar", files, "w") if as_tar else make_tree(tmp_path / "root", files)
    with pytest.raises(DataError, match=f"bad.{ext}: not a readable image") as e:
        load_dataset("folder", root)
    assert f"dog/bad.{ext}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("as_tar", [False, True])
def test_skip_bad_images(tmp_path, as_tar):
    files = {**classes_tree()}
    for k, (kind, data) in enumerate(_bad_images().items()):
        files[f"{['cat', 'dog'][k % 2]}/{kind}.{'jpg' if 'jpg' in kind else 'png'}"] = data
    root = make_tar(tmp_path / "x.tar.gz", files, "w:gz") if as_tar else make_tree(tmp_path / "root", files)
    d = load_dataset("folder", root, skip_bad_images=True)
    assert d.skipped == 4 and len(d.train_x) == 9


def test_fewer_than_two_classes(tmp_path):
    make_tree(tmp_path / "one", classes_tree(classes=("cat",)))
    with pytest.raises(DataError, match="found 1 class folder .*at least two"):
        load_dataset("folder", tmp_path / "one")
    make_tree(tmp_path / "split", classes_tree(classes=("cat",), prefix="train/"))
    with pytest.raises(DataError, match="at least two"):
        load_dataset("folder", tmp_path / "split")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable images"):
        load_dataset("folder", tmp_path / "empty")
    # a second class whose only image is bad, skipped: still one class
    make_tree(tmp_path / "skip", {**classes_tree(classes=("cat",)), "dog/x.png": b""})
    with pytest.raises(DataError, match="at least two"):
        load_dataset("folder", tmp_path / "skip", skip_bad_images=True)


def test_layout_errors(tmp_path):
    make_tree(tmp_path / "a", {**classes_tree(), "loose.png": image_bytes("PNG")})
    with pytest.raises(DataError, match=r"loose.png is not at ROOT/<class>/<image>"):
        load_dataset("folder", tmp_path / "a")
    make_tree(tmp_path / "b", {**classes_tree(prefix="train/"), **classes_tree(classes=("yak",), prefix="test/")})
    with pytest.raises(DataError, match="test classes yak have no training folder"):
        load_dataset("folder", tmp_path / "b")
    make_tree(tmp_path / "c", classes_tree(prefix="test/"))
    with pytest.raises(DataError, match="no training images"):
        load_dataset("folder", tmp_path / "c")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="found a file"):
        load_dataset("folder", tmp_path / "file.txt")
    with pytest.raises(UsageError, match="--data"):
        load_dataset("folder")
    with pytest.raises(DataError, match="asks for 4"):
        load_dataset("folder", tmp_path / "a", input_shape=(4, 8, 8))


CIFAR_JPG = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpg-train.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPG.exists(), reason=f"{CIFAR_JPG} not present")
def test_cifar10_jpeg_archive():
    t = time.perf_counter()
    d = load_dataset("cifar10", CIFAR_JPG, input_shape=(3, 32, 32))
    seconds = time.perf_counter() - t
    print(f"read {len(d.train_x)} images in {seconds:.1f} s")
    assert d.train_x.shape == (50000, 3, 32, 32) and d.test_x is None and d.skipped == 0
    assert d.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert np.array_equal(np.bincount(d.train_y), [5000] * 10)


def test_many_decode_chunks(tmp_path, monkeypatch):
    from hetnet.data import folder as folder_mod
    monkeypatch.setattr(folder_mod, "_CHUNK", 2)
    files = classes_tree(n_per_class=5)
    root = make_tree(tmp_path / "root", files)
    d = load_image_folder(root)
    monkeypatch.setattr(folder_mod, "_CHUNK", 500)
    ref = load_image_folder(root)
    np.testing.assert_array_equal(d.train_x, ref.train_x)
    np.testing.assert_array_equal(d.train_y, ref.train_y)
    monkeypatch.setattr(folder_mod, "_CHUNK", 2)
    make_tree(root, {"dog/003x.png": b"junk", "emu/001x.png": b""})
    with pytest.raises(DataError, match="dog/003x.png"):          # the first bad file in reading order
        load_image_folder(root)
    assert load_image_folder(root, skip_bad_images=True).skipped == 2
