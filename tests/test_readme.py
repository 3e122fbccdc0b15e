"""The README's Python example runs as written: its block executed on the cpu backend, with load_dataset handing it
a small synthetic Fashion-MNIST (600 training and 100 test images of the real shapes, so no data set is needed and
the two epochs take seconds)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import hetnet.data
from hetnet.data import Dataset
from hetnet.data.idx import FASHION_MNIST_CLASSES

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _small_fashion_mnist(name, *args, **kwargs) -> Dataset:
    assert name == "fashion-mnist"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (700, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 700).astype(np.int64)
    return Dataset(name, x[:600], y[:600], x[600:], y[600:], list(FASHION_MNIST_CLASSES), "synthetic")


def test_the_python_example_runs(tmp_path, monkeypatch):
    blocks = _python_blocks(README.read_text())
    assert len(blocks) == 1, "the README has one Python example"
    monkeypatch.setattr(hetnet.data, "load_dataset", _small_fashion_mnist)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)   # noqa: S102 (our own README)
    assert len(scope["history"]) == 2
    p = scope["probabilities"]
    assert p.shape == (5, 10) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert (tmp_path / "m.safetensors").is_file()
    assert np.isfinite(scope["loss"])
