"""Layers: parameters, gradients and caches; the arithmetic is the backend's."""
from .activation import GELU, ReLU, Scale, Sigmoid, Softmax, Tanh
from .base import Layer, Parameter
from .conv import Conv2D
from .dense import Dense, Flatten
from .dropout import Dropout
from .norm import BatchNorm1D, BatchNorm2D
from .pool import AvgPool2D, GlobalAvgPool2D, MaxPool2D

__all__ = ["Layer", "Parameter", "Dense", "Flatten", "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "ReLU",
           "GELU", "Sigmoid", "Tanh", "Softmax", "Scale", "BatchNorm1D", "BatchNorm2D", "Dropout"]

# every layer type by its class name: what a JSON model spec (hetnet.zoo) can name
LAYER_TYPES = {name: globals()[name] for name in __all__ if name not in ("Layer", "Parameter")}
