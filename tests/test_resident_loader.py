"""Batches assembled from a plan (hetnet.data.ResidentLoader, the device-resident path) against the host loader.

BatchLoader.plan draws the same random numbers as BatchLoader.batch, and the cpu backend's gather_images (the NumPy twin
of the GPU kernel in backends/cuda/data.cu) must then give *identical* arrays: same examples, same crops and flips,
same float32 bits. tests/test_cuda.py runs the same comparison on the GPU kernel.
"""
from __future__ import annotations

import numpy as np
import pytest

import hetnet as hn
from hetnet import train as T
from hetnet.backends import cpu, reference
from hetnet.data import BatchLoader, ResidentLoader, channel_stats, on_device

AUGMENTS = ["", "flip", "crop:2", "crop,flip", "flip,crop:3", "crop:0,flip", "crop:1"]


def _images(rng, n=45, c=3, h=5, w=7):
    x = rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)
    return x, rng.integers(0, 4, size=n)


@pytest.mark.parametrize("augment", AUGMENTS)
@pytest.mark.parametrize("shuffle,drop_last", [(True, False), (True, True), (False, False)])
def test_plan_batches_equal_host_batches(rng, augment, shuffle, drop_last):
    x, y = _images(rng)
    mean, std = channel_stats(x)
    host = BatchLoader(x, y, 8, mean, std, shuffle=shuffle, augment=augment, seed=7, drop_last=drop_last,
                       prefetch=0)
    dev = ResidentLoader(host, cpu)
    assert len(dev) == len(host) and dev.num_examples == host.num_examples
    for epoch in (0, 3):
        got = list(dev.epoch(epoch))
        want = list(host.epoch(epoch))
        assert len(got) == len(want) == len(host)
        for (gx, gy), (wx, wy) in zip(got, want):
            assert gx.dtype == np.float32 and gx.shape == wx.shape
            np.testing.assert_array_equal(gx, wx)
            np.testing.assert_array_equal(gy, wy)


def test_plan_covers_every_example_once_and_changes_with_the_epoch(rng):
    x, y = _images(rng, n=40)
    host = BatchLoader(x, y, 16, augment="crop:2,flip", seed=1)
    p0, p1 = host.plan(0), host.plan(1)
    assert p0.dtype == np.int32 and p0.shape == (4, 40)
    assert sorted(p0[0]) == list(range(40))
    assert not np.array_equal(p0, p1)
    assert np.array_equal(p0, host.plan(0))                # a function of (seed, epoch) only
    assert set(np.unique(p0[3])) <= {0, 1} and np.abs(p0[1:3]).max() <= 2
    assert p0[3].any() and (p0[1] != 0).any()


def test_start_batch_and_mean_none(rng):
    x, y = _images(rng, c=1, h=6, w=6)
    host = BatchLoader(x, y, 10, None, None, augment="flip", seed=2, prefetch=0)
    got = list(ResidentLoader(host, cpu).epoch(2, start=3))
    want = list(host.epoch(2, start=3))
    assert len(got) == len(want) == len(host) - 3
    for (gx, gy), (wx, wy) in zip(got, want):
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)


def test_reference_backend_gets_the_host_batch_widened(rng):
    x, y = _images(rng)
    host = BatchLoader(x, y, 8, *channel_stats(x), augment="crop,flip", seed=3, prefetch=0)
    for (gx, gy), (wx, wy) in zip(ResidentLoader(host, reference).epoch(1), host.epoch(1)):
        assert gx.dtype == np.float64
        np.testing.assert_array_equal(gx, reference.asarray(wx))
        np.testing.assert_array_equal(gy, wy)


def test_augmentation_that_does_not_fit_a_plan_stays_on_the_host(rng):
    x, y = _images(rng)
    host = BatchLoader(x, y, 8, augment="crop:1,crop:2")
    assert not host.plannable
    with pytest.raises(ValueError, match="at most one crop and one flip"):
        ResidentLoader(host, cpu)

    class Resident:                                       # a backend that keeps data on its device
        resident_data = True
        upload, labels, gather_images = cpu.upload, cpu.labels, cpu.gather_images

    assert on_device(host, Resident) is host
    ok = BatchLoader(x, y, 8, augment="flip,crop:2")
    assert isinstance(on_device(ok, Resident), ResidentLoader)
    assert on_device(ok, cpu) is ok                        # the cpu backend keeps its host loader


def test_training_from_a_resident_loader_gives_the_same_weights(rng):
    x, y = _images(rng, n=48, c=1, h=8, w=8)
    mean, std = channel_stats(x)
    weights = []
    for resident in (False, True):
        hn.seed(0)
        model = hn.Sequential([hn.Conv2D(1, 4, 3, padding=1), hn.ReLU(), hn.MaxPool2D(2), hn.Flatten(),
                               hn.Dense(64, 4)]).to("cpu")
        opt = T.make_optimizer("momentum", model.parameters(), 0.05)
        host = BatchLoader(x, y, 16, mean, std, augment="crop:1,flip", seed=4)
        loader = ResidentLoader(host, cpu) if resident else host
        history = T.Trainer(model, opt, progress=False, log=None).fit(loader, 2, val_loader=loader)
        weights.append((model.state_dict(), history))
    (w0, h0), (w1, h1) = weights
    for k in w0:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    assert [r["train_loss"] for r in h0] == [r["train_loss"] for r in h1]
    assert [r["val_accuracy"] for r in h0] == [r["val_accuracy"] for r in h1]
