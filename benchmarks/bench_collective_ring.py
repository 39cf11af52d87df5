"""What the always-on flight recorder costs per collective.

``CollectiveRing`` (hai_llm/parallel/collective_trace.py) wraps every torch.distributed
collective of a real run: argument binding, one deque append, two clock reads. This times
``dist.all_reduce`` of a small tensor on 2 gloo ranks with and without the ring, so the
overhead is seen next to the cheapest real collective (a larger one only dilutes it).

    OMP_NUM_THREADS=1 python benchmarks/bench_collective_ring.py

Numbers taken on a busy shared machine are noisy; re-run on a quiet one.
"""
from __future__ import annotations

import time

N = 2000  # collectives per timing


def _gloo_rank(rank: int, world: int) -> float:
    """Microseconds per all_reduce of 16 floats on real gloo ranks (run_ranks' ring is on)."""
    import torch
    import torch.distributed as dist

    x = torch.ones(16)
    best = float("inf")
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(N):
            dist.all_reduce(x)
        best = min(best, (time.perf_counter() - t0) / N * 1e6)
    return best


def _fake_backend_overhead() -> tuple[float, float]:
    """(plain, with ring) microseconds per all_reduce on torch's fake backend: the call does
    no communication, so the difference is the ring's own cost."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from hai_llm.parallel.collective_trace import CollectiveRing

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    x = torch.ones(16)
    res: dict[str, float] = {}
    try:
        for name in ("plain", "ring") * 3:  # alternate, keep the best of each
            ring = CollectiveRing() if name == "ring" else None
            if ring is not None:
                ring.__enter__()
            t0 = time.perf_counter()
            for _ in range(N * 5):
                dist.all_reduce(x)
            us = (time.perf_counter() - t0) / (N * 5) * 1e6
            if ring is not None:
                ring.__exit__(None, None, None)
            res[name] = min(res.get(name, us), us)
    finally:
        dist.destroy_process_group()
    return res["plain"], res["ring"]


def main() -> None:
    from hai_llm.parallel.spawn import run_ranks

    plain, ring = _fake_backend_overhead()
    print(f"fake backend (no communication): all_reduce {plain:.1f} us plain, {ring:.1f} us with the ring: "
          f"+{ring - plain:.1f} us per collective")
    gloo = run_ranks(_gloo_rank, 2, timeout=600)[0]
    print(f"gloo, 2 ranks on this machine, 16 floats: {gloo:.1f} us per all_reduce (ring on)")


if __name__ == "__main__":
    main()
