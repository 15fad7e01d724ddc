"""gptkit's own tiled ("flash") attention in plain PyTorch.

The algorithm is FlashAttention-2's (Dao, 2023), written with PyTorch ops over tiles:

- forward: queries are cut into blocks of `block_q` rows and keys into blocks of `block_k`.
  Each query block walks over the key blocks it can see, keeping a running row maximum `m`,
  a running denominator `l` and an unnormalised output (the "online softmax"). Key blocks that
  lie entirely in a query block's future are never touched (causal block skipping), and only
  blocks that straddle the diagonal build a mask.
- memory: the autograd graph keeps only q, k, v, the output O and the row logsumexp L
  (B, nh, Tq). Nothing of size Tq x Tk is stored; the largest temporary is one
  (B, nh, block_q, block_k) tile.
- backward: recomputes each tile's probabilities from L (P = exp(S - L)) and accumulates
  dQ, dK, dV tile by tile, using D = rowsum(dO * O) for the softmax gradient.

With square tiles (block_q == block_k, the default) and no dropout, all tiles on one block
diagonal run as one batched op (see "The diagonal path" below): same tiles, far fewer ops.

Matmuls run in the input dtype (bf16 under autocast on CPU hits AMX); softmax statistics and
accumulators are fp32 (fp64 for fp64 inputs, so gradcheck is exact).

Dropout on the attention probabilities is supported: each tile draws its keep-mask from a
generator seeded by (call seed, tile), so the backward pass regenerates exactly the same mask
without storing it.

Shapes: q (B, nh, Tq, hs), k and v (B, nh, Tk, hs) -> (B, nh, Tq, hs). Query i sits at absolute
position q_offset + i; key_mask (B, Tk) bool marks padding keys (False).
"""

from __future__ import annotations

import math

import torch

from gptkit.errors import GptkitError

_NEG_INF = float("-inf")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _key_blocks_end(i1: int, q_offset: int, Tk: int) -> int:
    """One past the last key that the query at row i1-1 may see."""
    return min(Tk, q_offset + i1)


def _tile_seed(seed: int, ib: int, jb: int) -> int:
    return (seed * 1_000_003 + ib * 65_537 + jb) % (2**63 - 1)


def _tile_keep(seed: int, ib: int, jb: int, shape, device) -> torch.Tensor:
    """The dropout keep-uniforms of tile (ib, jb): the same numbers in forward and backward."""
    g = torch.Generator(device=device)
    g.manual_seed(_tile_seed(seed, ib, jb))
    return torch.rand(shape, generator=g, device=device)


def dropout_keep_mask(seed: int, shape, dropout_p: float, block_q: int, block_k: int, device="cpu") -> torch.Tensor:
    """The full (B, nh, Tq, Tk) keep-mask that `flash_attention` uses for `seed` (for tests)."""
    B, nh, Tq, Tk = shape
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    for ib, i0 in enumerate(range(0, Tq, block_q)):
        i1 = min(i0 + block_q, Tq)
        for jb, j0 in enumerate(range(0, Tk, block_k)):
            j1 = min(j0 + block_k, Tk)
            keep[:, :, i0:i1, j0:j1] = _tile_keep(seed, ib, jb, (B, nh, i1 - i0, j1 - j0), device) >= dropout_p
    return keep


def _tile_mask(i0: int, i1: int, j0: int, j1: int, q_offset: int, device) -> torch.Tensor | None:
    """(bq, bk) bool, True = hidden (a key in the query's future); None if the tile is all visible."""
    if j1 - 1 <= q_offset + i0:
        return None
    qpos = torch.arange(q_offset + i0, q_offset + i1, device=device)[:, None]
    kpos = torch.arange(j0, j1, device=device)[None, :]
    return kpos > qpos


def _scores(qi, kj, i0, i1, j0, j1, q_offset, pad, acc):
    """Scores of one tile, (B, nh, bq, bk) in the accumulator dtype (qi is pre-scaled), and the
    tile's hidden entries (True = masked, broadcastable to the scores) or None if none are."""
    s = torch.matmul(qi, kj.transpose(-2, -1)).to(acc)
    hidden = _tile_mask(i0, i1, j0, j1, q_offset, s.device)
    if pad is not None:
        hidden = pad if hidden is None else hidden | pad
    return s, hidden


