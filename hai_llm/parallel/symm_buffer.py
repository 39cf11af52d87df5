"""Symmetric-memory buffers for the symmetric expert transport: one buffer per rank of a node,
mapped by every rank of that node, plus signal pads that order the write and read phases.

Why this exists: the symmetric transport (``transport_symmetric.py``) writes rows straight into
peer ranks' receive buffers with a kernel (``kernels/symm_a2a.py``) instead of handing them to
``all_to_all_single``.  That needs memory every rank of the node can address:

* CUDA: ``torch.distributed._symmetric_memory`` (``empty`` + ``rendezvous`` over the node's
  process group; ``get_buffer`` maps each peer's allocation; ``barrier`` on the handle's signal
  pads orders the phases on the stream).  Fixed capacity, chosen at construction.
* CPU (simulated ranks): shared-memory files in ``/dev/shm``, one per (rank, slot), mapped with
  ``mmap`` by every simulated rank of the virtual node (``parallel.gpus_per_node`` ranks), plus
  one signal-pad file.  The same Triton kernels then run under ``TRITON_INTERPRET=1`` against
  real cross-process memory.  A file grows on demand (``posix_fallocate`` only ever extends, so
  two ranks growing it at once cannot shrink it); every mapping is page aligned.

Names are unique per run (a uuid broadcast by the node's first rank), and every rank unlinks its
own files as soon as all peers have opened them: the memory lives exactly as long as the mapping
processes, nothing is left in ``/dev/shm`` after a crash, and concurrent tests never collide.

Protocol of one exchange (sequence number ``seq`` = 1, 2, ..., the same on every rank of the
node because every rank issues the exchanges of its EP group in the same order):

1. ``begin()`` -> ``seq`` and its slot ``seq % n_slots``; before anyone writes into that slot
   again, every rank must have finished reading its previous use (``done >= seq - n_slots``).
2. writers write their rows into the slot of their peers; then ``arrive(seq)``.
3. ``wait_arrived(seq)``: every rank of the node has written (its pad entry >= seq); read.
4. ``done(seq)`` once this rank has copied out what it reads.

CPU signal pads are int64 counters in shared memory, one cache line per rank, each written only
by its owner; a reader waits until every counter reaches ``seq``, sleeping on a doorbell FIFO
that every writer rings after publishing (so a waiting rank gives its core to the ranks it waits
for).  Ordering relies on x86's total store order (the rows a rank wrote are visible
before its counter); the CUDA path uses the signal pads' acquire/release barrier instead.
"""
from __future__ import annotations

import abc
import mmap
import os
import select
import time
import uuid
import weakref
from typing import Any, Sequence

import torch
import torch.distributed as dist

