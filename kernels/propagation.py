"""Triton kernels of the propagation slice: attention over video frames without the affinity matrix.

Queries are the target frame's pixels (HW of them, C features); keys and values are the reference
frames' pixels. Two groups of reference frames share one softmax: ``RL`` *local* frames, where a query
sees only the keys within Euclidean distance ``radius`` of its own position, and ``RG`` *global* frames
(every key). ``color_propagate`` puts all its frames in one group; ``propagate_labels`` puts the context
window (views of the features and of the predicted maps) in the local group and the long-memory frames
in the global one.

Layout: features stay channel-first as users hold them: ``q`` (B, C, HW), keys (B, R, C, HW), values
(B, R, V, HW), all contiguous; tiles are runs of consecutive raster pixels (2-D blocks in the top-k kernel).

Compile-time variants (the launchers pick them, ``plan``): ``WINDOWED`` (some frame is local) compiles the
window arithmetic (each key's row and column, the distance test) into the local frames' loop only; the dense
variant has none of it, and its global frames run their whole key tiles unmasked, then the one partial tile
masked (the fused-attention tutorial's split). ``C_LOOP``: without it the query tile (all of C <= BLOCK_C) is
loaded once and stays resident across the key tiles, one product per tile; with it (wider C, float64) C
runs in chunks of BLOCK_C, the queries re-read per chunk. Logits are computed in base 2 with
``scale * log2(e)`` folded into one multiply, so every exponential is one ``exp2``; the LSE is stored in
natural units. Key tiles are pipelined in two stages (cp.async) where a product consumes them.

``_propagate_fwd_kernel`` (FlashAttention-style): a program owns BLOCK_M query pixels of one sample,
streams the key tiles in BLOCK_N pixels with an online log-sum-exp, and writes the output (B, V, HW)
and the per-query LSE (fp32; fp64 for fp64). In a local frame it visits only the key rows
[y0 - floor(radius), y1 + floor(radius)] around the tile's rows [y0, y1], and masks keys by the true
distance, so its cost follows the window, not the frame. V is padded to BLOCK_V (16, tl.dot's
minimum) in registers by masked loads, never in memory (larger V: launches over chunks of 16); one
warpgroup per 64 query rows, so the P @ V product's N is all of BLOCK_V (8 warps over 64 rows would split it
into two wgmma of N = 8). With ``LOSS`` the values are class ids: it keeps a second, class-masked online LSE
(over the keys whose class is the query's own) instead of an output, which is all ``colorization_loss``
needs: log p_y = lse_y - lse.

Backward by recompute from the LSE (no stored probabilities): ``_propagate_bwd_dq_kernel`` is
query-parallel (dQ), ``_propagate_bwd_dkdv_kernel`` key-parallel (dK, dV; its query range is the
key tile's window in local frames). With P = exp(S - lse):
- propagation: dP = dO V^T, dS = P * (dP - delta), delta_i = sum_v dO_iv O_iv;
- loss (gradients g, gy of lse and lse_y): dS = g P + gy [class_j == y_i] exp(S - lse_y);
then dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO. With a resident tile one key (query) tile load
serves both products; with ``C_LOOP`` the grids have one program column per chunk of dQ (dK), each
recomputing the logits over all of C.

Offsets: across samples and frames int64; within one frame int32 (the launchers reject a frame of
C * H * W >= 2**31 elements).

``_propagate_topk_kernel`` (inference, k <= 32, fp32/fp16/bf16): a program owns a TILE_H x TILE_W block of
query pixels; in a local frame it visits the box of key rows and columns within floor(radius) of the block
(8 x 8 queries, radius 12: a 32 x 32 box), in key tiles of BLOCK_N pixels of one box row; global frames
in raster tiles. Per query it keeps an unsorted list of the best k (logit, key id) pairs packed into int64
(monotone fp32 bits high, ``2^32 - 1 - id`` low: one integer order that is the tie rule), in KP = the
next power of two >= max(k, 16) slots (slots past k hold a value no key beats). Each key tile is merged
by repeated extraction: while some query's best remaining key beats its list's worst (the k-th), that key
replaces it; a tile where no query's best beats its k-th costs one max and one min per query and is
skipped (the test runs before any merge work). Then the softmax over the k and a gathered sum of their
values. fp64 and k > 32 run the chunked PyTorch path of ``fastssl.propagation``.

Tie rule (both backends): among equal logits the key with the smaller id wins, id = frame * H * W +
pixel, frames numbered local first, then global (as a stable sort of the keys in that order would).

>>> block_v(3), block_v(16), [chunk for chunk in _v_chunks(40)]
(16, 16, [(0, 16), (16, 32), (32, 40)])
>>> topk_slots(1), topk_slots(10), topk_slots(17)
(16, 16, 32)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from ..propagation import disk  # the radius test's exact integers, shared with the PyTorch path
from .registry import (TL_DTYPE, acc_type, arch_family, device_arch, device_function, dot_acc, dot_precision,
                       dot_precisions, for_archs, launch, register, variant)

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(LOG2E * x)
LN2 = tl.constexpr(0.6931471805599453)  # ln(x) = LN2 * log2(x)
# The radius test is dy^2 + dx^2 <= rad2 in int32 with |dy|, |dx| clamped at D_MAX (2 * D_MAX^2 < 2^31, no
# overflow): exact wherever rad2 < D_MAX^2 (a clamped key is out of reach then); a disk covering the map
# passes rad2 = I32_MAX (every key in reach). ``_geometry`` refuses the one case between (a radius of
# D_MAX or more on a map wider or taller than that which it does not cover).
D_MAX = tl.constexpr(32767)
I32_MAX = 2**31 - 1
# rr and rad2 follow the caller's radius: never specialized (a radius of 4 would compile apart from 5, rad2
# 16 being a multiple of 16), so every radius runs one compiled kernel.
RADIUS_ARGS = ["rr", "rad2"]

# V is padded in registers to BLOCK_V = 16 (tl.dot's minimum); a larger V runs in chunks of 16 (the forward
# recomputes the logits per chunk; the backward adds the chunks' dQ, dK). GUIDE §6's training shape has V = 16.
MAX_BLOCK_V = 16

# float32 products (registry.dot_precision's rule) run as three TF32 products on the tensor cores, fp32
# accuracy, also where PyTorch allows TF32 (one compile variant per dtype).
FP32_DOT = dict(exact="tf32x3", tf32=False)

# Tiles per dtype family and kernel: (BLOCK_M queries, BLOCK_N keys, (num_warps, num_stages[, maxnreg]) on
# sm_90, on sm_80), and the channel block: resident when C <= BLOCK_C, else chunks of BLOCK_C. 16-bit: on sm_90 one
# warpgroup per 64 query (dK/dV: key) rows, so no product's N is split between warpgroups (the forward's
# 128 x 32 x 8 warps: 6 wgmma a key tile, 72 registers); C = 64 (the training shape) resident. On sm_80
# (mma.sync) the backward takes 8 warps: with 4, ptxas gives dQ (windowed) and dK/dV (LOSS) 8-byte stack
# frames at 168 registers under triton 3.6. fp32 runs its products as tf32x3 (three tensor-core products,
# split operands: three times the operand registers): 8 warps; dK/dV 16 queries a step (32 spills 32 B
# at 255 registers on sm_90 under triton 3.9). fp64 (the gradient checks): C in chunks of 16, one stage;
# the query-parallel kernels on 4 warps (8 give the forward 8 B of stack at 80 registers under 3.8, dQ
# 16 B under 3.9). Measured under triton 3.6, 3.8, 3.9 with tests/test_compile_sm90.py, 2026-12-07.
# maxnreg 255 (the launch option ``.maxnreg``; no limit beyond the chip's): triton 3.9 runs ptxas with
# --regAllocOptLevel=2, which on sm_80 held 8-warp kernels at 128 registers and gave them 8-16 B stack
# frames (16-bit forward LOSS chunked, dQ dense, dK/dV LOSS windowed, top-k), and ptxas 12.8 (triton 3.6)
# the fp64 dQ 24 B at 168; with the limit stated every sm_80 variant compiles without a frame under 3.6,
# 3.8 and 3.9 (at most 255 registers: the fp32 and 16-bit chunked ones, as under 3.8 before). On sm_90
# only the fp64 dQ takes it (16 B of stack at 96 registers under 3.8; 168-216 registers with it).
_TILES = {
    "half": {"fwd": (128, 32, {90: (8, 2), 80: (8, 2, 255)}), "dq": (64, 32, {90: (4, 2), 80: (8, 2, 255)}),
             "dkdv": (32, 64, {90: (4, 2), 80: (8, 2, 255)})},
    "fp32": {"fwd": (32, 32, {90: (8, 2), 80: (8, 2, 255)}), "dq": (32, 32, {90: (8, 2), 80: (8, 2, 255)}),
             "dkdv": (16, 32, {90: (8, 2), 80: (8, 2, 255)})},
    "fp64": {"fwd": (32, 32, {90: (4, 1), 80: (4, 1, 255)}), "dq": (32, 32, {90: (4, 1, 255), 80: (4, 1, 255)}),
             "dkdv": (32, 32, {90: (8, 1), 80: (8, 1, 255)})},
}
_BLOCK_C = {"half": 64, "fp32": 64, "fp64": 16}  # resident width


def _loop_c(fam: str, kind: str) -> int:
    """The chunk width with C_LOOP: 64 (16-bit), 16 (fp64; fp32 in the backward, 32 in the forward)."""
    return 64 if fam == "half" else (32 if (fam, kind) == ("fp32", "fwd") else 16)
# The interpreter runs narrow channel blocks, so that the tests' small C reach both the resident and the
# chunked code.
INTERPRET_BLOCK_C = 16


def family(dtype: torch.dtype) -> str:
    return "fp64" if dtype == torch.float64 else ("fp32" if dtype == torch.float32 else "half")


def plan(kind: str, dtype: torch.dtype, C: int, RL: int, arch: int = 90) -> dict:
    """The constexprs and launch options of kernel ``kind`` (fwd | dq | dkdv) for ``dtype``, ``C`` channels,
    ``RL`` local frames and the chip family ``arch`` (90 or 80): tiles, ``C_LOOP`` (C wider than the resident
    block, or float64) and ``WINDOWED`` (some frame is local; the chunked kernels are compiled windowed only,
    which runs global frames densely too).

    >>> [(p["C_LOOP"], p["WINDOWED"]) for p in (plan("fwd", torch.bfloat16, 8, 0), plan("fwd", torch.float64, 8, 0))]
    [(False, False), (True, True)]
    """
    fam = family(dtype)
    bm, bn, launches = _TILES[fam][kind]
    warps, stages, *maxnreg = launches[arch_family(arch)]
    resident = INTERPRET_BLOCK_C if interpreting() else _BLOCK_C[fam]
    c_loop = fam == "fp64" or C > resident
    block_c = INTERPRET_BLOCK_C if interpreting() else (_loop_c(fam, kind) if c_loop else _BLOCK_C[fam])
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=block_c, C_LOOP=c_loop, WINDOWED=RL > 0 or c_loop, num_warps=warps,
                num_stages=stages, **_maxnreg(*maxnreg))


def _maxnreg(limit=None) -> dict:
    """The launch option ``maxnreg`` where a chip family's launch sets it (on the device only: the
    interpreter takes no register limit)."""
    return {} if limit is None or interpreting() else {"maxnreg": limit}


def block_v(v: int) -> int:
    """The padded value width of one launch (V <= MAX_BLOCK_V per launch): tl.dot's minimum, 16."""
    return max(16, triton.next_power_of_2(v))


