"""Contrastive losses (InfoNCE, NT-Xent, MoCo, CLIP) that never materialize the similarity matrix.

Every loss here is ``mean_i(lse_i - pos_i)`` (or the sum, or per row): ``pos_i`` is the positive's logit, a
row dot product computed in PyTorch (O(N*D)), and ``lse_i`` the log-sum-exp of row i of the scaled
similarity matrix. The LSE is one ``torch.library.custom_op`` (``fastssl::contrastive_lse``) with its
backward a custom op too; its body asks :func:`fastssl.backend.use_triton` whether the Triton kernels of
``fastssl.kernels.contrastive`` run (tiled online log-sum-exp, backward by recomputation) or the PyTorch
path beside them: up to ``KEEP_ELEMENTS`` similarities it keeps the score matrix S from the forward for the
backward (a third output, empty otherwise: no recompute matmul, both of CLIP's LSEs from one matmul); above,
the same math over blocks of rows recomputed in the backward, memory O(chunk * M). In eager mode a kept
NT-Xent is one autograd node (:class:`_KeptNTXent`: normalize, LSE and positives with a hand-written
backward), since at small batches the graph around the op costs more than its math. Options of the op:

- ``diag_off``: row i leaves column ``i + diag_off`` out of its softmax (NT-Xent's self-similarity).
- ``kscale``: a per-key multiplier (MoCo's queue L2-normalized on the fly, without a copy of the queue).
- ``two_sided``: also the column LSE (CLIP's text-to-image direction), one backward for both.
- ``symmetric``: ``k`` is ``q`` (NT-Xent): one gradient, from one pass of the kernels.

``*_reference`` functions (the first section, before any op) are the literal formulas (``F.cross_entropy`` on
the materialized logits, float64 when ``upcast``) that the tests compare against.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import first_order, requested_backend, use_triton
from .checks import (accumulation_dtype, check_bool, check_choice, check_float, check_ndim, check_number, check_positive,
                     check_same)

REDUCTIONS = ("mean", "sum", "none")

# The PyTorch path's block of rows: about CHUNK_ELEMENTS similarities at a time (64 MB in float32).
# 2**24: nt_xent fwd+bwd at 2N=16384, D=128 on 2 cores; see benchmarks/bench_contrastive.py.
CHUNK_ELEMENTS = 1 << 24
# Up to KEEP_ELEMENTS similarities (16 MB in float32) the forward keeps the whole score matrix for the
# backward instead of recomputing it (a matmul fewer); above, the backward holds blocks only.
KEEP_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------------
# References: the float64 formulas the ops must equal (F.cross_entropy on the materialized logits)
# ----------------------------------------------------------------------------------------------------

def _ref_prep(x: Tensor, normalize: bool, upcast: bool) -> Tensor:
    x = x.double() if upcast else x
    return F.normalize(x, dim=1) if normalize else x


def info_nce_reference(query, key, targets=None, *, temperature=0.1, normalize=True, reduction="mean",
                       upcast: bool = True) -> Tensor:
    """``F.cross_entropy(query @ key.T / temperature, targets)`` (float64 when ``upcast``)."""
    q, k = _ref_prep(query, normalize, upcast), _ref_prep(key, normalize, upcast)
    if targets is None:
        targets = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(q @ k.t() / temperature, targets, reduction=reduction)


def nt_xent_reference(z1, z2, *, temperature=0.5, normalize=True, reduction="mean", upcast: bool = True) -> Tensor:
    """SimCLR's NT-Xent on the materialized (2N, 2N) logits with the diagonal masked out."""
    z = torch.cat((_ref_prep(z1, normalize, upcast), _ref_prep(z2, normalize, upcast)))
    n = z1.shape[0]
    logits = (z @ z.t() / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.arange(n, 3 * n, device=z.device).remainder_(2 * n)  # i + N mod 2N, built on the device
    return F.cross_entropy(logits, targets, reduction=reduction)


def moco_loss_reference(query, key, queue, *, temperature=0.07, normalize=True, reduction="mean",
                        upcast: bool = True) -> Tensor:
    """MoCo's logits ``[q.k, q @ queue.T] / temperature`` with target 0 (key and queue detached)."""
    q = _ref_prep(query, normalize, upcast)
    k = _ref_prep(key.detach(), normalize, upcast)
    neg = _ref_prep(queue.detach(), normalize, upcast)
    logits = torch.cat(((q * k).sum(1, keepdim=True), q @ neg.t()), 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device), reduction=reduction)


def clip_loss_reference(image_features, text_features, logit_scale, *, normalize=True, reduction="mean",
                        upcast: bool = True) -> Tensor:
    """``(CE(s * img @ txt.T, arange) + CE(s * txt @ img.T, arange)) / 2``."""
    img, txt = _ref_prep(image_features, normalize, upcast), _ref_prep(text_features, normalize, upcast)
    if isinstance(logit_scale, Tensor) and upcast:
        logit_scale = logit_scale.double()
    logits = logit_scale * img @ txt.t()
    targets = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, targets, reduction=reduction)
            + F.cross_entropy(logits.t(), targets, reduction=reduction)) / 2


def siglip_loss_reference(image_features, text_features, logit_scale, logit_bias, *, normalize=False,
                          reduction="mean", diag_off=0, upcast: bool = True) -> Tensor:
    """SigLIP's ``-sum_j log sigmoid(z_ij (logit_scale * x_i . y_j + logit_bias))`` per image on the
    materialized logits (z = +1 at j == i + diag_off, else -1), reduced over images as open_clip does
    (mean: divided by the number of images)."""
    x, y = _ref_prep(image_features, normalize, upcast), _ref_prep(text_features, normalize, upcast)
    scale, bias = ((p.double() if isinstance(p, Tensor) and upcast else p) for p in (logit_scale, logit_bias))
    logits = scale * x @ y.t() + bias
    z = -torch.ones_like(logits)
    z.diagonal(diag_off).fill_(1.0)
    per_row = -F.logsigmoid(z * logits).sum(1)
    return {"mean": per_row.mean, "sum": per_row.sum, "none": lambda: per_row}[reduction]()


def supervised_nt_xent_reference(embeddings, labels, *, temperature=0.07, ref_embeddings=None, ref_labels=None,
                                 normalize=True, upcast: bool = True) -> Tensor:
    """pytorch-metric-learning's NTXentLoss literally: every positive pair (a, p)'s
    -log(e^s_ap / (e^s_ap + sum_{n: label_n != label_a} e^s_an)) on the materialized (N, M) similarities,
    the mean over the pairs (0 without one)."""
    x = _ref_prep(embeddings, normalize, upcast)
    r = x if ref_embeddings is None else _ref_prep(ref_embeddings, normalize, upcast)
    rl = labels if ref_labels is None else ref_labels
    s = x @ r.t() / temperature
    same = labels[:, None] == rl[None, :]
    pos = same.clone()
    if ref_embeddings is None:
        pos.fill_diagonal_(False)
    neg = torch.logsumexp(s.masked_fill(same, float("-inf")), 1, keepdim=True)
    pair = torch.logaddexp(s, neg) - s
    return torch.where(pos, pair, 0.0).sum() / pos.sum().clamp_min(1)  # no host sync


def supcon_loss_reference(features, labels, *, temperature=0.1, normalize=True, reduction="mean",
                          upcast: bool = True) -> Tensor:
    """Khosla et al.'s L_out on the materialized similarities: row i's lse_{a != i} s_ia - mean over its
    positives of s_ip; rows without a positive left out of the mean (their "none" entry is 0)."""
    if features.dim() == 3:
        features, labels = features.transpose(0, 1).reshape(-1, features.shape[-1]), labels.repeat(features.shape[1])
    x = _ref_prep(features, normalize, upcast)
    n = x.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    s = (x @ x.t() / temperature).masked_fill(eye, float("-inf"))
    pos = (labels[:, None] == labels[None, :]) & ~eye
    count = pos.sum(1)
    per_row = torch.logsumexp(s, 1) - s.masked_fill(~pos, 0).sum(1) / count.clamp_min(1)
    per_row = per_row.masked_fill(count == 0, 0)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / (count > 0).sum().clamp_min(1) if reduction == "mean" else total


# ----------------------------------------------------------------------------------------------------
# The PyTorch path: the whole score matrix kept for the backward when small, else blocks of rows recomputed
# ----------------------------------------------------------------------------------------------------

