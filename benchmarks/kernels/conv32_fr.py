"""The tf32 filter gradient on wgmma with x's fragments in registers and dy read K-major from a copy of its own, the
"fr" tiles (conv32_fr.cu): their tile table, their CUDA text (mma.cu, conv32_fr.cu and the tiles' entry points), the
K-major copy of dy they read (dy_t) and their launch from a module of their own. Their plan is
mma.plan_conv16_filter's, given the tile itself (tf32 copies), with the call's dy replaced by dy_t's copy (with_dy_t).

Written in the thirty-first session (benchmarks/kernels/NOTES.md): the shipped tf32 filter gradient runs on mma.sync
(latency-bound at one warp a scheduler), the fx tiles' transposing stage lost, and the fv tiles' row tables lost.
tests/test_mma_emulated.py runs the fr tiles on the CPU emulator; time_cl_tiles.py --precision tf32 --sandbox fr
checks each output against the first shipped tile's and times it (dy_t's copy made before the timed launches).

    >>> import conv32_fr as fr                                         # (with benchmarks/kernels on sys.path)
    >>> [t.name for t in fr.TILES32FR["filter"]]
    ['w128x128s4r', 'w128x128s6r', 'w128x128s3b2r', 'w256x128s4r', 'w128x256s4r', 'w256x64s5r', 'w128x128s3k64r']
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from hetnet.backends.cuda.mma_tiles import Tc16Tile
from wgmma_sandbox import WgmmaSandbox, with_mma

SOURCE = Path(__file__).resolve().parent / "conv32_fr.cu"


@dataclass(frozen=True)
class FrTile(Tc16Tile):
    """A tf32 filter-gradient tile of bm output channels o x bn columns (r, s, c): bn / 64 warpgroups, each 64 columns
    (r, s, c) x all bm o on wgmma m64n{bm}k8 with A (x) from registers, K tiles of bk (32 or 64), `stages` stages;
    min_blocks blocks an SM. Its name is "w{bm}x{bn}s{stages}", "k64" for K tiles of 64, and "r". (Not the package's
    wgmma tiles: those take K tiles of 128 bytes, and tf32 A from shared memory.)"""

    def __post_init__(self):
        super().__post_init__()
        assert not self.wgmma and self.precision == "tf32" and self.bm in (64, 128, 256) and self.bn % 64 == 0, self
        assert self.bk in (32, 64) and self.stages >= 3 and self.smem_bytes * self.min_blocks <= 228 * 1024, self

    @property
    def name(self) -> str:
        return (f"w{self.bm}x{self.bn}s{self.stages}" + (f"b{self.min_blocks}" if self.min_blocks > 1 else "")
                + ("k64" if self.bk == 64 else "") + "r")

    @property
    def threads(self) -> int:
        return 128 * (self.bn // 64)

    @property
    def smem_bytes(self) -> int:
        """`stages` stages of dy_t's tile (bm rows of bk float32) and x's (bk rows of bn + 8 float32), and 1024 bytes to
        align them."""
        return self.stages * (self.bm + self.bn + 8) * self.bk * 4 + 1024

    def instantiation(self, op: str) -> str:
        """conv32_fr.cu's line that defines conv_kernel(op) (the filter gradient only)."""
        assert op == "filter", (self, op)
        return (f"HN_CONV32FR({self.conv_kernel(op)}, {self.bn // 64}, {self.bm}, {self.bk}, {self.stages}, "
                f"{self.min_blocks})")


def fr_tile(bm: int, bn: int, stages: int, min_blocks: int = 1, bk: int = 32) -> FrTile:
    """An fr tile of bm output channels x bn columns (r, s, c)."""
    return FrTile(bm, bn, bk, 64, 64, stages, min_blocks, precision="tf32")


TILES32FR = {"filter": (fr_tile(128, 128, 4), fr_tile(128, 128, 6), fr_tile(128, 128, 3, 2), fr_tile(256, 128, 4),
                        fr_tile(128, 256, 4), fr_tile(256, 64, 5), fr_tile(128, 128, 3, bk=64))}


def instantiations() -> str:
    """The HN_CONV32FR lines of every tile of TILES32FR."""
    return "\n".join(t.instantiation(op) for op, tiles in TILES32FR.items() for t in tiles) + "\n"


def source_text() -> str:
    """conv32_fr.cu with mma.cu's text in place of its #include and the fr tiles' entry points, as nvcc compiles it
    (with -I the cuda folder); NVRTC gets it with the header inlined."""
    return with_mma(SOURCE, instantiations())


def dy_t(xp, dy16):
    """The K-major copy of the channels-last tf32 copy dy16 [n, P, Q, O] the fr tiles read: [O, ldk], column k = (img,
    p, q), ldk = n P Q rounded up to 4, zeros past n P Q."""
    o = dy16.shape[-1]
    k = dy16.size // o
    out = xp.zeros((o, -(-k // 4) * 4), dy16.dtype)
    out[:, :k] = dy16.reshape(k, o).T
    return out


def with_dy_t(xp, call):
    """A planned filter-gradient ConvCall of an fr tile (mma.plan_conv16_filter) reading dy_t's copy of its dy."""
    assert isinstance(call.tile, FrTile) and call.op == "filter", call
    return dataclasses.replace(call, w=dy_t(xp, call.w))


_SANDBOX = WgmmaSandbox("conv32_fr", source_text)     # (built for sm_90a: H100 / H200 only)
_COPIES: dict = {}


def launch(be, call) -> None:
    """Run a planned ConvCall of an fr tile on be's device, its dy (the channels-last copy) read through dy_t's copy,
    made at the first launch of each dy and kept (so that timed launches are the kernel's alone)."""
    kept = _COPIES.get(id(call.w))
    if kept is None:            # (dy kept too, so that its id is not another array's while the copy is kept)
        kept = _COPIES[id(call.w)] = (call.w, dy_t(be.xp, call.w))
    _SANDBOX.launch(be, dataclasses.replace(call, w=kept[1]))