def _exp_(x: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """exp(x) in place for x <= 0, with hidden entries set to 0.

    Clamping at -80 keeps the CPU's vectorised exp on its fast path: inputs below about -87
    (and -inf) take a scalar slow path that costs 5-50x more. exp(-80) ~ 2e-35 is negligible
    next to a row sum of at least 1, and hidden entries become exact zeros."""
    x = x.clamp_(-80.0, 0.0).exp_()
    return x if hidden is None else x.masked_fill_(hidden, 0.0)


def _pad_tiles(key_mask, Tk, block_k):
    """Per key block: None if it has no padding, else a (B, 1, 1, bk) bool mask, True = hidden."""
    if key_mask is None:
        return [None] * ((Tk + block_k - 1) // block_k)
    hidden = ~key_mask[:, :Tk].bool()
    out = []
    for j0 in range(0, Tk, block_k):
        h = hidden[:, j0:j0 + block_k]
        out.append(h[:, None, None, :] if bool(h.any()) else None)
    return out


def _forward_tiles(q, k, v, q_offset, key_mask, block_q, block_k, dropout_p, seed):
    """The general path: one tile at a time."""
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    acc = _acc_dtype(q.dtype)
    qs = q * (1.0 / math.sqrt(hs))  # pre-scaled queries
    pads = _pad_tiles(key_mask, Tk, block_k)
    may_be_empty = key_mask is not None
    o = torch.empty_like(q)
    lse = torch.empty(B, nh, Tq, dtype=acc, device=q.device)
    for ib, i0 in enumerate(range(0, Tq, block_q)):
        i1 = min(i0 + block_q, Tq)
        qi = qs[:, :, i0:i1]  # (B, nh, bq, hs)
        m = l = o_acc = None
        for jb, j0 in enumerate(range(0, _key_blocks_end(i1, q_offset, Tk), block_k)):
            j1 = min(j0 + block_k, Tk)
            s, hidden = _scores(qi, k[:, :, j0:j1], i0, i1, j0, j1, q_offset, pads[jb], acc)  # (B, nh, bq, bk)
            if hidden is not None:
                s.masked_fill_(hidden, _NEG_INF)
            m_tile = s.amax(-1)
            m_new = m_tile if m is None else torch.maximum(m, m_tile)
            # rows that have seen only hidden keys so far keep m = -inf; subtract 0 there instead.
            # Without padding every row sees key 0 in the first block, so m is always finite.
            m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0) if may_be_empty else m_new
            p = _exp_(s.sub_(m_safe[..., None]), hidden)  # (B, nh, bq, bk), unnormalised probabilities
            p_sum = p.sum(-1)
            if dropout_p > 0.0:
                keep = _tile_keep(seed, ib, jb, p.shape, p.device) >= dropout_p
                p = p * keep * (1.0 / (1.0 - dropout_p))
            pv = torch.matmul(p.to(v.dtype), v[:, :, j0:j1]).to(acc)  # (B, nh, bq, hs)
            if m is None:
                l, o_acc = p_sum, pv
            else:
                alpha = (m - m_safe).exp_()  # rescales what was accumulated under the old max
                l = l.mul_(alpha).add_(p_sum)
                o_acc = o_acc.mul_(alpha[..., None]).add_(pv)
            m = m_new
        if may_be_empty:  # a row with no visible key (all padding) has l = 0: output 0 and L = -inf
            empty = l == 0
            o[:, :, i0:i1] = (o_acc / l.masked_fill(empty, 1.0)[..., None]).to(o.dtype)
            m_safe = m.masked_fill(m == _NEG_INF, 0.0)
            lse[:, :, i0:i1] = (m_safe + l.log()).masked_fill(empty, _NEG_INF)
        else:
            o[:, :, i0:i1] = o_acc.div_(l[..., None]).to(o.dtype)
            lse[:, :, i0:i1] = l.log_().add_(m)
    return o, lse


def _backward_tiles(do, q, k, v, o, lse, q_offset, key_mask, block_q, block_k, dropout_p, seed):
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    acc = _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(hs)
    qs = q * scale
    pads = _pad_tiles(key_mask, Tk, block_k)
    D = (do.to(acc) * o.to(acc)).sum(-1)  # (B, nh, Tq): rowsum(dO * O)
    lse = lse.masked_fill(lse == _NEG_INF, 0.0)  # empty rows: every entry is hidden, so P = 0 anyway
    dq = torch.zeros(B, nh, Tq, hs, dtype=acc, device=q.device)
    dk = torch.empty(B, nh, Tk, hs, dtype=acc, device=q.device)
    dv = torch.empty(B, nh, Tk, hs, dtype=acc, device=q.device)
    for jb, j0 in enumerate(range(0, Tk, block_k)):
        j1 = min(j0 + block_k, Tk)
        kj, vj = k[:, :, j0:j1], v[:, :, j0:j1]  # (B, nh, bk, hs)
        dk_j = torch.zeros(B, nh, j1 - j0, hs, dtype=acc, device=q.device)
        dv_j = torch.zeros_like(dk_j)
        # the first query that sees key j0 is at row j0 - q_offset; start from its block
        first = max(0, j0 - q_offset) // block_q * block_q
        for i0 in range(first, Tq, block_q):
            i1 = min(i0 + block_q, Tq)
            ib = i0 // block_q
            qi, doi = qs[:, :, i0:i1], do[:, :, i0:i1]
            s, hidden = _scores(qi, kj, i0, i1, j0, j1, q_offset, pads[jb], acc)  # (B, nh, bq, bk)
            p = _exp_(s.sub_(lse[:, :, i0:i1, None]), hidden)  # exact probabilities, recomputed
            dp = torch.matmul(doi, vj.transpose(-2, -1)).to(acc)  # (B, nh, bq, bk)
            if dropout_p > 0.0:
                keep = (_tile_keep(seed, ib, jb, p.shape, p.device) >= dropout_p) * (1.0 / (1.0 - dropout_p))
                p_drop = p * keep
                dp.mul_(keep)
            else:
                p_drop = p
            dv_j.add_(torch.matmul(p_drop.to(do.dtype).transpose(-2, -1), doi).to(acc))
            ds = dp.sub_(D[:, :, i0:i1, None]).mul_(p)  # dS = P * (dP - D)
            ds_lo = ds.to(q.dtype)
            dq[:, :, i0:i1].add_(torch.matmul(ds_lo, kj).to(acc))
            dk_j.add_(torch.matmul(ds_lo.transpose(-2, -1), qi).to(acc))
        dk[:, :, j0:j1] = dk_j
        dv[:, :, j0:j1] = dv_j
    return (dq * scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------
# The diagonal path. With square tiles (block_q == block_k == b) and queries that end where the
# keys end (training, prefill and decoding all have q_offset + Tq == Tk), the tiles on one block
# diagonal (query block t, key block t - d) are independent, so one batched op handles all of
# them: nK op groups instead of ~nK^2/2 tiles. The arithmetic is the same tiles in the same
# order; only the Python loop and the thread pool's per-op overhead shrink (which matters a lot
# on a small, shared CPU). Queries are laid out on absolute blocks: `lead` dummy rows in front
# align query q_offset with its block, dummy rows at the end fill the last one; keys are padded
# to whole blocks. Dummy rows see only real or zero keys, and their results are cut away.


def _diag_layout(q_offset, Tq, Tk, b):
    nK = (Tk + b - 1) // b  # key blocks
    qb0 = q_offset // b  # absolute block of the first query
    lead = q_offset - qb0 * b
    nQ = nK - qb0  # query blocks
    return nK, qb0, lead, nQ


def _blocks(x, front, total_rows, b):
    """(B, nh, T, hs) -> (B, nh, total_rows // b, b, hs), zero rows added in front and at the end."""
    B, nh, T, hs = x.shape
    x = torch.nn.functional.pad(x, (0, 0, front, total_rows - front - T))
    return x.view(B, nh, total_rows // b, b, hs)


def _diag_hidden(d, k0, n, tri, pad_blocks):
    """Hidden entries of diagonal d's tiles, broadcastable to (B, nh, n, b, b), or None."""
    hidden = tri if d == 0 else None  # only the main diagonal straddles the causal boundary
    if pad_blocks is not None:
        hp = pad_blocks[:, :, k0:k0 + n]  # (B, 1, n, 1, b)
        hidden = hp if hidden is None else hidden | hp
    return hidden


def _diag_setup(q, k, q_offset, key_mask, b):
    Tq, Tk = q.shape[2], k.shape[2]
    nK, qb0, lead, nQ = _diag_layout(q_offset, Tq, Tk, b)
    tri = torch.ones(b, b, dtype=torch.bool, device=q.device).triu_(1)  # key after query
    pad_blocks = None
    if key_mask is not None:
        km = torch.zeros(key_mask.shape[0], nK * b, dtype=torch.bool, device=q.device)
        km[:, :Tk] = key_mask[:, :Tk]
        pad_blocks = (~km).view(-1, 1, nK, 1, b)
    return nK, qb0, lead, nQ, tri, pad_blocks


def _forward_diag(q, k, v, q_offset, key_mask, b):
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    acc = _acc_dtype(q.dtype)
    nK, qb0, lead, nQ, tri, pad_blocks = _diag_setup(q, k, q_offset, key_mask, b)
    qs = _blocks(q * (1.0 / math.sqrt(hs)), lead, nQ * b, b)  # (B, nh, nQ, b, hs), pre-scaled
    kb, vb = _blocks(k, 0, nK * b, b), _blocks(v, 0, nK * b, b)  # (B, nh, nK, b, hs)
    may_be_empty = key_mask is not None
    m = torch.empty(B, nh, nQ, b, dtype=acc, device=q.device)
    l = torch.empty_like(m)
    o_acc = torch.empty(B, nh, nQ, b, hs, dtype=acc, device=q.device)
    for d in range(nK):  # d = 0 is the main diagonal; every query block sees it first
        t0 = max(0, d - qb0)  # first query block that has a key block d blocks back
        n, k0 = nQ - t0, qb0 + t0 - d
        hidden = _diag_hidden(d, k0, n, tri, pad_blocks)
        s = torch.matmul(qs[:, :, t0:], kb[:, :, k0:k0 + n].transpose(-2, -1)).to(acc)  # (B, nh, n, b, b)
        if hidden is not None:
            s.masked_fill_(hidden, _NEG_INF)
        m_tile = s.amax(-1)  # (B, nh, n, b)
        m_new = m_tile if d == 0 else torch.maximum(m[:, :, t0:], m_tile)
        m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0) if may_be_empty else m_new
        p = _exp_(s.sub_(m_safe[..., None]), hidden)
        pv = torch.matmul(p.to(v.dtype), vb[:, :, k0:k0 + n]).to(acc)  # (B, nh, n, b, hs)
        if d == 0:
            l.copy_(p.sum(-1))
            o_acc.copy_(pv)
        else:
            alpha = (m[:, :, t0:] - m_safe).exp_()
            l[:, :, t0:].mul_(alpha).add_(p.sum(-1))
            o_acc[:, :, t0:].mul_(alpha[..., None]).add_(pv)
        m[:, :, t0:] = m_new
    l = l.view(B, nh, nQ * b)[:, :, lead:lead + Tq]
    m = m.view(B, nh, nQ * b)[:, :, lead:lead + Tq]
    o_acc = o_acc.view(B, nh, nQ * b, hs)[:, :, lead:lead + Tq]
    if may_be_empty:  # rows with no visible key: output 0, L = -inf
        empty = l == 0
        o = (o_acc / l.masked_fill(empty, 1.0)[..., None]).to(q.dtype)
        lse = (m.masked_fill(m == _NEG_INF, 0.0) + l.log()).masked_fill(empty, _NEG_INF)
    else:
        o = (o_acc / l[..., None]).to(q.dtype)
        lse = l.log() + m
    return o.contiguous(), lse.contiguous()


def _backward_diag(do, q, k, v, o, lse, q_offset, key_mask, b):
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    acc = _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(hs)
    nK, qb0, lead, nQ, tri, pad_blocks = _diag_setup(q, k, q_offset, key_mask, b)
    qs = _blocks(q * scale, lead, nQ * b, b)  # (B, nh, nQ, b, hs)
    dob = _blocks(do, lead, nQ * b, b)
    kb, vb = _blocks(k, 0, nK * b, b), _blocks(v, 0, nK * b, b)  # (B, nh, nK, b, hs)
    # dummy query rows get L = 0 and D = 0 with dO = 0, so they contribute nothing
    D = (do.to(acc) * o.to(acc)).sum(-1, keepdim=True)  # (B, nh, Tq, 1): rowsum(dO * O)
    D = _blocks(D, lead, nQ * b, b).squeeze(-1)  # (B, nh, nQ, b)
    lse = _blocks(lse.masked_fill(lse == _NEG_INF, 0.0)[..., None], lead, nQ * b, b).squeeze(-1)
    dq = torch.zeros(B, nh, nQ, b, hs, dtype=acc, device=q.device)
    dk = torch.zeros(B, nh, nK, b, hs, dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    for d in range(nK):
        t0 = max(0, d - qb0)
        n, k0 = nQ - t0, qb0 + t0 - d
        hidden = _diag_hidden(d, k0, n, tri, pad_blocks)
        qi, doi = qs[:, :, t0:], dob[:, :, t0:]  # (B, nh, n, b, hs)
        kj, vj = kb[:, :, k0:k0 + n], vb[:, :, k0:k0 + n]
        s = torch.matmul(qi, kj.transpose(-2, -1)).to(acc)  # (B, nh, n, b, b)
        p = _exp_(s.sub_(lse[:, :, t0:, :, None]), hidden)  # probabilities, recomputed
        dp = torch.matmul(doi, vj.transpose(-2, -1)).to(acc)
        dv[:, :, k0:k0 + n].add_(torch.matmul(p.to(do.dtype).transpose(-2, -1), doi).to(acc))
        ds = dp.sub_(D[:, :, t0:, :, None]).mul_(p).to(q.dtype)  # dS = P * (dP - D)
        dq[:, :, t0:].add_(torch.matmul(ds, kj).to(acc))
        dk[:, :, k0:k0 + n].add_(torch.matmul(ds.transpose(-2, -1), qi).to(acc))
    dq = dq.view(B, nh, nQ * b, hs)[:, :, lead:lead + Tq] * scale
    dk = dk.view(B, nh, nK * b, hs)[:, :, :Tk]
    dv = dv.view(B, nh, nK * b, hs)[:, :, :Tk]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _use_diag(q, k, q_offset, block_q, block_k, dropout_p) -> bool:
    return block_q == block_k and dropout_p == 0.0 and q_offset + q.shape[2] == k.shape[2]


def _forward(q, k, v, q_offset, key_mask, block_q, block_k, dropout_p, seed):
    if _use_diag(q, k, q_offset, block_q, block_k, dropout_p):
        return _forward_diag(q, k, v, q_offset, key_mask, block_q)
    return _forward_tiles(q, k, v, q_offset, key_mask, block_q, block_k, dropout_p, seed)


def _backward(do, q, k, v, o, lse, q_offset, key_mask, block_q, block_k, dropout_p, seed):
    if _use_diag(q, k, q_offset, block_q, block_k, dropout_p):
        return _backward_diag(do, q, k, v, o, lse, q_offset, key_mask, block_q)
    return _backward_tiles(do, q, k, v, o, lse, q_offset, key_mask, block_q, block_k, dropout_p, seed)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, q_offset, block_q, block_k, dropout_p, seed):
        o, lse = _forward(q, k, v, q_offset, key_mask, block_q, block_k, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse, key_mask)
        ctx.args = (q_offset, block_q, block_k, dropout_p, seed)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_mask = ctx.saved_tensors
        q_offset, block_q, block_k, dropout_p, seed = ctx.args
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _backward(do.contiguous().to(q.dtype), q, k, v, o, lse, q_offset, key_mask,
                                   block_q, block_k, dropout_p, seed)
        return dq, dk, dv, None, None, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_offset: int = 0,
                    key_mask: torch.Tensor | None = None, dropout_p: float = 0.0, block_q: int = 64,
                    block_k: int = 64, dropout_seed: int | None = None) -> torch.Tensor:
    """Causal tiled attention. q (B, nh, Tq, hs), k/v (B, nh, Tk, hs) -> (B, nh, Tq, hs).

    Under autocast the inputs are cast to the autocast dtype (like a matmul would be); the
    softmax statistics stay fp32. `dropout_seed` fixes the dropout masks (tests); by default
    it is drawn from torch's generator, so torch.manual_seed makes runs repeatable.
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attention: bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if block_q <= 0 or block_k <= 0:
        raise GptkitError(f"block_q and block_k must be positive, got {block_q}, {block_k}", "block_q/block_k",
                          "use positive block sizes")
    if not 0.0 <= dropout_p < 1.0:
        raise GptkitError(f"dropout must be in [0, 1), got {dropout_p}", "dropout", "set dropout to a value in [0, 1)")
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    seed = 0
    if dropout_p > 0.0:
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_seed is None else int(dropout_seed)
    if key_mask is not None:
        key_mask = key_mask.to(device=q.device, dtype=torch.bool)
    with torch.autocast(dev, enabled=False):
        return _FlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), key_mask, int(q_offset),
                                     int(block_q), int(block_k), float(dropout_p), seed)
