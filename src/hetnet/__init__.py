"""hetnet: a readable deep-learning engine for image classification on CPUs and NVIDIA GPUs.

    import hetnet as hn
    model = hn.Sequential([hn.Conv2D(1, 8, 3, padding=1), hn.ReLU(), hn.MaxPool2D(2),
                           hn.Flatten(), hn.Dense(8 * 14 * 14, 10)]).to("cpu")
    logits = model.forward(x)                                  # x: (N, 1, 28, 28) float32
    loss, dlogits = hn.losses.softmax_cross_entropy(logits, labels)
    model.backward(dlogits)
    hn.save(model, "m.safetensors", classes=[...], input_shape=(1, 28, 28)); hn.load("m.safetensors").model
"""
from . import losses, optim
from .device import best_device, get_backend
from .layers import (GELU, AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D,
                     Layer, MaxPool2D, Parameter, ReLU, Scale, Sigmoid, Softmax, Tanh)
from .model import Sequential
from .random import seed
from .serialize import load, save
from .version import __version__


__all__ = ["losses", "optim", "seed", "save", "load", "get_backend", "best_device", "Layer", "Parameter",
           "Sequential", "Dense", "Flatten", "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "ReLU", "GELU",
           "Sigmoid", "Tanh", "Softmax", "Scale", "BatchNorm1D", "BatchNorm2D", "Dropout", "__version__"]
