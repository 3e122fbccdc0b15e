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
from hetnet.data import BatchLoader, ResidentLoader, channel_stats, normalize, on_device

AUGMENTS = ["", "flip", "crop:2", "crop,flip", "flip,crop:3", "crop:0,flip", "crop:1",
            # reflect padding (translate, also wider than the 5x7 images) and airbench's alternating flips; flips
            # compose (xor) before and after the one crop or translate
            "translate:2", "translate:2,altflip", "altflip,translate:1", "translate:6,flip", "altflip",
            "flip,altflip,crop:2,flip", "altflip,translate:0"]


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
    for augment in ("crop:1,crop:2", "translate:1,crop:1"):
        host = BatchLoader(x, y, 8, augment=augment)
        assert not host.plannable
        with pytest.raises(ValueError, match="at most one crop or translate"):
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


@pytest.mark.parametrize("reflect", [False, True])
def test_gather_images_pads_as_numpy(rng, reflect):
    """Each plan column against np.pad (zeros, or 'reflect') of its image, cropped at (oy, ox), then mirrored."""
    x, y = _images(rng, n=6, c=2, h=4, w=5)
    pad = 7                                              # wider than the image: reflections of reflections
    cols = [(0, 0, 0, 0), (1, -2, 3, 1), (2, 4, -4, 0), (3, -7, 7, 1), (4, 7, -7, 1), (5, 1, 1, 0)]
    plan = np.array(cols, dtype=np.int32).T.copy()
    scale, shift = np.ones(2, np.float32), np.zeros(2, np.float32)
    got, labels = cpu.gather_images(x, y, plan, 0, len(cols), scale, shift, reflect=reflect)
    np.testing.assert_array_equal(labels, y[plan[0]])
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect" if reflect else "constant")
    for k, (i, oy, ox, flip) in enumerate(cols):
        want = padded[i, :, pad + oy:pad + oy + 4, pad + ox:pad + ox + 5]
        np.testing.assert_array_equal(got[k], want[:, :, ::-1] if flip else want)
    ref, _ = reference.gather_images(x, y, plan, 2, 3, scale, shift, reflect=reflect)
    np.testing.assert_array_equal(ref, got[2:5])


def test_altflip_alternates_per_image_and_translate_reflects(rng):
    x, y = _images(rng, n=40, c=1, h=6, w=6)
    host = BatchLoader(x, y, 40, None, None, shuffle=False, augment="altflip", seed=5, prefetch=0)
    f0, f1, f2 = (host.plan(e)[3].astype(bool) for e in (0, 1, 2))
    assert 5 < f0.sum() < 35                          # a fair coin per image ...
    np.testing.assert_array_equal(f1, ~f0)            # ... mirrored the other way in the next epoch
    np.testing.assert_array_equal(f2, f0)
    (b0, _), (b1, _) = next(host.epoch(0)), next(host.epoch(1))
    np.testing.assert_array_equal(b0[f0], normalize(np.ascontiguousarray(x[f0, :, :, ::-1]), None, None))
    np.testing.assert_array_equal(b1[f0], normalize(x[f0], None, None))
    # translate: the same offsets as crop (the same draws), the border mirrored from inside instead of zeros
    t = BatchLoader(x, y, 40, None, None, shuffle=False, augment="translate:2", seed=5, prefetch=0).plan(0)
    c = BatchLoader(x, y, 40, None, None, shuffle=False, augment="crop:2", seed=5, prefetch=0).plan(0)
    np.testing.assert_array_equal(t, c)
    assert set(np.unique(t[1])) == set(range(-2, 3))
