"""Every rank's guards against the two silent failures of a distributed job: a collective
that never completes, and a rank that outlives its launcher.

* Collective timeout (``parallel.collective_timeout_s``). The process group gets it as its
  ``timeout`` (gloo raises when a collective waits longer; NCCL's watchdog aborts), and
  ``CollectiveWatchdog`` keeps a ``CollectiveRing`` (the last collectives this rank issued,
  ``hai_llm.parallel.collective_trace``) plus a thread that looks at the call the rank is
  blocked in. Whichever notices first, the backend's error or the thread (which also covers
  groups made by ``dist.new_group`` without a timeout, and ranks stuck inside a call that
  never raises), the rank prints its last collectives (op, group, shapes, dtype, sequence
  number) and the job ends non-zero: laid side by side, the ranks' reports show who issued
  something the others did not.
* Step heartbeat. On CUDA an NCCL collective returns as soon as it is queued, so a hang shows
  up later, in a host sync (``.item()``, ``.tolist()``) or a ``work.wait()``, where the ring
  sees no call in flight. The trainer calls ``heartbeat(step)`` at the start of every step;
  once a first step has completed, the thread also fires when no new step has started for
  ``timeout_s`` + ``grace_s`` (a step, with its evaluation and checkpoint, that took longer
  than one collective may), with the same report of the last collectives. Under NCCL torch's
  own flight recorder is on as well (``nccl_trace_env``): NCCL's watchdog, which aborts a
  timed-out collective first, then dumps its trace per rank.
* Parent death. ``die_with_parent`` makes the kernel kill this process when its parent
  (the launcher, or torchrun's agent) dies, by ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on
  Linux, and a thread that polls the parent pid covers the rest (other systems, and the
  case where the parent died before the ``prctl``). Killing is safe for the run folder:
  checkpoints are written to ``step_N.tmp`` and renamed when complete
  (``hai_llm.checkpoint.store``), so a killed rank leaves the last complete checkpoint.
"""
from __future__ import annotations

import contextvars
import ctypes
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

from hai_llm.parallel.collective_trace import CollectiveRing

PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_COLLECTIVE_TIMEOUT = 3  # exit code of a rank whose watchdog found a hung collective
# messages of a collective that failed because a PEER went away (its socket closed): on a
# rank that is still alive these are consequences of another rank's death, never the cause
_PEER_LOST = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
              "socket closed", "end of file", "connection was reset", "remote process exited")
_TIMED_OUT = ("timed out", "timeout", "deadline exceeded")
# the watchdog of the code running now (entered in this thread's context): how the trainer's
# heartbeat finds it without being handed one. A ContextVar holds per-context values, the way
# decimal's context does; it is never mutated at module level.
_CURRENT_WATCHDOG: contextvars.ContextVar["CollectiveWatchdog | None"] = contextvars.ContextVar(
    "hai_llm_collective_watchdog", default=None)
# torch's NCCL flight recorder (torch.distributed docs, "Flight Recorder"): entries kept per
# rank and a dump of them when NCCL's watchdog times a collective out
NCCL_TRACE_DEFAULTS = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


def as_timedelta(seconds: float) -> timedelta:
    return timedelta(seconds=float(seconds))


def is_peer_lost(text: str) -> bool:
    """Does this error text say that another rank's connection went away?"""
    low = text.lower()
    return any(k in low for k in _PEER_LOST)


def is_timeout(text: str) -> bool:
    low = text.lower()
    return any(k in low for k in _TIMED_OUT) and not is_peer_lost(text)


def die_with_parent(parent_pid: int | None = None, poll_s: float = 0.5) -> None:
    """Make this process die (SIGKILL) as soon as its parent does; see the module docstring.
    ``parent_pid``: the pid the parent had when it started us (default: the current one)."""
    parent = os.getppid() if parent_pid is None else parent_pid
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the polling thread below still works
    if os.getppid() != parent:  # the parent died before the prctl: nobody will signal us
        os._exit(1)

    def poll() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=poll, name="hai-llm-parent-watch", daemon=True).start()


def nccl_trace_env(env: dict) -> dict:
    """The variables to add to ``env`` before an NCCL process group starts: torch's flight
    recorder defaults (``NCCL_TRACE_DEFAULTS``), each only where the user set nothing."""
    return {k: v for k, v in NCCL_TRACE_DEFAULTS.items() if k not in env}


