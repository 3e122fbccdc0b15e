"""IDX reader/writer, the MNIST-style loaders, search path and checked downloads (no network: fetch is injected)."""
from __future__ import annotations

import gzip
import hashlib
import struct
import threading
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from hetnet.data import idx, load_dataset
from hetnet.errors import DataError


def write_set(folder: Path, n_train=12, n_test=5, hw=(7, 5), gz=True, seed=0) -> dict:
    """A tiny MNIST-style set in `folder` (gzip or raw); returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        img, lab = idx.IDX_FILES[split]
        suffix = ".gz" if gz else ""
        idx.write_idx(folder / (img + suffix), x)
        idx.write_idx(folder / (lab + suffix), y)
        arrays[split] = (x, y)
    return arrays


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No system folders, cache under tmp_path, and a network that fails loudly if touched."""
    for name in idx.SOURCES:
        monkeypatch.setitem(idx.SOURCES[name], "system_dirs", ())
    monkeypatch.setenv("HETNET_DATA", str(tmp_path / "cache"))

    def no_network(*a, **k):
        raise AssertionError("the network was touched")
    monkeypatch.setattr(idx.urllib.request, "urlopen", no_network)
    return tmp_path / "cache"


# --- the file format ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a-idx", "a-idx.gz"])
def test_roundtrip(tmp_path, dtype, name):
    a = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    idx.write_idx(tmp_path / name, a)
    b = idx.read_idx(tmp_path / name)
    assert b.dtype == np.dtype(dtype) and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_big_endian_on_disk(tmp_path):
    idx.write_idx(tmp_path / "f", np.array([1, 256], dtype=np.int32))
    assert (tmp_path / "f").read_bytes() == bytes([0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1, 0])


