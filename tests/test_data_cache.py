"""The cache of decoded image folders (hetnet.data.cache): a miss decodes and writes, a hit reads without decoding,
a changed source or another decoding misses, a damaged file is decoded again with a note, --no-cache leaves it
alone; and the decoding on worker processes gives what one thread gives."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
from test_data_folder import classes_tree, image_bytes, make_tar, make_tree

from hetnet.cli import main
from hetnet.data import cache, folder, load_dataset
from hetnet.errors import DataError


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("HETNET_CACHE_DIR", str(d))
    return d


def _no_decoding(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("decoded although the cache holds the images")
    monkeypatch.setattr(folder, "read_image_folder", fail)


def _same(a, b):
    for k in ("train_x", "train_y", "test_x", "test_y"):
        va, vb = getattr(a, k), getattr(b, k)
        assert (va is None) == (vb is None), k
        if va is not None:
            assert va.dtype == vb.dtype
            np.testing.assert_array_equal(va, vb, err_msg=k)
    assert a.class_names == b.class_names


@pytest.mark.parametrize("layout", ["folder", "tar.gz"])
def test_miss_writes_hit_reads(tmp_path, cache_home, monkeypatch, layout):
    files = {**classes_tree(prefix="train/"), **classes_tree(n_per_class=1, prefix="test/")}
    src = make_tree(tmp_path / "d", files) if layout == "folder" else make_tar(tmp_path / "d.tar.gz", files, "w:gz")
    first = load_dataset("folder", src, input_shape=(3, 8, 8))
    path = cache.cache_path(src, (3, 8, 8))
    assert path.is_file() and path.parent == cache_home / "decoded"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    fresh = folder.load_image_folder(src, (3, 8, 8))
    _no_decoding(monkeypatch)
    again = load_dataset("folder", src, input_shape=(3, 8, 8))
    _same(again, first)
    _same(again, fresh)
    assert again.source == first.source and again.adapted.note() == first.adapted.note()
    with pytest.raises(AssertionError, match="decoded although"):           # another decoding: another entry
        load_dataset("folder", src, input_shape=(1, 8, 8))


def test_a_changed_source_is_decoded_again(tmp_path, cache_home):
    files = classes_tree()
    root = make_tree(tmp_path / "d", files)
    a = load_dataset("folder", root, input_shape=(3, 5, 6))
    (root / "cat" / "000.png").write_bytes(image_bytes("PNG", seed=99))        # same size: a new mtime
    os.utime(root / "cat" / "000.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    b = load_dataset("folder", root, input_shape=(3, 5, 6))
    assert not np.array_equal(a.train_x, b.train_x)
    _same(b, folder.load_image_folder(root, (3, 5, 6)))
    tar = make_tar(tmp_path / "t.tar", files, "w")
    x1 = load_dataset("folder", tar, input_shape=(3, 5, 6)).train_x
    make_tar(tmp_path / "t.tar", {**files, "emu/new.png": files["cat/000.png"]}, "w")
    assert len(load_dataset("folder", tar, input_shape=(3, 5, 6)).train_x) == len(x1) + 1
    assert len(list((cache_home / "decoded").iterdir())) == 2           # one entry per source and decoding


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "garbage"])
def test_a_damaged_cache_file_is_decoded_again_with_a_note(tmp_path, cache_home, capsys, damage):
    root = make_tree(tmp_path / "d", classes_tree())
    want = load_dataset("folder", root, input_shape=(3, 5, 6))
    path = cache.cache_path(root, (3, 5, 6))
    data = path.read_bytes()
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip a byte":
        data = data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]     # inside the arrays: only the checksum knows
    else:
        data = b"\x00" * 40
    path.write_bytes(data)
    capsys.readouterr()
    got = load_dataset("folder", root, input_shape=(3, 5, 6))
    err = capsys.readouterr().err
    _same(got, want)
    assert err.startswith("note: the cached decoding of") and "decoding again" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert path.read_bytes() != data                                        # rewritten
    capsys.readouterr()
    load_dataset("folder", root, input_shape=(3, 5, 6))
    assert capsys.readouterr().err == ""


def test_no_cache_neither_reads_nor_writes(tmp_path, cache_home, monkeypatch, capsys):
    root = make_tree(tmp_path / "d", classes_tree())
    load_dataset("folder", root, input_shape=(3, 5, 6), cache=False)
    assert not cache_home.exists()
    load_dataset("folder", root, input_shape=(3, 5, 6))
    path = cache.cache_path(root, (3, 5, 6))
    path.write_bytes(b"garbage")
    load_dataset("folder", root, input_shape=(3, 5, 6), cache=False)
    assert capsys.readouterr().err == "" and path.read_bytes() == b"garbage"
    out = tmp_path / "run"
    path = cache.cache_path(root, (3, 12, 12))               # thesis-m0's input
    path.write_bytes(b"garbage")
    assert main(["train", "--model", "thesis-m0", "--dataset", "folder", "--data", str(root), "--epochs", "1",
                 "--device", "cpu", "--no-cache", "--no-progress", "--val-fraction", "0.34", "--out", str(out)]) == 0
    assert path.read_bytes() == b"garbage"
    assert main(["evaluate", str(out), "--device", "cpu", "--no-cache"]) == 0
    assert path.read_bytes() == b"garbage" and "cached decoding" not in capsys.readouterr().err
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0            # with the cache: noticed, rewritten
    assert "cached decoding" in capsys.readouterr().err and path.read_bytes() != b"garbage"


def test_skipped_images_and_a_test_split_alone(tmp_path, cache_home, monkeypatch):
    root = make_tree(tmp_path / "d", {**classes_tree(), "dog/bad.png": b"not a png"})
    d = load_dataset("folder", root, input_shape=(3, 5, 6), skip_bad_images=True)
    assert d.skipped == 1
    assert load_dataset("folder", root, input_shape=(3, 5, 6), skip_bad_images=True).skipped == 1
    with pytest.raises(DataError, match="bad.png: not a readable image"):      # the cached copy skipped it: decode
        load_dataset("folder", root, input_shape=(3, 5, 6))
    test_only = make_tree(tmp_path / "t", classes_tree(prefix="test/"))
    with pytest.raises(DataError, match="no training images"):
        load_dataset("folder", test_only, input_shape=(3, 5, 6))
    _no_decoding(monkeypatch)
    d = load_dataset("folder", test_only, input_shape=(3, 5, 6), require_train=False)
    assert len(d.train_x) == 0 and len(d.test_x) == 9


def test_cache_dir_and_unwritable_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HETNET_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "hetnet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "hetnet"
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("HETNET_CACHE_DIR", str(blocker))
    root = make_tree(tmp_path / "d", classes_tree())
    d = load_dataset("folder", root, input_shape=(3, 5, 6))
    assert len(d.train_x) == 9
    err = capsys.readouterr().err
    assert err.startswith("note: cannot keep the decoded images") and len(err.strip().splitlines()) == 1


def test_worker_processes_decode_as_one_thread(tmp_path, monkeypatch):
    files = classes_tree(n_per_class=15, classes=("a", "b", "c", "d"))
    root = make_tree(tmp_path / "d", {**files, "b/bad.jpg": b"\xff\xd8 truncated"})
    monkeypatch.setattr(folder, "_CHUNK", 4)                 # 61 images: 16 chunks over the pool
    with pytest.raises(DataError, match="bad.jpg: not a readable image"):
        folder.load_image_folder(root, (3, 5, 6))
    pooled = folder.load_image_folder(root, (3, 5, 6), skip_bad_images=True)
    monkeypatch.setattr(folder, "_CHUNK", 1000)              # one chunk, decoded in this thread
    single = folder.load_image_folder(root, (3, 5, 6), skip_bad_images=True)
    _same(pooled, single)
    assert pooled.skipped == single.skipped == 1 and len(pooled.train_x) == 60
