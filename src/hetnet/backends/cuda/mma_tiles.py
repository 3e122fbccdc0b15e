"""The tensor-core GEMM tiles of mma.cu: one table, from which both the kernels' `extern "C"` entry points (appended
to mma.cu's text when it is compiled: `instantiations`, kernels.cu_text) and the launcher's choices (mma.py) are
made.

    >>> from hetnet.backends.cuda.mma_tiles import TILES, instantiations
    >>> t = next(t for t in TILES if t.precision == "tf32" and t.name == "128x128x32s3")
    >>> t.threads, t.kernel("nt"), t.smem_bytes
    (256, 'hn_gemm_tf32_nt_128x128x32s3', 110592)
    >>> print(instantiations([t]).splitlines()[0])
    HN_GEMM(hn_gemm_tf32_nn_128x128x32s3, hn_gemm_tf32, false, false, 128, 128, 32, 64, 32, 3, 1)

A tile computes a BM x BN block of C, K in steps of BK, with (BM/WM) * (BN/WN) warps of WM x WN each. Its name is
its block tile, "s<STAGES>" the depth of its cp.async pipeline, and a letter for its variant (mma.cu has each):
  tf32 (none): float32 tiles through the cp.async pipeline, each fragment rounded to tf32 as it is read;
  tf32 "l": each element rounded once, where it lands in shared memory, and K-major fragments by ldmatrix;
  bf16 (none, no "s"): float32 tiles read into registers, rounded to bf16 and stored into two shared buffers;
  bf16 "a": float32 tiles through a cp.async pipeline, rounded by the threads that copied them into two bf16
       buffers.
Every tile is compiled for the four operand orders (LAYOUTS). CHOICE (mma.py) says which tiles the launcher picks
from; benchmarks/kernels/run_tc_gemm.py checks and times them all.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PRECISIONS = ("tf32", "bf16")
LAYOUTS = ("nn", "nt", "tn", "tt")       # op(A), op(B): n = as stored, t = transposed
# Shared-memory rows are padded against bank conflicts (mma.cu, HnOperand): (element bytes, pad of a K-major row,
# pad of an M/N-major row), in elements.
_SMEM = {"tf32": (4, 4, 8), "bf16": (2, 8, 8)}
VARIANTS = {("tf32", ""): "hn_gemm_tf32", ("tf32", "l"): "hn_gemm_tf32_l", ("bf16", ""): "hn_gemm_bf16",
            ("bf16", "a"): "hn_gemm_bf16_a"}      # (precision, variant letter): mma.cu's body
# The implicit-GEMM convolutions (mma.cu, HN_CONV) are built on the cp.async pipelines: their body per variant, and
# their ops with mma.cu's MODE of each (the forward, the data gradient, the filter gradient).
CONV_VARIANTS = {("tf32", ""): "hn_conv_tf32", ("tf32", "l"): "hn_conv_tf32_l", ("bf16", "a"): "hn_conv_bf16_a"}
CONV_OPS = {"fwd": 1, "data": 2, "filter": 3}
# the channels-last bf16 convolutions (HN_CONV16, HN_CONV16W) also pool: "pool", the forward max-pooled over 2 x 2
# windows at stride 2 in its epilogue (EPI 4)
CONV16_OPS = {**CONV_OPS, "pool": 4}
CL_PRECISIONS = ("bf16", "tf32", "fp32")      # the precisions with channels-last tiles (Tc16Tile)


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
    stages: int              # float32 buffers of the cp.async pipeline (bf16 without "a": 2 register-staged)
    variant: str = ""        # VARIANTS' letter
    min_blocks: int = 1      # __launch_bounds__'s blocks per SM: 2 caps registers at 128 for 256 threads

    def __post_init__(self):
        step = 8 if self.precision == "tf32" else 16
        assert self.precision in PRECISIONS and (self.precision, self.variant) in VARIANTS, self
        assert self.bm % self.wm == 0 and self.bn % self.wn == 0 and self.wm % 16 == 0 and self.bk % step == 0, self
        assert self.wn % (8 if self.precision == "tf32" else 16) == 0, self
        assert self.stages >= 2 if self.pipelined else self.stages == 2, self
        for rows, cols in ((self.bm, self.bk), (self.bk, self.bm), (self.bn, self.bk), (self.bk, self.bn)):
            assert rows * cols % (4 * self.threads) == 0, f"{self}: a tile is not whole 16-byte chunks per thread"

    @property
    def pipelined(self) -> bool:
        """Global -> shared copies by cp.async (all but the register-staged bf16 tiles)."""
        return self.precision == "tf32" or self.variant == "a"

    @property
    def name(self) -> str:
        return f"{self.bm}x{self.bn}x{self.bk}" + (f"s{self.stages}" if self.pipelined else "") + self.variant

    @property
    def body(self) -> str:
        return VARIANTS[(self.precision, self.variant)]

    @property
    def threads(self) -> int:
        return 32 * (self.bm // self.wm) * (self.bn // self.wn)

    def kernel(self, layout: str) -> str:
        """The entry point for operand order `layout` ("nn", "nt", "tn" or "tt")."""
        assert layout in LAYOUTS, layout
        return f"hn_gemm_{self.precision}_{layout}_{self.name}"

    def conv_kernel(self, op: str) -> str:
        """The entry point of the implicit-GEMM convolution `op` ("fwd", "data" or "filter", CONV_OPS) on this
        tile."""
        assert (self.precision, self.variant) in CONV_VARIANTS and op in CONV_OPS, (self, op)
        return f"hn_conv_{op}_{self.precision}_{self.name}"

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory per block: `stages` buffers of both operands' tiles, each the larger of its two
        layouts (mma.cu's HnOperand::ELEMS), so the same for every operand order; bf16 "a": `stages` unpadded
        float32 buffers and two bf16 ones."""
        size, pad_k, pad_mn = _SMEM[self.precision]

        def elems(mn: int, pad_k: int, pad_mn: int) -> int:
            return max(mn * (self.bk + pad_k), self.bk * (mn + pad_mn))

        if self.precision == "bf16" and self.variant == "a":
            return (self.stages * 4 * (elems(self.bm, 0, 0) + elems(self.bn, 0, 0))
                    + 2 * size * (elems(self.bm, pad_k, pad_mn) + elems(self.bn, pad_k, pad_mn)))
        return self.stages * size * (elems(self.bm, pad_k, pad_mn) + elems(self.bn, pad_k, pad_mn))


