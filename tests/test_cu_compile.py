"""Every CUDA source of the cuda backend compiles with nvcc for sm_80 and sm_90, with no register spills.

Runs where nvcc is installed (CI without the CUDA toolkit skips it); no GPU needed. The compiles run in parallel.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "src" / "hetnet" / "backends" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")


def _compile(src: Path, arch: str, out_dir: Path) -> tuple[int, str]:
    cubin = out_dir / f"{src.stem}_{arch}.cubin"
    cmd = ["nvcc", "-cubin", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", "-o", str(cubin), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    out = tmp_path_factory.mktemp("cubin")
    jobs = [(s, a) for s in SOURCES for a in ARCHS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(lambda j: _compile(j[0], j[1], out), jobs))
    return {(s.name, a): r for (s, a), r in zip(jobs, done)}


def test_sources_found():
    assert {s.stem for s in SOURCES} >= {"conv", "pool", "norm", "elementwise", "loss", "optim"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", [s.name for s in SOURCES])
def test_compiles_without_spills(results, src, arch):
    rc, log = results[(src, arch)]
    assert rc == 0, f"nvcc failed for {src} ({arch}):\n{log}"
    spills = [line for line in log.splitlines()
              if re.search(r"[1-9]\d* bytes (spill stores|spill loads|stack frame)", line)]
    assert not spills, f"{src} ({arch}) spills registers:\n" + "\n".join(spills)
    assert "warning" not in log.lower(), f"{src} ({arch}) compiles with warnings:\n{log}"


def test_tile_tables_match_the_kernels():
    """conv.py's (BM, BN, threads) per tile configuration must be what conv.cu instantiates: a launch with another
    block size would leave tile elements unloaded or computed twice (no GPU needed to check the tables)."""
    from hetnet.backends.cuda import conv as C

    text = (CUDA_DIR / "conv.cu").read_text()
    for macro, table in (("HN_FWD", C.FWD_CFGS), ("HN_BWD_DATA", C.DATA_CFGS), ("HN_BWD_FILTER", C.FILTER_CFGS)):
        made = {m[0]: (*map(int, m[1:5]), m[5] == "true", int(m[6]), m[7]) for m in
                re.findall(rf"^{macro}\((\w+), (\d+), (\d+), (\d+), (\d+), \d+, (true|false), (\d+)(?:, \((\d+))?",
                           text, re.M)}
        assert set(made) == set(table), f"{macro}: kernels {sorted(made)} vs table {sorted(table)}"
        for name, (bm, bn, tm, tn, ci, ks, bound) in made.items():
            threads = (bm // tm) * (bn // tn) * ks          # KS slices of the tile's threads
            assert table[name] == (bm, bn, threads), f"{macro}({name})"
            assert not bound or int(bound) == threads, f"{macro}({name}): __launch_bounds__ {bound}"
            flags = re.match(r"\d+x\d+([a-z]*)", name).group(1)
            assert ("c" in flags) == ci and ("s" in flags) == (ks > 1), name
            assert C._fits(name, "fwd", C.Geometry(1, 3, 4, 4, 16, 3, 3, 1, 1)) == (not ci), name   # C % BK != 0
