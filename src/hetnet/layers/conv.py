"""2-D convolution (cross-correlation, as every framework): weight (K, C, R, S), zero padding, square stride."""
from __future__ import annotations

from ..init import dirac_
from .base import WeightedLayer


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length along one axis: floor((size + 2*padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


INITS = ("he", "glorot", "dirac", "whitening")


class Conv2D(WeightedLayer):
    """y[n,k,p,q] = b[k] + sum_{c,r,s} w[k,c,r,s] * xpad[n, c, p*stride + r, q*stride + s].

        >>> import hetnet as hn, numpy as np
        >>> hn.Conv2D(3, 8, 3, padding=1).to("reference").forward(np.ones((2, 3, 5, 7))).shape
        (2, 8, 5, 7)

    init (the weight; the bias starts at zero):
      None         Glorot uniform, or He normal when a Sequential puts the layer before a ReLU (the default)
      "he" | "glorot"  that one, wherever the layer is
      "dirac"      Glorot uniform, then filters 0 .. min(K, C)-1 set to the identity (hetnet.init.dirac_ on
                   w[:C]): the layer starts by passing its input through, as airbench's convolutions do
      "whitening"  filters from training-patch statistics (hetnet.init.whiten_): needs images, so the weight is
                   frozen now and filled by `hetnet.init.data_init(model, images)` (hetnet train does this with
                   the training set); training before that is an error. The bias stays trainable.
    """

    op = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, init: str | None = None):
        super().__init__()
        ks, st, pd = _single(kernel_size, "kernel_size"), _single(stride, "stride"), _single(padding, "padding")
        for name, v, lo in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                            ("kernel_size", ks, 1), ("stride", st, 1), ("padding", pd, 0)):
            if int(v) < lo:
                raise ValueError(f"Conv2D: {name} must be >= {lo}, got {v}")
        if init is not None and init not in INITS:
            raise ValueError(f"Conv2D: init must be one of {', '.join(INITS)} (or null), got {init!r}")
        if init == "whitening" and int(out_channels) != 2 * int(in_channels) * ks * ks:
            raise ValueError(f"Conv2D: init 'whitening' needs out_channels = 2 * in_channels * kernel_size^2 = "
                             f"{2 * int(in_channels) * ks * ks}, got {out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = ks, st, pd
        self.init = init
        self.awaiting_data = False      # init "whitening" until hetnet.init.whiten_ or a state_dict fills it
        self._make_parameters((self.out_channels, self.in_channels, ks, ks), bias)
        if init is not None:
            self.reset_parameters(init)

    def _init_kind(self) -> str | None:
        return None if self.init is not None else "glorot"     # an explicit init is not overridden by Sequential

    def reset_parameters(self, kind: str) -> None:
        """Weight as `kind` ('he', 'glorot', 'dirac', 'whitening': see the class docstring), bias zero."""
        super().reset_parameters("glorot" if kind in ("dirac", "whitening") else kind)
        if kind == "dirac":

            w = self.backend.to_numpy(self.weight.data)
            dirac_(w[:self.in_channels])
            self.weight.data = w
        elif kind == "whitening":
            self.weight.requires_grad = False
            self.awaiting_data = True

    def check_batch(self, x) -> None:
        if self.awaiting_data and self.training:
            raise ValueError(f"{self!r}: the whitening weights come from training images; call "
                             f"hetnet.init.data_init(model, images) (or hetnet.init.whiten_(layer, images)) first")

    def forward(self, x):
        self.check_batch(x)
        return super().forward(x)

    def _state_loaded(self) -> None:
        self.awaiting_data = False

    def output_shape(self, input_shape: tuple) -> tuple:
        if len(input_shape) != 3 or input_shape[0] != self.in_channels:
            raise ValueError(f"{self!r}: expected input of shape (N, {self.in_channels}, H, W), "
                             f"got (N, {', '.join(map(str, input_shape))})")
        _, h, w = input_shape
        p, q = (conv_out(s, self.kernel_size, self.stride, self.padding) for s in (h, w))
        if p < 1 or q < 1:
            raise ValueError(f"{self!r}: input of {h}x{w} is smaller than the {self.kernel_size}x{self.kernel_size} "
                             f"kernel with padding {self.padding}")
        return (self.out_channels, p, q)

    def op_args(self) -> tuple:
        return (self.stride, self.padding)

    def __repr__(self) -> str:
        init = "" if self.init is None else f", init={self.init!r}"
        return (f"Conv2D({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.use_bias}{init})")


def _single(v, name: str) -> int:
    """Accept an int or a square pair (k, k)."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{name}: only square values are supported, got {tuple(v)}")
        v = v[0]
    return int(v)
