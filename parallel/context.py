"""Context parallelism: each sequence is split over the cp ranks, and attention still sees the whole of it.

Load-balanced sharding (Megatron-Core, torchtitan). A sequence of T tokens is cut into 2 cp chunks of c = T / (2 cp)
tokens; cp rank r holds chunks r and 2cp-1-r, concatenated in that order:

    cp = 2, T = 8:   chunks [0 1] [2 3] [4 5] [6 7]      rank 0 holds 0 1 6 7      rank 1 holds 2 3 4 5

Under a causal mask the late chunks see many keys and the early ones few; pairing chunk r with its mirror gives every
rank the same work (in the ring, 3 + 2 (cp-1) unmasked chunk-by-chunk blocks per rank, whatever its rank).

The mask rule (shared with the model's sliding window): the query at global index i attends the key at index j iff

    j <= i,   and doc(i) == doc(j) when document ids are given,   and i - j < window when a window is given.

`context_attention(kind=...)` attends the rank's queries over the whole sequence in one of two ways:

    ulysses (DeepSpeed-Ulysses): trade the sequence split for a head split, attend, trade back.
        seq_to_heads   fwd: all-to-all sequence -> heads / bwd: all-to-all heads -> sequence
        heads_to_seq   fwd: all-to-all heads -> sequence / bwd: all-to-all sequence -> heads
      Volume per layer: forward 4 all-to-alls of the local activations (q, k, v in, out back), each rank sending
      (cp-1)/cp of B H Tl hd elements per tensor; backward the same 4 (d out in, dq, dk, dv back). Needs the query
      heads divisible by cp; kv heads are repeated up to a multiple of cp when there are fewer.
    ring: each rank keeps its queries; key/value chunks travel around the cp group (p2p to the next rank, from the
      previous one), one block of attention per hop, merged by their log-sum-exps (the online softmax):
          out = sum_b exp(lse_b - lse) out_b,    lse = logsumexp_b lse_b
      where out_b, lse_b are a block's softmax-normalised output and the log-sum-exp of its scaled scores. The
      backward recomputes every block from (q, k, v, lse) (flash-attention style) and sends the dk/dv of each key
      chunk around the ring home to its rank, so memory stays per block: no (T x T) matrix is ever built.
      Volume per layer: forward (cp-1) k/v chunks (each 2 B Hkv Tl hd elements) sent per rank; backward twice
      that: the same (cp-1) k/v chunks and (cp-1) dk/dv chunks (fp32). Works for any cp, above the head count too.

The global indices and document ids of all ranks are all-gathered once per call (O(T) integers); the mask of any
block follows from them, so any layout works, the balanced one is the one that keeps the ranks equally busy. Every
function returns early at group size 1: there `context_attention` is plain SDPA with the mask rule.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from parallel.mappings import Group, gather_from_region, group_rank, group_size
from parallel.sdpa import sdpa
from parallel.state import ParallelConfigError

KINDS = ("ulysses", "ring")
BLOCK_TOKENS = 1024  # the ring's blocks are at most this many queries x keys (see _pieces)


def _check_sequence(seq_len: int, cp: int) -> None:
    if seq_len % (2 * cp):
        raise ParallelConfigError(
            f"seq_len={seq_len} is not divisible by 2 x cp = {2 * cp} (cp={cp}): context parallelism cuts the "
            f"sequence into 2 cp equal chunks; choose a seq_len that is a multiple of {2 * cp} or another cp"
        )


def sequence_index(seq_len: int, rank: int, cp: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(seq_len / cp,) int64: the global indices of cp rank `rank`'s tokens, chunks rank and 2cp-1-rank."""
    if cp == 1:
        return torch.arange(seq_len, device=device)
    _check_sequence(seq_len, cp)
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, second])


