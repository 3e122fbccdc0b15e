"""The implicit-GEMM convolution tiles the cuda backend ships: one table, from which both the kernels' `extern "C"`
entry points (appended to conv.cu's text when it is compiled: `instantiations`, kernels.source) and the launcher's
tables (conv.py) are made.

    >>> from hetnet.backends.cuda.conv_tiles import TILES, instantiations
    >>> t = next(t for t in TILES if t.op == "fwd" and t.name == "128x32vac")
    >>> t.threads, t.kernel(), t.kernel(numbered=True)
    (128, 'conv_fwd_128x32vac', 'conv_fwd_v15_128x32vac')
    >>> print(instantiations([t]), end="")
    HN_FWD(128x32vac, 128, 32, 8, 4, 3, true, 1, (128))

A tile computes a BM x BN block of the op's output matrix (forward: pixels x filters; data gradient: pixels x
channels; filter gradient: filters x C*R*S), TM x TN outputs per thread, in (BM/TM) * (BN/TN) * KS threads. Its name
is its block size and letters for its other parameters (conv.cu explains each): "v" the thread's outputs read from
shared memory as float4 (conv.cu's hn_vec), "a" the cp.async pipeline (STAGES 3), "c" channels inside taps (only
where the channels fill whole tiles: `fits`), "s<KS>" the block's reduction sliced between KS groups of threads.

Which tiles ship (benchmarks/kernels/NOTES.md has the full account): every tile that wins a row of
benchmarks/results/NVIDIA-H200/conv_algos.json (each op of the 3x3 convolutions of thesis-m4, thesis-m1 and
fashion-cnn at batch 32 and 1024, as conv.py's `_choose` measures them), and tiles for shape classes that table
leaves out, judged by the algorithm trials of the train-step benchmark (train_step.json's tune_log, same card and
commit): a data-gradient tile for any K (the winners above are all "c" tiles, which need K % 16 == 0), and dense
layers (1x1 convolutions of 1x1 images). The others are numbered variants in benchmarks/kernels/conv_variants.py,
checked against the reference and timed by benchmarks/kernels/run_conv_variants.py.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BK = 16          # the reduction tile (conv.cu's BK)
OPS = {"fwd": ("HN_FWD", "conv_fwd"), "data": ("HN_BWD_DATA", "conv_bwd_data"),
       "filter": ("HN_BWD_FILTER", "conv_bwd_filter")}     # op: (conv.cu's instantiation macro, kernel prefix)


@dataclass(frozen=True)
class Tile:
    """One tile configuration of one op (conv.cu's conv_<op>_impl<BM, BN, TM, TN, STAGES, CI, KS>)."""

    op: str                  # "fwd" (forward), "data" (data gradient) or "filter" (filter gradient)
    number: int              # its variant number within the op (in the order the tiles were written)
    bm: int
    bn: int
    tm: int
    tn: int
    stages: int = 2          # 2: loads staged through registers; 3: cp.async, two tiles ahead
    ci: bool = False         # channels inside taps
    ks: int = 1              # reduction slices per block
    min_blocks: int = 0      # __launch_bounds__'s blocks per SM (0: none given; conv.cu says why where given)

    def __post_init__(self):
        assert self.op in OPS and self.stages in (2, 3) and self.ks >= 1, self
        assert self.bm % self.tm == 0 and self.bn % self.tn == 0, self

    @property
    def threads(self) -> int:
        return (self.bm // self.tm) * (self.bn // self.tn) * self.ks

    @property
    def vec(self) -> bool:
        """Whether the thread's outputs are read from shared memory as float4 (conv.cu's hn_vec, same rule)."""
        return self.tm * self.tn >= 32 or (self.tm * self.tn == 16 and self.threads // self.ks == 64)

    @property
    def name(self) -> str:
        flags = ("v" if self.vec else "") + ("a" if self.stages == 3 else "") + ("c" if self.ci else "")
        return f"{self.bm}x{self.bn}{flags}" + (f"s{self.ks}" if self.ks > 1 else "")

    def kernel(self, numbered: bool = False) -> str:
        """Its entry point's name (numbered: with the variant number, as the kernel sandbox names them)."""
        return f"{OPS[self.op][1]}_{self._token(numbered)}"

    def _token(self, numbered: bool) -> str:
        return f"v{self.number}_{self.name}" if numbered else self.name

    def fits(self, c: int, k: int) -> bool:
        """Whether the tile applies to a convolution of c input and k output channels: a "c" tile needs whole
        reduction tiles of channels (forward: C % BK == 0, data gradient: K % BK == 0) or, for the filter
        gradient, whole column tiles (C % BN == 0)."""
        if not self.ci:
            return True
        if self.op == "filter":
            return c % self.bn == 0
        return (c if self.op == "fwd" else k) % BK == 0


def instantiations(tiles: Iterable[Tile], numbered: bool = False) -> str:
    """conv.cu's instantiation lines of `tiles`, one `extern "C"` kernel each, named Tile.kernel(numbered)."""
    lines = []
    for t in tiles:
        bounds = f"({t.threads}, {t.min_blocks})" if t.min_blocks else f"({t.threads})"
        lines.append(f"{OPS[t.op][0]}({t._token(numbered)}, {t.bm}, {t.bn}, {t.tm}, {t.tn}, {t.stages}, "
                     f"{'true' if t.ci else 'false'}, {t.ks}, {bounds})\n")
    return "".join(lines)


# What each tile wins: "<layer> n=<batch>" rows of conv_algos.json (of the tile's op); "dense [N, in -> out]" trials
# of train_step.json's tune_log that would be more than 10 % and 1 us slower without the tile.
TILES = (
    Tile("fwd", 2, 128, 32, 4, 4),              # thesis-m4 conv1 n=32, n=1024; fashion-cnn conv1 n=1024
    Tile("fwd", 3, 128, 16, 4, 2),              # thesis-m1 conv1 n=32
    Tile("fwd", 4, 256, 16, 8, 2),              # thesis-m1 conv1 n=1024
    Tile("fwd", 5, 64, 32, 4, 2),               # fashion-cnn conv1 n=32
    Tile("fwd", 6, 64, 16, 4, 1),               # dense [32, 200 -> 50] 8.4 us (9.7 without), [128, 200 -> 50]
    Tile("fwd", 12, 32, 32, 2, 2, ci=True),     # dense [128, 256 -> 10] 8.5 us (10.1 without; mlp's last layer)
    Tile("fwd", 14, 128, 64, 8, 8, ci=True),    # fashion-cnn conv2 n=1024
    Tile("fwd", 15, 128, 32, 8, 4, stages=3, ci=True),    # thesis-m4 conv2, conv3 n=1024; thesis-m1 conv2 n=1024
    Tile("fwd", 19, 32, 32, 4, 4, ks=4),        # dense [1024, 100 -> 10] 8.7 us (9.7 without)
    Tile("fwd", 21, 32, 32, 4, 4, ci=True, ks=3),   # thesis-m4 conv3 n=32; thesis-m1 conv2 n=32; fashion-cnn conv2 n=32
    Tile("fwd", 23, 64, 32, 8, 4, ci=True, ks=2),   # thesis-m4 conv2 n=32
    Tile("data", 5, 64, 16, 2, 2),              # any K (the others need K % 16 == 0); dense [N, in -> 10],
                                                # e.g. [128, 100 -> 10] 5.5 us (9.7 without)
    Tile("data", 11, 128, 32, 8, 4, ci=True, min_blocks=3),   # thesis-m1 conv1 n=32
    Tile("data", 12, 64, 32, 8, 4, ci=True),    # thesis-m4 conv2, conv3 n=1024; thesis-m1 conv2 n=1024;
                                                # fashion-cnn conv2 n=1024
    Tile("data", 15, 32, 32, 4, 4, ci=True),    # thesis-m4 conv2 n=32
    Tile("data", 18, 32, 32, 4, 4, ci=True, ks=4),   # thesis-m4 conv3 n=32; thesis-m1 conv2 n=32;
                                                     # fashion-cnn conv2 n=32
    Tile("filter", 6, 32, 64, 4, 8),            # thesis-m1 conv2 n=1024
    Tile("filter", 11, 32, 32, 4, 4, ci=True),  # thesis-m4 conv2 n=1024; fashion-cnn conv2 n=1024
    Tile("filter", 13, 32, 32, 4, 4, ks=2),     # thesis-m4 conv1 n=1024
    Tile("filter", 14, 32, 32, 4, 4, ks=4),     # thesis-m4 conv1, conv3 n=32; thesis-m1 conv1 n=32, n=1024;
                                                # thesis-m1 conv2 n=32; fashion-cnn conv1 n=32, n=1024
    Tile("filter", 15, 32, 32, 4, 4, ci=True, ks=4),   # thesis-m4 conv2 n=32, conv3 n=1024; fashion-cnn conv2 n=32
)
