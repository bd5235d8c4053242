"""fastssl: fused Triton kernels for self-supervised and generative learning in PyTorch.

The public API (shared/API.md) is re-exported here; each capability lives in one slice:
``fastssl.contrastive``, ``fastssl.diffusion`` (with ``fastssl.schedules``, ``fastssl.diffusion_step`` and
``fastssl.sampling``), ``fastssl.propagation`` over ``fastssl.kernels.*``.
"""
__version__ = "0.1.0"

# contrastive slice
from .contrastive import (clip_loss, grad_cache, info_nce, moco_loss, nt_xent, siglip_loss,  # noqa: E402,F401
                          supcon_loss, supervised_nt_xent)
from . import losses  # noqa: E402,F401

# diffusion slice
from .schedules import NoiseSchedule  # noqa: E402,F401
from .diffusion import cfg_combine, ddim_step, ddpm_step, q_sample  # noqa: E402,F401
from .sampling import sample  # noqa: E402,F401


# propagation slice
from .propagation import color_propagate, colorization_loss, propagate_labels  # noqa: E402,F401


def __getattr__(name):
    """``fastssl.schedulers`` loads on first use: with diffusers installed it imports diffusers' configuration
    layer (seconds), which ``import fastssl`` should not pay."""
    if name == "schedulers":
        import importlib

        return importlib.import_module(".schedulers", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
