"""Piecewise stage execution: the B/W (input-grad / weight-grad) split and the overlapped
forward & backward pair (the report's "F&B", Figure 4).

Pieces.  A stage's forward for one micro-batch is cut into *pieces* that mirror DeepSeek-V3's
chunk split: per transformer block an ``attn`` piece (attention with its residual, the FFN norm
and the router; under expert parallelism it ends by ISSUING the dispatch all-to-all) and an
``mlp`` piece (waits for the dispatch, runs the experts and the shared experts, ISSUES the
combine all-to-all).  The combine is waited at the start of the next piece (the residual add
of the block, merged into the next block's ``attn`` piece, or the stage's tail).  Dense blocks
have the same two pieces without communication; the first stage's embedding and the last
stage's head / cross-entropy / MTP modules are pieces too.

Autograd boundaries.  Every tensor a piece hands to a later piece crosses as a detached leaf
(``t.detach().requires_grad_()``), so each piece has its own autograd graph and its backward
can run on its own: ``torch.autograd.backward(piece outputs, their leaves' grads)``.  Running
the pieces' backwards in reverse order computes exactly the chain rule of the whole stage
(a leaf read by several pieces accumulates all their contributions before its producer's
backward runs).  The asynchronous all-to-alls of ``hai_llm.parallel.expert`` are pairs of
autograd functions (start / wait) whose backwards issue / wait the reverse exchange, so the
dispatch backward is issued at the end of an ``mlp`` backward piece and waited at the start of
the ``attn`` backward piece: communication stays in flight between pieces in both directions.

B / W split (ZeroBubble).  :func:`install_weight_grad_split` routes every plain ``nn.Linear``
and ``GroupedExperts`` GEMM of a model through autograd functions whose backward computes only
the input gradient and hands the weight-gradient GEMM, as a closure over (input, grad_output),
to a :class:`WeightGradStore`.  While the executor runs an input-grad backward ``B`` the store
collects those closures; the matching ``W`` action runs them later (deferred into bubbles).
Without a collecting sink they run at once, so plain ``loss.backward()`` is unaffected.  Small
parameters (RMSNorm weights, the router's gate, the embedding, FP8-converted linears) still get
their gradients in ``B``: negligible work, and exact either way.

Overlapped pair.  :func:`run_overlapped` interleaves the forward pieces of one micro-batch with
the backward pieces (each followed at once by its weight-gradient closures) of another, aligned
by slot, so in the steady state of a block pair the order is the report's
``MLP(B) MLP(W) MLP(F) ATTN(B) ATTN(W) ATTN(F)``: the dispatch issued by ``ATTN(F)`` is in
flight during ``MLP(B) MLP(W)``, the combine-backward issued by ``ATTN(B)`` during
``ATTN(W) ATTN(F)``, the dispatch-backward issued by ``MLP(B)`` during ``MLP(W) MLP(F)`` and the
combine issued by ``MLP(F)`` during ``ATTN(B) ATTN(W)``.  The pipeline send of the forward
output leaves as soon as the forward half ends (``on_forward_done``), before the backward half
finishes.  Every rank of an expert-parallel group runs the same program, so collectives are
issued in the same order everywhere (checked by tests/test_pipeline_runtime.py).
"""
from __future__ import annotations

import time
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hai_llm.model.layers import maybe_recompute
from hai_llm.model.moe import GroupedExperts, MoE, grouped_mm


# ====================================================================== weight-grad split
class WeightGradStore:
    """Collects deferred weight-gradient closures while a sink is open; runs them at once
    otherwise.  One per executor (no module-level state)."""

    def __init__(self) -> None:
        self._sink: Optional[list] = None

    def defer(self, fn: Callable[[], None]) -> None:
        if self._sink is None:
            with torch.no_grad():
                fn()
        else:
            self._sink.append(fn)

    @contextmanager
    def collect(self, sink: list):
        prev, self._sink = self._sink, sink
        try:
            yield sink
        finally:
            self._sink = prev


