"""Every CUDA source of the cuda backend compiles with nvcc for sm_80 and sm_90, with no register spills, as do the
kernel sandbox's convolution variants and warp-specialised tiles; and the convolution tile table (conv_tiles.py), the
one source of the tile kernels' entry points and of the launcher's tables, is consistent with conv.cu.

The compiles run where nvcc is installed (CI without the CUDA toolkit skips them), in parallel; no GPU needed; a
source whose text, included files, flags and nvcc are those of its last compile takes that compile's output from
pytest's cache (a fresh clone has none). The table checks always run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from halo_cases import sandbox

from hetnet.backends.cuda import conv as C
from hetnet.backends.cuda import conv_tiles as T
from hetnet.backends.cuda import kernels, mma_tiles

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "src" / "hetnet" / "backends" / "cuda"
SOURCES = sorted(s.stem for s in CUDA_DIR.glob("*.cu"))
SANDBOX = "conv_variants"          # benchmarks/kernels: the tiles that do not ship, numbered
NHWC_SANDBOX = "tc_conv_nhwc"      # benchmarks/kernels: the channels-last tensor-core forward (includes mma.cu)
WS_SANDBOX = "conv16_ws"           # benchmarks/kernels: the warp-specialised bf16 wgmma tiles (includes mma.cu)
POOL_SANDBOX = "pool_grad_px"      # benchmarks/kernels: the pooling gradient by pixels of the input (includes conv.cu)
HALO_SANDBOX = "conv16_halo"       # benchmarks/kernels: the bf16 wgmma tiles reading a halo (includes mma.cu)
MC_SANDBOX = "conv16_mc"           # benchmarks/kernels: the filter gradient in clusters of two (sm_90 and later only)
FX_SANDBOX = "conv32_fx"           # benchmarks/kernels: the tf32 filter gradient on wgmma through a transposing stage
FV_SANDBOX = "conv32_fv"           # benchmarks/kernels: the tf32 filter gradient on mma.sync from row tables
SANDBOXES = (SANDBOX, NHWC_SANDBOX, WS_SANDBOX, POOL_SANDBOX, HALO_SANDBOX, FX_SANDBOX, FV_SANDBOX)
ARCHS = ("sm_80", "sm_90")
WGMMA = ("mma", WS_SANDBOX, HALO_SANDBOX, FX_SANDBOX)   # also built for sm_90a (kernels.compile_module): the wgmma code
CLUSTER_JOBS = ((MC_SANDBOX, "sm_90"), (MC_SANDBOX, "sm_90a"))   # (clusters: no sm_80 build)


def _runner(name: str = "run_conv_variants"):
    """benchmarks/kernels/<name>.py as a module (run_conv_variants, conv16_ws and conv16_halo import no GPU library
    until run)."""
    return sandbox(name)


def _text(name: str) -> str:
    """What is compiled: a source as the backend compiles it (conv with its generated entry points), the sandbox's
    variants (its runner compiles them beside the shipped tiles, which conv's compile covers), the warp-specialised
    and halo tiles with their entry points (conv16_ws.source_text, conv16_halo.source_text), or the channels-last and pooling sandboxes as their files
    stand (they include mma.cu or conv.cu)."""
    if name == SANDBOX:
        run = _runner()
        return run.sandbox_text(run.VARIANTS)
    if name in (WS_SANDBOX, HALO_SANDBOX, MC_SANDBOX, FX_SANDBOX, FV_SANDBOX):
        return _runner(name).source_text()
    if name in (NHWC_SANDBOX, POOL_SANDBOX):
        return (ROOT / "benchmarks" / "kernels" / f"{name}.cu").read_text()
    return kernels.cu_text(name)


def _included(text: str, seen: dict[str, str] | None = None) -> dict[str, str]:
    """Every file that text's quoted #includes read, recursively, as nvcc -I CUDA_DIR finds them: {name: text}."""
    seen = {} if seen is None else seen
    for name in re.findall(r'^\s*#include\s+"([^"]+)"', text, re.MULTILINE):
        if name not in seen and (CUDA_DIR / name).is_file():
            seen[name] = (CUDA_DIR / name).read_text()
            _included(seen[name], seen)
    return seen


def _compile(name: str, arch: str, out_dir: Path, nvcc_version: str = "", cache=None) -> tuple[int, str]:
    """(nvcc's exit status, its output) for one source at one arch. cache (pytest's, where the cache provider is on):
    the result of the last compile of the same text, the same included files and flags with the same nvcc, which
    gives the same output; any change to one of them compiles again."""
    text = _text(name)
    src = out_dir / f"{name}_{arch}.cu"
    flags = ["-cubin", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v"]
    key = hashlib.sha256(json.dumps([nvcc_version, flags, text, sorted(_included(text).items())]).encode()).hexdigest()
    slot = f"hetnet/nvcc/{name}_{arch}"
    if cache is not None:
        hit = cache.get(slot, None)
        if isinstance(hit, dict) and hit.get("key") == key:
            return hit["rc"], hit["log"]
    src.write_text(text)
    cmd = ["nvcc", *flags, "-I", str(CUDA_DIR), "-o", str(src.with_suffix(".cubin")), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    rc, log = proc.returncode, proc.stdout + proc.stderr
    if cache is not None:
        cache.set(slot, {"key": key, "rc": rc, "log": log})
    return rc, log


@pytest.fixture(scope="module")
def results(tmp_path_factory, pytestconfig):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    out = tmp_path_factory.mktemp("cubin")
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=False).stdout
    cache = getattr(pytestconfig, "cache", None)       # None under -p no:cacheprovider
    jobs = [(s, a) for s in [*SOURCES, *SANDBOXES] for a in ARCHS] + [(s, "sm_90a") for s in WGMMA] + [*CLUSTER_JOBS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(lambda j: _compile(j[0], j[1], out, version, cache), jobs))
    return dict(zip(jobs, done))


def test_compile_cache_keys_read_the_included_files():
    """A cached compile is keyed by every file its text includes, through the includes of those: a change to
    common.cuh compiles norm.cu again, and to conv.cu the pooling sandbox that includes it."""
    assert set(_included(kernels.cu_text("norm"))) == {"common.cuh"}
    assert set(_included(_text(POOL_SANDBOX))) == {"conv.cu", "common.cuh"}
    assert _included(kernels.cu_text("mma")) == {}


def test_sources_found():
    assert set(SOURCES) >= {"conv", "pool", "norm", "elementwise", "loss", "optim", "mma"}
    assert set(SOURCES) == set(kernels.SOURCES)


def test_compiled_gemm_kernels_are_the_table(results):
    """mma.cu compiles to one entry point per tensor-core tile and operand order of mma_tiles.TILES and one per
    convolution op and tile of CONV_CHOICE (at sm_80, sm_90 and sm_90a), each within an SM's registers for its block
    and with the dynamic shared memory the launcher gives it under an H200's 227 KB (tests/test_mma_emulated.py
    checks the kernels stay inside it)."""
    threads = {t.kernel(layout): t.threads for t in mma_tiles.TILES for layout in mma_tiles.LAYOUTS}
    threads.update({t.conv_kernel(op): t.threads for t in mma_tiles.conv_tiles() for op in mma_tiles.CONV_OPS})
    assert len(mma_tiles.conv_tiles()) == 4
    for arch in (*ARCHS, "sm_90a"):          # sm_90a: the wgmma kernels' own registers
        log = results[("mma", arch)][1]
        found = dict(re.findall(r"Compiling entry function '(hn_(?:gemm|conv)_\w+)' for '\w+'\s+.*?Used (\d+) "
                                r"registers", log, re.DOTALL))
        assert set(found) == set(threads), arch
        for name, regs in found.items():
            assert int(regs) * threads[name] <= 65536, f"{name} ({arch}): {regs} registers x {threads[name]} threads"
    assert all(t.smem_bytes <= 227 * 1024 for t in mma_tiles.TILES)


@pytest.mark.parametrize(("src", "arch"), [(s, a) for s in [*SOURCES, *SANDBOXES] for a in ARCHS]
                         + [(s, "sm_90a") for s in WGMMA] + [*CLUSTER_JOBS])
def test_compiles_without_spills(results, src, arch):
    """No spills, no warnings; at sm_90a, where the wgmma code is compiled rather than trapped, no wgmma that ptxas
    serialises (C7515: other instructions writing a wgmma's accumulators inside its pipeline stage)."""
    rc, log = results[(src, arch)]
    assert rc == 0, f"nvcc failed for {src} ({arch}):\n{log}"
    spills = [line for line in log.splitlines()
              if re.search(r"[1-9]\d* bytes (spill stores|spill loads|stack frame)", line)]
    assert not spills, f"{src} ({arch}) spills registers:\n" + "\n".join(spills)
    assert "warning" not in log.lower(), f"{src} ({arch}) compiles with warnings:\n{log}"
    serialised = [line for line in log.splitlines() if "C7515" in line]
    assert not serialised, f"{src} ({arch}) serialises wgmma:\n" + "\n".join(serialised)


@pytest.mark.parametrize("src,numbered", [("conv", False), (SANDBOX, True)])
def test_compiled_tile_kernels_are_the_tables(results, src, numbered):
    """The compiled conv module has an entry point for each shipped tile and no other tile kernel (the launcher
    finds every kernel it may choose); the sandbox's one for each variant."""
    tiles = T.TILES if src == "conv" else _runner().VARIANTS
    for arch in ARCHS:
        entries = set(re.findall(r"Compiling entry function '(conv_(?:fwd|bwd_data|bwd_filter)_\w+)'",
                                 results[(src, arch)][1]))
        assert entries == {t.kernel(numbered) for t in tiles}, f"{src} ({arch})"


# --- the tile table (no compiler needed) ---------------------------------------------------------------------------


def _every_tile():
    return _runner().all_tiles()


def test_batch_norm_launch_constants_are_norm_cu_s():
    """norm.py's grids assume norm.cu's blocks an SM (the bound its per-channel kernels are compiled to) and tiles a
    block of its channels-last kernels."""
    from hetnet.backends.cuda import norm
    text = (CUDA_DIR / "norm.cu").read_text()
    assert re.search(r"^#define HN_BN_BLOCKS (\d+)$", text, re.M).group(1) == str(norm.BN_BLOCKS)
    assert re.search(r"^#define HN_NHWC16_TILES (\d+)\b", text, re.M).group(1) == str(norm.NHWC16_TILES)


def test_batch_norm_sums_copies_are_mma_cu_s():
    """mma.zeroed_sums allocates the copies that mma.cu's HN_SUMS_COPIES has the convolutions add into."""
    from hetnet.backends.cuda import mma
    text = (CUDA_DIR / "mma.cu").read_text()
    assert re.search(r"^#define HN_SUMS_COPIES (\d+)$", text, re.M).group(1) == str(mma.SUMS_COPIES)


def test_the_table_is_the_only_source_of_tile_kernels():
    """conv.cu instantiates no tile itself, its macros take the arguments in the order `instantiations` writes them,
    and its BK is the table's: the tile kernels compiled are exactly the generated lines."""
    text = (CUDA_DIR / "conv.cu").read_text()
    assert not re.findall(r"^\s*HN_(?:FWD|BWD_DATA|BWD_FILTER)\(", text, re.MULTILINE), "a hand-written tile in conv.cu"
    for macro, _ in T.OPS.values():
        assert f"#define {macro}(name, BM_, BN_, TM_, TN_, ST_, CI_, KS_, BOUNDS_)" in text, macro
    assert re.search(r"^#define BK (\d+)$", text, re.MULTILINE).group(1) == str(T.BK) == str(C.BK)
    generated = kernels.cu_text("conv")[len(text):].strip().splitlines()
    assert generated == T.instantiations(T.TILES).strip().splitlines()
    assert len(generated) == len(T.TILES)


class _HostOnlyBackend:
    """What the implicit launchers ask of a backend before the launch itself (gather tables, SM count)."""

    xp, sms, device_id = np, 132, 0

    def __init__(self):
        self._cache = {}

    def persistent(self):
        return contextlib.nullcontext()


# HN_FWD(name, BM, BN, TM, TN, STAGES, CI, KS, (threads[, blocks per SM])): BM, BN, TM, TN, KS, threads
INSTANCE = r"HN_\w+\(\w+, (\d+), (\d+), (\d+), (\d+), [23], (?:true|false), (\d+), \((\d+)(?:, \d+)?\)\)"


def test_launchers_use_the_tables():
    """conv.py's tables are the shipped tiles, and each launch has the block the kernel was compiled for ((BM/TM) *
    (BN/TN) * KS threads, its __launch_bounds__) and a grid that covers the output in BM x BN tiles: with another
    block size tile elements would be left unloaded or computed twice. (The launch is recorded, not run.)"""
    be, g = _HostOnlyBackend(), C.Geometry(3, 32, 9, 7, 48, 3, 3, 1, 1)
    launches = []

    def kern(grid, block, args):
        launches.append((grid, block))

    sizes = {"fwd": (g.npq, g.k), "data": (g.n * g.h * g.w, g.c), "filter": (g.k, g.crs)}
    for op, table in (("fwd", C.FWD_CFGS), ("data", C.DATA_CFGS), ("filter", C.FILTER_CFGS)):
        assert list(table.items()) == [(t.name, t) for t in T.TILES if t.op == op]
        assert any(not t.ci for t in table.values()), f"{op}: no tile for channel counts the 'c' tiles cannot take"
        for t in table.values():
            launches.clear()
            if op == "fwd":
                C.fwd_implicit(be, t, kern, 1, g, None, None, None, None, 0)
            elif op == "data":
                C.data_implicit(be, t, kern, 1, g, None, None, None, None)
            else:
                C.filter_implicit(be, t, kern, g, None, None, None, None)
            (grid, block), = launches
            m, n = sizes[op]
            assert (grid[0] - 1) * t.bm < m <= grid[0] * t.bm and (grid[1] - 1) * t.bn < n <= grid[1] * t.bn, t
            made = re.fullmatch(INSTANCE, T.instantiations([t]).strip())
            bm, bn, tm, tn, ks, bound = map(int, made.groups())          # what the kernel is compiled for
            assert block == (bound,) == ((bm // tm) * (bn // tn) * ks,), t


def test_tile_numbers_and_names():
    """Per op, the shipped tiles and the sandbox's variants are numbered 1..n without gaps or repeats, their names
    (and so their kernels) are distinct, and the letters of a name say what the tile is."""
    tiles = _every_tile()
    hn_vec = re.search(r"constexpr bool hn_vec\(int bm, int bn, int tm, int tn\) \{\s*return (.*?);",
                       (CUDA_DIR / "conv.cu").read_text(), re.DOTALL).group(1)
    as_python = hn_vec.replace("||", " or ").replace("&&", " and ").replace("/", "//")
    for op in T.OPS:
        mine = [t for t in tiles if t.op == op]
        assert sorted(t.number for t in mine) == list(range(1, len(mine) + 1)), op
        assert len({t.name for t in mine}) == len(mine), op
    assert not set(T.TILES) & set(_runner().VARIANTS)
    for t in tiles:
        flags = re.fullmatch(r"(\d+)x(\d+)(v?)(a?)(c?)(?:s(\d))?", t.name)
        assert flags and (int(flags[1]), int(flags[2])) == (t.bm, t.bn), t
        assert bool(flags[3]) == t.vec == eval(as_python, {}, {"bm": t.bm, "bn": t.bn, "tm": t.tm, "tn": t.tn}), t
        assert bool(flags[4]) == (t.stages == 3) and bool(flags[5]) == t.ci and int(flags[6] or 1) == t.ks, t
        assert t.fits(3, 5) == (not t.ci) and t.fits(128, 128), t      # 3 / 5 channels: whole tiles of none


def test_every_measured_winner_ships():
    """Every tile that won a row of the committed conv_algos table (the fastest candidate per op and layer shape on
    that card) is in the shipped table."""
    shipped = {(t.op, t.name) for t in T.TILES}
    files = sorted((ROOT / "benchmarks" / "results").glob("*/conv_algos.json"))
    assert files, "no committed conv_algos.json"
    for f in files:
        for row in json.loads(f.read_text())["rows"]:
            tile = row["choice"].split("/")[0]
            assert tile == "im2col" or (row["op"], tile) in shipped, f"{f}: {row['layer']} n={row['batch_size']}"


def test_variant_runner_without_a_gpu(tmp_path, capsys):
    """The sandbox's runner imports and writes its CUDA text without a GPU; a selection of no tile is a one-line
    error with status 2."""
    run = _runner()
    assert run.main(["--ops", "filter", "--only", "4", "--emit", str(tmp_path / "v.cu")]) == 0
    assert re.findall(r"^HN_\w+\((\w+),", (tmp_path / "v.cu").read_text(), re.MULTILINE) == ["v4_16x32"]
    assert run.main(["--only", "99", "--emit", str(tmp_path / "none.cu")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "none.cu").exists()
