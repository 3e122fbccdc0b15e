"""The TMA-fed bf16 filter gradients in clusters of two blocks that share dy's tiles by multicast, the "mc" tiles
(conv16_mc.cu): their tile table, their CUDA text (mma.cu, conv16_mc.cu and the tiles' entry points) and their launch
from a module of their own. Their plan is mma.plan_conv16_filter's, given the tile itself; the launch makes the
grid's x even (a cluster is two blocks along x) and passes the two tensor maps (mma.tensor_maps).

Written in the twentieth session and not yet run on a GPU (benchmarks/kernels/NOTES.md, "The filter gradient in
clusters of two": a K tile reads (BM + BN) x 64 bf16 from L2 a block, of which these halve A's share).
time_cl_tiles.py --sandbox mc checks each output against the first shipped tile's before it times it; the CPU
emulator has no clusters, so tests/test_cu_compile.py only compiles them.

    >>> import conv16_mc as mc                                         # (with benchmarks/kernels on sys.path)
    >>> [t.name for t in mc.TILES16MC["filter"]]
    ['w128x256s4mc', 'w128x128s6mc', 'w128x128s3b2mc']
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetnet.backends.cuda import mma
from hetnet.backends.cuda.mma_tiles import TmaTile
from wgmma_sandbox import WgmmaSandbox, with_mma

SOURCE = Path(__file__).resolve().parent / "conv16_mc.cu"


@dataclass(frozen=True)
class McTile(TmaTile):
    """A TMA filter-gradient tile (mma_tiles.tma_tile) run in clusters of two blocks along N that multicast dy's
    tiles (conv16_mc.cu). Its name is its wgmma twin's and "mc"."""

    def __post_init__(self):
        super().__post_init__()
        assert self.bm % 128 == 0 and not self.persistent, self

    @property
    def name(self) -> str:
        return super().name.removesuffix("t") + "mc"

    def instantiation(self, op: str) -> str:
        """conv16_mc.cu's line that defines conv_kernel(op) (the filter gradient only)."""
        assert op == "filter", (self, op)
        return (f"HN_CONV16MC({self.conv_kernel(op)}, {self.bm // 64}, {self.bn // self.wn}, {self.wn}, "
                f"{self.stages}, {self.min_blocks})")


def mc_tile(bm: int, bn: int, stages: int, min_blocks: int = 1) -> McTile:
    """A multicast filter tile of (bm / 64) consumer warpgroups of 64 x bn, K tiles of 64 bf16."""
    return McTile(bm, bn, 64, 64, bn, stages, min_blocks, wgmma=True)


# The shipped TMA filter tiles (mma_tiles.TILES16T["filter"]) in clusters.
TILES16MC = {"filter": (mc_tile(128, 256, 4), mc_tile(128, 128, 6), mc_tile(128, 128, 3, 2))}


def instantiations() -> str:
    """The HN_CONV16MC lines of every tile of TILES16MC."""
    return "\n".join(t.instantiation(op) for op, tiles in TILES16MC.items() for t in tiles) + "\n"


def source_text() -> str:
    """conv16_mc.cu with mma.cu's text in place of its #include and the mc tiles' entry points, as nvcc compiles it
    (with -I the cuda folder); NVRTC gets it with the header inlined."""
    return with_mma(SOURCE, instantiations())


_SANDBOX = WgmmaSandbox("conv16_mc", source_text)
module = _SANDBOX.module          # source_text() compiled once per device for sm_90a


def launch(be, call) -> None:
    """Run a planned filter-gradient ConvCall of an mc tile (mma.plan_conv16_filter) on `be`'s device: its grid's x
    rounded up to a whole cluster, its tensor maps after its arguments."""
    kern = module(be.device_id).get_function(call.kernel)
    kern.max_dynamic_shared_size_bytes = call.tile.smem_bytes
    args = call.args(lambda a: ctypes.c_void_p(a.data.ptr), ctypes.c_void_p(0))
    grid = (call.grid[0] + call.grid[0] % 2, *call.grid[1:])
    mma.launch_raw(be, kern, grid, call.block, call.tile.smem_bytes,
                   [ctypes.c_int32(int(a)) if isinstance(a, np.integer) else a for a in args]
                   + list(mma.tensor_maps(call)))
