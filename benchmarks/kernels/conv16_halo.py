"""The bf16 wgmma convolutions that read their input as a halo, the "h" tiles (conv16_halo.cu; correct on the H200 and
1.2-2.3x slower than the package's tiles there, NOTES.md): their tile table, their CUDA text (mma.cu, conv16_halo.cu
and the tiles' entry points), their plan (mma.py's plan_conv16 / plan_conv16_data / plan_conv16_filter given the
tile, then `plan` for the halo's grid and shared memory) and their launch from a module of their own. Stride 1 only:
the forward, data gradient and pooled forward ("h" tiles, C (the data gradient's O) a multiple of 64 in bf16,
TILES16H; of 32 in tf32 and fp32, TILES32H) and the bf16 filter gradient ("hf" tiles, 3 x 3).

time_cl_tiles.py checks and times them beside the shipped tiles; tests/test_mma_emulated.py runs them on the CPU
emulator.

    >>> import conv16_halo as halo                                     # (with benchmarks/kernels on sys.path)
    >>> [t.name for t in halo.TILES16H["fwd"]]
    ['h128x256s4', 'h64x256s4', 'h128x128s4', 'h128x256s6']
    >>> call = halo.plan(mma.plan_conv16(y, x16, w16, b, 1, 1, 0, halo.TILES16H["fwd"][0]))   # doctest: +SKIP
    >>> halo.launch(be, call)                                                                 # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from hetnet.backends.cuda.mma_tiles import CONV16_OPS, Tc16Tile
from wgmma_sandbox import WgmmaSandbox, with_mma

SOURCE = Path(__file__).resolve().parent / "conv16_halo.cu"
SMEM_LIMIT = 227 * 1024      # an H100 / H200 block's dynamic shared memory


@dataclass(frozen=True)
class HaloTile(Tc16Tile):
    """A bf16 wgmma tile of (bm / 64) x (bn / wn) warpgroups of 64 x wn reading its input as a halo of `rows` rows
    (set by `plan` for a convolution's frame: conv16_halo.cu's hn_halo_rows), in two buffers after the STAGES A
    tiles."""

    rows: int = 0

    def __post_init__(self):
        super().__post_init__()
        assert self.wgmma and self.min_blocks == 1, self

    @property
    def name(self) -> str:
        return "h" + super().name[1:]

    @property
    def smem_bytes(self) -> int:
        pipeline = (self.stages * self.bm * 128 + 2 * 8 * self.rows * 16) * (1 + self.split)
        staging = self.bm * (self.bn + 8) * 4 + self.bn * 8 + self.threads // 32 * 4     # the pooled epilogue's
        return max(pipeline, staging) + 1024

    def instantiation(self, op: str) -> str:
        """conv16_halo.cu's line that defines conv_kernel(op)."""
        shape = f"{CONV16_OPS[op]}, {self.bm // 64}, {self.bn // self.wn}, {self.wn}, {self.stages}"
        if self.precision == "bf16":
            return f"HN_CONV16H({self.conv_kernel(op)}, {shape})"
        return f"HN_CONV32H({self.conv_kernel(op)}, {shape}, {self.split})"


def halo_tile(bm: int, bn: int, stages: int, wn: int = 0, precision: str = "bf16") -> HaloTile:
    return HaloTile(bm, bn, 64 if precision == "bf16" else 32, 64, wn or bn, stages, wgmma=True, precision=precision)


@dataclass(frozen=True)
class HaloFilterTile(Tc16Tile):
    """The filter gradient's halo tile: 64 output x `cb` input channels and every tap of a block, `wgs` warpgroups of
    `tpw` taps each (R S = wgs tpw), K tiles of 64 frame columns, each stage dy's tile and the halo of `rows` rows
    (set by `plan`)."""

    wgs: int = 3
    tpw: int = 3
    cb: int = 64
    rows: int = 0

    def __post_init__(self):
        super().__post_init__()
        assert (self.bm, self.bn, self.wn) == (64, 64, 64) and self.wgmma and self.precision == "bf16", self
        assert self.cb in (8, 16, 32, 64), self

    @property
    def name(self) -> str:
        return f"hf{self.wgs}x{self.tpw}" + (f"c{self.cb}" if self.cb != 64 else "") + f"s{self.stages}"

    @property
    def threads(self) -> int:
        return 128 * self.wgs

    @property
    def taps(self) -> int:
        return self.wgs * self.tpw

    ob = kb = 64                  # output channels and frame columns (a K tile) a block

    @property
    def smem_bytes(self) -> int:
        return self.stages * (64 * 128 + self.cb * self.rows * 2) + 1024

    def instantiation(self, op: str) -> str:
        assert op == "filter", op
        return f"HN_CONV16HF({self.conv_kernel(op)}, {self.wgs}, {self.tpw}, {self.cb}, {self.stages})"


