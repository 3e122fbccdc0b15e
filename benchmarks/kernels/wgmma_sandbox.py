"""A sandbox's wgmma kernels built into a module of their own and launched from it (conv16_ws.py, conv16_halo.py):
the text compiled once per device for sm_90a (kernels.compile_module), each kernel fetched once, its dynamic
shared-memory limit raised to the largest size it has been launched with (a halo tile's size depends on the frame)."""
from __future__ import annotations

from pathlib import Path

from hetnet.backends.cuda import kernels


def with_mma(source: Path, entries: str) -> str:
    """A sandbox's .cu text with mma.cu's text in place of its `#include "mma.cu"` (so none of the package's entry
    points) and `entries`, its tiles' entry-point lines, after it: what nvcc compiles (with -I the cuda folder);
    NVRTC gets it with the header inlined."""
    mma_cu = (kernels.HERE / "mma.cu").read_text()
    return source.read_text().replace('#include "mma.cu"', mma_cu) + "\n" + entries


class WgmmaSandbox:
    """`source_text()` (CUDA text as nvcc compiles it, the header included by name) as one module per device; `what`
    names the sandbox in its errors."""

    def __init__(self, what: str, source_text):
        self.what, self.source_text = what, source_text
        self._modules: dict[int, object] = {}
        self._kernels: dict[tuple[int, str], list] = {}      # (device, kernel) -> [function, its smem limit]

    def module(self, device_id: int):
        """The module for the device; RuntimeError where an sm_90a build is not to be had (the kernels are wgmma's)."""
        mod = self._modules.get(device_id)
        if mod is None:
            mod = kernels.compile_module(device_id, kernels.inline_header(self.source_text()), sm90a=True)
            if not kernels.built_for_sm90a(mod):
                raise RuntimeError(f"{self.what}: the tiles need wgmma, and this device's build is not for sm_90a")
            self._modules[device_id] = mod
        return mod

    def launch(self, be, call) -> None:
        """Run a planned ConvCall (mma.py's, of one of the sandbox's tiles) on `be`'s device (current stream)."""
        smem = call.tile.smem_bytes
        key = (be.device_id, call.kernel)
        entry = self._kernels.get(key)
        if entry is None:
            entry = self._kernels[key] = [self.module(be.device_id).get_function(call.kernel), 0]
        kern, limit = entry
        if smem > limit:         # a limit only ever raised: a launch with less after one with more still fits
            kern.max_dynamic_shared_size_bytes = entry[1] = smem
        kern(call.grid, call.block, call.args(lambda a: a, kernels.NULL), shared_mem=smem)
