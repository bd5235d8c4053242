"""Attention-based color propagation (Vondrick et al. 2018, "Tracking emerges by colorizing videos") and
CRW-style video label propagation, without the affinity matrix.

Every target pixel p attends jointly to all reference pixels (r, q) of its sample::

    out[b, :, p] = sum_{r,q} softmax_{(r,q)}(<tf[b,:,p], rf[b,r,:,q]> / temperature) * values[b,r,:,q]

Three ops, each a ``torch.library.custom_op`` whose body asks :func:`fastssl.backend.use_triton`:

- ``fastssl::color_propagate`` (+ ``_backward``): the Triton kernels of ``fastssl.kernels.propagation``
  (FlashAttention-style, per-query LSE, backward by recompute) or the PyTorch path below.
- ``fastssl::colorization_lse`` (+ ``_backward``): the LSE over all keys and over the keys of the
  query's own class, from which ``colorization_loss`` = mean(-log max(exp(lse_y - lse), eps)).
- ``fastssl::color_propagate_topk``: top-k (inference). The Triton kernel (per block of query pixels a
  streaming list of the best k keys, key tiles that cannot enter it skipped, then the softmax over the k)
  for k <= 32 in fp32/fp16/bf16; float64 and k > 32 run the chunked PyTorch path (tiles of target pixels,
  radius-restricted windows, a top-k per tile, a top-k of the parts' top-ks), as does every CPU call under
  ``auto``. Both follow one tie rule: among equal logits the key with the smaller id wins, id = frame *
  H * W + raster pixel with the frames in the order given (the radius-limited ones first), as a stable
  sort of the keys would (the PyTorch path enforces it, ``torch.topk``'s order of ties is unspecified).

The PyTorch path works on rectangular tiles of target pixels: in dense mode bands of full rows; with a
radius, squares whose key window is the square grown by floor(radius) on each side (clipped to the
frame), masked by the true distance. A tile's logits are at most ``CHUNK_ELEMENTS`` numbers, so memory
beyond inputs and outputs stays O(CHUNK_ELEMENTS), whatever the frame or the number of reference frames;
its backward recomputes each tile from the saved LSE.

Reference frames come in two groups sharing one softmax: *local* frames (radius-limited) and *global*
frames (all pixels); ``color_propagate`` uses one group, ``propagate_labels`` both (context ring and long
memory; :func:`propagate_step` is one frame of it). ``*_reference`` functions (the first section, before any
op) are the dense float64 formulas the tests compare against. ``scale`` (1 / temperature) reaches the ops as a
(1,) tensor in the math dtype, as in the contrastive slice, and the kernels read it on the device.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Sequence

import torch
from torch import Tensor

from .backend import first_order, use_triton
from .checks import (accumulation_dtype, check_float, check_int, check_ndim, check_number, check_positive, check_same,
                     check_class_ids)

# Logits per tile in the PyTorch path (32 MB in fp32): bounds its working memory at a few times this.
CHUNK_ELEMENTS = 1 << 23


# ----------------------------------------------------------------------------------------------------
# References: the float64 formulas the ops must equal (dense, materializing: also the benchmarks' eager
# baseline)
# ----------------------------------------------------------------------------------------------------

def disk(radius: float, H: int, W: int) -> tuple[int, int]:
    """The disk of ``radius`` on an H x W map as exact integers ``(rr, rad2)``: key q is in reach of query p
    iff dy^2 + dx^2 <= rad2 = floor(radius^2) (computed exactly, so no rounding lets in a pixel just
    outside), and rr = floor(radius) bounds |dy| and |dx|. Both are capped where the disk covers the whole
    map (rad2 at (H-1)^2 + (W-1)^2, rr at its root), so any larger radius equals ``radius=None``. Every
    backend and the reference take their radius test from here.

    >>> disk(1 - 1e-9, 5, 5), disk(2.5, 5, 5), disk(1e30, 3, 4)
    ((0, 0), (2, 6), (3, 13))
    """
    far = max(H - 1, 0) ** 2 + max(W - 1, 0) ** 2  # the largest squared distance on the map
    rad2 = far if radius >= H + W else min(math.floor(Fraction(radius) ** 2), far)
    return math.isqrt(rad2), rad2


def _distance_mask(H: int, W: int, radius: float, device) -> Tensor:
    """(HW, HW) bool: True where key q lies farther than ``radius`` from query p (integer test, :func:`disk`)."""
    ys, xs = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    d2 = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2
    return d2 > disk(radius, H, W)[1]


def propagation_logits_reference(target_feats: Tensor, ref_feats: Tensor, *, temperature: float = 1.0,
                                 radius: Optional[float] = None, num_local: Optional[int] = None,
                                 upcast: bool = True) -> Tensor:
    """The full (B, HW, R*HW) logit matrix, -inf outside the radius in the first ``num_local`` frames
    (default: all frames when a radius is given)."""
    dtype = torch.float64 if upcast else target_feats.dtype
    B, C, H, W = target_feats.shape
    R = ref_feats.shape[1]
    q = target_feats.to(dtype).reshape(B, C, H * W).transpose(1, 2)              # (B, HW, C)
    k = ref_feats.to(dtype).permute(0, 2, 1, 3, 4).reshape(B, C, R * H * W)      # (B, C, R*HW)
    logits = (q @ k) / temperature                                               # (B, HW, R*HW): the affinity
    if radius is not None:
        num_local = R if num_local is None else num_local
        far = _distance_mask(H, W, float(radius), target_feats.device)
        frame_mask = torch.zeros(R, dtype=torch.bool, device=far.device)
        frame_mask[:num_local] = True
        mask = far[:, None, :] & frame_mask[None, :, None]                        # (HW, R, HW)
        logits = logits.masked_fill(mask.reshape(H * W, R * H * W), float("-inf"))
    return logits


def color_propagate_reference(target_feats: Tensor, ref_feats: Tensor, ref_values: Tensor, *,
                              temperature: float = 1.0, radius: Optional[float] = None, topk: Optional[int] = None,
                              num_local: Optional[int] = None, upcast: bool = True) -> Tensor:
    """The literal formula: the full affinity, its softmax (over the top k when ``topk``), the weighted
    sum of values. float64 when ``upcast``; with ``upcast=False`` PyTorch's own arithmetic in the input
    dtype (the low-precision baseline of the tests)."""
    dtype = torch.float64 if upcast else target_feats.dtype
    B, C, H, W = target_feats.shape
    R, V = ref_values.shape[1], ref_values.shape[2]
    logits = propagation_logits_reference(target_feats, ref_feats, temperature=temperature, radius=radius,
                                          num_local=num_local, upcast=upcast)
    values = ref_values.to(dtype).permute(0, 1, 3, 4, 2).reshape(B, R * H * W, V)  # (B, R*HW, V)
    if topk is not None:
        top, idx = logits.topk(topk, dim=-1)                                     # (B, HW, k)
        weights = torch.softmax(top, dim=-1)
        picked = values.gather(1, idx.reshape(B, -1, 1).expand(-1, -1, V)).reshape(B, H * W, topk, V)
        out = (weights[..., None] * picked).sum(2)
    else:
        out = torch.softmax(logits, dim=-1) @ values                             # (B, HW, V)
    return out.transpose(1, 2).reshape(B, V, H, W)


def colorization_loss_reference(target_feats: Tensor, ref_feats: Tensor, ref_labels: Tensor, target_labels: Tensor,
                                num_classes: int, *, temperature: float = 1.0, radius: Optional[float] = None,
                                eps: float = 1e-8, upcast: bool = True) -> Tensor:
    """Vondrick's loss the literal way: propagate one-hot values, pick each pixel's own class, -log."""
    one_hot = torch.nn.functional.one_hot(ref_labels.long(), num_classes).permute(0, 1, 4, 2, 3)
    dtype = torch.float64 if upcast else target_feats.dtype
    probs = color_propagate_reference(target_feats, ref_feats, one_hot.to(dtype), temperature=temperature,
                                      radius=radius, upcast=upcast)             # (B, K, H, W)
    p_y = probs.gather(1, target_labels.long()[:, None]).squeeze(1)
    return -torch.log(p_y.clamp(min=eps)).mean()


def propagate_labels_reference(feats: Tensor, first_labels: Tensor, *, context: int = 20,
                               long_memory: Sequence[int] = (0,), radius: Optional[float] = 12,
                               topk: Optional[int] = 10, temperature: float = 0.05) -> Tensor:
    """Frame-by-frame propagation with the dense reference (context frames first, radius-limited)."""
    T = feats.shape[0]
    preds = [first_labels.double()]
    for t in range(1, T):
        ctx = list(range(max(0, t - context), t))
        mem = [m for m in sorted(set(long_memory)) if m < t]
        frames = ctx + mem
        keys = torch.stack([feats[f] for f in frames])[None]
        values = torch.stack([preds[f] for f in frames])[None]
        preds.append(color_propagate_reference(feats[t][None], keys, values, temperature=temperature, radius=radius,
                                               topk=topk, num_local=len(ctx) if radius is not None else 0)[0])
    return torch.stack(preds)


# ----------------------------------------------------------------------------------------------------
# the PyTorch path: tiles of target pixels, each against its key window
# ----------------------------------------------------------------------------------------------------

class _Part:
    """One group's keys for one tile: k (B, C, N), values v (B, N, V) or labels (B, N), and an optional
    (M, 1, n) mask of excluded keys that broadcasts over the group's frames as (B, M, R, n)."""

    __slots__ = ("k", "v", "far", "frames", "window")

    def __init__(self, k, v, far, frames, window):
        self.k, self.v, self.far, self.frames, self.window = k, v, far, frames, window

    def logits(self, qs: Tensor) -> Tensor:
        """The scaled logits of queries ``qs`` = q * scale (B, M, C) (the scale folded into the small operand)."""
        s = torch.bmm(qs, self.k)                                               # (B, M, N)
        if self.far is not None:
            B, M, N = s.shape
            s.view(B, M, self.frames, N // self.frames).masked_fill_(self.far, float("-inf"))
        return s


class _Tiling:
    """Tiles of target pixels and, per tile, the keys it sees, as one part per group: the local frames'
    window (the tile grown by floor(radius), clipped to the frame; keys farther than the radius masked)
    and every pixel of the global frames. Parts are never concatenated: softmax statistics combine
    across them (log-sum-exp, or a top-k of top-ks)."""

    def __init__(self, q: Tensor, kl: Tensor, kg: Tensor, radius: Optional[float]):
        B, C, H, W = q.shape
        self.B, self.C, self.H, self.W = B, C, H, W
        self.RL, self.RG = kl.shape[1], kg.shape[1]
        self.rr, self.rad2 = disk(radius, H, W) if (radius is not None and self.RL) else (0, 0)
        self.acc = accumulation_dtype(q.dtype)
        budget = max(CHUNK_ELEMENTS // max(B, 1), 1)
        if self.RL:  # squares (side ~ max(8, rr)) shrunk until a tile's logits fit the budget
            th, tw = min(H, max(8, self.rr)), min(W, max(8, self.rr))
            while th * tw > 1 and th * tw * self._keys(th, tw) > budget:
                th, tw = (max(th // 2, 1), tw) if th >= tw else (th, max(tw // 2, 1))
        else:  # bands of full rows
            tw = W
            th = max(1, min(H, budget // max(W * self.RG * H * W, 1)))
        self.tiles = [(y0, min(y0 + th, H), x0, min(x0 + tw, W)) for y0 in range(0, H, th) for x0 in range(0, W, tw)]

    def _keys(self, th, tw):
        return self.RL * min(th + 2 * self.rr, self.H) * min(tw + 2 * self.rr, self.W) + self.RG * self.H * self.W

    def window(self, tile):
        y0, y1, x0, x1 = tile
        rr, H, W = self.rr, self.H, self.W
        return max(0, y0 - rr), min(H, y1 + rr), max(0, x0 - rr), min(W, x1 + rr)

    def far_mask(self, tile, device) -> Tensor:
        """(M, 1, n) bool: True where a window key lies farther than the radius (separable in y and x)."""
        y0, y1, x0, x1 = tile
        ky0, ky1, kx0, kx1 = self.window(tile)
        ar = lambda a, b: torch.arange(a, b, device=device)  # noqa: E731
        dy2 = (ar(y0, y1)[:, None] - ar(ky0, ky1)[None, :]) ** 2                 # (th, kh)
        dx2 = (ar(x0, x1)[:, None] - ar(kx0, kx1)[None, :]) ** 2                 # (tw, kw)
        d2 = dy2[:, None, :, None] + dx2[None, :, None, :]                       # (th, tw, kh, kw)
        return (d2 > self.rad2).reshape((y1 - y0) * (x1 - x0), 1, (ky1 - ky0) * (kx1 - kx0))

    def parts(self, tile, q: Tensor, kl: Tensor, vl: Tensor, glob: Optional[tuple]) -> list:
        """The tile's parts; ``glob`` = (k (B, C, RG*HW), v) flattened once per call by :meth:`flat`."""
        out = []
        if self.RL:
            ky0, ky1, kx0, kx1 = w = self.window(tile)
            k = kl[:, :, :, ky0:ky1, kx0:kx1].to(self.acc).permute(0, 2, 1, 3, 4).reshape(self.B, self.C, -1)
            if vl.dtype == torch.long:  # class ids (B, RL, H, W)
                v = vl[:, :, ky0:ky1, kx0:kx1].reshape(self.B, -1)
            else:
                v = vl[:, :, :, ky0:ky1, kx0:kx1].to(self.acc).permute(0, 1, 3, 4, 2).reshape(self.B, -1, vl.shape[2])
            out.append(_Part(k, v, self.far_mask(tile, q.device), self.RL, w))
        if self.RG:
            out.append(_Part(glob[0], glob[1], None, self.RG, None))
        return out

    def flat(self, kg: Tensor, vg: Tensor) -> Optional[tuple]:
        """Global keys (B, C, RG*HW) and values (B, RG*HW, V) or labels (B, RG*HW), once per call."""
        if not self.RG:
            return None
        k = kg.to(self.acc).permute(0, 2, 1, 3, 4).reshape(self.B, self.C, -1)
        v = vg.reshape(self.B, -1) if vg.dtype == torch.long else \
            vg.to(self.acc).permute(0, 1, 3, 4, 2).reshape(self.B, -1, vg.shape[2])
        return k, v

    def add_grad(self, part: _Part, grad: Tensor, local_acc: Tensor, global_acc: Tensor, channels_last: bool):
        """Add a part's key (B, C, N) or value (B, N, V) gradient to its group's accumulator: the local
        window of (B, RL, D, H, W), or the flat global (B, D, RG*HW) / (B, RG*HW, D)."""
        if part.window is None:
            global_acc += grad
            return
        ky0, ky1, kx0, kx1 = part.window
        B = grad.shape[0]
        if channels_last:
            g = grad.reshape(B, self.RL, ky1 - ky0, kx1 - kx0, -1).permute(0, 1, 4, 2, 3)
        else:
            g = grad.reshape(B, -1, self.RL, ky1 - ky0, kx1 - kx0).permute(0, 2, 1, 3, 4)
        local_acc[:, :, :, ky0:ky1, kx0:kx1] += g

    def unflat(self, acc: Optional[Tensor], like: Tensor, *, channels_last: bool) -> Tensor:
        """A flat global accumulator back to (B, RG, D, H, W) in ``like``'s dtype (zeros if no group)."""
        if acc is None:
            return torch.zeros_like(like)
        B, RG, H, W = self.B, self.RG, self.H, self.W
        g = (acc.reshape(B, RG, H, W, -1).permute(0, 1, 4, 2, 3) if channels_last
             else acc.reshape(B, -1, RG, H, W).permute(0, 2, 1, 3, 4))
        return g.to(like.dtype).contiguous()

    def queries(self, tile, q: Tensor) -> Tensor:
        y0, y1, x0, x1 = tile
        return q[:, :, y0:y1, x0:x1].to(self.acc).reshape(self.B, self.C, -1).transpose(1, 2)  # (B, M, C)

    def put(self, tile, dst: Tensor, rows: Tensor):
        """Write (B, M, D) or (B, M) tile rows into dst (B, D, H, W) or (B, H, W)."""
        y0, y1, x0, x1 = tile
        if rows.dim() == 3:
            dst[:, :, y0:y1, x0:x1] = rows.transpose(1, 2).reshape(self.B, -1, y1 - y0, x1 - x0)
        else:
            dst[:, y0:y1, x0:x1] = rows.reshape(self.B, y1 - y0, x1 - x0)

    def take(self, tile, src: Tensor, dtype=None) -> Tensor:
        """(B, M, D) or (B, M) rows of a tile from src (B, D, H, W) or (B, H, W)."""
        y0, y1, x0, x1 = tile
        dtype = dtype or self.acc
        if src.dim() == 4:
            return src[:, :, y0:y1, x0:x1].to(dtype).reshape(self.B, src.shape[1], -1).transpose(1, 2)
        return src[:, y0:y1, x0:x1].to(dtype).reshape(self.B, -1)


def _lse_of(logits: list) -> Tensor:
    """log-sum-exp over the parts' last dims together, (B, M)."""
    lses = [torch.logsumexp(s, -1) for s in logits]
    return lses[0] if len(lses) == 1 else torch.logsumexp(torch.stack(lses), 0)


def _propagate_torch(q, kl, vl, kg, vg, scale, radius):
    """Per tile: m = max S, P~ = exp(S - m) in place (one exponential per logit), out = P~ V / sum P~,
    lse = m + log sum P~."""
    tiling = _Tiling(q, kl, kg, radius)
    B, C, H, W = q.shape
    V = (vl if tiling.RL else vg).shape[2]
    out = q.new_empty((B, V, H, W))
    lse = torch.empty((B, H, W), dtype=tiling.acc, device=q.device)
    glob = tiling.flat(kg, vg)
    for tile in tiling.tiles:
        qs = tiling.queries(tile, q) * scale
        parts = tiling.parts(tile, q, kl, vl, glob)
        logits = [part.logits(qs) for part in parts]
        m = logits[0].amax(-1, keepdim=True)
        for s in logits[1:]:
            m = torch.maximum(m, s.amax(-1, keepdim=True))
        l = 0
        o = 0
        for s, part in zip(logits, parts):
            p = s.sub_(m).exp_()
            l = l + p.sum(-1, keepdim=True)
            o = o + torch.bmm(p, part.v)
        tiling.put(tile, out, o.div_(l).to(q.dtype))
        tiling.put(tile, lse, (m + l.log()).squeeze(-1))
    return out, lse


def _propagate_backward_torch(grad, q, kl, vl, kg, vg, out, lse, scale, radius):
    tiling = _Tiling(q, kl, kg, radius)
    acc = tiling.acc
    dq = torch.empty_like(q)
    dkl, dvl = torch.zeros_like(kl, dtype=acc), torch.zeros_like(vl, dtype=acc)
    glob = tiling.flat(kg, vg)
    dkg, dvg = (torch.zeros_like(glob[0]), torch.zeros_like(glob[1])) if glob else (None, None)
    for tile in tiling.tiles:
        qs = tiling.queries(tile, q) * scale
        do_t = tiling.take(tile, grad)                                           # (B, M, V)
        delta = (do_t * tiling.take(tile, out)).sum(-1, keepdim=True)            # (B, M, 1)
        lse_t = tiling.take(tile, lse)[..., None]
        dq_t = 0
        for part in tiling.parts(tile, q, kl, vl, glob):
            p = part.logits(qs).sub_(lse_t).exp_()                                # P, recomputed
            ds = torch.bmm(do_t, part.v.transpose(1, 2)).sub_(delta).mul_(p)    # dS / scale
            dq_t = dq_t + torch.bmm(ds, part.k.transpose(1, 2))
            tiling.add_grad(part, torch.bmm(qs.transpose(1, 2), ds), dkl, dkg, channels_last=False)
            tiling.add_grad(part, torch.bmm(p.transpose(1, 2), do_t), dvl, dvg, channels_last=True)
        tiling.put(tile, dq, (dq_t * scale).to(q.dtype))
    return (dq, dkl.to(kl.dtype), dvl.to(vl.dtype), tiling.unflat(dkg, kg, channels_last=False), tiling.unflat(dvg, vg, channels_last=True))


def _same_class(part: _Part, y_t: Tensor) -> Tensor:
    """(B, M, N) bool: key's class == the query's."""
    return part.v[:, None, :] == y_t[..., None]


def _colorization_lse_torch(q, kl, ll, kg, lg, y, scale, radius):
    tiling = _Tiling(q, kl, kg, radius)
    B, C, H, W = q.shape
    lse = torch.empty((B, H, W), dtype=tiling.acc, device=q.device)
    lsey = torch.empty_like(lse)
    glob = tiling.flat(kg, lg)
    for tile in tiling.tiles:
        qs = tiling.queries(tile, q) * scale
        y_t = tiling.take(tile, y, torch.long)
        parts = tiling.parts(tile, q, kl, ll, glob)
        logits = [part.logits(qs) for part in parts]
        tiling.put(tile, lse, _lse_of(logits))
        tiling.put(tile, lsey, _lse_of([s.masked_fill_(~_same_class(part, y_t), float("-inf"))
                                        for s, part in zip(logits, parts)]))
    return lse, lsey


def _colorization_lse_backward_torch(g, gy, q, kl, ll, kg, lg, y, lse, lsey, scale, radius):
    tiling = _Tiling(q, kl, kg, radius)
    acc = tiling.acc
    dq = torch.empty_like(q)
    dkl = torch.zeros_like(kl, dtype=acc)
    glob = tiling.flat(kg, lg)
    dkg = torch.zeros_like(glob[0]) if glob else None
    for tile in tiling.tiles:
        qs = tiling.queries(tile, q) * scale
        y_t = tiling.take(tile, y, torch.long)
        lse_t, g_t, gy_t = (tiling.take(tile, t)[..., None] for t in (lse, g, gy))
        lsey_t = tiling.take(tile, lsey)[..., None]
        lsey_t = lsey_t.masked_fill(lsey_t == float("-inf"), 0.0)  # no key of the class: py is 0, not NaN
        dq_t = 0
        for part in tiling.parts(tile, q, kl, ll, glob):
            s = part.logits(qs)
            py = torch.exp(s - lsey_t).masked_fill_(~_same_class(part, y_t), 0.0)
            ds = s.sub_(lse_t).exp_().mul_(g_t).add_(py.mul_(gy_t))               # dS / scale
            dq_t = dq_t + torch.bmm(ds, part.k.transpose(1, 2))
            tiling.add_grad(part, torch.bmm(qs.transpose(1, 2), ds), dkl, dkg, channels_last=False)
        tiling.put(tile, dq, (dq_t * scale).to(q.dtype))
    return dq, dkl.to(kl.dtype), tiling.unflat(dkg, kg, channels_last=False)


def _topk_ordered(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of ``s`` along its last dim and their positions, equal values in order of position
    (the tie rule: the smaller key id wins; positions follow ids). ``torch.topk`` leaves the order of ties
    unspecified, so a row whose (k+1)-th largest equals its k-th (a tie at the boundary: found from a top
    k+1, no extra pass over s) is redone by a stable sort (on the CPU: those rows only; on other devices every
    row, which needs no host sync). A k-th value of -inf (fewer keys in reach than k) is left alone: those
    keys weigh 0."""
    if not s.is_cpu:
        idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
        return s.gather(-1, idx), idx
    if k == s.shape[-1]:
        return s.topk(k, dim=-1)
    top, idx = s.topk(k + 1, dim=-1)  # a tie at the boundary: the (k+1)-th equals the k-th
    tied = (top[..., k] == top[..., k - 1]) & (top[..., k - 1] > float("-inf"))
    top, idx = top[..., :k], idx[..., :k]
    if tied.any():
        rows = tied.nonzero(as_tuple=True)
        order = torch.sort(s[rows], dim=-1, descending=True, stable=True).indices[..., :k]
        idx[rows] = order
        top[rows] = s[rows].gather(-1, order)
    return top, idx


def _topk_torch(q, kl, vl, kg, vg, scale, radius, topk):
    tiling = _Tiling(q, kl, kg, radius)
    B, C, H, W = q.shape
    V = (vl if tiling.RL else vg).shape[2]
    out = q.new_empty((B, V, H, W))
    glob = tiling.flat(kg, vg)
    for tile in tiling.tiles:
        qs = tiling.queries(tile, q) * scale
        tops, picked = [], []
        parts = tiling.parts(tile, q, kl, vl, glob)
        for part in parts:  # positions in a part follow key ids, local parts' ids come first
            s = part.logits(qs)
            k = min(topk, s.shape[-1])  # a window can hold fewer keys than k; the rest are -inf anyway
            top, idx = _topk_ordered(s, k)                                        # (B, M, k)
            if len(parts) > 1:  # in id order, so that the merge below breaks ties by id too
                idx, order = idx.sort(-1)
                top = top.gather(-1, order)
            tops.append(top)
            picked.append(part.v.gather(1, idx.reshape(B, -1, 1).expand(-1, -1, V)).reshape(B, -1, k, V))
        top, values = (tops[0], picked[0]) if len(tops) == 1 else (torch.cat(tops, -1), torch.cat(picked, 2))
        if top.shape[-1] > topk:  # the top k of the parts' top ks
            top, idx = _topk_ordered(top, topk)
            values = values.gather(2, idx[..., None].expand(-1, -1, -1, V))
        weights = torch.softmax(top, dim=-1)
        tiling.put(tile, out, torch.einsum("bmk,bmkv->bmv", weights, values).to(q.dtype))
    return out


# ----------------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------------

def _c(*tensors):
    return [t.contiguous() for t in tensors]


def _no_pixels(q: Tensor) -> bool:
    """An empty batch or frame (B * H * W = 0): every backend returns the empty result without a launch."""
    B, _, H, W = q.shape
    return B * H * W == 0


@torch.library.custom_op("fastssl::color_propagate", mutates_args=())
def _propagate_op(q: Tensor, kl: Tensor, vl: Tensor, kg: Tensor, vg: Tensor, scale: Tensor,
                  radius: Optional[float]) -> tuple[Tensor, Tensor]:
    q, kl, vl, kg, vg = _c(q, kl, vl, kg, vg)
    if _no_pixels(q):
        return _propagate_op_fake(q, kl, vl, kg, vg, scale, radius)
    if use_triton(q):
        from .kernels.propagation import propagate_forward

        return propagate_forward(q, kl, vl, kg, vg, scale, radius)
    return _propagate_torch(q, kl, vl, kg, vg, scale, radius)


@_propagate_op.register_fake
def _propagate_op_fake(q, kl, vl, kg, vg, scale, radius):
    B, C, H, W = q.shape
    V = vl.shape[2]
    return q.new_empty((B, V, H, W)), q.new_empty((B, H, W), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("fastssl::color_propagate_backward", mutates_args=())
def _propagate_backward_op(grad: Tensor, q: Tensor, kl: Tensor, vl: Tensor, kg: Tensor, vg: Tensor, out: Tensor,
                           lse: Tensor, scale: Tensor, radius: Optional[float]
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grad, q, kl, vl, kg, vg, out, lse = _c(grad.to(q.dtype), q, kl, vl, kg, vg, out, lse)
    if _no_pixels(q):
        return tuple(torch.zeros_like(t) for t in (q, kl, vl, kg, vg))
    if use_triton(q):
        from .kernels.propagation import propagate_backward

        return propagate_backward(grad, q, kl, vl, kg, vg, out, lse, scale, radius)
    return _propagate_backward_torch(grad, q, kl, vl, kg, vg, out, lse, scale, radius)


@_propagate_backward_op.register_fake
def _(grad, q, kl, vl, kg, vg, out, lse, scale, radius):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, kl, vl, kg, vg))


def _propagate_setup(ctx, inputs, output):
    q, kl, vl, kg, vg, scale, radius = inputs
    out, lse = output
    ctx.radius = radius
    ctx.save_for_backward(q, kl, vl, kg, vg, scale, out, lse)


@first_order("fastssl.color_propagate")
def _propagate_backward(ctx, grad_out, grad_lse):
    q, kl, vl, kg, vg, scale, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dkl, dvl, dkg, dvg = _propagate_backward_op(grad_out, q, kl, vl, kg, vg, out, lse, scale, ctx.radius)
    return dq, dkl, dvl, dkg, dvg, None, None


_propagate_op.register_autograd(_propagate_backward, setup_context=_propagate_setup)


@torch.library.custom_op("fastssl::colorization_lse", mutates_args=())
def _colorization_lse_op(q: Tensor, kl: Tensor, ll: Tensor, kg: Tensor, lg: Tensor, y: Tensor, scale: Tensor,
                         radius: Optional[float]) -> tuple[Tensor, Tensor]:
    q, kl, ll, kg, lg, y = _c(q, kl, ll, kg, lg, y)
    if use_triton(q):
        from .kernels.propagation import colorization_lse_forward

        return colorization_lse_forward(q, kl, ll, kg, lg, y, scale, radius)
    return _colorization_lse_torch(q, kl, ll, kg, lg, y, scale, radius)


@_colorization_lse_op.register_fake
def _(q, kl, ll, kg, lg, y, scale, radius):
    B, C, H, W = q.shape
    like = q.new_empty((B, H, W), dtype=accumulation_dtype(q.dtype))
    return like, torch.empty_like(like)


@torch.library.custom_op("fastssl::colorization_lse_backward", mutates_args=())
def _colorization_lse_backward_op(g: Tensor, gy: Tensor, q: Tensor, kl: Tensor, ll: Tensor, kg: Tensor, lg: Tensor,
                                  y: Tensor, lse: Tensor, lsey: Tensor, scale: Tensor,
                                  radius: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    g, gy, q, kl, ll, kg, lg, y, lse, lsey = _c(g.to(lse.dtype), gy.to(lse.dtype), q, kl, ll, kg, lg, y, lse, lsey)
    if use_triton(q):
        from .kernels.propagation import colorization_lse_backward

        return colorization_lse_backward(g, gy, q, kl, ll, kg, lg, y, lse, lsey, scale, radius)
    return _colorization_lse_backward_torch(g, gy, q, kl, ll, kg, lg, y, lse, lsey, scale, radius)


@_colorization_lse_backward_op.register_fake
def _(g, gy, q, kl, ll, kg, lg, y, lse, lsey, scale, radius):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, kl, kg))


def _colorization_lse_setup(ctx, inputs, output):
    q, kl, ll, kg, lg, y, scale, radius = inputs
    ctx.radius = radius
    ctx.save_for_backward(q, kl, ll, kg, lg, y, scale, *output)


@first_order("fastssl.colorization_loss")
def _colorization_lse_backward(ctx, g, gy):
    q, kl, ll, kg, lg, y, scale, lse, lsey = ctx.saved_tensors
    g = torch.zeros_like(lse) if g is None else g
    gy = torch.zeros_like(lsey) if gy is None else gy
    dq, dkl, dkg = _colorization_lse_backward_op(g, gy, q, kl, ll, kg, lg, y, lse, lsey, scale, ctx.radius)
    return dq, dkl, None, dkg, None, None, None, None


_colorization_lse_op.register_autograd(_colorization_lse_backward, setup_context=_colorization_lse_setup)


@torch.library.custom_op("fastssl::color_propagate_topk", mutates_args=())
def _topk_op(q: Tensor, kl: Tensor, vl: Tensor, kg: Tensor, vg: Tensor, scale: Tensor, radius: Optional[float],
             topk: int) -> Tensor:
    q, kl, vl, kg, vg = _c(q, kl, vl, kg, vg)
    if _no_pixels(q):
        return _topk_op_fake(q, kl, vl, kg, vg, scale, radius, topk)
    if use_triton(q):
        from .kernels.propagation import propagate_topk_forward, topk_supported

        if topk_supported(q.dtype, topk):
            return propagate_topk_forward(q, kl, vl, kg, vg, scale, radius, topk)
    return _topk_torch(q, kl, vl, kg, vg, scale, radius, topk)  # k > 32 or float64: the chunked PyTorch path


@_topk_op.register_fake
def _topk_op_fake(q, kl, vl, kg, vg, scale, radius, topk):
    B, C, H, W = q.shape
    return q.new_empty((B, vl.shape[2], H, W))


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------

def _check_radius(radius) -> Optional[float]:
    """None, or a finite number of feature-map pixels >= 0."""
    return None if radius is None else check_number("radius", radius, low=0)


def _check_topk(topk, num_keys: int, what: str) -> Optional[int]:
    if topk is None:
        return None
    topk = check_int("topk", topk, accepted="None or an int")
    if not 1 <= topk <= num_keys:
        raise ValueError(f"topk must be between 1 and the number of reference pixels {what} ({num_keys}), got {topk}")
    return topk


def _logit_scale(temperature, like: Tensor) -> Tensor:
    """1 / temperature as the ops take it: a (1,) tensor in the math dtype on like's device (``torch.full``:
    no host sync on CUDA)."""
    scale = 1.0 / check_positive("temperature", temperature)
    return torch.full((1,), scale, dtype=accumulation_dtype(like.dtype), device=like.device)


def _check_target_and_refs(target_feats, ref_feats):
    check_float("target_feats", target_feats)
    check_float("ref_feats", ref_feats)
    check_ndim("target_feats", target_feats, 4, "(B, C, H, W)")
    check_ndim("ref_feats", ref_feats, 5, "(B, R, C, H, W)")
    check_same(("target_feats", "ref_feats"), (target_feats, ref_feats))
    B, C, H, W = target_feats.shape
    if (ref_feats.shape[0], *ref_feats.shape[2:]) != (B, C, H, W):
        raise ValueError(f"ref_feats must be (B, R, C, H, W) = ({B}, R, {C}, {H}, {W}) to match target_feats "
                         f"{tuple(target_feats.shape)}, got {tuple(ref_feats.shape)}")
    if ref_feats.shape[1] < 1:
        raise ValueError(f"ref_feats needs at least one reference frame (R >= 1), got shape {tuple(ref_feats.shape)}")
    _check_channels("target_feats", target_feats)


def _check_channels(name: str, feats: Tensor) -> None:
    """C >= 1: with no feature channel every logit is 0 and the attention means nothing."""
    if feats.shape[1] < 1:
        raise ValueError(f"{name} needs at least one feature channel (C >= 1), got shape {tuple(feats.shape)}")


def _empty_group(t: Tensor) -> Tensor:
    return t.new_empty((t.shape[0], 0, *t.shape[2:]))


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------

def color_propagate(target_feats: Tensor, ref_feats: Tensor, ref_values: Tensor, *, temperature: float = 1.0,
                    radius: Optional[float] = None, topk: Optional[int] = None) -> Tensor:
    """Copy values (colors, label maps) from reference frames to a target frame by attention over pixel
    features, one softmax jointly over all R*H*W reference pixels (Vondrick et al. 2018)::

        out[b, :, p] = sum_{r,q} softmax_{(r,q)}(<tf[b,:,p], rf[b,r,:,q]> / temperature) * values[b,r,:,q]

    The affinity matrix is never stored: memory is O((HW + R*HW) * (C + V)) plus a per-pixel LSE. On
    CUDA the Triton kernels run (FlashAttention-style forward, backward by recompute); on the CPU a tiled
    PyTorch path with the same math.

    Args:
        target_feats: (B, C, H, W) features of the target frame.
        ref_feats: (B, R, C, H, W) features of the R reference frames (same dtype and device).
        ref_values: (B, R, V, H, W) what is propagated (colors, one-hot labels, masks), same dtype.
        temperature: the logits are <tf, rf> / temperature; > 0.
        radius: only reference pixels within this Euclidean distance (feature-map pixels) of the target
            pixel's position take part (a disk, as in CRW; tested exactly, dy^2 + dx^2 <= radius^2); ``None``
            = all, as is any radius that covers the frame. The kernels visit only the key rows of each
            window, so the cost follows the window's area, not the frame's.
        topk: only the k largest logits per target pixel take part, softmax over those k (CRW's
            inference). For inference: the output carries no gradient. On CUDA a fused Triton kernel
            (streaming top-k, k <= 32, fp32/fp16/bf16); float64, k > 32 and the CPU use a chunked
            PyTorch path (tiles of target pixels, radius-limited windows). Ties: of equal logits the
            reference pixel that comes first (frame, then raster order) is kept, on every backend.

    Returns:
        (B, V, H, W) in the input dtype; math in float32 (float64 for float64). Gradients flow to all
        three inputs in the dense and radius modes. An empty batch or frame (B, H or W = 0) gives the empty
        (B, V, H, W) result (and empty gradients).

    Raises:
        TypeError: non-tensor or non-float inputs, mixed dtypes, a non-numeric radius or non-int topk.
        ValueError: wrong ranks, shapes that do not match, no feature channel (C = 0), inputs on different
            devices, temperature <= 0, radius < 0, topk < 1 or topk > R*H*W.

    >>> import torch, fastssl
    >>> tf = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # pixel 0 = e0, pixel 1 = e1
    >>> rf = tf[:, None].flip(-1)                                           # the same pixels, swapped
    >>> values = torch.tensor([10.0, 20.0]).reshape(1, 1, 1, 1, 2)
    >>> fastssl.color_propagate(tf, rf, values, temperature=0.01).round()
    tensor([[[[20., 10.]]]])
    """
    _check_target_and_refs(target_feats, ref_feats)
    check_float("ref_values", ref_values)
    check_ndim("ref_values", ref_values, 5, "(B, R, V, H, W)")
    check_same(("target_feats", "ref_values"), (target_feats, ref_values))
    B, C, H, W = target_feats.shape
    R = ref_feats.shape[1]
    if (ref_values.shape[:2], ref_values.shape[3:]) != ((B, R), (H, W)) or ref_values.shape[2] < 1:
        raise ValueError(f"ref_values must be (B, R, V, H, W) = ({B}, {R}, V >= 1, {H}, {W}) to match ref_feats "
                         f"{tuple(ref_feats.shape)}, got {tuple(ref_values.shape)}")
    scale = _logit_scale(temperature, target_feats)
    radius = _check_radius(radius)
    topk = _check_topk(topk, R * H * W, "R*H*W")
    if radius is None:
        groups = (_empty_group(ref_feats), _empty_group(ref_values), ref_feats, ref_values)
    else:
        groups = (ref_feats, ref_values, _empty_group(ref_feats), _empty_group(ref_values))
    if topk is not None:
        return _topk_op(target_feats.detach(), *(g.detach() for g in groups), scale, radius, topk)
    return _propagate_op(target_feats, *groups, scale, radius)[0]


def colorization_loss(target_feats: Tensor, ref_feats: Tensor, ref_labels: Tensor, target_labels: Tensor,
                      num_classes: int, *, temperature: float = 1.0, radius: Optional[float] = None,
                      eps: float = 1e-8) -> Tensor:
    """Vondrick et al.'s colorization loss with colors quantized into ``num_classes`` clusters: the mean
    over target pixels of -log(max(p_y, eps)), where p = color_propagate(target_feats, ref_feats,
    one_hot(ref_labels)) and y is the pixel's own class.

    Computed as log p_y = LSE over the keys of class y - LSE over all keys (a class-masked second
    log-sum-exp in the same pass): no one-hot values, no affinity matrix. Where p_y < eps the loss is
    -log(eps) and its gradient zero.

    Args:
        target_feats: (B, C, H, W) features of the target frame.
        ref_feats: (B, R, C, H, W) features of the reference frames (same dtype and device).
        ref_labels: (B, R, H, W) integer class ids of the reference pixels, in [0, num_classes).
        target_labels: (B, H, W) integer class ids of the target pixels, in [0, num_classes).
        num_classes: the number of color clusters (ids are range-checked on CPU tensors only, and not
            inside torch.compile: a device check would synchronize, a traced one break the graph).
        temperature: logits = <tf, rf> / temperature; > 0.
        radius: as in :func:`color_propagate`.
        eps: the floor of p_y, > 0.

    Returns:
        A 0-dim float32 tensor (float64 for float64 features); gradients flow to target_feats and ref_feats.

    Raises:
        TypeError: non-float features, mixed dtypes, non-integer labels, a non-int num_classes.
        ValueError: wrong ranks or shapes, no feature channel, different devices, an empty batch or frame,
            temperature <= 0, radius < 0, eps <= 0, num_classes < 1, labels out of range (CPU tensors).

    >>> import torch, fastssl
    >>> feats = torch.eye(2).reshape(1, 2, 1, 2) * 20                      # two pixels, orthogonal features
    >>> labels = torch.tensor([[[0, 1]]])
    >>> fastssl.colorization_loss(feats, feats[:, None], labels[:, None], labels, 2) < 1e-6
    tensor(True)
    """
    _check_target_and_refs(target_feats, ref_feats)
    B, C, H, W = target_feats.shape
    R = ref_feats.shape[1]
    for name, labels, ndim, layout, shape in (("ref_labels", ref_labels, 4, "(B, R, H, W)", (B, R, H, W)),
                                              ("target_labels", target_labels, 3, "(B, H, W)", (B, H, W))):
        check_class_ids(name, labels)
        check_ndim(name, labels, ndim, layout)
        if tuple(labels.shape) != shape:
            raise ValueError(f"{name} must be {layout} = {shape} to match the features, got {tuple(labels.shape)}")
        check_same(("target_feats", name), (target_feats, labels), dtype=False)
    num_classes = check_int("num_classes", num_classes, low=1)
    if B == 0 or H * W == 0:
        raise ValueError(f"colorization_loss needs at least one target pixel, got target_feats {tuple(target_feats.shape)}")
    scale = _logit_scale(temperature, target_feats)
    radius = _check_radius(radius)
    eps = check_positive("eps", eps)
    if target_feats.device.type == "cpu" and not torch.compiler.is_compiling():  # a device check would sync
        for name, labels in (("ref_labels", ref_labels), ("target_labels", target_labels)):
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"{name} must hold class ids in [0, {num_classes}), got values in [{lo}, {hi}]")
    ref_labels, target_labels = ref_labels.long(), target_labels.long()
    if radius is None:
        groups = (_empty_group(ref_feats), _empty_group(ref_labels), ref_feats, ref_labels)
    else:
        groups = (ref_feats, ref_labels, _empty_group(ref_feats), _empty_group(ref_labels))
    lse, lse_y = _colorization_lse_op(target_feats, *groups, target_labels, scale, radius)
    return -(lse_y - lse).clamp(min=math.log(eps)).mean()


def propagate_step(query: Tensor, context_feats: Tensor, context_labels: Tensor, memory_feats: Tensor,
                   memory_labels: Tensor, *, temperature: float = 0.05, radius: Optional[float] = 12,
                   topk: Optional[int] = 10) -> Tensor:
    """One frame of :func:`propagate_labels` (also what its benchmark times): the query frame attends jointly
    to the context frames' labels within ``radius`` (``None``: whole frames) and to the memory frames'
    everywhere, softmax over the ``topk`` largest logits <query, key> / temperature (``None``: all).

    Arguments are used as given (:func:`propagate_labels` validates them once per video): query
    (1, C, H, W); context_feats / context_labels (1, n, C | V, H, W); memory_feats / memory_labels
    (1, m, C | V, H, W), one dtype and device; temperature > 0. Returns (1, V, H, W).

    >>> import torch
    >>> f = torch.eye(2).reshape(1, 2, 1, 2)                                 # two pixels, orthogonal features
    >>> labels = torch.tensor([3.0, 5.0]).reshape(1, 1, 1, 1, 2)
    >>> none = f[:, None][:, :0]                                              # no memory frame
    >>> propagate_step(f, f[:, None], labels, none, labels[:, :0], temperature=0.01, radius=None, topk=None).round()
    tensor([[[[3., 5.]]]])
    """
    H, W = query.shape[-2:]
    local_radius = float(H + W) if radius is None else radius  # a disk that covers every frame
    scale = _logit_scale(temperature, query)
    if topk is not None:
        return _topk_op(query, context_feats, context_labels, memory_feats, memory_labels, scale, local_radius, topk)
    return _propagate_op(query, context_feats, context_labels, memory_feats, memory_labels, scale, local_radius)[0]


def propagate_labels(feats: Tensor, first_labels: Tensor, *, context: int = 20, long_memory: Sequence[int] = (0,),
                     radius: Optional[float] = 12, topk: Optional[int] = 10, temperature: float = 0.05) -> Tensor:
    """Propagate frame 0's labels (masks, keypoint heat maps) through a video, as in CRW's evaluation
    (Jabri et al. 2020): frame t attends jointly to the predicted labels of its ``context`` previous frames
    (within ``radius`` of each pixel) and of the ``long_memory`` frames (everywhere), keeps the ``topk``
    largest affinities per pixel and averages their labels with softmax weights.

    Features are used as given: CRW L2-normalizes them over C first (``F.normalize(feats, dim=1)``). The
    window of context frames is read in place, as views of ``feats`` and of the output (the predicted
    maps), and the long-memory frames' are a copy of ``len(long_memory)`` frames, so working memory is
    bounded by the context window, not the video's length (plus the (T, V, H, W) output itself). Runs
    under ``torch.no_grad()``: the output carries no gradient.

    Args:
        feats: (T, C, H, W) per-frame features of one video, float.
        first_labels: (V, H, W) soft or one-hot labels of frame 0, same dtype and device as feats.
        context: how many previous frames (>= 1) each frame attends to.
        long_memory: frame indices (in [0, T)) always attended to once predicted (CRW: the first frame).
        radius: the disk (feature-map pixels) of the context frames; ``None`` = whole frames.
        topk: the number of keys per pixel (``None`` = all, through the trainable kernels).
        temperature: logits = <f_t, f_s> / temperature; > 0.

    Returns:
        (T, V, H, W) in the input dtype; frame 0 is ``first_labels``.

    Raises:
        TypeError: non-float or mixed dtypes, non-int context or long-memory indices.
        ValueError: wrong ranks, shapes or devices, no feature channel, context < 1, long-memory indices out
            of range, temperature <= 0, radius < 0, topk < 1 or more than the keys of frame 1.

    >>> import torch, fastssl
    >>> feats = torch.nn.functional.normalize(torch.randn(3, 8, 5, 5), dim=1)
    >>> mask = torch.zeros(1, 5, 5); mask[0, 1:3, 1:3] = 1
    >>> fastssl.propagate_labels(feats, mask, context=2, radius=2, topk=3).shape
    torch.Size([3, 1, 5, 5])
    """
    check_float("feats", feats)
    check_float("first_labels", first_labels)
    check_ndim("feats", feats, 4, "(T, C, H, W)")
    check_ndim("first_labels", first_labels, 3, "(V, H, W)")
    check_same(("feats", "first_labels"), (feats, first_labels))
    T, C, H, W = feats.shape
    if first_labels.shape[1:] != (H, W) or first_labels.shape[0] < 1:
        raise ValueError(f"first_labels must be (V >= 1, {H}, {W}) to match feats {tuple(feats.shape)}, "
                         f"got {tuple(first_labels.shape)}")
    if T < 1:
        raise ValueError(f"feats must hold at least one frame, got shape {tuple(feats.shape)}")
    _check_channels("feats", feats)
    context = check_int("context", context, low=1)
    try:
        memory = sorted({check_int("long_memory", m) for m in long_memory}) if long_memory is not None else []
    except (TypeError, ValueError):
        raise TypeError(f"long_memory must be a sequence of frame indices, got {long_memory!r}") from None
    if any(m < 0 or m >= T for m in memory):
        raise ValueError(f"long_memory indices must be in [0, {T}) (frames of feats), got {tuple(long_memory)}")
    temperature = check_positive("temperature", temperature)
    radius = _check_radius(radius)
    first_keys = H * W * (1 + sum(1 for m in memory if m < 1))
    topk = _check_topk(topk, first_keys, "of frame 1 (its context and long memory)")
    out = torch.empty((T, *first_labels.shape), dtype=feats.dtype, device=feats.device)
    out[0] = first_labels
    with torch.no_grad():
        for t in range(1, T):
            lo = max(0, t - context)
            mem = [m for m in memory if m < t]
            if len(mem) == 1:
                mem_feats, mem_labels = feats[mem[0]:mem[0] + 1], out[mem[0]:mem[0] + 1]
            else:  # slices, not an index tensor: copying indices from the host would synchronise
                mem_feats = torch.cat([feats[m:m + 1] for m in mem]) if mem else feats[:0]
                mem_labels = torch.cat([out[m:m + 1] for m in mem]) if mem else out[:0]
            out[t] = propagate_step(feats[t][None], feats[lo:t][None], out[lo:t][None], mem_feats[None],
                                    mem_labels[None], temperature=temperature, radius=radius, topk=topk)[0]
    return out