def halo_filter_tile(stages: int, wgs: int = 3, tpw: int = 3, cb: int = 64) -> HaloFilterTile:
    return HaloFilterTile(64, 64, 64, 64, 64, stages, wgmma=True, wgs=wgs, tpw=tpw, cb=cb)


@dataclass(frozen=True)
class HaloSyncFilterTile(Tc16Tile):
    """The tf32 / fp32 filter gradient's halo tile on mma.sync (tf32 wgmma has no MN-major operands): bm output x bn
    input channels and all `taps` taps of a block, warps of wm x wn, K tiles of bk frame columns, halos of up to
    `hrows` rows (`rows`, a frame's, set by `plan`)."""

    taps: int = 9
    hrows: int = 128
    rows: int = 0

    def __post_init__(self):
        super().__post_init__()
        assert not self.wgmma and self.precision in ("tf32", "fp32") and self.bk % 8 == 0, self

    @property
    def name(self) -> str:
        return f"hf{self.bm}x{self.bn}x{self.bk}s{self.stages}"

    @property
    def ob(self) -> int:
        return self.bm

    @property
    def cb(self) -> int:
        return self.bn

    @property
    def kb(self) -> int:
        return self.bk

    @property
    def smem_bytes(self) -> int:
        dy_tile = max(self.bm * (self.bk + 4), self.bk * (self.bm + 8))     # mma.cu's HnOperand<false, bm, bk, 4, 8>
        return self.stages * (dy_tile + self.hrows * (self.bn + 8)) * 4 * (1 + self.split)

    def instantiation(self, op: str) -> str:
        assert op == "filter", op
        return (f"HN_CONV32HF({self.conv_kernel(op)}, {self.wm}, {self.wn}, {self.bm // self.wm}, "
                f"{self.bn // self.wn}, {self.bk}, {self.stages}, {self.hrows}, {self.taps}, {self.split})")


# h128x256s6: the halo of the next channel chunk four K tiles ahead instead of two. (Two warpgroups side by side,
# h64x512s4n256, one weights tile for 512 columns: ptxas serialises its forward's and data gradient's wgmma, C7515.)
TILES16H = {"fwd": (halo_tile(128, 256, 4), halo_tile(64, 256, 4), halo_tile(128, 128, 4), halo_tile(128, 256, 6)),
            # hf1x9c8s4: one warpgroup of all nine taps over 8 channels (the first layer's x, 3 channels padded to 8)
            "filter": (halo_filter_tile(4), halo_filter_tile(6), halo_filter_tile(4, 1, 9, 8))}
TILES16H["data"] = TILES16H["pool"] = TILES16H["fwd"]    # the data gradient (EPI 2), pooled forward (EPI 4)
# tf32 and fp32 (split copies: twice the shared memory a stage and a halo, so narrower tiles), forward, data gradient
# and pooled forward (tf32 wgmma has no MN-major operands: no filter gradient)
TILES32H = {"fwd": (halo_tile(128, 256, 4, precision="tf32"), halo_tile(128, 128, 4, precision="tf32"),
                    halo_tile(128, 128, 3, precision="fp32"), halo_tile(64, 128, 4, precision="fp32"))}
TILES32H["data"] = TILES32H["pool"] = TILES32H["fwd"]
# their filter gradients on mma.sync: 64 x 32 channels and 9 taps a block, eight warps of 16 x 16
TILES32H["filter"] = tuple(HaloSyncFilterTile(64, 32, 32, 16, 16, stages, precision=p)
                           for p, stages in (("tf32", 4), ("fp32", 3)))
