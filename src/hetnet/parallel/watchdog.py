"""The watchdog of a data-parallel job: a small TCP service that every rank reports to, and that ends the whole job
with one `error:` line naming the rank when one dies, hangs or fails.

One `Monitor` runs per job: in the `hetnet train --gpus N` launcher (which started the ranks), or else in rank 0's
process. It also serves the rendezvous: a key-value store (`store_set` / `store_get`) through which rank 0 hands
the NCCL unique id to the others when no MPI is there to broadcast it. Each rank runs a `Heartbeat`: a thread that
says hello, then every HEARTBEAT_S its progress counter ("tick": one per training step and per collective the
host waits for) and whether the rank is waiting in a collective right now.

The monitor ends the job (`on_abort(line, status)`; ranks it can reach are told to exit) when:
- a rank's connection closes before it said goodbye: it died (noticed at once; the launcher adds how it ended);
- a rank reports an error (`Heartbeat.error`): the first report wins, rank 0's if it comes within a second;
- a rank made no progress for `timeout` seconds while another rank is past it (a higher tick, or the same tick
  but waiting in the collective this rank has not reached); or sent nothing at all for `timeout` seconds; or every
  rank has waited in the same collective for `timeout` seconds (a communication failure). Rank 0's own work between
  epochs (checkpoints, plots: state "solo") is not timed.

Protocol: one JSON object per line. Rank -> monitor: {"op": "hello", "rank", "world", "pid", "host"},
{"op": "beat", "tick", "state"}, {"op": "error", "msg", "status"}, {"op": "bye", "state"}; store clients:
{"op": "set", "key", "value"} -> {"ok": true}, {"op": "get", "key"} -> {"value"} (once it is set). Monitor -> rank:
{"op": "abort", "status", "quiet"}.

Testing hook: HETNET_TEST_FAULT="die@R:T" (rank R kills itself with SIGKILL when its tick reaches T) or "hang@R:T"
(its main thread stops for good there) -- how tests/test_parallel_mpi.py checks the promises above.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

HEARTBEAT_S = 0.5
DEFAULT_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 300.0       # how long a rank waits for the monitor (rank 0 may still be loading its data)
ERROR_GRACE_S = 1.0             # after a first error report, how long to wait for rank 0's (it explains best)
ABORT_DRAIN_S = 3.0             # after telling the ranks to exit, how long to wait for them to go


def _send(sock: socket.socket, msg: dict) -> None:
    sock.sendall((json.dumps(msg) + "\n").encode())


class _Lines:
    """Newline-delimited JSON messages from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def read(self) -> list[dict] | None:
        """The complete messages now readable (blocking for at least one byte); None at end of file."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, OSError):
            data = b""
        if not data:
            return None
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                out.append(msg)
        return out


def _connect(addr: tuple[str, int], timeout: float) -> socket.socket:
    """A connection to the monitor, retried until it listens (or OSError after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(addr, timeout=10.0)
            sock.settimeout(None)
            return sock
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def store_set(addr: tuple[str, int], key: str, value, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Put a JSON value under `key` in the monitor's store."""
    with contextlib.closing(_connect(addr, timeout)) as sock:
        _send(sock, {"op": "set", "key": key, "value": value})
        _reply(sock, timeout)


def store_get(addr: tuple[str, int], key: str, timeout: float = CONNECT_TIMEOUT_S):
    """The value under `key`, waiting until some rank has set it (TimeoutError after `timeout` seconds)."""
    with contextlib.closing(_connect(addr, timeout)) as sock:
        _send(sock, {"op": "get", "key": key})
        return _reply(sock, timeout).get("value")


def _reply(sock: socket.socket, timeout: float) -> dict:
    sock.settimeout(timeout)
    lines = _Lines(sock)
    try:
        while True:
            msgs = lines.read()
            if msgs is None:
                raise ConnectionError("the monitor closed the connection")
            if msgs:
                return msgs[0]
    except TimeoutError:
        raise TimeoutError(f"no answer from the monitor within {timeout:.0f} s") from None


# --- the monitor -----------------------------------------------------------------------------------------------


class _Rank:
    def __init__(self, sock, hello: dict, now: float):
        self.sock = sock
        self.pid, self.host = hello.get("pid"), hello.get("host", "?")
        self.tick, self.waiting, self.state = 0, False, "run"
        self.progress_at = self.seen_at = now          # last change of (tick, waiting); last message
        self.closed_at = None                          # when its connection closed without a goodbye


def _ahead(a: _Rank, b: _Rank) -> bool:
    """a is past b: a higher tick, or the same tick and a waits in the collective b has not reached."""
    return a.tick > b.tick or (a.tick == b.tick and a.waiting and not b.waiting)


class Monitor:
    """The job's watchdog and rendezvous store (see the module docstring), served by a daemon thread.

        >>> mon = Monitor(world=4, timeout=120, on_abort=lambda line, status: ...)      # doctest: +SKIP
        >>> mon.address                     # what the ranks connect to (MASTER_ADDR, MASTER_PORT)      # doctest: +SKIP

    When it ends the job, the monitor prints the one `error: ...` line, tells every rank it can reach to exit, then
    calls on_abort(status) once, in its thread (the launcher stops the processes it started; rank 0 exits).
    describe_death(rank) may say how a dead rank ended (the launcher: "killed by signal 9 (SIGKILL)")."""

    def __init__(self, world: int, timeout: float, on_abort: Callable[[int], None],
                 host: str = "127.0.0.1", port: int = 0, describe_death: Callable[[int], str | None] | None = None,
                 start_timeout: float = CONNECT_TIMEOUT_S):
        self.world, self.timeout, self.on_abort = int(world), float(timeout), on_abort
        self.describe_death, self.start_timeout = describe_death, float(start_timeout)
        self.server = socket.create_server((host, int(port)))
        self.address = (host if host not in ("", "0.0.0.0") else socket.gethostname(), self.server.getsockname()[1])
        self.kv: dict = {}
        self.waiting_gets: list = []                # (socket, key)
        self.ranks: dict[int, _Rank] = {}
        self.errors: list = []                      # (time, rank, message, status)
        self.started = time.monotonic()
        self.aborted = False
        self._end_status = None                     # set by end() from another thread
        self._conns: dict = {}                      # socket -> (_Lines, rank or None)
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.server, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="hetnet-watchdog", daemon=True)
        self._thread.start()

    # -- serving

    def _serve(self) -> None:
        while not self._stop.is_set() and not self.aborted:
            for key, _ in self._sel.select(timeout=0.2):
                if key.fileobj is self.server:
                    try:
                        conn, _ = self.server.accept()
                    except OSError:
                        continue
                    self._conns[conn] = (_Lines(conn), None)
                    self._sel.register(conn, selectors.EVENT_READ)
                else:
                    self._read(key.fileobj)
            if self._end_status is not None:
                self._abort(None, self._end_status, quiet=True)
            self._check(time.monotonic())

    def _read(self, conn) -> None:
        lines, rank = self._conns[conn]
        msgs = lines.read()
        if msgs is None:
            self._drop(conn)
            if rank is not None and self.ranks[rank].state not in ("done", "interrupted", "error"):
                self.ranks[rank].closed_at = time.monotonic()
            return
        now = time.monotonic()
        for msg in msgs:
            op = msg.get("op")
            if op == "hello":
                rank = self._hello(conn, msg, now)
            elif op == "set":
                self.kv[str(msg.get("key"))] = msg.get("value")
                self._reply(conn, {"ok": True})
                for c, k in [g for g in self.waiting_gets if g[1] in self.kv]:
                    self.waiting_gets.remove((c, k))
                    self._reply(c, {"value": self.kv[k]})
            elif op == "get":
                key = str(msg.get("key"))
                if key in self.kv:
                    self._reply(conn, {"value": self.kv[key]})
                else:
                    self.waiting_gets.append((conn, key))
            elif rank is not None:
                r = self.ranks[rank]
                r.seen_at = now
                if op == "beat":
                    tick, waiting = int(msg.get("tick", 0)), msg.get("state") == "wait"
                    if (tick, waiting) != (r.tick, r.waiting):
                        r.progress_at = now
                    r.tick, r.waiting = tick, waiting
                    r.state = "solo" if msg.get("state") == "solo" else r.state
                    if msg.get("state") in ("run", "wait"):
                        r.state = "run"
                elif op == "error":
                    r.state = "error"
                    self.errors.append((now, rank, str(msg.get("msg", "failed")), int(msg.get("status", 1))))
                elif op == "bye":
                    r.state = "interrupted" if msg.get("state") == "interrupted" else "done"
        self._conns[conn] = (lines, rank)

    def _hello(self, conn, msg: dict, now: float) -> int | None:
        rank, world = msg.get("rank"), msg.get("world")
        if not isinstance(rank, int) or not 0 <= rank < self.world:
            self._abort(f"a process joined as rank {rank!r} of a job of {self.world} ranks (0 .. {self.world - 1})", 2)
            return None
        if world != self.world:
            self._abort(f"rank {rank} was started for {world} ranks, rank 0's job has {self.world}: start every "
                        f"rank with the same WORLD_SIZE", 2)
            return None
        if rank in self.ranks:
            self._abort(f"two processes joined as rank {rank} (pids {self.ranks[rank].pid} on "
                        f"{self.ranks[rank].host} and {msg.get('pid')} on {msg.get('host')}): give each a different "
                        f"RANK", 2)
            return None
        self.ranks[rank] = _Rank(conn, msg, now)
        return rank

    def _reply(self, conn, msg: dict) -> None:
        with contextlib.suppress(OSError):
            _send(conn, msg)

    def _drop(self, conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn)
        self._conns.pop(conn, None)
        self.waiting_gets = [g for g in self.waiting_gets if g[0] is not conn]
        conn.close()

    # -- deciding

    def _check(self, now: float) -> None:
        if self.aborted:
            return
        if self.errors and (now - self.errors[0][0] > ERROR_GRACE_S or any(e[1] == 0 for e in self.errors)
                            or all(r.state != "run" for r in self.ranks.values())):
            _, rank, msg, status = min(self.errors, key=lambda e: (e[1] != 0, e[0]))
            self._abort(msg if rank == 0 or self.world == 1 else f"rank {rank}: {msg}", status)
            return
        for rank, r in sorted(self.ranks.items()):
            if r.closed_at is not None and now - r.closed_at > ERROR_GRACE_S / 2:
                how = self.describe_death(rank) if self.describe_death else None
                self._abort(f"rank {rank} (pid {r.pid} on {r.host}) died{': ' + how if how else ''}; "
                            f"ending the job", 1)
                return
        if len(self.ranks) < self.world:
            if now - self.started > self.start_timeout:
                missing = [r for r in range(self.world) if r not in self.ranks]
                self._abort(f"rank {missing[0]} did not join the job within {self.start_timeout:.0f} s", 1)
            return
        live = {k: r for k, r in self.ranks.items() if r.state in ("run", "solo")}
        for rank, r in sorted(live.items()):
            if now - r.seen_at > self.timeout:
                self._abort(f"rank {rank} (pid {r.pid} on {r.host}) stopped responding: no heartbeat for "
                            f"{self.timeout:.0f} s; ending the job", 1)
                return
            if r.state != "run" or r.waiting or now - r.progress_at <= self.timeout:
                continue
            past = [k for k, q in live.items() if _ahead(q, r)]
            if past:
                self._abort(f"rank {rank} (pid {r.pid} on {r.host}) made no progress for {self.timeout:.0f} s while "
                            f"rank {past[0]} waited for it; ending the job", 1)
                return
        if live and all(r.waiting and now - r.progress_at > self.timeout for r in live.values()) and \
                len({r.tick for r in live.values()}) == 1:
            self._abort(f"every rank has waited {self.timeout:.0f} s in the same collective: the communication "
                        f"between them failed; ending the job", 1)

    def _abort(self, line: str | None, status: int, quiet: bool = False) -> None:
        if self.aborted:
            return
        self.aborted = True
        if line is not None:
            error_line(line)
        # the other processes first, then this one's own rank (told last: its heartbeat thread exits the process)
        others = [r for r in self.ranks.values() if r.pid != os.getpid()]
        for r in others:
            with contextlib.suppress(OSError):
                _send(r.sock, {"op": "abort", "status": status, "quiet": quiet})
        self._drain([r.sock for r in others], ABORT_DRAIN_S)
        if not quiet:
            self.on_abort(status)

    def _drain(self, socks: list, seconds: float) -> None:
        """Read (and drop) what the ranks still send until they have closed their connections, for at most
        `seconds`: a connection closed here with their heartbeats unread would be reset, and the reset can reach a
        rank before the abort message does (it would then think the monitor died)."""
        live, deadline = [s for s in socks if s.fileno() >= 0], time.monotonic() + seconds
        while live and time.monotonic() < deadline:
            ready, _, _ = select.select(live, [], [], 0.1)
            for sock in ready:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    live.remove(sock)

    def end(self, status: int = 0) -> None:
        """Tell the ranks still connected to exit quietly with `status` (rank 0 stopping early: Ctrl-C); returns
        once the monitor's thread has done so."""
        self._end_status = status
        deadline = time.monotonic() + 2.0
        while not self.aborted and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def stand_down(self) -> None:
        """Stop judging: the job is ending for another reason (Ctrl-C at the launcher)."""
        self.aborted = True

    def wait_for_goodbyes(self, timeout: float) -> None:
        """Return once every rank has said goodbye or gone (or after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(r.state in ("run", "solo") and r.closed_at is None
                                                  for r in self.ranks.values()):
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        for conn in list(self._conns):
            self._drop(conn)
        self.server.close()


# --- the rank's side -------------------------------------------------------------------------------------------


class Heartbeat:
    """This rank's reports to the monitor, from a daemon thread; exits the process when the monitor says so.

        >>> hb = Heartbeat(("10.0.0.1", 29500), rank=1, world=2)          # doctest: +SKIP
        >>> hb.tick += 1                     # progress: a step, a collective        # doctest: +SKIP
        >>> with hb.waiting(): comm.Allreduce(...)                                   # doctest: +SKIP
        >>> hb.bye()                         # the end of a normal run               # doctest: +SKIP

    When the monitor's connection closes without a word (the process that ran it died), this rank exits with
    status 1; rank `reporter` first prints one `error:` line saying so (the others stay silent)."""

    def __init__(self, addr: tuple[str, int], rank: int, world: int, reporter: int = 1,
                 lost_message: str = "rank 0 died (its watchdog went away); ending the job",
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        self.rank, self.world, self.reporter, self.lost_message = int(rank), int(world), reporter, lost_message
        try:
            self.sock = _connect(tuple(addr), connect_timeout)
        except OSError as e:
            raise ConnectionError(f"rank {rank} could not reach the job's watchdog at {addr[0]}:{addr[1]} within "
                                  f"{connect_timeout:.0f} s ({e.strerror or e})") from None
        self.tick = 0
        self.state = "run"                  # run | solo | wait (computed) | done
        self._wait_depth = 0
        self._lock = threading.Lock()
        self._closing = False
        self._stop = threading.Event()
        self._sigterm_r, self._sigterm_w = os.pipe()
        self._send({"op": "hello", "rank": self.rank, "world": self.world, "pid": os.getpid(),
                    "host": socket.gethostname()})
        self._thread = threading.Thread(target=self._run, name="hetnet-heartbeat", daemon=True)
        self._thread.start()
        self._fault = _parse_fault(os.environ.get("HETNET_TEST_FAULT", ""), self.rank)

    def catch_sigterm(self) -> None:
        """Make SIGTERM (mpirun tearing the job down after a rank died) leave a moment to the watchdog, which names
        the rank that failed, before this process exits (call from the main thread)."""
        os.set_blocking(self._sigterm_w, False)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)     # Python's C handler wakes the fd below
        signal.set_wakeup_fd(self._sigterm_w, warn_on_full_buffer=False)

    def _send(self, msg: dict) -> None:
        with self._lock, contextlib.suppress(OSError):
            _send(self.sock, msg)

    def _state(self) -> str:
        return "wait" if self._wait_depth else self.state

    @contextlib.contextmanager
    def waiting(self):
        """A block in which this rank waits for the others (a blocking collective)."""
        self._wait_depth += 1
        try:
            yield
        finally:
            self._wait_depth -= 1

    @contextlib.contextmanager
    def solo(self):
        """A block of work only this rank does (rank 0 writing checkpoints and plots): not timed by the monitor."""
        old, self.state = self.state, "solo"
        self._send({"op": "beat", "tick": self.tick, "state": "solo"})
        try:
            yield
        finally:
            self.state = old

    def step(self) -> None:
        """One more unit of progress (a training step); the testing hook's faults fire here."""
        self.tick += 1
        if self._fault is not None and self.tick >= self._fault[1]:
            kind, self._fault = self._fault[0], None
            sys.stdout.flush()
            if kind == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            while True:                     # "hang": the heartbeat thread goes on, the progress stops
                time.sleep(3600)

    def _run(self) -> None:
        lines = _Lines(self.sock)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(self._sigterm_r, selectors.EVENT_READ)
        terminate_at = None         # SIGTERM came: exit then, unless the monitor's verdict comes first
        while not self._stop.is_set():
            self._send({"op": "beat", "tick": self.tick, "state": self._state()})
            events = sel.select(timeout=HEARTBEAT_S if terminate_at is None else 0.1)
            for key, _ in sorted(events, key=lambda e: e[0].fileobj != self.sock):    # the monitor first
                if key.fileobj is not self.sock:
                    got = b""
                    with contextlib.suppress(OSError):
                        got = os.read(self._sigterm_r, 64)      # the numbers of the signals caught (Ctrl-C too)
                    if signal.SIGTERM in got and terminate_at is None:
                        terminate_at = time.monotonic() + 2.0
                    continue
                msgs = lines.read()
                if msgs is None:
                    if self._closing or self._stop.is_set():
                        return
                    if self.rank == self.reporter:
                        error_line(self.lost_message)
                    exit_now(1)
                for msg in msgs:
                    if msg.get("op") == "abort":
                        exit_now(int(msg.get("status", 1)))
            if terminate_at is not None and time.monotonic() > terminate_at:
                exit_now(143)

    def error(self, message: str, status: int) -> None:
        """Report this rank's failure; the monitor ends the job (this waits for that, then exits itself)."""
        self._send({"op": "error", "msg": message, "status": status})
        self._thread.join(timeout=30.0)     # the abort message makes the thread exit the process
        exit_now(status)

    def bye(self, interrupted: bool = False) -> None:
        """This rank is done (or stopped by Ctrl-C): the monitor stops watching it."""
        self._closing = True
        self.state = "done"
        self._send({"op": "bye", "state": "interrupted" if interrupted else "done"})

    def close(self) -> None:
        self._closing = True
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=2.0)
        self.sock.close()


def _parse_fault(spec: str, rank: int):
    """("die" | "hang", tick) when HETNET_TEST_FAULT names this rank, else None."""
    kind, _, where = spec.partition("@")
    r, _, t = where.partition(":")
    if kind in ("die", "hang") and r.strip().isdigit() and t.strip().isdigit() and int(r) == rank:
        return kind, int(t)
    return None


def error_line(message: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def exit_now(status: int) -> None:
    """Leave now, from any thread (the main thread may be stuck in a collective)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)
