"""The run directory's pictures: learning curves and the confusion matrix (matplotlib, Agg: no display needed).

    >>> from hetnet import plots
    >>> plots.curves(history, "runs/x/curves.png")                          # doctest: +SKIP
    >>> plots.confusion(matrix, class_names, "runs/x/confusion.png")        # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    """Save atomically (a reader never sees half a PNG)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def curves(history: list[dict], path: str | Path) -> None:
    """Loss (left) and accuracy (right) per epoch: train against validation and test where recorded."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-o"), ("val", "-s"), ("test", "-^")):
        loss = [r.get(f"{split}_loss") for r in history]
        acc = [r.get(f"{split}_accuracy") for r in history]
        if not any(v is not None for v in loss):
            continue
        xs = [e for e, v in zip(epochs, loss) if v is not None]
        ax_loss.plot(xs, [v for v in loss if v is not None], style, label=split, markersize=3)
        ax_acc.plot(xs, [100 * v for v in acc if v is not None], style, label=split, markersize=3)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        if epochs:
            ax.set_xticks(epochs if len(epochs) <= 20 else epochs[::max(1, len(epochs) // 10)])
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def confusion(matrix: np.ndarray, class_names: list[str], path: str | Path, title: str = "confusion matrix") -> None:
    """Counts with true classes on the rows and predicted classes on the columns; cells shaded by row fraction."""
    plt = _pyplot()
    m = np.asarray(matrix)
    k = len(class_names)
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros(m.shape, dtype=float), where=rows > 0)
    size = max(5.0, 0.55 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