def _without_autocast(body):
    """``body`` (a PyTorch-path body) with autocast off on its first tensor's device: its matmuls run in the
    math dtype it chose, as without autocast (autocast would round them to bf16/fp16, and the bf16 blocks then
    fail to meet float32 ones in ``out=`` and ``index_put_``)."""
    @functools.wraps(body)
    def run(*args, **kwargs):
        device = next(a for a in args if isinstance(a, Tensor)).device.type
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return body(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return body(*args, **kwargs)
    return run


def _chunk_rows(m: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(m, 1))


def _keeps_scores(n: int, m: int, *tensors: Tensor) -> bool:
    """Whether an (n, m) score matrix of ``tensors`` is kept from the forward for the backward: a gradient
    to compute, n * m <= KEEP_ELEMENTS, and the PyTorch path (``use_triton``'s answer for CPU tensors under
    ``auto`` and for ``FASTSSL_BACKEND=torch``, read here so torch.compile guards on it; a kept block must
    be the path's)."""
    return torch.is_grad_enabled() and any([t.requires_grad for t in tensors]) and _small_on_torch_path(n, m, tensors[0])


def _small_on_torch_path(n: int, m: int, like: Tensor) -> bool:
    """n * m <= KEEP_ELEMENTS on the PyTorch path (``use_triton``'s answer for CPU tensors under ``auto`` and
    for ``FASTSSL_BACKEND=torch``, read here so torch.compile guards on it): one matmul may hold the scores."""
    backend = requested_backend()
    return n * m <= KEEP_ELEMENTS and (backend == "torch" or (backend == "auto" and not like.is_cuda))


def _scaled(q: Tensor, k: Tensor, scale: Tensor, kscale: Optional[Tensor]):
    """(q * scale, k) or (q, k * scale * kscale) in the math dtype: the scale folded into one operand
    (O((N + M) * D)) so the blocks need no extra pass."""
    acc = scale.dtype
    if kscale is None:
        return q.to(acc) * scale, k.to(acc)
    return q.to(acc), k.to(acc) * (scale * kscale)[:, None]


def _scores(qs: Tensor, ks: Tensor, a: int, b: int, diag_off: Optional[int]) -> Tensor:
    """Rows a:b of S = qs @ ks.T, -inf where row i meets column i + diag_off."""
    s = torch.mm(qs[a:b], ks.t())
    if diag_off is not None:
        s.diagonal(a + diag_off).fill_(float("-inf"))
    return s


def _shifted_exp(s: Tensor, dim: int, *, inplace: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(log sum exp(s) along ``dim``, e = exp(s - max) (in place of s with ``inplace``), e's sums with the
    dim kept): max-shifted as torch.logsumexp, an infinite max shifting by 0 (a row of -inf has LSE -inf)."""
    mx = s.amax(dim, keepdim=True)
    mx.masked_fill_(mx.abs() == float("inf"), 0.0)
    e = (s.sub_(mx) if inplace else torch.sub(s, mx)).exp_()
    total = e.sum(dim, keepdim=True)
    return total.log().add_(mx).squeeze(dim), e, total


def _logsumexp(s: Tensor, dim: int, *, inplace: bool) -> Tensor:
    """log sum exp(s) along ``dim`` (max-shifted); ``inplace`` overwrites s."""
    return _shifted_exp(s, dim, inplace=inplace)[0]


def _row_softmax_(s: Tensor) -> tuple[Tensor, Tensor]:
    """(row LSE of s, its row softmax P in place of s, from the LSE's own exponentials). A row without
    entries (all -inf: SupCon's batch of one) has LSE -inf and P = 0, not 0 / 0 (the max-shifted sum of
    any other row is >= 1)."""
    lse, e, total = _shifted_exp(s, 1, inplace=True)
    return lse, e.div_(total.clamp_min_(1.0))


def _empty_as_zero(lse: Tensor) -> Tensor:
    """``lse`` with the -inf of a row without entries read as 0: exp(s - lse) is then exp(-inf - 0) = 0,
    that row's softmax (its gradient), where -inf - (-inf) gave NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _lse_rows(qs: Tensor, ks: Tensor, diag_off: Optional[int]) -> Tensor:
    """The row LSE of qs @ ks.T over blocks of rows (one block-sized buffer at a time)."""
    n, step = qs.shape[0], _chunk_rows(ks.shape[0])
    if step >= n:
        return _logsumexp(_scores(qs, ks, 0, n, diag_off), 1, inplace=True)
    out = qs.new_empty(n)
    for a in range(0, n, step):
        b = min(n, a + step)
        out[a:b] = _logsumexp(_scores(qs, ks, a, b, diag_off), 1, inplace=True)
    return out


@_without_autocast
def _lse_torch(q, k, scale, kscale, diag_off, two_sided, keep):
    """(row LSE, column LSE or empty, what the backward keeps or empty when not ``keep``): with ``keep`` one
    matmul gives S, both LSEs and the backward's block: two-sided S itself, one-sided the row softmax P
    (its exponentials are the forward's: the backward's dS = g P is then one multiply, no exp pass)."""
    qs, ks = _scaled(q, k, scale, kscale)
    if keep:
        s = _scores(qs, ks, 0, q.shape[0], diag_off)
        if two_sided:
            return _logsumexp(s, 1, inplace=False), _logsumexp(s, 0, inplace=False), s
        lse, p = _row_softmax_(s)
        return lse, scale.new_empty(0), p
    cols = _lse_rows(ks, qs, _transposed(diag_off)) if two_sided else scale.new_empty(0)  # S.T = ks @ qs.T
    return _lse_rows(qs, ks, diag_off), cols, scale.new_empty(0)  # distinct empties: outputs may not alias


@_without_autocast
def _lse_backward_torch(g_r, g_c, g_pos, targets, q, k, scale, kscale, lse_r, lse_c, scores, diag_off, *, symmetric,
                        need_dq, need_dk, need_dscale):
    """dq, dk, dscale of ``sum_i g_i lse_i [+ sum_j h_j lse'_j] [+ sum_i g+_i S_i,t_i]``: with dS = g_i P_ij
    [+ h_j P'_ij] [+ g+_i at j = t_i] and c_j = kscale_j, dq = scale dS @ (c k), dk = scale c dS^T @ q,
    dscale = sum_ij dS_ij c_j q_i.k_j.
    dS comes from the kept ``scores`` (P itself for a one-sided LSE, whose ``lse_c`` is empty: :func:`_lse_torch`)
    or from blocks of rows recomputed; ``symmetric`` (k is q) returns dq + dk as dq (two matmuls, not
    (dS + dS^T) @ q: the transposed add costs more than a matmul)."""
    acc = scale.dtype
    n, m = q.shape[0], k.shape[0]
    keep = scores.numel() > 0
    kept_softmax = keep and lse_c.numel() == 0
    qa, ka = q.to(acc), k.to(acc)
    kc = ka if kscale is None else ka * kscale[:, None]
    if not kept_softmax:
        lse_r, lse_c = _empty_as_zero(lse_r), _empty_as_zero(lse_c)
    if not keep:
        qs, ks = _scaled(q, k, scale, kscale)
    want_dk = need_dk or symmetric

    def block_ds(a, b):
        if kept_softmax:
            ds = torch.mul(scores, g_r[:, None])
            if g_pos is not None:
                ds.index_put_((torch.arange(n, device=ds.device), targets), g_pos, accumulate=True)
            return ds
        s = scores if keep else _scores(qs, ks, a, b, diag_off)
        ds = None
        if g_c is not None:  # col before rows: the row term may overwrite s
            ds = torch.sub(s, lse_c[None, :]).exp_().mul_(g_c[None, :])
        if g_r is not None:
            row = (torch.sub(s, lse_r[a:b, None]) if keep else s.sub_(lse_r[a:b, None])).exp_().mul_(g_r[a:b, None])
            ds = row if ds is None else ds.add_(row)
        if g_pos is not None:  # the positives, where dS is still in the math dtype
            ds.index_put_((torch.arange(b - a, device=ds.device), targets[a:b]), g_pos[a:b], accumulate=True)
        return ds

    # dq: the unscaled sum_j dS_ij c_j k_j (with symmetric in one block, dq + dk at once); dk likewise
    step = n if keep else _chunk_rows(m)
    if step >= n:  # one block: no accumulators
        ds = block_ds(0, n)
        dq = torch.mm(ds, kc)
        merged = symmetric
        dk = None if not want_dk else dq.addmm_(ds.t(), qa) if merged else torch.mm(ds.t(), qa)
    else:
        merged = False
        dq = torch.empty(n, q.shape[1], dtype=acc, device=q.device)
        dk = torch.zeros(m, k.shape[1], dtype=acc, device=q.device) if want_dk else None
        for a in range(0, n, step):
            b = min(n, a + step)
            ds = block_ds(a, b)
            torch.mm(ds, kc, out=dq[a:b])
            if want_dk:
                dk.addmm_(ds.t(), qa[a:b])
    # sum_ij dS_ij c_j (q_i . k_j) = sum_i q_i . dq_i (before the scale): no block-sized pass; merged, dq
    # holds the dk side's equal term too
    dscale = ((qa * dq).sum() * (0.5 if merged else 1.0)).reshape(1) if need_dscale else q.new_empty(0, dtype=acc)
    dq.mul_(scale)
    if dk is not None and not merged:
        dk.mul_(scale if kscale is None else scale * kscale[:, None])
        if symmetric:
            dq.add_(dk)
    out_q = dq if need_dq else q.new_empty(0, dtype=acc)
    out_k = dk if (need_dk and not symmetric) else k.new_empty(0, dtype=acc)
    return out_q, out_k, dscale


# ----------------------------------------------------------------------------------------------------
# The custom ops
# ----------------------------------------------------------------------------------------------------

def _transposed(diag_off: Optional[int]) -> Optional[int]:
    """The excluded diagonal seen from the keys' side: column j leaves out row j - diag_off."""
    return None if diag_off is None else -diag_off


def diagonal_columns(rows: Tensor, rbase: int, period: int, shift: int, cbase: int) -> Tensor:
    """Positives on a shifted diagonal: cbase + (r - rbase + shift) mod period for the rows r in
    [rbase, rbase + period) (the kernels' ``_positive_cols``, whose launcher uses this for the exact kernels)."""
    return (rows - rbase + shift).remainder_(period).add_(cbase)


def _positive_columns(n: int, offset: int, shift: int, device) -> Tensor:
    """The positives' columns t_i = offset + (i + shift) mod n of n rows (:func:`diagonal_columns`),
    distinct; an involution when 2 shift = n (NT-Xent's i +- N)."""
    return diagonal_columns(torch.arange(n, device=device), 0, n, shift, offset)


def _label_bounds(ordered: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each label's first place and one past its last in the sorted labels ``ordered`` (two binary
    searches: no host sync, no (N, M) mask)."""
    return torch.searchsorted(ordered, labels), torch.searchsorted(ordered, labels, right=True)


def _sums_by_label(x: Tensor, labels: Tensor, at: Tensor, acc: torch.dtype) -> Tensor:
    """sum_{j: labels_j = at_i} x_j for each i, in the math dtype ``acc``: from x sorted by label, a float64
    running sum differenced at each label's bounds (O(len * D); no host sync, no atomics)."""
    order = torch.argsort(labels, stable=True)
    start, end = _label_bounds(labels.index_select(0, order), at)
    running = F.pad(torch.cumsum(x.to(torch.float64).index_select(0, order), 0), (0, 0, 1, 0))
    return (running.index_select(0, end) - running.index_select(0, start)).to(acc)


def _excluded_mates(rows: Tensor, cols: Optional[Tensor], m: int, diag_off: Optional[int],
                    acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(rows i, columns i + diag_off, 1 where their labels match else 0, (n, 1) in ``acc``) of the excluded
    entries (``cols`` None: a column's label is its index), which the labelled positives leave out
    (:func:`_mate_sums`). A 0/1 weight, not a boolean index: that would synchronize with the host on CUDA."""
    i = torch.arange(rows.shape[0], device=rows.device)
    if diag_off is not None:
        i = i[max(0, -diag_off):max(0, min(rows.shape[0], m - diag_off))]
    else:
        i = i[:0]
    j = i + (diag_off or 0)
    label = j if cols is None else cols.index_select(0, j)
    return i, j, (rows.index_select(0, i) == label).to(acc)[:, None]


def _mate_sums(x: Tensor, rows: Tensor, cols: Optional[Tensor], diag_off: Optional[int], acc: torch.dtype) -> Tensor:
    """sum_{j in M(i)} x_j for each row i, M(i) = {j != i + diag_off: cols_j = rows_i} (``cols`` None: j =
    rows_i): the labelled positives' keys (InfoNCE's explicit targets, SupCon's label-mates)."""
    if cols is None:
        sums = x.index_select(0, rows).to(acc)
    else:
        sums = _sums_by_label(x, cols, rows, acc)
    i, j, same = _excluded_mates(rows, cols, x.shape[0], diag_off, acc)
    return sums.index_add_(0, i, x.index_select(0, j).to(acc) * same, alpha=-1)


def _add_mates_(dq: Optional[Tensor], dk: Optional[Tensor], q: Tensor, k: Tensor, scale: Tensor, w: Tensor,
                rows: Tensor, cols: Optional[Tensor], diag_off: Optional[int], symmetric: bool) -> Tensor:
    """The labelled positives' gradients added after the LSE's, in the math dtype (the PyTorch path and the
    exact kernels, whose dS is never rounded): with weights w_i (their gradient times their weight),
    dq_i += scale w_i sum_{j in M(i)} k_j and dk_j += scale sum_{i: j in M(i)} w_i q_i (to dq when
    ``symmetric``); None: not wanted. Returns their scale gradient sum_i w_i q_i . sum_{j in M(i)} k_j."""
    acc = scale.dtype
    mates = _mate_sums(k, rows, cols, diag_off, acc)
    if dq is not None:
        dq.addcmul_(scale * w[:, None], mates)
    if dk is not None or (symmetric and dq is not None):
        wq = w[:, None] * q.to(acc)
        at = torch.arange(k.shape[0], device=k.device) if cols is None else cols
        back = _sums_by_label(wq, rows, at, acc)
        i, j, same = _excluded_mates(rows, cols, k.shape[0], diag_off, acc)
        back.index_add_(0, j, wq.index_select(0, i) * same, alpha=-1)
        (dq if symmetric else dk).add_(back.mul_(scale))
    return (w * (q.to(acc) * mates).sum(1)).sum()


def _lse_impl(q: Tensor, k: Tensor, scale: Tensor, kscale: Optional[Tensor], diag_off: Optional[int],
              two_sided: bool, symmetric: bool, keep: bool, pos_offset: int, pos_shift: int,
              mate_rows: Optional[Tensor], mate_cols: Optional[Tensor], mate_weight: Optional[Tensor], q_grad: Tensor,
              k_grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row LSE (N,), column LSE (M,) or empty, what the backward needs, the positives S_i,t_i (N,) or
    empty) in the math dtype: the scores (N, M) when ``keep`` (see :func:`_keeps_scores`: the PyTorch path),
    the kernels' (max, log-sum) pairs of the rows then the columns ((N + M, 2) or (N, 2), ``lse_forward``)
    on the Triton path, else empty. ``pos_offset`` >= 0 names each row's positive, t_i = pos_offset +
    (i + pos_shift) mod N (:func:`_positive_columns`), whose gradient the backward puts into dS itself.
    Labelled positives instead (``mate_rows`` not None: InfoNCE's explicit targets, SupCon's label-mates):
    row i's are M(i) = {j != i + diag_off: mate_cols_j = mate_rows_i} (``mate_cols`` None: j = mate_rows_i),
    its output mate_weight_i sum_{j in M(i)} S_ij, their gradient in dS too.
    The math reads ``q`` and ``k``; the gradients go to ``q_grad`` and ``k_grad`` (:func:`_lse`)."""
    pos = scale.new_empty(0)
    if mate_rows is not None:
        pos = mate_weight * _positive(q, _mate_sums(k, mate_rows, mate_cols, diag_off, scale.dtype), scale)
    elif pos_offset >= 0:
        t = _positive_columns(q.shape[0], pos_offset, pos_shift, q.device)
        ks = k.index_select(0, t)
        pos = _positive(q, ks if kscale is None else ks * kscale.index_select(0, t)[:, None], scale)
    if not keep and use_triton(q, k, scale):
        from .kernels.contrastive import lse_forward

        rows, split = lse_forward(q, k, scale, kscale=kscale, diag_off=diag_off)
        if not two_sided:
            return rows, scale.new_empty(0), split, pos
        cols, cols_split = lse_forward(k, q, scale, kscale=None, diag_off=_transposed(diag_off))
        return rows, cols, torch.cat((split, cols_split)), pos
    return *_lse_torch(q, k, scale, kscale, diag_off, two_sided, keep), pos


_lse_op = torch.library.custom_op("fastssl::contrastive_lse", _lse_impl, mutates_args=())


@_lse_op.register_fake
def _(q, k, scale, kscale, diag_off, two_sided, symmetric, keep, pos_offset, pos_shift, mate_rows, mate_cols,
      mate_weight, q_grad, k_grad):
    n, m = q.shape[0], k.shape[0]
    saved = (n, m) if keep else (n + (m if two_sided else 0), 2) if use_triton(q, k, scale) else (0,)
    positives = pos_offset >= 0 or mate_rows is not None
    return (q.new_empty(n, dtype=scale.dtype), q.new_empty(m if two_sided else 0, dtype=scale.dtype),
            q.new_empty(saved, dtype=scale.dtype), q.new_empty(n if positives else 0, dtype=scale.dtype))


def _lse_backward_impl(g_r: Optional[Tensor], g_c: Optional[Tensor], g_pos: Optional[Tensor], pos_offset: int,
                       pos_shift: int, mate_rows: Optional[Tensor], mate_cols: Optional[Tensor],
                       mate_weight: Optional[Tensor], q: Tensor, k: Tensor, scale: Tensor, kscale: Optional[Tensor],
                       lse_r: Tensor, lse_c: Tensor, saved: Tensor, diag_off: Optional[int], symmetric: bool,
                       need_dq: bool, need_dk: bool, need_dscale: bool, keep: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq or empty, dk or empty, dscale (1,) or empty) in the math dtype; ``symmetric``: dq is the whole
    gradient; ``saved`` is the forward's third output: kept scores (``keep``) take the PyTorch path, the
    (max, log-sum) pairs the kernels; ``g_pos`` (or None) the positives' gradient (:func:`_lse_impl`): on
    the diagonal, or labelled (``mate_rows``), where the kernels that round dS take them inside and the
    others add them after (:func:`_add_mates_`)."""
    n = q.shape[0]
    triton_path = not keep and use_triton(q, k, scale)
    w_mates = None if (g_pos is None or mate_rows is None) else g_pos * mate_weight
    if w_mates is not None:
        g_pos = None  # not on the diagonal
        if not (triton_path and _mates_in_kernel(q, kscale)):
            dq, dk, dscale = _lse_backward_impl(g_r, g_c, None, -1, 0, None, None, None, q, k, scale, kscale,
                                                lse_r, lse_c, saved, diag_off, symmetric, need_dq, need_dk,
                                                need_dscale, keep)
            part = _add_mates_(dq if need_dq else None, dk if (need_dk and not symmetric) else None, q, k, scale,
                               w_mates, mate_rows, mate_cols, diag_off, symmetric)
            return dq, dk, (dscale + part.reshape(1) if need_dscale else dscale)
    targets = None if g_pos is None else _positive_columns(n, pos_offset, pos_shift, q.device)
    if not triton_path:
        return _lse_backward_torch(g_r, g_c, g_pos, targets, q, k, scale, kscale, lse_r, lse_c,
                                   saved if keep else saved[:0], diag_off, symmetric=symmetric, need_dq=need_dq,
                                   need_dk=need_dk, need_dscale=need_dscale)

    from .kernels.contrastive import lse_backward_rows

    acc = scale.dtype
    lse_r, lse_c = saved[:q.shape[0]], saved[q.shape[0]:]  # the rows' and columns' pairs
    dq, dk, dscale = scale.new_empty(0), scale.new_empty(0), scale.new_empty(0)
    row_pos = col_pos = row_mates = col_mates = None
    if w_mates is not None:  # labels compared in every tile; the keys' launch sees the rows' from its side
        lr = mate_rows.to(torch.int32)
        lc = (torch.arange(k.shape[0], dtype=torch.int32, device=k.device) if mate_cols is None
              else mate_cols.to(torch.int32))
        none = w_mates.new_zeros(k.shape[0])
        row_mates = (lr, lc, w_mates, w_mates if symmetric else none)
        col_mates = (lc, lr, none, w_mates)
    if g_pos is not None:  # the rows' positives, and the keys' (the inverse map: key t_i's positive is row i)
        row_pos = (g_pos + g_pos.index_select(0, targets) if symmetric else g_pos, 0, n, pos_shift, pos_offset)
        if need_dk and not symmetric:
            col_pos = (g_pos.new_zeros(k.shape[0]).index_copy_(0, targets, g_pos), pos_offset, n,
                       (n - pos_shift) % n, 0)
    if symmetric:  # S is symmetric: dZ_i = scale sum_j (g_i P_ij + g_j P_ji) z_j, one row-parallel pass
        if need_dq:  # (the positives pair rows: t_t_i = i, so (i, t_i) and (t_i, i) meet in row i's weight)
            dq, _ = lse_backward_rows(q, k, scale, lse_r, g_r, lse_r, g_r, kscale=None, diag_off=diag_off,
                                      positives=row_pos, labels=row_mates, need_dscale=False)
        return dq, dk, dscale
    rows_lse, rows_g = (lse_r, g_r) if g_r is not None else (None, None)
    cols_lse, cols_g = (lse_c, g_c) if g_c is not None else (None, None)
    if need_dq or need_dscale:
        dq, partial = lse_backward_rows(q, k, scale, rows_lse, rows_g, cols_lse, cols_g, kscale=kscale,
                                        diag_off=diag_off, positives=row_pos, labels=row_mates,
                                        need_dscale=need_dscale)
        if need_dscale:
            dscale = partial.reshape(1).to(acc)
        if not need_dq:
            dq = scale.new_empty(0)
    if need_dk:  # the same kernel with the roles of q and k swapped: column-parallel
        dk, _ = lse_backward_rows(k, q, scale, cols_lse, cols_g, rows_lse, rows_g, kscale=None,
                                  diag_off=_transposed(diag_off), positives=col_pos, labels=col_mates,
                                  need_dscale=False)
    return dq, dk, dscale


_lse_backward_op = torch.library.custom_op("fastssl::contrastive_lse_backward", _lse_backward_impl, mutates_args=())


@_lse_backward_op.register_fake
def _(g_r, g_c, g_pos, pos_offset, pos_shift, mate_rows, mate_cols, mate_weight, q, k, scale, kscale, lse_r, lse_c,
      saved, diag_off, symmetric, need_dq, need_dk, need_dscale, keep):
    return (q.new_empty(q.shape if need_dq else (0,), dtype=scale.dtype),
            k.new_empty(k.shape if (need_dk and not symmetric) else (0,), dtype=scale.dtype),
            scale.new_empty(1 if need_dscale else 0))


def _lse_setup(ctx, inputs, output):
    (q, k, scale, kscale, diag_off, two_sided, symmetric, keep, pos_offset, pos_shift, mate_rows, mate_cols,
     mate_weight, q_grad, k_grad) = inputs
    ctx.diag_off, ctx.symmetric, ctx.two_sided, ctx.keep = diag_off, symmetric, two_sided, keep
    ctx.positives = (pos_offset, pos_shift)
    ctx.has_positives = pos_offset >= 0 or mate_rows is not None
    ctx.needs = (q_grad.requires_grad or (symmetric and k_grad.requires_grad),
                 k_grad.requires_grad and not symmetric, scale.requires_grad)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros of its shape
    ctx.save_for_backward(q, k, scale, kscale, *output[:3], mate_rows, mate_cols, mate_weight)


@first_order("fastssl's contrastive LSE (info_nce, nt_xent, moco_loss, clip_loss, supcon_loss)")
def _lse_backward(ctx, g_rows, g_cols, g_scores, g_positives, backward_op=_lse_backward_op):
    """The scores are an implementation detail (no gradient flows through them)."""
    q, k, scale, kscale, lse_r, lse_c, saved, mate_rows, mate_cols, mate_weight = ctx.saved_tensors
    need_dq, need_dk, need_dscale = ctx.needs
    acc = scale.dtype
    g_r = None if g_rows is None else g_rows.to(acc).contiguous()
    g_c = None if (g_cols is None or not ctx.two_sided) else g_cols.to(acc).contiguous()
    g_pos = None if (g_positives is None or not ctx.has_positives) else g_positives.to(acc).contiguous()
    if not (need_dq or need_dk or need_dscale) or (g_r is None and g_c is None and g_pos is None):
        return (None,) * 15
    if g_r is None:  # only the column LSE or the positives were used: the row term is zero
        g_r = torch.zeros_like(lse_r)
    dq, dk, dscale = backward_op(g_r, g_c, g_pos, *ctx.positives, mate_rows, mate_cols, mate_weight, q, k, scale,
                                 kscale, lse_r, lse_c, saved, ctx.diag_off, symmetric=ctx.symmetric, need_dq=need_dq,
                                 need_dk=need_dk, need_dscale=need_dscale, keep=ctx.keep)
    return (None, None, dscale if need_dscale else None, *(None,) * 10, dq if need_dq else None,
            dk if (need_dk and not ctx.symmetric) else None)


def _in_math_dtype(x: Tensor, acc: torch.dtype) -> Tensor:
    """``x`` where its gradients meet: an autograd cast to the math dtype for a bf16/fp16 ``x`` that needs
    a gradient (its backward rounds their sum to x's dtype once), else ``x``."""
    return x.to(acc) if x.requires_grad and x.dtype != acc else x


def _lse(q: Tensor, k: Tensor, scale: Tensor, *, kscale: Optional[Tensor] = None, diag_off: Optional[int] = None,
         two_sided: bool = False, symmetric: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row LSE, column LSE or empty, q and k where their gradients meet) of the op, keeping the scores for
    the backward where it pays. A loss takes its positives from the last two: near convergence the LSE's
    gradient and the positive's (each ~|k| / T) nearly cancel, so they are summed in the math dtype and
    rounded to the features' dtype once (autograd adds an input's gradients in its own dtype: rounded
    first, a bf16 query's gradient was off by more than its size at a loss of 1e-3). Positives at one
    column a row: :func:`_lse_and_positives`."""
    q_grad = _in_math_dtype(q, scale.dtype)
    k_grad = q_grad if k is q else _in_math_dtype(k, scale.dtype)
    rows, cols, _ = _call_lse(q, k, scale, kscale, diag_off, two_sided, symmetric, (-1, 0, None, None, None), q_grad,
                              k_grad)
    return rows, cols, q_grad, k_grad


def _lse_and_positives(q: Tensor, k: Tensor, scale: Tensor, offset: int, *, shift: int = 0,
                       diag_off: Optional[int] = None, two_sided: bool = False,
                       symmetric: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(row LSE, column LSE or empty, the positives S_i,t_i) of the op with t_i = offset + (i + shift) mod N
    (:func:`_positive_columns`; 2 shift = N when ``symmetric``), the positives' gradient formed with the
    LSE's inside dS (in the kernels, before dS is rounded to bf16/fp16 for the tensor-core product: near
    convergence g P_ii - g is small, and P_ii rounded first is off by more than it)."""
    return _call_lse(q, k, scale, None, diag_off, two_sided, symmetric, (offset, shift, None, None, None), q,
                     q if k is q else k)


def _lse_and_mates(q: Tensor, k: Tensor, scale: Tensor, rows: Tensor, cols: Optional[Tensor], weight: Tensor, *,
                   diag_off: Optional[int] = None, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """(row LSE, weight_i sum_{j in M(i)} S_ij) of the op with labelled positives M(i) = {j != i + diag_off:
    cols_j = rows_i} (``cols`` None: the column rows_i; labels >= 0, int64): InfoNCE's explicit targets,
    SupCon's label-mates. Their gradient meets the LSE's inside dS as the diagonal positives' do
    (:func:`_lse_and_positives`), compared in every tile."""
    lse, _, pos = _call_lse(q, k, scale, None, diag_off, False, symmetric, (-1, 0, rows, cols, weight), q,
                            q if k is q else k)
    return lse, pos


def _mates_in_kernel(q: Tensor, kscale: Optional[Tensor]) -> bool:
    """Whether the LSE kernels' backward for ``q`` takes labelled positives inside dS (where it rounds dS)."""
    from .kernels.contrastive import _positives_in_kernel
    from .kernels.registry import dot_precision

    return _positives_in_kernel(q.dtype, dot_precision(q.dtype), kscale is not None)


def _call_lse(q, k, scale, kscale, diag_off, two_sided, symmetric, positives, q_grad, k_grad):
    """The op's outputs but the backward's saved tensor, the scores kept for the backward where it pays."""
    op = _lse_op if torch.compiler.is_compiling() else _LseFunction.apply
    keep = _keeps_scores(q.shape[0], k.shape[0], q, k, scale)
    q_math = q.detach()
    k_math = q_math if k is q else k.detach()
    rows, cols, _, pos = op(q_math, k_math, scale, kscale, diag_off, two_sided, symmetric, keep, *positives, q_grad,
                            k_grad)
    return rows, cols, pos


_lse_op.register_autograd(_lse_backward, setup_context=_lse_setup)


class _LseFunction(torch.autograd.Function):
    """Eager mode's way into the op: the same bodies, setup and backward without the custom ops' dispatch
    (~100 us a training step, more than the margin of a small one over eager PyTorch); torch.compile
    traces the custom op."""

    forward = staticmethod(_lse_impl)
    setup_context = staticmethod(_lse_setup)

    @staticmethod
    def backward(ctx, *grads):
        return _lse_backward(ctx, *grads, backward_op=_lse_backward_impl)


class _KeptNTXent(torch.autograd.Function):
    """NT-Xent's per-row losses on the kept path in eager mode as one autograd node (small batches on
    the PyTorch path, where the graph of normalize, cat, the op and the positives costs more than the
    math): u = z / max(||z||, eps), S = scale u u^T (its row softmax kept), loss_i = lse_i - S_{i,p(i)} with
    p(i) = i +- N.
    Backward by hand: dU = scale (dS + dS^T) U - scale (g_i + g_p(i)) u_p(i) (the op's kept-score
    backward, then the positives), dz = (dU - u (u . dU)) / ||z|| (only dU / eps where the norm was
    clamped)."""

    @staticmethod
    @_without_autocast
    def forward(ctx, z1: Tensor, z2: Tensor, scale: Tensor, normalize: bool) -> Tensor:
        n = z1.shape[0]
        u = torch.cat((z1, z2)).to(scale.dtype)
        norm = unclamped = None
        if normalize:
            unclamped = torch.linalg.vector_norm(u, dim=1, keepdim=True)
            norm = unclamped.clamp_min(1e-12)
            u = u / norm
        qs, _ = _scaled(u, u, scale, None)
        s = _scores(qs, u, 0, 2 * n, 0)
        pos = torch.cat((s.diagonal(n), s.diagonal(-n)))  # read before S becomes its softmax
        lse, p = _row_softmax_(s)
        ctx.dtype = z1.dtype
        ctx.save_for_backward(u, norm, unclamped, scale, lse, p)
        return lse - pos

    @staticmethod
    @first_order("fastssl.nt_xent")
    @_without_autocast
    def backward(ctx, g: Tensor):
        u, norm, unclamped, scale, lse, p = ctx.saved_tensors
        n = u.shape[0] // 2
        g = g.to(scale.dtype).contiguous()
        du, _, _ = _lse_backward_torch(g, None, None, None, u, u, scale, None, lse, lse.new_empty(0), p, 0,
                                       symmetric=True, need_dq=True, need_dk=False, need_dscale=False)
        gp = ((g[:n] + g[n:]) * scale)[:, None]
        du[:n].addcmul_(gp, u[n:], value=-1)
        du[n:].addcmul_(gp, u[:n], value=-1)
        if norm is not None:
            radial = (u * du).sum(1, keepdim=True).mul_(unclamped >= 1e-12)
            du = du.sub_(u * radial).div_(norm)
        return du[:n].to(ctx.dtype), du[n:].to(ctx.dtype), None, None


# ----------------------------------------------------------------------------------------------------
# Validation and helpers
# ----------------------------------------------------------------------------------------------------

def _check_features(names, tensors, *, dim_name="D"):
    for name, t in zip(names, tensors):
        check_float(name, t)
        check_ndim(name, t, 2, f"(batch, {dim_name})")
    check_same(names, tensors)
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape[1] != tensors[0].shape[1]:
            raise ValueError(f"{name} has feature size {t.shape[1]} but {names[0]} has {tensors[0].shape[1]} "
                             f"(shapes {tuple(t.shape)} and {tuple(tensors[0].shape)}); they must match")
    for name, t in zip(names, tensors):
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); the loss needs at least one row")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has no features (shape {tuple(t.shape)}); expected D >= 1")


def _check_views(z1: Tensor, z2: Tensor) -> None:
    """nt_xent's two views: float (N, D) each, one shape."""
    _check_features(("z1", "z2"), (z1, z2))
    if z1.shape != z2.shape:
        raise ValueError(f"z2 has shape {tuple(z2.shape)} but z1 has {tuple(z1.shape)}; they must match")


def _check_moco(query: Tensor, key: Tensor, queue: Tensor) -> None:
    _check_features(("query", "key", "queue"), (query, key, queue))
    if key.shape != query.shape:
        raise ValueError(f"key has shape {tuple(key.shape)} but query has {tuple(query.shape)}; they must match")


def _check_pairs(image_features: Tensor, text_features: Tensor) -> None:
    """CLIP's and SigLIP's paired features: float (N, D) each, one shape."""
    _check_features(("image_features", "text_features"), (image_features, text_features))
    if image_features.shape != text_features.shape:
        raise ValueError(f"text_features has shape {tuple(text_features.shape)} but image_features has "
                         f"{tuple(image_features.shape)}; they must match")


def _scalar(name: str, value, like: Tensor, *, positive: bool) -> Tensor:
    """A logit scale or bias as the ops' (1,) tensor in the math dtype: a Python number (> 0 where
    ``positive``), or a 0-dim tensor in ``like``'s dtype or float32 on its device, read on the device (no
    host sync) and differentiable."""
    acc = accumulation_dtype(like.dtype)
    if isinstance(value, Tensor):
        check_float(name, value)
        if value.dtype not in (like.dtype, torch.float32):
            raise TypeError(f"{name} has dtype {value.dtype} but the features have {like.dtype}; it must match "
                            "them or be float32")
        check_same(("image_features", name), (like, value), dtype=False)
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape {tuple(value.shape)}")
        return value.to(acc).reshape(1)
    check = check_positive if positive else check_number
    return torch.full((1,), check(name, value, accepted="a float or a 0-dim tensor"), dtype=acc, device=like.device)


def _check_options(normalize, reduction, gather_distributed=False):
    check_bool("normalize", normalize)
    check_choice("reduction", reduction, REDUCTIONS)
    check_bool("gather_distributed", gather_distributed)


def _scale_from_temperature(temperature, like: Tensor) -> Tensor:
    t = check_positive("temperature", temperature)
    return torch.full((1,), 1.0 / t, dtype=accumulation_dtype(like.dtype), device=like.device)


def _normalized(x: Tensor, normalize: bool) -> Tensor:
    return F.normalize(x, dim=1) if normalize else x


def _softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) without F.softplus's linear cut-off (exact to the rounding at every x, NaN in NaN out)."""
    return torch.logaddexp(x, x.new_zeros(()))


def _positive(q: Tensor, k: Tensor, scale: Tensor) -> Tensor:
    """The positives' logits ``scale * q_i . k_i``, the scale folded into q first as the PyTorch path folds
    it into its scores (``_scaled``), so a positive agrees with its entry of the LSE to the rounding."""
    acc = scale.dtype
    return ((q.to(acc) * scale) * k.to(acc)).sum(1)


def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def _gathers(gather_distributed: bool) -> bool:
    """Whether ``gather_distributed=True`` gathers: with an initialized process group of more than one
    rank. Without one (or at world size 1) the loss is the single-process loss, as in lightly: code written
    for DDP runs unchanged on one device (API.md)."""
    from . import distributed

    return gather_distributed and distributed.world_size() > 1


def _gather(x: Tensor):
    """(all-gathered x with gradient, this rank): open_clip's gather_with_grad convention."""
    from . import distributed

    return distributed.all_gather_with_grad(x), distributed.rank()


# ----------------------------------------------------------------------------------------------------
# The public losses
# ----------------------------------------------------------------------------------------------------

def info_nce(query: Tensor, key: Tensor, targets: Optional[Tensor] = None, *, temperature: float = 0.1,
             normalize: bool = True, reduction: str = "mean", gather_distributed: bool = False) -> Tensor:
    """InfoNCE (van den Oord et al. 2018, "CPC"): cross-entropy of each query against all keys,
    ``F.cross_entropy(query @ key.T / temperature, targets)`` without the (N, M) logits in memory.

    Args:
        query: (N, D) float32, float16, bfloat16 or float64.
        key: (M, D), same dtype and device.
        targets: LongTensor (N,): the column of each row's positive; default ``arange(N)`` (needs M >= N).
            Values are range-checked on CPU only (on CUDA a check would synchronize with the host), and
            not inside torch.compile (a data-dependent branch).
        temperature: a Python float > 0; logits are divided by it.
        normalize: L2-normalize the rows of ``query`` and ``key`` first (cosine similarity).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per row, shape (N,)).
        gather_distributed: all-gather ``key`` over the initialized process group (with gradient); each
            rank scores its own queries against all keys, ``targets`` index this rank's keys and are
            offset by ``rank * M``; the loss is the mean over this rank's rows. Without a process group of
            more than one rank it is the single-process loss (code written for DDP runs on one device).

    Returns:
        A float32 scalar (float64 for float64 inputs), or (N,) for ``reduction="none"``.

    Raises:
        TypeError: non-tensor or integer features, mixed dtypes, non-long targets, a non-float temperature.
        ValueError: not 2-D, feature sizes or devices that differ, an empty batch, temperature <= 0,
            targets of the wrong shape or (on CPU) out of range, M < N with default targets, an unknown
            reduction.

    >>> import torch, fastssl
    >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(fastssl.info_nce(q, q, temperature=1.0).item(), 4)  # log(1 + e^-1) on each row
    0.3133
    """
    _check_features(("query", "key"), (query, key))
    _check_options(normalize, reduction, gather_distributed)
    n, m = query.shape[0], key.shape[0]
    if targets is None:
        if m < n:
            raise ValueError(f"default targets arange(N) need key to have at least N={n} rows, got key shape "
                             f"{tuple(key.shape)}; pass targets")
    else:
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a LongTensor of shape ({n},), got {type(targets).__name__}")
        if targets.dtype != torch.long:
            raise TypeError(f"targets must be a LongTensor (torch.int64), got {targets.dtype}")
        if targets.shape != (n,):
            raise ValueError(f"targets must have shape ({n},) (one positive column per query row), "
                             f"got {tuple(targets.shape)}")
        if targets.device != query.device:
            raise ValueError(f"targets is on {targets.device} but query is on {query.device}; move them to one device")
        if (targets.device.type == "cpu" and not torch.compiler.is_compiling()
                and bool(((targets < 0) | (targets >= m)).any())):
            raise ValueError(f"targets must be in [0, {m}) (key has {m} rows), got values in "
                             f"[{int(targets.min())}, {int(targets.max())}]")
    scale = _scale_from_temperature(temperature, query)
    q, k = _normalized(query, normalize), _normalized(key, normalize)
    offset = 0
    if _gathers(gather_distributed):
        k, rank = _gather(k)
        offset = rank * m
    if targets is None:  # the diagonal: the positives join the op's dS
        lse, _, pos = _lse_and_positives(q, k, scale, offset)
    else:  # any columns (repeats too): compared in every tile
        lse, pos = _lse_and_mates(q, k, scale, targets + offset, None, scale.new_ones(n))
    return _reduce(lse - pos, reduction)


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: float = 0.5, normalize: bool = True, reduction: str = "mean",
            gather_distributed: bool = False) -> Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020): Z = cat(z1, z2), logits = Z @ Z.T / temperature with the
    diagonal left out of every softmax, the positive of row i is row i + N (and of i + N, i); the mean over
    all 2N rows. Equals lightly's ``NTXentLoss(temperature)(z1, z2)`` and pytorch-metric-learning's
    ``NTXentLoss(temperature)`` with labels ``arange(N)`` repeated. The (2N, 2N) matrix is never stored;
    the gradient comes from one pass (S is symmetric).

    Args:
        z1: (N, D) projections of the first views; float32, float16, bfloat16 or float64.
        z2: (N, D) the second views, same dtype and device.
        temperature: a Python float > 0.
        normalize: L2-normalize the rows first (cosine similarity, as in SimCLR).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per row, shape (2N,): z1's rows then z2's).
        gather_distributed: all-gather both views over the initialized process group (with gradient);
            each rank's rows are scored against all 2N * world_size rows; the mean over this rank's rows.
            Without a process group of more than one rank it is the single-process loss (lightly's meaning).

    Returns:
        A float32 scalar (float64 for float64 inputs), or (2N,) for ``reduction="none"``.

    Raises:
        TypeError: non-tensor or integer features, mixed dtypes, a non-float temperature.
        ValueError: not 2-D, shapes or devices that differ, an empty batch, temperature <= 0, an unknown
            reduction.

    >>> import torch, fastssl
    >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(fastssl.nt_xent(z, z, temperature=1.0).item(), 4)  # log(e + 2) - 1 on each row
    0.5514
    """
    _check_views(z1, z2)
    _check_options(normalize, reduction, gather_distributed)
    return _nt_xent(z1, z2, _scale_from_temperature(temperature, z1), normalize, reduction,
                    _gathers(gather_distributed))


def _nt_xent(z1: Tensor, z2: Tensor, scale: Tensor, normalize: bool, reduction: str, gather: bool) -> Tensor:
    """nt_xent on validated inputs with the multiplier ``scale`` (1,) (``NTXentLoss`` takes lightly's
    negative temperatures through it)."""
    rows = 2 * z1.shape[0]
    if not (gather or torch.compiler.is_compiling()) and _small_on_torch_path(rows, rows, z1):
        # one matmul: the positives are read from the same scores as the LSE (a row whose only other entry
        # is its positive gives exactly 0, as lightly's cross-entropy does); kept for the backward if needed
        return _reduce(_KeptNTXent.apply(z1, z2, scale, normalize), reduction)
    z = torch.cat((_normalized(z1, normalize), _normalized(z2, normalize)))
    n = z1.shape[0]  # row i's positive: i + N mod 2N (z1's row i pairs z2's row i)
    if gather:
        # Keys: every rank's cat(z1, z2) block in rank order (a permutation of the global batch, which
        # leaves each row's softmax unchanged); this rank's rows sit at rank * 2N, so its own column is
        # row + rank * 2N.
        keys, rank = _gather(z)
        lse, _, pos = _lse_and_positives(z, keys, scale, rank * rows, shift=n, diag_off=rank * rows)
    else:
        lse, _, pos = _lse_and_positives(z, z, scale, 0, shift=n, diag_off=0, symmetric=True)
    return _reduce(lse - pos, reduction)


def moco_loss(query: Tensor, key: Tensor, queue: Tensor, *, temperature: float = 0.07, normalize: bool = True,
              reduction: str = "mean") -> Tensor:
    """MoCo's InfoNCE (He et al. 2020): logits_i = [q_i . k_i, q_i . queue_1..K] / temperature, target 0.
    The queue is streamed as negative key tiles (never copied; with ``normalize=True`` its rows are
    normalized on the fly); no gradient flows into ``key`` or ``queue`` (they come from the momentum
    encoder).

    Args:
        query: (N, D) float32, float16, bfloat16 or float64.
        key: (N, D) the positives, same dtype and device.
        queue: (K, D) the negatives, same dtype and device.
        temperature: a Python float > 0.
        normalize: L2-normalize query, key and queue rows first.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per row, shape (N,)).

    Returns:
        A float32 scalar (float64 for float64 inputs), or (N,) for ``reduction="none"``.

    Raises:
        TypeError: non-tensor or integer inputs, mixed dtypes, a non-float temperature.
        ValueError: not 2-D, sizes or devices that differ, an empty batch or queue, temperature <= 0, an
            unknown reduction.

    >>> import torch, fastssl
    >>> q = torch.tensor([[1.0, 0.0]])
    >>> round(fastssl.moco_loss(q, q, torch.tensor([[0.0, 1.0]]), temperature=1.0).item(), 4)
    0.3133
    """
    _check_moco(query, key, queue)
    _check_options(normalize, reduction)
    return _moco(query, key, queue, _scale_from_temperature(temperature, query), normalize, reduction)


def _moco(query: Tensor, key: Tensor, queue: Tensor, scale: Tensor, normalize: bool, reduction: str, *,
          queue_normalized: bool = False, key_grad: bool = False) -> Tensor:
    """moco_loss on validated inputs with the multiplier ``scale`` (1,); ``queue_normalized``: the queue's
    rows are unit already (``NTXentLoss``'s bank, as lightly's) and are used as they are; ``key_grad``: the
    positive's gradient also flows into ``key`` (lightly's ``NTXentLoss`` with a memory bank)."""
    acc = scale.dtype
    q = _normalized(query, normalize)
    k = _normalized(key if key_grad else key.detach(), normalize)
    queue = queue.detach()
    kscale = None
    if normalize and not queue_normalized:  # F.normalize's 1 / max(||x||, eps), per key inside the kernels
        kscale = torch.linalg.vector_norm(queue, dim=1, dtype=acc).clamp_min(1e-12).reciprocal()
    neg, _, q, _ = _lse(q, queue, scale, kscale=kscale)
    # log(1 + exp(neg - pos)): one rounding at the logits' magnitude fewer than logaddexp(pos, neg) - pos
    return _reduce(_softplus(neg - _positive(q, k, scale)), reduction)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *, normalize: bool = True,
              reduction: str = "mean", gather_distributed: bool = False) -> Tensor:
    """CLIP's symmetric contrastive loss (Radford et al. 2021): logits = logit_scale * img @ txt.T,
    loss = (CE(logits, arange) + CE(logits.T, arange)) / 2, both directions from one op (row and
    column log-sum-exp) without the (N, N) matrix. Equals open_clip's ``ClipLoss()(img, txt, logit_scale)``
    on normalized features.

    Args:
        image_features: (N, D) float32, float16, bfloat16 or float64.
        text_features: (N, D), same dtype and device.
        logit_scale: the multiplier: a Python float > 0, or a 0-dim tensor (e.g. ``model.logit_scale.exp()``)
            in the features' dtype or float32, read on the device (no host sync); it receives a gradient
            when it requires one.
        normalize: L2-normalize the rows first.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per pair i: the mean of its two directions' losses,
            shape (N,)).
        gather_distributed: all-gather both modalities over the initialized process group (with gradient);
            each rank scores its own images against all texts and its own texts against all images
            (positives offset by ``rank * N``); the mean over this rank's rows. Without a process group of
            more than one rank it is the single-process loss.

    Returns:
        A float32 scalar (float64 for float64 inputs), or (N,) for ``reduction="none"``.

    Raises:
        TypeError: non-tensor or integer features, mixed dtypes (a float32 logit_scale is allowed), a
            logit_scale that is neither a number nor a tensor.
        ValueError: not 2-D, shapes or devices that differ, an empty batch, a float logit_scale <= 0, a
            logit_scale tensor that is not 0-dim, an unknown reduction.

    >>> import torch, fastssl
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(fastssl.clip_loss(x, x, 1.0).item(), 4)
    0.3133
    """
    _check_pairs(image_features, text_features)
    _check_options(normalize, reduction, gather_distributed)
    scale = _scalar("logit_scale", logit_scale, image_features, positive=True)
    img, txt = _normalized(image_features, normalize), _normalized(text_features, normalize)
    n = img.shape[0]
    if _gathers(gather_distributed):
        all_txt, rank = _gather(txt)
        all_img, _ = _gather(img)
        lse_img, _, pos_img = _lse_and_positives(img, all_txt, scale, rank * n)  # this rank's own pairs
        lse_txt, _, pos_txt = _lse_and_positives(txt, all_img, scale, rank * n)
    else:
        lse_img, lse_txt, pos_img = _lse_and_positives(img, txt, scale, 0, two_sided=True)
        pos_txt = pos_img
    return _reduce(0.5 * ((lse_img - pos_img) + (lse_txt - pos_txt)), reduction)


# ----------------------------------------------------------------------------------------------------
# Ops beyond the LSE: each a custom op with its backward a custom op, and in eager mode an autograd.Function
# over the same bodies (as ``_lse``)
# ----------------------------------------------------------------------------------------------------

def _op_with_backward(name: str, impl, fake, setup, backward, backward_impl, backward_fake):
    """``fastssl::<name>`` and ``fastssl::<name>_backward`` (torch.compile traces them, fullgraph) and the
    callable the losses use: the op when compiling, else an autograd.Function over the same bodies (the
    ops' dispatch costs ~100 us a call, more than a small loss's math). ``backward(ctx, *grads, run)`` gets
    the backward body to run: the backward op, or its plain function in eager mode."""
    backward_op = torch.library.custom_op(f"fastssl::{name}_backward", backward_impl, mutates_args=())
    backward_op.register_fake(backward_fake)
    op = torch.library.custom_op(f"fastssl::{name}", impl, mutates_args=())
    op.register_fake(fake)
    op.register_autograd(lambda ctx, *grads: backward(ctx, *grads, run=backward_op), setup_context=setup)
    eager = type(f"_{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(impl), "setup_context": staticmethod(setup),
        "backward": staticmethod(lambda ctx, *grads: backward(ctx, *grads, run=backward_impl))})

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else eager.apply(*args)
    return call


# -- SigLIP: row sums of softplus(-z_ij l_ij), l = scale * x_i . y_j + bias --------------------------------

def _sig_block(xs: Tensor, ya: Tensor, bias: Tensor, a: int, b: int, diag_off: int) -> Tensor:
    """Rows a:b of t = -z * l: l = xs @ ya.T + bias (xs carries the scale), the positives' sign flipped."""
    t = torch.addmm(bias, xs[a:b], ya.t())
    t.diagonal(a + diag_off).neg_()
    return t


