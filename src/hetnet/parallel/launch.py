"""`hetnet train --gpus N`: one process per GPU on this host, started and watched by this one.

The launcher runs the job's watchdog (hetnet.parallel.watchdog.Monitor) on 127.0.0.1 and starts N copies of the
same `hetnet train` command with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
HETNET_LAUNCHER=1 in their environment. Rank 0 keeps this terminal (its epoch lines and progress bar); the others'
standard output is discarded. When a rank fails, dies or hangs, the watchdog prints one `error:` line, and the
launcher stops the other ranks (SIGTERM, then SIGKILL after STOP_GRACE_S) and exits with the job's status. Ctrl-C
reaches every rank (one process group): rank 0 says how to resume, the launcher waits for them and exits 130.

    >>> status = launch(["train", "--model", "cifar-wide", "--dataset", "cifar10"], 8)      # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from .watchdog import DEFAULT_TIMEOUT_S, Monitor, error_line

STOP_GRACE_S = 5.0


def _how(proc: subprocess.Popen) -> str | None:
    """How a rank's process ended (waiting a moment for it to be reaped), or None if it still runs."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)
    rc = proc.returncode
    if rc is None:
        return None
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = "?"
        return f"killed by signal {-rc} ({name})"
    return f"exited with status {rc} without a word"


def _stop(procs: list, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to the ranks still running, SIGKILL to those left after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.kill()
            p.wait()


def launch(argv: list[str], world: int, timeout: float = DEFAULT_TIMEOUT_S, command: list[str] | None = None,
           env: dict | None = None) -> int:
    """Run `python -m hetnet <argv>` (or `command`) as `world` ranks on this host and watch them; returns the job's
    exit status (0, the failing rank's status, or 130 after Ctrl-C). env: the ranks' environment before the
    launcher's variables (default: this process's)."""
    procs: list[subprocess.Popen] = []
    verdict: list = []                  # the watchdog's exit status, once it ended the job
    monitor = Monitor(world, timeout, on_abort=verdict.append, host="127.0.0.1", port=0,
                      describe_death=lambda rank: _how(procs[rank]))
    cmd = command or [sys.executable, "-m", "hetnet", *argv]
    try:
        for rank in range(world):
            rank_env = {**(os.environ if env is None else env), "RANK": str(rank), "WORLD_SIZE": str(world),
                        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(monitor.address[1]), "HETNET_LAUNCHER": "1",
                        "HETNET_DIST_TIMEOUT": str(timeout)}
            procs.append(subprocess.Popen(cmd, env=rank_env, stdout=None if rank == 0 else subprocess.DEVNULL))
        while True:
            if verdict:
                _stop(procs)
                return int(verdict[0])
            codes = [p.poll() for p in procs]
            early = [r for r, c in enumerate(codes) if c and r not in monitor.ranks]
            if early:                       # failed before joining the job (rank 0 has said why itself)
                monitor.stand_down()
                if early[0]:
                    error_line(f"rank {early[0]} exited with status {codes[early[0]]} before joining the job")
                _stop(procs)
                return codes[early[0]]
            if all(c is not None for c in codes):
                time.sleep(0.1)             # the watchdog may still be deciding about the last one
                if verdict:
                    continue
                return next((c for c in codes if c), 0)
            time.sleep(0.05)
    except KeyboardInterrupt:               # every rank got the SIGINT too: let them stop on their own first
        monitor.stand_down()
        deadline = time.monotonic() + 3 * STOP_GRACE_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(0.05)
        _stop(procs)
        return 130
    finally:
        if any(p.poll() is None for p in procs):
            _stop(procs)
        monitor.close()
