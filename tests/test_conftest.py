"""The test suite's own machinery in conftest.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_a_lost_cuda_context_stops_the_session(tmp_path):
    """A test failing with a sticky CUDA error stops the run after it, naming itself and the error; a plain failure
    does not."""
    (tmp_path / "test_lost.py").write_text(
        "def test_plain():\n    assert False\n\n"
        "def test_lost():\n    raise RuntimeError('cudaErrorIllegalAddress: an illegal memory access was encountered')\n\n"
        "def test_after():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_lost.py")], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"}, check=False)
    out = proc.stdout + proc.stderr
    assert "2 failed" in out and "passed" not in out, out
    assert "test_lost.py::test_lost lost the CUDA context (cudaErrorIllegalAddress)" in out, out
