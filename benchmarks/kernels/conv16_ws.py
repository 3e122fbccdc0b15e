"""The warp-specialised bf16 wgmma convolutions that do not ship, the "ws" tiles (conv16_ws.cu): their tile table, their
CUDA text (mma.cu, conv16_ws.cu and the tiles' entry points) and their launch from a module of their own. Their plans
are mma.py's (plan_conv16, plan_conv16_pool, plan_conv16_data, plan_conv16_filter), given the tile itself.

On the H200 they pass the GPU tests and compute-sanitizer's racecheck but lose to the shipped wgmma tiles
(mma_tiles.TILES16W) on every layer and op of cifar-wide at batch 512 (NOTES.md, "Warp-specialised bf16
convolutions"). Each comment below gives the tile's best showing there (results/NVIDIA-H200/cl_tiles_2888ce2.json):
its time against the fastest shipped tile's on the same layer and op. time_cl_tiles.py checks and times them beside
the shipped tiles; tests/test_mma_emulated.py runs them on the CPU emulator.

    >>> import conv16_ws as ws                                         # (with benchmarks/kernels on sys.path)
    >>> [t.name for t in ws.TILES16WS["filter"]]
    ['w128x256s4ws', 'w128x128s6ws']
    >>> call = mma.plan_conv16(y, x16, w16, b, 1, 1, 0, ws.TILES16WS["fwd"][0])      # doctest: +SKIP
    >>> ws.launch(be, call)                                                         # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hetnet.backends.cuda.mma_tiles import CONV16_OPS, Tc16Tile
from wgmma_sandbox import WgmmaSandbox, with_mma

SOURCE = Path(__file__).resolve().parent / "conv16_ws.cu"


@dataclass(frozen=True)
class WsTile(Tc16Tile):
    """A bf16 wgmma tile (as mma_tiles.wgmma_tile makes them) run warp-specialised: its (bm / 64) x (bn / wn)
    warpgroups only multiply, one more warpgroup (128 threads) only copies, and shared memory holds 2 x STAGES
    mbarriers (8 bytes each) before the stages. Its name is its plain twin's and "ws"."""

    def __post_init__(self):
        super().__post_init__()
        assert self.wgmma and self.precision == "bf16" and self.min_blocks == 1, self

    @property
    def name(self) -> str:
        return super().name + "ws"

    @property
    def threads(self) -> int:
        return super().threads + 128

    @property
    def smem_bytes(self) -> int:
        return super().smem_bytes + 16 * self.stages

    def instantiation(self, op: str) -> str:
        """conv16_ws.cu's line that defines conv_kernel(op)."""
        return (f"HN_CONV16WS({self.conv_kernel(op)}, {CONV16_OPS[op]}, {self.bm // 64}, {self.bn // self.wn}, "
                f"{self.wn}, {self.stages})")


def ws_tile(bm: int, bn: int, stages: int) -> WsTile:
    """A warp-specialised tile of (bm / 64) consumer warpgroups of 64 x bn, K tiles of 64 bf16."""
    return WsTile(bm, bn, 64, 64, bn, stages, wgmma=True)


TILES16WS = {"fwd": (ws_tile(128, 128, 6),      # 1.06x: 256x4x4->256 data 27.6 us vs w128x128s4 26.0
                     ws_tile(64, 256, 5),       # 1.26x: 64x32x32->128 data 319.4 us vs w64x256s4n128 253.9
                     ws_tile(128, 256, 4)),     # 1.03x: 128x16x16->128 data 111.0 us vs w128x128s3b2 108.2
             "filter": (ws_tile(128, 256, 4),   # 1.03x: 256x4x4->256 42.3 us vs w128x256s4 40.9
                        ws_tile(128, 128, 6))}  # 1.20x: 256x4x4->256 49.2 us vs w128x256s4 40.9
TILES16WS["data"] = TILES16WS["pool"] = TILES16WS["fwd"]     # (the forward's kernel body, as TILES16W's)


def instantiations() -> str:
    """The HN_CONV16WS lines of every tile of each op of TILES16WS."""
    return "\n".join(t.instantiation(op) for op, tiles in TILES16WS.items() for t in tiles) + "\n"


def source_text() -> str:
    """conv16_ws.cu with mma.cu's text in place of its #include (none of the package's entry points) and the ws
    tiles' entry points, as nvcc compiles it (with -I the cuda folder); NVRTC gets it with the header inlined."""
    return with_mma(SOURCE, instantiations())


_SANDBOX = WgmmaSandbox("conv16_ws", source_text)
module = _SANDBOX.module          # source_text() compiled once per device for sm_90a
launch = _SANDBOX.launch          # a planned ConvCall of one of these tiles, from that module
