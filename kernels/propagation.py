"""Triton kernels of the propagation slice: attention over video frames without the affinity matrix.

Queries are the target frame's pixels (HW of them, C features); keys and values are the reference
frames' pixels. Two groups of reference frames share one softmax: ``RL`` *local* frames, where a query
sees only the keys within Euclidean distance ``radius`` of its own position, and ``RG`` *global* frames
(every key). ``color_propagate`` puts all its frames in one group; ``propagate_labels`` puts the context
window (views of the features and of the predicted maps) in the local group and the long-memory frames
in the global one.

Layout: features stay channel-first as users hold them: ``q`` (B, C, HW), keys (B, R, C, HW), values
(B, R, V, HW), all contiguous; tiles are runs of consecutive raster pixels.

``_propagate_fwd_kernel`` (FlashAttention-style): a program owns BLOCK_M query pixels of one sample,
streams the key tiles in BLOCK_N pixels with an online log-sum-exp, and writes the output (B, V, HW)
and the per-query LSE (fp32; fp64 for fp64). In a local frame it visits only the key rows
[y0 - floor(radius), y1 + floor(radius)] around the tile's rows [y0, y1], and masks keys by the true
distance, so its cost follows the window, not the frame. V is padded to BLOCK_V (16, tl.dot's
minimum) in registers by masked loads, never in memory (larger V: launches over chunks of 16). With
``LOSS`` the values are class ids: it keeps a second, class-masked online LSE (over the keys whose class is the query's own) instead of an
output, which is all ``colorization_loss`` needs: log p_y = lse_y - lse.

Backward by recompute from the LSE (no stored probabilities): ``_propagate_bwd_dq_kernel`` is
query-parallel (dQ), ``_propagate_bwd_dkdv_kernel`` key-parallel (dK, dV; its query range is the
key tile's window in local frames). With P = exp(S - lse):
- propagation: dP = dO V^T, dS = P * (dP - delta), delta_i = sum_v dO_iv O_iv;
- loss (gradients g, gy of lse and lse_y): dS = g P + gy [class_j == y_i] exp(S - lse_y);
then dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO. C is processed in chunks of BLOCK_C; the backward
grids have one program column per chunk (each recomputes the full logits, once when C <= BLOCK_C).

Offsets: across samples and frames int64; within one frame int32 (the launchers reject a frame of
C * H * W >= 2**31 elements).

``_propagate_topk_kernel`` (inference, k <= 32, fp32/fp16/bf16): the forward's streaming loop keeping,
per query, the top 32 (logit, key id) pairs packed into int64 (monotone fp32 bits high, id low), merged
with each key tile of 32 by one bitonic sort of 64; then the softmax over the first k and a gathered
sum of their values. fp64 and k > 32 run the chunked PyTorch path of ``fastssl.propagation``.

>>> block_v(3), block_v(16), [chunk for chunk in _v_chunks(40)]
(16, 16, [(0, 16), (16, 32), (32, 40)])
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import (TL_DTYPE, acc_type, device_function, dot_acc, dot_precision, dot_precisions, launch, register,
                       variant)

# V is padded in registers to BLOCK_V = 16 (tl.dot's minimum); a larger V runs in chunks of 16 (the forward
# recomputes the logits per chunk; the backward adds the chunks' dQ, dK). One BLOCK_V keeps the compile
# test's share near 30 s per arch (a BLOCK_V = 32 variant would add 12 compiles).
MAX_BLOCK_V = 16
# 8 warps, 1 stage: the only setting where every dtype x mode fits in 255 registers without spilling
# (4 warps or 2 stages spill in the backward kernels; ptxas sm_90 and sm_80, tests/test_compile_sm90.py).
NUM_WARPS, NUM_STAGES = 8, 1

# float32 products (registry.dot_precision's rule) run as three TF32 products on the tensor cores, fp32
# accuracy, also where PyTorch allows TF32: the tiles below are sized for tf32x3's operand registers, and with
# plain TF32 ptxas gives the fp32 forward, dQ (LOSS) and top-k variants stack frames of 8-16 bytes on sm_90 or
# sm_80 under triton 3.6, 3.8 and 3.9 (BLOCK_C 16 moves them to other variants), 2026-12-03.
FP32_DOT = dict(exact="tf32x3", tf32=False)

# Tiles per kernel. 16-bit: the forward 64 x 64; dQ 64 queries x 32 keys, dK/dV 64 keys x 32 queries (64 x 64
# spills in dQ on sm_80; the 64 side is the one wgmma needs as its M); C in chunks of 64 (the training
# shape's C in one chunk). fp32 runs its products as tf32x3 (three tensor-core products, fp32 accuracy),
# which triples the operand registers: 32 x 32, C in chunks of 32. fp64 (the gradient checks): 32 x 32.
# Every (dtype, LOSS) launch combination is a registered variant (tests/test_compile_sm90.py).
_HALF_BLOCKS = {"fwd": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=64), "dq": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_C=64),
                "dkdv": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_C=64)}
_SMALL_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_C=32)
# fp64 forward: C in chunks of 16. With 32, ptxas gives the training-shape variant a stack frame (STACK:8,
# one register spilled at 80 registers) on sm_90 (propagation) and sm_80 (LOSS) under triton 3.8; 16 has
# none on sm_90/sm_80 under triton 3.6, 3.8 and 3.9 (90-128 registers; tests/test_compile_sm90.py, 2026-12-02).
_FP64_FWD_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_C=16)


def blocks_for(kind: str, dtype: torch.dtype) -> dict:
    """BLOCK_M (queries), BLOCK_N (keys), BLOCK_C (channels) of kernel ``kind`` (fwd | dq | dkdv)."""
    if dtype in (torch.float16, torch.bfloat16):
        return _HALF_BLOCKS[kind]
    return _FP64_FWD_BLOCKS if (kind == "fwd" and dtype == torch.float64) else _SMALL_BLOCKS


def block_v(v: int) -> int:
    """The padded value width of one launch (V <= MAX_BLOCK_V per launch): tl.dot's minimum, 16."""
    return max(16, triton.next_power_of_2(v))