def heartbeat(step: int) -> None:
    """A new training step starts: tell this rank's watchdog, if one is active (a no-op
    otherwise: single-process runs, tests)."""
    dog = _CURRENT_WATCHDOG.get()
    if dog is not None:
        dog.beat(step)


def print_report(rank: int, text: str) -> None:
    """One rank's report on stderr, each line prefixed with the rank (several ranks write at once)."""
    sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in text.splitlines()))
    sys.stderr.flush()


class CollectiveWatchdog:
    """Context manager: a ``CollectiveRing`` for this rank plus a thread that fires when the
    rank has been blocked in one collective for ``timeout_s`` + ``grace_s`` seconds.

    Firing calls ``on_hang(report)`` (default: print it on stderr) and ends the process with
    ``EXIT_COLLECTIVE_TIMEOUT``: a rank blocked in a collective cannot be unblocked from
    Python, and the job is lost anyway. ``grace_s`` lets the backend's own timeout (which
    raises a normal exception that the rank reports with the same ring) go first.
    ``timeout_s`` <= 0 disables the thread (the ring still records).
    """

    def __init__(self, rank: int, timeout_s: float, on_hang: Callable[[str], None] | None = None,
                 grace_s: float | None = None, capacity: int = 32) -> None:
        self.rank = rank
        self.timeout_s = float(timeout_s)
        self.grace_s = max(2.0, 0.1 * self.timeout_s) if grace_s is None else grace_s
        self.on_hang = on_hang or (lambda report: print_report(self.rank, report))
        self.ring = CollectiveRing(capacity)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: contextvars.Token | None = None
        # (step, monotonic time it started, beats so far): one tuple, replaced whole, so the
        # watchdog thread always reads a consistent triple
        self._beat: tuple[int, float, int] | None = None

    def beat(self, step: int) -> None:
        """Step ``step`` starts now (``heartbeat``)."""
        n = 0 if self._beat is None else self._beat[2]
        self._beat = (step, time.monotonic(), n + 1)

    def stalled(self) -> tuple[int, float] | None:
        """(the step running, seconds since it started) when no step has started for longer
        than the limit, once one step has completed (the first includes warm-up); else None."""
        b = self._beat
        if b is None or b[2] < 2:
            return None
        age = time.monotonic() - b[1]
        return (b[0], age) if age > self.timeout_s + self.grace_s else None

    def report(self, reason: str = "") -> str:
        head = f"{reason}\n" if reason else ""
        return head + self.ring.report(self.rank)

    def __enter__(self) -> "CollectiveWatchdog":
        self.ring.__enter__()
        self._token = _CURRENT_WATCHDOG.set(self)
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="hai-llm-collective-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._token is not None:
            _CURRENT_WATCHDOG.reset(self._token)
            self._token = None
        self.ring.__exit__(*exc)

    def _watch(self) -> None:
        limit = self.timeout_s + self.grace_s
        while not self._stop.wait(min(1.0, max(0.05, self.timeout_s / 10))):
            cur = self.ring.in_flight()
            if cur is not None and cur[1] > limit:
                rec, age = cur
                self.on_hang(self.report(
                    f"collective timeout: rank {self.rank} has waited {age:.0f} s (parallel.collective_timeout_s="
                    f"{self.timeout_s:g}) in {rec.op} #{rec.index}; the other ranks of group {rec.group} issued "
                    f"something else or nothing (compare their reports)"))
                os._exit(EXIT_COLLECTIVE_TIMEOUT)
            stall = self.stalled()
            if stall is not None:
                step, age = stall
                self.on_hang(self.report(
                    f"collective timeout: rank {self.rank} has been in step {step + 1} for {age:.0f} s "
                    f"(parallel.collective_timeout_s={self.timeout_s:g}; the steps before took less): a host "
                    f"sync or a wait on a collective that never completes (on NCCL, collectives return at once "
                    f"and hang later); raise parallel.collective_timeout_s if a step with its checkpoint "
                    f"really takes this long"))
                os._exit(EXIT_COLLECTIVE_TIMEOUT)

    def describe_failure(self, exc: BaseException) -> str:
        """The rank's last collectives when ``exc`` came from the communication layer (a timeout
        or a lost peer), else ''."""
        text = f"{type(exc).__name__}: {exc}"
        if not (is_timeout(text) or is_peer_lost(text)) or not self.ring.last():
            return ""
        what = "collective timeout" if is_timeout(text) else "lost a peer"
        return self.report(f"{what} (parallel.collective_timeout_s={self.timeout_s:g}) on rank {self.rank}:")