@torch.no_grad()
def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class _LinearFn(torch.autograd.Function):
    """y = x W^T (+ b) with the weight-gradient GEMM deferred to the store."""

    @staticmethod
    def forward(ctx, x, weight, bias, store, cast):
        dev = x.device.type
        with torch.autocast(dev, enabled=False):
            xc = x.to(cast) if cast is not None else x
            wc = weight.to(cast) if cast is not None else weight
            bc = None if bias is None else (bias.to(cast) if cast is not None else bias)
            y = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc)
        ctx.params = (weight, bias)
        ctx.store = store
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, wc = ctx.saved_tensors
        weight, bias = ctx.params
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = None
        if ctx.needs_input_grad[0]:
            gx = g2.mm(wc).view(*gy.shape[:-1], wc.shape[1]).to(ctx.x_dtype)
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            x2 = xc.reshape(-1, xc.shape[-1])

            def wgrad(weight=weight, bias=bias, x2=x2, g2=g2):
                if weight.requires_grad:
                    _accumulate(weight, x2.t().mm(g2).t())
                if bias is not None and bias.requires_grad:
                    _accumulate(bias, g2.sum(0))

            ctx.store.defer(wgrad)
        return gx, None, None, None, None


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _LinearFn.apply(x, self.weight, self.bias, self._wgrad_store, _autocast_dtype(x))


def _padded_rows(counts_E: torch.Tensor, R: int, device):
    E = counts_E.numel()
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=device), counts_E)
    start = counts_E.cumsum(0) - counts_E
    pos = torch.arange(R, device=device) - start[expert_of_row]
    return expert_of_row, pos, int(counts_E.max()) if E else 0


