"""Distributed helpers for the contrastive losses (``gather_distributed=True``).

Contrastive losses want every rank's features as negatives. :func:`all_gather_with_grad` concatenates the
ranks' feature batches along dim 0 and keeps the autograd graph: its backward sums the incoming gradient
over the ranks and returns this rank's slice (the convention of open_clip's ``gather_with_grad`` and of
``torch.distributed.nn.all_gather``). With each rank returning the mean loss over its own rows, the
average of the ranks' losses equals the single-process loss on the global batch, and each rank's gradient
for its local features is ``world_size`` times the single-process gradient of those rows, so DDP's
gradient averaging reproduces single-process training exactly (shared/API.md).

Without an initialized process group :func:`all_gather_with_grad` raises ``RuntimeError``;
:func:`rank` and :func:`world_size` answer 0 and 1, as for a single process.

>>> import torch
>>> from fastssl.distributed import is_initialized, rank, world_size
>>> is_initialized(), rank(), world_size()
(False, 0, 1)
>>> all_gather_with_grad(torch.zeros(2, 3))
Traceback (most recent call last):
    ...
RuntimeError: all_gather_with_grad (gather_distributed=True) needs an initialized torch.distributed process group: ...
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_with_grad", "all_gather_local_grad", "is_initialized", "rank", "world_size",
           "require_initialized"]


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 without an initialized process group."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes in the default group; 1 without an initialized process group."""
    return dist.get_world_size() if is_initialized() else 1


def require_initialized(what: str = "gather_distributed=True") -> None:
    """Raise ``RuntimeError`` unless a process group is initialized.

    Args:
        what: the feature that needs it, named in the message.

    Raises:
        RuntimeError: no initialized ``torch.distributed`` process group.
    """
    if not is_initialized():
        raise RuntimeError(
            f"{what} needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (e.g. via torchrun), or pass gather_distributed=False"
        )


def _uses_nccl() -> bool:
    try:
        return dist.get_backend() == dist.Backend.NCCL
    except (RuntimeError, ValueError):  # pragma: no cover - defensive: no default group
        return False


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's ``x`` along dim 0. Backward: sum the gradient over ranks, keep ours."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        grad = grad.contiguous()
        if _uses_nccl():
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        # gloo has no reduce_scatter: all-reduce a copy (never the incoming buffer) and keep our slice.
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.narrow(0, ctx.rank * ctx.rows, ctx.rows).contiguous()


def _all_gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0 (no autograd)."""
    ws = dist.get_world_size()
    x = x.contiguous()
    out = x.new_empty((ws * x.shape[0], *x.shape[1:]))
    if _uses_nccl():
        dist.all_gather_into_tensor(out, x)
    else:  # gloo and others: the list form (views into one buffer, no extra copy after the call)
        n = x.shape[0]
        dist.all_gather([out.narrow(0, i * n, n) for i in range(ws)], x)
    return out


def all_gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` from every rank along dim 0, keeping the gradient.

    Every rank must call it with a tensor of the same shape, dtype and device (the usual DDP setting of
    one per-rank batch size). The result holds rank 0's rows first, then rank 1's, and so on. In the
    backward pass the gradient of the gathered tensor is summed over the ranks and this rank's slice is
    returned: the convention of open_clip's ``gather_with_grad`` and ``torch.distributed.nn.all_gather``.
    Using NCCL the forward is one ``all_gather_into_tensor`` and the backward one
    ``reduce_scatter_tensor``; other backends (gloo) use ``all_gather`` and ``all_reduce``.

    Args:
        x: tensor of shape ``(n, ...)``, the same shape on every rank.

    Returns:
        Tensor of shape ``(world_size * n, ...)``; ``x`` itself (the same graph) when the world size is 1.

    Raises:
        TypeError: ``x`` is not a tensor.
        RuntimeError: no initialized ``torch.distributed`` process group (``gather_distributed=True``
            used in a single process).

    Example (in a process started by ``torchrun --nproc_per_node=2``)::

        z = model(x)                      # (n, d) on each rank
        z_all = all_gather_with_grad(z)   # (2n, d), rank 0's rows first
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    require_initialized("all_gather_with_grad (gather_distributed=True)")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension to gather along dim 0, got a 0-dim tensor")
    if dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_local_grad(x: Tensor, *, local_grad: bool = True) -> Tensor:
    """All-gather ``x`` (as :func:`all_gather_with_grad`) without communicating gradients: the other ranks'
    rows are constants; with ``local_grad`` this rank's own rows are ``x`` itself (its gradient flows back
    locally), else the whole result is detached. open_clip's ``gather_features`` without
    ``gather_with_grad`` (``local_grad`` unless ``local_loss``).

    Raises:
        TypeError: ``x`` is not a tensor.
        RuntimeError: no initialized ``torch.distributed`` process group.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    require_initialized("all_gather_local_grad")
    with torch.no_grad():
        gathered = _all_gather(x.detach())
    if not local_grad:
        return gathered
    n, r = x.shape[0], dist.get_rank()
    return torch.cat((gathered[:r * n], x, gathered[(r + 1) * n:]))