def shard_sequence(x: torch.Tensor, rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of a full sequence: chunks `rank` and 2cp-1-`rank` of `dim`, concatenated (differentiable)."""
    if cp == 1:
        return x
    _check_sequence(x.shape[dim], cp)
    c = x.shape[dim] // (2 * cp)
    return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, (2 * cp - 1 - rank) * c, c)], dim=dim)


def gather_sequence(x_local: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """Inverse of shard_sequence over the cp group: every rank gets the full sequence in natural order.

    fwd: all-gather / bwd: this rank's part of the gradient (for a loss computed alike on every rank: logits, tests).
    """
    cp = group_size(group)
    if cp == 1:
        return x_local
    full = gather_from_region(x_local, group, dim)  # rank-major: rank r's chunks r, 2cp-1-r at pieces 2r, 2r+1
    pieces = full.chunk(2 * cp, dim=dim)
    natural = [pieces[2 * j] if j < cp else pieces[2 * (2 * cp - 1 - j) + 1] for j in range(2 * cp)]
    return torch.cat(natural, dim=dim)


def attention_mask(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    *,
    q_documents: torch.Tensor | None = None,
    k_documents: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """The mask rule: (Tq,), (Tk,) global indices [+ (B, Tq), (B, Tk) document ids] -> (B or 1, 1, Tq, Tk) bool.

    True = attend: j <= i, the same document when ids are given, i - j < window when a window is given.
    """
    diff = q_index[:, None] - k_index[None, :]  # (Tq, Tk): i - j
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    allowed = allowed[None, None]  # (1, 1, Tq, Tk)
    if q_documents is not None:
        allowed = allowed & (q_documents[:, None, :, None] == k_documents[:, None, None, :])  # (B, 1, Tq, Tk)
    return allowed


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA (causal when `mask` is None) with GQA; q (B, Hq, T, hd), k, v (B, Hkv, T, hd) -> (B, Hq, T, hd).

    parallel.sdpa: on CUDA a mask with grouped heads gets k, v repeated, so no (B, Hq, T, T) math-kernel scores.
    """
    return sdpa(q, k, v, mask)


# ---------------------------------------------------------------------------------------------------- ulysses


def _seq_to_heads(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(B, H, Tl, hd) the rank's tokens, all heads -> (B, H/cp, cp Tl, hd) all tokens (rank-major), its heads."""
    cp = group_size(group)
    B, H, Tl, hd = x.shape
    if H % cp:
        raise ParallelConfigError(f"{H} heads per rank cannot be split over cp={cp} ranks (all-to-all)")
    send = x.reshape(B, cp, H // cp, Tl, hd).transpose(0, 1).contiguous()  # (cp, B, H/cp, Tl, hd): block s -> rank s
    recv = torch.empty_like(send)  # (cp, B, H/cp, Tl, hd): block r = rank r's tokens of this rank's heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // cp, cp * Tl, hd)  # (B, H/cp, cp Tl, hd)


def _heads_to_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(B, H/cp, cp Tl, hd) all tokens (rank-major), the rank's heads -> (B, H, Tl, hd) its tokens, all heads."""
    cp = group_size(group)
    B, Hl, T, hd = x.shape
    send = x.reshape(B, Hl, cp, T // cp, hd).permute(2, 0, 1, 3, 4).contiguous()  # (cp, B, H/cp, Tl, hd): -> rank s
    recv = torch.empty_like(send)  # (cp, B, H/cp, Tl, hd): block s = this rank's tokens of rank s's heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(B, cp * Hl, T // cp, hd)  # (B, H, Tl, hd), heads in rank order


class _SeqToHeads(torch.autograd.Function):
    """fwd: all-to-all sequence -> heads / bwd: all-to-all heads -> sequence."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    """fwd: all-to-all heads -> sequence / bwd: all-to-all sequence -> heads."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


def seq_to_heads(x: torch.Tensor, group: Group) -> torch.Tensor:
    """fwd: all-to-all sequence -> heads / bwd: all-to-all heads -> sequence.

    (B, H, Tl, hd) -> (B, H/cp, cp Tl, hd): cp rank s gets heads [s H/cp, (s+1) H/cp) of every rank's tokens,
    the sequence in rank order (rank 0's Tl tokens first).
    """
    return x if group_size(group) == 1 else _SeqToHeads.apply(x, group)


def heads_to_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    """fwd: all-to-all heads -> sequence / bwd: all-to-all sequence -> heads. The inverse of seq_to_heads."""
    return x if group_size(group) == 1 else _HeadsToSeq.apply(x, group)


def _ulysses(q, k, v, group, index, documents, window):
    cp = group_size(group)
    n_heads, n_kv = q.shape[1], k.shape[1]
    if n_heads % cp:
        raise ParallelConfigError(
            f"Ulysses attention gives each cp rank whole query heads, but {n_heads} query heads per tensor rank are "
            f"not divisible by cp={cp}; choose parallel.cp_attention=ring or a cp that divides them"
        )
    rep = cp // math.gcd(n_kv, cp)  # n_kv rep = lcm(n_kv, cp) divides n_heads, so query head h keeps kv head h // g
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)  # (B, n_kv rep, Tl, hd): new kv head j is old kv head j // rep
        v = v.repeat_interleave(rep, dim=1)  # (B, n_kv rep, Tl, hd)
    q, k, v = seq_to_heads(q, group), seq_to_heads(k, group), seq_to_heads(v, group)  # (B, heads/cp, T, hd)
    full_index = gather_from_region(index, group, 0)  # (T,) rank-major
    order = torch.argsort(full_index)  # (T,) natural position p holds rank-major token order[p]
    q, k, v = q.index_select(2, order), k.index_select(2, order), v.index_select(2, order)  # (B, h, T, hd) natural
    mask = None  # the ranks' indices cover 0..T-1 once, so natural order is plain causal order
    if documents is not None or window is not None:
        pos = full_index[order]  # (T,) = 0..T-1
        docs = None if documents is None else gather_from_region(documents, group, 1)[:, order]  # (B, T) natural
        mask = attention_mask(pos, pos, q_documents=docs, k_documents=docs, window=window)
    y = _sdpa(q, k, v, mask)  # (B, n_heads/cp, T, hd), natural order
    y = y.index_select(2, torch.argsort(order))  # (B, n_heads/cp, T, hd), rank-major again
    return heads_to_seq(y, group)  # (B, n_heads, Tl, hd)


# ------------------------------------------------------------------------------------------------------- ring


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """-inf (a row with no visible key yet) -> 0, so exp(x - lse) gives 0 instead of nan."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _pieces(n: int) -> list[slice]:
    """Tiles of at most BLOCK_TOKENS of the local sequence's chunks (two in the balanced layout).

    Blocks are masked and skipped tile by tile; a block's scores, (B, Hq, tile, tile) fp32, bound the ring's
    working memory whatever the sequence length.
    """
    step = n // 2 if n % 2 == 0 else n
    tile = min(step, BLOCK_TOKENS)
    return [slice(t, min(t + tile, c + step)) for c in range(0, n, step) for t in range(c, c + step, tile)]


def _block_mask(q_index, k_index, q_docs, k_docs, window, qs: slice, ks: slice) -> torch.Tensor:
    """The mask rule on query tile `qs` x key tile `ks`: (B or 1, 1, 1, tq, tk) bool, True = attend."""
    docs = {} if q_docs is None else dict(q_documents=q_docs[:, qs], k_documents=k_docs[:, ks])
    return attention_mask(q_index[qs], k_index[ks], window=window, **docs).unsqueeze(2)


def _visible_blocks(index, all_index, documents, all_docs, window) -> list[list[tuple[slice, slice]]]:
    """For the key chunk of each rank s (row s of all_index), the (query tile, key tile) pairs with a visible key.

    A tile pair wholly in the queries' future, in other documents or outside the window is skipped. Every pair's
    mask is built on the device and all of them are read back together: one host sync for the whole pass, where a
    read per pair would be tiles^2 per hop (256 a layer at T 32768 and cp 4). The masks are built again where a
    block uses them: keeping them all would hold (tiles x tile)^2 x cp booleans.
    """
    pairs = [(qs, ks) for qs in _pieces(index.numel()) for ks in _pieces(all_index.shape[1])]
    seen = []
    for s, k_index in enumerate(all_index):
        k_docs = None if all_docs is None else all_docs[:, s]
        seen += [_block_mask(index, k_index, documents, k_docs, window, qs, ks).any() for qs, ks in pairs]
    visible = iter(torch.stack(seen).tolist())
    return [[pair for pair in pairs if next(visible)] for _ in all_index]


def _block_forward(q, k, v, mask, scale):
    """One block in fp32: q (B, Hkv, g, tq, hd), k, v (B, Hkv, tk, hd) -> out (B, Hkv, g, tq, hd), lse (.., tq)."""
    s = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hkv, g, tq, tk)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, g, tq); -inf on a row with no visible key
    p = torch.exp(s - _finite(lse).unsqueeze(-1))  # (B, Hkv, g, tq, tk), rows sum to 1 (or 0)
    return torch.matmul(p, v.unsqueeze(2)), lse


def _merge(out, lse, out_b, lse_b):
    """The online softmax: (out, lse) and a block's (out_b, lse_b) -> the softmax over both key sets."""
    new = torch.logaddexp(lse, lse_b)  # (.., tq)
    safe = _finite(new)
    merged = out * torch.exp(lse - safe).unsqueeze(-1) + out_b * torch.exp(lse_b - safe).unsqueeze(-1)
    return merged, new


def _block_backward(q, k, v, do, lse, delta, mask, scale):
    """One block's gradients from the saved lse (fp32): dq (B, Hkv, g, tq, hd), dk, dv (B, Hkv, tk, hd).

    p = exp(s - lse) is the block's share of the full softmax; ds = p (dp - delta), delta = rowsum(dO * O).
    """
    s = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hkv, g, tq, tk)
    p = torch.exp(s.masked_fill(~mask, float("-inf")) - lse.unsqueeze(-1))  # (B, Hkv, g, tq, tk)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, do)  # (B, Hkv, tk, hd): summed over the g query heads of a kv head
    dp = torch.matmul(do, v.unsqueeze(2).transpose(-1, -2))  # (B, Hkv, g, tq, tk)
    ds = p * (dp - delta.unsqueeze(-1)) * scale  # (B, Hkv, g, tq, tk)
    dq = torch.matmul(ds, k.unsqueeze(2))  # (B, Hkv, g, tq, hd)
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, q)  # (B, Hkv, tk, hd)
    return dq, dk, dv


def _start_exchange(send: torch.Tensor, group: Group):
    """Send `send` to the next cp rank and receive a tensor of its shape from the previous one; wait() the reqs."""
    cp, rank = group_size(group), group_rank(group)
    recv = torch.empty_like(send)
    ops = [
        dist.P2POp(dist.isend, send, dist.get_global_rank(group, (rank + 1) % cp), group),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, (rank - 1) % cp), group),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


