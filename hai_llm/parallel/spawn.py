"""Run a function on N local gloo ranks (CPU processes) and collect what each returns.

The single way hai-llm starts simulated ranks: the launcher's ``parallel.nprocs`` runs
and every parallel test go through ``run_ranks``. Each rank gets one OpenMP thread, a
process group initialised from a free loopback port, and its return value (or its
exception with traceback) is shipped back through a queue.

Faults, and what the caller sees (docs/failures_launch.md):

* A rank dies (signal, ``os._exit``, OOM kill) or raises: the others are stopped within
  ``grace_s`` and ``RankError`` names the cause first, "rank 1 of 4 died: killed by
  SIGKILL", with that rank's last stderr lines. Ranks that then failed only because their
  peer's socket closed ("Connection reset by peer") are listed as consequences, one line
  each, after the cause; their stderr stops being echoed once the first failure is seen.
* A collective hangs: every rank runs under ``hai_llm.parallel.watchdog.CollectiveWatchdog``
  with ``collective_timeout_s``; a rank that times out reports its last collectives and the
  error lists each rank's report. ``timeout`` (the whole call) stays as the last resort.
* A rank raises a bad-input error (``ValueError``, which ``CheckpointError`` is, or
  ``FileNotFoundError``: a vocabulary, meta.json, ``init_from`` or resume mismatch found only
  inside the ranks): ``RankError.bad_input`` is its message, one line naming the key and the
  fix, which ``hai_llm.launch.train`` prints alone; the rank's traceback is left out of the
  error unless ``HAI_LLM_TRACEBACK`` is set.
* The launcher dies (SIGKILL, or any exit): ranks die with it (``die_with_parent``); they
  never keep training into the run folder. The launcher leaving ``run_ranks`` by an
  exception (Ctrl-C, SIGTERM turned into an exception by ``hai_llm.launch.train``) kills
  the ranks before the exception goes on. Ranks ignore SIGINT, which a terminal sends to
  the whole process group: the launcher alone turns Ctrl-C into one line.

Each rank's stderr goes through a pipe to a thread here, which echoes it and keeps the last
lines, so a rank killed by SIGKILL still has its last words in the report. After success the
ranks get a few seconds to leave on their own (``destroy_process_group``, exit handlers);
only a failure, an interrupt or a rank that will not end is met with SIGKILL.
"""
from __future__ import annotations

import collections
import os
import pickle
import queue as queue_mod
import re
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from hai_llm.parallel.watchdog import CollectiveWatchdog, as_timedelta, die_with_parent, is_peer_lost

EXIT_GRACE_S = 5.0  # after success, how long the ranks get to exit before they are killed
TAIL_LINES = 12  # stderr lines of the failed rank quoted in the error


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(RuntimeError):
    """One or more ranks failed; ``str()`` names the ranks and causes. ``bad_input``: when the
    cause is a bad input found inside a rank (``ValueError``, ``FileNotFoundError``), its
    message with the rank, one line for the launcher to print; else ''."""

    def __init__(self, message: str, bad_input: str = "") -> None:
        super().__init__(message)
        self.bad_input = bad_input


def is_bad_input(exc: BaseException) -> bool:
    """Does ``exc`` say that an input (config value, data file, checkpoint) is wrong? Its
    message then names the key and the fix, and a traceback would only hide it."""
    return isinstance(exc, (ValueError, FileNotFoundError))


def signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, q, threads: int, backend: str,
           err_pipe, parent: int, collective_timeout_s: float) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    os.dup2(err_pipe.fileno(), 2)  # stderr through the launcher (echoed, last lines kept)
    err_pipe.close()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(threads), HAI_LLM_SIMULATED="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)

    def hung(report: str) -> None:  # the watchdog thread, right before it ends this process
        q.put((rank, "error", report))
        q.close()
        q.join_thread()

    dog = CollectiveWatchdog(rank, collective_timeout_s, on_hang=hung)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=as_timedelta(collective_timeout_s))
        with dog:
            out = fn(rank, world, *args)
        q.put((rank, "ok", pickle.dumps(out)))
    except BaseException as e:  # report everything, including KeyboardInterrupt in a child
        if is_bad_input(e):  # the message is the report; the traceback only with HAI_LLM_TRACEBACK set
            tb = traceback.format_exc() if os.environ.get("HAI_LLM_TRACEBACK") else ""
            q.put((rank, "bad_input", (type(e).__name__, str(e), tb)))
        else:
            ring = dog.describe_failure(e)
            q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}" + (f"\n{ring}" if ring else "")))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