TILES = (
    # the first, simple versions: 4 warps of 32 x 32 (problems with too few 128 x 128 tiles to fill the GPU) and 8
    # warps of 64 x 32 (122-130 registers without a bound; __launch_bounds__(256, 2) made two of the tf32 ones
    # spill 8 bytes, so only bf16 s2a, which does not, asks for two blocks per SM)
    TcTile("tf32", 1, 64, 64, 32, 32, 32, 4),
    TcTile("bf16", 1, 64, 64, 32, 32, 32, 2),
    TcTile("tf32", 2, 128, 128, 32, 64, 32, 3),
    TcTile("bf16", 2, 128, 128, 32, 64, 32, 2),
    # the same tiles with the rounding done once per element (tf32 "l") or a cp.async pipeline (bf16 "a")
    TcTile("tf32", 3, 64, 64, 32, 32, 32, 4, "l"),
    TcTile("tf32", 4, 128, 128, 32, 64, 32, 3, "l"),
    TcTile("bf16", 3, 64, 64, 32, 32, 32, 4, "a"),
    TcTile("bf16", 4, 128, 128, 32, 64, 32, 3, "a"),
    TcTile("bf16", 5, 128, 128, 32, 64, 32, 2, "a", min_blocks=2),    # 104 KB: two blocks per SM
)


# The convolutions' tiles, (large, small) per precision as mma.CHOICE, on one block per SM: their gathers keep about
# 12 more registers per thread than a GEMM, past the 128 that two blocks of 256 threads allow.
CONV_CHOICE = {"tf32": ("128x128x32s3", "64x64x32s4"), "bf16": ("128x128x32s3a", "64x64x32s4a")}


def conv_tiles() -> list[TcTile]:
    return [t for t in TILES for name in CONV_CHOICE[t.precision] if t.name == name]