# ----------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------

@device_function
@triton.jit
def _window(m0, m_hi, W, H, rr, local):
    """Key pixel range [lo, hi) a tile of raster pixels [m0, m_hi) sees in a frame: the rows within rr
    of its rows when ``local``, else the whole frame."""
    y0 = m0 // W
    y1 = (m_hi - 1) // W
    lo = tl.maximum(y0 - rr, 0) * W
    hi = tl.minimum(y1 + rr + 1, H) * W
    lo = tl.where(local != 0, lo, 0)
    hi = tl.where(local != 0, hi, H * W)
    return lo, hi


@device_function
@triton.jit
def _frame(kl_ptr, vl_ptr, kg_ptr, vg_ptr, b, r, RL, RG, k_frame, v_frame, lo_l, hi_l, HW):
    """Frame ``r`` of sample ``b``: the first RL frames are local (key range [lo_l, hi_l)), the next RG
    global (the whole frame). Returns (key base, value base, lo, hi, local)."""
    local = r < RL
    if local:
        f = b * RL + r
        k_base = kl_ptr + f * k_frame
        v_base = vl_ptr + f * v_frame
    else:
        f = b * RG + (r - RL)
        k_base = kg_ptr + f * k_frame
        v_base = vg_ptr + f * v_frame
    lo = tl.where(local, lo_l, 0)
    hi = tl.where(local, hi_l, HW)
    return k_base, v_base, lo, hi, local


@device_function
@triton.jit
def _logits(q_base, k_base, offs_m, offs_n, HW, C, ACC: tl.constexpr, PREC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """<q_m, k_n> for a (BLOCK_M, BLOCK_N) tile, summed over C in chunks of BLOCK_C. With the roles of queries
    and keys swapped it is the key-parallel backward's transposed tile (BLOCK_N, BLOCK_M)."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    m_ok = offs_m < HW
    n_ok = offs_n < HW
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        q = tl.load(q_base + offs_c[None, :] * HW + offs_m[:, None], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        k = tl.load(k_base + offs_c[:, None] * HW + offs_n[None, :], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        s += dot_acc(q, k, ACC, PREC)
    return s


@device_function
@triton.jit
def _in_window(offs_m, offs_n, W, HW, n_hi, rad2, local):
    """(BLOCK_M, BLOCK_N): key n exists (n < n_hi) and, in a local frame, lies within the radius of m."""
    ok = (offs_n < n_hi)[None, :] & (offs_n < HW)[None, :]
    dy = ((offs_m // W)[:, None] - (offs_n // W)[None, :]).to(tl.float32)
    dx = ((offs_m % W)[:, None] - (offs_n % W)[None, :]).to(tl.float32)
    near = dy * dy + dx * dx <= rad2
    return ok & (near | (local == 0))


@device_function
@triton.jit
def _fwd_frame(q_base, k_base, v_base, offs_m, ylab, lo, hi, local, m_i, l_i, acc, my_i, ly_i,
               C, V, W, HW, rad2, scale,
               ACC: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    """Stream one reference frame's key tiles in [lo, hi) through the online softmax state."""
    offs_v = tl.arange(0, BLOCK_V)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _logits(q_base, k_base, offs_m, offs_n, HW, C, ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_C)
        valid = _in_window(offs_m, offs_n, W, HW, hi, rad2, local)
        s = tl.where(valid, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if LOSS:
            klab = tl.load(v_base + offs_n, mask=offs_n < hi, other=-1)
            sy = tl.where(valid & (ylab[:, None] == klab[None, :]), s, float("-inf"))
            my_new = tl.maximum(my_i, tl.max(sy, 1))
            my_use = tl.where(my_new == float("-inf"), 0.0, my_new)
            ly_i = ly_i * tl.exp(my_i - my_use) + tl.sum(tl.exp(sy - my_use[:, None]), 1)
            my_i = my_new
        else:
            v = tl.load(v_base + offs_v[None, :] * HW + offs_n[:, None],
                        mask=(offs_n < hi)[:, None] & (offs_v < V)[None, :], other=0.0)
            acc = acc * alpha[:, None] + dot_acc(p.to(v.dtype), v, ACC, PREC)
    return m_i, l_i, acc, my_i, ly_i


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _propagate_fwd_kernel(q_ptr, kl_ptr, vl_ptr, kg_ptr, vg_ptr, y_ptr, scale_ptr, out_ptr, lse_ptr, lsey_ptr,
                          C, V, H, W, RL, RG, rr, rad2,
                          ACC: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    scale = tl.load(scale_ptr)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < HW
    q_base = q_ptr + b * C * HW
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    my_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    ly_i = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_V), ACC)
    ylab = tl.zeros((BLOCK_M,), tl.int64)
    if LOSS:
        ylab = tl.load(y_ptr + b * HW + offs_m, mask=m_ok, other=-2)
    lo_l, hi_l = _window(m0, tl.minimum(m0 + BLOCK_M, HW), W, H, rr, local=1)
    if LOSS:
        v_frame = HW
    else:
        v_frame = V * HW
    for r in range(0, RL + RG):
        k_base, v_base, lo, hi, local = _frame(kl_ptr, vl_ptr, kg_ptr, vg_ptr, b, r, RL, RG, C * HW, v_frame,
                                               lo_l, hi_l, HW)
        m_i, l_i, acc, my_i, ly_i = _fwd_frame(q_base, k_base, v_base, offs_m, ylab, lo, hi, local,
                                               m_i, l_i, acc, my_i, ly_i, C, V, W, HW, rad2, scale,
                                               ACC, PREC, LOSS, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_V)
    tl.store(lse_ptr + b * HW + offs_m, m_i + tl.log(l_i), mask=m_ok)
    if LOSS:
        tl.store(lsey_ptr + b * HW + offs_m, my_i + tl.log(ly_i), mask=m_ok)
    else:
        offs_v = tl.arange(0, BLOCK_V)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # l_i = 0 only in padding rows
        if ACC == tl.float64:  # fp64 division is a ptxas subroutine with a stack frame on sm_80: exp(-log l)
            inv_l = tl.exp(-tl.log(l_safe))
        else:
            inv_l = 1.0 / l_safe
        out = acc * inv_l[:, None]
        tl.store(out_ptr + b * V * HW + offs_v[None, :] * HW + offs_m[:, None], out.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_v < V)[None, :])


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------

