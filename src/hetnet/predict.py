"""The classes of images with a saved model (`hetnet predict`): image files, folders of them and .tar / .tar.gz
archives, decoded as training decodes them (Pillow, to the model's channels, resized bilinearly to its input),
normalised with the model's statistics and run in batches.

A file that cannot be read gets its own error and the others still get answers; one note says when images were
converted or resized to fit the model.

    >>> from hetnet.predict import predict_images
    >>> answers, failed = predict_images("runs/.../model.safetensors", ["shoe.png", "photos/", "more.tar.gz"])
    >>> answers[0]                                                # doctest: +SKIP
    ('shoe.png', [('Ankle boot', 0.93), ('Sneaker', 0.05), ('Sandal', 0.01)])
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from . import losses, serialize
from .data import folder
from .data.folder import _BadImage, decode_image
from .data.transforms import Adaptation, normalize
from .device import get_backend
from .errors import DataError, UsageError
from .runs import note, resolve_model_path
from .train import check_positive_int

BATCH = 256


def image_sources(paths: list) -> Iterator[tuple[str, object]]:
    """(name, bytes or the DataError / OSError that stopped reading it) for every image the paths name: a file as
    given (whatever its extension), a folder's image files (PNG, JPEG, BMP; sorted, recursively), an archive's image
    members ("archive.tar.gz:member")."""

    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = False
            for _, data, name in folder._iter_dir(path):
                found = True
                yield name, data
            if not found:
                yield str(path), DataError(f"{path}: no images in this folder (PNG, JPEG or BMP files)")
        elif path.is_file() and folder.is_tar(path):
            found = False
            try:
                for _, data, name in folder._iter_tar(path):
                    found = True
                    yield name, data
            except DataError as e:
                yield str(path), e
                continue
            if not found:
                yield str(path), DataError(f"{path}: no images in this archive (PNG, JPEG or BMP files)")
        else:
            try:
                yield str(path), path.read_bytes()
            except FileNotFoundError:
                yield str(path), DataError(f"{path}: image not found")
            except OSError as e:
                yield str(path), DataError(f"{path}: cannot read ({e.strerror or e})")


def predict_images(model_path: str | Path, images: list, top_k: int = 3, device: str | None = None,
                   on_result: Callable[[str, list], None] | None = None,
                   on_error: Callable[[str], None] | None = None, batch_size: int = BATCH) -> tuple[list, int]:
    """([(image name, [(class name, probability), ...top_k]), ...], number of images that failed).

    on_result(name, top) is called as each batch finishes, on_error(message) for each image that cannot be read
    (message names it); neither given: results are only returned and errors are counted. The model runs on
    `device` (default cpu). One note (stderr) says how images were adapted to the model's input, if they were."""

    top_k = check_positive_int(top_k, "top_k")
    path = resolve_model_path(model_path)
    device = device or "cpu"
    get_backend(device)                     # an unknown device is an error before any file is read
    lm = serialize.load_model(path, device=device)
    c, h, w = lm.input_shape
    if c not in (1, 3):

        raise UsageError(f"{path}: the model expects {c} input channels; only grey (1) or RGB (3) images can be "
                         f"predicted")
    mode = "L" if c == 1 else "RGB"
    adapted = Adaptation(lm.input_shape)
    k = min(top_k, len(lm.class_names))
    results, failed = [], 0
    names: list[str] = []
    arrays: list[np.ndarray] = []

    def run_batch() -> None:
        x = np.stack(arrays)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)       # (B, C, H, W) uint8
        logits = lm.model.forward(lm.model.backend.asarray(normalize(np.ascontiguousarray(x), lm.mean, lm.std)))
        probs = lm.model.backend.to_numpy(losses.softmax(logits))
        for name, pr in zip(names, probs):
            order = np.argsort(-pr, kind="stable")[:k]
            top = [(lm.class_names[i], float(pr[i])) for i in order]
            results.append((name, top))
            if on_result is not None:
                on_result(name, top)
        names.clear()
        arrays.clear()

    for name, data in image_sources(images):
        if isinstance(data, DataError):
            failed += 1
            if on_error is not None:
                on_error(str(data))
            continue
        try:
            a, own_mode, own_size = decode_image(data, os.path.basename(name), mode, (h, w))
        except _BadImage as e:
            failed += 1
            if on_error is not None:
                on_error(f"{name}: not a readable image ({e})")
            continue
        adapted.record(own_mode, own_size)
        names.append(name)
        arrays.append(a)
        if len(arrays) == batch_size:
            run_batch()
    if arrays:
        run_batch()
    if adapted:
        note(adapted.note())
    return results, failed