def _sig_gradient(t: Tensor, a: int, diag_off: int) -> Tensor:
    """d softplus(t)/dl in place of t (rows a:..): sigmoid(t) off the positives, -sigmoid(t) on them."""
    g = t.sigmoid_()
    g.diagonal(a + diag_off).neg_()
    return g


@_without_autocast
def _siglip_torch(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, diag_off: int, keep: bool):
    """(row sums, the (N, M) gradient matrix kept for the backward or empty): one matmul when ``keep``, else
    blocks of rows (memory O(chunk * M))."""
    acc = scale.dtype
    xs, ya = x.to(acc) * scale, y.to(acc)
    n, m = x.shape[0], y.shape[0]
    step = n if keep else _chunk_rows(m)
    rows, kept = xs.new_empty(n), scale.new_empty(0)
    for a in range(0, n, step):
        b = min(n, a + step)
        t = _sig_block(xs, ya, bias, a, b, diag_off)
        rows[a:b] = _softplus(t).sum(1)
        if keep:
            kept = _sig_gradient(t, a, diag_off)
    return rows, kept


def _siglip_impl(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, diag_off: int,
                 keep: bool) -> tuple[Tensor, Tensor]:
    """(per-image sums over the texts (N,) in the math dtype, kept gradient matrix or empty)."""
    if not keep and use_triton(x, y, scale):
        from .kernels.contrastive import sigmoid_forward

        return sigmoid_forward(x, y, scale, bias, diag_off), scale.new_empty(0)
    return _siglip_torch(x, y, scale, bias, diag_off, keep)