_PAGE = mmap.PAGESIZE
_PAD_STRIDE = 8  # int64 per rank and counter: one 64-byte cache line each (no false sharing)
_ARRIVE, _DONE = 0, 1
DEFAULT_SLOTS = 8  # parallel.symm_slots
DEFAULT_SLOT_BYTES = 64 << 20  # parallel.symm_slot_mb (CUDA; CPU buffers grow on demand)
WAIT_TIMEOUT_S = 600.0


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class SymmBuffer(abc.ABC):
    """The node's buffers and signal pads (CPU or CUDA implementation below).

    ``peers(slot, nbytes)`` -> one uint8 tensor per local rank, each at least ``nbytes[i]``
    long (a writer may need to grow a peer's buffer before writing into it).  ``n_slots``
    exchanges can be in flight at once; a rank that starts one more before reading the oldest
    gets a clear error instead of a deadlock."""

    def __init__(self, n_ranks: int, local: int, n_slots: int):
        if n_slots < 2:
            raise ValueError(f"parallel.symm_slots must be >= 2 (symmetric exchanges in flight per rank), "
                             f"got {n_slots}")
        self.n_ranks, self.local, self.n_slots = n_ranks, local, n_slots
        self.seq = 0
        self._read: set[int] = set()  # exchanges read out of order, above the contiguous mark
        self._done_mark = 0

    # -- sequence and slot bookkeeping (shared by both implementations) ---------------------
    def begin(self) -> tuple[int, int]:
        """Next exchange: (seq, slot).  Waits until every rank has read the slot's last use."""
        oldest = self.seq + 1 - self.n_slots
        if oldest > self._done_mark:  # checked before counting it: the sequence stays in step
            raise RuntimeError(f"more than n_slots={self.n_slots} symmetric exchanges in flight on this rank "
                               f"(exchange {oldest} still unread): raise parallel.symm_slots (now {self.n_slots})")
        if oldest > 0:
            self._wait_done(oldest)
        self.seq += 1
        return self.seq, self.seq % self.n_slots

    def done(self, seq: int) -> None:
        """This rank has copied out everything it reads of exchange ``seq`` (any order)."""
        self._read.add(seq)
        while self._done_mark + 1 in self._read:
            self._done_mark += 1
            self._read.discard(self._done_mark)
        self._publish_done(self._done_mark)

    @abc.abstractmethod
    def peers(self, slot: int, nbytes: Sequence[int]) -> list[torch.Tensor]:
        """One uint8 buffer per local rank for ``slot``, each at least ``nbytes[i]`` bytes."""

    @abc.abstractmethod
    def arrive(self, seq: int) -> None:
        """Publish: this rank has written everything it writes for exchange ``seq``."""

    @abc.abstractmethod
    def wait_arrived(self, seq: int) -> None:
        """Block until every local rank has published exchange ``seq``."""

    @abc.abstractmethod
    def _wait_done(self, seq: int) -> None:
        """Block until every local rank has read exchange ``seq`` (slot reuse)."""

    @abc.abstractmethod
    def _publish_done(self, mark: int) -> None:
        """Publish this rank's contiguous read mark."""

    def close(self) -> None:
        """Release the mappings (idempotent)."""