def test_gzip_detected_by_content(tmp_path):
    idx.write_idx(tmp_path / "x.gz", np.arange(6, dtype=np.uint8))
    (tmp_path / "x.gz").rename(tmp_path / "x-no-suffix")
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "x-no-suffix"), np.arange(6))


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("data, words", [
    (b"", "not an IDX file"),
    (b"\x00\x00", "not an IDX file"),
    (b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad IDX magic"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "bad IDX magic"),
    (b"\x00\x00\x08\x00", "bad IDX magic"),
    (b"PK\x03\x04whatever", "bad IDX magic"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
    (b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + bytes(5), "truncated"),
    (b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + bytes(7), "trailing"),
    (b"\x00\x00\x0C\x01" + struct.pack(">I", 2) + bytes(7), "truncated"),
])
def test_bad_files(tmp_path, data, words):
    p = _raw(tmp_path / "bad-idx", data)
    with pytest.raises(DataError, match=words) as e:
        idx.read_idx(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 1000) + bytes(1000))
    p = _raw(tmp_path / "cut.gz", good[: len(good) // 2])             # truncated stream
    with pytest.raises(DataError, match="corrupt gzip") as e:
        idx.read_idx(p)
    assert str(p) in str(e.value)
    garbled = bytearray(good)
    garbled[12:20] = b"\xff" * 8                                      # damaged deflate data / bad CRC
    with pytest.raises(DataError, match="corrupt gzip"):
        idx.read_idx(_raw(tmp_path / "garbled.gz", bytes(garbled)))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        idx.read_idx(tmp_path / "nope")


# --- image/label pairs --------------------------------------------------------------------------------------

def test_pair(tmp_path):
    arrays = write_set(tmp_path)
    x, y = idx.load_idx_pair(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz")
    assert x.shape == (12, 1, 7, 5) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0], arrays["train"][0])
    np.testing.assert_array_equal(y, arrays["train"][1])


def test_pair_count_mismatch(tmp_path):
    idx.write_idx(tmp_path / "i", np.zeros((4, 2, 2), np.uint8))
    idx.write_idx(tmp_path / "l", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="4 images but .* 3 labels"):
        idx.load_idx_pair(tmp_path / "i", tmp_path / "l")


def test_pair_label_out_of_range(tmp_path):
    idx.write_idx(tmp_path / "i", np.zeros((4, 2, 2), np.uint8))
    idx.write_idx(tmp_path / "l", np.array([0, 9, 10, 1], np.uint8))
    with pytest.raises(DataError, match=r"label 10 at index 2 is out of range: expected 0\.\.9"):
        idx.load_idx_pair(tmp_path / "i", tmp_path / "l")


def test_pair_wrong_kinds(tmp_path):
    idx.write_idx(tmp_path / "i2", np.zeros((4, 4), np.uint8))
    idx.write_idx(tmp_path / "i", np.zeros((4, 2, 2), np.uint8))
    idx.write_idx(tmp_path / "lf", np.zeros(4, np.float32))
    idx.write_idx(tmp_path / "l", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="3 dimensions"):
        idx.load_idx_pair(tmp_path / "i2", tmp_path / "l")
    with pytest.raises(DataError, match="unsigned-byte labels"):
        idx.load_idx_pair(tmp_path / "i", tmp_path / "lf")


# --- finding, downloading, load_dataset ---------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_load_dataset_from_path(tmp_path, gz):
    arrays = write_set(tmp_path / "d", gz=gz)
    d = load_dataset("fashion-mnist", tmp_path / "d")
    assert d.train_x.shape == (12, 1, 7, 5) and d.test_x.shape == (5, 1, 7, 5)
    assert d.class_names[0] == "T-shirt/top" and len(d.class_names) == 10 and d.skipped == 0
    np.testing.assert_array_equal(d.test_y, arrays["test"][1])
    d = load_dataset("mnist", tmp_path / "d", input_shape=(3, 8, 6))
    assert d.train_x.shape == (12, 3, 8, 6) and d.class_names == [str(i) for i in range(10)]
    assert np.array_equal(d.train_x[:, 0], d.train_x[:, 2])


def test_path_missing_files(tmp_path):
    write_set(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", tmp_path / "d")
    with pytest.raises(DataError, match="not a folder"):
        load_dataset("mnist", tmp_path / "nothing-here")


def test_found_in_cache(isolated):
    write_set(isolated / "mnist")
    d = load_dataset("mnist")
    assert d.source == str(isolated / "mnist") and len(d.train_x) == 12


def test_offline_message(isolated):
    def offline(url, timeout):
        assert timeout <= 10
        raise urllib.error.URLError("no route to host")
    with pytest.raises(DataError) as e:
        idx.load("fashion-mnist", fetch=offline)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and str(isolated / "fashion-mnist") in msg
    assert "train-images-idx3-ubyte.gz" in msg and "no route to host" in msg and "\n" not in msg
    with pytest.raises(DataError, match="download disabled"):
        load_dataset("fashion-mnist", download=False)


def test_offline_default_fetch_gives_up_fast(isolated, monkeypatch):
    calls = []

    def urlopen(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(idx.urllib.request, "urlopen", urlopen)
    t = time.perf_counter()
    with pytest.raises(DataError, match="where|put"):
        load_dataset("mnist")
    assert time.perf_counter() - t < 2
    # one attempt per mirror for the first file, then it gives up; every attempt has a short timeout
    assert len(calls) == len(idx.SOURCES["mnist"]["mirrors"])
    assert all(0 < to <= 10 for _, to in calls)


def test_stalled_name_lookup_is_abandoned(monkeypatch):
    release = threading.Event()

    def stalls(url, timeout=None):
        release.wait(10)                          # like a DNS lookup that ignores the socket timeout
        raise urllib.error.URLError("late")
    monkeypatch.setattr(idx.urllib.request, "urlopen", stalls)
    t = time.perf_counter()
    try:
        with pytest.raises(TimeoutError):
            idx.urllib_fetch("http://example.invalid/x", 0.2)
        assert time.perf_counter() - t < 2
    finally:
        release.set()


def _fake_upstream(monkeypatch, tmp_path, dataset):
    """Serve a tiny set from memory with its checksums registered as the expected ones."""
    src = write_set(tmp_path / "upstream")
    files = {p.name: p.read_bytes() for p in (tmp_path / "upstream").iterdir()}
    monkeypatch.setitem(idx.SOURCES[dataset], "sha256",
                        {n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    return src, files


def test_download_checked_and_atomic(isolated, monkeypatch, tmp_path):
    arrays, files = _fake_upstream(monkeypatch, tmp_path, "fashion-mnist")
    mirrors = idx.SOURCES["fashion-mnist"]["mirrors"]
    fetched = []

    def fetch(url, timeout):
        fetched.append(url)
        name = url.rsplit("/", 1)[1]
        if url.startswith(mirrors[0]):
            return files[name][:-3] + b"bad"          # first mirror serves a corrupted copy: checksum rejects it
        return files[name]
    _, ty, _, vy, src = idx.load("fashion-mnist", fetch=fetch)
    assert src == isolated / "fashion-mnist"
    np.testing.assert_array_equal(ty, arrays["train"][1])
    np.testing.assert_array_equal(vy, arrays["test"][1])
    assert sorted(p.name for p in src.iterdir()) == sorted(files)         # no partial files left behind
    for name, data in files.items():
        assert (src / name).read_bytes() == data
    assert len(fetched) == 8
    # second call: found in the cache, nothing fetched
    fetched.clear()
    idx.load("fashion-mnist", fetch=fetch)
    assert fetched == []


def test_download_bad_checksum_everywhere(isolated, monkeypatch, tmp_path):
    _fake_upstream(monkeypatch, tmp_path, "mnist")
    with pytest.raises(DataError, match="SHA-256"):
        idx.load("mnist", fetch=lambda url, timeout: b"not the file")
    assert not any((isolated / "mnist").iterdir())                       # nothing written


def test_checksums_are_sha256_hex():
    for src in idx.SOURCES.values():
        assert sorted(src["sha256"]) == sorted(s + ".gz" for pair in idx.IDX_FILES.values() for s in pair)
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in src["sha256"].values())


REAL = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    tx, ty, vx, vy, _ = idx.load("fashion-mnist", REAL)
    assert tx.shape == (60000, 1, 28, 28) and vx.shape == (10000, 1, 28, 28)
    assert np.array_equal(np.bincount(ty), [6000] * 10) and np.array_equal(np.bincount(vy), [1000] * 10)
