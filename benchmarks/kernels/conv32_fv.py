"""The tf32 filter gradient on mma.sync gathering x from row tables, A's fragments by 8-byte loads: the "fv" tiles
(conv32_fv.cu): their tile table, their CUDA text (mma.cu, conv32_fv.cu and the tiles' entry points) and their launch
from a module of their own. Their plan is mma.plan_conv16_filter's, given the tile itself (tf32 copies).

Written in the thirtieth session (benchmarks/kernels/NOTES.md, "The shorter K loop measured"): the shipped tf32
filter gradient (hn_conv_filter_sync on mma.sync) is latency-bound with one warp a scheduler, and most of its K loop's
instructions are its copies' address arithmetic and the 4-byte LDS of its fragments (128 LDS for 128 mma a K tile of
a 64 x 64 warp tile). These tiles gather x from a per-K-tile table of the rows' offsets, written once by one warp,
and lay the warp's rows out so that each lane's A fragments are pairs of adjacent floats: 96 loads a K tile.
tests/test_mma_emulated.py runs them on the CPU emulator; time_cl_tiles.py --precision tf32 --sandbox fv checks each
output against the first shipped tile's and times it.

    >>> import conv32_fv as fv                                         # (with benchmarks/kernels on sys.path)
    >>> [t.name for t in fv.TILES32FV["filter"]][3:]
    ['256x128x32s3v', '128x128x32s4ve1', '128x256x32s3ve1', '256x128x32s3ve1']
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hetnet.backends.cuda.mma_tiles import Tc16Tile
from wgmma_sandbox import WgmmaSandbox, with_mma

SOURCE = Path(__file__).resolve().parent / "conv32_fv.cu"


@dataclass(frozen=True)
class FvTile(Tc16Tile):
    """A tf32 filter-gradient tile of bm x bn on mma.sync, warps of wm x wn, K tiles of 32, `stages` stages of rows of
    bm + 8 and bn + 8 floats and two row tables of 32 x 16 bytes (conv32_fv.cu). Its name is its mma.sync twin's and
    "v"; early: K steps issued before the next tile's copies ("e1")."""

    early: int = 0

    def __post_init__(self):
        super().__post_init__()
        assert not self.wgmma and self.precision == "tf32" and self.bk == 32 and self.split == 0, self
        assert 0 <= self.early <= 4, self

    @property
    def name(self) -> str:
        return super().name + "v" + (f"e{self.early}" if self.early else "")

    @property
    def smem_bytes(self) -> int:
        return super().smem_bytes + 2 * 32 * 16

    def instantiation(self, op: str) -> str:
        """conv32_fv.cu's line that defines conv_kernel(op) (the filter gradient only)."""
        assert op == "filter", (self, op)
        return (f"HN_CONV32FV({self.conv_kernel(op)}, {self.bm}, {self.bn}, {self.wm}, {self.wn}, {self.stages}, "
                f"{self.early})")


def fv_tile(bm: int, bn: int, wm: int, wn: int, stages: int, early: int = 0) -> FvTile:
    """An fv tile of bm x bn, warps of wm x wn."""
    return FvTile(bm, bn, 32, wm, wn, stages, precision="tf32", early=early)


# twins of the shipped TILES32["filter"] tiles that win on cifar-wide's layers (time_cl_tiles.py), and the first;
# the 64 x 64 warp tiles also with one K step before the copies
TILES32FV = {"filter": (fv_tile(128, 128, 64, 32, 3), fv_tile(128, 128, 64, 64, 4), fv_tile(128, 256, 64, 64, 3),
                        fv_tile(256, 128, 64, 64, 3), fv_tile(128, 128, 64, 64, 4, 1), fv_tile(128, 256, 64, 64, 3, 1),
                        fv_tile(256, 128, 64, 64, 3, 1))}


def instantiations() -> str:
    """The HN_CONV32FV lines of every tile of TILES32FV."""
    return "\n".join(t.instantiation(op) for op, tiles in TILES32FV.items() for t in tiles) + "\n"


def source_text() -> str:
    """conv32_fv.cu with mma.cu's text in place of its #include and the fv tiles' entry points, as nvcc compiles it
    (with -I the cuda folder); NVRTC gets it with the header inlined."""
    return with_mma(SOURCE, instantiations())


_SANDBOX = WgmmaSandbox("conv32_fv", source_text)     # (built for sm_90a, as the wgmma sandboxes: H100 / H200 only)
launch = _SANDBOX.launch          # launch(be, call): a planned ConvCall of an fv tile on be's device