class _StderrPump(threading.Thread):
    """Echo one rank's stderr (raw bytes from its pipe) and keep its last lines."""

    def __init__(self, conn, echo: threading.Event):
        super().__init__(daemon=True)
        self.fd = conn.fileno()
        self.conn = conn
        self.echo = echo
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self._partial = b""

    def run(self) -> None:
        out = getattr(sys.stderr, "buffer", None)
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            if self.echo.is_set() and out is not None:
                try:
                    out.write(chunk)
                    out.flush()
                except (OSError, ValueError):
                    pass
            *full, self._partial = (self._partial + chunk).split(b"\n")
            self.lines.extend(b.decode("utf-8", "replace") for b in full)
        if self._partial:
            self.lines.append(self._partial.decode("utf-8", "replace"))
        self.conn.close()

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        # tqdm redraws with carriage returns: keep what the terminal would show last
        return [ln.rsplit("\r", 1)[-1] for ln in list(self.lines)[-n:] if ln.strip()]


def _how_it_ended(proc) -> str:
    code = proc.exitcode
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal_name(-code)}"
    return f"exited with code {code} without a result"


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 300.0, threads: int = 1,
              backend: str = "gloo", collective_timeout_s: float | None = None,
              grace_s: float = 3.0) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world-1, world, *args)]`` computed on ``world``
    processes. ``fn`` must be importable (a module-level function). ``timeout``: the whole
    call; ``collective_timeout_s``: one collective (the process group's timeout and the
    watchdog's; None: the config's default, ``parallel.collective_timeout_s``, the one
    default); ``grace_s``: how long the other ranks get to report after the first failure
    before they are killed."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if collective_timeout_s is None:  # imported here: the ranks, which import this module, need no config
        from hai_llm.config.schema import ParallelConfig

        collective_timeout_s = ParallelConfig.collective_timeout_s
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    echo = threading.Event()
    echo.set()
    procs, pumps = [], []
    ended_well = False
    bad: dict[int, str] = {}  # rank -> the message of its bad-input error
    try:
        for r in range(world):
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_entry, args=(r, world, port, fn, args, q, threads, backend, writer, os.getpid(),
                                                 collective_timeout_s), daemon=False)
            _start_ignoring_sigint(p)
            writer.close()
            pump = _StderrPump(reader, echo)
            pump.start()
            procs.append(p)
            pumps.append(pump)
        results, errors = _collect(procs, q, world, timeout, grace_s, echo, collective_timeout_s, bad)
        ended_well = len(results) == world
    finally:
        # also when the caller is interrupted (Ctrl-C, SIGTERM): no rank outlives this call
        _stop(procs, EXIT_GRACE_S if ended_well else 0.0)
        for pump in pumps:
            pump.join(timeout=2.0)
    missing = [r for r in range(world) if r not in results and r not in errors]
    if errors or missing:
        # one line only when bad inputs are all there is (the other ranks at most lost their peer)
        only_bad = bad and all(r in bad or (errors[r] and is_peer_lost(errors[r].split("\n", 1)[0])) for r in errors)
        first_bad = min(bad) if only_bad else None
        one_line = "" if first_bad is None else f"rank {first_bad} of {world}: {bad[first_bad]}"
        raise RankError(_explain(world, errors, missing, procs, pumps), bad_input=one_line)
    return [results[r] for r in range(world)]


def _start_ignoring_sigint(proc) -> None:
    """Start ``proc`` with SIGINT ignored from its first instruction (an ignored signal stays
    ignored across exec, and Python then installs no KeyboardInterrupt handler), so a Ctrl-C
    while the rank is still importing prints nothing there. Only the main thread may change
    signal handlers; elsewhere ``_entry`` ignores SIGINT once it runs."""
    if threading.current_thread() is not threading.main_thread():
        proc.start()
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGINT, old)


