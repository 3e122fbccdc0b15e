"""Data-parallel training over MPI on the CPU (`mpirun -n 2 hetnet train`), the CI path of hetnet.parallel: two
ranks at batch B against one process at 2B, rank 0 alone writing the run directory, a rank that dies or hangs
ending the job with one error line, and --resume with a different number of ranks. Skipped without mpirun and
mpi4py (`make setup` installs them where it can: root and apt).

How close is "equal up to floating-point order": the ranks sum their halves of each batch and then each other's
gradients, one process sums the whole batch at once, so results differ by rounding only: relative difference below
PLAIN_RTOL_F64 on the float64 reference backend, below RTOL_F32 on the cpu backend (float32; measured: about 4e-8
after three steps, about 2e-8 after two epochs of the command line run below).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import rel_err
from parallel_cases import (
    ROOT,
    RUN_FILES,
    TRAIN_IMAGES,
    child_env,
    error_lines,
    final_weights,
    hetnet_cmd,
    make_work,
    train_args,
)

from hetnet import serialize

MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None or importlib.util.find_spec("mpi4py") is None,
                                reason="needs mpirun and mpi4py (pip install 'hetnet[mpi]')")

PLAIN_RTOL_F64 = 1e-12
RTOL_F32 = 1e-6
EPOCHS, GLOBAL_BATCH = 2, 64
STEPS_PER_EPOCH = TRAIN_IMAGES // GLOBAL_BATCH


def _mpirun(n: int, args: list[str], cwd: Path, timeout: float = 240, **env) -> tuple:
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = [MPIRUN, "-n", str(n), "--oversubscribe", *root, sys.executable, *args]
    t0 = time.monotonic()
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env=child_env(**env))
    return r, time.monotonic() - t0


def _hetnet(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(hetnet_cmd(*args), check=False, capture_output=True, text=True, timeout=240, cwd=cwd,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    return r


def _train_args(work: Path, batch: int, out: str, epochs: int = EPOCHS, spec: str = "spec.json") -> list[str]:
    return [*train_args(work, batch, out, epochs, spec), "--device", "cpu"]


def test_mpi_pieces_equal_one_process_at_twice_the_batch():
    r, _ = _mpirun(2, [str(ROOT / "tests" / "mpi_checks.py")], ROOT)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for key, value in got.items():
        if key.endswith("_reference"):
            assert value < PLAIN_RTOL_F64, (key, value)
        elif key != "local_bn_cpu":
            assert value < RTOL_F32, (key, value)
    # BatchNorm per rank normalises each half with its own statistics: not the single process's training
    assert got["local_bn_cpu"] > 1e3 * RTOL_F32, got


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("mpi"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(work):
    """One process at batch 64, and two ranks at 32 started in an empty folder (nothing but rank 0's run
    directory may appear there)."""
    _hetnet(_train_args(work, 64, "single"), work)
    two = work / "two-ranks"
    two.mkdir()
    r, _ = _mpirun(2, ["-m", "hetnet", *_train_args(work, 32, "run")], two)
    assert r.returncode == 0, r.stderr
    return work / "single", two / "run", r


def test_two_ranks_train_as_one_process_at_twice_the_batch(runs):
    single, two, _ = runs
    assert rel_err(final_weights(two), final_weights(single)) < RTOL_F32
    a, b = _metrics(two), _metrics(single)
    assert len(a) == len(b) == EPOCHS
    for ra, rb in zip(a, b):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert abs(ra[key] - rb[key]) <= RTOL_F32 * max(1.0, abs(rb[key])), (key, ra, rb)
    config = json.loads((two / "config.json").read_text())
    assert config["recipe"]["batch_size"] == 64 and config["parallel"] == {"world_size": 2, "sync_bn": False}


def test_rank_0_alone_writes_and_speaks(runs):
    _, two, r = runs
    assert sorted(p.name for p in two.parent.iterdir()) == ["run"]
    assert sorted(p.name for p in two.iterdir()) == RUN_FILES
    out = r.stdout.splitlines()
    assert sum(line.startswith("training ") for line in out) == 1, r.stdout
    assert "batch 64 (2 ranks x 32)" in r.stdout
    assert sum(line.startswith(f"epoch {EPOCHS}/{EPOCHS}") for line in out) == 1
    assert sum(line.startswith("done: ") for line in out) == 1
    assert error_lines(r.stderr) == []


def test_sync_bn_from_the_command_line_is_batchnorm_of_the_whole_batch(work):
    _hetnet(_train_args(work, 64, "bn-single", spec="bn.json"), work)
    r, _ = _mpirun(2, ["-m", "hetnet", *_train_args(work, 32, "bn-two", spec="bn.json"), "--sync-bn"], work)
    assert r.returncode == 0, r.stderr
    assert "(2 ranks x 32, synchronised BatchNorm)" in r.stdout
    assert rel_err(final_weights(work / "bn-two"), final_weights(work / "bn-single")) < RTOL_F32
    assert json.loads((work / "bn-two" / "config.json").read_text())["parallel"]["sync_bn"] is True


def test_a_killed_rank_ends_the_job_and_resume_on_one_process_finishes_it(work, runs):
    _, two, _ = runs
    killed = work / "killed"
    killed.mkdir()
    # rank 1 dies during epoch 2 (its progress count: the start's 2 collectives, 8 steps and 3 sums per epoch)
    r, seconds = _mpirun(2, ["-m", "hetnet", *_train_args(work, 32, "run")], killed,
                         HETNET_TEST_FAULT=f"die@1:{2 + STEPS_PER_EPOCH + 3 + 3}")
    assert r.returncode != 0
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "rank 1 " in errors[0] and "died" in errors[0], r.stderr
    assert seconds < 60
    ckpt = serialize.read_checkpoint(killed / "run")            # the last checkpoint stays readable
    assert ckpt.state["epoch"] == 1 and not (killed / "run" / "model.safetensors").exists()
    _hetnet(["train", "--resume", str(killed / "run"), "--no-progress"], work)
    assert rel_err(final_weights(killed / "run"), final_weights(two)) < RTOL_F32


def test_a_one_process_run_resumes_on_two_ranks(work, runs):
    _, two, _ = runs
    _hetnet(_train_args(work, 64, "one-then-two", epochs=1), work)
    r, _ = _mpirun(2, ["-m", "hetnet", "train", "--resume", "one-then-two", "--epochs", str(EPOCHS), "--no-progress"],
                   work)
    assert r.returncode == 0, r.stderr
    assert rel_err(final_weights(work / "one-then-two"), final_weights(two)) < RTOL_F32


def test_a_hung_rank_ends_the_job_within_the_timeout(work):
    hung = work / "hung"
    hung.mkdir()
    r, seconds = _mpirun(2, ["-m", "hetnet", *_train_args(work, 32, "run"), "--dist-timeout", "5"], hung,
                         HETNET_TEST_FAULT="hang@1:6")
    assert r.returncode != 0
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "rank 1 " in errors[0] and "no progress for 5 s" in errors[0], r.stderr
    assert seconds < 60