def _siglip_fake(x, y, scale, bias, diag_off, keep):
    return x.new_empty(x.shape[0], dtype=scale.dtype), x.new_empty((x.shape[0], y.shape[0]) if keep else (0,),
                                                                   dtype=scale.dtype)


@_without_autocast
def _siglip_backward_torch(w, x, y, scale, bias, kept, diag_off, need_dx, need_dy, need_dparams):
    acc = scale.dtype
    n, m = x.shape[0], y.shape[0]
    xa, ya = x.to(acc), y.to(acc)
    keep = kept.numel() > 0
    xs = None if keep else xa * scale
    step = n if keep else _chunk_rows(m)
    rows_needed = need_dx or need_dparams
    dx = torch.empty(n, x.shape[1], dtype=acc, device=x.device) if rows_needed else None
    dy = torch.zeros(m, y.shape[1], dtype=acc, device=y.device) if need_dy else None
    dbias = torch.zeros(1, dtype=acc, device=x.device)
    for a in range(0, n, step):
        b = min(n, a + step)
        if keep:  # dS = diag(w) G is never formed (G is kept for a second backward): w scales the (N, D) sides
            g, wa = kept, w[a:b, None]
        else:
            g, wa = _sig_gradient(_sig_block(xs, ya, bias, a, b, diag_off), a, diag_off).mul_(w[a:b, None]), None
        if rows_needed:
            torch.mm(g, ya, out=dx[a:b])
            if wa is not None:
                dx[a:b].mul_(wa)
        if need_dy:
            dy.addmm_(g.t(), xa[a:b] if wa is None else xa[a:b] * wa)
        if need_dparams:
            dbias += g.sum() if wa is None else torch.mv(g.t(), w[a:b]).sum()
    # sum_ij dS_ij x_i . y_j = sum_i x_i . (dS @ y)_i, before the scale
    dscale = (xa * dx).sum().reshape(1) if need_dparams else scale.new_empty(0)
    out_x = dx.mul_(scale).to(x.dtype) if need_dx else x.new_empty(0)
    out_y = dy.mul_(scale).to(y.dtype) if need_dy else y.new_empty(0)
    return out_x, out_y, dscale, (dbias if need_dparams else scale.new_empty(0))


