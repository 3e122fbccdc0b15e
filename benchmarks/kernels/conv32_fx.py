"""The tf32 filter gradient on wgmma through a transposing shared-memory stage, the "fx" tiles (conv32_fx.cu): their
tile table, their CUDA text (mma.cu, conv32_fx.cu and the tiles' entry points) and their launch from a module of
their own. Their plan is mma.plan_conv16_filter's, given the tile itself (tf32 copies).

Written in the twenty-ninth session (benchmarks/kernels/NOTES.md, "Where the convolutions wait"): the shipped tf32
filter gradient runs on mma.sync, because wgmma reads tf32 operands K-major only, and it takes 5.0 of the 14.7 ms of
cifar-wide's tf32 step at batch 1024 under ncu. tests/test_mma_emulated.py runs the fx tiles on the CPU emulator;
time_cl_tiles.py --precision tf32 --sandbox fx checks each output against the first shipped tile's and times it.

    >>> import conv32_fx as fx                                         # (with benchmarks/kernels on sys.path)
    >>> [t.name for t in fx.TILES32FX["filter"]]
    ['w128x128s3i0x', 'w128x128s3x', 'w128x128s4x', 'w64x256s3x']
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hetnet.backends.cuda.mma_tiles import Tc16Tile
from wgmma_sandbox import WgmmaSandbox, with_mma

SOURCE = Path(__file__).resolve().parent / "conv32_fx.cu"


@dataclass(frozen=True)
class FxTile(Tc16Tile):
    """A tf32 filter-gradient tile of (bm / 64) warpgroups of 64 x bn on wgmma, K tiles of 32, `stages` cp.async
    staging stages and 1 + inflight K-major stages (conv32_fx.cu): inflight 1 leaves a K tile's wgmma running over
    the next tile's moves. Its name is its wgmma twin's and "x"."""

    def __post_init__(self):
        super().__post_init__()
        assert self.wgmma and self.precision == "tf32" and self.wn == self.bn and self.bn % 64 == 0, self
        assert self.smem_bytes <= 227 * 1024, self

    @property
    def name(self) -> str:
        return super().name + "x"

    @property
    def smem_bytes(self) -> int:
        """1 + inflight K-major stages of (bm + bn) x 32 float32, `stages` stages of staging tiles of 32 rows of bm + 4
        and bn + 4 float32, and 1024 bytes to align the K-major stages."""
        return ((1 + self.inflight) * (self.bm + self.bn) * 32 * 4 + self.stages * 32 * (self.bm + self.bn + 8) * 4
                + 1024)

    def instantiation(self, op: str) -> str:
        """conv32_fx.cu's line that defines conv_kernel(op) (the filter gradient only)."""
        assert op == "filter", (self, op)
        return f"HN_CONV32FX({self.conv_kernel(op)}, {self.bm // 64}, {self.bn}, {self.stages}, {self.inflight})"


def fx_tile(bm: int, bn: int, stages: int, inflight: int = 1) -> FxTile:
    """An fx tile of (bm / 64) warpgroups of 64 x bn."""
    return FxTile(bm, bn, 32, 64, bn, stages, wgmma=True, precision="tf32", inflight=inflight)


TILES32FX = {"filter": (fx_tile(128, 128, 3, inflight=0), fx_tile(128, 128, 3), fx_tile(128, 128, 4),
                        fx_tile(64, 256, 3))}


def instantiations() -> str:
    """The HN_CONV32FX lines of every tile of TILES32FX."""
    return "\n".join(t.instantiation(op) for op, tiles in TILES32FX.items() for t in tiles) + "\n"


def source_text() -> str:
    """conv32_fx.cu with mma.cu's text in place of its #include and the fx tiles' entry points, as nvcc compiles it
    (with -I the cuda folder); NVRTC gets it with the header inlined."""
    return with_mma(SOURCE, instantiations())


_SANDBOX = WgmmaSandbox("conv32_fx", source_text)
launch = _SANDBOX.launch          # launch(be, call): a planned ConvCall of an fx tile on be's device