@dataclass(frozen=True)
class Tc16Tile:
    """A tile of the channels-last convolutions: both operands copied by cp.async straight into STAGES shared tiles
    of what the products read, no float32 staging. bf16 (mma.cu's HN_CONV16, HN_CONV16W): bf16 copies; tf32
    (HN_CONV32W, HN_CONV32F): float32 copies already rounded to tf32, the forward on wgmma, the filter gradient on
    mma.sync; fp32: the tf32 kernels on split copies (each value as two tf32 parts, hi + lo) with three products
    (hi hi + hi lo + lo hi) where tf32 has one, float32's accuracy on tensor cores."""

    bm: int
    bn: int
    bk: int
    wm: int
    wn: int
    stages: int
    min_blocks: int = 1      # __launch_bounds__'s blocks per SM ("b2": two, 128 registers at 256 threads)
    wgmma: bool = False      # "w": on wgmma (sm_90a), warpgroups of 64 x bn
    precision: str = "bf16"  # "bf16", "tf32" or "fp32"
    inflight: int = 1        # wgmma groups left pending at a K tile's end ("i0": none, copies a tile further ahead)

    def __post_init__(self):
        assert self.precision in CL_PRECISIONS, self
        if self.wgmma:
            assert self.bm % 64 == 0 and self.bk * self.elem_bytes == 128 and self.wm == 64, self
            assert self.bn % self.wn == 0 and self.wn in (64, 128, 256) and self.stages >= 2 + self.inflight, self
            assert self.inflight == 1 or self.precision != "bf16", self

    @property
    def elem_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def split(self) -> int:
        """1 for the fp32 tiles (split copies: both parts of both tiles in each stage), else 0."""
        return int(self.precision == "fp32")

    @property
    def name(self) -> str:
        if self.wgmma:
            return (f"w{self.bm}x{self.bn}s{self.stages}" + (f"n{self.wn}" if self.wn != self.bn else "")
                    + (f"b{self.min_blocks}" if self.min_blocks > 1 else "") + ("i0" if self.inflight == 0 else ""))
        return f"{self.bm}x{self.bn}x{self.bk}s{self.stages}" + (f"b{self.min_blocks}" if self.min_blocks > 1 else "")

    @property
    def threads(self) -> int:
        return 32 * (self.bm // self.wm) * (self.bn // self.wn) * (4 if self.wgmma else 1)

    @property
    def smem_bytes(self) -> int:
        parts = 1 + self.split
        if self.wgmma:        # unpadded swizzled rows of 128 bytes, and 1024 bytes to align them
            return self.stages * (self.bm + self.bn) * 128 * parts + 1024
        _, pad_k, pad_mn = _SMEM["bf16" if self.precision == "bf16" else "tf32"]   # HnOperand's padded tiles
        return parts * self.stages * self.elem_bytes * sum(max(mn * (self.bk + pad_k), self.bk * (mn + pad_mn))
                                                           for mn in (self.bm, self.bn))

    def conv_kernel(self, op: str) -> str:
        assert op in CONV16_OPS, (self, op)
        return f"hn_conv{8 * self.elem_bytes}{'x3' if self.split else ''}_{op}_{self.name}"

    def instantiation(self, op: str) -> str:
        """mma.cu's line that defines conv_kernel(op)."""
        if self.precision != "bf16":
            if self.wgmma:
                assert op != "filter", self
                return (f"HN_CONV32W({self.conv_kernel(op)}, {CONV16_OPS[op]}, {self.bm // 64}, "
                        f"{self.bn // self.wn}, {self.wn}, {self.stages}, {self.min_blocks}, {self.split}, "
                        f"{self.inflight})")
            assert op == "filter", self
            return (f"HN_CONV32F({self.conv_kernel(op)}, {self.bm}, {self.bn}, {self.bk}, {self.wm}, {self.wn}, "
                    f"{self.stages}, {self.min_blocks}, {self.split})")
        if self.wgmma:
            return (f"HN_CONV16W({self.conv_kernel(op)}, {CONV16_OPS[op]}, {self.bm // 64}, {self.bn // self.wn}, "
                    f"{self.wn}, {self.stages}, {self.min_blocks})")
        return (f"HN_CONV16({self.conv_kernel(op)}, {CONV16_OPS[op]}, {self.bm}, {self.bn}, {self.bk}, {self.wm}, "
                f"{self.wn}, {self.stages}, {self.min_blocks})")


def wgmma_tile(bm: int, bn: int, stages: int, wn: int | None = None, min_blocks: int = 1,
               precision: str = "bf16", inflight: int = 1) -> Tc16Tile:
    """A channels-last tile on wgmma: (bm / 64) x (bn / wn) warpgroups, each 64 x wn (default bn), K tiles of 128
    bytes (64 bf16, 32 tf32 or fp32); min_blocks: __launch_bounds__'s blocks per SM; inflight: wgmma groups left
    pending at the end of a K tile."""
    return Tc16Tile(bm, bn, 128 // (2 if precision == "bf16" else 4), 64, wn or bn, stages, min_blocks, wgmma=True,
                    precision=precision, inflight=inflight)


# The channels-last tiles, (large, small) per op (the data gradient runs the forward's kernel body); conv.py measures
# both on every shape ("tc16", "tc16s"). On the H200 at batch 512 the large ones won every cifar-wide layer
# (benchmarks/kernels/run_tc_conv_nhwc.py; the forward's on two blocks per SM, the filter gradient's on one).
TILES16 = {"fwd": (Tc16Tile(128, 128, 32, 64, 32, 4, 2), Tc16Tile(64, 64, 32, 32, 32, 4)),
           "filter": (Tc16Tile(128, 128, 32, 64, 32, 4), Tc16Tile(64, 64, 32, 32, 32, 4))}
TILES16["data"] = TILES16["pool"] = TILES16["fwd"]     # the pooled forward runs on the forward's measured tile
# The same on wgmma, for devices whose mma module is compiled for sm_90a (kernels.wgmma_ok): conv.py measures each.
# The "b" tiles fit several blocks per SM (shared memory and registers), so that one block's prologue and epilogue
# overlap another's products: the short reductions (K = C x 9 of a few hundred) are mostly those.
TILES16W = {"fwd": (wgmma_tile(128, 256, 4), wgmma_tile(128, 128, 4), wgmma_tile(64, 256, 4),
                    wgmma_tile(64, 256, 4, 128), wgmma_tile(128, 128, 3, min_blocks=2),
                    wgmma_tile(64, 128, 4, min_blocks=2)),
            "filter": (wgmma_tile(128, 256, 4), wgmma_tile(128, 128, 4), wgmma_tile(64, 256, 4, 128),
                       wgmma_tile(128, 128, 3, min_blocks=2))}
TILES16W["data"] = TILES16W["pool"] = TILES16W["fwd"]


@dataclass(frozen=True)
class FrTile(Tc16Tile):
    """A tf32 filter-gradient tile on wgmma with x's fragments in registers (mma.cu's HN_CONV32FR): bm output
    channels o x bn columns (r, s, c), bn / 64 warpgroups each of 64 columns (r, s, c) x all bm o (m64n{bm}k8, A = x
    gathered, from registers; B = dy from its K-major copy: mma.to_nhwc's or pool_grad_nhwc's k_major, a batch norm's
    hand-over (Nhwc16.k_major), or mma.dy_t), K tiles of 32, `stages` stages, min_blocks blocks an SM. Its name is its
    shape's and "r"."""

    def __post_init__(self):
        super().__post_init__()
        assert self.precision == "tf32" and self.bk == 32 and self.bm in (64, 128, 256) and self.bn % 64 == 0, self
        assert self.smem_bytes * self.min_blocks <= 228 * 1024, self

    @property
    def name(self) -> str:
        return f"w{self.bm}x{self.bn}s{self.stages}" + (f"b{self.min_blocks}" if self.min_blocks > 1 else "") + "r"

    @property
    def threads(self) -> int:
        return 128 * (self.bn // 64)

    @property
    def smem_bytes(self) -> int:
        """`stages` stages of dy_t's tile (bm rows of 32 float32) and x's (32 rows of bn + 8 float32), and 1024 bytes to
        align them."""
        return self.stages * (self.bm + self.bn + 8) * 32 * 4 + 1024

    def instantiation(self, op: str) -> str:
        """mma.cu's line that defines conv_kernel(op) (the filter gradient only)."""
        assert op == "filter", (self, op)
        return f"HN_CONV32FR({self.conv_kernel(op)}, {self.bn // 64}, {self.bm}, {self.stages}, {self.min_blocks})"


def fr_tile(bm: int, bn: int, stages: int, min_blocks: int = 1) -> FrTile:
    """An fr tile of bm output channels x bn columns (r, s, c)."""
    return FrTile(bm, bn, 32, 64, 64, stages, min_blocks, wgmma=True, precision="tf32")


# At tf32 (float32 copies rounded to tf32): the forward, data gradient and pooled forward on wgmma (sm_90a only); the
# filter gradient on mma.sync (TILES32) and on wgmma with x's fragments in registers (the "r" tiles: tf32 wgmma reads
# operands from shared memory K-major only, and both of the filter gradient's are stored along K, so x comes from
# registers and dy from a K-major copy): 128 x 128 on two blocks an SM for 128 output channels, 256 x 128 for 256.
TILES32W = {"fwd": tuple(wgmma_tile(*a, precision="tf32") for a in ((128, 256, 4), (128, 128, 4), (64, 256, 4, 128),
                                                                    (128, 128, 3, None, 2))),
            "filter": (fr_tile(128, 128, 3, 2), fr_tile(256, 128, 4))}
TILES32W["data"] = TILES32W["pool"] = TILES32W["fwd"]
# The first two are the (large, small) pair chosen between by size; further ones are measured candidates only:
# warp tiles of 64 x 64 read 32 scalar fragments per 32 mma.sync (64 x 32: 24 per 16).
TILES32 = {"filter": (Tc16Tile(128, 128, 32, 64, 32, 3, precision="tf32"),
                      Tc16Tile(64, 64, 32, 32, 32, 4, precision="tf32"),
                      Tc16Tile(128, 256, 32, 64, 64, 3, precision="tf32"),
                      Tc16Tile(256, 128, 32, 64, 64, 3, precision="tf32"),
                      Tc16Tile(128, 128, 32, 64, 64, 4, precision="tf32"))}
# fp32 on split copies: both parts of both tiles in each stage, so half the stages (or tiles) of tf32's in the same
# shared memory, and warp tiles of 64 x 32 (the lo fragments' registers on top).
# With 3 stages the copies run one tile ahead of the products (the buffer of the pending wgmma group is not refilled),
# hence also the same tiles waiting for every group at the end of a K tile ("i0"), the copies two tiles ahead.
TILES32X3W = {"fwd": tuple(wgmma_tile(bm, 128, st, precision="fp32", inflight=i) for bm, st in ((128, 3), (64, 4))
                           for i in (1, 0))}
TILES32X3W["data"] = TILES32X3W["pool"] = TILES32X3W["fwd"]
TILES32X3 = {"filter": (Tc16Tile(128, 128, 32, 64, 32, 3, precision="fp32"),
                        Tc16Tile(64, 64, 32, 32, 32, 4, precision="fp32"))}


@dataclass(frozen=True)
class TmaTile(Tc16Tile):
    """A bf16 wgmma tile fed by the Tensor Memory Accelerator (mma.cu HN_CONV16T): its (bm / 64) x (bn / wn) consumer
    warpgroups only multiply and write the epilogue, one more warp issues the TMA copies, and shared memory holds 2 x
    STAGES mbarriers before the stages. Its name is its cp.async twin's (wgmma_tile) and "t". Runs where the
    gathered channels (C of the forwards and the filter gradient, O of the data gradient) are a multiple of 64
    (tma_fits): one im2col box is one tap's 64 channels; the pooled forward also where tma_pool_fits. A persistent
    one ("tp"; the forwards and the data gradient) runs at most min_blocks blocks an SM, each taking tiles in turn,
    its producer loading the next tile while the consumers write the last one's epilogue from a tile of its own after
    the stages (staged_tile_bytes)."""

    persistent: bool = False

    def __post_init__(self):
        super().__post_init__()
        assert self.wgmma and self.precision == "bf16" and self.bn <= 256 and self.wn % 64 == 0, self

    @property
    def name(self) -> str:
        return super().name + "t" + ("p" if self.persistent else "")

    @property
    def threads(self) -> int:
        return super().threads + 32

    @property
    def staged_tile_bytes(self) -> int:
        """A persistent tile's epilogue tile after its stages (mma.cu hn_convt_fwd): bf16 bm x (bn + 8) for the
        forward and data gradient (hn_conv_staged_epilogue), two float32 bm x (bn / 4 + 4) for the pooled forward
        (hn_convt_pool_staged), whichever is larger."""
        return max(self.bm * (self.bn + 8) * 2, 8 * self.bm * (self.bn // 4 + 4)) if self.persistent else 0

    @property
    def smem_bytes(self) -> int:
        return super().smem_bytes + 16 * self.stages + self.staged_tile_bytes

    def instantiation(self, op: str) -> str:
        """mma.cu's line that defines conv_kernel(op)."""
        assert op in TMA_OPS and not (self.persistent and op == "filter"), (self, op)
        return (f"HN_CONV16T({self.conv_kernel(op)}, {CONV16_OPS[op]}, {self.bm // 64}, {self.bn // self.wn}, "
                f"{self.wn}, {self.stages}, {self.min_blocks}, {int(self.persistent)})")


def tma_tile(bm: int, bn: int, stages: int, min_blocks: int = 1, persistent: bool = False) -> TmaTile:
    """A TMA-fed bf16 tile of (bm / 64) warpgroups of 64 x bn, K tiles of 64, min_blocks blocks an SM; persistent:
    at most min_blocks blocks an SM, each looping over tiles."""
    return TmaTile(bm, bn, 64, 64, bn, stages, min_blocks, wgmma=True, persistent=persistent)


TMA_OPS = ("fwd", "data", "filter", "pool")


def tma_fits(op: str, gathered_channels: int) -> bool:
    """Whether op's TMA tiles run on a convolution whose gathered tensor (x for the forward, the pooled forward and
    the filter gradient, dy for the data gradient) has that many channels: whole im2col boxes of 64. The pooled
    forward also needs tma_pool_fits."""
    return op in TMA_OPS and gathered_channels % 64 == 0


def tma_pool_fits(tile: TmaTile, p: int, q: int) -> bool:
    """Whether the TMA tile's pooled forward (its columns the convolution's p x q output pixels, in rows) runs: even p
    and q, q of 8, 16 or 32, and a warpgroup's columns whole pairs of rows (mma.cu hn_convt_pool_epilogue)."""
    return p % 2 == 0 and q in (8, 16, 32) and tile.wn % (2 * q) == 0


# The TMA-fed tiles (mma.plan_conv16 and the others take them by name or as tiles; conv.py measures them at bf16
# where tma_fits: benchmarks/kernels/NOTES.md, "The bf16 convolutions fed by TMA" and the sections after it). The
# two-blocks-an-SM ones are there so that one block's epilogue can overlap the other's K loop; the persistent ones
# so that a block's epilogue overlaps its own next tile's loads.
TILES16T = {"fwd": (tma_tile(128, 256, 4), tma_tile(128, 128, 6), tma_tile(64, 256, 5), tma_tile(128, 128, 3, 2),
                    tma_tile(64, 128, 4, 2), tma_tile(128, 256, 3, persistent=True)),
            "filter": (tma_tile(128, 256, 4), tma_tile(128, 128, 6), tma_tile(128, 128, 3, 2))}
TILES16T["data"] = TILES16T["pool"] = TILES16T["fwd"]      # (the forward's kernel body)


def instantiations(tiles: Iterable[TcTile], conv: Iterable[TcTile] = (),
                   conv16: Iterable[dict] = (TILES16, TILES16W, TILES32W, TILES32, TILES32X3W, TILES32X3,
                                             TILES16T)) -> str:
    """mma.cu's HN_GEMM lines, each tile in each operand order, its HN_CONV lines, each `conv` tile for each
    convolution op, and its channels-last lines (HN_CONV16, HN_CONV16W, HN_CONV32W, HN_CONV32F, HN_CONV16T), each tile
    of each op of each `conv16` table."""
    lines = []
    for t in tiles:
        for layout in LAYOUTS:
            ta, tb = (str(c == "t").lower() for c in layout)
            lines.append(f"HN_GEMM({t.kernel(layout)}, {t.body}, {ta}, {tb}, {t.bm}, {t.bn}, {t.bk}, {t.wm}, {t.wn}, "
                         f"{t.stages}, {t.min_blocks})")
    for t in conv:
        for op, mode in CONV_OPS.items():
            lines.append(f"HN_CONV({t.conv_kernel(op)}, {CONV_VARIANTS[(t.precision, t.variant)]}, {mode}, {t.bm}, "
                         f"{t.bn}, {t.bk}, {t.wm}, {t.wn}, {t.stages}, {t.min_blocks})")
    for table in conv16:
        for op, ts in table.items():
            lines.extend(t.instantiation(op) for t in ts)
    return "\n".join(lines) + "\n"
