"""Data sets for hetnet: readers for IDX (MNIST, Fashion-MNIST), CIFAR-10 batches and image folders, transforms,
and batch loaders (a background thread on the host, or kernels on the device: ResidentLoader).

    >>> from hetnet.data import load_dataset, split_train_val, channel_stats, BatchLoader
    >>> d = load_dataset("fashion-mnist")
    >>> tx, ty, vx, vy = split_train_val(d.train_x, d.train_y, 0.1, seed=0)
    >>> mean, std = channel_stats(tx)
    >>> for xb, yb in BatchLoader(tx, ty, 64, mean, std, seed=0).epoch(0):
    ...     pass
"""
from .datasets import DATASETS, Dataset, describe_data_locations, held_out_split, load_dataset, split_train_val
from .loader import BatchLoader, ResidentLoader, on_device
from .transforms import channel_stats, convert_channels, normalize, resize_batch

__all__ = ["DATASETS", "BatchLoader", "Dataset", "ResidentLoader", "channel_stats", "convert_channels",
           "describe_data_locations", "held_out_split", "load_dataset", "normalize", "on_device", "resize_batch",
           "split_train_val"]
