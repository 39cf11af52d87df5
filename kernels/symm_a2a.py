"""Expert all-to-all over symmetric memory: rows written straight into peer ranks' buffers
(dispatch) and expert outputs read back from them and summed (combine).

Why this exists: the flat and hierarchical transports move every row through
``all_to_all_single`` (NCCL on GPUs, gloo here).  Inside a node every rank can map every peer's
receive buffer (CUDA: ``torch.distributed._symmetric_memory``; CPU: shared-memory files, see
``hai_llm/parallel/symm_buffer.py``), so one kernel can write each row directly where its
receiver wants it, and one kernel can read the expert outputs back and sum them: the design of
DeepEP's intra-node path and of PyTorch's symmetric-memory MoE primitives
(docs/expert_parallel.md, "Symmetric transport").

Memory protocol shared by the kernels and their references: ``peers`` is the list of the node's
buffers (uint8 tensors, one per local rank, each mapped in this process); a row of the exchange
is ``width`` bytes; row ``offset[r]`` of peer ``dest[r]`` starts at byte ``offset[r] * width``.
The offsets are exclusive prefix sums of the per-pair row counts (the transport computes them
from counts exchanged first), so writers never collide and the receiver's buffer holds the rows
in the order an ``all_to_all_single`` would have delivered them.

Public API (``*_ref`` are pure torch on the same memory; ``use_triton=None`` = Triton exactly
for CUDA tensors, as every kernel of this package):

* ``symm_scatter(src, row_index, peers, dest, offset, width, col=0)``: peer[dest[r]] row
  offset[r], bytes [col, col + src row bytes) <- src[row_index[r]] (the dispatch's write phase;
  ``src`` is the packed payload: compute-dtype rows, or FP8 bytes + fp32 tile scales, plus the
  routing weight, so an FP8 dispatch writes its FP8 payload and scales in the same pass).
* ``symm_gather(peers, dest, offset, width, col, nbytes)``: the inverse, rows read from peers.
* ``symm_combine(peers, dest, offset, width, dtype, dim, dst_index, n_out)``: out[c] = sum over
  rows r with dst_index[r] == c, in ascending r, of the ``dtype`` row [0, dim) read from peer
  dest[r] at offset[r]; fp32 accumulation from 0, one rounding to ``dtype``: exactly
  ``unpermute_combine`` with unit weights (``kernels/moe_permute.py``), so results are
  bit-identical to the transports that sum received rows.

Pointers: a kernel receives one base pointer (peer 0's buffer, viewed in the element type) and
per-peer element deltas ``(address(peer d) - address(peer 0)) / itemsize``; every mapping is page
aligned, so the deltas are exact.  On a GPU the peers are symmetric-memory allocations mapped in
one address space; under ``TRITON_INTERPRET=1`` they are shared-memory files mapped by this
process, written by the other ranks' processes: real cross-process memory in both cases.

Tunables (``SymmKernelConfig``): ``block_rows`` rows per program step, ``channels`` programs per
launch (each strides over row blocks: the number of SMs a communication kernel occupies on a GPU,
DeepEP's "channels").  Copies move the widest word (8/4/2/1 bytes) that divides the row width,
the column offset and the copied bytes.  No atomics: writers own disjoint rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from hai_llm.kernels.moe_permute import _round_to_bf16, unpermute_combine_ref
from hai_llm.kernels.policy import resolve_use_triton

_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))
_SUM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class SymmKernelConfig:
    """Launch shape of the symmetric-memory kernels (docs/expert_parallel.md lists the H800
    starting values and why).  ``block_rows``: rows per program step (power of two);
    ``channels``: programs per launch, each striding over the row blocks (0 = one program per
    block); ``block_cols``: column tile in words (power of two)."""

    block_rows: int = 16
    channels: int = 0
    block_cols: int = 256

    def __post_init__(self) -> None:
        for name in ("block_rows", "block_cols"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"SymmKernelConfig.{name} must be a power of two >= 1, got {v}")
        if not isinstance(self.channels, int) or self.channels < 0:
            raise ValueError(f"SymmKernelConfig.channels must be an int >= 0, got {self.channels}")

    def grid(self, rows: int) -> tuple[int, int]:
        """(programs, row blocks): ``channels`` programs at most, each striding over blocks."""
        blocks = triton.cdiv(rows, self.block_rows)
        return (blocks if self.channels == 0 else max(1, min(self.channels, blocks))), blocks


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _symm_scatter_kernel(src_ptr, row_idx_ptr, base_ptr, delta_ptr, dest_ptr, off_ptr, R, SRC_W,
                         DST_W, COL, N_BLOCKS, N_PROGS, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    # Program p handles row blocks p, p + N_PROGS, ...; rows r of a block: word c of
    # src[row_idx[r]] -> peer dest[r], word offset[r] * DST_W + COL + c (units of one word).
    for blk in range(tl.program_id(0), N_BLOCKS, N_PROGS):
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < R
        srow = tl.load(row_idx_ptr + rows, mask=ok, other=0).to(tl.int64)
        d = tl.load(dest_ptr + rows, mask=ok, other=0)
        row = tl.load(off_ptr + rows, mask=ok, other=0).to(tl.int64)
        dst = tl.load(delta_ptr + d, mask=ok, other=0) + row * DST_W + COL
        for c0 in range(0, SRC_W, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m = ok[:, None] & (cols < SRC_W)[None, :]
            v = tl.load(src_ptr + srow[:, None] * SRC_W + cols[None, :], mask=m)
            tl.store(base_ptr + dst[:, None] + cols[None, :], v, mask=m)


@triton.jit
def _symm_gather_kernel(base_ptr, delta_ptr, dest_ptr, off_ptr, out_ptr, R, SRC_W, OUT_W, COL,
                        N_BLOCKS, N_PROGS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # out[r, c] = word COL + c of row offset[r] of peer dest[r]
    for blk in range(tl.program_id(0), N_BLOCKS, N_PROGS):
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < R
        d = tl.load(dest_ptr + rows, mask=ok, other=0)
        row = tl.load(off_ptr + rows, mask=ok, other=0).to(tl.int64)
        src = tl.load(delta_ptr + d, mask=ok, other=0) + row * SRC_W + COL
        for c0 in range(0, OUT_W, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m = ok[:, None] & (cols < OUT_W)[None, :]
            v = tl.load(base_ptr + src[:, None] + cols[None, :], mask=m)
            tl.store(out_ptr + rows[:, None].to(tl.int64) * OUT_W + cols[None, :], v, mask=m)


@triton.jit
def _symm_combine_kernel(base_ptr, delta_ptr, dest_ptr, off_ptr, order_ptr, row_ptr_ptr, out_ptr,
                         n_out, D, ROW_W, N_BLOCKS, N_PROGS, OUT_BF16: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # Output row c owns the CSR slice order[row_ptr[c]:row_ptr[c+1]] (its rows in ascending r);
    # step j adds every output's j-th row, read from its peer: the summation order of
    # unpermute_combine with unit weights (1.0 * v == v exactly, so no product is formed).
    for blk in range(tl.program_id(0), N_BLOCKS, N_PROGS):
        outs = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = outs < n_out
        start = tl.load(row_ptr_ptr + outs, mask=ok, other=0)
        count = tl.load(row_ptr_ptr + outs + 1, mask=ok, other=0) - start
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            for j in range(0, tl.max(count, axis=0)):
                live = j < count
                r = tl.load(order_ptr + start + j, mask=live, other=0)
                d = tl.load(dest_ptr + r, mask=live, other=0)
                row = tl.load(off_ptr + r, mask=live, other=0).to(tl.int64)
                src = tl.load(delta_ptr + d, mask=live, other=0) + row * ROW_W
                v = tl.load(base_ptr + src[:, None] + cols[None, :], mask=live[:, None] & col_ok[None, :],
                            other=0.0).to(tl.float32)
                acc = acc + v  # masked lanes add +0.0, which leaves acc unchanged
            if OUT_BF16:
                acc = _round_to_bf16(acc)
            tl.store(out_ptr + outs[:, None].to(tl.int64) * D + cols[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------------
# validation and pointer helpers
# --------------------------------------------------------------------------------------------------
def _check_peers(peers: Sequence[torch.Tensor], width: int, rows_needed: Sequence[int] | None = None) -> None:
    if not peers:
        raise ValueError("peers must list the node's buffers (one uint8 tensor per local rank)")
    dev = peers[0].device
    for i, p in enumerate(peers):
        if not isinstance(p, torch.Tensor) or p.dtype != torch.uint8 or p.dim() != 1 or not p.is_contiguous():
            raise ValueError(f"peers[{i}] must be a contiguous 1-D uint8 buffer, got "
                             f"{getattr(p, 'dtype', type(p))} {getattr(p, 'shape', '')}")
        if p.device != dev:
            raise ValueError(f"peers[{i}] is on {p.device}, peers[0] on {dev}: map every peer on one device")
        if rows_needed is not None and rows_needed[i] * width > p.numel():
            raise ValueError(f"peers[{i}] holds {p.numel()} bytes but {rows_needed[i]} rows of {width} "
                             "bytes are addressed: grow the symmetric buffer first")
    if not isinstance(width, int) or width < 0:
        raise ValueError(f"width must be a non-negative int (bytes per row), got {width}")


def _check_rows(dest: torch.Tensor, offset: torch.Tensor, n_peers: int, device) -> None:
    for name, t in (("dest", dest), ("offset", offset)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {getattr(t, 'shape', type(t))}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the buffers are on {device}; move it")
    if dest.numel() != offset.numel():
        raise ValueError(f"dest ({dest.numel()}) and offset ({offset.numel()}) need one entry per row")


def _word(*byte_counts: int) -> tuple[int, torch.dtype]:
    for size, dtype in _WORDS:
        if all(b % size == 0 for b in byte_counts):
            return size, dtype
    return 1, torch.uint8


def _deltas(peers: Sequence[torch.Tensor], itemsize: int) -> torch.Tensor:
    """int64 [P] element offsets of each peer's buffer from peer 0's (page-aligned: exact)."""
    base = peers[0].data_ptr()
    out = []
    for p in peers:
        diff = p.data_ptr() - base
        if diff % itemsize:
            raise ValueError("peer buffers must be aligned to the copy word; map them page-aligned")
        out.append(diff // itemsize)
    return torch.tensor(out, dtype=torch.int64).to(peers[0].device, non_blocking=True)


def _runnable(t: torch.Tensor) -> None:
    interpreted = not isinstance(_symm_scatter_kernel, triton.runtime.JITFunction)
    if t.device.type == "cpu" and not interpreted:
        raise ValueError("use_triton=True needs GPU tensors; for CPU tensors pass use_triton=False "
                         "or set TRITON_INTERPRET=1 before hai_llm.kernels is imported")


def _rows_view(peer: torch.Tensor, width: int) -> torch.Tensor:
    n = peer.numel() // width if width else 0
    return peer[:n * width].view(n, width)


# --------------------------------------------------------------------------------------------------
# scatter (dispatch write phase)
# --------------------------------------------------------------------------------------------------
def _by_peer(dest: torch.Tensor, n_peers: int):
    """(rows sorted by peer (stable), rows per peer as ints): one host read, reference only."""
    order = torch.argsort(dest, stable=True)
    counts = torch.zeros(n_peers, dtype=torch.int64, device=dest.device).scatter_add_(
        0, dest.long(), torch.ones_like(dest, dtype=torch.int64))
    return order, counts.tolist()


def symm_scatter_ref(src: torch.Tensor, row_index: torch.Tensor, peers: Sequence[torch.Tensor],
                     dest: torch.Tensor, offset: torch.Tensor, width: int, col: int = 0) -> None:
    """Pure torch, same protocol: rows grouped by destination peer (one host read for the group
    sizes; the reference never runs on a GPU hot path), then one indexed copy per peer, in the
    widest word that divides the widths (as the kernel moves them)."""
    nb = src.shape[1] * src.element_size() if src.dim() == 2 else 0
    if dest.numel() == 0 or nb == 0:
        return
    wsize, wdtype = _word(width, col, nb)
    words = src.contiguous().view(torch.uint8).view(src.shape[0], nb).view(wdtype)
    order, counts = _by_peer(dest, len(peers))
    rows, offs = words.index_select(0, row_index[order].long()), offset[order].long()
    start = 0
    for d, n in enumerate(counts):
        if n:
            view = _rows_view(peers[d], width).view(wdtype)
            if col == 0 and nb == width:
                view.index_copy_(0, offs[start:start + n], rows[start:start + n])
            else:
                view[offs[start:start + n], col // wsize:(col + nb) // wsize] = rows[start:start + n]
        start += n


def symm_scatter(src: torch.Tensor, row_index: torch.Tensor, peers: Sequence[torch.Tensor],
                 dest: torch.Tensor, offset: torch.Tensor, width: int, col: int = 0, *,
                 cfg: SymmKernelConfig = SymmKernelConfig(), use_triton: bool | None = None) -> None:
    """Write ``src[row_index[r]]`` (its bytes) at byte ``col`` of row ``offset[r]`` of peer
    ``dest[r]`` (rows of ``width`` bytes).  ``src``: 2-D, any dtype (packed payload rows)."""
    if not isinstance(src, torch.Tensor) or src.dim() != 2 or not src.is_contiguous():
        raise ValueError(f"src must be a contiguous 2-D tensor, got {getattr(src, 'shape', type(src))}")
    _check_peers(peers, width)
    _check_rows(dest, offset, len(peers), peers[0].device)
    if row_index.shape != dest.shape or row_index.device != dest.device:
        raise ValueError("row_index needs one source row per destination row, on the same device")
    nb = src.shape[1] * src.element_size()
    if col < 0 or col + nb > width:
        raise ValueError(f"bytes [{col}, {col + nb}) do not fit in rows of {width} bytes")
    R = dest.numel()
    if R == 0 or nb == 0:
        return
    if not resolve_use_triton(use_triton, src):
        return symm_scatter_ref(src, row_index, peers, dest, offset, width, col)
    _runnable(src)
    wsize, wdtype = _word(width, col, nb, *(p.numel() for p in peers))
    base = peers[0].view(wdtype)
    programs, blocks = cfg.grid(R)
    _symm_scatter_kernel[(programs,)](src.view(torch.uint8).view(wdtype), row_index.contiguous(), base,
                                      _deltas(peers, wsize), dest.contiguous(), offset.contiguous(), R,
                                      nb // wsize, width // wsize, col // wsize, blocks, programs,
                                      BLOCK_R=cfg.block_rows,
                                      BLOCK_C=min(cfg.block_cols, triton.next_power_of_2(nb // wsize)))


# --------------------------------------------------------------------------------------------------
# gather (rows read back from peers, unsummed)
# --------------------------------------------------------------------------------------------------
def symm_gather_ref(peers: Sequence[torch.Tensor], dest: torch.Tensor, offset: torch.Tensor, width: int,
                    col: int, nbytes: int) -> torch.Tensor:
    """Pure torch, same protocol: one indexed read per peer, rows back in their order."""
    out = torch.empty(dest.numel(), nbytes, dtype=torch.uint8, device=peers[0].device)
    if dest.numel() == 0 or nbytes == 0:
        return out
    wsize, wdtype = _word(width, col, nbytes)
    ow = out.view(wdtype)
    order, counts = _by_peer(dest, len(peers))
    offs = offset[order].long()
    start = 0
    for d, n in enumerate(counts):
        if n:
            view = _rows_view(peers[d], width).view(wdtype)
            ow[order[start:start + n]] = view[offs[start:start + n], col // wsize:(col + nbytes) // wsize]
        start += n
    return out


def symm_gather(peers: Sequence[torch.Tensor], dest: torch.Tensor, offset: torch.Tensor, width: int,
                col: int, nbytes: int, *, cfg: SymmKernelConfig = SymmKernelConfig(),
                use_triton: bool | None = None) -> torch.Tensor:
    """uint8 [R, nbytes]: bytes [col, col + nbytes) of row ``offset[r]`` of peer ``dest[r]``."""
    _check_peers(peers, width)
    _check_rows(dest, offset, len(peers), peers[0].device)
    if col < 0 or nbytes < 0 or col + nbytes > width:
        raise ValueError(f"bytes [{col}, {col + nbytes}) do not fit in rows of {width} bytes")
    R = dest.numel()
    if R == 0 or nbytes == 0 or not resolve_use_triton(use_triton, peers[0]):
        return symm_gather_ref(peers, dest, offset, width, col, nbytes)
    _runnable(peers[0])
    wsize, wdtype = _word(width, col, nbytes, *(p.numel() for p in peers))
    out = torch.empty(R, nbytes, dtype=torch.uint8, device=peers[0].device)
    programs, blocks = cfg.grid(R)
    _symm_gather_kernel[(programs,)](peers[0].view(wdtype), _deltas(peers, wsize), dest.contiguous(),
                                     offset.contiguous(), out.view(wdtype), R, width // wsize,
                                     nbytes // wsize, col // wsize, blocks, programs,
                                     BLOCK_R=cfg.block_rows,
                                     BLOCK_C=min(cfg.block_cols, triton.next_power_of_2(nbytes // wsize)))
    return out


# --------------------------------------------------------------------------------------------------
# blocked rows (pure torch): the references specialised to what the transport's plans produce
# --------------------------------------------------------------------------------------------------
# A forwarder's stage-2 rows are sorted by destination and land at consecutive rows there
# (offset = base[d] + index among its rows for d), so the per-row protocol above reduces to one
# contiguous block per peer.  The transport moves CPU tensors this way (a slice copy per peer:
# no sort, no host read); the Triton kernels take the general per-row form.
def symm_put_blocks(rows: torch.Tensor, peers: Sequence[torch.Tensor], splits: Sequence[int],
                    bases: Sequence[int], width: int) -> None:
    """Peer d rows [bases[d], bases[d] + splits[d]) <- the next splits[d] rows of ``rows``
    (uint8 [sum(splits), width], in peer order)."""
    _check_peers(peers, width, [b + n for b, n in zip(bases, splits)])
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape != (sum(splits), width):
        raise ValueError(f"rows must be uint8 [{sum(splits)}, {width}], got {rows.dtype} {tuple(rows.shape)}")
    start = 0
    for peer, n, b in zip(peers, splits, bases):
        if n:
            _rows_view(peer, width)[b:b + n].copy_(rows[start:start + n])
        start += n


def symm_get_blocks(peers: Sequence[torch.Tensor], splits: Sequence[int], bases: Sequence[int],
                    width: int) -> torch.Tensor:
    """uint8 [sum(splits), width]: rows [bases[d], bases[d] + splits[d]) of every peer d, in order."""
    _check_peers(peers, width, [b + n for b, n in zip(bases, splits)])
    blocks = [_rows_view(peer, width)[b:b + n] for peer, n, b in zip(peers, splits, bases) if n]
    if not blocks:
        return torch.empty(0, width, dtype=torch.uint8, device=peers[0].device)
    return torch.cat(blocks) if len(blocks) > 1 else blocks[0].clone()


# --------------------------------------------------------------------------------------------------
# combine (rows read from peers and summed in the canonical order)
# --------------------------------------------------------------------------------------------------
def _csr(dst_index: torch.Tensor, n_out: int):
    """Rows grouped by output, ascending r inside an output (stable sort); -1 rows sort last."""
    key = torch.where(dst_index < 0, n_out, dst_index.long())
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(n_out + 1, dtype=torch.int64, device=dst_index.device).scatter_add_(
        0, key, torch.ones_like(key))[:n_out]
    row_ptr = torch.zeros(n_out + 1, dtype=torch.int64, device=dst_index.device)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    return order, row_ptr


def symm_combine_ref(peers: Sequence[torch.Tensor], dest: torch.Tensor, offset: torch.Tensor, width: int,
                     dtype: torch.dtype, dim: int, dst_index: torch.Tensor, n_out: int) -> torch.Tensor:
    """Pure torch: gather the rows, then ``unpermute_combine_ref`` with unit weights."""
    rows = symm_gather_ref(peers, dest, offset, width, 0, dim * dtype.itemsize).view(dtype)
    ones = torch.ones(rows.shape[0], dtype=torch.float32, device=rows.device)
    if n_out == 0 or dim == 0 or rows.shape[0] == 0:
        return torch.zeros(n_out, dim, dtype=dtype, device=rows.device)
    return unpermute_combine_ref(rows, dst_index, ones, n_out)


def symm_combine(peers: Sequence[torch.Tensor], dest: torch.Tensor, offset: torch.Tensor, width: int,
                 dtype: torch.dtype, dim: int, dst_index: torch.Tensor, n_out: int, *,
                 cfg: SymmKernelConfig = SymmKernelConfig(), use_triton: bool | None = None) -> torch.Tensor:
    """[n_out, dim] in ``dtype``: out[c] = 0 + rows r with dst_index[r] == c in ascending r (fp32,
    one rounding to ``dtype``); row r = the first ``dim`` ``dtype`` values of row ``offset[r]`` of
    peer ``dest[r]``.  Rows with ``dst_index == -1`` are ignored; outputs without rows are 0."""
    _check_peers(peers, width)
    _check_rows(dest, offset, len(peers), peers[0].device)
    if dtype not in _SUM_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if dim * dtype.itemsize > width or width % dtype.itemsize:
        raise ValueError(f"{dim} {dtype} values do not fit rows of {width} bytes (or the width is not "
                         f"a multiple of {dtype.itemsize})")
    if dst_index.shape != dest.shape:
        raise ValueError("dst_index needs one output row per row read")
    R = dest.numel()
    if n_out == 0 or dim == 0 or R == 0:
        return torch.zeros(n_out, dim, dtype=dtype, device=peers[0].device)
    if not resolve_use_triton(use_triton, peers[0]):
        return symm_combine_ref(peers, dest, offset, width, dtype, dim, dst_index, n_out)
    _runnable(peers[0])
    order, row_ptr = _csr(dst_index, n_out)
    out = torch.empty(n_out, dim, dtype=dtype, device=peers[0].device)
    block_d = min(triton.next_power_of_2(dim), 512)
    block_t = max(1, min(cfg.block_rows, triton.next_power_of_2(n_out)))
    blocks = triton.cdiv(n_out, block_t)
    programs = blocks if cfg.channels == 0 else max(1, min(cfg.channels, blocks))
    # enable_fp_fusion=False: no FMA contraction, so GPU sums follow the documented roundings
    _symm_combine_kernel[(programs,)](peers[0].view(dtype), _deltas(peers, dtype.itemsize), dest.contiguous(),
                                      offset.contiguous(), order, row_ptr, out, n_out, dim,
                                      width // dtype.itemsize, blocks, programs,
                                      OUT_BF16=dtype == torch.bfloat16, BLOCK_T=block_t, BLOCK_D=block_d,
                                      enable_fp_fusion=False)
    return out
