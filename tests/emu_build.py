"""Build CUDA text as C++ against the CPU emulator (tests/cuda_emu/cuda_emu.h, forced in front with -include) into a
shared library the tests call through ctypes; skips the test without g++."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"


def build_emulated(folder: Path, name: str, text: str, *extra_sources: Path) -> ctypes.CDLL:
    """lib<name>.so in folder from `text` (and extra C++ sources), compiled with -DHN_EMULATE and warnings as errors."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    src, lib = folder / f"{name}.cc", folder / f"lib{name}.so"
    src.write_text(text)
    cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Werror",
           "-include", str(EMU_DIR / "cuda_emu.h"), "-DHN_EMULATE", str(src), *map(str, extra_sources), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ctypes.CDLL(str(lib))