def _grouped_kernel(x: torch.Tensor, w: torch.Tensor):
    """The grouped-GEMM kernel ``grouped_mm`` uses for these dtypes, or None (padded bmm)."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is not None and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and w.dtype == x.dtype:
        return fn
    return None


class _GroupedMMFn(torch.autograd.Function):
    """``grouped_mm(x, w, counts)`` with the weight-gradient deferred to the store.

    The backward mirrors autograd of whichever path ``grouped_mm`` takes, op for op: the
    grouped kernel (input grad ``gmm(gy, w)``, weight grad ``gmm(x^T, gy)^T`` with the same
    offsets) or the zero-padded bmm of other dtypes.
    """

    @staticmethod
    def forward(ctx, x, w, counts, store):
        y = grouped_mm(x, w, counts)
        ctx.save_for_backward(x, w, counts)
        ctx.store = store
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, counts = ctx.saved_tensors
        R, E = x.shape[0], w.shape[0]
        if R == 0:
            if w.requires_grad:
                ctx.store.defer(lambda: _accumulate(w, torch.zeros_like(w)))
            return x.new_zeros(x.shape), None, None, None
        gy = gy.contiguous()
        kernel = _grouped_kernel(x, w)
        if kernel is not None:
            offs = counts.cumsum(0).to(torch.int32)
            gx = kernel(gy, w, offs=offs)
            if w.requires_grad:
                def wgrad(x=x, gy=gy, offs=offs, w=w):
                    _accumulate(w, kernel(x.transpose(-2, -1), gy, offs=offs).transpose(-2, -1))

                ctx.store.defer(wgrad)
            return gx.to(x.dtype), None, None, None
        e, pos, cap = _padded_rows(counts, R, x.device)
        g_buf = gy.new_zeros(E, cap, gy.shape[1]).index_put((e, pos), gy, accumulate=True)
        gx = torch.bmm(g_buf, w.to(gy.dtype))[e, pos]
        if w.requires_grad:
            def wgrad(x=x, g_buf=g_buf, e=e, pos=pos, cap=cap, w=w):
                buf = x.new_zeros(E, cap, x.shape[1]).index_put((e, pos), x)
                _accumulate(w, torch.bmm(buf.transpose(1, 2), g_buf.to(buf.dtype)).transpose(1, 2))

            ctx.store.defer(wgrad)
        return gx.to(x.dtype), None, None, None


def _experts_forward(self: GroupedExperts, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    st = self._wgrad_store

    def gmm(a, w):
        return _GroupedMMFn.apply(a, w, counts_E, st)

    h = F.silu(gmm(x_RD, self.w1)) * gmm(x_RD, self.w3)
    return gmm(h, self.w2)


def install_weight_grad_split(model: nn.Module, store: WeightGradStore) -> int:
    """Route the GEMMs of every plain ``nn.Linear`` / ``GroupedExperts`` of ``model`` through
    the deferring autograd functions; returns the number of modules patched.  FP8 modules
    have their own autograd and take the store through their ``wgrad_store`` hook, so their
    Wgrad GEMMs are deferred to the W steps as well."""
    from hai_llm.fp8 import Fp8GroupedExperts, Fp8Linear

    n = 0
    for m in model.modules():
        if isinstance(m, (Fp8Linear, Fp8GroupedExperts)):
            m.wgrad_store = store
            n += 1
            continue
        if type(m) is nn.Linear:
            m._wgrad_store = store
            m.forward = types.MethodType(_linear_forward, m)
            n += 1
        elif type(m) is GroupedExperts:
            m._wgrad_store = store
            m.forward = types.MethodType(_experts_forward, m)
            n += 1
    return n


# ====================================================================== pieces and tapes
@dataclass
class Piece:
    """One step of a stage's forward: ``fn(env, tape) -> {name: value}``; ``slot`` is
    ``attn`` / ``mlp`` / ``other`` (for traces)."""

    name: str
    slot: str
    fn: Callable[[dict, "Tape"], dict]


@dataclass
class _Record:
    piece: Piece
    outs: List[Tuple[torch.Tensor, torch.Tensor]]  # (graph output, detached leaf)
    losses: List[Tuple[torch.Tensor, torch.Tensor]]  # (scalar, its gradient)


class Tape:
    """Forward pieces of one (micro-batch, chunk) and what their backwards need.

    ``env`` maps names to values: tensors crossing pieces are detached leaves.  ``input`` is the
    stage's input leaf (None on a first stage), ``output`` its output leaf after the forward
    (None on a last stage).  ``metrics``/``stats`` collect loss values and MoE statistics.
    """

    def __init__(self, pieces: Sequence[Piece], env: dict, tracer=None, label: str = ""):
        self.pieces = list(pieces)
        self.env = env
        self.input: Optional[torch.Tensor] = env.get("h")
        self.output: Optional[torch.Tensor] = None
        self.records: List[_Record] = []
        self.metrics: Dict[str, torch.Tensor] = {}
        self.balance: Dict[int, torch.Tensor] = {}  # global MoE index -> balance value
        self.counts: Dict[int, torch.Tensor] = {}  # local MoE index -> counts
        self.tracer = tracer
        self.label = label
        self._pending_losses: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def add_loss(self, t: torch.Tensor, grad: torch.Tensor) -> None:
        """A scalar whose gradient is ``grad`` (already includes the 1/n_micro weight)."""
        self._pending_losses.append((t, grad))

    # -- forward ------------------------------------------------------------------------
    def forward_steps(self) -> Iterator[Piece]:
        for piece in self.pieces:
            t0 = time.time()
            outs = piece.fn(self.env, self)
            rec = _Record(piece, [], self._pending_losses)
            self._pending_losses = []
            for k, v in outs.items():
                if isinstance(v, torch.Tensor) and v.requires_grad:
                    leaf = v.detach().requires_grad_()
                    rec.outs.append((v, leaf))
                    self.env[k] = leaf
                else:
                    self.env[k] = v
            self.records.append(rec)
            if self.tracer is not None:
                self.tracer.piece(f"F{self.label}.{piece.name}", "F", t0, time.time())
            yield piece
        self.output = self.env.get("h") if "out" not in self.env else None

    def run_forward(self) -> None:
        for _ in self.forward_steps():
            pass

    # -- backward -----------------------------------------------------------------------
    def backward_steps(self, grad_output: Optional[torch.Tensor], store: WeightGradStore
                       ) -> Iterator[Tuple[Piece, list]]:
        """Backward of the pieces in reverse order; yields (piece, its deferred W closures)."""
        if grad_output is not None:
            if self.output is None:
                raise RuntimeError("received an output gradient for a stage without output")
            self.output.grad = grad_output
        while self.records:
            rec = self.records.pop()
            t0 = time.time()
            tensors, grads = [], []
            for out, leaf in rec.outs:
                if leaf.grad is not None:
                    tensors.append(out)
                    grads.append(leaf.grad)
            for t, g in rec.losses:
                tensors.append(t)
                grads.append(g)
            sink: list = []
            if tensors:
                with store.collect(sink):
                    torch.autograd.backward(tensors, grads)
            rec.outs.clear()
            rec.losses.clear()
            if self.tracer is not None:
                self.tracer.piece(f"B{self.label}.{rec.piece.name}", "B", t0, time.time())
            yield rec.piece, sink
        self.env = {}

    def input_grad(self) -> Optional[torch.Tensor]:
        if self.input is None:
            return None
        g = self.input.grad
        return torch.zeros_like(self.input) if g is None else g


@torch.no_grad()
def run_closures(closures: Sequence[Callable[[], None]]) -> None:
    """Run deferred weight-gradient closures (no autograd graph: their inputs are saved
    activations that may require grad)."""
    for fn in closures:
        fn()


def run_overlapped(f_tape: Tape, b_tape: Tape, b_grad: Callable[[], Optional[torch.Tensor]],
                   store: WeightGradStore, on_forward_done: Callable[[], None],
                   tracer=None, fwd_ctx: Callable = nullcontext) -> None:
    """Forward of ``f_tape`` interleaved with the full backward (B then W per piece) of
    ``b_tape``, slot-aligned as in Figure 4 of the report.

    After each forward piece, backward pieces (each followed by its W) run up to and including
    one of the same slot as the NEXT forward piece, then that forward piece runs: with
    ``attn``/``mlp`` pieces alternating this yields ``MLP(B) MLP(W) MLP(F) ATTN(B) ATTN(W)
    ATTN(F)``; ``other`` pieces (embedding tail, head, stage output) take one backward piece.
    ``b_grad`` is called right before the first backward piece (its receive stays in flight
    during the first forward piece); ``on_forward_done`` right after the last forward piece
    (the pipeline send of the forward output).  ``fwd_ctx()`` (autocast) wraps each forward
    piece only: backward pieces run outside it."""
    f_it = f_tape.forward_steps()
    b_it = None
    f_done = b_done = False

    def step_f():
        nonlocal f_done
        try:
            with fwd_ctx():
                next(f_it)
        except StopIteration:
            f_done = True
            on_forward_done()

    def step_b() -> Optional[Piece]:
        nonlocal b_it, b_done
        if b_it is None:
            b_it = b_tape.backward_steps(b_grad(), store)
        try:
            piece, sink = next(b_it)
        except StopIteration:
            b_done = True
            return None
        t0 = time.time()
        run_closures(sink)
        if tracer is not None and sink:
            tracer.piece(f"W{b_tape.label}.{piece.name}", "W", t0, time.time())
        return piece

    step_f()
    while not (f_done and b_done):
        nxt = f_tape.pieces[len(f_tape.records)].slot if len(f_tape.records) < len(f_tape.pieces) else None
        while not b_done:
            piece = step_b()
            if piece is None or nxt is None or nxt == "other" or piece.slot == nxt:
                break
        if not f_done:
            step_f()


def run_sequential(f_tape: Tape, b_tape: Tape, b_grad: Callable[[], Optional[torch.Tensor]],
                   store: WeightGradStore, on_forward_done: Callable[[], None],
                   tracer=None, fwd_ctx: Callable = nullcontext) -> None:
    """The same pair without overlap: whole forward, then whole backward (W after each piece,
    as in the overlapped path, so both accumulate weight gradients in the same order)."""
    with fwd_ctx():
        f_tape.run_forward()
    on_forward_done()
    for piece, sink in b_tape.backward_steps(b_grad(), store):
        t0 = time.time()
        run_closures(sink)
        if tracer is not None and sink:
            tracer.piece(f"W{b_tape.label}.{piece.name}", "W", t0, time.time())


# ====================================================================== stage pieces
def _is_ep_dispatcher(d) -> bool:
    return d is not None and all(hasattr(d, a) for a in ("dispatch_async", "compute", "combine_async"))


def _block_pieces(block, tag: str, rope, recompute_sel: bool, moe_index: Optional[Tuple[int, int]],
                  scale: torch.Tensor, first: Optional[Callable] = None,
                  recompute_full: bool = False) -> Tuple[Piece, Piece, Callable]:
    """(attn piece, mlp piece, post function) of one Block, reading/writing env["h"].

    ``first(env, tape) -> dict`` runs at the start of the attn piece (the previous block's
    residual add, the embedding, or the MTP input projection).  ``post(env) -> h`` is the
    block's final residual add; the caller merges it into the following piece.  The arithmetic
    is exactly that of ``Block._forward`` / ``MoE.forward``.  ``recompute_full`` recomputes the
    attention residual and a dense FFN in backward; MoE router/experts are not recomputed
    (their all-to-alls must not be re-issued in backward).
    """
    ffn = block.ffn
    is_moe = isinstance(ffn, MoE)
    attn_norm, ffn_norm = block.attn_norm, block.ffn_norm
    disp = ffn.dispatcher if is_moe else None
    ep = _is_ep_dispatcher(disp)

    def attn_fn(env, tape):
        out = first(env, tape) if first is not None else {}
        h = out.get("h", env.get("h"))

        def attn_res(h):
            return h + block.attn(maybe_recompute(recompute_sel, attn_norm, h), rope)

        h1 = maybe_recompute(recompute_full, attn_res, h)
        if not is_moe:
            return {**out, "h1": h1}
        z = maybe_recompute(recompute_sel, ffn_norm, h1)
        B, S, D = z.shape
        zf = z.reshape(B * S, D)
        weights, idx, scores = ffn.gate(zf)
        ffn.record(scores.view(B, S, -1), idx.view(B, S, -1))
        st = ffn.pop_stats()
        gi, li = moe_index
        tape.balance[gi] = st.balance_loss.detach()
        tape.counts[li] = st.counts
        if st.balance_loss.requires_grad:
            tape.add_loss(st.balance_loss, scale)
        res = {**out, "h1": h1, "zf": zf, "shape": (B, S, D)}
        if ep:
            handle = disp.dispatch_async(zf, weights, idx)
            res.update(dispatch=handle, dtoken=handle._token)
        else:
            res.update(w=weights, idx=idx)
        return res

    def mlp_fn(env, tape):
        if not is_moe:
            def ffn_res(h1):
                return h1 + ffn(maybe_recompute(recompute_sel, ffn_norm, h1))

            return {"h": maybe_recompute(recompute_full, ffn_res, env["h1"])}
        zf = env["zf"]
        if ep:
            handle = env["dispatch"]
            handle._token = env["dtoken"]  # wait on this piece's leaf, not the attn piece's graph
            batch = handle.wait()
            y = disp.compute(batch, ffn.experts)
            ch = disp.combine_async(y, batch)
            res = {"combine": ch, "ctoken": ch._token}
        else:
            res = {"routed": ffn.routed(zf, env["w"], env["idx"])}
        if ffn.shared_experts is not None:
            res["shared"] = ffn.shared_experts(zf)
        return res

    def post(env):
        if not is_moe:
            return env["h"]
        if ep:
            ch = env["combine"]
            ch._token = env["ctoken"]
            y = ch.wait()
        else:
            y = env["routed"]
        if ffn.shared_experts is not None:
            y = y + env["shared"]
        return env["h1"] + y.view(*env["shape"])

    return Piece(f"attn{tag}", "attn", attn_fn), Piece(f"mlp{tag}", "mlp", mlp_fn), post


def build_stage_pieces(stage, pm, tokens_BT: torch.Tensor, pos_S: torch.Tensor,
                       scale: torch.Tensor) -> List[Piece]:
    """Forward pieces of ``stage`` (a StageModule) for one micro-batch.

    env on entry: ``h`` = input leaf (non-first stage).  A non-last stage leaves its output in
    ``env["h"]``; a last stage adds its losses (ce, MTP, balance) with gradient weights derived
    from ``scale`` = 1/n_micro exactly as autograd of ``Transformer.loss(...)/n_micro`` would.
    """
    args = pm.args
    sel = args.recompute == "selective"
    rope = pm.rope(pos_S)
    moe_pos = {id(m): i for i, m in enumerate(pm.moe_layers())}

    def moe_index(block):
        if not isinstance(block.ffn, MoE):
            return None
        li = moe_pos[id(block.ffn)]
        return pm.moe_global_index[li], li

    pieces: List[Piece] = []
    pending_post: Optional[Callable] = None  # residual add of the previous block

    def chain(extra: Optional[Callable] = None) -> Optional[Callable]:
        """A ``first`` function: the previous block's post, then ``extra``."""
        prev = pending_post
        if prev is None and extra is None:
            return None

        def first(env, tape):
            out = {}
            if prev is not None:
                out["h"] = prev(env)
            if extra is not None:
                e2 = {**env, **out}
                out.update(extra(e2, tape))
            return out

        return first

    def add_block(block, tag, extra=None):
        nonlocal pending_post
        a, m, post = _block_pieces(block, tag, rope, sel, moe_index(block), scale, chain(extra),
                                   recompute_full=args.recompute == "full")
        pieces.extend([a, m])
        pending_post = post

    embed_extra = None
    if stage.is_first:
        def embed_extra(env, tape):
            return {"h": stage.embed(tokens_BT[:, pos_S])}

    for i, block in zip(stage.layer_ids, stage.blocks()):
        add_block(block, str(i), embed_extra)
        embed_extra = None

    if not stage.is_last:
        post = pending_post

        def final(env, tape):
            return {"h": post(env)}

        pieces.append(Piece("out", "other", final))
        return pieces

    D = args.n_mtp_layers
    g_mtp = (scale * args.mtp_lambda) / D if D else None
    post_main = pending_post

    def head_fn(env, tape):
        h = post_main(env)
        ce = F.cross_entropy(stage.head(stage.norm(h)).flatten(0, 1).float(),
                             tokens_BT[:, pos_S + 1].flatten())
        tape.metrics["ce"] = ce.detach()
        tape.add_loss(ce, scale)
        return {"h": h, "out": True}

    pieces.append(Piece("head", "other", head_fn))
    pending_post = None
    mtp_terms: List[torch.Tensor] = []
    for k in range(1, D + 1):
        mod = stage.mtp[str(k - 1)]

        def mtp_in(env, tape, mod=mod, k=k):
            emb = stage.embed(tokens_BT[:, pos_S + k])
            return {"h": mod.eh_proj(torch.cat([mod.enorm(emb), mod.hnorm(env["h"])], dim=-1))}

        add_block(mod.block, f"mtp{k - 1}", mtp_in)
        post_k = pending_post

        def mtp_out(env, tape, mod=mod, k=k, post_k=post_k):
            h = post_k(env)
            term = F.cross_entropy(stage.head(mod.norm(h)).flatten(0, 1).float(),
                                   tokens_BT[:, pos_S + k + 1].flatten())
            mtp_terms.append(term.detach())
            tape.add_loss(term, g_mtp)
            if len(mtp_terms) == D:
                tape.metrics["mtp"] = torch.stack(mtp_terms).mean()
            return {"h": h}

        pieces.append(Piece(f"mtp{k - 1}.head", "other", mtp_out))
        pending_post = None
    if D == 0:
        def no_mtp(env, tape):
            tape.metrics["mtp"] = tape.metrics["ce"].new_zeros(())
            return {}

        pieces.append(Piece("nomtp", "other", no_mtp))
    return pieces
