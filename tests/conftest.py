"""Shared test helpers. Tolerances are stated once here, per dtype, and used by every comparison."""
from __future__ import annotations

import os
import signal
import zlib

import numpy as np
import pytest

# Relative error ||a - b|| / ||b|| allowed when comparing a result against the float64 reference:
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}

# Tensor-core GEMMs (backends/cuda/mma.cu) against float64 of the exact inputs, relative to ||C||: tf32 rounds each
# operand to 10 mantissa bits (relative error up to 2^-11 = 4.9e-4 per operand, about 3e-4 for a whole product of
# random data), bf16 to 7 (2^-8 = 3.9e-3, about 3e-3). hetnet.bench.common.GEMM_RTOL holds the same values (checked
# in tests/test_mma_emulated.py).
RTOL_TC = {"tf32": 1e-3, "bf16": 1e-2}
# The same results against float64 of the inputs rounded as the kernels round them (tests/test_mma.py): the tensor
# cores' float32 accumulation (not IEEE round-to-nearest at every add) over K <= ~20000.
RTOL_TC_ROUNDED = 1e-4
# fp32's filter gradient on tensor cores (split copies) over a long K sum in parts of at most mma.FP32_PART terms: the
# accumulation's loss grows with a part's length (1.3e-5 at 2048 terms, 5.5e-5 at 8192 on the H200), a quarter of
# float32's tolerance at most.
RTOL_FP32_PARTS = 2.5e-5
# The same kernels on the CPU emulator (tests/cuda_emu) against float64 of the inputs rounded as the kernels round
# them: what remains is float32 accumulation (~1e-7 relative); a wrong fragment or index is O(1).
RTOL_EMULATED = 1e-5

# Float64 central-difference gradient check: step H has truncation error O(H^2) and rounding error O(eps/H); at
# H = 1e-6 both stay near 1e-9 relative, so analytic and numerical gradients must agree to GRADCHECK_RTOL.
GRADCHECK_H = 1e-6
GRADCHECK_RTOL = 1e-6


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    assert np.all(np.isfinite(a)), "non-finite values"
    denom = max(np.linalg.norm(b), 1e-30)
    return float(np.linalg.norm(a - b) / denom)


# The cuda backend's tensor-core precisions (hetnet.device): matrix products round their inputs to TF32 (10-bit
# mantissa, unit roundoff 2^-11) or bfloat16 (7-bit, 2^-8) and accumulate in float32; relative error allowed against
# the float64 reference for results that went through such products (sums of a few hundred rounded terms).
RTOL_PRECISION = {k: 2 * v for k, v in RTOL_TC.items()}   # a GEMM's rounding (RTOL_TC) and the op's own


def tolerance(of) -> float:
    """The relative tolerance for results of `of`: a dtype, or a backend (its dtype, or its tensor-core precision)."""
    if isinstance(of, (type, np.dtype, str)):
        return RTOL[np.dtype(of)]
    precision = getattr(of, "precision", "fp32")
    return RTOL_PRECISION[precision] if precision != "fp32" else RTOL[np.dtype(of.dtype)]


def assert_close(actual, expected, dtype, what: str = "") -> None:
    """actual (from a backend, or a backend of dtype `dtype`) is within its tolerance of `expected` (tolerance)."""
    tol = tolerance(dtype)
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.0e}"


