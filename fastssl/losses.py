"""``nn.Module`` wrappers over the fused contrastive losses of :mod:`fastssl.contrastive`.

Thin modules in the style of lightly's losses: arguments are validated once in ``__init__`` (with
messages that say how to fix the call), ``forward`` calls the fused op, so none of them materializes
the N x M similarity matrix (CPCLoss adds only its O(B * T * code_dim) linear predictions).

- :class:`NTXentLoss`: SimCLR's NT-Xent, or with ``memory_bank_size > 0`` the MoCo loss against a
  :class:`MoCoQueue` it owns (lightly's signature and meaning).
- :class:`InfoNCELoss`: cross-entropy over query-key similarities.
- :class:`MoCoQueue`: a ring buffer of negative keys.
- :class:`CLIPLoss`: CLIP's symmetric loss with a learnable (clamped) logit scale.
- :class:`CPCLoss`: Contrastive Predictive Coding's bilinear InfoNCE over future steps.
- :class:`ClipLoss`, :class:`SigLipLoss`: open_clip's classes (constructor, call, distributed meaning), so
  open_clip's training code can import them in place of its own.
- :class:`SupervisedNTXentLoss`: pytorch-metric-learning's ``NTXentLoss`` with labels; :class:`SupConLoss`.

>>> import torch
>>> from fastssl.losses import NTXentLoss
>>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
>>> NTXentLoss(temperature=0.5)(z1, z2).shape
torch.Size([])
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .checks import (accumulation_dtype, check_bool, check_choice, check_float, check_int, check_ndim, check_number,
                     check_positive, check_same)
from .contrastive import (REDUCTIONS, _check_moco, _check_pairs, _check_views, _gathers, _lse_and_positives, _moco,
                          _nt_xent, _scalar, clip_loss, info_nce, moco_loss, nt_xent, siglip_loss, supcon_loss,
                          supervised_nt_xent)

__all__ = ["NTXentLoss", "InfoNCELoss", "MoCoQueue", "CLIPLoss", "CPCLoss", "ClipLoss", "SigLipLoss",
           "SupervisedNTXentLoss", "SupConLoss"]


def _check_gather_available(gather_distributed: bool) -> None:
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError(
            "gather_distributed=True but torch.distributed is not available in this PyTorch build; "
            "pass gather_distributed=False or install a PyTorch build with distributed support"
        )


def _set_loss_options(module: nn.Module, normalize, reduction, gather_distributed) -> None:
    """Validate and store the options InfoNCELoss and CLIPLoss share with their functions."""
    module.normalize = check_bool("normalize", normalize)
    check_choice("reduction", reduction, REDUCTIONS)
    module.reduction = reduction
    module.gather_distributed = check_bool("gather_distributed", gather_distributed)
    _check_gather_available(gather_distributed)


# ----------------------------------------------------------------------------------------------------
# MoCoQueue
# ----------------------------------------------------------------------------------------------------

class MoCoQueue(nn.Module):
    """A ring buffer of negative keys, as in MoCo (He et al., 2020, "Momentum Contrast for Unsupervised
    Visual Representation Learning", Algorithm 1: ``enqueue(queue, k); dequeue(queue)``).

    The keys live in one registered buffer ``queue`` of shape ``(size, dim)`` (so ``.to(device)``,
    ``.half()`` and ``state_dict`` carry it), initialized like MoCo's with random unit vectors.
    :meth:`negatives` returns that buffer itself, without a copy. :meth:`enqueue` overwrites the oldest
    rows in place, wrapping around the end: a batch of ``B`` keys written at pointer ``p`` lands in rows
    ``p, p+1, ..., p+B-1 (mod size)``, so no key is dropped while fewer than ``size`` newer keys have
    arrived after it, also when ``B`` does not divide ``size``. A batch larger than the queue keeps its
    newest ``size`` keys (the rows they would hold after writing the whole batch one key at a time).
    The write pointer is a 0-dim int64 buffer ``queue_ptr`` on the queue's device, advanced in place, so
    enqueueing never synchronizes with the GPU and ``torch.compile`` traces it once, not once a position
    (:attr:`ptr` reads it as an int); it is saved in ``state_dict`` as extra state.

    Because :meth:`negatives` is a view of the live buffer, a loss whose backward reads it must run its
    backward before the next :meth:`enqueue`, or be given ``negatives().clone()`` (autograd's version
    check raises otherwise). :class:`NTXentLoss` takes care of that itself.

    Args:
        size: number of keys held (K), an int >= 1.
        dim: feature dimension of a key (D), an int >= 1.
        gather_distributed: if True, :meth:`enqueue` all-gathers the keys of every rank first, so the
            queue receives the global batch (rank 0's keys first) and stays identical on every rank.
            Without a process group of more than one rank it enqueues this process's keys (lightly's
            single-process meaning).
        dtype: dtype of the buffer (default: ``torch.get_default_dtype()``).
        device: device of the buffer.

    Raises:
        TypeError: ``size`` or ``dim`` is not an int, ``gather_distributed`` not a bool.
        ValueError: ``size`` or ``dim`` below 1.

    >>> import torch
    >>> queue = MoCoQueue(size=5, dim=2)
    >>> queue.enqueue(torch.arange(6.0).reshape(3, 2))
    >>> queue.enqueue(torch.arange(6.0, 12.0).reshape(3, 2))  # wraps: the 6th key overwrites the 1st
    >>> queue.negatives()
    tensor([[10., 11.],
            [ 2.,  3.],
            [ 4.,  5.],
            [ 6.,  7.],
            [ 8.,  9.]])
    >>> queue.ptr
    1
    """

    queue: Tensor
    queue_ptr: Tensor

    def __init__(self, size: int, dim: int, *, gather_distributed: bool = False,
                 dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        self.size = check_int("size", size, low=1)
        self.dim = check_int("dim", dim, low=1)
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)
        _check_gather_available(gather_distributed)
        init = F.normalize(torch.randn(size, dim, dtype=torch.float64), dim=1)
        self.register_buffer("queue", init.to(dtype=dtype or torch.get_default_dtype(), device=device))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=device), persistent=False)

    @property
    def ptr(self) -> int:
        """The row the next key goes to (reading it synchronizes with the queue's device)."""
        return int(self.queue_ptr)

    def negatives(self) -> Tensor:
        """The ``(size, dim)`` buffer of keys itself (no copy); row order is storage order, not age."""
        return self.queue

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (``(B, dim)``) over the oldest entries, wrapping around; keys are detached and
        cast to the queue's dtype. With ``gather_distributed`` the global batch (``world_size * B`` keys,
        rank 0's first) is written.

        Raises:
            TypeError: ``keys`` is not a floating-point tensor.
            ValueError: ``keys`` is not 2-D with ``dim`` columns, or lives on another device than the queue.
        """
        check_float("keys", keys)
        check_ndim("keys", keys, 2, f"(batch, dim={self.dim})")
        if keys.shape[1] != self.dim:
            raise ValueError(
                f"keys must have shape (batch, {self.dim}) to match the queue's dim, got {tuple(keys.shape)}"
            )
        check_same(("queue", "keys"), (self.queue, keys), dtype=False)
        keys = keys.detach()
        if _gathers(self.gather_distributed):
            keys = distributed.all_gather_with_grad(keys)
        total = keys.shape[0]
        n = min(total, self.size)  # a batch larger than the queue: its newest keys
        rows = torch.arange(total - n, total, device=self.queue.device).add_(self.queue_ptr).remainder_(self.size)
        self.queue.index_copy_(0, rows, keys[total - n:].to(self.queue.dtype))
        self.queue_ptr.add_(total).remainder_(self.size)

    def get_extra_state(self):
        return {"ptr": self.ptr}

    def set_extra_state(self, state) -> None:
        self.queue_ptr.fill_(int(state["ptr"]))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, gather_distributed={self.gather_distributed}"


# ----------------------------------------------------------------------------------------------------
# NT-Xent (SimCLR), or MoCo with a memory bank
# ----------------------------------------------------------------------------------------------------

class NTXentLoss(nn.Module):
    """SimCLR's normalized temperature-scaled cross-entropy (Chen et al., 2020, "A Simple Framework for
    Contrastive Learning of Visual Representations"), with lightly's signature and meaning.

    Without a memory bank, with ``z = cat(normalize(out0), normalize(out1))`` of shape ``(2N, D)`` and
    ``s_ij = z_i . z_j / temperature``::

        loss = mean_i [ -s_{i,p(i)} + log sum_{j != i} exp(s_ij) ],  p(i) = i + N (mod 2N)

    (:func:`fastssl.nt_xent`). With ``memory_bank_size > 0`` it is the MoCo loss (He et al., 2020):
    ``out0`` are the queries, ``out1`` their positive keys, and the negatives are the keys held in a
    :class:`MoCoQueue` of ``memory_bank_size`` entries that this module owns (attribute ``memory_bank``)::

        loss = mean_i [ -q_i.k_i / t + log( exp(q_i.k_i / t) + sum_j exp(q_i.m_j / t) ) ]

    (:func:`fastssl.moco_loss`, all vectors L2-normalized; as in lightly, ``out1`` gets the positive's
    gradient too, where moco_loss detaches its key; the bank gets none). After the loss is computed, the normalized
    ``out1`` is enqueued (only when ``out0`` requires grad, i.e. in training, as in lightly), so the
    next call sees it among its negatives. The loss is computed against a copy of the bank (``K * D``
    elements, as lightly and MoCo do) so that enqueueing in place cannot corrupt this step's backward.

    Args:
        temperature: softmax temperature t (default 0.5); as in lightly any ``|t| >= 1e-8`` is taken (a
            negative t flips the logits' sign; :func:`fastssl.nt_xent` itself takes t > 0 only).
        memory_bank_size: 0 (default) for SimCLR; ``K > 0`` or a ``(K, D)`` pair for MoCo. With a bare
            ``K`` the feature dimension, dtype and device of the bank are taken from the first batch
            (prefer ``(K, D)`` so the bank exists, and is in ``state_dict``, from the start).
        gather_distributed: SimCLR: all-gather the features of every rank (with gradient) and use them as
            negatives (API.md's convention: average the ranks' losses to get the global-batch loss).
            MoCo: enqueue the global batch of keys. Without a process group of more than one rank it is
            the single-process loss (lightly's meaning).

    Shapes:
        out0, out1: ``(N, D)`` each. Output: a 0-dim float32 tensor (float64 for float64 inputs).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``|temperature| < 1e-8``, a negative or malformed ``memory_bank_size``,
            ``gather_distributed=True`` without ``torch.distributed``. At call time, the input checks of
            :func:`fastssl.nt_xent` / :func:`fastssl.moco_loss`.

    >>> import torch
    >>> loss_fn = NTXentLoss(temperature=0.5)
    >>> z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    >>> loss_fn(z1, z2).shape
    torch.Size([])
    >>> moco = NTXentLoss(temperature=0.2, memory_bank_size=(16, 8))
    >>> q = torch.randn(4, 8, requires_grad=True)
    >>> moco(q, torch.randn(4, 8)).backward()
    >>> moco.memory_bank.ptr  # the 4 keys were enqueued
    4
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = check_number("temperature", temperature)
        if abs(self.temperature) < 1e-8:
            raise ValueError(f"temperature must be a finite number with |temperature| >= 1e-8 (lightly's rule; "
                             f"0 would divide by zero), got {self.temperature}")
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)
        _check_gather_available(gather_distributed)
        size, dim = self._parse_bank(memory_bank_size)
        self.memory_bank_size = size
        self.memory_bank: Optional[MoCoQueue] = None
        if size > 0 and dim is not None:
            self.memory_bank = MoCoQueue(size, dim, gather_distributed=gather_distributed)

    @staticmethod
    def _parse_bank(memory_bank_size):
        hint = "memory_bank_size must be 0 (SimCLR), a number of negatives K > 0, or a (K, D) pair"
        if isinstance(memory_bank_size, (tuple, list, torch.Size)):
            if len(memory_bank_size) != 2:
                raise TypeError(f"{hint}; got {memory_bank_size!r}")
            size, dim = (check_int(f"memory_bank_size's {n}", v) for n, v in zip("KD", memory_bank_size))
            if size < 0 or dim < 1:
                raise ValueError(f"{hint} with K >= 0 and D >= 1; got {tuple(memory_bank_size)}")
            return size, dim
        return check_int("memory_bank_size", memory_bank_size, low=0), None

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """Loss of the two views ``out0`` and ``out1`` (``(N, D)`` each); see the class docstring."""
        if self.memory_bank_size == 0:
            if self.temperature > 0:
                return nt_xent(out0, out1, temperature=self.temperature, normalize=True,
                               gather_distributed=self.gather_distributed)
            _check_views(out0, out1)
            return _nt_xent(out0, out1, self._scale(out0), True, "mean", _gathers(self.gather_distributed))
        check_float("out0", out0)
        check_float("out1", out1)
        check_ndim("out1", out1, 2, "(batch, dim)")
        if self.memory_bank is None:  # bare K: the bank takes its shape, dtype and device from this batch
            self.memory_bank = MoCoQueue(self.memory_bank_size, out1.shape[1],
                                         gather_distributed=self.gather_distributed,
                                         dtype=out1.dtype, device=out1.device)
        bank = self.memory_bank
        if out1.shape[1] != bank.dim:
            raise ValueError(
                f"out1 must have shape (batch, {bank.dim}) to match the memory bank, got {tuple(out1.shape)}"
            )
        update = out0.requires_grad
        negatives = bank.negatives()
        if update or negatives.dtype != out0.dtype or negatives.device != out0.device:
            # a copy on the features' device (lightly's script builds the bank on the CPU and never moves it)
            negatives = negatives.to(dtype=out0.dtype, device=out0.device, copy=True)
        _check_moco(out0, out1, negatives)  # the bank holds unit keys (as lightly's): used as they are
        loss = _moco(out0, out1, negatives, self._scale(out0), True, "mean", queue_normalized=True, key_grad=True)
        if update:
            bank.enqueue(F.normalize(out1.detach(), dim=1).to(bank.queue.device))
        return loss

    def _scale(self, like: Tensor) -> Tensor:
        """1 / temperature as the ops' (1,) multiplier (a negative temperature included)."""
        return torch.full((1,), 1.0 / self.temperature, dtype=accumulation_dtype(like.dtype), device=like.device)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, memory_bank_size={self.memory_bank_size}, "
                f"gather_distributed={self.gather_distributed}")


# ----------------------------------------------------------------------------------------------------
# InfoNCE
# ----------------------------------------------------------------------------------------------------

class InfoNCELoss(nn.Module):
    """InfoNCE (van den Oord et al., 2018, "Representation Learning with Contrastive Predictive
    Coding"): cross-entropy of each query against all keys, the positive given by ``targets``::

        logits = normalize(query) @ normalize(key).T / temperature      # (N, M), never stored
        loss = cross_entropy(logits, targets, reduction)                 # targets default arange(N)

    (:func:`fastssl.info_nce`; without ``normalize`` the raw dot products are used.)

    Args:
        temperature: t > 0 (default 0.1).
        normalize: L2-normalize query and key rows first (cosine similarity), default True.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-query losses, shape ``(N,)``).
        gather_distributed: all-gather the keys of every rank with gradient (API.md's convention: each
            rank scores its own queries against all keys; without a process group of more than one rank
            the single-process loss). Default False.

    Shapes:
        query ``(N, D)``, key ``(M, D)``, targets ``(N,)`` int64 (optional; needs ``M >= N`` when omitted).

    Raises:
        TypeError: ``temperature`` not a number, ``normalize`` / ``gather_distributed`` not a bool.
        ValueError: ``temperature <= 0`` or a ``reduction`` other than mean | sum | none; at call time,
            the input checks of :func:`fastssl.info_nce`.

    >>> import torch
    >>> loss_fn = InfoNCELoss(temperature=0.1)
    >>> query, key = torch.randn(4, 8), torch.randn(6, 8)
    >>> loss_fn(query, key).shape
    torch.Size([])
    >>> InfoNCELoss(reduction="none")(query, key, torch.tensor([5, 4, 3, 2])).shape
    torch.Size([4])
    """

    def __init__(self, temperature: float = 0.1, normalize: bool = True, reduction: str = "mean", *,
                 gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        _set_loss_options(self, normalize, reduction, gather_distributed)

    def forward(self, query: Tensor, key: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        """InfoNCE of ``query`` ``(N, D)`` against ``key`` ``(M, D)``; see the class docstring."""
        return info_nce(query, key, targets, temperature=self.temperature, normalize=self.normalize,
                        reduction=self.reduction, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, reduction={self.reduction!r}"


# ----------------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------------

class CLIPLoss(nn.Module):
    """CLIP's symmetric contrastive loss (Radford et al., 2021, "Learning Transferable Visual Models From
    Natural Language Supervision") with its learnable temperature::

        s = min(exp(logit_scale), max_logit_scale)
        logits = s * normalize(img) @ normalize(txt).T                  # (N, N), never stored
        loss = (CE(logits, arange(N)) + CE(logits.T, arange(N))) / 2

    (:func:`fastssl.clip_loss`). ``logit_scale`` is kept in log space and initialized to
    ``log(1 / init_temperature)``; the scale is clamped to ``max_logit_scale`` in the forward, as open_clip
    does (its training loop clamps the parameter to ``log(100)``), so past the clamp it gets no gradient.

    Args:
        init_temperature: initial temperature t0 > 0 (default 0.07): ``logit_scale = log(1 / t0)``.
        learnable: ``logit_scale`` is an ``nn.Parameter`` (default) or, if False, a fixed buffer.
        max_logit_scale: upper bound of ``exp(logit_scale)`` (default 100); must be >= 1 / init_temperature.
        normalize: L2-normalize the features first (default True).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (as :func:`fastssl.clip_loss`).
        gather_distributed: all-gather features of every rank with gradient (open_clip's
            ``gather_with_grad``, API.md's convention; without a process group of more than one rank the
            single-process loss).

    Shapes:
        image_features, text_features: ``(N, D)`` each; ``logit_scale``: 0-dim float32.

    Raises:
        TypeError: arguments of the wrong type.
        ValueError: ``init_temperature <= 0``, ``max_logit_scale <= 0``, ``1 / init_temperature >
            max_logit_scale`` (the scale would start clamped and never learn), a bad ``reduction``;
            at call time, the input checks of :func:`fastssl.clip_loss`.

    >>> import torch
    >>> loss_fn = CLIPLoss(init_temperature=0.07)
    >>> round(loss_fn.logit_scale.exp().item(), 4)
    14.2857
    >>> img, txt = torch.randn(4, 8), torch.randn(4, 8)
    >>> loss = loss_fn(img, txt)
    >>> loss.backward()
    >>> loss_fn.logit_scale.grad is not None
    True
    """

    logit_scale: Tensor

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True, max_logit_scale: float = 100.0, *,
                 normalize: bool = True, reduction: str = "mean", gather_distributed: bool = False) -> None:
        super().__init__()
        init_temperature = check_positive("init_temperature", init_temperature)
        self.max_logit_scale = check_positive("max_logit_scale", max_logit_scale)
        if 1.0 / init_temperature > self.max_logit_scale:
            raise ValueError(
                f"1 / init_temperature = {1.0 / init_temperature:g} exceeds "
                f"max_logit_scale = {self.max_logit_scale:g}: "
                "the scale would start clamped and get no gradient; raise max_logit_scale or init_temperature"
            )
        self.learnable = check_bool("learnable", learnable)
        _set_loss_options(self, normalize, reduction, gather_distributed)
        init = torch.tensor(math.log(1.0 / init_temperature), dtype=torch.float32)
        if learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    def scale(self) -> Tensor:
        """The multiplier ``min(exp(logit_scale), max_logit_scale)`` (0-dim, differentiable)."""
        return torch.clamp(self.logit_scale.exp(), max=self.max_logit_scale)

    def forward(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """CLIP loss of paired ``image_features`` and ``text_features`` (``(N, D)`` each)."""
        return clip_loss(image_features, text_features, self.scale(), normalize=self.normalize,
                         reduction=self.reduction, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return f"learnable={self.learnable}, max_logit_scale={self.max_logit_scale}"


# ----------------------------------------------------------------------------------------------------
# CPC
# ----------------------------------------------------------------------------------------------------

class CPCLoss(nn.Module):
    """Contrastive Predictive Coding's loss (van den Oord et al., 2018, "Representation Learning with
    Contrastive Predictive Coding"): for each step ``k = 1..K`` a bilinear score
    ``f_k(z_{t+k}, c_t) = z_{t+k}^T W_k c_t`` and InfoNCE over the other positions and sequences::

        for k in 1..K:
            p_{b,t} = W_k c_{b,t}                       for t < T - k     (B * (T-k), code_dim)
            y_{b,t} = z_{b,t+k}                                            (B * (T-k), code_dim)
            L_k = mean_{b,t} [ -p_{b,t}.y_{b,t} + log sum_{b',t'} exp(p_{b,t}.y_{b',t'}) ]
        loss = mean_k L_k

    Each ``L_k`` is :func:`fastssl.info_nce` of the flattened predictions against the flattened targets
    with ``normalize=False`` and ``temperature=1`` (the negatives of a prediction are the targets of every
    other (sequence, position) pair of that ``k``; the similarity matrix is never stored). ``W_k`` is
    ``self.predictors[k - 1]``, an ``nn.Linear(context_dim, code_dim, bias=False)``.

    Args:
        context_dim: width of the context vectors c_t (the autoregressive model's output).
        code_dim: width of the codes z_t (the encoder's output).
        prediction_steps: K, how many future steps are predicted (>= 1).

    Shapes:
        context ``(B, T, context_dim)``, codes ``(B, T, code_dim)`` (batch first, time second; c_t
        summarizes z_1..z_t), with ``T > prediction_steps``. Output: a 0-dim tensor.

    Raises:
        TypeError: a dimension that is not an int; at call time, non-float or mixed-dtype inputs.
        ValueError: a dimension below 1; at call time, inputs that are not 3-D, widths that do not
            match, differing batch or time sizes, ``T <= prediction_steps``.

    >>> import torch
    >>> loss_fn = CPCLoss(context_dim=6, code_dim=4, prediction_steps=2)
    >>> context, codes = torch.randn(3, 5, 6), torch.randn(3, 5, 4)
    >>> loss_fn(context, codes).shape
    torch.Size([])
    """

    def __init__(self, context_dim: int, code_dim: int, prediction_steps: int) -> None:
        super().__init__()
        self.context_dim = check_int("context_dim", context_dim, low=1)
        self.code_dim = check_int("code_dim", code_dim, low=1)
        self.prediction_steps = check_int("prediction_steps", prediction_steps, low=1)
        self.predictors = nn.ModuleList(
            nn.Linear(context_dim, code_dim, bias=False) for _ in range(prediction_steps)
        )

    def forward(self, context: Tensor, codes: Tensor) -> Tensor:
        """CPC loss of ``context`` ``(B, T, context_dim)`` predicting ``codes`` ``(B, T, code_dim)``."""
        check_float("context", context)
        check_float("codes", codes)
        check_same(("context", "codes"), (context, codes))
        check_ndim("context", context, 3, f"(batch, time, context_dim={self.context_dim})")
        check_ndim("codes", codes, 3, f"(batch, time, code_dim={self.code_dim})")
        if context.shape[2] != self.context_dim:
            raise ValueError(f"context must have shape (batch, time, {self.context_dim}), got {tuple(context.shape)}")
        if codes.shape[2] != self.code_dim:
            raise ValueError(f"codes must have shape (batch, time, {self.code_dim}), got {tuple(codes.shape)}")
        if codes.shape[:2] != context.shape[:2]:
            raise ValueError(
                f"codes has (batch, time) = {tuple(codes.shape[:2])} but context has "
                f"{tuple(context.shape[:2])}; they must match"
            )
        weight = self.predictors[0].weight
        if context.dtype != weight.dtype and not torch.is_autocast_enabled(context.device.type):
            raise TypeError(
                f"context has dtype {context.dtype} but the predictors' weights are {weight.dtype}; cast the inputs "
                f"or the module (e.g. loss_fn.to({context.dtype}))"
            )
        steps = context.shape[1]
        if steps <= self.prediction_steps:
            raise ValueError(
                f"context has {steps} time steps but prediction_steps={self.prediction_steps} needs more than "
                f"{self.prediction_steps}; use longer sequences or fewer prediction_steps"
            )
        total = None
        for k, predictor in enumerate(self.predictors, start=1):
            predictions = predictor(context[:, : steps - k]).reshape(-1, self.code_dim)
            targets = codes[:, k:].reshape(-1, self.code_dim).to(predictions.dtype)  # autocast's dtype
            term = info_nce(predictions, targets, temperature=1.0, normalize=False)
            total = term if total is None else total + term
        return total / self.prediction_steps

    def extra_repr(self) -> str:
        return f"context_dim={self.context_dim}, code_dim={self.code_dim}, prediction_steps={self.prediction_steps}"


# ----------------------------------------------------------------------------------------------------
# open_clip's ClipLoss and SigLipLoss
# ----------------------------------------------------------------------------------------------------

def _check_world(module: nn.Module, rank, world_size) -> None:
    module.rank = check_int("rank", rank, low=0)
    module.world_size = check_int("world_size", world_size, low=1)
    if module.rank >= module.world_size:
        raise ValueError(f"rank must be in [0, world_size={module.world_size}), got {module.rank}")


def _require_group(module: nn.Module) -> None:
    """A module built with world_size > 1 runs in that process group (open_clip's rank and world_size are
    its args.rank and args.world_size)."""
    name = type(module).__name__
    distributed.require_initialized(f"{name}(world_size={module.world_size})")
    if (distributed.rank(), distributed.world_size()) != (module.rank, module.world_size):
        raise ValueError(f"{name} was built with rank={module.rank}, world_size={module.world_size} but this "
                         f"process is rank {distributed.rank()} of {distributed.world_size()}")


def _loss_output(loss: Tensor, output_dict: bool):
    check_bool("output_dict", output_dict)
    return {"contrastive_loss": loss} if output_dict else loss


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``: the same constructor, call and meaning, computed by the fused
    :func:`fastssl.clip_loss` (the (N, N) logits are never stored)::

        logits = logit_scale * image_features @ text_features.T
        loss = (CE(logits, arange(N)) + CE(logits.T, arange(N))) / 2

    The features are used as given (open_clip's models normalize them). ``logit_bias`` is added to every
    logit as open_clip does, which leaves both cross-entropies unchanged: it gets a zero gradient (NaN in,
    NaN out), never a term of the loss.

    Distributed (``world_size > 1``, in an initialized process group of that size; open_clip's meaning):

    - ``local_loss=False``: every rank computes the loss of the global batch (the features of all ranks
      gathered); ``gather_with_grad=True`` sends gradients back to the ranks the features came from, else
      only this rank's own features carry a gradient.
    - ``local_loss=True``: each rank scores its own images against all texts and its own texts against all
      images, positives at ``rank * N + i``; with ``gather_with_grad`` the gathered features carry gradients
      back (:func:`fastssl.clip_loss` with ``gather_distributed=True``), else they are constants.

    Args:
        local_loss: see above (default False).
        gather_with_grad: see above (default False).
        cache_labels: accepted for open_clip's signature; there are no label tensors to cache.
        rank: this process's rank (open_clip's ``args.rank``).
        world_size: the number of processes (open_clip's ``args.world_size``); 1: single process.
        use_horovod: Horovod is not supported (``NotImplementedError``).

    Raises:
        TypeError: arguments of the wrong type.
        ValueError: ``rank`` outside ``[0, world_size)``; at call time the input checks of
            :func:`fastssl.clip_loss`, or a process group whose rank or size differ from the module's.
        NotImplementedError: ``use_horovod=True``.
        RuntimeError: at call time, ``world_size > 1`` without an initialized process group.

    >>> import torch
    >>> import torch.nn.functional as F
    >>> img, txt = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    >>> out = ClipLoss()(img, txt, torch.tensor(14.3), output_dict=True)
    >>> sorted(out), out["contrastive_loss"].shape
    (['contrastive_loss'], torch.Size([]))
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False) -> None:
        super().__init__()
        self.local_loss = check_bool("local_loss", local_loss)
        self.gather_with_grad = check_bool("gather_with_grad", gather_with_grad)
        self.cache_labels = check_bool("cache_labels", cache_labels)
        _check_world(self, rank, world_size)
        if check_bool("use_horovod", use_horovod):
            raise NotImplementedError("ClipLoss(use_horovod=True): Horovod is not supported; use torch.distributed "
                                      "(torchrun) with use_horovod=False")
        self.use_horovod = False

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        """The loss (``{"contrastive_loss": loss}`` with ``output_dict``) of paired (N, D) features."""
        if self.world_size == 1:
            loss = clip_loss(image_features, text_features, logit_scale, normalize=False)
        elif self.local_loss and self.gather_with_grad:
            _require_group(self)
            loss = clip_loss(image_features, text_features, logit_scale, normalize=False, gather_distributed=True)
        elif self.local_loss:  # gathered features are constants, also this rank's own as keys
            _require_group(self)
            _check_pairs(image_features, text_features)
            scale = _scalar("logit_scale", logit_scale, image_features, positive=True)
            img, txt = image_features, text_features
            all_img, all_txt = (distributed.all_gather_local_grad(t, local_grad=False) for t in (img, txt))
            # the positives are this rank's pairs among the constant keys: their gradient reaches the rows only
            own = distributed.rank() * img.shape[0]
            lse_img, _, pos_img = _lse_and_positives(img, all_txt, scale, own)
            lse_txt, _, pos_txt = _lse_and_positives(txt, all_img, scale, own)
            loss = 0.5 * ((lse_img - pos_img).mean() + (lse_txt - pos_txt).mean())
        else:  # the global batch's loss on every rank
            _require_group(self)
            gather = distributed.all_gather_with_grad if self.gather_with_grad else distributed.all_gather_local_grad
            loss = clip_loss(gather(image_features), gather(text_features), logit_scale, normalize=False)
        if isinstance(logit_bias, Tensor):  # a constant shift of every logit: a zero gradient
            loss = loss + (logit_bias * 0).to(loss.dtype).sum()
        return _loss_output(loss, output_dict)

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}")


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training"): the
    same constructor, call and meaning, computed by the fused :func:`fastssl.siglip_loss` (open_clip builds
    the (N, N) logits, and the labels beside them, for every exchange)::

        loss = -(1/N) sum_{i,j} log sigmoid(z_ij (logit_scale * x_i . y_j + logit_bias)),  z = 2 I - 1

    With ``world_size > 1`` (in an initialized process group of that size) each rank's images meet every
    rank's texts, which is what each of open_clip's ``dist_impl`` exchanges ("bidir", "shift", "reduce",
    "gather") computes; here always by one all-gather of the texts with gradient. Each rank returns its
    images' loss divided by its batch size, as open_clip.

    Args:
        cache_labels: accepted for open_clip's signature; there are no label tensors to cache.
        rank: this process's rank.
        world_size: the number of processes; 1: single process.
        dist_impl: None or one of open_clip's "bidir", "shift", "reduce", "gather" (all the same result).
        chunk_size: accepted for open_clip's signature (its row chunking); the fused loss never builds the
            logits, so any value >= 0 computes the same loss.

    Raises:
        TypeError: arguments of the wrong type.
        ValueError: an unknown ``dist_impl``, ``rank`` outside ``[0, world_size)``, a negative ``chunk_size``;
            at call time the checks of :func:`fastssl.siglip_loss` or a process group that does not match.
        RuntimeError: at call time, ``world_size > 1`` without an initialized process group.

    >>> import torch
    >>> import torch.nn.functional as F
    >>> img, txt = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    >>> SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-10.0)).shape
    torch.Size([])
    """

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, chunk_size: int = 0) -> None:
        super().__init__()
        self.cache_labels = check_bool("cache_labels", cache_labels)
        _check_world(self, rank, world_size)
        if dist_impl is not None:
            check_choice("dist_impl", dist_impl, self.DIST_IMPLS)
        self.dist_impl = dist_impl or "bidir"
        self.chunk_size = check_int("chunk_size", chunk_size, low=0)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        """The loss (``{"contrastive_loss": loss}`` with ``output_dict``) of paired (N, D) features;
        ``logit_bias`` None is a bias of 0 (open_clip adds none then)."""
        gather = self.world_size > 1
        if gather:
            _require_group(self)
        loss = siglip_loss(image_features, text_features, logit_scale, 0.0 if logit_bias is None else logit_bias,
                           gather_distributed=gather)
        return _loss_output(loss, output_dict)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}"


# ----------------------------------------------------------------------------------------------------
# Supervised losses: pytorch-metric-learning's NTXentLoss, SupCon
# ----------------------------------------------------------------------------------------------------

class SupervisedNTXentLoss(nn.Module):
    """pytorch-metric-learning's ``NTXentLoss`` on its default cosine similarity and mean reduction, fused
    (:func:`fastssl.supervised_nt_xent`): every same-label pair (a, p) is a positive, the anchor's
    other-label candidates its negatives, the mean over all positive pairs::

        loss_ap = -log(exp(s_ap) / (exp(s_ap) + sum_{n: label_n != label_a} exp(s_an))),  s = cos / temperature

    The call is pml's: ``loss_fn(embeddings, labels, ref_emb=None, ref_labels=None)``; the result has the
    embeddings' dtype, as pml's (computed in float32, float64 for float64). pml's ``distance``, ``reducer``,
    ``indices_tuple`` and regularizers are not taken. As pml, a call with ``ref_labels`` the labels object
    itself (and ``ref_emb`` the embeddings or None) leaves a == p out; pml also leaves out the pairs (i, i)
    when only the labels object is shared with other ``ref_emb``, which here are positives.

    Args:
        temperature: t > 0 (default 0.07, pml's).

    Raises:
        TypeError, ValueError: a bad temperature; at call time the checks of :func:`fastssl.supervised_nt_xent`.

    >>> import torch
    >>> loss_fn = SupervisedNTXentLoss(temperature=0.1)
    >>> loss_fn(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])).shape
    torch.Size([])
    """

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tensor:
        """The mean loss over the positive pairs of ``embeddings`` (N, D) with ``labels`` (N,) (against
        ``ref_emb`` (M, D) with ``ref_labels`` (M,) when given)."""
        if isinstance(ref_emb, (tuple, list)):
            raise TypeError("ref_emb must be a tensor, got a tuple: pml's third positional argument, "
                            "indices_tuple (a miner's pairs), is not taken here; pass ref_emb= by keyword")
        if ref_labels is labels and (ref_emb is None or ref_emb is embeddings):  # pml: then a == p is left out
            ref_emb = ref_labels = None
        loss = supervised_nt_xent(embeddings, labels, temperature=self.temperature, ref_embeddings=ref_emb,
                                  ref_labels=ref_labels)
        return loss.to(embeddings.dtype)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class SupConLoss(nn.Module):
    """The supervised contrastive loss (Khosla et al., 2020, "Supervised Contrastive Learning", L_out), fused
    (:func:`fastssl.supcon_loss`)::

        loss_i = log sum_{a != i} exp(s_ia) - mean_{p != i, label_p = label_i} s_ip,  s = cos / temperature

    the mean over the rows with a positive. ``features`` (N, D) or (N, views, D) (view-major flattening, as
    the paper's code), ``labels`` (N,).

    Args:
        temperature: t > 0 (default 0.1).

    >>> import torch
    >>> SupConLoss()(torch.randn(4, 2, 8), torch.tensor([0, 1, 0, 1])).shape
    torch.Size([])
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``features`` (N, D) or (N, V, D) with ``labels`` (N,)."""
        return supcon_loss(features, labels, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