@device_function
@triton.jit
def _dq_frame(q_base, k_base, v_base, offs_m, ylab, do, lse, delta, lsey, gy, lo, hi, local, dq,
              C, V, W, HW, rad2, scale, c_lo,
              ACC: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    offs_v = tl.arange(0, BLOCK_V)
    offs_c = c_lo + tl.arange(0, BLOCK_C)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        s = _logits(q_base, k_base, offs_m, offs_n, HW, C, ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_C)
        valid = _in_window(offs_m, offs_n, W, HW, hi, rad2, local)
        s = tl.where(valid, s * scale, float("-inf"))
        p = tl.exp(s - lse[:, None])
        if LOSS:
            klab = tl.load(v_base + offs_n, mask=n_ok, other=-1)
            py = tl.where(valid & (ylab[:, None] == klab[None, :]), tl.exp(s - lsey[:, None]), 0.0)
            ds = delta[:, None] * p + gy[:, None] * py
        else:
            vt = tl.load(v_base + offs_v[:, None] * HW + offs_n[None, :], mask=(offs_v < V)[:, None] & n_ok[None, :],
                         other=0.0)
            dp = dot_acc(do, vt, ACC, PREC)
            ds = p * (dp - delta[:, None])
        k = tl.load(k_base + offs_c[None, :] * HW + offs_n[:, None], mask=n_ok[:, None] & (offs_c < C)[None, :],
                    other=0.0)
        dq += dot_acc((ds * scale).to(k.dtype), k, ACC, PREC)
    return dq


@triton.jit
def _propagate_bwd_dq_kernel(q_ptr, kl_ptr, vl_ptr, kg_ptr, vg_ptr, y_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr,
                             lsey_ptr, gy_ptr, dq_ptr, C, V, H, W, RL, RG, rr, rad2,
                             ACC: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    """dQ for BLOCK_M queries and channels [pid_c * BLOCK_C, +BLOCK_C). In propagation mode ``delta``
    holds delta_i; in LOSS mode it holds the gradient of lse (and ``gy`` that of lse_y)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c_lo = tl.program_id(2) * BLOCK_C
    HW = H * W
    scale = tl.load(scale_ptr)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < HW
    offs_v = tl.arange(0, BLOCK_V)
    q_base = q_ptr + b * C * HW
    lse = tl.load(lse_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
    ylab = tl.zeros((BLOCK_M,), tl.int64)
    lsey = tl.zeros((BLOCK_M,), ACC)
    gy = tl.zeros((BLOCK_M,), ACC)
    do = tl.zeros((BLOCK_M, BLOCK_V), q_ptr.dtype.element_ty)
    if LOSS:
        ylab = tl.load(y_ptr + b * HW + offs_m, mask=m_ok, other=-2)
        lsey = tl.load(lsey_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
        gy = tl.load(gy_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
    else:
        do = tl.load(do_ptr + b * V * HW + offs_v[None, :] * HW + offs_m[:, None],
                     mask=m_ok[:, None] & (offs_v < V)[None, :], other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_C), ACC)
    lo_l, hi_l = _window(m0, tl.minimum(m0 + BLOCK_M, HW), W, H, rr, local=1)
    if LOSS:
        v_frame = HW
    else:
        v_frame = V * HW
    for r in range(0, RL + RG):
        k_base, v_base, lo, hi, local = _frame(kl_ptr, vl_ptr, kg_ptr, vg_ptr, b, r, RL, RG, C * HW, v_frame,
                                               lo_l, hi_l, HW)
        dq = _dq_frame(q_base, k_base, v_base, offs_m, ylab, do, lse, delta, lsey, gy, lo, hi, local, dq,
                       C, V, W, HW, rad2, scale, c_lo, ACC, PREC, LOSS, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_V)
    offs_c = c_lo + tl.arange(0, BLOCK_C)
    tl.store(dq_ptr + b * C * HW + offs_c[None, :] * HW + offs_m[:, None], dq.to(dq_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_c < C)[None, :])


@triton.jit
def _propagate_bwd_dkdv_kernel(q_ptr, kl_ptr, vl_ptr, kg_ptr, vg_ptr, y_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr,
                               lsey_ptr, gy_ptr, dkl_ptr, dvl_ptr, dkg_ptr, dvg_ptr, C, V, H, W, RL, RG, rr, rad2,
                               ACC: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    """dK (channels [pid_c * BLOCK_C, +BLOCK_C)) and dV (program column 0) for BLOCK_N keys of one
    frame; in a local frame only the queries whose window can hold these keys are visited."""
    pid_n = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_c = tl.program_id(2)
    c_lo = pid_c * BLOCK_C
    R = RL + RG
    b = (pid_f // R).to(tl.int64)
    r = pid_f % R
    local = r < RL
    HW = H * W
    scale = tl.load(scale_ptr)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < HW
    offs_v = tl.arange(0, BLOCK_V)
    offs_c = c_lo + tl.arange(0, BLOCK_C)
    if LOSS:
        v_frame = HW
    else:
        v_frame = V * HW
    if local:
        f = b * RL + r
        k_base = kl_ptr + f * C * HW
        v_base = vl_ptr + f * v_frame
    else:
        f = b * RG + (r - RL)
        k_base = kg_ptr + f * C * HW
        v_base = vg_ptr + f * v_frame
    q_base = q_ptr + b * C * HW
    klab = tl.zeros((BLOCK_N,), tl.int64)
    v = tl.zeros((BLOCK_N, BLOCK_V), q_ptr.dtype.element_ty)
    if LOSS:
        klab = tl.load(v_base + offs_n, mask=n_ok, other=-1)
    else:
        v = tl.load(v_base + offs_v[None, :] * HW + offs_n[:, None], mask=n_ok[:, None] & (offs_v < V)[None, :],
                    other=0.0)
    lo, hi = _window(n0, tl.minimum(n0 + BLOCK_N, HW), W, H, rr, local)
    dk = tl.zeros((BLOCK_N, BLOCK_C), ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    for m_start in range(lo, hi, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < hi
        st = _logits(k_base, q_base, offs_n, offs_m, HW, C, ACC, PREC, BLOCK_N, BLOCK_M, BLOCK_C)  # (keys, queries)
        # the window relation is symmetric: key n sees query m iff m is within the radius of n
        valid = _in_window(offs_n, offs_m, W, HW, hi, rad2, local)
        st = tl.where(valid, st * scale, float("-inf"))
        lse = tl.load(lse_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
        pt = tl.exp(st - lse[None, :])
        if LOSS:
            ylab = tl.load(y_ptr + b * HW + offs_m, mask=m_ok, other=-2)
            lsey = tl.load(lsey_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
            gy = tl.load(gy_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
            pyt = tl.where(valid & (klab[:, None] == ylab[None, :]), tl.exp(st - lsey[None, :]), 0.0)
            dst = delta[None, :] * pt + gy[None, :] * pyt
        else:
            do = tl.load(do_ptr + b * V * HW + offs_v[None, :] * HW + offs_m[:, None],
                         mask=m_ok[:, None] & (offs_v < V)[None, :], other=0.0)
            dv += dot_acc(pt.to(do.dtype), do, ACC, PREC)
            dpt = dot_acc(v, tl.trans(do), ACC, PREC)
            dst = pt * (dpt - delta[None, :])
        q = tl.load(q_base + offs_c[None, :] * HW + offs_m[:, None], mask=m_ok[:, None] & (offs_c < C)[None, :],
                    other=0.0)
        dk += dot_acc((dst * scale).to(q.dtype), q, ACC, PREC)
    dk_mask = n_ok[:, None] & (offs_c < C)[None, :]
    v_lim = tl.where(pid_c == 0, V, 0)  # dV is written by the first channel chunk's programs only
    dv_mask = n_ok[:, None] & (offs_v < v_lim)[None, :]
    if local:
        f = b * RL + r
        tl.store(dkl_ptr + f * C * HW + offs_c[None, :] * HW + offs_n[:, None], dk.to(dkl_ptr.dtype.element_ty),
                 mask=dk_mask)
        if not LOSS:
            tl.store(dvl_ptr + f * V * HW + offs_v[None, :] * HW + offs_n[:, None], dv.to(dvl_ptr.dtype.element_ty),
                     mask=dv_mask)
    else:
        f = b * RG + (r - RL)
        tl.store(dkg_ptr + f * C * HW + offs_c[None, :] * HW + offs_n[:, None], dk.to(dkg_ptr.dtype.element_ty),
                 mask=dk_mask)
        if not LOSS:
            tl.store(dvg_ptr + f * V * HW + offs_v[None, :] * HW + offs_n[:, None], dv.to(dvg_ptr.dtype.element_ty),
                     mask=dv_mask)


# ----------------------------------------------------------------------------------------------------
# top-k (inference)
# ----------------------------------------------------------------------------------------------------

@device_function
@triton.jit
def _pack(s, j):
    """(logit, key id) as one int64 whose order is the logit's order (ties: the larger id): the fp32 bits
    made monotone (negatives' magnitude bits flipped) in the high word, the id in the low word."""
    bits = s.to(tl.int32, bitcast=True)
    mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (mono.to(tl.int64) << 32) | j.to(tl.int64)


@triton.jit
def _propagate_topk_kernel(q_ptr, kl_ptr, vl_ptr, kg_ptr, vg_ptr, scale_ptr, out_ptr, C, V, H, W, RL, RG, rr, rad2,
                           K, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr):
    """Streaming top-k (k <= KP = 32) per query, then the softmax over those k and the weighted sum of
    their values. Each key tile of KP keys is merged into the running top KP by one bitonic sort of the
    2 KP packed (logit, id) pairs per query; excluded keys enter as -inf with id 0 (weight 0)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    scale = tl.load(scale_ptr)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < HW
    q_base = q_ptr + b * C * HW
    top = tl.full((BLOCK_M, KP), -2139095041, tl.int64) << 32  # _pack(-inf, 0)
    lo_l, hi_l = _window(m0, tl.minimum(m0 + BLOCK_M, HW), W, H, rr, local=1)
    for r in range(0, RL + RG):
        k_base, v_base, lo, hi, local = _frame(kl_ptr, vl_ptr, kg_ptr, vg_ptr, b, r, RL, RG, C * HW, V * HW,
                                               lo_l, hi_l, HW)
        for n0 in range(lo, hi, KP):
            offs_n = n0 + tl.arange(0, KP)
            s = _logits(q_base, k_base, offs_m, offs_n, HW, C, tl.float32, PREC, BLOCK_M, KP, BLOCK_C)
            valid = _in_window(offs_m, offs_n, W, HW, hi, rad2, local)
            s = tl.where(valid, s * scale, float("-inf"))
            j = tl.where(valid, r * HW + offs_n[None, :], 0)
            both = tl.reshape(tl.join(top, _pack(s, j)), (BLOCK_M, 2 * KP))
            both = tl.sort(both, dim=1, descending=True)
            top, rest = tl.split(tl.permute(tl.reshape(both, (BLOCK_M, 2, KP)), (0, 2, 1)))
    mono = (top >> 32).to(tl.int32)
    val = tl.where(mono >= 0, mono, mono ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    idx = (top & 0xFFFFFFFF).to(tl.int32)
    val = tl.where(tl.arange(0, KP)[None, :] < K, val, float("-inf"))  # sorted: the first K are the top k
    w = tl.exp(val - tl.max(val, 1)[:, None])
    w = w / tl.sum(w, 1)[:, None]
    fr = idx // HW
    n = idx % HW
    loc = fr < RL
    off_l = ((b * RL + fr) * V) * HW + n
    off_g = ((b * RG + (fr - RL)) * V) * HW + n
    for c in range(0, V):
        x = tl.load(vl_ptr + off_l + c * HW, mask=loc, other=0.0).to(tl.float32)
        x += tl.load(vg_ptr + off_g + c * HW, mask=fr >= RL, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * V * HW + c * HW + offs_m, tl.sum(w * x, 1).to(out_ptr.dtype.element_ty), mask=m_ok)


# ----------------------------------------------------------------------------------------------------
# registry: one variant per (dtype, BLOCK_V, mode) the launchers use, with that dtype's tiles
# ----------------------------------------------------------------------------------------------------

_INTS = ["C", "V", "H", "W", "RL", "RG", "rr"]
# Integer arguments as launches at the GPU's shapes pass them (GUIDE §6), which Triton specializes: the
# training shape (B=32, R=3, 32x32 maps, C=64, V=16) has C, V, H, W multiples of 16 ("aligned"); the CRW
# step (60x107 map, C=256, V=8 label channels, 20 context frames, radius 12, top-k 10) has only C
# ("unaligned", odd maps: its loads cannot be vectorized along the raster). RL, RG, rr and K are counts,
# declared plain; in LOSS mode V is 1 (unused), plain too.
_ALIGNED = {"C": "i32:16", "V": "i32:16", "H": "i32:16", "W": "i32:16"}
_UNALIGNED = {"C": "i32:16"}


def _int_signature(shape: dict, names=_INTS) -> dict:
    return {a: shape.get(a, "i32") for a in names}


def _variants(kind, float_ptrs, acc_ptrs, value_ptrs, label_ptrs, unaligned=False):
    """One variant per (dtype, dot precision, mode) at the training shape; with ``unaligned`` also the CRW
    step's odd map for the value-propagating mode (fp32/fp16/bf16: fp64 is the gradient checks' dtype)."""
    out = []
    for dtype, ty in TL_DTYPE.items():
        acc_ty = "fp64" if dtype == torch.float64 else "fp32"
        blocks = blocks_for(kind, dtype)
        for loss, shape in [(False, _ALIGNED), (True, {**_ALIGNED, "V": "i32"})] + (
                [(False, _UNALIGNED)] if unaligned and dtype != torch.float64 else []):
            sig = {**{a: f"*{ty}" for a in float_ptrs}, **{a: f"*{acc_ty}" for a in acc_ptrs},
                   **{a: ("*i64" if loss else f"*{ty}") for a in value_ptrs},
                   **{a: ("*i64" if loss else f"*{acc_ty}") for a in label_ptrs},  # unused: LSE passed
                   **_int_signature(shape), "rad2": "fp32"}
            out += [variant(sig, ACC=acc_type(dtype), PREC=prec, LOSS=loss, BLOCK_V=MAX_BLOCK_V, **blocks)
                    for prec in dot_precisions(dtype, **FP32_DOT)]
    return out


def _configs():
    return [triton.Config({}, num_warps=NUM_WARPS, num_stages=NUM_STAGES)]


register(_propagate_fwd_kernel, uses_dot=True, configs=_configs(),
         variants=_variants("fwd", ["q_ptr", "kl_ptr", "kg_ptr", "out_ptr"], ["scale_ptr", "lse_ptr", "lsey_ptr"],
                            ["vl_ptr", "vg_ptr"], ["y_ptr"], unaligned=True))
register(_propagate_bwd_dq_kernel, uses_dot=True, configs=_configs(),
         variants=_variants("dq", ["q_ptr", "kl_ptr", "kg_ptr", "do_ptr", "dq_ptr"],
                            ["scale_ptr", "lse_ptr", "delta_ptr", "lsey_ptr", "gy_ptr"], ["vl_ptr", "vg_ptr"], ["y_ptr"]))
register(_propagate_bwd_dkdv_kernel, uses_dot=True, configs=_configs(),
         variants=_variants("dkdv", ["q_ptr", "kl_ptr", "kg_ptr", "do_ptr", "dkl_ptr", "dvl_ptr", "dkg_ptr", "dvg_ptr"],
                            ["scale_ptr", "lse_ptr", "delta_ptr", "lsey_ptr", "gy_ptr"], ["vl_ptr", "vg_ptr"], ["y_ptr"]))


TOPK_MAX = 32
TOPK_BLOCK_M = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}  # 64: wgmma's M; fp32: tf32x3 registers
# 16-bit: 4 warps, 2 stages, C in chunks of 64 (8 warps spill 48 bytes on sm_80; ptxas via
# tests/test_compile_sm90.py). fp32 (tf32x3: three products, split operands): 8 warps, C in chunks of 16;
# 4 warps with chunks of 32 reach 255 registers on the CRW step's odd map and spill (STACK:32 on sm_90 under
# triton 3.8; STACK:16 on sm_80 under 3.9 with 4 warps and chunks of 16); 8 warps x 16 use 170-190 registers
# and spill on neither chip under triton 3.6, 3.8 and 3.9 (2026-12-02).
TOPK_WARPS = {torch.float16: 4, torch.bfloat16: 4, torch.float32: 8}
TOPK_BLOCK_C = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 16}
TOPK_STAGES = 2
# The top-k kernel is inference: the CRW step's odd map (its main use) and maps that are multiples of 16.
for _dt in TOPK_BLOCK_M:
    register(_propagate_topk_kernel, uses_dot=True,
             configs=[triton.Config({}, num_warps=TOPK_WARPS[_dt], num_stages=TOPK_STAGES)],
             variants=[variant({**{a: f"*{TL_DTYPE[_dt]}" for a in ("q_ptr", "kl_ptr", "vl_ptr", "kg_ptr", "vg_ptr",
                                                                    "out_ptr")},
                                "scale_ptr": "*fp32", **_int_signature(shape), "rad2": "fp32", "K": "i32"},
                               PREC=prec, BLOCK_M=TOPK_BLOCK_M[_dt], BLOCK_C=TOPK_BLOCK_C[_dt], KP=TOPK_MAX)
                       for shape in (_UNALIGNED, _ALIGNED) for prec in dot_precisions(_dt, **FP32_DOT)])

# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------

def _geometry(q, kl, kg, radius):
    """The launch arguments every kernel takes (B and the math dtype aside): sizes, frame counts and the
    radius. ``kl``/``kg``: (B, RL|RG, C, H, W)."""
    B, C, H, W = q.shape
    if max(C, MAX_BLOCK_V) * H * W >= 2**31:  # offsets within one frame are int32 (across frames int64)
        raise ValueError(f"one frame of C * H * W = {C} * {H} * {W} elements is over the kernels' 2**31 limit")
    rr = int(radius) if radius is not None else 0  # floor: radius >= 0
    rad2 = float(radius) ** 2 if radius is not None else 0.0
    return dict(C=C, H=H, W=W, RL=kl.shape[1], RG=kg.shape[1], rr=rr, rad2=rad2)


def _dummy(a, b):
    """An empty group passes the other group's tensor as a never-read pointer."""
    return (a if a.shape[1] else b), (b if b.shape[1] else a)


def _v_chunks(V):
    return [(v0, min(v0 + MAX_BLOCK_V, V)) for v0 in range(0, V, MAX_BLOCK_V)]


def _math(dtype: torch.dtype) -> dict:
    """The constexprs of the math: accumulation type and dot precision (registry.dot_precision)."""
    return dict(ACC=acc_type(dtype), PREC=dot_precision(dtype, **FP32_DOT))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_LAUNCH = dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def propagate_forward(q, kl, vl, kg, vg, scale: torch.Tensor, radius):
    """``out`` (B, V, H, W) in the input dtype and ``lse`` (B, H, W) in fp32 (fp64 for fp64).
    Inputs contiguous: q (B, C, H, W), kl/vl (B, RL, C|V, H, W), kg/vg (B, RG, C|V, H, W); ``scale`` the
    (1,) multiplier of the logits in the math dtype (read on the device)."""
    geo = _geometry(q, kl, kg, radius)
    B, H, W = q.shape[0], geo["H"], geo["W"]
    V = vl.shape[2] if geo["RL"] else vg.shape[2]
    out = torch.empty((B, V, H, W), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, W), dtype=_acc_dtype(q.dtype), device=q.device)
    if B == 0 or H * W == 0:
        return out, lse
    kl_, kg_ = _dummy(kl, kg)
    blocks = blocks_for("fwd", q.dtype)
    grid = (triton.cdiv(H * W, blocks["BLOCK_M"]), B)
    for v0, v1 in _v_chunks(V):
        one = v1 - v0 == V
        vl_c = vl if one else vl[:, :, v0:v1].contiguous()
        vg_c = vg if one else vg[:, :, v0:v1].contiguous()
        vl_, vg_ = _dummy(vl_c, vg_c)
        out_c = out if one else torch.empty((B, v1 - v0, H, W), dtype=q.dtype, device=q.device)
        launch(_propagate_fwd_kernel, grid, q_ptr=q, kl_ptr=kl_, vl_ptr=vl_, kg_ptr=kg_, vg_ptr=vg_, y_ptr=lse,
               scale_ptr=scale, out_ptr=out_c, lse_ptr=lse, lsey_ptr=lse, V=v1 - v0, **geo, **_math(q.dtype),
               LOSS=False, BLOCK_V=block_v(v1 - v0), **blocks, **_LAUNCH)
        if not one:
            out[:, v0:v1] = out_c
    return out, lse


def propagate_backward(grad_out, q, kl, vl, kg, vg, out, lse, scale: torch.Tensor, radius):
    """(dq, dkl, dvl, dkg, dvg) by recompute from ``lse``. V over 16 runs in chunks of 16: dS is linear
    in (dO, V) chunk by chunk (dS = sum_c P (dO_c V_c^T - delta_c)), so the chunks' dQ and dK add up."""
    geo = _geometry(q, kl, kg, radius)
    B, H, W, RL, RG = q.shape[0], geo["H"], geo["W"], geo["RL"], geo["RG"]
    V = out.shape[1]
    dq = torch.empty_like(q)
    dkl, dkg = torch.empty_like(kl), torch.empty_like(kg)
    dvl, dvg = torch.empty_like(vl), torch.empty_like(vg)
    if B == 0 or H * W == 0:
        return dq, dkl, dvl, dkg, dvg
    acc = _acc_dtype(q.dtype)
    kl_, kg_ = _dummy(kl, kg)
    bq, bk = blocks_for("dq", q.dtype), blocks_for("dkdv", q.dtype)
    n_c = triton.cdiv(geo["C"], bq["BLOCK_C"])
    grid_q = (triton.cdiv(H * W, bq["BLOCK_M"]), B, n_c)
    grid_k = (triton.cdiv(H * W, bk["BLOCK_N"]), B * (RL + RG), n_c)
    chunks = _v_chunks(V)
    for i, (v0, v1) in enumerate(chunks):
        one = len(chunks) == 1
        pick = (lambda t: t) if one else (lambda t: t[:, :, v0:v1].contiguous())  # noqa: E731
        vl_c, vg_c = pick(vl), pick(vg)
        do_c = grad_out if one else grad_out[:, v0:v1].contiguous()
        o_c = out if one else out[:, v0:v1]
        delta = (do_c.to(acc) * o_c.to(acc)).sum(1)
        vl_, vg_ = _dummy(vl_c, vg_c)
        dq_c = dq if i == 0 else torch.empty_like(q)
        dkl_c = dkl if i == 0 else torch.empty_like(kl)
        dkg_c = dkg if i == 0 else torch.empty_like(kg)
        dvl_c = dvl if one else torch.empty_like(vl_c)
        dvg_c = dvg if one else torch.empty_like(vg_c)
        dkl_, dkg_ = _dummy(dkl_c, dkg_c)
        dvl_, dvg_ = _dummy(dvl_c, dvg_c)
        common = dict(q_ptr=q, kl_ptr=kl_, vl_ptr=vl_, kg_ptr=kg_, vg_ptr=vg_, y_ptr=lse, scale_ptr=scale, do_ptr=do_c,
                      lse_ptr=lse, delta_ptr=delta, lsey_ptr=lse, gy_ptr=lse, V=v1 - v0, **geo, **_math(q.dtype),
                      LOSS=False, BLOCK_V=block_v(v1 - v0), **_LAUNCH)
        launch(_propagate_bwd_dq_kernel, grid_q, dq_ptr=dq_c, **common, **bq)
        launch(_propagate_bwd_dkdv_kernel, grid_k, dkl_ptr=dkl_, dvl_ptr=dvl_, dkg_ptr=dkg_, dvg_ptr=dvg_, **common,
               **bk)
        if i:
            dq += dq_c
            dkl += dkl_c
            dkg += dkg_c
        if not one:
            dvl[:, :, v0:v1] = dvl_c
            dvg[:, :, v0:v1] = dvg_c
    return dq, dkl, dvl, dkg, dvg


def colorization_lse_forward(q, kl, ll, kg, lg, y, scale: torch.Tensor, radius):
    """(lse, lse_y), each (B, H, W) in fp32 (fp64 for fp64): the log-sum-exp of the logits over all
    keys and over the keys whose class (``ll``/``lg``: (B, RL|RG, H, W) int64) equals the query's own
    (``y``: (B, H, W) int64)."""
    geo = _geometry(q, kl, kg, radius)
    B, H, W = q.shape[0], geo["H"], geo["W"]
    lse = torch.empty((B, H, W), dtype=_acc_dtype(q.dtype), device=q.device)
    lsey = torch.empty((B, H, W), dtype=_acc_dtype(q.dtype), device=q.device)
    if B == 0 or H * W == 0:
        return lse, lsey
    kl_, kg_ = _dummy(kl, kg)
    ll_, lg_ = _dummy(ll, lg)
    blocks = blocks_for("fwd", q.dtype)
    launch(_propagate_fwd_kernel, (triton.cdiv(H * W, blocks["BLOCK_M"]), B), q_ptr=q, kl_ptr=kl_, vl_ptr=ll_,
           kg_ptr=kg_, vg_ptr=lg_, y_ptr=y, scale_ptr=scale, out_ptr=q, lse_ptr=lse, lsey_ptr=lsey, V=1, **geo,
           **_math(q.dtype), LOSS=True, BLOCK_V=16, **blocks, **_LAUNCH)
    return lse, lsey


def colorization_lse_backward(g, gy, q, kl, ll, kg, lg, y, lse, lsey, scale: torch.Tensor, radius):
    """(dq, dkl, dkg) from the gradients ``g`` of lse and ``gy`` of lse_y (acc dtype, (B, H, W))."""
    geo = _geometry(q, kl, kg, radius)
    B, H, W, RL, RG = q.shape[0], geo["H"], geo["W"], geo["RL"], geo["RG"]
    dq = torch.empty_like(q)
    dkl, dkg = torch.empty_like(kl), torch.empty_like(kg)
    if B == 0 or H * W == 0:
        return dq, dkl, dkg
    acc = _acc_dtype(q.dtype)
    g, gy = g.to(acc).contiguous(), gy.to(acc).contiguous()
    kl_, kg_ = _dummy(kl, kg)
    ll_, lg_ = _dummy(ll, lg)
    dkl_, dkg_ = _dummy(dkl, dkg)
    bq, bk = blocks_for("dq", q.dtype), blocks_for("dkdv", q.dtype)
    n_c = triton.cdiv(geo["C"], bq["BLOCK_C"])
    # in LOSS mode delta_ptr holds the gradient of lse and gy_ptr that of lse_y; do_ptr is never read
    common = dict(q_ptr=q, kl_ptr=kl_, vl_ptr=ll_, kg_ptr=kg_, vg_ptr=lg_, y_ptr=y, scale_ptr=scale, do_ptr=q,
                  lse_ptr=lse, delta_ptr=g, lsey_ptr=lsey, gy_ptr=gy, V=1, **geo, **_math(q.dtype), LOSS=True,
                  BLOCK_V=16, **_LAUNCH)
    launch(_propagate_bwd_dq_kernel, (triton.cdiv(H * W, bq["BLOCK_M"]), B, n_c), dq_ptr=dq, **common, **bq)
    launch(_propagate_bwd_dkdv_kernel, (triton.cdiv(H * W, bk["BLOCK_N"]), B * (RL + RG), n_c), dkl_ptr=dkl_,
           dvl_ptr=dkl_, dkg_ptr=dkg_, dvg_ptr=dkg_, **common, **bk)
    return dq, dkl, dkg


def topk_supported(dtype: torch.dtype, topk: int) -> bool:
    """The top-k kernel's range: k <= 32 and fp32/fp16/bf16 (fp64 keeps exact fp64 logits: the PyTorch path)."""
    return topk <= TOPK_MAX and dtype in TOPK_BLOCK_M


def propagate_topk_forward(q, kl, vl, kg, vg, scale: torch.Tensor, radius, topk: int):
    """(B, V, H, W): the softmax over each query's top ``topk`` logits, weighted sum of their values;
    ``scale`` (1,) float32."""
    geo = _geometry(q, kl, kg, radius)
    B, H, W = q.shape[0], geo["H"], geo["W"]
    V = vl.shape[2] if geo["RL"] else vg.shape[2]
    out = torch.empty((B, V, H, W), dtype=q.dtype, device=q.device)
    if B == 0 or H * W == 0:
        return out
    kl_, kg_ = _dummy(kl, kg)
    vl_, vg_ = _dummy(vl, vg)
    block_m = TOPK_BLOCK_M[q.dtype]
    launch(_propagate_topk_kernel, (triton.cdiv(H * W, block_m), B), q_ptr=q, kl_ptr=kl_, vl_ptr=vl_, kg_ptr=kg_,
           vg_ptr=vg_, scale_ptr=scale, out_ptr=out, V=V, **geo, K=topk, PREC=_math(q.dtype)["PREC"],
           BLOCK_M=block_m, BLOCK_C=TOPK_BLOCK_C[q.dtype], KP=TOPK_MAX, num_warps=TOPK_WARPS[q.dtype],
           num_stages=TOPK_STAGES)
    return out