def _siglip_backward_impl(w: Tensor, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, kept: Tensor, diag_off: int,
                          need_dx: bool, need_dy: bool, need_dparams: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx or empty, dy or empty, dscale (1,) or empty, dbias (1,) or empty) for the per-row weights ``w``."""
    if kept.numel() or not use_triton(x, y, scale):
        return _siglip_backward_torch(w, x, y, scale, bias, kept, diag_off, need_dx, need_dy, need_dparams)
    from .kernels.contrastive import sigmoid_backward_rows

    dx, dy, dscale, dbias = x.new_empty(0), y.new_empty(0), scale.new_empty(0), scale.new_empty(0)
    if need_dx or need_dparams:
        dx, ds, db = sigmoid_backward_rows(x, y, scale, bias, w, diag_off=diag_off, need_dparams=need_dparams)
        if need_dparams:
            dscale, dbias = ds.reshape(1), db.reshape(1)
        if not need_dx:
            dx = x.new_empty(0)
    if need_dy:  # the same kernel with the roles swapped: the weights are the columns' (images')
        dy, _, _ = sigmoid_backward_rows(y, x, scale, bias, w, diag_off=-diag_off, col_weights=True)
    return dx, dy, dscale, dbias


def _siglip_backward_fake(w, x, y, scale, bias, kept, diag_off, need_dx, need_dy, need_dparams):
    return (x.new_empty(x.shape if need_dx else (0,)), y.new_empty(y.shape if need_dy else (0,)),
            scale.new_empty(1 if need_dparams else 0), scale.new_empty(1 if need_dparams else 0))


def _siglip_setup(ctx, inputs, output):
    x, y, scale, bias, diag_off, keep = inputs
    ctx.diag_off = diag_off
    ctx.needs = (x.requires_grad, y.requires_grad, scale.requires_grad, bias.requires_grad)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, y, scale, bias, output[1])


@first_order("fastssl.siglip_loss")
def _siglip_backward(ctx, g_rows, g_kept, run):
    x, y, scale, bias, kept = ctx.saved_tensors
    need_dx, need_dy, need_ds, need_db = ctx.needs
    if g_rows is None or not any(ctx.needs):
        return (None,) * 6
    dx, dy, dscale, dbias = run(g_rows.to(scale.dtype).contiguous(), x, y, scale, bias, kept, ctx.diag_off,
                                need_dx, need_dy, need_ds or need_db)
    return (dx if need_dx else None, dy if need_dy else None, dscale if need_ds else None,
            dbias if need_db else None, None, None)


_siglip = _op_with_backward("siglip", _siglip_impl, _siglip_fake, _siglip_setup, _siglip_backward,
                            _siglip_backward_impl, _siglip_backward_fake)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, *, normalize: bool = False,
                reduction: str = "mean", gather_distributed: bool = False) -> Tensor:
    """SigLIP's sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): every
    (image, text) pair is a binary classification, the positives on the diagonal::

        l_ij = logit_scale * x_i . y_j + logit_bias,   z_ij = 1 if j == i else -1
        loss = -(1/N) sum_{i,j} log sigmoid(z_ij l_ij) = (1/N) sum_{i,j} softplus(-z_ij l_ij)

    Fused: the (N, N) logits are never stored (Triton: tiled like the LSE kernels, the backward by
    recomputation with the parameters' gradients summed per row in a fixed order: deterministic). Equals
    open_clip's ``SigLipLoss()(img, txt, logit_scale, logit_bias)``.

    Args:
        image_features: (N, D) float32, float16, bfloat16 or float64.
        text_features: (N, D), same dtype and device.
        logit_scale: the multiplier: a Python float > 0, or a 0-dim tensor (e.g. ``model.logit_scale.exp()``)
            in the features' dtype or float32; it receives a gradient when it requires one.
        logit_bias: the bias (SigLIP initializes it to -10): a Python float or a 0-dim tensor, as
            ``logit_scale``; it receives a gradient when it requires one.
        normalize: L2-normalize the rows first (default False: open_clip's models hand normalized features).
        reduction: ``"mean"`` (over images, open_clip's) | ``"sum"`` | ``"none"`` (per image: its sum over
            the texts, shape (N,)).
        gather_distributed: all-gather the texts over the initialized process group (with gradient): each
            rank's images meet every rank's texts, its positives at ``rank * N + i``; the mean over this
            rank's images (the ranks' average is the single-process loss on the global batch, gradients as
            for :func:`clip_loss`). Without a process group of more than one rank, the single-process loss.

    Returns:
        A float32 scalar (float64 for float64 inputs), or (N,) for ``reduction="none"``.

    Raises:
        TypeError: non-tensor or integer features, mixed dtypes (a float32 logit_scale / logit_bias is
            allowed), a logit_scale or logit_bias that is neither a number nor a tensor.
        ValueError: not 2-D, shapes or devices that differ, an empty batch, a float logit_scale <= 0, a
            parameter tensor that is not 0-dim, an unknown reduction.

    >>> import torch, fastssl
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(fastssl.siglip_loss(x, x, 10.0, -10.0).item(), 4)  # softplus(0) + softplus(-10) per image
    0.6932
    """
    _check_pairs(image_features, text_features)
    _check_options(normalize, reduction, gather_distributed)
    scale = _scalar("logit_scale", logit_scale, image_features, positive=True)
    bias = _scalar("logit_bias", logit_bias, image_features, positive=False)
    x, y = _normalized(image_features, normalize), _normalized(text_features, normalize)
    diag_off = 0
    if _gathers(gather_distributed):
        y, rank = _gather(y)
        diag_off = rank * x.shape[0]
    keep = _keeps_scores(x.shape[0], y.shape[0], x, y, scale, bias)
    rows, _ = _siglip(x, y, scale, bias, diag_off, keep)
    return _reduce(rows, reduction)


# -- supervised NT-Xent (pytorch-metric-learning's NTXentLoss): negatives masked by label ------------------

def _sup_block(qs: Tensor, ka: Tensor, lq: Tensor, lk: Tensor, a: int, b: int, symmetric: bool):
    """(s, same, pos) for rows a:b: the scores, the equal-label mask, the positives (``symmetric``: a row's
    own column is neither a positive nor, having its label, a negative)."""
    s = torch.mm(qs[a:b], ka.t())
    same = lq[a:b, None] == lk[None, :]
    pos = same.clone()
    if symmetric:
        pos.diagonal(a).fill_(False)
    return s, same, pos


def _sup_stats(s: Tensor, same: Tensor):
    """(neg, e, total, x) of a block: the negatives' LSE ``neg`` (-inf for a row without one), e = exp(s - max)
    on the negatives (0 on equal labels), its row sums (B, 1), x = neg - s."""
    neg, e, total = _shifted_exp(s.masked_fill(same, float("-inf")), 1, inplace=True)
    return neg, e, total, neg[:, None] - s


def _sup_gradient(pos: Tensor, e: Tensor, total: Tensor, sig: Tensor, wsum: Tensor) -> Tensor:
    """dloss_a/ds_aj from a block's stats (in place of e): -sigmoid(x_aj) (``sig``) on a positive, wsum_a times
    the negatives' softmax e_aj / total_a on a negative, 0 else (the softmax from the LSE's own exponentials;
    a row without negatives divides its zeros by 1, as ``_row_softmax_``)."""
    return torch.where(pos, -sig, e.mul_(wsum[:, None] / total.clamp_min(1.0)))  # no negatives: e = 0


@_without_autocast
def _sup_torch(q, k, lq, lk, scale, symmetric, keep):
    acc = scale.dtype
    qs, ka = q.to(acc) * scale, k.to(acc)
    n, m = q.shape[0], k.shape[0]
    step = n if keep else _chunk_rows(m)
    loss, neg, wsum, kept = qs.new_empty(n), qs.new_empty(n), qs.new_empty(n), scale.new_empty(0)
    for a in range(0, n, step):
        b = min(n, a + step)
        s, same, pos = _sup_block(qs, ka, lq, lk, a, b, symmetric)
        neg[a:b], e, total, x = _sup_stats(s, same)
        sig = torch.sigmoid(x)
        loss[a:b] = torch.where(pos, _softplus(x), 0.0).sum(1)
        wsum[a:b] = torch.where(pos, sig, 0.0).sum(1)
        if keep:
            kept = _sup_gradient(pos, e, total, sig, wsum)
    return loss, neg, wsum, kept


def _sup_impl(q: Tensor, k: Tensor, lq: Tensor, lk: Tensor, scale: Tensor, symmetric: bool,
              keep: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per anchor row of q: (sum of its positives' losses, negatives' LSE, sum of its positives'
    sigmoid(neg - s), the (N, M) gradient matrix kept for the backward or empty), math dtype."""
    if not keep and use_triton(q, k, scale):
        from .kernels.contrastive import supervised_forward

        return (*supervised_forward(q, k, lq, lk, scale, symmetric), scale.new_empty(0))
    return _sup_torch(q, k, lq, lk, scale, symmetric, keep)