# CUDA errors after which the process's context is lost: every later CUDA call in the process fails with the same one.
STICKY_CUDA_ERRORS = ("cudaErrorIllegalAddress", "cudaErrorLaunchFailure", "cudaErrorIllegalInstruction",
                      "cudaErrorMisalignedAddress", "cudaErrorHardwareStackError", "cudaErrorInvalidPc")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that loses the CUDA context (STICKY_CUDA_ERRORS) stops the session after it, naming itself: the tests
    after it would all fail with its error, hiding which test caused it (rerun that one under compute-sanitizer)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None:
        lost = next((e for e in STICKY_CUDA_ERRORS if e in str(call.excinfo.value)), None)
        if lost:
            item.session.shouldstop = f"{item.nodeid} lost the CUDA context ({lost}); the later tests did not run"


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Decoded image folders (hetnet.data.cache) go to a folder of this test session, never to the user's cache;
    commands run as subprocesses inherit it. The convolution choices are not kept between processes
    (backends.cuda.tune_cache), so that the tests' measurements run; the cache's own tests turn it on."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HETNET_CACHE_DIR", str(tmp_path_factory.mktemp("hetnet-cache")))
        mp.setenv("HETNET_TUNE_CACHE", "0")
        yield


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_as_in_a_terminal():
    """A suite started in the background by a non-interactive shell (`bash -c 'make test' &`) inherits SIGINT
    ignored, and so would every command it runs; the Ctrl-C tests need Python's own handler, as in a terminal."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture
def rng(request):
    """A generator per test, seeded from the test's id so that a run is reproducible (CI sees what you saw);
    HETNET_TEST_SEED=random draws fresh seeds, HETNET_TEST_SEED=<n> uses n. The seed is printed on failure."""
    choice = os.environ.get("HETNET_TEST_SEED", "")
    if choice == "random":
        seed = int(np.random.SeedSequence().entropy % 2**32)
    elif choice:
        seed = int(choice)
    else:
        seed = zlib.crc32(request.node.nodeid.encode())
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


def torch_or_skip():
    return pytest.importorskip("torch", reason="torch not installed (optional cross-check)")


# ONNX export: logits from onnxruntime (CPU, float32) against hetnet's cpu backend on the same images, relative error
# ||a - b|| / ||b|| as above (both float32; the graph normalises inside, hetnet on the host).
ONNX_RTOL = 1e-4

# Model specs that together hold every layer type of hetnet.zoo.LAYER_TYPES, at odd shapes (non-square input,
# stride 2 with padding 2, overlapping pooling, 1x1 convolution, no bias); for save/load and export tests.
EVERY_LAYER_SPECS = [
    {"input_shape": [3, 9, 11], "layers": [
        {"type": "Conv2D", "in_channels": 3, "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 2},
        {"type": "BatchNorm2D", "num_features": 4}, {"type": "ReLU"},
        {"type": "MaxPool2D", "kernel_size": 2, "stride": 1},
        {"type": "Conv2D", "in_channels": 4, "out_channels": 5, "kernel_size": 1, "bias": False}, {"type": "Tanh"},
        {"type": "AvgPool2D", "kernel_size": 2}, {"type": "Sigmoid"}, {"type": "Flatten"},
        {"type": "Dropout", "p": 0.3},
        {"type": "Dense", "in_features": 30, "out_features": 6}, {"type": "BatchNorm1D", "num_features": 6},
        {"type": "ReLU"}, {"type": "Dense", "in_features": 6, "out_features": 4, "bias": False},
        {"type": "Softmax"}]},
    {"input_shape": [1, 8, 8], "layers": [
        {"type": "Conv2D", "in_channels": 1, "out_channels": 3, "kernel_size": 3}, {"type": "ReLU"},
        {"type": "GlobalAvgPool2D"}, {"type": "Dense", "in_features": 3, "out_features": 2}]},
    {"input_shape": [3, 7, 6], "layers": [       # airbench's pieces: frozen and absent BN scales, GELU, a scale
        {"type": "Conv2D", "in_channels": 3, "out_channels": 4, "kernel_size": 2, "bias": True},
        {"type": "Conv2D", "in_channels": 4, "out_channels": 5, "kernel_size": 3, "padding": 1, "bias": False,
         "init": "dirac"},
        {"type": "BatchNorm2D", "num_features": 5, "momentum": 0.4, "eps": 1e-12, "scale": "frozen"}, {"type": "GELU"},
        {"type": "MaxPool2D", "kernel_size": 2}, {"type": "BatchNorm2D", "num_features": 5, "scale": "none"},
        {"type": "Flatten"}, {"type": "Dense", "in_features": 30, "out_features": 3, "bias": False},
        {"type": "Scale", "factor": 0.1111111111111111}]},
]


def randomize_batchnorm(model, rng) -> None:
    """Give every BatchNorm layer of `model` non-trivial gamma, beta and running statistics (eval mode uses them)."""
    for layer in model.layers:
        if hasattr(layer, "running_var"):
            c = layer.num_features
            if "weight" in layer.params:
                layer.weight.data = rng.uniform(0.5, 1.5, c)
            layer.bias.data = rng.normal(0, 0.5, c)
            layer.running_mean = rng.normal(0, 0.5, c)
            layer.running_var = rng.uniform(0.5, 2.0, c)
