"""CIFAR-10 python batches (restricted unpickler) and binary batches, on small files the tests write."""
from __future__ import annotations

import builtins
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from hetnet.data import cifar, load_dataset
from hetnet.errors import DataError

N = 6   # images per test batch (the official batches hold 10000)


def batch(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, n)]


def py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """The bytes Python 2 + NumPy 1 wrote for the official batches: protocol 2, str keys as BINSTRING, the array
    through numpy.core.multiarray._reconstruct with a numpy.dtype('u1') state (written opcode by opcode)."""
    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)
    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
             + b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
             + b"(" + i(1) + i(data.shape[0]) + i(data.shape[1]) + b"\x86" + dtype + b"\x89" + s(data.tobytes())
             + b"tb")
    lab = b"](" + b"".join(i(v) for v in labels) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"training batch 1 of 5") + s(b"data") + array
            + s(b"labels") + lab + s(b"filenames") + b"]" + b"u.")


def write_python_set(folder: Path, fmt="py3", meta=True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, name in enumerate(cifar.TRAIN_BATCHES + (cifar.TEST_BATCH,)):
        data, labels = batch(seed=k)
        if fmt == "py2":
            raw = py2_pickle(data, labels)
        else:
            raw = pickle.dumps({"data": data, "labels": labels, "batch_label": name}, protocol=int(fmt[-1]))
        (folder / name).write_bytes(raw)
        out[name] = (data, labels)
    if meta:
        names = [f"class{j}" for j in range(10)]
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}))
    return out


def write_binary_set(folder: Path, meta=True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, name in enumerate(cifar.TRAIN_BATCHES + (cifar.TEST_BATCH,)):
        data, labels = batch(seed=k)
        rec = np.concatenate([np.array(labels, np.uint8)[:, None], data], axis=1)
        (folder / (name + ".bin")).write_bytes(rec.tobytes())
        out[name] = (data, labels)
    if meta:
        (folder / "batches.meta.txt").write_text("\n".join(f"bin{j}" for j in range(10)) + "\n\n")
    return out


# --- python batches -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["py2", "py3-2", "py3-4", "py3-5"])
def test_python_batch_formats(tmp_path, fmt):
    data, labels = batch()
    if fmt == "py2":
        raw = py2_pickle(data, labels)
    else:
        raw = pickle.dumps({"data": data, "labels": labels}, protocol=int(fmt[-1]))
    (tmp_path / "b").write_bytes(raw)
    x, y = cifar.load_python_batch(tmp_path / "b")
    assert x.shape == (N, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert x.flags.writeable and x.flags.c_contiguous
    np.testing.assert_array_equal(x.reshape(N, -1), data)
    np.testing.assert_array_equal(y, labels)


def test_py2_pickle_helper_matches_pickle():
    """The hand-written Python 2 stream is a real pickle: the standard unpickler reads the same thing."""
    data, labels = batch()
    d = pickle.loads(py2_pickle(data, labels), encoding="bytes")
    np.testing.assert_array_equal(d[b"data"], data)
    assert d[b"labels"] == labels


@pytest.mark.parametrize("fmt", ["py2", "py3-4"])
def test_python_folder(tmp_path, fmt):
    written = write_python_set(tmp_path / "cifar-10-batches-py", fmt)
    d = load_dataset("cifar10", tmp_path)                   # the folder above the batches is accepted too
    assert d.train_x.shape == (5 * N, 3, 32, 32) and d.test_x.shape == (N, 3, 32, 32)
    assert d.class_names == [f"class{j}" for j in range(10)]
    assert d.source == str(tmp_path / "cifar-10-batches-py")
    np.testing.assert_array_equal(d.train_x[N:2 * N].reshape(N, -1), written["data_batch_2"][0])
    np.testing.assert_array_equal(d.test_y, written["test_batch"][1])
    d = load_dataset("cifar10", tmp_path, input_shape=(1, 12, 12))
    assert d.train_x.shape == (5 * N, 1, 12, 12)


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))      # unpickling it would create the file


