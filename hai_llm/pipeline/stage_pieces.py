"""A pipeline stage's forward for one micro-batch, cut into the pieces DualPipe overlaps.

The cut mirrors DeepSeek-V3's chunk split (attention, dispatch, MLP, combine): per transformer
block an ``attn`` piece (the block's attention half with its residual, the FFN norm and the
router; under expert parallelism it ends by BEGINNING the dispatch: the count exchange is issued
and the payload launch is deferred on the tape, see ``overlap.Tape.defer``) and an ``mlp``
piece (waits for the dispatch, runs the experts and the shared experts, ISSUES the combine).
The combine is waited at the start of the next piece (the block's final residual add, merged
into the next block's ``attn`` piece or the stage's tail). Dense blocks have the same two
pieces without communication; the first stage's embedding and the last stage's head,
cross-entropy and MTP modules are pieces too.

Nothing here re-implements the model: every piece calls the model's own pieces
(``Block.attn_part`` / ``ffn_input`` / ``ffn_part`` / ``residual``, ``MoE.route`` /
``routed`` / ``shared`` / ``merge``, ``MTPModule.input_proj``, ``logits_ce``) and the loss terms
are back-propagated with the model's :class:`~hai_llm.model.transformer.LossWeights`, so a
pipeline step computes exactly ``Transformer.loss``, piece by piece.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from hai_llm.model.layers import maybe_recompute
from hai_llm.model.moe import MoE
from hai_llm.model.transformer import Block, LossWeights, logits_ce, window_tokens

from .overlap import Piece


def _is_ep_dispatcher(d) -> bool:
    """An expert-parallel dispatcher exposes its three stages (dispatch, compute, combine)."""
    return d is not None and all(hasattr(d, a) for a in ("dispatch_async", "compute", "combine_async"))


def _block_pieces(block: Block, tag: str, rope, moe_index: Optional[Tuple[int, int]],
                  balance_grad: torch.Tensor, first: Optional[Callable] = None
                  ) -> Tuple[Piece, Piece, Callable]:
    """(attn piece, mlp piece, post function) of one Block, reading/writing env["h"].

    ``first(env, tape) -> dict`` runs at the start of the attn piece (the previous block's
    residual add, the embedding, or the MTP input projection).  ``post(env) -> h`` is the
    block's final residual add; the caller merges it into the following piece.  With
    ``recompute='full'`` the attention half and a dense FFN half are recomputed in backward;
    MoE router/experts are not (their all-to-alls must not be re-issued in backward).
    """
    ffn = block.ffn
    is_moe = isinstance(ffn, MoE)
    full = block.args.recompute == "full"
    disp = ffn.dispatcher if is_moe else None
    ep = _is_ep_dispatcher(disp)

    def attn_fn(env, tape):
        out = first(env, tape) if first is not None else {}
        h = out.get("h", env.get("h"))
        h1 = maybe_recompute(full, block.attn_part, h, rope)
        if not is_moe:
            return {**out, "h1": h1}
        r = ffn.route(block.ffn_input(h1))
        st = ffn.pop_stats()
        gi, li = moe_index
        tape.balance[gi] = st.balance_loss.detach()
        tape.counts[li] = st.counts
        if st.balance_loss.requires_grad:
            tape.add_loss(st.balance_loss, balance_grad)
        res = {**out, "h1": h1, "zf": r.x_TD, "shape": r.shape}
        if ep:
            handle = disp.dispatch_async(r.x_TD, r.weights_TK, r.idx_TK)
            # the plan's one host read and the payload: after the other micro-batch's next
            # backward piece is queued (overlapped F&B), else before the mlp piece
            tape.defer(f"dispatch{tag}", handle.launch)
            # the token crosses the piece boundary as a leaf: the mlp piece waits on it
            res.update(dispatch=handle, dtoken=handle.token)
        else:
            res.update(w=r.weights_TK, idx=r.idx_TK)
        return res

    def mlp_fn(env, tape):
        if not is_moe:
            return {"h": maybe_recompute(full, block.ffn_part, env["h1"])}
        zf = env["zf"]
        if ep:
            batch = env["dispatch"].wait(token=env["dtoken"])
            ch = disp.combine_async(disp.compute(batch, ffn.experts), batch)
            res = {"combine": ch, "ctoken": ch.token}
        else:
            res = {"routed": ffn.routed(zf, env["w"], env["idx"])}
        res["shared"] = ffn.shared(zf)
        return res

    def post(env):
        if not is_moe:
            return env["h"]
        y = env["combine"].wait(token=env["ctoken"]) if ep else env["routed"]
        return block.residual(env["h1"], ffn.merge(y, env["shared"], env["shape"]))

    return Piece(f"attn{tag}", "attn", attn_fn), Piece(f"mlp{tag}", "mlp", mlp_fn), post


def build_stage_pieces(stage, pm, tokens_BT: torch.Tensor, pos_S: torch.Tensor,
                       scale: torch.Tensor) -> List[Piece]:
    """Forward pieces of ``stage`` (a StageModule) for one micro-batch.

    env on entry: ``h`` = input leaf (non-first stage).  A non-last stage leaves its output in
    ``env["h"]``; a last stage adds its losses (ce, MTP, balance) with gradient weights
    from ``scale`` (= 1/n_micro) by the model's :class:`LossWeights`, exactly what autograd of
    ``Transformer.loss(...).loss / n_micro`` gives each term.
    """
    args = pm.args
    weights = LossWeights.of(args)
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
                out.update(extra({**env, **out}, tape))
            return out

        return first

    def add_block(block, tag, extra=None):
        nonlocal pending_post
        a, m, post = _block_pieces(block, tag, rope, moe_index(block), weights.balance(scale), chain(extra))
        pieces.extend([a, m])
        pending_post = post

    embed_extra = None
    if stage.is_first:
        def embed_extra(env, tape):
            return {"h": stage.embed(window_tokens(tokens_BT, pos_S))}

    for block in stage.blocks():
        add_block(block, str(block.layer_id), embed_extra)
        embed_extra = None

    if not stage.is_last:
        post = pending_post

        def final(env, tape):
            return {"h": post(env)}

        pieces.append(Piece("out", "other", final))
        return pieces

    D = args.n_mtp_layers
    post_main = pending_post

    def head_fn(env, tape):
        # the normed state is read by the head and by MTP depth 1 (Transformer.mtp_states)
        hn = stage.norm(post_main(env))
        ce = logits_ce(stage.head, hn, window_tokens(tokens_BT, pos_S, 1))
        tape.metrics["ce"] = ce.detach()
        tape.add_loss(ce, weights.ce(scale))
        return {"h": hn, "out": True}

    pieces.append(Piece("head", "other", head_fn))
    pending_post = None
    mtp_terms: List[torch.Tensor] = []
    for k in range(1, D + 1):
        mod = stage.mtp[str(k - 1)]

        def mtp_in(env, tape, mod=mod, k=k):
            return {"h": mod.input_proj(env["h"], stage.embed(window_tokens(tokens_BT, pos_S, k)))}

        add_block(mod.block, f"mtp{k - 1}", mtp_in)
        post_k = pending_post

        def mtp_out(env, tape, mod=mod, k=k, post_k=post_k):
            h = mod.norm(post_k(env))  # read by this depth's head and by depth k + 1
            term = logits_ce(stage.head, h, window_tokens(tokens_BT, pos_S, k + 1))
            mtp_terms.append(term.detach())
            tape.add_loss(term, weights.mtp_each(scale))
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