class _RingAttention(torch.autograd.Function):
    """fwd: k/v chunks around the ring (cp-1 hops) / bwd: k/v chunks around again and dk/dv home (cp-1 hops each)."""

    @staticmethod
    def forward(ctx, q, k, v, index, documents, window, group):
        cp, rank = group_size(group), group_rank(group)
        B, n_heads, Tl, hd = q.shape
        n_kv = k.shape[1]
        scale = hd**-0.5
        all_index = gather_from_region(index, group, 0).view(cp, Tl)  # (cp, Tl): row s = rank s's indices
        all_docs = None if documents is None else gather_from_region(documents, group, 1).view(B, cp, Tl)
        q5 = q.float().reshape(B, n_kv, n_heads // n_kv, Tl, hd)  # (B, Hkv, g, Tl, hd): query head h = kv h // g
        out = torch.zeros_like(q5)
        lse = q5.new_full(q5.shape[:-1], float("-inf"))  # (B, Hkv, g, Tl)
        kv = torch.stack([k, v])  # (2, B, Hkv, Tl, hd): one message per hop
        if cp > 1:  # each hop overlaps with the blocks of the chunk held, the first also with the plan's read
            nxt, reqs = _start_exchange(kv, group)
        plan = _visible_blocks(index, all_index, documents, all_docs, window)  # the pass's one host sync
        for step in range(cp):
            src = (rank - step) % cp  # whose key chunk this rank holds now
            kf, vf = kv[0].float(), kv[1].float()
            k_docs = None if all_docs is None else all_docs[:, src]
            for qs, ks in plan[src]:
                mask = _block_mask(index, all_index[src], documents, k_docs, window, qs, ks)
                o_b, l_b = _block_forward(q5[..., qs, :], kf[..., ks, :], vf[..., ks, :], mask, scale)
                out[..., qs, :], lse[..., qs] = _merge(out[..., qs, :], lse[..., qs], o_b, l_b)
            if step < cp - 1:
                _wait(reqs)
                kv = nxt
                if step < cp - 2:
                    nxt, reqs = _start_exchange(kv, group)
        y = out.reshape(B, n_heads, Tl, hd).to(q.dtype)  # (B, Hq, Tl, hd)
        ctx.save_for_backward(q, k, v, y, lse, index, all_index, documents, all_docs)
        ctx.window, ctx.group, ctx.plan = window, group, plan  # the backward visits the same blocks, no sync
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, y, lse, index, all_index, documents, all_docs = ctx.saved_tensors
        group, window = ctx.group, ctx.window
        cp, rank = group_size(group), group_rank(group)
        B, n_heads, Tl, hd = q.shape
        n_kv = k.shape[1]
        scale = hd**-0.5
        grouped = (B, n_kv, n_heads // n_kv, Tl, hd)
        q5 = q.float().reshape(grouped)  # (B, Hkv, g, Tl, hd)
        do = dy.float().reshape(grouped)  # (B, Hkv, g, Tl, hd)
        delta = (do * y.float().reshape(grouped)).sum(-1)  # (B, Hkv, g, Tl): rowsum(dO * O)
        dq = torch.zeros_like(q5)
        kv = torch.stack([k, v])  # (2, B, Hkv, Tl, hd)
        home = travelling = None  # dk/dv (2, B, Hkv, Tl, hd) fp32 of the own chunk, of the chunk in hand
        for step in range(cp):
            src = (rank - step) % cp
            if step < cp - 1:
                nxt, reqs = _start_exchange(kv, group)
            kf, vf = kv[0].float(), kv[1].float()
            part = torch.zeros((2, *kf.shape), dtype=torch.float32, device=kf.device)  # this hop's dk, dv
            k_docs = None if all_docs is None else all_docs[:, src]
            for qs, ks in ctx.plan[src]:
                mask = _block_mask(index, all_index[src], documents, k_docs, window, qs, ks)
                dq_b, dk_b, dv_b = _block_backward(
                    q5[..., qs, :], kf[..., ks, :], vf[..., ks, :], do[..., qs, :], lse[..., qs], delta[..., qs],
                    mask, scale,
                )  # fmt: skip
                dq[..., qs, :] += dq_b
                part[0][..., ks, :] += dk_b
                part[1][..., ks, :] += dv_b
            if step < cp - 1:
                _wait(reqs)
                kv = nxt
            if step == 0:
                home = part  # the own chunk's share stays here; the others' shares travel
            else:
                # chunk src's dk/dv move one hop, to the rank that holds src at the next step, or home after the last
                travelling = part if travelling is None else travelling + part
                travelling, dreqs = _start_exchange(travelling, group)
                _wait(dreqs)
        dkv = home + travelling  # (2, B, Hkv, Tl, hd)
        dq = dq.reshape(B, n_heads, Tl, hd).to(q.dtype)
        return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


# ---------------------------------------------------------------------------------------------------- the entry


def context_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kind: str,
    group: Group,
    index: torch.Tensor,
    document_ids: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of the rank's queries over the whole sequence, split over the cp `group`, with the mask rule.

    Args:
        q: (B, Hq, Tl, hd) queries of the rank's Tl tokens (RoPE applied with global positions).
        k: (B, Hkv, Tl, hd) keys; Hq a multiple of Hkv (query head h uses kv head h // (Hq / Hkv), as SDPA's
            enable_gqa).
        v: (B, Hkv, Tl, hd) values.
        kind: "ulysses" or "ring" (see the module docstring); both give the same numbers.
        group: the cp group (None: one member, plain SDPA).
        index: (Tl,) global indices of the rank's tokens (`sequence_index`); the ranks' indices together cover
            0..T-1 once.
        document_ids: (B, Tl) document id of each local token, or None (one document).
        window: sliding window (i - j < window), or None.

    Returns:
        (B, Hq, Tl, hd) in q's dtype, differentiable w.r.t. q, k, v.
    """
    if kind not in KINDS:
        raise ValueError(f"parallel.cp_attention={kind!r} is not one of {', '.join(KINDS)}")
    B, n_heads, Tl, hd = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (Tl, hd) or n_heads % k.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected q (B, Hq, Tl, hd) and k, v "
            "(B, Hkv, Tl, hd) with Hq a multiple of Hkv"
        )
    if index.shape != (Tl,):
        raise ValueError(f"index has shape {tuple(index.shape)}; expected ({Tl},), the global index of each token")
    if document_ids is not None and document_ids.shape != (B, Tl):
        raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}; expected ({B}, {Tl})")
    if window is not None and window < 1:
        raise ValueError(f"sliding_window={window} must be at least 1 (or null for full causal attention)")
    if group_size(group) == 1:
        mask = None  # the local tokens are the whole sequence in order: SDPA's causal fast path
        if document_ids is not None or window is not None:
            mask = attention_mask(index, index, q_documents=document_ids, k_documents=document_ids, window=window)
        return _sdpa(q, k, v, mask)
    if kind == "ulysses":
        return _ulysses(q, k, v, group, index, document_ids, window)
    return _ring_attention(q, k, v, index, document_ids, window, group)


# eager inside compiled layers (train.compile): its p2p and its one host read (the visible blocks) break the graph
# anyway, and traced, the blocks' masks became frames of their own whose symbolic slices inductor failed on
# (documents at micro-batch 2: "Exponent must be non-negative")
_ring_attention = torch.compiler.disable(_RingAttention.apply)