class EvilSystem:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("make", [
    lambda t: Evil(t),
    lambda t: {"data": batch()[0], "labels": EvilSystem(t)},
    lambda t: {"data": np.array([Evil(t)], dtype=object), "labels": [0]},
    lambda t: {"data": batch()[0], "labels": [0] * N, "extra": [1, {"x": EvilSystem(t)}]},
])
@pytest.mark.parametrize("protocol", [2, 5])
def test_malicious_pickle_runs_nothing(tmp_path, make, protocol):
    target = tmp_path / "pwned"
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(make(str(target)), protocol=protocol))
    with pytest.raises(DataError, match="data_batch_1: not a plain-data pickle") as e:
        cifar.load_python_batch(tmp_path / "data_batch_1")
    assert not target.exists()
    assert "\n" not in str(e.value)


def test_allowed_globals_cannot_be_misused():
    bad_codec = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(DataError, match="latin1"):
        cifar.restricted_load(bad_codec, "x")
    obj_dtype = b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8K\x00K\x01\x87R."
    with pytest.raises(DataError, match="plain numeric dtype"):
        cifar.restricted_load(obj_dtype, "x")
    sub = pickle.dumps(np.ma.masked_array([1, 2]), protocol=2)
    with pytest.raises(DataError, match="refused"):
        cifar.restricted_load(sub, "x")


@pytest.mark.parametrize("content, words", [
    ({"data": np.zeros((N, 3071), np.uint8), "labels": [0] * N}, r"shape \(N, 3072\)"),
    ({"data": np.zeros((N, 3072), np.float32), "labels": [0] * N}, "uint8"),
    ({"data": np.zeros(3072, np.uint8), "labels": [0]}, r"shape \(N, 3072\)"),
    ({"data": [[0] * 3072], "labels": [0]}, "found list"),
    ({"data": np.zeros((N, 3072), np.uint8), "labels": [0] * (N - 1)}, f"{N} images but {N - 1} labels"),
    ({"data": np.zeros((N, 3072), np.uint8), "labels": [0] * (N - 1) + [10]}, "label 10 at index 5"),
    ({"data": np.zeros((N, 3072), np.uint8), "labels": [-1] * N}, "label -1"),
    ({"data": np.zeros((N, 3072), np.uint8), "labels": ["cat"] * N}, "list of integers"),
    ({"labels": [0]}, "expected keys 'data' and 'labels'"),
    ([1, 2, 3], "expected a dict"),
])
def test_python_batch_bad_content(tmp_path, content, words):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=words) as e:
        cifar.load_python_batch(tmp_path / "data_batch_1")
    assert str(tmp_path / "data_batch_1") in str(e.value)


def test_python_batch_truncated(tmp_path):
    raw = pickle.dumps({"data": batch()[0], "labels": batch()[1]})
    (tmp_path / "b").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(DataError, match="unreadable pickle"):
        cifar.load_python_batch(tmp_path / "b")
    (tmp_path / "b").write_bytes(b"")
    with pytest.raises(DataError, match="unreadable pickle"):
        cifar.load_python_batch(tmp_path / "b")


def test_missing_batches(tmp_path):
    write_python_set(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(DataError, match="missing CIFAR-10 python batches: data_batch_4"):
        load_dataset("cifar10", tmp_path)


def test_bad_meta(tmp_path):
    write_python_set(tmp_path)
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}))
    with pytest.raises(DataError, match="batches.meta: expected 'label_names'"):
        load_dataset("cifar10", tmp_path)


def test_default_class_names_without_meta(tmp_path):
    write_python_set(tmp_path, meta=False)
    assert cifar.load_cifar10(tmp_path)["class_names"] == list(cifar.CIFAR10_CLASSES)


# --- binary batches -----------------------------------------------------------------------------------------

def test_binary_folder(tmp_path):
    written = write_binary_set(tmp_path / "cifar-10-batches-bin")
    d = load_dataset("cifar10", tmp_path / "cifar-10-batches-bin")
    assert d.train_x.shape == (5 * N, 3, 32, 32) and d.test_y.dtype == np.int64
    assert d.class_names == [f"bin{j}" for j in range(10)]
    np.testing.assert_array_equal(d.test_x.reshape(N, -1), written["test_batch"][0])
    np.testing.assert_array_equal(d.train_y[:N], written["data_batch_1"][1])


