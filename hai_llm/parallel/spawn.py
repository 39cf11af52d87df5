"""Run a function on N local gloo ranks (CPU processes) and collect what each returns.

The single way hai-llm starts simulated ranks: the launcher's ``parallel.nprocs`` runs
and every parallel test go through ``run_ranks``. Each rank gets one OpenMP thread, a
process group initialised from a free loopback port, and its return value (or its
exception with traceback) is shipped back through a queue. A rank that hangs is killed
at ``timeout`` seconds and the call fails naming the ranks that did not finish, so a
collective mismatch shows up as an error instead of a stuck test run.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(RuntimeError):
    pass


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, q, threads: int, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(threads), HAI_LLM_SIMULATED="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world)
        out = fn(rank, world, *args)
        q.put((rank, "ok", pickle.dumps(out)))
    except BaseException as e:  # report everything, including KeyboardInterrupt in a child
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 300.0, threads: int = 1,
              backend: str = "gloo") -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world-1, world, *args)]`` computed on ``world``
    processes. ``fn`` must be importable (a module-level function)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, q, threads, backend), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            rank, status, payload = q.get(timeout=min(left, 1.0))
        except queue_mod.Empty:
            if errors and all(not p.is_alive() or r in errors or r in results for r, p in enumerate(procs)):
                break
            # a rank died without reporting (segfault, OOM kill)
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results and r not in errors]
            if dead and q.empty():
                time.sleep(0.5)
                if q.empty():
                    for r in dead:
                        errors[r] = f"rank {r} exited with code {procs[r].exitcode} without a result"
            continue
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
            # the others are probably blocked in a collective with the failed rank: give
            # them a moment to fail on their own, then stop them
            deadline = min(deadline, time.monotonic() + 10.0)
    for p in procs:
        p.join(timeout=0.1)
        if p.is_alive():
            p.kill()
            p.join()
    missing = [r for r in range(world) if r not in results and r not in errors]
    if errors or missing:
        msg = [f"{len(errors)} of {world} ranks failed" + (f"; ranks {missing} did not finish (hang?)" if missing else "")]
        for r in list(errors)[:4]:  # in reporting order: the root cause first
            msg.append(f"--- rank {r} ---\n{errors[r]}")
        raise RankError("\n".join(msg))
    return [results[r] for r in range(world)]