def _sup_fake(q, k, lq, lk, scale, symmetric, keep):
    n = q.shape[0]
    return (*(q.new_empty(n, dtype=scale.dtype) for _ in range(3)),
            q.new_empty((n, k.shape[0]) if keep else (0,), dtype=scale.dtype))


@_without_autocast
def _sup_backward_torch(g, q, k, lq, lk, scale, neg, wsum, kept, symmetric, need_dq, need_dk):
    acc = scale.dtype
    n, m = q.shape[0], k.shape[0]
    qa, ka = q.to(acc), k.to(acc)
    keep = kept.numel() > 0
    qs = None if keep else qa * scale
    step = n if keep else _chunk_rows(m)
    want_dk = need_dk or symmetric
    dq = torch.empty(n, q.shape[1], dtype=acc, device=q.device)
    dk = torch.zeros(m, k.shape[1], dtype=acc, device=k.device) if want_dk else None
    for a in range(0, n, step):
        b = min(n, a + step)
        if keep:
            ds = kept * g[:, None]
        else:
            s, same, pos = _sup_block(qs, ka, lq, lk, a, b, symmetric)
            _, e, total, x = _sup_stats(s, same)
            ds = _sup_gradient(pos, e, total, torch.sigmoid(x), wsum[a:b]).mul_(g[a:b, None])
        torch.mm(ds, ka, out=dq[a:b])
        if want_dk:
            dk.addmm_(ds.t(), qa[a:b])
    dq.mul_(scale)
    if dk is not None:
        dk.mul_(scale)
        if symmetric:
            dq.add_(dk)
    return (dq.to(q.dtype) if need_dq else q.new_empty(0),
            dk.to(k.dtype) if (need_dk and not symmetric) else k.new_empty(0))


