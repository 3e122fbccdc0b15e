"""The implicit-GEMM convolution tiles that do not ship: numbered variants, kept with their measurements so the
history of the tiles can be read and any of them re-measured (run_conv_variants.py checks each against the float64
reference, then times it).

The shipped tiles are src/hetnet/backends/cuda/conv_tiles.py's TILES; numbers count both tables, per op, in the
order the tiles were written (`VARIANTS` fill the gaps of TILES). Each comment gives the variant's best showing on
the H200 (benchmarks/results/NVIDIA-H200: a conv_algos.json row, or a trial of train_step.json's tune_log, same
commit): its time there against the fastest shipped candidate's (a ratio above 1 is a loss everywhere measured).
None wins a conv_algos row; those below 1 win a tune-log trial by less than 10 % or 1 us (NOTES.md: "Which tiles
ship").

    >>> from conv_variants import VARIANTS        # (with benchmarks/kernels on sys.path)
    >>> next(v for v in VARIANTS if v.op == "fwd" and v.number == 1).name
    '64x64'
"""
from __future__ import annotations

from hetnet.backends.cuda.conv_tiles import Tile

VARIANTS = (
    Tile("fwd", 1, 64, 64, 4, 4),                   # 1.13x: [32, 1, 28, 28 -> 32] 7.1 us vs 64x32 6.3
    Tile("fwd", 7, 128, 32, 8, 4),                  # 1.09x: thesis-m4 conv1 n=1024 417.6 us vs 128x32 383.9
    Tile("fwd", 8, 64, 32, 4, 2, stages=3),         # 1.02x: fashion-cnn conv1 n=32 6.4 us vs 64x32 6.3
    Tile("fwd", 9, 128, 32, 4, 4, ci=True),         # 1.03x: [128, 16, 16, 16 -> 32] 17.9 us vs 64x32vcs2 17.5
    Tile("fwd", 10, 64, 32, 4, 2, ci=True),         # 1.02x: dense [32, 256 -> 10] 7.7 us vs 32x32c/8 7.5
    Tile("fwd", 11, 64, 16, 4, 1, ci=True),         # 0.97x: dense [32, 576 -> 128] 10.8 us vs 64x16/9 11.2
    Tile("fwd", 13, 128, 32, 8, 4, ci=True, min_blocks=4),   # 0.96x: [32, 16, 20, 20 -> 32] 11.5 us vs 128x32vac
                                                             # 11.9
    Tile("fwd", 16, 32, 32, 4, 4),                  # 1.15x: [128, 3, 12, 12 -> 16] 7.9 us vs 64x16 6.9
    Tile("fwd", 17, 32, 32, 4, 4, ci=True),         # 0.99x: [1024, 16, 6, 6 -> 32] 22.8 us vs 128x32vac 23.0
    Tile("fwd", 18, 32, 32, 4, 4, stages=3, ci=True),    # 0.95x: dense [32, 128 -> 50] 7.8 us vs 32x32vcs3 8.1
    Tile("fwd", 20, 32, 32, 4, 4, ci=True, ks=2),   # 1.01x: [32, 16, 20, 20 -> 32] 12.0 us vs 128x32vac 11.9
    Tile("fwd", 22, 32, 32, 4, 4, ci=True, ks=4),   # 0.91x: [32, 64, 7, 7 -> 64] 12.2 us vs 32x32vcs3 13.3
    Tile("data", 1, 64, 64, 4, 4, min_blocks=3),    # 1.07x: dense [32, 50 -> 10] 4.4 us vs 64x16 4.1
    Tile("data", 2, 128, 32, 4, 4, min_blocks=2),   # 1.30x: dense [32, 50 -> 10] 5.3 us vs 64x16 4.1
    Tile("data", 3, 128, 16, 4, 2, min_blocks=4),   # 1.14x: dense [32, 50 -> 10] 4.7 us vs 64x16 4.1
    Tile("data", 4, 64, 32, 2, 4),                  # 1.08x: dense [1024, 100 -> 10] 7.3 us vs 64x16 6.8
    Tile("data", 6, 128, 32, 8, 4, min_blocks=3),   # 1.43x: dense [1024, 256 -> 10] 9.9 us vs im2col 6.9
    Tile("data", 7, 128, 32, 4, 4, ci=True, min_blocks=2),   # 1.07x: [128, 32, 10, 10 -> 32] 18.7 us vs 128x32vc
                                                             # 17.5
    Tile("data", 8, 64, 32, 2, 4, ci=True),         # 1.12x: [32, 16, 6, 6 -> 32] 9.7 us vs 32x32vcs4 8.6
    Tile("data", 9, 64, 16, 2, 2, ci=True),         # 1.00x: [32, 16, 20, 20 -> 32] 16.9 us vs 128x32vc 16.9
    Tile("data", 10, 32, 32, 2, 2, ci=True),        # 1.09x: [32, 16, 6, 6 -> 32] 9.4 us vs 32x32vcs4 8.6
    Tile("data", 13, 64, 32, 2, 4, stages=3, ci=True),   # 1.14x: [32, 16, 6, 6 -> 32] 9.8 us vs 32x32vcs4 8.6
    Tile("data", 14, 32, 32, 4, 4, min_blocks=8),   # 0.98x: dense [1024, 256 -> 10] 6.8 us vs im2col 6.9
    Tile("data", 16, 32, 32, 4, 4, stages=3, ci=True),   # 1.06x: [32, 16, 20, 20 -> 32] 17.9 us vs 128x32vc 16.9
    Tile("data", 17, 32, 32, 4, 4, ci=True, ks=2),  # 0.95x: [128, 32, 10, 10 -> 32] 16.6 us vs 128x32vc 17.5
    Tile("filter", 1, 32, 64, 2, 4),                # 1.13x: dense [32, 50 -> 10] 4.9 us vs 32x32vs2 4.3
    Tile("filter", 2, 16, 64, 1, 4),                # 1.10x: dense [32, 50 -> 10] 4.8 us vs 32x32vs2 4.3
    Tile("filter", 3, 64, 64, 4, 4),                # 1.17x: [1024, 64, 7, 7 -> 64] 194.0 us vs 32x32vc/29 165.2
    Tile("filter", 4, 16, 32, 1, 2),                # 0.90x: dense [32, 50 -> 10] 3.9 us vs 32x32vs2 4.3
    Tile("filter", 5, 32, 32, 2, 2),                # 0.95x: dense [32, 50 -> 10] 4.1 us vs 32x32vs2 4.3
    Tile("filter", 7, 32, 32, 4, 4),                # 1.00x: thesis-m1 conv2 n=1024 160.3 us vs 32x64v/352 160.1
    Tile("filter", 8, 64, 64, 4, 4, stages=3),      # 1.14x: dense [32, 50 -> 10] 4.9 us vs 32x32vs2 4.3
    Tile("filter", 9, 32, 32, 2, 2, ci=True),       # 0.96x: dense [32, 256 -> 10] 4.2 us vs 32x32vcs4 4.4
    Tile("filter", 10, 32, 64, 2, 4, ci=True),      # 1.16x: dense [32, 256 -> 10] 5.1 us vs 32x32vcs4 4.4
    Tile("filter", 12, 32, 64, 4, 8, ci=True),      # 0.98x: [1024, 64, 7, 7 -> 64] 161.8 us vs 32x32vc/29 165.2
)