WAVES = 2                                # the filter gradient's K parts: about this many blocks per SM


def instantiations() -> str:
    """The HN_CONV16H / HN_CONV16HF / HN_CONV32H lines of every tile of each op of TILES16H and TILES32H."""
    return "\n".join(t.instantiation(op) for table in (TILES16H, TILES32H) for op, tiles in table.items()
                     for t in tiles) + "\n"


def source_text() -> str:
    """conv16_halo.cu with mma.cu's text in place of its #include (none of the package's entry points) and the h
    tiles' entry points, as nvcc compiles it (with -I the cuda folder); NVRTC gets it with the header inlined."""
    return with_mma(SOURCE, instantiations())


def halo_rows(bn: int, r: int, s: int, wp: int) -> int:
    """conv16_halo.cu's hn_halo_rows(hn_halo_need(...)): the halo's rows rounded up to 1 mod 8."""
    need = bn + (r - 1) * wp + s - 1
    return need + (9 - need % 8) % 8


def plan(call, sms: int = 132):
    """mma.py's ConvCall of an h tile (plan_conv16, plan_conv16_data or plan_conv16_pool; plan_conv16_filter for an
    hf tile) made the halo's: its grid over the frame's n Hp Wp columns (Hp = H + pad, Wp = W + pad; the pooled
    forward's blocks BN - Wp - 1 columns apart; the filter gradient's K split in about WAVES blocks per SM of `sms`)
    and its tile's halo rows; ValueError where the halo kernel does not run it."""
    if call is None:
        return None
    t = call.tile
    c, h, w, r, s, p, q, o, stride, pad = call.geometry
    filt = call.op == "filter"
    if call.op not in TILES16H or not isinstance(t, (HaloFilterTile, HaloSyncFilterTile) if filt else HaloTile):
        raise ValueError(f"conv16_halo: {call.op} on tile {t.name} is not a halo convolution")
    images = (call.k if filt else call.kchunk if call.op == "pool" else call.n) // (p * q)   # (pool: P, Q pooled)
    hp, wp = h + pad, w + pad                                      # conv16_halo.cu's frame
    nv = images * hp * wp
    step = t.bn - wp - 1 if call.op == "pool" else t.bn           # the blocks' first columns, STEP apart
    tile = dataclasses.replace(t, rows=halo_rows(t.kb if filt else t.bn, r, s, wp))
    if filt:
        fits = r * s == t.taps and tile.rows <= getattr(t, "hrows", tile.rows)
    else:
        fits = c % t.bk == 0 and r * s >= t.stages - 1 and step > 0
    if stride != 1 or pad >= min(r, s) or not fits or nv >= 2**31 or tile.smem_bytes > SMEM_LIMIT:
        need = f"R S = {t.taps}, the halo's rows" if filt else f"C a multiple of {t.bk}, R S >= {t.stages - 1}"
        raise ValueError(f"conv16_halo: {t.name} does not run C {c}, {r}x{s}, stride {stride}, pad {pad}, frame "
                         f"{hp}x{wp} (stride 1, pad < R and S, {need}, {tile.smem_bytes} bytes of shared memory at "
                         f"most {SMEM_LIMIT})")
    if not filt:
        return dataclasses.replace(call, tile=tile, grid=(math.ceil(nv / step), math.ceil(call.m / t.bm), 1))
    blocks = math.ceil(c / t.cb) * math.ceil(o / t.ob)
    kchunk = math.ceil(nv / max(1, min(WAVES * sms // blocks, math.ceil(nv / t.kb))) / t.kb) * t.kb
    splits = math.ceil(nv / kchunk)
    return dataclasses.replace(call, tile=tile, grid=(math.ceil(c / t.cb), math.ceil(o / t.ob), splits),
                               splits=splits, kchunk=kchunk)


def fits(call) -> bool:
    """Whether `plan` takes mma.py's call."""
    try:
        plan(call)
    except ValueError:
        return False
    return True


_SANDBOX = WgmmaSandbox("conv16_halo", source_text)
module = _SANDBOX.module          # source_text() compiled once per device for sm_90a
launch = _SANDBOX.launch          # a planned ConvCall of one of these tiles, from that module