def _sup_backward_impl(g: Tensor, q: Tensor, k: Tensor, lq: Tensor, lk: Tensor, scale: Tensor, neg: Tensor,
                       wsum: Tensor, kept: Tensor, symmetric: bool, need_dq: bool,
                       need_dk: bool) -> tuple[Tensor, Tensor]:
    """(dq or empty, dk or empty) of sum_a g_a loss_a; ``symmetric``: dq is the whole gradient (k is q)."""
    if kept.numel() or not use_triton(q, k, scale):
        return _sup_backward_torch(g, q, k, lq, lk, scale, neg, wsum, kept, symmetric, need_dq, need_dk)
    from .kernels.contrastive import supervised_backward_rows

    stats = (neg, wsum, g)
    if symmetric:  # dZ_i = scale sum_j (dS_ij + dS_ji) z_j: the anchor on the rows and on the columns, one pass
        return supervised_backward_rows(q, q, lq, lq, scale, stats, stats, self_excluded=True), k.new_empty(0)
    dq = supervised_backward_rows(q, k, lq, lk, scale, stats, None, self_excluded=False) if need_dq else q.new_empty(0)
    dk = supervised_backward_rows(k, q, lk, lq, scale, None, stats, self_excluded=False) if need_dk else k.new_empty(0)
    return dq, dk


def _sup_backward_fake(g, q, k, lq, lk, scale, neg, wsum, kept, symmetric, need_dq, need_dk):
    return q.new_empty(q.shape if need_dq else (0,)), k.new_empty(k.shape if (need_dk and not symmetric) else (0,))


def _sup_setup(ctx, inputs, output):
    q, k, lq, lk, scale, symmetric, keep = inputs
    ctx.symmetric = symmetric
    ctx.needs = (q.requires_grad or (symmetric and k.requires_grad), k.requires_grad and not symmetric)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, lq, lk, scale, *output[1:])


@first_order("fastssl.supervised_nt_xent")
def _sup_backward(ctx, g_loss, g_neg, g_wsum, g_kept, run):
    q, k, lq, lk, scale, neg, wsum, kept = ctx.saved_tensors
    need_dq, need_dk = ctx.needs
    if g_loss is None or not (need_dq or need_dk):
        return (None,) * 7
    dq, dk = run(g_loss.to(scale.dtype).contiguous(), q, k, lq, lk, scale, neg, wsum, kept, ctx.symmetric,
                 need_dq, need_dk)
    return dq if need_dq else None, dk if need_dk else None, None, None, None, None, None


_supervised = _op_with_backward("supervised_nt_xent", _sup_impl, _sup_fake, _sup_setup, _sup_backward,
                                _sup_backward_impl, _sup_backward_fake)


def _check_labels(name: str, labels, like: Tensor, like_name: str) -> Tensor:
    n = like.shape[0]
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a LongTensor of shape ({n},), got {type(labels).__name__}")
    if labels.dtype != torch.long:
        raise TypeError(f"{name} must be a LongTensor (torch.int64), got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one label per row of {like_name}), got {tuple(labels.shape)}")
    if labels.device != like.device:
        raise ValueError(f"{name} is on {labels.device} but {like_name} is on {like.device}; move them to one device")
    return labels


def _same_label_counts(labels: Tensor, keys: Tensor, symmetric: bool) -> Tensor:
    """Per row, the keys with its label (less itself when ``symmetric``)."""
    start, end = _label_bounds(torch.sort(keys).values, labels)
    return end - start - int(symmetric)