def test_binary_and_python_agree(tmp_path):
    write_binary_set(tmp_path / "bin", meta=False)
    write_python_set(tmp_path / "py", meta=False)
    a, b = cifar.load_cifar10(tmp_path / "bin"), cifar.load_cifar10(tmp_path / "py")
    for k in ("train_x", "train_y", "test_x", "test_y", "class_names"):
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("size", [0, 3072, 3073 * 2 + 1])
def test_binary_wrong_size(tmp_path, size):
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(size))
    with pytest.raises(DataError, match="not a positive multiple of the 3073-byte"):
        cifar.load_binary_batch(tmp_path / "data_batch_1.bin")


def test_binary_label_out_of_range(tmp_path):
    rec = np.zeros((3, 3073), np.uint8)
    rec[1, 0] = 200
    (tmp_path / "data_batch_1.bin").write_bytes(rec.tobytes())
    with pytest.raises(DataError, match="label 200 at index 1 is out of range"):
        cifar.load_binary_batch(tmp_path / "data_batch_1.bin")


def test_bad_text_meta(tmp_path):
    write_binary_set(tmp_path)
    (tmp_path / "batches.meta.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="expected 10 class names, found 2"):
        cifar.load_cifar10(tmp_path)


def test_not_cifar(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 batches found"):
        cifar.load_cifar10(tmp_path)
    with pytest.raises(DataError, match="no such image folder"):
        load_dataset("cifar10", tmp_path / "nothing")


# --- the official archives, read without extracting ----------------------------------------------------------

@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_official_archive(tmp_path, fmt):
    sub = "cifar-10-batches-py" if fmt == "python" else "cifar-10-batches-bin"
    written = (write_python_set if fmt == "python" else write_binary_set)(tmp_path / "x" / sub)
    (tmp_path / "x" / sub / "readme.html").write_text("<html></html>")
    archive = tmp_path / f"cifar-10-{fmt}.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "x" / sub, arcname=sub)
    assert cifar.tar_format(archive) == fmt
    d = load_dataset("cifar10", archive)
    ref = load_dataset("cifar10", tmp_path / "x")
    assert d.source == str(archive) and d.class_names == ref.class_names
    np.testing.assert_array_equal(d.train_x, ref.train_x)
    np.testing.assert_array_equal(d.test_y, written["test_batch"][1])


def test_archive_with_bad_batch(tmp_path):
    write_python_set(tmp_path / "x")
    (tmp_path / "x" / "data_batch_3").write_bytes(pickle.dumps(EvilSystem(str(tmp_path / "pwned"))))
    archive = tmp_path / "c.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(tmp_path / "x", arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match=r"c.tar:data_batch_3: not a plain-data pickle"):
        load_dataset("cifar10", archive)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "x" / "data_batch_3").unlink()
    with tarfile.open(archive, "w") as tf:
        tf.add(tmp_path / "x", arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match="missing CIFAR-10 python batches: data_batch_3"):
        load_dataset("cifar10", archive)


def test_search_and_describe(tmp_path, monkeypatch):
    from hetnet.data import datasets, describe_data_locations, idx
    for name in idx.SOURCES:
        monkeypatch.setitem(idx.SOURCES[name], "system_dirs", ())
    monkeypatch.setenv("HETNET_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "_shared_cifar_jpg", lambda: tmp_path / "absent.tar.gz")
    with pytest.raises(DataError, match="cifar10: data not found .*cifar-10-python.tar.gz"):
        load_dataset("cifar10")
    assert describe_data_locations() == [("fashion-mnist", None), ("mnist", None), ("cifar10", None)]
    write_binary_set(tmp_path / "cache" / "cifar10" / "cifar-10-batches-bin")
    d = load_dataset("cifar10")
    assert d.source == str(tmp_path / "cache" / "cifar10" / "cifar-10-batches-bin") and len(d.train_x) == 5 * N
    assert dict(describe_data_locations())["cifar10"] == str(tmp_path / "cache" / "cifar10")


def test_unknown_dataset():
    from hetnet.errors import UsageError
    with pytest.raises(UsageError, match="--dataset 'imagenet'"):
        load_dataset("imagenet")