def _collect(procs, q, world: int, timeout: float, grace_s: float, echo: threading.Event,
             collective_timeout_s: float, bad: dict[int, str]):
    """Each rank's result or error, until all reported or the deadline; ``bad`` gets the
    message of each bad-input error (its ``errors`` entry is the head line, plus the
    traceback under HAI_LLM_TRACEBACK)."""
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    ended_at: dict[int, float] = {}  # rank -> when we first saw its process ended
    deadline = time.monotonic() + timeout
    first_failure = None
    while len(results) + len(errors) < world:
        now = time.monotonic()
        if now >= deadline:
            break
        try:
            rank, status, payload = q.get(timeout=min(deadline - now, 0.2))
        except queue_mod.Empty:
            # a rank that ended without reporting (signal, os._exit, OOM kill): give its queue
            # message (if any) a moment to arrive, then count it
            dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results and r not in errors]
            for r in dead:
                if time.monotonic() - ended_at.setdefault(r, time.monotonic()) > 0.5:
                    errors[r] = ""
            if (errors or dead) and first_failure is None:
                first_failure = time.monotonic()
            if first_failure is not None:
                echo.clear()  # from now on the survivors' output is consequences: keep it, do not echo it
                deadline = min(deadline, first_failure + grace_s)
            continue
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            if status == "bad_input":
                kind, msg, tb = payload
                bad[rank] = msg
                payload = f"{kind}: {msg}\n{tb}"
            errors[rank] = payload
            if first_failure is None:
                first_failure = time.monotonic()
                echo.clear()
                # the others are probably blocked in a collective with the failed rank: give
                # them a moment to fail on their own (their reports), then stop them; after a
                # timeout, long enough for the watchdogs of ranks blocked in other groups
                wait = grace_s + (2.0 + 0.1 * collective_timeout_s if "collective timeout" in payload else 0.0)
                deadline = min(deadline, first_failure + wait)
    return results, errors


def _stop(procs, exit_grace_s: float) -> None:
    """End every rank: after success each gets ``exit_grace_s`` (shared) to leave by itself
    (a rank reports before ``destroy_process_group`` and its exit handlers run); ranks still
    alive then, and every rank after a failure or an interrupt, are SIGKILLed."""
    deadline = time.monotonic() + exit_grace_s
    for p in procs:
        if p.is_alive() and exit_grace_s > 0:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10.0)


def _ring_report(payload: str) -> str:
    """The flight-recorder part of a rank's error payload (``CollectiveWatchdog.describe_failure``)."""
    m = re.search(r"^(collective timeout|lost a peer) \(parallel\.collective_timeout_s", payload, re.MULTILINE)
    return payload[m.start():] if m else ""


def _explain(world: int, errors: dict[int, str], missing: list[int], procs, pumps) -> str:
    """The error message: causes first (with their last stderr lines), consequences after."""
    died = {r for r, e in errors.items() if e == ""}  # ended without a word: a signal or os._exit
    raised = {r for r, e in errors.items() if e != "" and not is_peer_lost(e.split("\n", 1)[0])}
    consequences = sorted(set(errors) - died - raised)
    causes = sorted(died | raised) or consequences  # only peer losses: nothing better to lead with
    if causes is consequences:
        consequences = []
    lines = []
    timeouts = [r for r in causes if r in raised and "collective timeout" in errors[r]]
    if timeouts:
        lines.append(f"collective timeout on rank(s) {timeouts} of {world}: each rank's last collectives follow "
                     f"(a rank that issued something else, or stopped issuing, is the mismatch)")
    shown: dict[str, list[int]] = {}  # error head -> ranks (the same error on every rank is shown once)
    for r in causes:
        if r in died:
            lines.append(f"rank {r} of {world} died: {_how_it_ended(procs[r])}; its last lines:")
            lines += [f"    {ln}" for ln in pumps[r].tail()] or ["    (nothing on stderr)"]
            continue
        head, _, rest = errors[r].partition("\n")
        if head in shown and not timeouts:
            shown[head].append(r)
            continue
        shown[head] = [r]
        lines.append(f"rank {r} of {world} failed: {head}")
        if rest.strip():
            lines.append(rest.rstrip())
    for head, ranks in shown.items():
        if len(ranks) > 1:
            lines.append(f"(ranks {ranks[1:]} failed with the same error: {head[:200]})")
    if consequences:
        lines.append(f"then rank(s) {consequences} failed because their peer went away (consequences, not causes):")
        for r in consequences[:8]:
            lines.append(f"    rank {r}: {errors[r].split(chr(10), 1)[0][:200]}")
            if timeouts:  # a hang: every rank's last collectives are the evidence
                lines += [f"    {ln}" for ln in _ring_report(errors[r]).splitlines()]
    if missing:
        lines.append(f"rank(s) {missing} did not finish and were stopped (hang? blocked waiting for the ranks above)")
    return "\n".join(lines)
