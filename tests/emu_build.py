"""Build CUDA text as C++ against the CPU emulator (tests/cuda_emu/cuda_emu.h, forced in front with -include) into a
shared library the tests call through ctypes; skips the test without g++."""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hetnet.backends.cuda.kernels import NULL

EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"


def build_emulated(folder: Path, name: str, text: str, *extra_sources: Path, launchers_of: str | None = None
                   ) -> ctypes.CDLL:
    """lib<name>.so in folder from `text` (and extra C++ sources), compiled with -DHN_EMULATE and warnings as errors.
    launchers_of: a part of text whose extern "C" kernels also get a launcher each (launchers), for EmulatedKernel;
    the library's `entries` then lists them."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    entries = entry_points(launchers_of) if launchers_of is not None else {}
    src, lib = folder / f"{name}.cc", folder / f"lib{name}.so"
    src.write_text(text + ("\n" + launchers(entries) if entries else ""))
    cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Werror",
           "-include", str(EMU_DIR / "cuda_emu.h"), "-DHN_EMULATE", str(src), *map(str, extra_sources), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = ctypes.CDLL(str(lib))
    out.entries = entries
    return out


def entry_points(text: str) -> dict:
    """{kernel name: [parameter type, ...]} of every extern "C" kernel of a CUDA text, its macros expanded (g++ -E)."""
    expanded = subprocess.run(["g++", "-E", "-P", "-x", "c++", "-"], input=text, capture_output=True, text=True,
                              check=True, timeout=120).stdout
    found = {}
    for m in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)\s*\{',
                         expanded):
        params = [" ".join(p.replace("__restrict__", "").split()[:-1]) for p in m.group(2).split(",")]
        found[m.group(1)] = [p.replace(" *", "*") for p in params]
    return found


def launchers(entries: dict) -> str:
    """A C entry point emk_<name>(grid, block, dynamic shared memory, args, ..., ranges, n) per kernel: args[i] is the
    pointer argument itself, or points to the scalar one; ranges holds n (address, bytes, writable) triples, the
    launch's buffers that the emulator's checked global accesses (hn_ldg4, the TMA copies) must stay within."""
    out = []
    for name, types in entries.items():
        args = ", ".join(f"static_cast<{t}>(a[{i}])" if t.endswith("*") else f"*static_cast<{t}*>(a[{i}])"
                         for i, t in enumerate(types))
        out.append(f"""extern "C" int emk_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, int smem,
                          void** a, unsigned seed, char* err, int len, const long long* ranges, int n) {{
    emu::S().ranges.clear();
    for (int i = 0; i < n; ++i)
        emu::S().ranges.push_back({{reinterpret_cast<const unsigned char*>(ranges[3 * i]),
                                   static_cast<size_t>(ranges[3 * i + 1]), ranges[3 * i + 2] != 0}});
    std::string msg = emu::launch({{gx, gy, gz}}, {{bx, 1, 1}}, smem, [=] {{ {name}({args}); }}, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}}""")
    return "\n".join(out)


# a parameter's C type -> the NumPy dtypes an array argument may have (bf16 pairs are written through unsigned*;
# void*: any)
POINTEE = {"float": (np.float32,), "double": (np.float64,), "unsigned short": (np.uint16,),
           "unsigned": (np.uint32, np.uint16), "unsigned char": (np.uint8,), "int": (np.int32,),
           "long long": (np.int64,), "unsigned long long": (np.uint64, np.int64)}
SCALARS = {"int": (np.int32, ctypes.c_int), "float": (np.float32, ctypes.c_float),
           "long long": (np.int64, ctypes.c_longlong), "unsigned": (np.uint32, ctypes.c_uint)}


class EmulatedKernel:
    """get_kernel's stand-in: launches the emulated kernel `name` with a launcher's (grid, block, args, shared_mem),
    each argument checked against the kernel's parameter (an array of the pointee's dtype or the null pointer, or a NumPy scalar of
    the parameter's type)."""

    def __init__(self, lib, name: str):
        assert name in lib.entries, f"no kernel {name} in the emulated library"
        self.lib, self.name, self.types = lib, name, lib.entries[name]

    def __call__(self, grid, block, args, shared_mem=0):
        assert len(args) == len(self.types), f"{self.name}: {len(args)} arguments for {len(self.types)} parameters"
        ptrs, keep, ranges = (ctypes.c_void_p * len(args))(), [], []
        for i, (a, t) in enumerate(zip(args, self.types)):
            if t.endswith("*"):
                if isinstance(a, np.ndarray):
                    base = t[:-1].replace("const ", "").strip()
                    assert (base == "void" or a.dtype.type in POINTEE[base]) and a.flags.c_contiguous, \
                        f"{self.name} argument {i}: {t}"
                    ptrs[i] = a.ctypes.data
                    ranges += [a.ctypes.data, a.nbytes, int(not t.startswith("const"))]
                else:
                    assert a is NULL, f"{self.name} argument {i}: {t} given {a!r}"
                    ptrs[i] = None
            else:
                dtype, ctype = SCALARS[t]
                assert type(a) is dtype, f"{self.name} argument {i}: {t} given {type(a).__name__}"
                keep.append(ctype(a))
                ptrs[i] = ctypes.addressof(keep[-1])
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        err = ctypes.create_string_buffer(512)
        rc = getattr(self.lib, "emk_" + self.name)(*grid, int(block[0]), int(shared_mem), ptrs, 5, err, 512,
                                                   (ctypes.c_longlong * len(ranges))(*ranges), len(ranges) // 3)
        assert rc == 0, f"{self.name}: {err.value.decode()}"

