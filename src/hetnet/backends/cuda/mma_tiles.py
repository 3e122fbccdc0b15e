"""The tensor-core GEMM tiles of mma.cu: one table, from which both the kernels' `extern "C"` entry points (appended
to mma.cu's text when it is compiled: `instantiations`, kernels.cu_text) and the launcher's choices (mma.py) are
made.

    >>> from hetnet.backends.cuda.mma_tiles import TILES, instantiations
    >>> t = next(t for t in TILES if t.precision == "tf32" and t.name == "128x128x32s3")
    >>> t.threads, t.kernel("nt"), t.smem_bytes
    (256, 'hn_gemm_tf32_nt_128x128x32s3', 110592)
    >>> print(instantiations([t])[0:66])
    HN_GEMM(tf32, nn_128x128x32s3, false, false, 128, 128, 32, 64, 32, 3)

A tile computes a BM x BN block of C, K in steps of BK, with (BM/WM) * (BN/WN) warps of WM x WN each. Its name is
its block tile and, for tf32, "s<STAGES>" the depth of its cp.async pipeline (bf16 tiles stage through registers
into two shared buffers). Every tile is compiled for the four operand orders (LAYOUTS).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PRECISIONS = ("tf32", "bf16")
LAYOUTS = ("nn", "nt", "tn", "tt")       # op(A), op(B): n = as stored, t = transposed
# Shared-memory rows are padded against bank conflicts (mma.cu, HnOperand): (element bytes, pad of a K-major row,
# pad of an M/N-major row), in elements.
_SMEM = {"tf32": (4, 4, 8), "bf16": (2, 8, 8)}


@dataclass(frozen=True)
class TcTile:
    """One tile configuration (mma.cu's hn_gemm_<precision><TA, TB, BM, BN, BK, WM, WN, STAGES>)."""

    precision: str           # "tf32" or "bf16"
    number: int              # variant number within the precision (in the order the tiles were written)
    bm: int
    bn: int
    bk: int
    wm: int                  # warp tile
    wn: int
    stages: int              # shared-memory buffers (bf16: 2)

    def __post_init__(self):
        step = 8 if self.precision == "tf32" else 16
        assert self.precision in PRECISIONS, self
        assert self.bm % self.wm == 0 and self.bn % self.wn == 0 and self.wm % 16 == 0 and self.bk % step == 0, self
        assert self.wn % (8 if self.precision == "tf32" else 16) == 0, self
        assert self.stages >= 2 if self.precision == "tf32" else self.stages == 2, self
        for rows, cols in ((self.bm, self.bk), (self.bk, self.bm), (self.bn, self.bk), (self.bk, self.bn)):
            assert rows * cols % (4 * self.threads) == 0, f"{self}: a tile is not whole 16-byte chunks per thread"

    @property
    def name(self) -> str:
        return f"{self.bm}x{self.bn}x{self.bk}" + (f"s{self.stages}" if self.precision == "tf32" else "")

    @property
    def threads(self) -> int:
        return 32 * (self.bm // self.wm) * (self.bn // self.wn)

    def kernel(self, layout: str) -> str:
        """The entry point for operand order `layout` ("nn", "nt", "tn" or "tt")."""
        assert layout in LAYOUTS, layout
        return f"hn_gemm_{self.precision}_{layout}_{self.name}"

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory per block: `stages` buffers of both operands' tiles, each the larger of its two
        layouts (mma.cu's HnOperand::ELEMS), so the same for every operand order."""
        size, pad_k, pad_mn = _SMEM[self.precision]

        def elems(mn: int) -> int:
            return max(mn * (self.bk + pad_k), self.bk * (mn + pad_mn))

        return self.stages * size * (elems(self.bm) + elems(self.bn))


TILES = (
    # 4 warps of 32 x 32: for problems with too few 128 x 128 tiles to fill the GPU
    TcTile("tf32", 1, 64, 64, 32, 32, 32, 4),
    TcTile("bf16", 1, 64, 64, 32, 32, 32, 2),
    # 8 warps of 64 x 32
    TcTile("tf32", 2, 128, 128, 32, 64, 32, 3),
    TcTile("bf16", 2, 128, 128, 32, 64, 32, 2),
)


def instantiations(tiles: Iterable[TcTile]) -> str:
    """mma.cu's HN_GEMM lines: each tile in each operand order."""
    lines = []
    for t in tiles:
        for layout in LAYOUTS:
            ta, tb = (str(c == "t").lower() for c in layout)
            lines.append(f"HN_GEMM({t.precision}, {layout}_{t.name}, {ta}, {tb}, {t.bm}, {t.bn}, {t.bk}, {t.wm}, "
                         f"{t.wn}, {t.stages})")
    return "\n".join(lines) + "\n"
