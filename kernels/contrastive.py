"""Triton kernels of the contrastive slice: tiled online log-sum-exp over a similarity matrix that is never
stored (FlashAttention style), and its backward by recomputation.

One kernel family serves every loss (``fastssl/contrastive.py`` composes them):

- ``_lse_fwd_kernel``: ``lse_i = log sum_j exp(S_ij)`` with ``S_ij = scale * c_j * (q_i . k_j)``, a program
  per block of rows streaming key blocks, running max and sum in fp32 (fp64 for fp64 inputs); only the
  per-row LSE is written. ``c_j`` is an optional per-key multiplier (MoCo's queue normalised on the fly,
  without a copy). The column ``j == i + diag_off`` is excluded (NT-Xent's self-similarity); a
  ``diag_off`` >= M excludes nothing. A loss that needs the column LSE (CLIP) launches it again with the
  roles of ``q`` and ``k`` swapped.
- ``_lse_bwd_kernel``: row-parallel gradient ``dq_i = sum_j dS_ij scale c_j k_j`` with
  ``dS_ij = [row_term] g_i exp(S_ij - lse_i) + [col_term] h_j exp(S_ij - lse'_j)``; the gradient for ``k``
  is the same kernel with the roles swapped (column-parallel), and NT-Xent, whose S is symmetric, gets
  ``dZ`` from one launch with both terms and ``lse' = lse``, ``h = g``. With ``need_dscale`` each program
  writes ``sum_j dS_ij c_j (q_i . k_j) = q_i . (sum_j dS_ij c_j k_j)`` (from its gradient accumulator) for
  its rows to per-row partials, summed afterwards in a fixed order (deterministic, no atomics).
  A loss whose positives lie on a shifted diagonal (InfoNCE's i, CLIP's, NT-Xent's i + N mod 2N, and from the
  keys' side their inverses: ``_positive_cols``) hands their weights in too: dS_i,t_i gains w_i in fp32,
  before dS is rounded to bf16/fp16 (or tf32) for the tensor-core product. Near convergence g P_ii and the
  positive's -g nearly cancel; subtracted after the kernel, a bf16 P_ii of 0.999 was off by up to 1 - P_ii
  (gradients 14-31% off, 0.3-0.7% now). The exact kernels (fp32, fp64) never round dS: their launcher adds
  the positives to dq (the code in their loop cost them 16-32 B of spills). The positives' tiles join the
  masked band (``_band``, two ranges: the excluded diagonal and the positives), so the unmasked loop is
  unchanged; the span is computed from the launch's scalars, which keeps the tile walk in uniform
  registers (AOT: 388 SASS instructions a tile for bf16 128 x 64 x 64, from 384). Positives given by labels
  (InfoNCE's explicit targets: a row's label its target, a key's its index; SupCon's label-mates: class ids
  on both sides) may fall in any tile: their variant (``POSITIVES == POS_LABELS``) compares the row
  block's labels with each key tile's and adds w_i + w'_j where they match (555 instructions a tile there,
  compiled only for the losses that need it).
  The swapped launches recompute a score with its operands swapped (k_j . q_i for the forward's q_i . k_j);
  a tensor core rounds both alike (bf16/fp16/tf32 products exact in fp32, one order over D), so each
  exp2(s - max) is the forward's own even at T = 1e-6, where an ulp of a score is 6% of P (the test models
  this under the interpreter, whose numpy BLAS rounds a transposed tile differently).

Scores use ``tl.dot`` with the registry's one precision rule (``dot_precision``): bf16/fp16 on tensor cores
with fp32 accumulation, fp32 with TF32 only where ``torch.backends.cuda.matmul.allow_tf32`` allows it, fp64
in fp64. ``scale`` is read from a device pointer (no host sync for a learnable ``logit_scale``). Both
kernels work in base 2: ``log2(e) * scale`` is folded into one multiply of the scores, so each
exponential is one ``exp2`` (MUFU.EX2), and ``c_j`` is a compile-time option (``KSCALE``): the losses
without a per-key scale load none. On sm_90 (triton 3.8, ``python -m fastssl.kernels.aot --report``) this
took the bf16 forward's main loop (128 x 64 tile, D = 128) from 687 to 364 SASS instructions for its 8
wgmma, and from 80 to 63 registers.

Masks only where a tile needs them (the fused-attention tutorial's split of diagonal and off-diagonal
blocks): each program runs its whole key tiles that hold no excluded column in one unmasked loop (no
compares, selects nor predicated loads), then the few that meet the excluded diagonal or the end of the keys
(``_band``) in a masked copy of the loop.

Layout: the launchers hand the kernels features zero-padded to a constexpr row width (``_layout``; a copy
only when D is not already that width), chunk-major ``(C, N, BLOCK_D)`` when D is split, so every tile
address is one 64-bit base plus immediate offsets and rows are 16-byte aligned (vector loads without the
JIT's alignment specialization, which the ahead-of-time compile cannot see). The forward keeps the query
block resident (BLOCK_D 128 or 256, bf16/fp16; fp32 with TF32 up to 128) or loops over 64-wide chunks
(float64, float32 with exact products, D > 256). The backward keeps the query block resident on sm_90 in
bf16/fp16 with D <= 256 (one key tile load serves the score and the gradient products; at D = 256 the dq
accumulator spans two warpgroups, and MoCo's key scale, which spills there, stays at D <= 128); elsewhere
it accumulates one 128-wide feature chunk of dq per program (64 for the exact kernels) and recomputes the
scores over all chunks (one extra score pass a chunk).

Autotune configs are per chip family (``registry.for_archs``: wgmma's shared-memory operands let sm_90 take
larger tiles than sm_80's register-operand mma), filtered per dtype by ``keep`` where one dtype spills,
and bucketed by rows and keys up to ``TUNED_ROWS``. Every offered config is compiled by the AOT check.
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from .registry import (TL_DTYPE, acc_type, arch_family, autotune, bucket, device_arch, device_function, dot_acc,
                       dot_precision, for_archs, launch, register, variant)

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(LOG2E * x)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = LN2 * log2(x)
# where the LSE backward finds the positives it adds to dS (its POSITIVES): none (the exact kernels' launcher
# adds them after), on a shifted diagonal (the masked band's tiles), or by labels (compared in every tile)
POS_NONE, POS_DIAGONAL, POS_LABELS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

MAX_BLOCK_D = 256  # widest resident query block; wider D (and float64) loops over LOOP_BLOCK_D chunks
LOOP_BLOCK_D = 16 if interpreting() else 64
# the backward's feature chunk (a grid axis): one chunk for D <= 128; float64 and exact float32 in 64
BWD_BLOCK_D = {"exact": LOOP_BLOCK_D, "fast": 16 if interpreting() else 128}
# rows and keys past this share the autotuner's bucket of 2^16 (GUIDE §6's 2N = 65536): the configs tuned
# there serve the 1M-row NT-Xent without timing each config at its size
TUNED_ROWS = 1 << 16
# interpreter tiles (16 x 16: several tiles on the tests' odd shapes) in place of the autotuner's
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16} if interpreting() else None


def block_d(d: int, dtype: torch.dtype) -> tuple[int, bool]:
    """(BLOCK_D, D_LOOP) for a feature dimension ``d``: the resident query block is 128 or 256 wide on a
    GPU (the two compiled widths), a power of two >= 16 under the interpreter."""
    exact = dtype == torch.float64 or (dtype == torch.float32 and dot_precision(dtype) == "ieee")
    if d > MAX_BLOCK_D or exact or (dtype == torch.float32 and d > MAX_BLOCK_D // 2):
        return LOOP_BLOCK_D, True
    if interpreting():
        return max(16, triton.next_power_of_2(d)), False
    return (128 if d <= 128 else 256), False


@device_function
@triton.jit
def _tile_ptrs(base, idx_l, BLOCK_D: tl.constexpr):
    """Pointers to a (len(idx_l), BLOCK_D) tile of a chunk-major feature buffer: row stride BLOCK_D
    (a constexpr: the launchers pad D), so the addresses are one 64-bit base plus immediate offsets. The
    launchers pass 16-byte aligned buffers and BLOCK_D >= 16, so every row starts 16-byte aligned: the
    hints give vector loads (cp.async) even where the compiler cannot see the pointers' alignment."""
    ptrs = base + idx_l[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    return tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, 16])


