"""BatchLoader (determinism, background thread), transforms, and the stratified train/validation split."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import assert_close
from PIL import Image

from hetnet.data import BatchLoader, channel_stats, convert_channels, normalize, resize_batch, split_train_val
from hetnet.data import loader as loader_mod
from hetnet.data.transforms import parse_augment, random_crop, random_hflip, random_translate
from hetnet.errors import UsageError


def images(n=50, c=3, h=6, w=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, c, h, w), dtype=np.uint8), rng.integers(0, 4, n).astype(np.int64)


def collect(loader, epoch):
    return [(xb.copy(), yb.copy()) for xb, yb in loader.epoch(epoch)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x1, x2) and np.array_equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b, strict=True))


# --- loader -------------------------------------------------------------------------------------------------

def test_batches_shape_dtype_layout():
    x, y = images(n=23)
    mean, std = channel_stats(x)
    loader = BatchLoader(x, y, 5, mean, std, seed=1)
    batches = collect(loader, 0)
    assert len(loader) == len(batches) == 5 and [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    for xb, yb in batches:
        assert xb.dtype == np.float32 and xb.flags.c_contiguous and xb.shape[1:] == (3, 6, 5)
        assert yb.dtype == np.int64
    dl = BatchLoader(x, y, 5, mean, std, drop_last=True)
    assert len(dl) == 4 and dl.num_examples == 20 and sum(len(b[1]) for b in collect(dl, 0)) == 20


def test_every_example_once_and_normalised():
    x, y = images(n=37)
    mean, std = channel_stats(x)
    loader = BatchLoader(x, y, 8, mean, std, seed=3)
    xs = np.concatenate([b[0] for b in collect(loader, 2)])
    order = np.concatenate([np.sort(loader.order(2)[i:i + 8]) for i in range(0, 37, 8)])
    assert sorted(order.tolist()) == list(range(37))
    expected = (x[order] / 255.0 - mean[None, :, None, None].astype(np.float64)) / std[None, :, None, None]
    assert_close(xs, expected, np.float32, "normalised batch")
    ys = np.concatenate([b[1] for b in collect(loader, 2)])
    np.testing.assert_array_equal(ys, y[order])


def test_no_shuffle_keeps_order():
    x, y = images(n=10)
    batches = collect(BatchLoader(x, y, 4, shuffle=False), 5)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    assert_close(np.concatenate([b[0] for b in batches]), x / 255.0, np.float32, "unnormalised")


@pytest.mark.parametrize("augment", [(), ("crop", "flip")])
def test_deterministic_per_seed_and_epoch(augment):
    x, y = images()
    mean, std = channel_stats(x)

    def make(seed=0, prefetch=3):
        return BatchLoader(x, y, 7, mean, std, augment=augment, seed=seed, prefetch=prefetch)
    a = make()
    run = [collect(a, e) for e in range(3)]
    # a fresh loader (a resumed run) serves epoch 2 exactly as the uninterrupted one did
    assert same(collect(make(), 2), run[2])
    assert same(collect(a, 0), run[0])
    assert same(collect(make(prefetch=0), 1), run[1])                 # thread or no thread
    assert not same(run[0], run[1]) and not same(run[1], run[2])      # shuffled differently every epoch
    assert not same(collect(make(seed=1), 0), run[0])


def test_start_mid_epoch():
    x, y = images()
    loader = BatchLoader(x, y, 7, augment=("crop:2", "flip"), seed=4)
    assert same(collect(loader, 3)[4:], [(a.copy(), b.copy()) for a, b in loader.epoch(3, start=4)])


def _loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("hetnet-loader")]


def test_early_stop_joins_thread():
    x, y = images(n=200)
    loader = BatchLoader(x, y, 2, prefetch=2)
    it = loader.epoch(0)
    next(it)
    assert len(_loader_threads()) == 1
    it.close()
    assert _loader_threads() == []
    for _ in loader.epoch(1):
        break
    assert _loader_threads() == []


def test_worker_error_reaches_consumer(monkeypatch):
    x, y = images(n=20)
    loader = BatchLoader(x, y, 4)
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in worker")
        return np.zeros((4, 3, 6, 5), np.float32)
    monkeypatch.setattr(loader_mod, "normalize", failing)
    got = []
    with pytest.raises(RuntimeError, match="boom in worker"):
        got.extend(loader.epoch(0))
    assert len(got) == 2 and _loader_threads() == []


def test_bad_arguments():
    x, y = images(n=4)
    with pytest.raises(ValueError):
        BatchLoader(x.astype(np.float32), y, 2)
    with pytest.raises(ValueError):
        BatchLoader(x, y[:3], 2)
    with pytest.raises(ValueError):
        BatchLoader(x, y, 0)
    with pytest.raises(ValueError, match="unknown augmentation"):
        BatchLoader(x, y, 2, augment=("rotate",))
    assert parse_augment("crop:3,flip") == [("crop", 3), ("flip", 0)]
    assert parse_augment(["crop"]) == [("crop", 4)]
    assert parse_augment("translate,altflip") == [("translate", 2), ("altflip", 0)]
    for bad, match in (("translate:-1", ">= 0"), ("crop:x", "integer"), ("altflip:2", "no argument")):
        with pytest.raises(ValueError, match=match):
            parse_augment(bad)


# --- transforms ---------------------------------------------------------------------------------------------

def test_channel_stats():
    x, _ = images(n=30, c=3)
    mean, std = channel_stats(x, chunk=7)
    f = x.astype(np.float64) / 255
    assert_close(mean, f.mean(axis=(0, 2, 3)), np.float32, "mean")
    assert_close(std, f.std(axis=(0, 2, 3)), np.float32, "std")
    assert mean.dtype == std.dtype == np.float32
    _, s = channel_stats(np.full((2, 1, 3, 3), 7, np.uint8))
    assert s[0] == 1.0                                               # constant channel: no division by zero
    # an image larger than a uint32 sum of its squared pixels holds (H*W > 66,051): the sums stay exact
    big = np.full((2, 1, 300, 300), 255, np.uint8)
    big[1] = 0
    mean, std = channel_stats(big)
    assert mean[0] == np.float32(0.5) and std[0] == np.float32(0.5)


def test_normalize():
    x, _ = images(n=4, c=3)
    mean, std = np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.3, 0.4])
    expected = (x / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    assert_close(normalize(x, mean, std), expected, np.float32, "normalize")


def test_resize_matches_pillow():
    x, _ = images(n=3, c=3, h=9, w=13)
    r = resize_batch(x, (20, 7))
    assert r.shape == (3, 3, 20, 7)
    ref = np.asarray(Image.fromarray(x[1].transpose(1, 2, 0)).resize((7, 20), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(r[1], ref)
    g = resize_batch(x[:, :1], (4, 4))
    np.testing.assert_array_equal(g[2, 0], np.asarray(Image.fromarray(x[2, 0]).resize((4, 4), Image.BILINEAR)))
    assert resize_batch(x, (9, 13)) is x


def test_convert_channels_matches_pillow():
    x, _ = images(n=2, c=3)
    grey = convert_channels(x, 1)
    np.testing.assert_array_equal(grey[1, 0], np.asarray(Image.fromarray(x[1].transpose(1, 2, 0)).convert("L")))
    rgb = convert_channels(grey, 3)
    assert rgb.shape == (2, 3, 6, 5) and all(np.array_equal(rgb[:, k], grey[:, 0]) for k in range(3))


def test_random_crop_and_flip():
    x, _ = images(n=40, c=2, h=5, w=5)
    rng = np.random.default_rng(0)
    c = random_crop(x, 2, rng)
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(len(x)):                  # each output is one of the 25 windows of its padded image
        assert any(np.array_equal(c[i], padded[i, :, a:a + 5, b:b + 5]) for a in range(5) for b in range(5))
    assert not np.array_equal(c, x)
    f = random_hflip(x, rng)
    flipped = [np.array_equal(f[i], x[i, :, :, ::-1]) for i in range(len(x))]
    kept = [np.array_equal(f[i], x[i]) for i in range(len(x))]
    assert all(a or b for a, b in zip(flipped, kept, strict=True)) and 5 < sum(flipped) < 35
    assert random_crop(x, 0, rng) is x


def test_random_translate_reflects():
    x, _ = images(n=40, c=2, h=5, w=5)
    t = random_translate(x, 2, np.random.default_rng(0))
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    for i in range(len(x)):                  # each output is one of the 25 windows of its reflect-padded image
        assert any(np.array_equal(t[i], padded[i, :, a:a + 5, b:b + 5]) for a in range(5) for b in range(5))
    assert not np.array_equal(t, x)
    # the same draws as random_crop: the same windows of the zero-padded image
    c = random_crop(x, 2, np.random.default_rng(0))
    inside = c != 0
    np.testing.assert_array_equal(t[inside], c[inside])


# --- split --------------------------------------------------------------------------------------------------

def test_split_stratified_deterministic_disjoint():
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    rng.shuffle(y)
    x = np.zeros((len(y), 1, 1, 1), np.uint8)
    ids = np.arange(len(y))
    tx, ty, vx, vy = split_train_val(ids, y, 0.2, seed=3)
    assert np.bincount(vy).tolist() == [20, 10, 6, 4]
    assert sorted(np.concatenate([tx, vx]).tolist()) == list(range(len(y)))          # disjoint and complete
    np.testing.assert_array_equal(y[tx], ty)
    np.testing.assert_array_equal(y[vx], vy)
    again = split_train_val(ids, y, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (tx, ty, vx, vy), strict=True))
    other = split_train_val(ids, y, 0.2, seed=4)
    assert not np.array_equal(np.sort(other[2]), np.sort(vx))
    assert len(np.unique(ty[:40])) > 1                # training order is mixed, so --limit N sees every class
    tx4, _, vx4, _ = split_train_val(x, y, 0.2, seed=3)
    assert tx4.shape == (160, 1, 1, 1) and vx4.shape == (40, 1, 1, 1)


def test_split_edge_cases():
    y = np.array([0, 0, 1, 1])
    tx, _, vx, _ = split_train_val(np.arange(4), y, 0.0, seed=0)
    assert len(tx) == 4 and len(vx) == 0
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(UsageError):
            split_train_val(np.arange(4), y, bad)
