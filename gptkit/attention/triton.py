"""Causal attention as FlashAttention-2-style Triton kernels, forward and backward (CUDA).

Three kernels, one program per (tile, batch*head):

- `_fwd_kernel`: a program owns BLOCK_M query rows and walks the key blocks they can see with
  an online softmax (running max m, denominator l, unnormalised output); it writes O and the
  row logsumexp L. Key blocks in the future of every row are never loaded.
- `_bwd_dkdv_kernel`: a program owns BLOCK_N keys and walks the query blocks that can see them,
  recomputing P = exp(S - L) and accumulating dK and dV in registers.
- `_bwd_dq_kernel`: a program owns BLOCK_M queries and accumulates dQ over their key blocks.
  (Two passes instead of atomics: deterministic, the way FlashAttention-2's Triton tutorial does.)
D = rowsum(dO * O) is one PyTorch reduction before them.

Nothing of size Tq x Tk is ever written to memory. Softmax statistics and accumulators are fp32;
the dots take the input dtype (fp16/bf16 on tensor cores; fp32 inputs use exact IEEE dots).

On the CPU the kernels run under Triton's interpreter: set TRITON_INTERPRET=1 *before* triton
is first imported (the test suite does). That is for testing; it is slow.

Shapes: q (B, nh, Tq, hs), k and v (B, nh, Tk, hs) -> (B, nh, Tq, hs). Query i sits at absolute
position q_offset + i; key_mask (B, Tk) bool marks padding keys (False). Dropout is not implemented.
"""

from __future__ import annotations

import math

import torch

from gptkit.errors import GptkitError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None