# ------------------------------------------------------------------------------ CPU
class ShmSymmBuffer(SymmBuffer):
    """Shared-memory files mapped by every simulated rank of a virtual node.

    Collective over ``group`` (the node's ranks; None for a one-rank node): the first rank picks
    a unique name, every rank creates its slot files, opens everybody's, and unlinks its own."""

    def __init__(self, group, group_ranks: Sequence[int], local: int, n_slots: int = DEFAULT_SLOTS,
                 root: str = "/dev/shm"):
        super().__init__(len(group_ranks), local, n_slots)
        if not os.path.isdir(root):
            raise ValueError(f"shared-memory folder {root} does not exist: simulated symmetric memory "
                             "needs a tmpfs such as /dev/shm")
        name = [f"hai_symm_{os.getpid()}_{uuid.uuid4().hex}"]
        if group is not None:
            dist.broadcast_object_list(name, src=group_ranks[0], group=group)
        self.name = name[0]  # the run-unique prefix of this node's files (all unlinked after set-up)
        prefix = os.path.join(root, name[0])
        L = self.n_ranks

        def path(rank: int, slot: int) -> str:
            return f"{prefix}_r{rank}_s{slot}"

        mine = [path(local, s) for s in range(n_slots)]
        for p in mine:
            os.close(os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        pad_path = f"{prefix}_pad"
        if local == 0:
            fd = os.open(pad_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.posix_fallocate(fd, 0, _round_up(2 * L * _PAD_STRIDE * 8, _PAGE))
            os.close(fd)
            mine.append(pad_path)
        # doorbell: a FIFO per rank; a writer rings every peer's after publishing its counter,
        # so a waiting rank sleeps in the kernel instead of polling (and leaves the CPU to the
        # ranks it waits for: simulated ranks share few cores)
        bell = f"{prefix}_bell{local}"
        os.mkfifo(bell, 0o600)
        mine.append(bell)
        self._bell = os.open(bell, os.O_RDWR | os.O_NONBLOCK)  # read end (RDWR: never EOF)
        self._barrier(group)
        self._fds = [[os.open(path(r, s), os.O_RDWR) for s in range(n_slots)] for r in range(L)]
        pad_fd = os.open(pad_path, os.O_RDWR)
        self._rings = [os.open(f"{prefix}_bell{r}", os.O_WRONLY | os.O_NONBLOCK) for r in range(L) if r != local]
        self._barrier(group)
        for p in mine:  # every peer holds a descriptor now: the memory lives as long as they do
            os.unlink(p)
        self._pad_map = mmap.mmap(pad_fd, _round_up(2 * L * _PAD_STRIDE * 8, _PAGE))
        os.close(pad_fd)
        self._pad = torch.frombuffer(self._pad_map, dtype=torch.int64)[:2 * L * _PAD_STRIDE].view(2, L, _PAD_STRIDE)
        self._maps: dict[tuple[int, int], tuple[mmap.mmap, torch.Tensor]] = {}
        self._finalizer = weakref.finalize(self, ShmSymmBuffer._release, self._fds + [[self._bell] + self._rings],
                                           self._maps)

    @staticmethod
    def _barrier(group) -> None:
        if group is not None:
            dist.barrier(group=group)

    @staticmethod
    def _release(fds, maps) -> None:
        maps.clear()  # tensors viewing a map keep it alive; dropping ours lets it unmap
        for row in fds:
            for fd in row:
                try:
                    os.close(fd)
                except OSError:
                    pass
        fds.clear()

    def close(self) -> None:
        self._finalizer()

    def _map(self, rank: int, slot: int, nbytes: int) -> torch.Tensor:
        """This process's mapping of (rank, slot), grown to at least ``nbytes`` (and a page)."""
        nbytes = max(nbytes, 1)
        have = self._maps.get((rank, slot))
        if have is not None and have[1].numel() >= nbytes:
            return have[1]
        fd = self._fds[rank][slot]
        size = os.fstat(fd).st_size
        if size < nbytes:  # grow: powers of two, at least a page; fallocate never shrinks
            want = max(_PAGE, 1 << (nbytes - 1).bit_length())
            os.posix_fallocate(fd, 0, want)
            size = os.fstat(fd).st_size
        m = mmap.mmap(fd, size)
        t = torch.frombuffer(m, dtype=torch.uint8)
        self._maps[(rank, slot)] = (m, t)
        return t

    def peers(self, slot: int, nbytes: Sequence[int]) -> list[torch.Tensor]:
        return [self._map(r, slot, int(n)) for r, n in enumerate(nbytes)]

    def _late(self, counter: int, seq: int) -> list[int]:
        col = self._pad[counter, :, 0]
        return [r for r in range(self.n_ranks) if int(col[r]) < seq]

    def _timeout(self, counter: int, seq: int, what: str) -> RuntimeError:
        return RuntimeError(f"symmetric buffer: local ranks {self._late(counter, seq)} did not {what} exchange "
                            f"{seq} within {WAIT_TIMEOUT_S:.0f} s (a rank died or issued exchanges in a "
                            "different order)")

    def arrive(self, seq: int) -> None:
        self._pad[_ARRIVE, self.local, 0] = seq  # the rows written before are visible first (x86 TSO)
        for fd in self._rings:
            try:
                os.write(fd, b"\1")
            except BlockingIOError:  # the pipe is full of unread rings: its reader will wake anyway
                pass
            except BrokenPipeError:  # the peer saw the counter, finished and closed its buffer
                pass

    def wait_arrived(self, seq: int) -> None:
        """Sleep on the doorbell until every counter reaches ``seq``.  No lost wake-up: a writer
        sets its counter BEFORE ringing, and the counters are re-read after every wake-up."""
        col = self._pad[_ARRIVE, :, 0]
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while int(col.min()) < seq:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout(_ARRIVE, seq, "write")
            ready, _, _ = select.select([self._bell], [], [], min(left, 1.0))
            if ready:
                try:
                    os.read(self._bell, 4096)  # drain: any ring means "re-read the counters"
                except BlockingIOError:
                    pass

    def _publish_done(self, mark: int) -> None:
        self._pad[_DONE, self.local, 0] = mark

    def _wait_done(self, seq: int) -> None:
        """Poll with back-off (rare: only when a slot comes round while a peer still reads it)."""
        col = self._pad[_DONE, :, 0]
        t0, k = time.monotonic(), 0
        while int(col.min()) < seq:
            k += 1
            time.sleep(min(1e-3, 1e-5 * k))
            if time.monotonic() - t0 > WAIT_TIMEOUT_S:
                raise self._timeout(_DONE, seq, "finish reading")


# ------------------------------------------------------------------------------ CUDA
class CudaSymmBuffer(SymmBuffer):
    """``torch.distributed._symmetric_memory`` over the node's process group.

    One allocation of ``n_slots * slot_bytes`` per rank, rendezvoused once (collective over
    ``group``); slot s of peer r is ``get_buffer(r, ...)[s * slot_bytes:]``.  Phases are ordered
    on the current stream by the handle's signal-pad barrier (``barrier(channel)``), used for both
    "arrived" and "done" (a barrier already implies every rank's earlier reads are queued before
    it).  Capacity is fixed: an exchange that needs more raises, naming parallel.symm_slot_mb."""

    def __init__(self, group, group_ranks: Sequence[int], local: int, device: torch.device,
                 slot_bytes: int, n_slots: int = DEFAULT_SLOTS):
        super().__init__(len(group_ranks), local, n_slots)
        import torch.distributed._symmetric_memory as symm_mem

        self.slot_bytes = _round_up(slot_bytes, 4096)
        total = self.slot_bytes * n_slots
        self._buf = symm_mem.empty(total, dtype=torch.uint8, device=device)
        group_name = (group if group is not None else dist.group.WORLD).group_name
        self._hdl: Any = symm_mem.rendezvous(self._buf, group_name)
        self._peer_bufs = [self._hdl.get_buffer(r, (total,), torch.uint8) for r in range(self.n_ranks)]

    def peers(self, slot: int, nbytes: Sequence[int]) -> list[torch.Tensor]:
        check_slot_capacity(max((int(n) for n in nbytes), default=0), self.slot_bytes)
        lo = slot * self.slot_bytes
        return [b[lo:lo + self.slot_bytes] for b in self._peer_bufs]

    def arrive(self, seq: int) -> None:
        """Stream-ordered: the barrier below both publishes this rank's writes and waits."""

    def wait_arrived(self, seq: int) -> None:
        self._hdl.barrier(channel=0)

    def _publish_done(self, mark: int) -> None:
        """Stream-ordered: covered by the next slot reuse's barrier."""

    def _wait_done(self, seq: int) -> None:
        self._hdl.barrier(channel=1)


def check_slot_capacity(need: int, slot_bytes: int) -> None:
    """Raise, naming the config key and the value that fits, when one rank's share of an
    exchange (``need`` bytes) does not fit a fixed CUDA slot of ``slot_bytes``."""
    if need > slot_bytes:
        mb = -(-need // (1 << 20))
        raise ValueError(f"a symmetric exchange needs {need} bytes per rank but a slot holds {slot_bytes} "
                         f"(parallel.symm_slot_mb={slot_bytes >> 20}): set parallel.symm_slot_mb={mb} or more")


def build_symm_buffer(device: torch.device, group, group_ranks: Sequence[int], local: int,
                      n_slots: int = DEFAULT_SLOTS, slot_bytes: int = DEFAULT_SLOT_BYTES) -> SymmBuffer:
    """The node's symmetric buffer for tensors on ``device``: shared-memory files for CPU
    tensors, ``torch.distributed._symmetric_memory`` for CUDA ones.  Collective over ``group``."""
    if device.type == "cuda":
        return CudaSymmBuffer(group, group_ranks, local, device, slot_bytes, n_slots)
    if device.type != "cpu":
        raise ValueError(f"the symmetric transport runs on CPU (shared memory) or CUDA, not {device.type}")
    return ShmSymmBuffer(group, group_ranks, local, n_slots)