@device_function
@triton.jit
def _rows(base, idx_l, mask, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """A (len(idx_l), BLOCK_D) tile of rows at ``base`` (``_tile_ptrs``); ``mask`` (rows in range) only in a
    ``MASKED`` tile: whole tiles load unpredicated."""
    if MASKED:
        return tl.load(_tile_ptrs(base, idx_l, BLOCK_D), mask=mask[:, None], other=0.0)
    else:
        return tl.load(_tile_ptrs(base, idx_l, BLOCK_D))


@device_function
@triton.jit
def _query_block(q_ptr, N, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr):
    """This program's block of rows (every kernel's head): (row0, local row indices, rows, rows < N, the
    resident query block: loaded where it is all of D, zeros where the kernels loop over feature chunks)."""
    row0 = tl.program_id(0) * BLOCK_M
    rows_l = tl.arange(0, BLOCK_M)
    rows = row0 + rows_l
    row_mask = rows < N
    q = tl.zeros((BLOCK_M, BLOCK_D), dtype=q_ptr.dtype.element_ty)
    if not D_LOOP:
        q = _rows(q_ptr + tl.cast(row0, tl.int64) * BLOCK_D, rows_l, row_mask, BLOCK_D, True)
    return row0, rows_l, rows, row_mask, q


@device_function
@triton.jit
def _scores(q, q_ptr, k_ptr, row0, col0, row_mask, col_mask, N, M, n_chunks,
            ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr, MASKED: tl.constexpr):
    """q_i . k_j for the tile of rows row0.. and keys col0..: from the resident query block ``q`` (one
    chunk), or summed over the ``n_chunks`` feature chunks (chunk c of row i at (c * N + i) * BLOCK_D)."""
    rows_l = tl.arange(0, BLOCK_M)
    cols_l = tl.arange(0, BLOCK_N)
    if D_LOOP:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for c in range(0, n_chunks):
            qc = _rows(q_ptr + (tl.cast(c, tl.int64) * N + row0) * BLOCK_D, rows_l, row_mask, BLOCK_D, True)
            kc = _rows(k_ptr + (tl.cast(c, tl.int64) * M + col0) * BLOCK_D, cols_l, col_mask, BLOCK_D, MASKED)
            acc += dot_acc(qc, tl.trans(kc), ACC, DOT_PREC)
        return acc
    else:
        kt = _rows(k_ptr + tl.cast(col0, tl.int64) * BLOCK_D, cols_l, col_mask, BLOCK_D, MASKED)
        return dot_acc(q, tl.trans(kt), ACC, DOT_PREC)


@device_function
@triton.jit
def _key_scale(ks_ptr, cols, col_mask, ACC: tl.constexpr, MASKED: tl.constexpr):
    """The per-key multipliers c_j of a key tile (KSCALE)."""
    if MASKED:
        return tl.load(ks_ptr + cols, mask=col_mask, other=1.0).to(ACC)
    else:
        return tl.load(ks_ptr + cols).to(ACC)


@device_function
@triton.jit
def _tiles_of(start, end, full, BLOCK_N: tl.constexpr):
    """The whole key tiles [lo, hi) that hold any of the columns [start, end), clipped to [0, full)."""
    lo = tl.minimum((tl.maximum(start, 0) // BLOCK_N) * BLOCK_N, full)
    hi = tl.maximum(tl.minimum(tl.cdiv(tl.maximum(end, 0), BLOCK_N) * BLOCK_N, full), lo)
    return lo, hi


@device_function
@triton.jit
def _band(row0, diag_off, plo, phi, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which key tiles need masks, for the rows row0 .. row0 + BLOCK_M: the whole tiles that meet their
    excluded columns row + diag_off or hold one of the columns [plo, phi) (the rows' positives, in the
    backward; plo >= phi: none), and the partial tile from ``full`` (the end of the whole tiles) that meets M.
    Every other tile is whole and holds neither: it runs without masks (the fused-attention tutorial's
    split of diagonal and off-diagonal blocks). Returns the two bands as ordered disjoint ranges of whole
    tiles, lo <= hi <= lo2 <= hi2 <= full (an empty one has zero width), and full."""
    full = (M // BLOCK_N) * BLOCK_N
    lo, hi = _tiles_of(row0 + diag_off, row0 + diag_off + BLOCK_M, full, BLOCK_N)
    lo2, hi2 = _tiles_of(plo, phi, full, BLOCK_N)
    lo2, hi2 = tl.where(hi2 > lo2, lo2, hi), tl.where(hi2 > lo2, hi2, hi)  # an empty band after the other
    lo, hi = tl.where(hi > lo, lo, lo2), tl.where(hi > lo, hi, lo2)
    first = lo <= lo2
    lo, hi, lo2, hi2 = (tl.where(first, lo, lo2), tl.where(first, hi, hi2), tl.where(first, lo2, lo),
                        tl.where(first, hi2, hi))
    touch = lo2 <= hi  # overlapping or adjacent: one band
    hi = tl.where(touch, tl.maximum(hi, hi2), hi)
    lo2, hi2 = tl.where(touch, hi, lo2), tl.where(touch, hi, hi2)
    return lo, hi, lo2, hi2, full


@device_function
@triton.jit
def _tile_start(t, lo, hi, lo2, hi2, full, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """The first key of the t-th tile of one kind: unmasked tiles are [0, lo), [hi, lo2) then [hi2, full);
    masked ones [lo, hi), [lo2, hi2) then the partial tile at ``full``."""
    if MASKED:
        col0 = lo + t * BLOCK_N
        col0 = col0 + (col0 >= hi).to(tl.int32) * (lo2 - hi)
        return col0 + (col0 >= hi2).to(tl.int32) * (full - hi2)
    else:
        col0 = t * BLOCK_N
        col0 = col0 + (col0 >= lo).to(tl.int32) * (hi - lo)
        return col0 + (col0 >= lo2).to(tl.int32) * (hi2 - lo2)


@device_function
@triton.jit
def _tile_counts(lo, hi, lo2, hi2, full, M, BLOCK_N: tl.constexpr):
    """(unmasked tiles, masked tiles) of a row block (``_band``)."""
    banded = (hi - lo) + (hi2 - lo2)
    return (full - banded) // BLOCK_N, banded // BLOCK_N + tl.cdiv(M - full, BLOCK_N)


@device_function
@triton.jit
def _fwd_tiles(m_i, l_i, q, q_ptr, k_ptr, ks_ptr, scale2, row0, row_mask, excluded, N, M, n_chunks, n_tiles,
               lo, hi, lo2, hi2, full, lq, lk_ptr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
               D_LOOP: tl.constexpr, KSCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, LABELS: tl.constexpr):
    """The online log-sum-exp (base 2) over ``n_tiles`` key tiles of one kind (``_tile_start``); with
    ``LABELS`` over the keys whose label (at ``lk_ptr``) differs from the row's (``lq``) only: the
    negatives of the supervised NT-Xent."""
    for t in range(0, n_tiles):
        col0 = _tile_start(t, lo, hi, lo2, hi2, full, BLOCK_N, MASKED)
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < M
        s = _scores(q, q_ptr, k_ptr, row0, col0, row_mask, col_mask, N, M, n_chunks, ACC, DOT_PREC,
                    BLOCK_M, BLOCK_N, BLOCK_D, D_LOOP, MASKED)
        if KSCALE:
            s = s * (scale2 * _key_scale(ks_ptr, cols, col_mask, ACC, MASKED))[None, :]
        else:
            s = s * scale2
        if LABELS:
            if MASKED:
                lk = tl.load(lk_ptr + cols, mask=col_mask, other=0)
            else:
                lk = tl.load(lk_ptr + cols)
            s = tl.where(lk[None, :] != lq[:, None], s, float("-inf"))
        if MASKED:
            s = tl.where(col_mask[None, :] & (cols[None, :] != excluded[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing valid yet
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    return m_i, l_i


@device_function
@triton.jit
def _row_lse2(q, q_ptr, k_ptr, ks_ptr, scale2, row0, row_mask, excluded, diag_off, N, M, n_chunks, lq, lk_ptr,
              ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr,
              KSCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LABELS: tl.constexpr):
    """The rows' log-sum-exp in base 2 over all keys but each row's excluded column (and, with ``LABELS``,
    the keys of its own label), as its two parts (max_j s2_ij, log2 sum_j exp2(s2_ij - max)): the whole key
    tiles unmasked, then the band and edge tiles (``_band``). Their fp32 sum loses the small part at extreme
    scales (T = 1e-6: |s2| ~ 1.4e6, ulp 0.125, so exp2(s2 - lse2) is off by up to 9%); a backward that
    subtracts the max first and then the log-sum recomputes each P_ij as the forward summed it."""
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    lo, hi, lo2, hi2, full = _band(row0, diag_off, 0, 0, M, BLOCK_M, BLOCK_N)
    n_plain, n_masked = _tile_counts(lo, hi, lo2, hi2, full, M, BLOCK_N)
    m_i, l_i = _fwd_tiles(m_i, l_i, q, q_ptr, k_ptr, ks_ptr, scale2, row0, row_mask, excluded, N, M, n_chunks,
                          n_plain, lo, hi, lo2, hi2, full, lq, lk_ptr, ACC, DOT_PREC, BLOCK_D, D_LOOP, KSCALE, BLOCK_M,
                          BLOCK_N, False, LABELS)
    m_i, l_i = _fwd_tiles(m_i, l_i, q, q_ptr, k_ptr, ks_ptr, scale2, row0, row_mask, excluded, N, M, n_chunks,
                          n_masked, lo, hi, lo2, hi2, full, lq, lk_ptr, ACC, DOT_PREC, BLOCK_D, D_LOOP, KSCALE, BLOCK_M,
                          BLOCK_N, True, LABELS)
    return m_i, tl.log2(l_i)


@triton.jit
def _lse_fwd_kernel(q_ptr, k_ptr, scale_ptr, ks_ptr, lse_ptr, split_ptr, N, M, n_chunks, diag_off, n_bucket, m_bucket,
                    ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr,
                    KSCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # In base 2: s2 = log2(e) * scale * kscale_j * q.k, so every exponential is one exp2 (MUFU.EX2 on the
    # GPU) with the scale folded into one multiply; lse = ln(2) * (m2 + log2(l)). Without KSCALE (every loss
    # but MoCo's in-kernel queue normalisation) no per-key scale is loaded. Whole key tiles off the excluded
    # diagonal run without masks; the few that meet it or the end of the keys run masked.
    row0, rows_l, rows, row_mask, q = _query_block(q_ptr, N, BLOCK_M, BLOCK_D, D_LOOP)
    excluded = rows + diag_off  # the column each row leaves out (>= M: none)
    scale2 = tl.load(scale_ptr).to(ACC) * LOG2E
    hi2, lo2 = _row_lse2(q, q_ptr, k_ptr, ks_ptr, scale2, row0, row_mask, excluded, diag_off, N, M, n_chunks,
                         rows, ks_ptr, ACC, DOT_PREC, BLOCK_D, D_LOOP, KSCALE, BLOCK_M, BLOCK_N, False)
    tl.store(lse_ptr + rows, (hi2 + lo2) * LN2, mask=row_mask)
    tl.store(split_ptr + 2 * rows, hi2, mask=row_mask)  # the backward's (max, log-sum) pairs, base 2
    tl.store(split_ptr + 2 * rows + 1, lo2, mask=row_mask)


@device_function
@triton.jit
def _bwd_tile(t, q, q_ptr, k_ptr, row0, row_mask, chunk, N, M, n_chunks, lo, hi, lo2, hi2, full, ACC: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """The t-th key tile of one kind in a backward (every backward kernel's loop head): (its columns, their
    mask, the key tile of this program's feature chunk, the scores q . k recomputed: from the resident query
    block, where the key tile loaded once serves both products, or summed over the feature chunks)."""
    cols_l = tl.arange(0, BLOCK_N)
    col0 = _tile_start(t, lo, hi, lo2, hi2, full, BLOCK_N, MASKED)
    cols = col0 + cols_l
    col_mask = cols < M
    kt = _rows(k_ptr + (chunk * M + col0) * BLOCK_D, cols_l, col_mask, BLOCK_D, MASKED)
    if D_LOOP:
        s = _scores(q, q_ptr, k_ptr, row0, col0, row_mask, col_mask, N, M, n_chunks, ACC, DOT_PREC,
                    BLOCK_M, BLOCK_N, BLOCK_D, True, MASKED)
    else:
        s = dot_acc(q, tl.trans(kt), ACC, DOT_PREC)
    return cols, col_mask, kt, s


@device_function
@triton.jit
def _positive_cols(rows, rbase, period, shift, cbase):
    """The positive's column of each row on a shifted diagonal: rbase <= r < rbase + period has
    cbase + (r - rbase + shift) mod period (0 <= shift < period), other rows -1 (none). Every loss's positives
    are one: InfoNCE's and CLIP's i (+ rank offset), NT-Xent's i + N mod 2N, and, seen from the keys, their
    inverses."""
    x = rows - rbase + shift
    x = tl.where(x >= period, x - period, x)
    return tl.where((rows >= rbase) & (rows < rbase + period), cbase + x, -1)


@device_function
@triton.jit
def _positive_span(row0, N, rbase, period, shift, cbase, M, BLOCK_M: tl.constexpr):
    """The columns [plo, phi) of the positives (``_positive_cols``) of the rows row0 .. row0 + BLOCK_M (all
    the period's where they wrap in the block); empty (M, 0) without positives (period 0). Scalars of the
    launch's arguments: the compiler keeps the tile walk in uniform registers (a span reduced from a
    loaded vector put it in every thread's: 75 more SASS instructions a tile)."""
    a = tl.maximum(row0, rbase)
    b = tl.minimum(tl.minimum(row0 + BLOCK_M, N), rbase + period)
    u = a - rbase + shift
    u = tl.where(u >= period, u - period, u)
    wrap = u + (b - a) > period
    some = (a < b) & (period > 0)
    return (tl.where(some, tl.where(wrap, cbase, cbase + u), M),
            tl.where(some, tl.where(wrap, cbase + period, cbase + u + (b - a)), 0))


@device_function
@triton.jit
def _bwd_tiles(acc, q, q_ptr, k_ptr, ks_ptr, max_c_ptr, g_c_ptr, gpos_ptr, lc_ptr, wc_ptr, scale2, max_r, g_r,
               lab_r, w_pos, row0, row_mask, excluded, chunk, N, M, n_chunks, n_tiles, lo, hi, lo2, hi2, full,
               row_term, col_term, pos_rbase, pos_period, pos_shift, pos_cbase, ACC: tl.constexpr,
               DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr, KSCALE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, POSITIVES: tl.constexpr):
    """acc += dS @ k over ``n_tiles`` key tiles of one kind: the scores recomputed (from the resident query
    block: the key tile loaded once serves both products), dS formed in registers as g P = (g / l)
    exp2(s2 - max), as the forward summed it (``_row_lse2``): the weights g come divided by l. With
    positives (``pos_period`` > 0, ``_positive_cols``) each row's weight (at ``gpos_ptr``) joins dS at its
    positive's column (in a masked tile: ``_band``) before dS is rounded to the features' dtype: near
    convergence g P_ii and the positive's -g nearly cancel, and rounded first P_ii = 0.999 moved by as
    much as 1 - P_ii in bf16. Labelled positives (``POSITIVES == POS_LABELS``: InfoNCE's explicit targets,
    SupCon's label-mates) may sit in any tile: there every tile compares the rows' labels ``lab_r`` with
    the keys' (at ``lc_ptr``) and a match gains w_pos_i + w_j (at ``wc_ptr``)."""
    for t in range(0, n_tiles):
        cols, col_mask, kt, s = _bwd_tile(t, q, q_ptr, k_ptr, row0, row_mask, chunk, N, M, n_chunks, lo, hi, lo2,
                                          hi2, full, ACC, DOT_PREC, BLOCK_D, D_LOOP, BLOCK_M, BLOCK_N, MASKED)
        if KSCALE:
            c = _key_scale(ks_ptr, cols, col_mask, ACC, MASKED)
            s = s * (scale2 * c)[None, :]
        else:
            s = s * scale2
        if MASKED:  # exp2(-inf - lse) = 0 off the set
            s = tl.where(row_mask[:, None] & col_mask[None, :] & (cols[None, :] != excluded[:, None]), s,
                         float("-inf"))
        if row_term != 0:
            ds = g_r[:, None] * tl.exp2(s - max_r[:, None])
        else:
            ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        if col_term != 0:
            if MASKED:
                max_c = tl.load(max_c_ptr + cols, mask=col_mask, other=0.0).to(ACC)
                g_c = tl.load(g_c_ptr + cols, mask=col_mask, other=0.0).to(ACC)
            else:
                max_c = tl.load(max_c_ptr + cols).to(ACC)
                g_c = tl.load(g_c_ptr + cols).to(ACC)
            ds += g_c[None, :] * tl.exp2(s - max_c[None, :])
        if POSITIVES == POS_LABELS:
            if MASKED:
                lc = tl.load(lc_ptr + cols, mask=col_mask, other=-1)
                wc = tl.load(wc_ptr + cols, mask=col_mask, other=0.0).to(ACC)
                mate = (lab_r[:, None] == lc[None, :]) & (cols[None, :] != excluded[:, None])
            else:  # whole tiles off the excluded diagonal
                lc = tl.load(lc_ptr + cols)
                wc = tl.load(wc_ptr + cols).to(ACC)
                mate = lab_r[:, None] == lc[None, :]
            ds += tl.where(mate, w_pos[:, None] + wc[None, :], 0.0)
        if MASKED and POSITIVES == POS_DIAGONAL:
            if pos_period > 0:
                rows = row0 + tl.arange(0, BLOCK_M)
                pos = _positive_cols(rows, pos_rbase, pos_period, pos_shift, pos_cbase)
                gpos = tl.load(gpos_ptr + rows, mask=row_mask, other=0.0).to(ACC)
                ds += tl.where(cols[None, :] == pos[:, None], gpos[:, None], 0.0)
        if KSCALE:
            ds = ds * c[None, :]
        acc += dot_acc(ds.to(kt.dtype), kt, ACC, DOT_PREC)
    return acc


@triton.jit
def _lse_bwd_kernel(q_ptr, k_ptr, scale_ptr, ks_ptr, max_r_ptr, g_r_ptr, max_c_ptr, g_c_ptr, gpos_ptr, lr_ptr,
                    lc_ptr, wc_ptr, dq_ptr, dscale_ptr, N, M, n_chunks, diag_off, pos_rbase, pos_period, pos_shift, pos_cbase, row_term,
                    col_term, need_dscale, n_bucket, m_bucket,
                    ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr,
                    KSCALE: tl.constexpr, POSITIVES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One (BLOCK_M, BLOCK_D) fp32 accumulator of dq per program: the feature chunk program_id(1) of the
    # gradient. Without D_LOOP the query block is all of D (one chunk), resident, and each key tile is
    # loaded once; with it the scores are summed over every chunk (q and k chunks streamed).
    row0, rows_l, rows, row_mask, q = _query_block(q_ptr, N, BLOCK_M, BLOCK_D, D_LOOP)
    excluded = rows + diag_off
    chunk = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr).to(ACC)
    scale2 = scale * LOG2E  # base 2, as the forward: g exp(s - lse) = (g / l) exp2(s2 - max)
    max_r = tl.zeros((BLOCK_M,), dtype=ACC)
    g_r = tl.zeros((BLOCK_M,), dtype=ACC)
    if row_term != 0:
        max_r = tl.load(max_r_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        g_r = tl.load(g_r_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    # POSITIVES (``_positive_modes``): the variants whose dS is rounded for the product take them here
    lab_r, w_pos = rows, g_r  # unused unless labelled
    if POSITIVES == POS_LABELS:  # masked-out rows match no key (-2 against -1)
        lab_r = tl.load(lr_ptr + rows, mask=row_mask, other=-2)
        w_pos = tl.load(gpos_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    plo, phi = _positive_span(row0, N, pos_rbase, pos_period, pos_shift, pos_cbase, M, BLOCK_M)
    lo, hi, lo2, hi2, full = _band(row0, diag_off, plo, phi, M, BLOCK_M, BLOCK_N)
    n_plain, n_masked = _tile_counts(lo, hi, lo2, hi2, full, M, BLOCK_N)
    acc = _bwd_tiles(acc, q, q_ptr, k_ptr, ks_ptr, max_c_ptr, g_c_ptr, gpos_ptr, lc_ptr, wc_ptr, scale2, max_r, g_r,
                     lab_r, w_pos, row0, row_mask, excluded, chunk, N, M, n_chunks, n_plain, lo, hi, lo2, hi2, full,
                     row_term, col_term, pos_rbase, pos_period, pos_shift, pos_cbase, ACC, DOT_PREC, BLOCK_D, D_LOOP,
                     KSCALE, BLOCK_M, BLOCK_N, False, POSITIVES)
    acc = _bwd_tiles(acc, q, q_ptr, k_ptr, ks_ptr, max_c_ptr, g_c_ptr, gpos_ptr, lc_ptr, wc_ptr, scale2, max_r, g_r,
                     lab_r, w_pos, row0, row_mask, excluded, chunk, N, M, n_chunks, n_masked, lo, hi, lo2, hi2, full,
                     row_term, col_term, pos_rbase, pos_period, pos_shift, pos_cbase, ACC, DOT_PREC, BLOCK_D, D_LOOP,
                     KSCALE, BLOCK_M, BLOCK_N, True, POSITIVES)
    tl.store(_tile_ptrs(dq_ptr + (chunk * N + row0) * BLOCK_D, rows_l, BLOCK_D),
             (acc * scale).to(dq_ptr.dtype.element_ty), mask=row_mask[:, None])
    if need_dscale != 0:
        # sum_j dS_ij c_j (q_i . k_j) = q_i . (sum_j dS_ij c_j k_j): per row and chunk, from the accumulator
        if D_LOOP:
            q = _rows(q_ptr + (chunk * N + row0) * BLOCK_D, rows_l, row_mask, BLOCK_D, True)
        tl.store(dscale_ptr + chunk * N + rows, tl.sum(q.to(ACC) * acc, 1), mask=row_mask)


# -- autotune configs and compile variants ----------------------------------------------------------------
# Per chip family (registry.for_archs): Hopper's wgmma reads its operands from shared memory, so sm_90 takes
# 64..128 x 64..128 tiles with a resident query block; sm_80's mma.sync holds them in registers, so it keeps
# the smaller tiles that do not spill there. Every config is compiled for its family by
# tests/test_compile_sm90.py (no spills, shared memory within the limit, wgmma in the sm_90 main loop; the
# table is benchmarks/results/aot-sm90-report.txt). The autotuner picks among a family's configs per bucket
# of (rows, keys, chunks).

def _configs(pairs, archs=(80, 90)):
    return for_archs([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                      for bm, bn, w, st in pairs], archs)


HOPPER, AMPERE = (90,), (80,)  # configs and variants for one chip family
FWD_CONFIGS = {128: _configs([(128, 64, 8, 3), (64, 64, 4, 3)])
               + _configs([(128, 128, 8, 2), (128, 64, 4, 4)], HOPPER),  # 128 x 128 x 3: tf32 over 227 KB
               256: _configs([(64, 64, 4, 2), (128, 64, 8, 2)]) + _configs([(128, 128, 8, 2)], HOPPER),
               "loop": _configs([(64, 64, 8, 2)]) + _configs([(128, 64, 8, 3)], HOPPER),
               # exact products (fp32 ieee, fp64) on FMA units: 64 x 32. 64 x 64 gives fp32 a stack frame
               # (STACK:32 at 80 registers) on sm_90 under triton 3.6 and 255 registers on sm_80 (3 stages:
               # STACK:40); 64 x 32 uses 72-156 registers, no stack on either chip under 3.6, 3.8, 3.9 (2026-12-02).
               "exact": _configs([(64, 32, 8, 2)])}
# The backward: one (BLOCK_M, BLOCK_D) fp32 accumulator of dq per program beside the scores tile. Two stages
# stream the key tiles in (cp.async) while the previous tile's MMAs run. Resident query block (bf16/fp16,
# D <= 128, sm_90 only): each key tile is loaded once for both products; 64 x 64 x 4 warps and 128 x 64 x 8
# use 224-244 registers, no spills. With D = 256 (bf16/fp16, sm_90) the (64, 256) fp32 accumulator is split
# over two warpgroups: 64 x 64 x 8 warps (254 registers, 20 wgmma a tile) and 64 x 32 x 8 (206); 128 rows or
# 4 warps spill (56-136 B), and so does MoCo's key scale at 64 x 64 (32 B): MoCo at D > 128 takes the
# chunked kernel (the 256 variants are compiled without KSCALE), and so do the labelled positives (SupCon,
# InfoNCE's explicit targets: 8 B of stack there under triton 3.6, 255 registers under 3.8). The resident
# block spills elsewhere too (--report, triton 3.8, 2026-12-03): in tf32 on sm_90 (80-160 B) and with MoCo's
# key scale on sm_80 (48-72 B): those take the chunked kernel. Chunked, 64 x 32 x 8 warps x 2 stages is clean
# under triton 3.6-3.9 on both chips except tf32 on sm_80 under 3.6 (STACK:8): there tf32 takes 32 x 32 (128-175
# registers; ``_keep_backward``). The exact (FMA-unit) backward stays at one stage: with two, fp32 spills
# on sm_90 under triton 3.9 (32 x 32 x 8: STACK:16; 16 x 32 x 4: 8).
BWD_CONFIGS = {128: _configs([(64, 64, 4, 2), (128, 64, 8, 2)], HOPPER),
               256: _configs([(64, 64, 8, 2), (64, 32, 8, 2)], HOPPER),
               "loop": _configs([(64, 32, 8, 2)]) + _configs([(32, 32, 8, 2)], AMPERE)
               + _configs([(64, 64, 4, 2)], HOPPER),
               "exact": _configs([(32, 32, 8, 1)])}


def _keep_backward(config, dtype, arch) -> bool:
    """The chunked backward's autotune filter: tf32 on sm_80 only in 32-row tiles (64 spill there)."""
    return not (dtype == torch.float32 and arch_family(arch) == 80 and config.kwargs["BLOCK_M"] > 32)


KEY = ["n_bucket", "m_bucket", "n_chunks"]

# Integer arguments as a launch at the GPU's shapes (GUIDE §6: 2N = 65536, D = 256) passes them: the row
# counts, their buckets and diag_off (0 for NT-Xent, M for InfoNCE/CLIP) are multiples of 16, and Triton
# specializes them so; n_chunks (1, 2 or 4 feature chunks) and the flags are not.
_FWD_ARGS = ["N:16", "M:16", "n_chunks", "diag_off:16", "n_bucket:16", "m_bucket:16"]
# The positives' diagonal (``_positive_cols``): 0 or the row counts at those shapes, and 0 without positives.
_BWD_ARGS = _FWD_ARGS + ["pos_rbase:16", "pos_period:16", "pos_shift:16", "pos_cbase:16", "row_term", "col_term",
                         "need_dscale"]


def _variants(ptrs, acc_ptrs, ints, block, kinds, archs=(), kscales=(False, True), derived=None, **flags):
    """One variant per (dtype, dot precision) in ``kinds`` and per KSCALE in ``kscales`` (a per-key scale:
    MoCo's queue; None: a kernel without the option); ``ints`` named ``"name:16"`` are declared multiples
    of 16, ``"name:i64"`` and ``"name:i32"`` are integer pointers (labels); ``derived(dtype, prec, kscale)``:
    the constexprs that follow from those, one dict per variant (the launcher derives them by the same
    function)."""
    out = []
    for (dtype, prec), kscale in itertools.product(kinds, kscales or (None,)):
        ty, acc = TL_DTYPE[dtype], ("fp64" if dtype == torch.float64 else "fp32")
        signature = {**{a: f"*{ty}" for a in ptrs},
                     **{a.partition(":")[0]: f"*{a.partition(':')[2] or acc}" for a in acc_ptrs},
                     **{a.partition(":")[0]: "i32" + (":16" if a.endswith(":16") else "") for a in ints}}
        options = {} if kscale is None else {"KSCALE": kscale}
        for more in (derived(dtype, prec, kscale) if derived else [{}]):
            out.append(variant(signature, archs=archs, ACC=acc_type(dtype), DOT_PREC=prec, BLOCK_D=block,
                               **options, **more, **flags))
    return out


# float32 with exact products (PyTorch's default, allow_tf32=False) runs its dots on FMA units: it takes the
# 64-wide chunked kernels (a resident 128-wide block spills), like float64.
_HALF = [(torch.float16, "ieee"), (torch.bfloat16, "ieee")]
_TF32 = [(torch.float32, "tf32")]
_EXACT = [(torch.float32, "ieee"), (torch.float64, "ieee")]
_FWD_PTRS = (["q_ptr", "k_ptr"], ["scale_ptr", "ks_ptr", "lse_ptr", "split_ptr"])
_BWD_PTRS = (["q_ptr", "k_ptr"], ["dq_ptr", "scale_ptr", "ks_ptr", "max_r_ptr", "g_r_ptr", "max_c_ptr", "g_c_ptr",
                                   "gpos_ptr", "lr_ptr:i32", "lc_ptr:i32", "wc_ptr", "dscale_ptr"])
# (key, BLOCK_D, kinds, chip families, KSCALE values): the resident widths, then the chunked kernels
_ANY = (False, True)
_KINDS = ((128, 128, _TF32 + _HALF, (), _ANY), (256, 256, _HALF, (), _ANY),
          ("loop", LOOP_BLOCK_D, _TF32 + _HALF, (), _ANY), ("exact", LOOP_BLOCK_D, _EXACT, (), _ANY))
_BWD_KINDS = ((128, 128, _HALF, HOPPER, _ANY), (256, 256, _HALF, HOPPER, (False,)),
              ("loop", 128, _TF32 + _HALF, (), _ANY), ("exact", LOOP_BLOCK_D, _EXACT, (), _ANY))
_fwd_kernels, _bwd_kernels = {}, {}


def _positives_in_kernel(dtype: torch.dtype, prec: str, kscale: bool) -> bool:
    """Whether the LSE backward adds the positives inside its dS (its POSITIVES): where it rounds dS for the
    product (bf16/fp16 features, tf32 products). The exact kernels' dS stays in the math dtype: their
    launcher adds the positives to dq after (in their loop the code cost them 16-32 B of spills); MoCo's
    queue (the key scale) holds none. One rule for the compiled variants and the launcher."""
    return not kscale and (dtype in (torch.float16, torch.bfloat16) or prec == "tf32")


def _positive_modes(dtype: torch.dtype, prec: str, kscale: bool, labels: bool = True) -> list:
    """The POSITIVES of the backward variants of a kind (``_positives_in_kernel``): where dS is rounded, a
    variant for the diagonal (which also serves a launch without positives) and, with ``labels``, one for
    labels (not at D = 256: 8 B of stack under triton 3.6; ``_pick_backward`` sends those to the chunks)."""
    if _positives_in_kernel(dtype, prec, kscale):
        return [{"POSITIVES": POS_DIAGONAL.value}] + ([{"POSITIVES": POS_LABELS.value}] if labels else [])
    return [{"POSITIVES": POS_NONE.value}]


for _key, _bd, _kinds, _archs, _kscales in _KINDS:
    _fwd_kernels[_key] = register(
        autotune(FWD_CONFIGS[_key], key=KEY)(_lse_fwd_kernel), configs=FWD_CONFIGS[_key], uses_dot=True,
        variants=_variants(*_FWD_PTRS, _FWD_ARGS, _bd, _kinds, _archs, _kscales, D_LOOP=_key in ("loop", "exact")))
for _key, _bd, _kinds, _archs, _kscales in _BWD_KINDS:
    _bwd_kernels[_key] = register(
        autotune(BWD_CONFIGS[_key], key=KEY, keep=_keep_backward)(_lse_bwd_kernel), configs=BWD_CONFIGS[_key],
        uses_dot=True, keep=_keep_backward,
        variants=_variants(*_BWD_PTRS, _BWD_ARGS, _bd, _kinds, _archs, _kscales, D_LOOP=_key in ("loop", "exact"),
                           derived=functools.partial(_positive_modes, labels=_key != 256)))


def _exact(dtype: torch.dtype) -> bool:
    """float64, or float32 without TF32: the FMA-unit kernels."""
    return dtype == torch.float64 or dot_precision(dtype) == "ieee" and dtype == torch.float32


def _layout(x: torch.Tensor, bd: int) -> torch.Tensor:
    """Features in the kernels' chunk-major layout (C, N, bd), zero-padded to C * bd >= D: the row
    stride is the constexpr ``bd``. A 16-byte aligned contiguous (N, bd) input is used as it is."""
    n, d = x.shape
    chunks = triton.cdiv(d, bd)
    if chunks == 1 and d == bd and x.is_contiguous() and x.data_ptr() % 16 == 0:
        return x.view(1, n, bd)
    padded = torch.zeros(n, chunks * bd, dtype=x.dtype, device=x.device)
    padded[:, :d] = x
    return padded.view(n, chunks, bd).transpose(0, 1).contiguous() if chunks > 1 else padded.view(1, n, bd)


def _pick(x: torch.Tensor):
    bd, loop = block_d(x.shape[1], x.dtype)
    if loop:
        return ("exact" if _exact(x.dtype) else "loop"), bd, loop
    return (128 if bd <= 128 else 256), bd, loop


def _chip(x: torch.Tensor) -> int:
    """The chip family (``registry.arch_family``) of ``x``'s device; 0 off CUDA."""
    return arch_family(device_arch(x)) if x.is_cuda else 0


def _pick_backward(x: torch.Tensor, kscale: bool = False, labels: bool = False):
    """(kernel key, BLOCK_D, D_LOOP) of the backward: the query block resident where its tile and the
    gradient accumulator fit in registers beside the scores (bf16/fp16 on sm_90: D <= 128, and D <= 256
    without a key scale or labelled positives, whose per-key vectors spill there), else the gradient in
    128-wide chunks (64 for the exact kernels) with the scores summed over all of them."""
    d = x.shape[1]
    if _exact(x.dtype):
        return "exact", BWD_BLOCK_D["exact"], True
    # the interpreter takes the resident kernel in every dtype, with a small block (the tests force the
    # chunked path with a narrow MAX_BLOCK_D)
    interpret = interpreting()
    per_key = kscale or labels
    if d <= MAX_BLOCK_D // (2 if per_key else 1) and (interpret or x.dtype != torch.float32 and _chip(x) >= 90):
        key = 128 if d <= 128 else 256
        return key, (max(16, triton.next_power_of_2(d)) if interpret else key), False
    return "loop", BWD_BLOCK_D["fast"], True


def lse_forward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, kscale=None,
                diag_off=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_lse_fwd_kernel``: ``lse_i = logsumexp_j scale * kscale_j * q_i . k_j`` over ``j != i + diag_off``.

    ``q`` (N, D) and ``k`` (M, D); ``scale`` a 1-element tensor in the math dtype; ``kscale`` None or (M,)
    in the math dtype. Returns (lse (N,), split (N, 2)) in the math dtype: ``split`` holds each row's
    (max_j s_ij, log2 sum_j exp2(s_ij - max)) in base 2 (s = log2(e) scale kscale q . k) for
    :func:`lse_backward_rows`.
    """
    n, d = q.shape
    m = k.shape[0]
    key, bd, loop = _pick(q)
    ql = _layout(q, bd)
    kl = ql if k is q else _layout(k, bd)
    lse = torch.empty(n, dtype=scale.dtype, device=q.device)
    split = torch.empty(n, 2, dtype=scale.dtype, device=q.device)
    off = m if diag_off is None else diag_off  # j == i + m never holds: nothing excluded
    launch(_fwd_kernels[key], lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),), config=INTERPRET_CONFIG,
           q_ptr=ql, k_ptr=kl, scale_ptr=scale, ks_ptr=scale if kscale is None else kscale, lse_ptr=lse,
           split_ptr=split, N=n, M=m, n_chunks=ql.shape[0], diag_off=off, n_bucket=bucket(n, TUNED_ROWS),
           m_bucket=bucket(m, TUNED_ROWS), ACC=acc_type(q.dtype), DOT_PREC=dot_precision(q.dtype), BLOCK_D=bd,
           D_LOOP=loop, KSCALE=kscale is not None)
    return lse, split


def lse_backward_rows(q, k, scale, split_r, g_r, split_c, g_c, kscale=None, diag_off=None, positives=None, *,
                      labels=None, need_dscale=False):
    """Launch ``_lse_bwd_kernel`` over the rows of ``q``: returns (dq (N, D) in the math dtype (scale's),
    dscale or None).
    ``split_r`` (N, 2) (:func:`lse_forward`'s) and ``g_r`` (N,) give the row term, ``split_c`` (M, 2) and
    ``g_c`` (M,) the column term; either pair may be None. The kernel reads each max and g / l, l =
    exp2(log-sum) (two small passes here, and no more registers in its loop than one LSE took).
    ``positives`` None or (weights (N,) in the math dtype, rbase, period, shift, cbase): row i's positive
    column on a shifted diagonal (``_positive_cols``) gains weight_i in dS, in the kernel before dS is
    rounded to bf16/fp16/tf32; the exact kernels' dS is not rounded, and their positives' w_i scale k_t_i is
    added to dq here (O(N D)). ``labels`` None or (row labels (N,) int32 >= 0, key labels (M,) int32 >= 0,
    row weights (N,), key weights (M,)), for the kinds that round dS only (``_positives_in_kernel``): every
    key j != i + diag_off whose label is row i's gains w_i + w'_j in dS. No positives with ``kscale``
    (MoCo's queue)."""
    n, d = q.shape
    m = k.shape[0]
    key, bd, loop = _pick_backward(q, kscale is not None, labels is not None)
    ql = _layout(q, bd)
    kl = ql if k is q else _layout(k, bd)
    chunks = ql.shape[0]
    dq = torch.empty(ql.shape, dtype=scale.dtype, device=q.device)  # the math dtype: the losses add to it
    off = m if diag_off is None else diag_off
    row_term, col_term = split_r is not None, split_c is not None
    max_r, g_r = _max_and_weight(split_r, g_r) if row_term else (None, None)
    max_c, g_c = _max_and_weight(split_c, g_c) if col_term else (None, None)
    dummy = scale  # never read when its term is off
    partials = torch.empty(chunks, n, dtype=scale.dtype, device=q.device) if need_dscale else dummy
    if (positives is not None or labels is not None) and kscale is not None:
        raise ValueError("positives on a key-scaled launch (MoCo's queue holds no positive)")
    in_kernel = _positives_in_kernel(q.dtype, dot_precision(q.dtype), kscale is not None)
    if labels is not None and not in_kernel:
        raise ValueError(f"labelled positives need a kernel that rounds dS ({q.dtype}, {dot_precision(q.dtype)})")
    inside = positives is not None and in_kernel
    rbase, period, shift, cbase = positives[1:] if inside else (0, 0, 0, 0)  # period 0: none
    mode = POS_LABELS if labels is not None else POS_DIAGONAL if in_kernel else POS_NONE
    no_labels = _no_labels(q.device)
    lr, lc, wr, wc = labels if labels is not None else (no_labels, no_labels, dummy, dummy)
    launch(_bwd_kernels[key], lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), chunks), config=INTERPRET_CONFIG,
           q_ptr=ql, k_ptr=kl, scale_ptr=scale, ks_ptr=dummy if kscale is None else kscale,
           max_r_ptr=max_r if row_term else dummy,
           g_r_ptr=g_r if row_term else dummy, max_c_ptr=max_c if col_term else dummy,
           g_c_ptr=g_c if col_term else dummy, gpos_ptr=positives[0] if inside else wr, lr_ptr=lr, lc_ptr=lc,
           wc_ptr=wc, dq_ptr=dq,
           dscale_ptr=partials, N=n, M=m, n_chunks=chunks, diag_off=off, pos_rbase=rbase, pos_period=period,
           pos_shift=shift, pos_cbase=cbase, row_term=int(row_term), col_term=int(col_term),
           need_dscale=int(need_dscale),
           n_bucket=bucket(n, TUNED_ROWS), m_bucket=bucket(m, TUNED_ROWS), ACC=acc_type(q.dtype), DOT_PREC=dot_precision(q.dtype),
           BLOCK_D=bd, D_LOOP=loop, KSCALE=kscale is not None, POSITIVES=mode.value)
    dq = _unlayout(dq, n, d, bd)
    if positives is not None and not inside:
        _add_positives_(dq, partials[0] if need_dscale else None, q, k, scale, *positives)
    return dq, (partials.sum() if need_dscale else None)


@functools.lru_cache(maxsize=None)
def _no_labels(device: torch.device) -> torch.Tensor:
    """The label pointers of a launch without labels: never read, there for their int32 type (one tensor
    a device, not an allocation a launch)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _add_positives_(dq, partial, q, k, scale, w, rbase, period, shift, cbase):
    """The exact kernels' positives, in place: dq_i += scale w_i k_t_i for the rows with one
    (``_positive_cols``), and their scale gradient w_i q_i . k_t_i to the per-row ``partial`` (None: not
    wanted)."""
    from ..contrastive import diagonal_columns

    rows = torch.arange(rbase, min(rbase + period, q.shape[0]), device=q.device)
    cols = diagonal_columns(rows, rbase, period, shift, cbase)
    kt = k.index_select(0, cols).to(dq.dtype)
    w = w.index_select(0, rows)
    dq.index_add_(0, rows, (scale * w)[:, None] * kt)
    if partial is not None:
        partial.index_add_(0, rows, w * (q.index_select(0, rows).to(dq.dtype) * kt).sum(1))


def _max_and_weight(split: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rows' max, g / l) from a (max, log-sum) split and the LSE's gradient g, contiguous. A row
    without entries (max -inf, l = 0: SupCon's batch of one) gets max 0 and weight 0: its softmax is 0,
    where exp2(-inf - max) and g / 0 gave NaN."""
    empty = split[:, 0] == float("-inf")
    return (split[:, 0].masked_fill(empty, 0.0).contiguous(),
            (g * torch.exp2(-split[:, 1])).masked_fill_(empty, 0.0).contiguous())


def _unlayout(x: torch.Tensor, n: int, d: int, bd: int) -> torch.Tensor:
    """(n, d) rows of a (C, n, bd) chunk-major buffer (``_layout``'s inverse; a view when it is one chunk)."""
    chunks = x.shape[0]
    if chunks > 1 or bd != d:
        return x.transpose(0, 1).reshape(n, chunks * bd)[:, :d].contiguous()
    return x.view(n, d)


# -- the sigmoid loss (SigLIP) -------------------------------------------------------------------------------
# sum_j softplus(-z_ij l_ij) per row, l_ij = scale * q_i . k_j + bias, z_ij = +1 on the positive column
# j == i + diag_off and -1 elsewhere (Zhai et al. 2023), tiled like the LSE kernels: the same resident query
# block or feature chunks (``_scores``), the same split of whole key tiles (every pair a negative: no compare)
# from the band and edge tiles (``_band``: there the positive's sign flips and the keys past M drop out).
# Base 2 as there: l2 = log2(e) l, softplus(t) = ln(2) * log2(1 + 2^t2), one exp2 and one log2 a pair.
# The backward by recomputation: dS_ij = w * d softplus(-z l)/dl = -z_ij sigmoid(-z_ij l_ij) w (w: the
# anchor's weight, an image row's in the row pass, a column's in the column pass that gives the texts'
# gradient with the roles swapped), dq = scale dS @ k; the parameters' gradients per row (dscale from the
# accumulator as the LSE backward does, dbias = sum_j dS_ij), summed afterwards in a fixed order.

@device_function
@triton.jit
def _softplus2(t2):
    """log2(1 + 2^t2), exact at both ends (max(t2, 0) + log2(1 + 2^-|t2|)); NaN in, NaN out."""
    return tl.maximum(t2, 0.0) + tl.log2(1.0 + tl.exp2(-tl.abs(t2)))


@device_function
@triton.jit
def _sig_tiles(acc, q, q_ptr, k_ptr, scale2, bias2, row0, row_mask, positive, N, M, n_chunks, n_tiles, lo, hi,
               lo2, hi2, full, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """acc_i += sum_j softplus2(-z_ij l2_ij) over ``n_tiles`` key tiles of one kind (``_tile_start``)."""
    for t in range(0, n_tiles):
        col0 = _tile_start(t, lo, hi, lo2, hi2, full, BLOCK_N, MASKED)
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < M
        s = _scores(q, q_ptr, k_ptr, row0, col0, row_mask, col_mask, N, M, n_chunks, ACC, DOT_PREC,
                    BLOCK_M, BLOCK_N, BLOCK_D, D_LOOP, MASKED)
        t2 = s * scale2 + bias2  # a negative's -z l = l
        if MASKED:
            t2 = tl.where(cols[None, :] == positive[:, None], -t2, t2)
            acc += tl.sum(tl.where(col_mask[None, :], _softplus2(t2), 0.0), 1)
        else:
            acc += tl.sum(_softplus2(t2), 1)
    return acc


@triton.jit
def _sig_fwd_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, out_ptr, N, M, n_chunks, diag_off, n_bucket, m_bucket,
                    ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row0, rows_l, rows, row_mask, q = _query_block(q_ptr, N, BLOCK_M, BLOCK_D, D_LOOP)
    scale2 = tl.load(scale_ptr).to(ACC) * LOG2E
    bias2 = tl.load(bias_ptr).to(ACC) * LOG2E
    acc = tl.zeros((BLOCK_M,), dtype=ACC)
    lo, hi, lo2, hi2, full = _band(row0, diag_off, 0, 0, M, BLOCK_M, BLOCK_N)
    n_plain, n_masked = _tile_counts(lo, hi, lo2, hi2, full, M, BLOCK_N)
    positive = rows + diag_off
    acc = _sig_tiles(acc, q, q_ptr, k_ptr, scale2, bias2, row0, row_mask, positive, N, M, n_chunks, n_plain, lo,
                     hi, lo2, hi2, full, ACC, DOT_PREC, BLOCK_D, D_LOOP, BLOCK_M, BLOCK_N, False)
    acc = _sig_tiles(acc, q, q_ptr, k_ptr, scale2, bias2, row0, row_mask, positive, N, M, n_chunks, n_masked, lo,
                     hi, lo2, hi2, full, ACC, DOT_PREC, BLOCK_D, D_LOOP, BLOCK_M, BLOCK_N, True)
    tl.store(out_ptr + rows, acc * LN2, mask=row_mask)


@device_function
@triton.jit
def _sig_bwd_tiles(acc, db, q, q_ptr, k_ptr, w_ptr, scale2, bias2, w_r, row0, row_mask, positive, chunk, N, M,
                   n_chunks, n_tiles, lo, hi, lo2, hi2, full, col_weights, need_dparams, ACC: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """acc += dS @ k (and db_i += sum_j dS_ij) over ``n_tiles`` key tiles of one kind: dS from the recomputed
    scores, sigmoid(l) w off the positive, -sigmoid(-l) w on it."""
    for t in range(0, n_tiles):
        cols, col_mask, kt, s = _bwd_tile(t, q, q_ptr, k_ptr, row0, row_mask, chunk, N, M, n_chunks, lo, hi, lo2,
                                          hi2, full, ACC, DOT_PREC, BLOCK_D, D_LOOP, BLOCK_M, BLOCK_N, MASKED)
        t2 = s * scale2 + bias2
        if MASKED:
            pos = cols[None, :] == positive[:, None]
            g = 1.0 / (1.0 + tl.exp2(tl.where(pos, t2, -t2)))
            g = tl.where(pos, -g, g)
        else:
            g = 1.0 / (1.0 + tl.exp2(-t2))
        if col_weights != 0:
            if MASKED:
                ds = g * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
            else:
                ds = g * tl.load(w_ptr + cols).to(ACC)[None, :]
        else:
            ds = g * w_r[:, None]
            if MASKED:
                ds = tl.where(col_mask[None, :], ds, 0.0)
        if need_dparams != 0:
            db += tl.sum(ds, 1)
        acc += dot_acc(ds.to(kt.dtype), kt, ACC, DOT_PREC)
    return acc, db


@triton.jit
def _sig_bwd_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, w_ptr, dq_ptr, dscale_ptr, dbias_ptr, N, M, n_chunks,
                    diag_off, col_weights, need_dparams, n_bucket, m_bucket, ACC: tl.constexpr,
                    DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    # As _lse_bwd_kernel: one (BLOCK_M, BLOCK_D) fp32 accumulator of dq per program (feature chunk
    # program_id(1)); the weights w per row (col_weights == 0) or per key (the column pass).
    row0, rows_l, rows, row_mask, q = _query_block(q_ptr, N, BLOCK_M, BLOCK_D, D_LOOP)
    chunk = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr).to(ACC)
    scale2 = scale * LOG2E
    bias2 = tl.load(bias_ptr).to(ACC) * LOG2E
    w_r = tl.zeros((BLOCK_M,), dtype=ACC)
    if col_weights == 0:
        w_r = tl.load(w_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    db = tl.zeros((BLOCK_M,), dtype=ACC)
    lo, hi, lo2, hi2, full = _band(row0, diag_off, 0, 0, M, BLOCK_M, BLOCK_N)
    n_plain, n_masked = _tile_counts(lo, hi, lo2, hi2, full, M, BLOCK_N)
    positive = rows + diag_off
    acc, db = _sig_bwd_tiles(acc, db, q, q_ptr, k_ptr, w_ptr, scale2, bias2, w_r, row0, row_mask, positive, chunk,
                             N, M, n_chunks, n_plain, lo, hi, lo2, hi2, full, col_weights, need_dparams, ACC, DOT_PREC,
                             BLOCK_D, D_LOOP, BLOCK_M, BLOCK_N, False)
    acc, db = _sig_bwd_tiles(acc, db, q, q_ptr, k_ptr, w_ptr, scale2, bias2, w_r, row0, row_mask, positive, chunk,
                             N, M, n_chunks, n_masked, lo, hi, lo2, hi2, full, col_weights, need_dparams, ACC, DOT_PREC,
                             BLOCK_D, D_LOOP, BLOCK_M, BLOCK_N, True)
    tl.store(_tile_ptrs(dq_ptr + (chunk * N + row0) * BLOCK_D, rows_l, BLOCK_D),
             (acc * scale).to(dq_ptr.dtype.element_ty), mask=row_mask[:, None])
    if need_dparams != 0:
        if D_LOOP:
            q = _rows(q_ptr + (chunk * N + row0) * BLOCK_D, rows_l, row_mask, BLOCK_D, True)
        tl.store(dscale_ptr + chunk * N + rows, tl.sum(q.to(ACC) * acc, 1), mask=row_mask)
        if chunk == 0:
            tl.store(dbias_ptr + rows, db, mask=row_mask)


# One config per chip family and kind (the compile check's cost stays small): the LSE kernels' shapes.
SIG_FWD_CONFIGS = {128: _configs([(64, 64, 4, 3)], AMPERE) + _configs([(128, 64, 8, 3)], HOPPER),
                   256: _configs([(64, 64, 4, 2)], AMPERE) + _configs([(128, 64, 8, 2)], HOPPER),
                   "loop": _configs([(64, 64, 8, 2)]),
                   # sm_80 in fp64 (both forwards) holds ~128 registers whatever the warps: 64 x 32 x 8 warps
                   # and 32 x 32 spill (STACK 8-16 B under triton 3.6 and 3.8); 32 x 16 x 4 uses 70-128, clean
                   # under 3.6, 3.8 and 3.9
                   "exact": _configs([(32, 16, 4, 2)], AMPERE) + _configs([(64, 32, 8, 2)], HOPPER)}
SIG_BWD_CONFIGS = {128: _configs([(64, 64, 4, 2)], HOPPER), 256: _configs([(64, 32, 8, 2)], HOPPER),
                   "loop": _configs([(32, 32, 8, 2)], AMPERE) + _configs([(64, 32, 8, 2)], HOPPER),
                   # 4 warps: 8 gave the fp32 one an 8-byte stack frame at 80 registers under triton 3.9 (sm_90)
                   "exact": _configs([(32, 32, 4, 1)])}
_SIG_FWD_PTRS = (["q_ptr", "k_ptr"], ["scale_ptr", "bias_ptr", "out_ptr"])
_SIG_BWD_PTRS = (["q_ptr", "k_ptr", "dq_ptr"], ["scale_ptr", "bias_ptr", "w_ptr", "dscale_ptr", "dbias_ptr"])
_SIG_BWD_ARGS = _FWD_ARGS + ["col_weights", "need_dparams"]


def _register_pair(fwd, bwd, fwd_configs, bwd_configs, fwd_ptrs, bwd_ptrs, bwd_args):
    """Register a loss's forward and backward kernels over the LSE kernels' kinds (resident widths, chunked,
    exact; no key scale): ``({kind: forward}, {kind: backward})``."""
    out = ({}, {})
    for kernel, configs, kinds, ptrs, ints, kernels in ((fwd, fwd_configs, _KINDS, fwd_ptrs, _FWD_ARGS, out[0]),
                                                        (bwd, bwd_configs, _BWD_KINDS, bwd_ptrs, bwd_args, out[1])):
        for key, bd, dtypes, archs, _ in kinds:
            kernels[key] = register(autotune(configs[key], key=KEY)(kernel), configs=configs[key], uses_dot=True,
                                    variants=_variants(*ptrs, ints, bd, dtypes, archs, None,
                                                       D_LOOP=key in ("loop", "exact")))
    return out


_sig_fwd_kernels, _sig_bwd_kernels = _register_pair(_sig_fwd_kernel, _sig_bwd_kernel, SIG_FWD_CONFIGS, SIG_BWD_CONFIGS,
                                                    _SIG_FWD_PTRS, _SIG_BWD_PTRS, _SIG_BWD_ARGS)


def sigmoid_forward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    diag_off: int) -> torch.Tensor:
    """Launch ``_sig_fwd_kernel``: row sums ``sum_j softplus(-z_ij (scale q_i . k_j + bias))`` with z = +1 at
    ``j == i + diag_off``. ``q`` (N, D), ``k`` (M, D); ``scale`` and ``bias`` 1-element tensors in the math
    dtype. Returns (N,) in the math dtype."""
    n, m = q.shape[0], k.shape[0]
    key, bd, loop = _pick(q)
    ql = _layout(q, bd)
    kl = _layout(k, bd)
    out = torch.empty(n, dtype=scale.dtype, device=q.device)
    launch(_sig_fwd_kernels[key], lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),), config=INTERPRET_CONFIG,
           q_ptr=ql, k_ptr=kl, scale_ptr=scale, bias_ptr=bias, out_ptr=out, N=n, M=m, n_chunks=ql.shape[0],
           diag_off=diag_off, n_bucket=bucket(n, TUNED_ROWS), m_bucket=bucket(m, TUNED_ROWS),
           ACC=acc_type(q.dtype), DOT_PREC=dot_precision(q.dtype), BLOCK_D=bd, D_LOOP=loop)
    return out


def sigmoid_backward_rows(q, k, scale, bias, w, *, diag_off: int, col_weights: bool = False,
                          need_dparams: bool = False):
    """Launch ``_sig_bwd_kernel`` over the rows of ``q``: (dq (N, D) in q's dtype, dscale, dbias) with
    ``dS_ij = -z_ij sigmoid(-z_ij l_ij) w`` and ``w`` (float, the math dtype) per row of ``q``, or per row of
    ``k`` with ``col_weights`` (the texts' gradient: q the texts, k the images, ``diag_off`` transposed); the
    parameters' gradients (1-element sums, fixed order) with ``need_dparams``, else None."""
    n, d = q.shape
    m = k.shape[0]
    key, bd, loop = _pick_backward(q)
    ql = _layout(q, bd)
    kl = _layout(k, bd)
    chunks = ql.shape[0]
    dq = torch.empty_like(ql)
    dscale = torch.empty(chunks, n, dtype=scale.dtype, device=q.device) if need_dparams else scale
    dbias = torch.empty(n, dtype=scale.dtype, device=q.device) if need_dparams else scale
    launch(_sig_bwd_kernels[key], lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), chunks), config=INTERPRET_CONFIG,
           q_ptr=ql, k_ptr=kl, scale_ptr=scale, bias_ptr=bias, w_ptr=w, dq_ptr=dq, dscale_ptr=dscale,
           dbias_ptr=dbias, N=n, M=m, n_chunks=chunks, diag_off=diag_off, col_weights=int(col_weights),
           need_dparams=int(need_dparams), n_bucket=bucket(n, TUNED_ROWS), m_bucket=bucket(m, TUNED_ROWS),
           ACC=acc_type(q.dtype), DOT_PREC=dot_precision(q.dtype), BLOCK_D=bd, D_LOOP=loop)
    dq = _unlayout(dq, n, d, bd)
    if not need_dparams:
        return dq, None, None
    return dq, dscale.sum(), dbias.sum()


# -- the supervised NT-Xent (pytorch-metric-learning's NTXentLoss): negatives masked by label -----------------
# Every ordered pair (a, p) with equal labels (a != p unless the keys are references) is a positive with loss
# softplus(neg_a - s_ap), neg_a = log sum_{n: label_n != label_a} exp(s_an) (pml's -log(e^s_ap / (e^s_ap +
# sum_n e^s_an))). The forward: first the masked online LSE over the negatives (``_fwd_tiles`` with LABELS,
# the LSE kernels' loop), then a second pass over the keys where the row block's positives can be (the
# launcher sorts rows and keys by label, so a row's positives are one contiguous run of keys and the pass costs
# O(sum_c n_c^2 D), not O(N M D)) summing T_a = sum_p softplus(neg_a - s_ap) and W_a = sum_p sigmoid(neg_a -
# s_ap). The backward by recomputation: dS_aj = g_a (W_a exp(s_aj - neg_a) on negatives, -sigmoid(neg_a - s_aj)
# on positives), the row term with the anchor on the rows, the column term with the anchor on the columns
# (the symmetric case's one pass, or the references' gradient with the roles swapped), as _lse_bwd_kernel.

@triton.jit
def _sup_fwd_kernel(q_ptr, k_ptr, scale_ptr, lq_ptr, lk_ptr, plo_ptr, phi_ptr, neg_ptr, loss_ptr, wsum_ptr, N, M,
                    n_chunks, diag_off, n_bucket, m_bucket, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row0, rows_l, rows, row_mask, q = _query_block(q_ptr, N, BLOCK_M, BLOCK_D, D_LOOP)
    excluded = rows + diag_off  # a row's own column (diag_off >= M: references, nothing excluded)
    scale2 = tl.load(scale_ptr).to(ACC) * LOG2E
    lq = tl.load(lq_ptr + rows, mask=row_mask, other=0)
    hi2, lo2 = _row_lse2(q, q_ptr, k_ptr, scale_ptr, scale2, row0, row_mask, excluded, diag_off, N, M, n_chunks,
                         lq, lk_ptr, ACC, DOT_PREC, BLOCK_D, D_LOOP, False, BLOCK_M, BLOCK_N, True)
    neg2 = hi2 + lo2  # -inf: no negative
    # the positives: the keys [plo, phi) of the block's rows (sorted by label: one run of keys)
    first = tl.min(tl.load(plo_ptr + rows, mask=row_mask, other=M), 0)
    last = tl.max(tl.load(phi_ptr + rows, mask=row_mask, other=0), 0)
    t_i = tl.zeros((BLOCK_M,), dtype=ACC)
    w_i = tl.zeros((BLOCK_M,), dtype=ACC)
    for col0 in range((first // BLOCK_N) * BLOCK_N, last, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < M
        s2 = _scores(q, q_ptr, k_ptr, row0, col0, row_mask, col_mask, N, M, n_chunks, ACC, DOT_PREC,
                     BLOCK_M, BLOCK_N, BLOCK_D, D_LOOP, True) * scale2
        lk = tl.load(lk_ptr + cols, mask=col_mask, other=0)
        pos = col_mask[None, :] & (lk[None, :] == lq[:, None]) & (cols[None, :] != excluded[:, None])
        x2 = neg2[:, None] - s2  # softplus(neg - s), sigmoid(neg - s) in base 2
        t_i += tl.sum(tl.where(pos, _softplus2(x2), 0.0), 1)
        w_i += tl.sum(tl.where(pos, 1.0 / (1.0 + tl.exp2(-x2)), 0.0), 1)
    tl.store(neg_ptr + rows, neg2 * LN2, mask=row_mask)
    tl.store(loss_ptr + rows, t_i * LN2, mask=row_mask)
    tl.store(wsum_ptr + rows, w_i, mask=row_mask)


@device_function
@triton.jit
def _sup_ds(s2, same, neg2, w, g):
    """The pair's dS for the anchor whose negatives' LSE (base 2) is ``neg2``, positives' sigmoid sum ``w``
    and weight ``g`` (broadcast along the anchor's axis): g w exp(s - neg) on a negative, -g sigmoid(neg - s)
    on a positive."""
    return tl.where(same, -g / (1.0 + tl.exp2(s2 - neg2)), (g * w) * tl.exp2(s2 - neg2))


@device_function
@triton.jit
def _sup_bwd_tiles(acc, q, q_ptr, k_ptr, lk_ptr, neg_c_ptr, w_c_ptr, g_c_ptr, scale2, lq, neg_r, w_r, g_r, row0,
                   row_mask, excluded, chunk, N, M, n_chunks, n_tiles, lo, hi, lo2, hi2, full, row_term, col_term,
                   ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """acc += dS @ k over ``n_tiles`` key tiles of one kind (``_bwd_tiles``' loop with the labels' dS)."""
    for t in range(0, n_tiles):
        cols, col_mask, kt, s = _bwd_tile(t, q, q_ptr, k_ptr, row0, row_mask, chunk, N, M, n_chunks, lo, hi, lo2,
                                          hi2, full, ACC, DOT_PREC, BLOCK_D, D_LOOP, BLOCK_M, BLOCK_N, MASKED)
        s2 = s * scale2
        if MASKED:
            lk = tl.load(lk_ptr + cols, mask=col_mask, other=0)
        else:
            lk = tl.load(lk_ptr + cols)
        same = lk[None, :] == lq[:, None]
        ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        if row_term != 0:
            ds += _sup_ds(s2, same, neg_r[:, None], w_r[:, None], g_r[:, None])
        if col_term != 0:
            if MASKED:
                neg_c = tl.load(neg_c_ptr + cols, mask=col_mask, other=0.0).to(ACC) * LOG2E
                w_c = tl.load(w_c_ptr + cols, mask=col_mask, other=0.0).to(ACC)
                g_c = tl.load(g_c_ptr + cols, mask=col_mask, other=0.0).to(ACC)
            else:
                neg_c = tl.load(neg_c_ptr + cols).to(ACC) * LOG2E
                w_c = tl.load(w_c_ptr + cols).to(ACC)
                g_c = tl.load(g_c_ptr + cols).to(ACC)
            ds += _sup_ds(s2, same, neg_c[None, :], w_c[None, :], g_c[None, :])
        if MASKED:
            ds = tl.where(row_mask[:, None] & col_mask[None, :] & (cols[None, :] != excluded[:, None]), ds, 0.0)
        acc += dot_acc(ds.to(kt.dtype), kt, ACC, DOT_PREC)
    return acc


@triton.jit
def _sup_bwd_kernel(q_ptr, k_ptr, scale_ptr, lq_ptr, lk_ptr, neg_r_ptr, w_r_ptr, g_r_ptr, neg_c_ptr, w_c_ptr,
                    g_c_ptr, dq_ptr, N, M, n_chunks, diag_off, row_term, col_term, n_bucket, m_bucket,
                    ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row0, rows_l, rows, row_mask, q = _query_block(q_ptr, N, BLOCK_M, BLOCK_D, D_LOOP)
    excluded = rows + diag_off
    chunk = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr).to(ACC)
    lq = tl.load(lq_ptr + rows, mask=row_mask, other=0)
    neg_r = tl.zeros((BLOCK_M,), dtype=ACC)
    w_r = tl.zeros((BLOCK_M,), dtype=ACC)
    g_r = tl.zeros((BLOCK_M,), dtype=ACC)
    if row_term != 0:
        neg_r = tl.load(neg_r_ptr + rows, mask=row_mask, other=0.0).to(ACC) * LOG2E
        w_r = tl.load(w_r_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        g_r = tl.load(g_r_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    lo, hi, lo2, hi2, full = _band(row0, diag_off, 0, 0, M, BLOCK_M, BLOCK_N)
    n_plain, n_masked = _tile_counts(lo, hi, lo2, hi2, full, M, BLOCK_N)
    acc = _sup_bwd_tiles(acc, q, q_ptr, k_ptr, lk_ptr, neg_c_ptr, w_c_ptr, g_c_ptr, scale * LOG2E, lq, neg_r, w_r,
                         g_r, row0, row_mask, excluded, chunk, N, M, n_chunks, n_plain, lo, hi, lo2, hi2, full,
                         row_term, col_term, ACC, DOT_PREC, BLOCK_D, D_LOOP, BLOCK_M, BLOCK_N, False)
    acc = _sup_bwd_tiles(acc, q, q_ptr, k_ptr, lk_ptr, neg_c_ptr, w_c_ptr, g_c_ptr, scale * LOG2E, lq, neg_r, w_r,
                         g_r, row0, row_mask, excluded, chunk, N, M, n_chunks, n_masked, lo, hi, lo2, hi2, full,
                         row_term, col_term, ACC, DOT_PREC, BLOCK_D, D_LOOP, BLOCK_M, BLOCK_N, True)
    tl.store(_tile_ptrs(dq_ptr + (chunk * N + row0) * BLOCK_D, rows_l, BLOCK_D),
             (acc * scale).to(dq_ptr.dtype.element_ty), mask=row_mask[:, None])


_SUP_FWD_PTRS = (["q_ptr", "k_ptr"], ["scale_ptr", "lq_ptr:i64", "lk_ptr:i64", "plo_ptr:i64", "phi_ptr:i64", "neg_ptr",
                                     "loss_ptr", "wsum_ptr"])
_SUP_BWD_PTRS = (["q_ptr", "k_ptr", "dq_ptr"], ["scale_ptr", "lq_ptr:i64", "lk_ptr:i64", "neg_r_ptr", "w_r_ptr",
                                                "g_r_ptr", "neg_c_ptr", "w_c_ptr", "g_c_ptr"])
_SUP_BWD_ARGS = _FWD_ARGS + ["row_term", "col_term"]
# The sigmoid kernels' configs (one per chip family and kind) but for the resident forward on sm_80: its
# three loops in 4 warps spill there (64 x 64 x 4 warps: STACK 64-72 B, triton 3.8); 8 warps are clean.
SUP_FWD_CONFIGS = {**SIG_FWD_CONFIGS, **{d: _configs([(64, 64, 8, 2)], AMPERE) + SIG_FWD_CONFIGS[d][-1:]
                                          for d in (128, 256)}}
# The backward's resident 128-wide block on sm_90 in 64 x 32 tiles of 8 warps: 64 x 64 x 4 warps (the sigmoid
# kernel's) holds 253 registers under triton 3.8 and spills under 3.6 (STACK 40 B).
SUP_BWD_CONFIGS = {**SIG_BWD_CONFIGS, 128: _configs([(64, 32, 8, 2)], HOPPER),
                   "exact": _configs([(32, 32, 8, 1)])}  # 4 warps spill in fp64 (8-32 B, triton 3.6-3.9)
_sup_fwd_kernels, _sup_bwd_kernels = _register_pair(_sup_fwd_kernel, _sup_bwd_kernel, SUP_FWD_CONFIGS, SUP_BWD_CONFIGS,
                                                    _SUP_FWD_PTRS, _SUP_BWD_PTRS, _SUP_BWD_ARGS)


def _by_label(x: torch.Tensor, labels: torch.Tensor):
    """(order, x[order], labels[order]): rows sorted by label (stable)."""
    order = torch.argsort(labels, stable=True)
    return order, x.index_select(0, order), labels.index_select(0, order)


def _unsort(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """values[i] back at row order[i] (each index once: deterministic)."""
    out = torch.empty_like(values)
    out[order] = values
    return out


def supervised_forward(q, k, lq, lk, scale, symmetric: bool):
    """Launch ``_sup_fwd_kernel`` over rows and keys sorted by label: per row of ``q`` (N, D) against the keys
    ``k`` (M, D) (``symmetric``: k is q and a row's own column is left out), the negatives' LSE, the sum of its
    positives' softplus(neg - s) and of their sigmoid(neg - s), in the math dtype and q's row order; ``lq``
    (N,), ``lk`` (M,) int64 labels, ``scale`` a 1-element tensor in the math dtype."""
    n, m = q.shape[0], k.shape[0]
    key, bd, loop = _pick(q)
    oq, qs, lqs = _by_label(q, lq)
    ks, lks = (qs, lqs) if symmetric else _by_label(k, lk)[1:]
    ql = _layout(qs, bd)
    kl = ql if symmetric else _layout(ks, bd)
    plo, phi = torch.searchsorted(lks, lqs), torch.searchsorted(lks, lqs, right=True)
    neg, loss, wsum = (torch.empty(n, dtype=scale.dtype, device=q.device) for _ in range(3))
    launch(_sup_fwd_kernels[key], lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),), config=INTERPRET_CONFIG,
           q_ptr=ql, k_ptr=kl, scale_ptr=scale, lq_ptr=lqs, lk_ptr=lks, plo_ptr=plo, phi_ptr=phi, neg_ptr=neg,
           loss_ptr=loss, wsum_ptr=wsum, N=n, M=m, n_chunks=ql.shape[0], diag_off=0 if symmetric else m,
           n_bucket=bucket(n, TUNED_ROWS), m_bucket=bucket(m, TUNED_ROWS), ACC=acc_type(q.dtype),
           DOT_PREC=dot_precision(q.dtype), BLOCK_D=bd, D_LOOP=loop)
    return _unsort(loss, oq), _unsort(neg, oq), _unsort(wsum, oq)


def supervised_backward_rows(q, k, lq, lk, scale, row_stats, col_stats, *, self_excluded: bool):
    """Launch ``_sup_bwd_kernel`` over the rows of ``q``: dq (N, D) in q's dtype of sum_a g_a * loss_a with the
    anchors on the rows (``row_stats`` = (neg, wsum, g) per row of q, or None) and/or on the columns
    (``col_stats`` per row of k); ``self_excluded``: q and k are one set (row i leaves out column i). The
    rows are taken in label order and the result put back."""
    n, d = q.shape
    m = k.shape[0]
    key, bd, loop = _pick_backward(q)
    oq, qs, lqs = _by_label(q, lq)
    ok, ks, lks = _by_label(k, lk)
    ql, kl = _layout(qs, bd), _layout(ks, bd)
    chunks = ql.shape[0]
    dq = torch.empty_like(ql)
    dummy = scale
    rs = [dummy] * 3 if row_stats is None else [t.index_select(0, oq) for t in row_stats]
    cs = [dummy] * 3 if col_stats is None else [t.index_select(0, ok) for t in col_stats]
    launch(_sup_bwd_kernels[key], lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), chunks), config=INTERPRET_CONFIG,
           q_ptr=ql, k_ptr=kl, scale_ptr=scale, lq_ptr=lqs, lk_ptr=lks, neg_r_ptr=rs[0], w_r_ptr=rs[1],
           g_r_ptr=rs[2], neg_c_ptr=cs[0], w_c_ptr=cs[1], g_c_ptr=cs[2], dq_ptr=dq, N=n, M=m, n_chunks=chunks,
           diag_off=0 if self_excluded else m, row_term=int(row_stats is not None),
           col_term=int(col_stats is not None), n_bucket=bucket(n, TUNED_ROWS), m_bucket=bucket(m, TUNED_ROWS),
           ACC=acc_type(q.dtype), DOT_PREC=dot_precision(q.dtype), BLOCK_D=bd, D_LOOP=loop)
    return _unsort(_unlayout(dq, n, d, bd), oq)