def supervised_nt_xent(embeddings: Tensor, labels: Tensor, *, temperature: float = 0.07,
                       ref_embeddings: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None,
                       normalize: bool = True) -> Tensor:
    """pytorch-metric-learning's ``NTXentLoss`` (its default cosine similarity and mean reduction): every
    ordered pair (a, p), a != p, with equal labels is a positive, and the negatives of an anchor are the
    candidates with another label::

        s_ij = cos(x_i, x_j) / temperature
        loss_ap = -log(exp(s_ap) / (exp(s_ap) + sum_{n: label_n != label_a} exp(s_an)))
                = softplus(neg_a - s_ap),   neg_a = log sum_{n: label_n != label_a} exp(s_an)
        loss = mean over all positive pairs (0, with a zero gradient, when there is none)

    Fused: the (N, M) similarities and masks are never stored and the number of positive pairs (up to N^2 /
    classes) costs nothing extra in memory. Triton: one masked LSE pass over the keys for neg_a (the LSE
    kernels' loop reading the labels), then a pass over each row block's positives only (rows and keys sorted
    by label: their positives are one run of keys), the backward by recomputation; PyTorch: blocks of rows.

    Args:
        embeddings: (N, D) float32, float16, bfloat16 or float64: the anchors.
        labels: LongTensor (N,).
        temperature: a Python float > 0.
        ref_embeddings: (M, D) candidates (pml's ``ref_emb``), same dtype and device; default: the
            embeddings themselves (then a == p is left out). With references a == p is allowed.
        ref_labels: LongTensor (M,), given exactly when ``ref_embeddings`` is.
        normalize: cosine similarity (default, pml's ``CosineSimilarity``); False: raw dot products.

    Returns:
        A float32 scalar (float64 for float64 inputs).

    Where pml differs: it adds finfo.tiny inside its log (a pair whose probability is below ~1e-38 counts
    -log(tiny) ~ 87.3 there, its true loss here), and with a single positive pair and at most one negative
    pair in the whole batch it returns 0.

    Raises:
        TypeError: non-tensor or integer embeddings, mixed dtypes, non-long labels, a non-float temperature.
        ValueError: not 2-D, sizes or devices that differ, an empty batch, labels of the wrong shape, only one
            of ref_embeddings / ref_labels, temperature <= 0.

    >>> import torch, fastssl
    >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> round(fastssl.supervised_nt_xent(x, torch.tensor([0, 0, 1]), temperature=1.0).item(), 4)
    0.3133
    """
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels go together: pass both (pml's ref_emb, ref_labels) or neither")
    symmetric = ref_embeddings is None
    refs = embeddings if symmetric else ref_embeddings
    _check_features(("embeddings", "ref_embeddings"), (embeddings, refs))
    _check_labels("labels", labels, embeddings, "embeddings")
    ref_labels = labels if symmetric else _check_labels("ref_labels", ref_labels, refs, "ref_embeddings")
    _check_options(normalize, "mean")
    scale = _scale_from_temperature(temperature, embeddings)
    x = _normalized(embeddings, normalize)
    r = x if symmetric else _normalized(refs, normalize)
    keep = _keeps_scores(x.shape[0], r.shape[0], x, r)
    per_row, _, _, _ = _supervised(x, r, labels, ref_labels, scale, symmetric, keep)
    pairs = _same_label_counts(labels, ref_labels, symmetric).sum().clamp_min(1)
    return per_row.sum() / pairs.to(scale.dtype)


# -- supervised contrastive loss (SupCon): the NT-Xent LSE, the positives through per-class sums -------------

def supcon_loss(features: Tensor, labels: Tensor, *, temperature: float = 0.1, normalize: bool = True,
                reduction: str = "mean") -> Tensor:
    """The supervised contrastive loss (Khosla et al. 2020, "Supervised Contrastive Learning", L_out): with
    s_ij = cos(f_i, f_j) / temperature,

        loss_i = log sum_{a != i} exp(s_ia) - mean_{p != i, label_p = label_i} s_ip

    and the mean over the rows that have a positive. The LSE is NT-Xent's (the fused op: the (N, N) matrix
    is never stored); the positive term is O(N * D): s_i . (class sum of f_i's label - f_i) / count, the
    class sums from the rows sorted by label (a float64 running sum, differences at the class bounds: no
    host sync, no atomics). Its gradient meets the LSE's inside the backward's dS (the kernels compare
    labels in every tile), where near convergence the two nearly cancel.

    Args:
        features: (N, D), or (N, V, D) with V views per sample (flattened view-major, as the paper's code:
            all first views, then all second views; the labels repeat per view). float32, float16, bfloat16
            or float64.
        labels: LongTensor (N,).
        temperature: a Python float > 0.
        normalize: L2-normalize first (the paper's features are unit vectors).
        reduction: ``"mean"`` (over rows with a positive) | ``"sum"`` | ``"none"`` (per row, (N * V,), 0 for a
            row without a positive).

    Returns:
        A float32 scalar (float64 for float64 inputs), or the per-row losses; 0 with a zero gradient when no
        row has a positive.

    Raises:
        TypeError: non-tensor or integer features, non-long labels, a non-float temperature.
        ValueError: features not 2-D or 3-D, an empty batch, labels of the wrong shape or device,
            temperature <= 0, an unknown reduction.

    >>> import torch, fastssl
    >>> f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> round(fastssl.supcon_loss(f, torch.tensor([0, 0, 1]), temperature=1.0).item(), 4)  # log(e + 1) - 1; row 2 left out
    0.3133
    """
    check_float("features", features)
    if features.dim() not in (2, 3):
        raise ValueError(f"features must be 2-D (N, D) or 3-D (N, views, D), got shape {tuple(features.shape)}")
    _check_labels("labels", labels, features, "features")
    if features.dim() == 3:
        views = features.shape[1]
        features, labels = features.transpose(0, 1).reshape(-1, features.shape[2]), labels.repeat(views)
    _check_features(("features",), (features,))
    _check_options(normalize, reduction)
    scale = _scale_from_temperature(temperature, features)
    acc = scale.dtype
    u = _normalized(features, normalize)
    start, end = _label_bounds(torch.sort(labels).values, labels)  # first places: dense ids, as the kernels want
    count = end - start - 1
    lse, pos = _lse_and_mates(u, u, scale, start, start, 1 / count.clamp_min(1).to(acc), diag_off=0, symmetric=True)
    has = count > 0
    per_row = torch.where(has, lse - pos, 0.0)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / has.sum().clamp_min(1).to(acc) if reduction == "mean" else total


# ----------------------------------------------------------------------------------------------------
# Gradient caching: batches whose encoder activations do not fit
# ----------------------------------------------------------------------------------------------------

def _rng_states(devices: list) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def grad_cache(encoder, inputs, loss_fn, *, chunk_size: int) -> Tensor:
    """Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
    Setup"; sentence-transformers' CachedMultipleNegativesRankingLoss): the contrastive loss of a batch
    whose encoder activations do not fit at once, with the encoder's peak activation memory one chunk's.

    1. Embed every input in chunks of ``chunk_size`` rows without a graph, recording each chunk's RNG state
       (CPU and the inputs' CUDA devices).
    2. ``loss = loss_fn(*embeddings)`` with the embeddings as leaves, and its backward: the gradient of each
       embedding row is cached (the loss's own parameters, e.g. a logit scale, get theirs here). The fused
       losses keep this step O(N * D) too.
    3. Re-run the encoder chunk by chunk with a graph, its RNG state replayed (dropout and random
       augmentation inside the encoder draw what step 1 drew), and back-propagate the cached gradients into
       the parameters; each chunk's graph is freed before the next.

    The parameters' gradients equal those of ``loss_fn(*[encoder(chunk) ...])`` with the chunks embedded in
    that order (the plain ``loss_fn(*map(encoder, inputs)).backward()`` when the encoder draws no random
    numbers, or its chunks draw them as the whole batch would), accumulated into ``.grad`` as a backward
    does. The global RNG state afterwards is the one step 1 left (one forward's draws). An encoder in
    training mode sees every row twice (steps 1 and 3), so BatchNorm's running statistics take two updates a
    step (as in Gao et al.'s implementation); a view the loss does not use (detached) is not re-run.

    Args:
        encoder: a callable (an ``nn.Module``) mapping a (rows, ...) tensor to (rows, D) embeddings.
        inputs: a tensor, or a tuple/list of tensors (one per view or tower, each embedded by ``encoder``),
            split along dim 0. An input with a graph (a learnable transform before the encoder) gets its
            gradient through it, sent once after the chunks.
        loss_fn: a callable of the embeddings (one per input, in order) returning a scalar loss.
        chunk_size: rows per encoder call, an int >= 1.

    Returns:
        The loss, detached (the gradients are already in the parameters' ``.grad``).

    Raises:
        TypeError: ``encoder`` or ``loss_fn`` not callable, inputs that are not tensors, a non-int chunk_size,
            an encoder output that is not a tensor.
        ValueError: chunk_size < 1, no inputs, an input with no rows, a loss that is not a scalar tensor with a
            gradient.

    >>> import torch, fastssl
    >>> encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 4))
    >>> x = torch.randn(32, 8)
    >>> loss = fastssl.grad_cache(encoder, (x, x + 0.1), fastssl.nt_xent, chunk_size=8)
    >>> loss.requires_grad, encoder[0].weight.grad.shape
    (False, torch.Size([16, 8]))
    """
    from .checks import check_int

    if not callable(encoder):
        raise TypeError(f"encoder must be callable (an nn.Module), got {type(encoder).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    chunk_size = check_int("chunk_size", chunk_size, low=1)
    views = [inputs] if isinstance(inputs, Tensor) else list(inputs) if isinstance(inputs, (tuple, list)) else None
    if views is None:
        raise TypeError(f"inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}")
    if not views:
        raise ValueError("inputs is empty; pass a tensor or a tuple of tensors (one per view)")
    for i, v in enumerate(views):
        if not isinstance(v, Tensor):
            raise TypeError(f"inputs[{i}] must be a torch.Tensor, got {type(v).__name__}")
        if v.dim() == 0 or v.shape[0] == 0:
            raise ValueError(f"inputs[{i}] has no rows to split (shape {tuple(v.shape)})")
    devices = sorted({v.device.index or 0 for v in views if v.is_cuda})
    # an input with a graph of its own (a learnable transform before the encoder) is cut off it: the chunks'
    # backwards fill a leaf's .grad, sent into that graph once at the end (its first backward frees it)
    graphs = {id(v): (v, v.detach().requires_grad_()) for v in views if v.grad_fn is not None}
    views = [graphs[id(v)][1] if id(v) in graphs else v for v in views]
    chunks = [list(v.split(chunk_size)) for v in views]
    states, embedded = [], []
    with torch.no_grad():
        for view in chunks:
            states.append([])
            parts = []
            for c in view:
                states[-1].append(_rng_states(devices))
                out = encoder(c)
                if not isinstance(out, Tensor):
                    raise TypeError(f"encoder must return a tensor, got {type(out).__name__}")
                parts.append(out)
            embedded.append(torch.cat(parts).requires_grad_())
    with torch.enable_grad():
        loss = loss_fn(*embedded)
        if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
            raise ValueError("loss_fn must return a scalar tensor that depends on the embeddings (a loss with a "
                             f"gradient), got {loss!r:.80}")
        loss.backward()
        for view, view_states, emb in zip(chunks, states, embedded):
            if emb.grad is None:  # the loss does not use this view (a detached target): nothing to send back
                continue
            cached = emb.grad.split(chunk_size)
            for c, (cpu, cuda), grad in zip(view, view_states, cached):
                with torch.random.fork_rng(devices=devices):
                    torch.set_rng_state(cpu)
                    for d, state in zip(devices, cuda):
                        torch.cuda.set_rng_state(state, d)
                    torch.autograd.backward(encoder(c), grad)
        sent = [(v, leaf.grad) for v, leaf in graphs.values() if leaf.grad is not None]
        if sent:
            torch.autograd.backward(*zip(*sent))
    return loss.detach()