def _interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (decided when they were defined)."""
    return triton is not None and type(_fwd_kernel).__name__ == "InterpretedFunction"


if triton is not None:

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, KM, nh, Tq, Tk, q_offset, scale,
                    HAS_KM: tl.constexpr, HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)  # b * nh + h; q, k, v, o are contiguous (B, nh, T, hs)
        b = bh // nh
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HS
        m_ok = offs_m < Tq
        q = tl.load(Q + bh * Tq * HS + offs_m[:, None] * HS + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        qpos = q_offset + offs_m
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = tl.minimum(Tk, q_offset + (pid_m + 1) * BLOCK_M)  # causal block skipping
        for start_n in range(0, hi, BLOCK_N):
            kn = start_n + offs_n
            n_ok = kn < Tk
            kv_off = bh * Tk * HS + kn[:, None] * HS + offs_d[None, :]
            k = tl.load(K + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N) fp32
            ok = (kn[None, :] <= qpos[:, None]) & n_ok[None, :]
            if HAS_KM:
                km = tl.load(KM + b * Tk + kn, mask=n_ok, other=0)
                ok = ok & (km != 0)[None, :]
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        empty = l_i == 0.0  # every key hidden (padding): output 0, L = -inf
        l_safe = tl.where(empty, 1.0, l_i)
        o = acc / l_safe[:, None]
        tl.store(O + bh * Tq * HS + offs_m[:, None] * HS + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        lse = tl.where(empty, float("-inf"), tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_safe))
        tl.store(LSE + bh * Tq + offs_m, lse, mask=m_ok)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, D, DK, DV, KM, nh, Tq, Tk, q_offset, scale,
                         HAS_KM: tl.constexpr, HS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // nh
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HS
        n_ok = offs_n < Tk
        kv_off = bh * Tk * HS + offs_n[:, None] * HS + offs_d[None, :]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        key_ok = n_ok
        if HAS_KM:
            km = tl.load(KM + b * Tk + offs_n, mask=n_ok, other=0)
            key_ok = key_ok & (km != 0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # the first query that sees key pid_n*BLOCK_N is row pid_n*BLOCK_N - q_offset
        lo = tl.maximum(pid_n * BLOCK_N - q_offset, 0) // BLOCK_M * BLOCK_M
        for start_m in range(lo, Tq, BLOCK_M):
            qm = start_m + offs_m
            m_ok = qm < Tq
            q_off = bh * Tq * HS + qm[:, None] * HS + offs_d[None, :]
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + q_off, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
            do = tl.load(DO + q_off, mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh * Tq + qm, mask=m_ok, other=0.0)
            Di = tl.load(D + bh * Tq + qm, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N)
            ok = (offs_n[None, :] <= (q_offset + qm)[:, None]) & key_ok[None, :] & m_ok[:, None]
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - Di[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, D, DQ, KM, nh, Tq, Tk, q_offset, scale,
                       HAS_KM: tl.constexpr, HS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // nh
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HS
        m_ok = offs_m < Tq
        q_off = bh * Tq * HS + offs_m[:, None] * HS + offs_d[None, :]
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=0.0)
        Di = tl.load(D + bh * Tq + offs_m, mask=m_ok, other=0.0)
        qpos = q_offset + offs_m
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = tl.minimum(Tk, q_offset + (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            kn = start_n + offs_n
            n_ok = kn < Tk
            kv_off = bh * Tk * HS + kn[:, None] * HS + offs_d[None, :]
            k = tl.load(K + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(V + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            ok = (kn[None, :] <= qpos[:, None]) & n_ok[None, :]
            if HAS_KM:
                km = tl.load(KM + b * Tk + kn, mask=n_ok, other=0)
                ok = ok & (km != 0)[None, :]
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - Di[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _launch_args(q, key_mask, block_m, block_n):
    hs = q.shape[-1]
    km = key_mask if key_mask is not None else torch.empty(1, dtype=torch.int8, device=q.device)
    return km, dict(HAS_KM=key_mask is not None, HS=hs, BLOCK_M=block_m, BLOCK_N=block_n,
                    BLOCK_D=max(16, triton.next_power_of_2(hs)),
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, q_offset, block_m, block_n):
        B, nh, Tq, hs = q.shape
        Tk = k.shape[2]
        scale = 1.0 / math.sqrt(hs)
        o = torch.empty_like(q)
        lse = torch.empty(B, nh, Tq, dtype=torch.float32, device=q.device)
        km, meta = _launch_args(q, key_mask, block_m, block_n)
        _fwd_kernel[(triton.cdiv(Tq, block_m), B * nh)](q, k, v, o, lse, km, nh, Tq, Tk, q_offset, scale, **meta)
        ctx.save_for_backward(q, k, v, o, lse, key_mask)
        ctx.args = (q_offset, block_m, block_n)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_mask = ctx.saved_tensors
        q_offset, block_m, block_n = ctx.args
        B, nh, Tq, hs = q.shape
        Tk = k.shape[2]
        scale = 1.0 / math.sqrt(hs)
        do = do.contiguous().to(q.dtype)
        D = (do.float() * o.float()).sum(-1).contiguous()  # (B, nh, Tq)
        lse = lse.masked_fill(lse == float("-inf"), 0.0)  # hidden rows: P is masked to 0 anyway
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        km, meta = _launch_args(q, key_mask, block_m, block_n)
        _bwd_dkdv_kernel[(triton.cdiv(Tk, block_n), B * nh)](q, k, v, do, lse, D, dk, dv, km, nh, Tq, Tk,
                                                             q_offset, scale, **meta)
        _bwd_dq_kernel[(triton.cdiv(Tq, block_m), B * nh)](q, k, v, do, lse, D, dq, km, nh, Tq, Tk,
                                                           q_offset, scale, **meta)
        return dq, dk, dv, None, None, None, None


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_offset: int = 0,
                     key_mask: torch.Tensor | None = None, dropout_p: float = 0.0, block_m: int = 64,
                     block_n: int = 64) -> torch.Tensor:
    """Causal attention with the Triton kernels. q (B, nh, Tq, hs), k/v (B, nh, Tk, hs) -> (B, nh, Tq, hs).

    block_m / block_n are the query / key tile sizes (powers of two, >= 16)."""
    if triton is None:
        raise GptkitError("the triton attention backend needs the triton package", "attention",
                          "pip install 'gptkit[triton]', or use attention=sdpa or flash")
    if q.device.type != "cuda" and not _interpreting():
        raise GptkitError(f"the triton attention backend runs on CUDA, not {q.device.type}", "attention",
                          "use attention=sdpa or flash here (or TRITON_INTERPRET=1 to test the kernels on the CPU)")
    if dropout_p > 0.0:
        raise GptkitError("the triton attention backend does not implement attention dropout", "attention",
                          "use attention=flash or sdpa, or set dropout=0")
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"triton_attention: bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if key_mask is not None:
        key_mask = key_mask[:, : k.shape[2]].to(device=q.device, dtype=torch.int8).contiguous()
    with torch.autocast(dev, enabled=False):
        return _TritonAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), key_mask, int(q_offset),
                                      int(block_m), int(block_n))
