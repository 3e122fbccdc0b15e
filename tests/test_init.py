"""hetnet.init's identity (Dirac) and whitening initialisations: torch's definitions where torch is installed, the
defining properties always (the identity passes the input through; whitened patches have identity covariance up
to eps), the Conv2D(init=...) options, and `hetnet train` whitening a spec's first layer from its training set."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_close

import hetnet as hn
from hetnet import init, zoo
from hetnet.backends import reference as ref
from hetnet.errors import ModelFileError

# --- dirac_ ------------------------------------------------------------------------------------------------------

DIRAC_SHAPES = [((4, 2, 3, 3), 1), ((2, 3, 3, 3), 1), ((6, 2, 2, 2), 1), ((4, 2, 5), 1), ((2, 2, 3, 3, 3), 1),
                ((4, 2, 3, 3), 2), ((6, 3, 1, 1), 3)]


@pytest.mark.parametrize("shape,groups", DIRAC_SHAPES, ids=str)
def test_dirac_is_torchs(shape, groups):
    torch = pytest.importorskip("torch")
    w = init.dirac_(np.full(shape, 7.0), groups)
    t = torch.full(shape, 7.0, dtype=torch.float64)
    torch.nn.init.dirac_(t, groups)
    np.testing.assert_array_equal(w, t.numpy())


@pytest.mark.parametrize("shape,groups", DIRAC_SHAPES, ids=str)
def test_dirac_by_definition(shape, groups):
    w = init.dirac_(np.full(shape, 7.0), groups)
    per, c = shape[0] // groups, shape[1]
    ones = {(g * per + i, i) + tuple(s // 2 for s in shape[2:]) for g in range(groups) for i in range(min(per, c))}
    assert {tuple(int(v) for v in ix) for ix in np.argwhere(w != 0)} == ones and np.all(w[w != 0] == 1)


def test_dirac_rejects_bad_shapes():
    with pytest.raises(ValueError, match="dimensional"):
        init.dirac_(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="groups"):
        init.dirac_(np.zeros((3, 2, 3, 3)), groups=2)


@pytest.mark.parametrize("k,c", [(5, 3), (3, 3), (2, 4)])
def test_conv_dirac_init_passes_the_input_through(rng, k, c):
    """Conv2D(init="dirac"): the first min(K, C) output channels are the input channels, unchanged (padding keeps
    the size); filters past C keep their random init; a Sequential does not re-initialise it before a ReLU."""
    model = hn.Sequential([hn.Conv2D(c, k, 3, padding=1, init="dirac"), hn.ReLU()]).to("reference")
    conv = model[0]
    x = rng.normal(size=(2, c, 5, 4))
    y = conv.forward(x)
    np.testing.assert_array_equal(y[:, :min(k, c)], x[:, :min(k, c)])
    w = conv.weight.data
    assert np.all(w[c:] != 0)                           # Glorot, not zeros
    assert conv.bias.data.tolist() == [0.0] * k and conv.weight.requires_grad
    assert "init='dirac'" in repr(conv)


def test_conv_init_option_is_checked():
    with pytest.raises(ValueError, match="init must be one of"):
        hn.Conv2D(3, 8, 3, init="orthogonal")
    with pytest.raises(ValueError, match="2 \\* in_channels"):
        hn.Conv2D(3, 8, 2, init="whitening")
    hn.seed(0)
    he = hn.Sequential([hn.Conv2D(3, 8, 3, init="glorot"), hn.ReLU()])[0].weight.data
    assert np.abs(he).max() <= np.sqrt(6 / (27 + 72)) + 1e-7     # explicit glorot kept before a ReLU


# --- whitening ----------------------------------------------------------------------------------------------------


def _smooth_images(rng, n, c, h, w):
    """uint8 images with correlated neighbouring pixels (a blurred noise field), like natural images."""
    z = rng.normal(size=(n, c, h + 2, w + 2))
    z = (z[:, :, :-2, :-2] + z[:, :, 1:-1, 1:-1] + z[:, :, 2:, 2:] + z[:, :, 1:-1, :-2]) / 2
    z = z + rng.normal(size=(n, 1, 1, 1)) * 0.3 + np.arange(c).reshape(1, c, 1, 1) * 0.2
    return np.clip(128 + 40 * z, 0, 255).astype(np.uint8)


def _patches_by_loops(x, k):
    """Every k x k patch (stride 1, no padding) as a row, (c, r, s) order, by plain loops."""
    n, _, h, w = x.shape
    return np.array([x[i, :, p:p + k, q:q + k].reshape(-1) for i in range(n) for p in range(h - k + 1)
                     for q in range(w - k + 1)])


@pytest.mark.parametrize("c,k", [(3, 2), (1, 3), (2, 2)])
def test_whitened_patches_have_identity_covariance(rng, c, k):
    """The defining property, checked through the reference convolution (not the patch code): the first half of
    the filters maps the patches to outputs whose second moments are diag(lambda / (lambda + eps)), the identity at
    eps = 0, with lambda the eigenvalues of the patch moment (taken here from plainly looped patches), in decreasing
    order; the second half is the first negated."""
    images = _smooth_images(rng, 12, c, 9, 8)
    mean, std = [0.45, 0.5, 0.4][:c], [0.2, 0.25, 0.22][:c]
    x = (images / 255.0 - np.array(mean).reshape(1, c, 1, 1)) / np.array(std).reshape(1, c, 1, 1)
    rows = _patches_by_loops(x, k)
    lam = np.linalg.eigvalsh(rows.T @ rows / len(rows))[::-1]
    m = c * k * k
    for eps in (0.0, 5e-4, 0.5):
        w = init.whitening_weights(images, k, eps, mean, std)
        assert w.shape == (2 * m, c, k, k) and w.dtype == np.float64
        np.testing.assert_array_equal(w[m:], -w[:m])
        y, _ = ref.conv2d_forward(x, w[:m], None, 1, 0)                # [N, m, P, Q]
        flat = y.transpose(1, 0, 2, 3).reshape(m, -1)
        moment = flat @ flat.T / flat.shape[1]
        np.testing.assert_allclose(moment, np.diag(lam / (lam + eps)), atol=1e-9, err_msg=f"eps {eps}")
    assert np.all(np.diff(lam) <= 0)


def test_whitening_float_images_and_uint8_agree(rng):
    images = _smooth_images(rng, 6, 3, 7, 7)
    mean, std = [0.45, 0.5, 0.4], [0.2, 0.25, 0.22]
    x = (images / 255.0 - np.array(mean).reshape(1, 3, 1, 1)) / np.array(std).reshape(1, 3, 1, 1)
    a = init.whitening_weights(images, 2, 5e-4, mean, std)
    b = init.whitening_weights(x, 2, 5e-4)
    assert_close(a, b, np.float64, "uint8 + mean/std vs float")
    with pytest.raises(ValueError, match="float images are used as they are"):
        init.whitening_weights(x, 2, 5e-4, mean, std)


def test_whitening_is_airbenchs_in_float64(rng):
    """airbench's get_patches / get_whitening_parameters / init_whitening_conv, run in torch float64 on the same
    normalised images: the same filters, each eigenvector up to its sign (eigh's sign is the LAPACK build's; both
    signs are in the weight)."""
    torch = pytest.importorskip("torch")
    images = _smooth_images(rng, 10, 3, 8, 9)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    x = (images / 255.0 - np.array(mean).reshape(1, 3, 1, 1)) / np.array(std).reshape(1, 3, 1, 1)
    eps, k = 5e-4, 2
    t = torch.tensor(x, dtype=torch.float64)
    c = t.shape[1]
    patches = t.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c, k, k)
    flat = patches.reshape(patches.shape[0], -1)
    cov = flat.T @ flat / flat.shape[0]
    evals, evecs = torch.linalg.eigh(cov, UPLO="U")
    evals, evecs = evals.flip(0).view(-1, 1, 1, 1), evecs.T.reshape(c * k * k, c, k, k).flip(0)
    scaled = evecs / torch.sqrt(evals + eps)
    want = torch.cat((scaled, -scaled)).numpy()
    got = init.whitening_weights(images, k, eps, mean, std)
    m = c * k * k
    sign = np.sign(np.einsum("icrs,icrs->i", got[:m], want[:m])).reshape(-1, 1, 1, 1)
    assert_close(got[:m] * sign, want[:m], np.float64, "whitening filters vs airbench's recipe")
    assert_close(got[m:] * sign, want[m:], np.float64, "negated filters")


def test_whiten_sets_and_freezes_the_weight(rng):
    conv = hn.Conv2D(3, 24, 2)
    images = _smooth_images(rng, 8, 3, 6, 6)
    bias = conv.bias.data.copy()
    assert init.whiten_(conv, images, mean=[0.5] * 3, std=[0.25] * 3) is conv
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    want = init.whitening_weights(images, 2, 5e-4, [0.5] * 3, [0.25] * 3)
    np.testing.assert_array_equal(conv.weight.data, want.astype(np.float32))
    np.testing.assert_array_equal(conv.bias.data, bias)
    with pytest.raises(ValueError, match="gives weights \\(24, 3, 2, 2\\).*\\(16, 3, 2, 2\\)"):
        init.whiten_(hn.Conv2D(3, 16, 2), images)
    with pytest.raises(ValueError, match="singular"):
        init.whitening_weights(np.zeros((2, 1, 3, 3)), 2, eps=0.0)
    with pytest.raises(ValueError, match="no 4x4 patch"):
        init.whitening_weights(np.zeros((2, 1, 3, 3)), 4)


def test_whitening_init_waits_for_data(rng):
    """Conv2D(init="whitening"): frozen from the start; training before data_init is an error naming the fix;
    data_init fills it; a loaded state_dict counts as filled."""
    model = hn.Sequential([hn.Conv2D(1, 8, 2, init="whitening"), hn.GELU(), hn.Flatten(), hn.Dense(8 * 4 * 4, 2)])
    conv = model[0]
    assert not conv.weight.requires_grad and conv.bias.requires_grad and init.needs_data(model)
    x = rng.normal(size=(2, 1, 5, 5)).astype(np.float32)
    with pytest.raises(ValueError, match="hetnet.init.data_init"):
        model.forward(x)
    model.eval().forward(x)                                   # evaluating an unfilled model is allowed
    model.train()
    assert init.data_init(model, rng.normal(size=(4, 1, 5, 5))) == ["0"] and not init.needs_data(model)
    model.forward(x)
    fresh = hn.Sequential([hn.Conv2D(1, 8, 2, init="whitening"), hn.GELU(), hn.Flatten(), hn.Dense(8 * 4 * 4, 2)])
    fresh.load_state_dict(model.state_dict())
    assert not init.needs_data(fresh)
    fresh.forward(x)
    deep = hn.Sequential([hn.Conv2D(1, 1, 1), hn.Conv2D(1, 8, 2, init="whitening")])
    with pytest.raises(ValueError, match="first layer"):
        init.data_init(deep, rng.normal(size=(4, 1, 5, 5)))


def test_spec_whitening_must_be_first():
    spec = {"input_shape": [1, 6, 6], "layers": [
        {"type": "Conv2D", "in_channels": 1, "out_channels": 1, "kernel_size": 1},
        {"type": "Conv2D", "in_channels": 1, "out_channels": 8, "kernel_size": 2, "init": "whitening"}]}
    with pytest.raises(ModelFileError, match="layer 1 .*first layer"):
        zoo.build_from_spec(spec)


def test_hetnet_train_whitens_the_first_layer(tmp_path):
    """`hetnet train` with a spec whose first layer is Conv2D(init="whitening"): the saved model's first weight is
    the whitening of the run's training images (normalised with the run's statistics), unchanged by training
    (plain SGD, no weight decay: a frozen parameter gets no update), while the bias trained."""
    from test_cli import make_idx

    from hetnet.cli import main
    from hetnet.data import idx
    from hetnet.data.transforms import channel_stats
    from hetnet.serialize import load_model

    data = make_idx(tmp_path / "fashion", n_train=120, n_test=40)
    spec = {"input_shape": [1, 28, 28], "layers": [
        {"type": "Conv2D", "in_channels": 1, "out_channels": 8, "kernel_size": 2, "init": "whitening"},
        {"type": "GELU"}, {"type": "MaxPool2D", "kernel_size": 9},
        {"type": "BatchNorm2D", "num_features": 8, "momentum": 0.4, "eps": 1e-12, "scale": "none"},
        {"type": "Flatten"}, {"type": "Dense", "in_features": 8 * 3 * 3, "out_features": 10, "bias": False},
        {"type": "Scale", "factor": 0.5}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "spec.json"), "--data", str(data), "--epochs", "1",
                 "--batch-size", "32", "--device", "cpu", "--out", str(out), "--lr", "0.05"]) == 0
    model = load_model(out / "model.safetensors").model
    train_x = idx.read_idx(data / "train-images-idx3-ubyte.gz")[:, None]
    mean, std = channel_stats(train_x)
    want = init.whitening_weights(train_x, 2, 5e-4, mean, std).astype(np.float32)
    np.testing.assert_array_equal(model[0].weight.data, want)
    assert np.any(model[0].bias.data != 0)