# ----------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------

@device_function
@triton.jit
def _window(m0, m_hi, W, H, rr):
    """Key pixel range [lo, hi) of the rows within rr of the rows of a raster run of pixels [m0, m_hi)."""
    y0 = m0 // W
    y1 = (m_hi - 1) // W
    return tl.maximum(y0 - rr, 0) * W, tl.minimum(y1 + rr + 1, H) * W


@device_function
@triton.jit
def _rows(base, offs, ok, D, HW, d0, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """(len(offs), BLOCK_D) tile of a channel-first (D, HW) map: pixels ``offs`` (masked by ``ok`` when
    MASKED), channels [d0, d0 + BLOCK_D) (masked by D)."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask = (offs_d < D)[None, :]
    if MASKED:
        mask = mask & ok[:, None]
    return tl.load(base + offs_d[None, :] * HW + offs[:, None], mask=mask, other=0.0)


@device_function
@triton.jit
def _cols(base, offs, ok, D, HW, d0, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """The transposed tile of :func:`_rows`: (BLOCK_D, len(offs)), pixels contiguous along the second axis."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask = (offs_d < D)[:, None]
    if MASKED:
        mask = mask & ok[None, :]
    return tl.load(base + offs_d[:, None] * HW + offs[None, :], mask=mask, other=0.0)


@device_function
@triton.jit
def _labels(base, offs, ok, MASKED: tl.constexpr):
    """Class ids of pixels ``offs`` (-1 where masked)."""
    if MASKED:
        lab = tl.load(base + offs, mask=ok, other=-1)
    else:
        lab = tl.load(base + offs)
    return lab


@device_function
@triton.jit
def _logits_loop(a_base, b_base, offs_a, a_ok, offs_b, b_ok, C, HW, ACC: tl.constexpr, PREC: tl.constexpr,
                 MASKED: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """<a_i, b_j> over all C in chunks of BLOCK_C (the ``C_LOOP`` kernels): (BLOCK_A, BLOCK_B); pixels
    ``offs_a`` always masked, ``offs_b`` when MASKED."""
    s = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        s += dot_acc(_rows(a_base, offs_a, a_ok, C, HW, c0, BLOCK_C, True),
                     _cols(b_base, offs_b, b_ok, C, HW, c0, BLOCK_C, MASKED), ACC, PREC)
    return s


@device_function
@triton.jit
def _exp2(x):
    """2^x: one MUFU.EX2 in fp32; in fp64 exp(x ln 2) (libdevice's fp64 exp2 gave the fp64 kernels 8-24 B
    stack frames at 64-96 registers on sm_90 under triton 3.8 and 3.9, 2026-12-07)."""
    if x.dtype == tl.float64:
        return tl.exp(x * LN2)
    return tl.exp2(x)


@device_function
@triton.jit
def _log2(x):
    """log2(x); in fp64 ln(x) / ln 2 (see :func:`_exp2`)."""
    if x.dtype == tl.float64:
        return tl.log(x) * LOG2E
    return tl.log2(x)


@device_function
@triton.jit
def _in_disk(dy, dx, rad2):
    """dy^2 + dx^2 <= rad2 for int32 offsets and an int32 ``rad2`` (see D_MAX): exact, no rounding."""
    dy = tl.minimum(tl.abs(dy), D_MAX)
    dx = tl.minimum(tl.abs(dx), D_MAX)
    return dy * dy + dx * dx <= rad2


@device_function
@triton.jit
def _mask(s, offs_n, hi, ry, rx, W, rad2, WINDOW: tl.constexpr, MASKED: tl.constexpr):
    """Logits ``s`` (rows: pixels at (ry, rx); columns: pixels ``offs_n``), -inf where the column pixel is at or
    past ``hi`` (MASKED) or, with WINDOW, out of the disk (:func:`_in_disk`) around the row's pixel."""
    if WINDOW:
        ky = offs_n // W
        near = _in_disk(ry[:, None] - ky[None, :], rx[:, None] - (offs_n - ky * W)[None, :], rad2)
        s = tl.where(near & (offs_n < hi)[None, :], s, float("-inf"))
    elif MASKED:
        s = tl.where((offs_n < hi)[None, :], s, float("-inf"))
    return s


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------

@device_function
@triton.jit
def _fwd_span(q, q_base, k_base, v_base, offs_m, m_ok, qy, qx, ylab, lo, hi, m_i, l_i, acc, my_i, ly_i,
              C, V, W, HW, rad2, qk2,
              ACC: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr, C_LOOP: tl.constexpr, WINDOW: tl.constexpr,
              MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_V: tl.constexpr):
    """Stream one frame's key tiles [lo, hi) through the online softmax state (base 2: logits x qk2)."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if C_LOOP:
            s = _logits_loop(q_base, k_base, offs_m, m_ok, offs_n, n_ok, C, HW, ACC, PREC, MASKED, BLOCK_M, BLOCK_N,
                             BLOCK_C)
        else:
            s = dot_acc(q, _cols(k_base, offs_n, n_ok, C, HW, 0, BLOCK_C, MASKED), ACC, PREC)
        s = _mask(s * qk2, offs_n, hi, qy, qx, W, rad2, WINDOW, MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _exp2(m_i - m_use)
        p = _exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if LOSS:
            klab = _labels(v_base, offs_n, n_ok, MASKED)
            sy = tl.where(ylab[:, None] == klab[None, :], s, float("-inf"))
            my_new = tl.maximum(my_i, tl.max(sy, 1))
            my_use = tl.where(my_new == float("-inf"), 0.0, my_new)
            ly_i = ly_i * _exp2(my_i - my_use) + tl.sum(_exp2(sy - my_use[:, None]), 1)
            my_i = my_new
        else:
            v = _rows(v_base, offs_n, n_ok, V, HW, 0, BLOCK_V, MASKED)
            acc = acc * alpha[:, None] + dot_acc(p.to(v.dtype), v, ACC, PREC)
    return m_i, l_i, acc, my_i, ly_i


@triton.jit(do_not_specialize=RADIUS_ARGS)
def _propagate_fwd_kernel(q_ptr, kl_ptr, vl_ptr, kg_ptr, vg_ptr, y_ptr, scale_ptr, out_ptr, lse_ptr, lsey_ptr,
                          C, V, H, W, RL, RG, rr, rad2,
                          ACC: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr, WINDOWED: tl.constexpr,
                          C_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_V: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    qk2 = tl.load(scale_ptr) * LOG2E
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < HW
    q_base = q_ptr + b * C * HW
    q = tl.zeros((BLOCK_M, BLOCK_C), dtype=q_ptr.dtype.element_ty)
    if not C_LOOP:  # resident: loaded once for every key tile
        q = _rows(q_base, offs_m, m_ok, C, HW, 0, BLOCK_C, True)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    my_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    ly_i = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_V), ACC)
    ylab = tl.zeros((BLOCK_M,), tl.int64)
    if LOSS:
        ylab = tl.load(y_ptr + b * HW + offs_m, mask=m_ok, other=-2)
        v_frame = HW
    else:
        v_frame = V * HW
    qy = offs_m
    qx = offs_m
    if WINDOWED:  # local frames: the key rows of the tile's window, keys masked by the distance
        qy = offs_m // W
        qx = offs_m - qy * W
        lo, hi = _window(m0, tl.minimum(m0 + BLOCK_M, HW), W, H, rr)
        for r in range(0, RL):
            f = b * RL + r
            m_i, l_i, acc, my_i, ly_i = _fwd_span(q, q_base, kl_ptr + f * C * HW, vl_ptr + f * v_frame, offs_m, m_ok,
                                                  qy, qx, ylab, lo, hi, m_i, l_i, acc, my_i, ly_i, C, V, W, HW, rad2,
                                                  qk2, ACC, PREC, LOSS, C_LOOP, True, True, BLOCK_M, BLOCK_N, BLOCK_C,
                                                  BLOCK_V)
    full = HW - HW % BLOCK_N
    for r in range(0, RG):  # global frames: whole tiles unmasked, then the partial one
        f = b * RG + r
        k_base = kg_ptr + f * C * HW
        v_base = vg_ptr + f * v_frame
        m_i, l_i, acc, my_i, ly_i = _fwd_span(q, q_base, k_base, v_base, offs_m, m_ok, qy, qx, ylab, 0, full,
                                              m_i, l_i, acc, my_i, ly_i, C, V, W, HW, rad2, qk2, ACC, PREC, LOSS,
                                              C_LOOP, False, False, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_V)
        m_i, l_i, acc, my_i, ly_i = _fwd_span(q, q_base, k_base, v_base, offs_m, m_ok, qy, qx, ylab, full, HW,
                                              m_i, l_i, acc, my_i, ly_i, C, V, W, HW, rad2, qk2, ACC, PREC, LOSS,
                                              C_LOOP, False, True, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_V)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # l_i = 0 only in padding rows
    tl.store(lse_ptr + b * HW + offs_m, (m_i + _log2(l_safe)) * LN2, mask=m_ok)
    if LOSS:
        tl.store(lsey_ptr + b * HW + offs_m, (my_i + _log2(ly_i)) * LN2, mask=m_ok)
    else:
        offs_v = tl.arange(0, BLOCK_V)
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
def _scores_and_tile(a, a_base, b_base, offs_a, a_ok, offs_b, b_ok, C, HW, c_lo, qk2, ACC: tl.constexpr,
                     PREC: tl.constexpr, C_LOOP: tl.constexpr, MASKED: tl.constexpr, BLOCK_A: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """The backward's step: logits <a_i, b_j> * qk2 (BLOCK_A, BLOCK_B) of the program's resident tile ``a``
    (or, with C_LOOP, over chunks of C) against pixels ``offs_b``, and their (BLOCK_B, BLOCK_C) tile for the
    gradient product: all of C from the same load when resident, else channels [c_lo, c_lo + BLOCK_C)."""
    if C_LOOP:
        s = _logits_loop(a_base, b_base, offs_a, a_ok, offs_b, b_ok, C, HW, ACC, PREC, MASKED, BLOCK_A, BLOCK_B,
                         BLOCK_C)
        t = _rows(b_base, offs_b, b_ok, C, HW, c_lo, BLOCK_C, MASKED)
    else:
        bt = _cols(b_base, offs_b, b_ok, C, HW, 0, BLOCK_C, MASKED)
        s = dot_acc(a, bt, ACC, PREC)
        t = tl.trans(bt)
    return s * qk2, t


@device_function
@triton.jit
def _dq_span(q, q_base, k_base, v_base, offs_m, m_ok, qy, qx, ylab, do, lse2, delta, lsey2, gy, lo, hi, dq,
             C, V, W, HW, rad2, qk2, c_lo,
             ACC: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr, C_LOOP: tl.constexpr, WINDOW: tl.constexpr,
             MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_V: tl.constexpr):
    """Add dS K (unscaled) of one frame's key tiles [lo, hi) to ``dq`` (channels [c_lo, c_lo + BLOCK_C))."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        s, k = _scores_and_tile(q, q_base, k_base, offs_m, m_ok, offs_n, n_ok, C, HW, c_lo, qk2, ACC, PREC, C_LOOP,
                                MASKED, BLOCK_M, BLOCK_N, BLOCK_C)
        s = _mask(s, offs_n, hi, qy, qx, W, rad2, WINDOW, MASKED)
        p = _exp2(s - lse2[:, None])
        if LOSS:
            klab = _labels(v_base, offs_n, n_ok, MASKED)
            py = tl.where(ylab[:, None] == klab[None, :], _exp2(s - lsey2[:, None]), 0.0)
            ds = delta[:, None] * p + gy[:, None] * py
        else:
            vt = _cols(v_base, offs_n, n_ok, V, HW, 0, BLOCK_V, MASKED)
            ds = p * (dot_acc(do, vt, ACC, PREC) - delta[:, None])
        dq += dot_acc(ds.to(k.dtype), k, ACC, PREC)
    return dq


@triton.jit(do_not_specialize=RADIUS_ARGS)
def _propagate_bwd_dq_kernel(q_ptr, kl_ptr, vl_ptr, kg_ptr, vg_ptr, y_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr,
                             lsey_ptr, gy_ptr, dq_ptr, C, V, H, W, RL, RG, rr, rad2,
                             ACC: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr, WINDOWED: tl.constexpr,
                             C_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    """dQ for BLOCK_M queries and channels [pid_c * BLOCK_C, +BLOCK_C). In propagation mode ``delta``
    holds delta_i; in LOSS mode it holds the gradient of lse (and ``gy`` that of lse_y)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c_lo = tl.program_id(2) * BLOCK_C
    HW = H * W
    scale = tl.load(scale_ptr)
    qk2 = scale * LOG2E
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < HW
    offs_v = tl.arange(0, BLOCK_V)
    q_base = q_ptr + b * C * HW
    q = tl.zeros((BLOCK_M, BLOCK_C), dtype=q_ptr.dtype.element_ty)
    if not C_LOOP:
        q = _rows(q_base, offs_m, m_ok, C, HW, 0, BLOCK_C, True)
    lse2 = tl.load(lse_ptr + b * HW + offs_m, mask=m_ok, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
    ylab = tl.zeros((BLOCK_M,), tl.int64)
    lsey2 = tl.zeros((BLOCK_M,), ACC)
    gy = tl.zeros((BLOCK_M,), ACC)
    do = tl.zeros((BLOCK_M, BLOCK_V), q_ptr.dtype.element_ty)
    if LOSS:
        ylab = tl.load(y_ptr + b * HW + offs_m, mask=m_ok, other=-2)
        lsey2 = tl.load(lsey_ptr + b * HW + offs_m, mask=m_ok, other=0.0) * LOG2E
        lsey2 = tl.where(lsey2 == float("-inf"), 0.0, lsey2)  # no key of the class: every p_y term is 0
        gy = tl.load(gy_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
        v_frame = HW
    else:
        do = tl.load(do_ptr + b * V * HW + offs_v[None, :] * HW + offs_m[:, None],
                     mask=m_ok[:, None] & (offs_v < V)[None, :], other=0.0)
        v_frame = V * HW
    dq = tl.zeros((BLOCK_M, BLOCK_C), ACC)
    qy = offs_m
    qx = offs_m
    if WINDOWED:
        qy = offs_m // W
        qx = offs_m - qy * W
        lo, hi = _window(m0, tl.minimum(m0 + BLOCK_M, HW), W, H, rr)
        for r in range(0, RL):
            f = b * RL + r
            dq = _dq_span(q, q_base, kl_ptr + f * C * HW, vl_ptr + f * v_frame, offs_m, m_ok, qy, qx, ylab, do, lse2,
                          delta, lsey2, gy, lo, hi, dq, C, V, W, HW, rad2, qk2, c_lo, ACC, PREC, LOSS, C_LOOP, True,
                          True, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_V)
    full = HW - HW % BLOCK_N
    for r in range(0, RG):
        f = b * RG + r
        k_base = kg_ptr + f * C * HW
        v_base = vg_ptr + f * v_frame
        dq = _dq_span(q, q_base, k_base, v_base, offs_m, m_ok, qy, qx, ylab, do, lse2, delta, lsey2, gy, 0, full, dq,
                      C, V, W, HW, rad2, qk2, c_lo, ACC, PREC, LOSS, C_LOOP, False, False, BLOCK_M, BLOCK_N, BLOCK_C,
                      BLOCK_V)
        dq = _dq_span(q, q_base, k_base, v_base, offs_m, m_ok, qy, qx, ylab, do, lse2, delta, lsey2, gy, full, HW, dq,
                      C, V, W, HW, rad2, qk2, c_lo, ACC, PREC, LOSS, C_LOOP, False, True, BLOCK_M, BLOCK_N, BLOCK_C,
                      BLOCK_V)
    offs_c = c_lo + tl.arange(0, BLOCK_C)
    tl.store(dq_ptr + b * C * HW + offs_c[None, :] * HW + offs_m[:, None], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_c < C)[None, :])


@device_function
@triton.jit
def _dkdv_span(k, v, klab, k_base, q_base, b, offs_n, n_ok, ky, kx, lo, hi, dk, dv, do_ptr, lse_ptr, delta_ptr,
               y_ptr, lsey_ptr, gy_ptr, C, V, W, HW, rad2, qk2, c_lo,
               ACC: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr, C_LOOP: tl.constexpr, WINDOW: tl.constexpr,
               MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """Add dS^T Q (unscaled) and P^T dO of the query tiles [lo, hi) to the key tile's ``dk`` and ``dv``; the
    logits transposed (keys, queries): the window relation is symmetric."""
    offs_v = tl.arange(0, BLOCK_V)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < hi
        st, q = _scores_and_tile(k, k_base, q_base, offs_n, n_ok, offs_m, m_ok, C, HW, c_lo, qk2, ACC, PREC, C_LOOP,
                                 MASKED, BLOCK_N, BLOCK_M, BLOCK_C)
        st = _mask(st, offs_m, hi, ky, kx, W, rad2, WINDOW, MASKED)
        if MASKED:
            lse2 = tl.load(lse_ptr + b * HW + offs_m, mask=m_ok, other=0.0) * LOG2E
            delta = tl.load(delta_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
        else:
            lse2 = tl.load(lse_ptr + b * HW + offs_m) * LOG2E
            delta = tl.load(delta_ptr + b * HW + offs_m)
        pt = _exp2(st - lse2[None, :])
        if LOSS:
            ylab = tl.load(y_ptr + b * HW + offs_m, mask=m_ok, other=-2)
            lsey2 = tl.load(lsey_ptr + b * HW + offs_m, mask=m_ok, other=0.0) * LOG2E
            lsey2 = tl.where(lsey2 == float("-inf"), 0.0, lsey2)
            gy = tl.load(gy_ptr + b * HW + offs_m, mask=m_ok, other=0.0)
            pyt = tl.where(klab[:, None] == ylab[None, :], _exp2(st - lsey2[None, :]), 0.0)
            dst = delta[None, :] * pt + gy[None, :] * pyt
        else:
            do = _rows(do_ptr + b * V * HW, offs_m, m_ok, V, HW, 0, BLOCK_V, MASKED)
            dv += dot_acc(pt.to(do.dtype), do, ACC, PREC)
            dst = pt * (dot_acc(v, tl.trans(do), ACC, PREC) - delta[None, :])
        dk += dot_acc(dst.to(q.dtype), q, ACC, PREC)
    return dk, dv


@triton.jit(do_not_specialize=RADIUS_ARGS)
def _propagate_bwd_dkdv_kernel(q_ptr, kl_ptr, vl_ptr, kg_ptr, vg_ptr, y_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr,
                               lsey_ptr, gy_ptr, dkl_ptr, dvl_ptr, dkg_ptr, dvg_ptr, C, V, H, W, RL, RG, rr, rad2,
                               ACC: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr, WINDOWED: tl.constexpr,
                               C_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    """dK (channels [pid_c * BLOCK_C, +BLOCK_C)) and dV (program column 0) for BLOCK_N keys of one
    frame; in a local frame only the queries whose window can hold these keys are visited."""
    pid_n = tl.program_id(0)
    pid_f = tl.program_id(1)
    c_lo = tl.program_id(2) * BLOCK_C
    R = RL + RG
    b = (pid_f // R).to(tl.int64)
    r = pid_f % R
    local = r < RL
    HW = H * W
    scale = tl.load(scale_ptr)
    qk2 = scale * LOG2E
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < HW
    offs_v = tl.arange(0, BLOCK_V)
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
    k = tl.zeros((BLOCK_N, BLOCK_C), dtype=q_ptr.dtype.element_ty)
    if not C_LOOP:
        k = _rows(k_base, offs_n, n_ok, C, HW, 0, BLOCK_C, True)
    klab = tl.zeros((BLOCK_N,), tl.int64)
    v = tl.zeros((BLOCK_N, BLOCK_V), q_ptr.dtype.element_ty)
    if LOSS:
        klab = tl.load(v_base + offs_n, mask=n_ok, other=-1)
    else:
        v = _rows(v_base, offs_n, n_ok, V, HW, 0, BLOCK_V, True)
    dk = tl.zeros((BLOCK_N, BLOCK_C), ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    d_hi = HW
    ky = offs_n
    kx = offs_n
    if WINDOWED:  # a local frame: its window's queries; a global one: the dense spans below
        ky = offs_n // W
        kx = offs_n - ky * W
        lo, hi = _window(n0, tl.minimum(n0 + BLOCK_N, HW), W, H, rr)
        hi = tl.where(local, hi, lo)
        d_hi = tl.where(local, 0, HW)
        dk, dv = _dkdv_span(k, v, klab, k_base, q_base, b, offs_n, n_ok, ky, kx, lo, hi, dk, dv, do_ptr, lse_ptr,
                            delta_ptr, y_ptr, lsey_ptr, gy_ptr, C, V, W, HW, rad2, qk2, c_lo, ACC, PREC, LOSS, C_LOOP,
                            True, True, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_V)
    full = d_hi - d_hi % BLOCK_M
    dk, dv = _dkdv_span(k, v, klab, k_base, q_base, b, offs_n, n_ok, ky, kx, 0, full, dk, dv, do_ptr, lse_ptr,
                        delta_ptr, y_ptr, lsey_ptr, gy_ptr, C, V, W, HW, rad2, qk2, c_lo, ACC, PREC, LOSS, C_LOOP,
                        False, False, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_V)
    dk, dv = _dkdv_span(k, v, klab, k_base, q_base, b, offs_n, n_ok, ky, kx, full, d_hi, dk, dv, do_ptr, lse_ptr,
                        delta_ptr, y_ptr, lsey_ptr, gy_ptr, C, V, W, HW, rad2, qk2, c_lo, ACC, PREC, LOSS, C_LOOP,
                        False, True, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_V)
    offs_c = c_lo + tl.arange(0, BLOCK_C)
    dk_mask = n_ok[:, None] & (offs_c < C)[None, :]
    v_lim = tl.where(c_lo == 0, V, 0)  # dV is written by the first channel chunk's programs only
    dv_mask = n_ok[:, None] & (offs_v < v_lim)[None, :]
    dk = dk * scale
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

NONE = tl.constexpr(-9223372036854775807 - 1)  # int64 min: an excluded key (never inserted)
FILL = tl.constexpr(-9223372036854775807)  # FILL + slot: an empty slot (any key beats it)
SHUT = tl.constexpr(9223372036854775807)  # a slot past k (never the list's worst)


@device_function
@triton.jit
def _pack(s, j):
    """(logit, key id) as one int64 whose order is the tie rule's: by logit, equal logits the smaller id
    first. High word: the fp32 bits made monotone (negatives' magnitude bits flipped); low: 2^32 - 1 - id."""
    bits = s.to(tl.int32, bitcast=True)
    mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (mono.to(tl.int64) << 32) | (j.to(tl.int64) ^ 0xFFFFFFFF)


@device_function
@triton.jit
def _insert(top, s, ok, j):
    """Merge one key tile (logits ``s``, ids ``j``, ``ok`` where a key takes part) into the per-query lists
    ``top`` (BLOCK_M, KP), unsorted: while some query's best remaining key beats its list's worst, it
    replaces that one. A tile none of whose keys beats its query's k-th costs one max and one min."""
    cand = tl.where(ok, _pack(s, j), NONE)
    best = tl.max(cand, 1)
    worst = tl.min(top, 1)
    go = tl.max((best > worst).to(tl.int32), 0)
    while go > 0:
        ins = best > worst
        top = tl.where(ins[:, None] & (top == worst[:, None]), best[:, None], top)
        cand = tl.where(ins[:, None] & (cand == best[:, None]), NONE, cand)
        best = tl.max(cand, 1)
        worst = tl.min(top, 1)
        go = tl.max((best > worst).to(tl.int32), 0)
    return top


@device_function
@triton.jit
def _topk_logits(q_base, k_base, offs_m, m_ok, offs_n, n_ok, C, HW, scale, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    return _logits_loop(q_base, k_base, offs_m, m_ok, offs_n, n_ok, C, HW, tl.float32, PREC, True, BLOCK_M, BLOCK_N,
                        BLOCK_C) * scale


@triton.jit(do_not_specialize=RADIUS_ARGS)
def _propagate_topk_kernel(q_ptr, kl_ptr, vl_ptr, kg_ptr, vg_ptr, scale_ptr, out_ptr, C, V, H, W, RL, RG, rr, rad2,
                           K, PREC: tl.constexpr, TILE_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_C: tl.constexpr, KP: tl.constexpr):
    """Streaming top-k (k <= KP) per query of a TILE_H x TILE_W block (TILE_H = BLOCK_M / TILE_W), then
    the softmax over those k and the weighted sum of their values."""
    TILE_H: tl.constexpr = BLOCK_M // TILE_W
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    scale = tl.load(scale_ptr)
    tiles_w = tl.cdiv(W, TILE_W)
    y0 = (pid // tiles_w) * TILE_H
    x0 = (pid % tiles_w) * TILE_W
    i = tl.arange(0, BLOCK_M)
    qy = y0 + i // TILE_W
    qx = x0 + i % TILE_W
    m_ok = (qy < H) & (qx < W)
    offs_m = qy * W + qx
    q_base = q_ptr + b * C * HW
    slot = tl.arange(0, KP).to(tl.int64)
    top = tl.zeros((BLOCK_M, KP), tl.int64) + tl.where(slot < K, FILL + slot, SHUT)[None, :]
    # local frames: the box of key rows and columns within rr of the block, one box row segment a tile
    by0 = tl.maximum(y0 - rr, 0)
    bx0 = tl.maximum(x0 - rr, 0)
    bx1 = tl.minimum(x0 + TILE_W + rr, W)
    segs = tl.cdiv(bx1 - bx0, BLOCK_N)
    tiles = (tl.minimum(y0 + TILE_H + rr, H) - by0) * segs
    for r in range(0, RL):
        k_base = kl_ptr + (b * RL + r) * C * HW
        for t in range(0, tiles):
            ky = by0 + t // segs
            kx = bx0 + (t % segs) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = kx < bx1
            offs_n = ky * W + kx
            s = _topk_logits(q_base, k_base, offs_m, m_ok, offs_n, n_ok, C, HW, scale, PREC, BLOCK_M, BLOCK_N,
                             BLOCK_C)
            near = _in_disk((qy - ky)[:, None], qx[:, None] - kx[None, :], rad2) & n_ok[None, :]
            top = _insert(top, s, near, r * HW + offs_n[None, :])
    for r in range(0, RG):
        k_base = kg_ptr + (b * RG + r) * C * HW
        for n0 in range(0, HW, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < HW
            s = _topk_logits(q_base, k_base, offs_m, m_ok, offs_n, n_ok, C, HW, scale, PREC, BLOCK_M, BLOCK_N,
                             BLOCK_C)
            top = _insert(top, s, n_ok[None, :], (RL + r) * HW + offs_n[None, :])
    # the k kept: softmax over their logits, weighted sum of their values (empty slots weigh 0)
    kept = (top > FILL + KP) & (slot < K)[None, :]
    mono = (top >> 32).to(tl.int32)
    val = tl.where(kept, tl.where(mono >= 0, mono, mono ^ 0x7FFFFFFF).to(tl.float32, bitcast=True), float("-inf"))
    idx = ((top & 0xFFFFFFFF) ^ 0xFFFFFFFF).to(tl.int32)
    w = tl.exp(val - tl.max(val, 1)[:, None])
    w = w / tl.sum(w, 1)[:, None]
    fr = tl.where(kept, idx // HW, 0)
    n = tl.where(kept, idx - fr * HW, 0)
    off_l = ((b * RL + fr) * V) * HW + n
    off_g = ((b * RG + (fr - RL)) * V) * HW + n
    for c in range(0, V):
        x = tl.load(vl_ptr + off_l + c * HW, mask=kept & (fr < RL), other=0.0).to(tl.float32)
        x += tl.load(vg_ptr + off_g + c * HW, mask=kept & (fr >= RL), other=0.0).to(tl.float32)
        tl.store(out_ptr + b * V * HW + c * HW + offs_m, tl.sum(w * x, 1).to(out_ptr.dtype.element_ty), mask=m_ok)


# ----------------------------------------------------------------------------------------------------
# registry: one variant per (dtype, mode, WINDOWED, C_LOOP) the launchers use, with that dtype's tiles
# ----------------------------------------------------------------------------------------------------

_INTS = ["C", "V", "H", "W", "RL", "RG", "rr"]
# Integer arguments as launches at the GPU's shapes pass them (GUIDE §6), which Triton specializes: the
# training shape (B=32, R=3, 32x32 maps, C=64, V=16) has C, V, H, W multiples of 16 ("aligned"); the CRW
# step (60x107 map, C=256, V=8 label channels, 20 context frames, radius 12, top-k 10) has only C
# ("unaligned", odd maps: its loads cannot be vectorized along the raster). RL, RG, rr and K are counts,
# declared plain; in LOSS mode V is 1 (unused), plain too.
_ALIGNED = {"C": "i32:16", "V": "i32:16", "H": "i32:16", "W": "i32:16"}
_UNALIGNED = {"C": "i32:16"}
_DTYPES = {"half": (torch.float16, torch.bfloat16), "fp32": (torch.float32,), "fp64": (torch.float64,)}


def _int_signature(shape: dict, names=_INTS) -> dict:
    return {a: shape.get(a, "i32") for a in names}


def _variants(kind, fam, float_ptrs, acc_ptrs, value_ptrs, label_ptrs, unaligned=False):
    """The launches of dtype family ``fam``: per dtype and mode (propagation, LOSS) the resident dense and
    windowed kernels and the chunked one (``plan``: compiled windowed only; float64 has only that one); with
    ``unaligned`` also the CRW step's odd map (C = 256: chunked) for the value-propagating forward. The
    chunked kernels (C > 64: no GUIDE §6 shape) are compiled in bf16, not fp16 too: the two compile to the
    same registers in every variant measured (sm_90/sm_80, triton 3.8, 2026-12-07), and each variant costs
    the compile test 2-5 s per chip. For the same reason fp16 is compiled for sm_90 only (on sm_80, mma.sync,
    fp16 and bf16 gave the same registers in all 15 fp16 variants under triton 3.6, 3.8 and 3.9), and there
    the backward's windowed resident kernels in bf16 only (dQ, dK/dV: the same registers and wgmma in both,
    3.8); the forward's differ (fp16 windowed 117 registers, bf16 102 with the int32 radius test: both kept)."""
    bm, bn, _ = _TILES[fam][kind]
    kinds = [(True, True)] if fam == "fp64" else [(False, False), (True, False), (True, True)]
    out = []
    for dtype in _DTYPES[fam]:
        ty = TL_DTYPE[dtype]
        acc_ty = "fp64" if fam == "fp64" else "fp32"
        launches = [(loss, shape, windowed, c_loop) for loss, shape in [(False, _ALIGNED), (True, {**_ALIGNED, "V": "i32"})]
                    for windowed, c_loop in kinds]
        if unaligned and fam != "fp64":
            launches.append((False, _UNALIGNED, True, True))
        for loss, shape, windowed, c_loop in launches:
            if dtype == torch.float16 and (c_loop or (windowed and kind != "fwd")):
                continue
            sig = {**{a: f"*{ty}" for a in float_ptrs}, **{a: f"*{acc_ty}" for a in acc_ptrs},
                   **{a: ("*i64" if loss else f"*{ty}") for a in value_ptrs},
                   **{a: ("*i64" if loss else f"*{acc_ty}") for a in label_ptrs},  # unused: LSE passed
                   **_int_signature(shape), "rad2": "i32"}
            out += [variant(sig, archs=(90,) if dtype == torch.float16 else (), ACC=acc_type(dtype), PREC=prec, LOSS=loss, WINDOWED=windowed, C_LOOP=c_loop,
                            BLOCK_V=MAX_BLOCK_V, BLOCK_M=bm, BLOCK_N=bn,
                            BLOCK_C=_loop_c(fam, kind) if c_loop else _BLOCK_C[fam])
                    for prec in dot_precisions(dtype, **FP32_DOT)]
    return out


_PTRS = {
    "fwd": (["q_ptr", "kl_ptr", "kg_ptr", "out_ptr"], ["scale_ptr", "lse_ptr", "lsey_ptr"], ["vl_ptr", "vg_ptr"],
            ["y_ptr"]),
    "dq": (["q_ptr", "kl_ptr", "kg_ptr", "do_ptr", "dq_ptr"], ["scale_ptr", "lse_ptr", "delta_ptr", "lsey_ptr",
                                                               "gy_ptr"], ["vl_ptr", "vg_ptr"], ["y_ptr"]),
    "dkdv": (["q_ptr", "kl_ptr", "kg_ptr", "do_ptr", "dkl_ptr", "dvl_ptr", "dkg_ptr", "dvg_ptr"],
             ["scale_ptr", "lse_ptr", "delta_ptr", "lsey_ptr", "gy_ptr"], ["vl_ptr", "vg_ptr"], ["y_ptr"]),
}
_KERNELS = {"fwd": _propagate_fwd_kernel, "dq": _propagate_bwd_dq_kernel, "dkdv": _propagate_bwd_dkdv_kernel}
for _kind, _kernel in _KERNELS.items():
    for _fam, _kinds in _TILES.items():
        _launches = _kinds[_kind][2]
        register(_kernel, uses_dot=True, variants=_variants(_kind, _fam, *_PTRS[_kind], unaligned=_kind == "fwd"),
                 configs=[c for arch, (w, st, *mx) in _launches.items()
                          for c in for_archs([triton.Config({}, num_warps=w, num_stages=st, maxnreg=(mx or [None])[0])],
                                             [arch])])


TOPK_MAX = 32
# (BLOCK_M = TILE_H x TILE_W queries, TILE_W, BLOCK_N, BLOCK_C, num_warps): 16-bit 8 x 8 blocks (64 rows:
# wgmma's M), C in chunks of 64; fp32 (tf32x3: split operands) 4 x 8, C in chunks of 16. Key tiles of 32
# pixels: the CRW box row (8 + 2 * 12 = 32) in one tile.
TOPK_TILES = {torch.float16: (64, 8, 32, 32, 8), torch.bfloat16: (64, 8, 32, 32, 8),
              torch.float32: (32, 8, 32, 16, 8)}
TOPK_STAGES = 2
# The register limit per chip family (see _TILES: on sm_80 ptxas otherwise caps the 8-warp kernel at 128).
TOPK_MAXNREG = {90: None, 80: 255}


def topk_slots(k: int) -> int:
    """The list length KP of a top-``k`` launch: the next power of two >= k, at least 16 (two compiled
    lengths, 16 and 32; with the unsorted list a longer one costs only its min per insertion)."""
    return max(16, triton.next_power_of_2(k))


# The top-k kernel is inference: the CRW step's odd map (its main use: both list lengths) and maps that are
# multiples of 16 (k <= 16).
for _dt, (_bm, _tw, _bn, _bc, _warps) in TOPK_TILES.items():
    register(_propagate_topk_kernel, uses_dot=True,
             configs=[c for arch, mx in TOPK_MAXNREG.items()
                      for c in for_archs([triton.Config({}, num_warps=_warps, num_stages=TOPK_STAGES, maxnreg=mx)],
                                         [arch])],
             variants=[variant({**{a: f"*{TL_DTYPE[_dt]}" for a in ("q_ptr", "kl_ptr", "vl_ptr", "kg_ptr", "vg_ptr",
                                                                    "out_ptr")},
                                "scale_ptr": "*fp32", **_int_signature(shape), "rad2": "i32", "K": "i32"},
                               archs=(90,) if _dt == torch.float16 else (),  # sm_80: as bf16 (see _variants)
                               PREC=prec, TILE_W=_tw, BLOCK_M=_bm, BLOCK_N=_bn, BLOCK_C=_bc, KP=kp)
                       for shape, kps in ((_UNALIGNED, (16, 32)), (_ALIGNED, (16,))) for kp in kps
                       for prec in dot_precisions(_dt, **FP32_DOT)])

# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------

def _geometry(q, kl, kg, radius):
    """The launch arguments every kernel takes (B and the math dtype aside): sizes, frame counts and the
    radius. ``kl``/``kg``: (B, RL|RG, C, H, W)."""
    B, C, H, W = q.shape
    if max(C, MAX_BLOCK_V) * H * W >= 2**31:  # offsets within one frame are int32 (across frames int64)
        raise ValueError(f"one frame of C * H * W = {C} * {H} * {W} elements is over the kernels' 2**31 limit")
    rr, rad2 = disk(radius, H, W) if radius is not None else (0, 0)  # capped where the disk covers the map
    if radius is not None and rad2 == max(H - 1, 0) ** 2 + max(W - 1, 0) ** 2:
        rad2 = I32_MAX  # every key in reach, whatever the clamped distances
    elif rad2 >= D_MAX.value ** 2 and kl.shape[1]:
        raise ValueError(f"radius {radius} on a {H} x {W} map: the kernels take a radius under {D_MAX.value} "
                         f"pixels or one that covers the map (squared distances are int32)")
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


def _arch(x: torch.Tensor) -> int:
    """The chip family of ``x``'s device (90 off CUDA: the interpreter)."""
    return arch_family(device_arch(x)) if x.is_cuda else 90


def _backward_plan(q, geo):
    """Constexprs and grids of the dQ and dK/dV kernels: one program column per chunk of C when chunked."""
    B, HW = q.shape[0], geo["H"] * geo["W"]
    bq, bk = (plan(kind, q.dtype, geo["C"], geo["RL"], _arch(q)) for kind in ("dq", "dkdv"))
    n_c = triton.cdiv(geo["C"], bq["BLOCK_C"]) if bq["C_LOOP"] else 1
    grid_q = (triton.cdiv(HW, bq["BLOCK_M"]), B, n_c)
    grid_k = (triton.cdiv(HW, bk["BLOCK_N"]), B * (geo["RL"] + geo["RG"]), n_c)
    return bq, bk, grid_q, grid_k


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
    blocks = plan("fwd", q.dtype, geo["C"], geo["RL"], _arch(q))
    grid = (triton.cdiv(H * W, blocks["BLOCK_M"]), B)
    for v0, v1 in _v_chunks(V):
        one = v1 - v0 == V
        vl_c = vl if one else vl[:, :, v0:v1].contiguous()
        vg_c = vg if one else vg[:, :, v0:v1].contiguous()
        vl_, vg_ = _dummy(vl_c, vg_c)
        out_c = out if one else torch.empty((B, v1 - v0, H, W), dtype=q.dtype, device=q.device)
        launch(_propagate_fwd_kernel, grid, q_ptr=q, kl_ptr=kl_, vl_ptr=vl_, kg_ptr=kg_, vg_ptr=vg_, y_ptr=lse,
               scale_ptr=scale, out_ptr=out_c, lse_ptr=lse, lsey_ptr=lse, V=v1 - v0, **geo, **_math(q.dtype),
               LOSS=False, BLOCK_V=block_v(v1 - v0), **blocks)
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
    bq, bk, grid_q, grid_k = _backward_plan(q, geo)
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
                      LOSS=False, BLOCK_V=block_v(v1 - v0))
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
    blocks = plan("fwd", q.dtype, geo["C"], geo["RL"], _arch(q))
    launch(_propagate_fwd_kernel, (triton.cdiv(H * W, blocks["BLOCK_M"]), B), q_ptr=q, kl_ptr=kl_, vl_ptr=ll_,
           kg_ptr=kg_, vg_ptr=lg_, y_ptr=y, scale_ptr=scale, out_ptr=q, lse_ptr=lse, lsey_ptr=lsey, V=1, **geo,
           **_math(q.dtype), LOSS=True, BLOCK_V=16, **blocks)
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
    bq, bk, grid_q, grid_k = _backward_plan(q, geo)
    # in LOSS mode delta_ptr holds the gradient of lse and gy_ptr that of lse_y; do_ptr is never read
    common = dict(q_ptr=q, kl_ptr=kl_, vl_ptr=ll_, kg_ptr=kg_, vg_ptr=lg_, y_ptr=y, scale_ptr=scale, do_ptr=q,
                  lse_ptr=lse, delta_ptr=g, lsey_ptr=lsey, gy_ptr=gy, V=1, **geo, **_math(q.dtype), LOSS=True,
                  BLOCK_V=16)
    launch(_propagate_bwd_dq_kernel, grid_q, dq_ptr=dq, **common, **bq)
    launch(_propagate_bwd_dkdv_kernel, grid_k, dkl_ptr=dkl_, dvl_ptr=dkl_, dkg_ptr=dkg_, dvg_ptr=dkg_, **common, **bk)
    return dq, dkl, dkg


def topk_supported(dtype: torch.dtype, topk: int) -> bool:
    """The top-k kernel's range: k <= 32 and fp32/fp16/bf16 (fp64 keeps exact fp64 logits: the PyTorch path)."""
    return topk <= TOPK_MAX and dtype in TOPK_TILES


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
    bm, tw, bn, bc, warps = TOPK_TILES[q.dtype]
    grid = (triton.cdiv(H, bm // tw) * triton.cdiv(W, tw), B)
    launch(_propagate_topk_kernel, grid, q_ptr=q, kl_ptr=kl_, vl_ptr=vl_, kg_ptr=kg_, vg_ptr=vg_, scale_ptr=scale,
           out_ptr=out, V=V, **geo, K=topk, PREC=_math(q.dtype)["PREC"], TILE_W=tw, BLOCK_M=bm, BLOCK_N=bn,
           BLOCK_C=bc, KP=topk_slots(topk), num_warps=warps, num_stages=TOPK_STAGES,
           **_maxnreg(TOPK_MAXNREG[_arch(q)]))
    return out
