"""The sampler step of the diffusion slice: DDPM (Algorithm 2) and DDIM in one affine update, with
classifier-free guidance fused in.

One path: :func:`fastssl.ddpm_step`, :func:`fastssl.ddim_step`, the schedulers and :func:`fastssl.sample`
build a :class:`StepSpec` (the step's configuration, validated once), then :func:`apply_step` checks the
step's tensors, decides the backend once and prepares timesteps and noise for it, and runs the custom op
``fastssl::diffusion_step``, whose body launches ``fastssl.kernels.diffusion.diffusion_step_forward`` or
runs the PyTorch path below. Every step, whatever the sampler, prediction and variance type::

    e   = m + w * (m - u)                      (guided model output; e = m without uncond)
    x0  = clip(c1 * x + c2 * e)                (predicted x_0, clamped when clip_sample, or
                                                clamp(x0, -s, s) / s with thresholding; an epsilon model's
                                                formed as (x + k * e) * c1, diffusers' division, which
                                                is +-inf, not NaN, at abar_t = 0: zero terminal SNR)
    out = ca * x0 + cx * x + ce * e + cz * f(v) * z   (z only where t > 0)

with six per-sample coefficients of abar_t and abar_prev (:func:`step_coefficients`, shared by the host and
the PyTorch path; the kernel derives the same in registers). f(v) = 1 but for DDPM's learned variances,
where the model output has 2C channels, m and u are their first C, v the model's last C (diffusers' split),
and f(v) = sqrt(v) (``learned``) or exp((v + 1) / 2 * ck) (``learned_range``, a seventh per-sample
coefficient): a per-element sigma read and computed in the same pass. Dynamic thresholding's s (Saharia et
al. 2022) is a per-sample quantile of |x0|, a reduction the elementwise pass cannot hold: :func:`apply_step`
computes it first with torch ops on the device (one more read of x and the model output(s), and
``torch.quantile``'s per-sample sort; no host sync), and the fused step reads s per sample. These two options
are for sampling: they have no backward.

>>> import torch, fastssl
>>> spec = StepSpec("ddim", eta=0.0)
>>> x_prev, _ = apply_step(spec, torch.zeros(1, 3), 10, torch.ones(1, 3), fastssl.NoiseSchedule.linear(100),
...                        prev_t=-1)
>>> x_prev.shape
torch.Size([1, 3])
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .backend import first_order, runs_on_host, skip_dispatch, use_triton
from .checks import (accumulation_dtype, check_bool, check_choice, check_float, check_guidance, check_int,
                     check_number, check_positive, check_same, check_same_shape)
from .schedules import NoiseSchedule, check_schedule, gather_alphas_cumprod, host_timestep, timestep_tensor

SAMPLERS = ("ddpm", "ddim")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LEARNED_VARIANCES = ("learned", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True)
class StepSpec:
    """One sampler step's configuration, validated when it is built.

    Args:
        sampler: ``"ddpm"`` or ``"ddim"``.
        prediction_type: what the model predicts: ``"epsilon"``, ``"sample"`` (x0) or ``"v_prediction"``.
        variance_type: DDPM's sigma^2, ``"fixed_small"`` (the posterior variance), ``"fixed_large"`` (beta), or
            from the model's second C channels (diffusers' split of a 2C-channel output): ``"learned"`` (v is
            sigma^2) or ``"learned_range"`` (v in [-1, 1] interpolates log sigma^2 between the two fixed ones).
        clip_sample, clip_range: clamp the predicted x0 to ``[-clip_range, clip_range]``.
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding (in place of
            clip_sample, as diffusers): s = clamp(quantile(|x0|, ratio), 1, sample_max_value) per sample, x0 =
            clamp(x0, -s, s) / s.
        eta: DDIM's noise weight (0 for DDPM).
        final_alpha_cumprod: abar for a previous timestep below 0 (diffusers' ``set_alpha_to_one``: 1).
        use_clipped_model_output: DDIM re-derives epsilon from the clipped x0.
        prev_offset: the step goes to ``prev_t + prev_offset`` (prev_t defaults to t: DDPM's -1, the DDIM
            scheduler's ``-(T // num_inference_steps)``), computed in the kernel.
        return_pred_x0: the step also returns the (clamped) predicted x0.
        diffusers_rounding: the step's beta as diffusers' schedulers round it, 1 - fl32(abar_t / abar_prev),
            instead of the exact (abar_prev - abar_t) / abar_prev. fl32's rounding of the ratio (~6e-8) is a
            relative error of ~6e-8 / beta in beta: 3e-4 at t = 1 of the linear schedule, which moves
            diffusers' own test loops by up to ~5e-5 relative; the drop-in schedulers set it to reproduce them.

    Its ``key`` (a string of the fields, made once) is how the custom op carries it; :meth:`from_key` reads
    it back.

    Raises:
        ValueError, TypeError: an option out of range or of the wrong type, naming it.

    >>> StepSpec("ddpm", clip_sample=True).draws_noise
    True
    """

    sampler: str
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = False
    clip_range: float = 1.0
    eta: float = 0.0
    final_alpha_cumprod: float = 1.0
    use_clipped_model_output: bool = False
    prev_offset: int = 0
    return_pred_x0: bool = False
    diffusers_rounding: bool = False
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    def __post_init__(self):
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        fields = (("clip_sample", check_bool("clip_sample", self.clip_sample)),
                  ("clip_range", check_positive("clip_range", self.clip_range)),
                  ("eta", check_number("eta", self.eta, low=0)),
                  ("final_alpha_cumprod", check_number("final_alpha_cumprod", self.final_alpha_cumprod, low=0, high=1)),
                  ("use_clipped_model_output", check_bool("use_clipped_model_output", self.use_clipped_model_output)),
                  ("prev_offset", check_int("prev_offset", self.prev_offset)),
                  ("return_pred_x0", check_bool("return_pred_x0", self.return_pred_x0)),
                  ("diffusers_rounding", check_bool("diffusers_rounding", self.diffusers_rounding)),
                  ("thresholding", check_bool("thresholding", self.thresholding)),
                  ("dynamic_thresholding_ratio", check_number("dynamic_thresholding_ratio",
                                                              self.dynamic_thresholding_ratio, low=0, high=1,
                                                              low_open=True)),
                  ("sample_max_value", check_positive("sample_max_value", self.sample_max_value)))
        for name, value in fields:  # store the checked Python value (an int eta becomes a float, ...)
            if type(value) is not type(getattr(self, name)):
                object.__setattr__(self, name, value)
        if self.sampler == "ddpm" and self.eta != 0:
            raise ValueError(f"eta={self.eta} is a DDIM parameter; use sampler='ddim' (DDPM's noise is fixed by "
                             "variance_type)")
        if self.sampler == "ddim" and self.variance_type != "fixed_small":
            raise ValueError(f"variance_type={self.variance_type!r} is a DDPM option; DDIM's noise is set by eta")
        # the spec as a string, how the custom op carries it (from_key reads it back); made once
        object.__setattr__(self, "key", ";".join(str(getattr(self, name)) for name in _FIELD_TYPES))

    @property
    def draws_noise(self) -> bool:
        """Whether the step adds noise (DDPM always, DDIM when eta > 0)."""
        return self.sampler == "ddpm" or self.eta > 0

    @property
    def terms(self) -> tuple[bool, bool]:
        """Whether ``out`` has its ``cx * x`` and its ``ce * e`` term: DDPM's mean has no e term, nor has DDIM
        re-deriving eps from the clipped x0; DDIM with an epsilon model has no x term (x enters through x0
        only). Both backends leave an absent term out rather than add 0 * it, so an inf there gives what the
        literal formula gives."""
        ddim, plain = self.sampler == "ddim", not self.use_clipped_model_output
        return not (ddim and plain and self.prediction_type == "epsilon"), ddim and plain

    @property
    def learned_variance(self) -> bool:
        """Whether the model output carries the variance in its second C channels."""
        return self.variance_type in LEARNED_VARIANCES

    def options(self) -> dict:
        """The fields by name: the keyword arguments of the kernel launchers."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_key(key: str) -> "StepSpec":
        return StepSpec(**{name: parse(text) for (name, parse), text in zip(_FIELD_TYPES.items(), key.split(";"))})


_KEPT_SPECS = functools.lru_cache(maxsize=256, typed=True)(StepSpec)


def step_spec(sampler: str, **options) -> StepSpec:
    """``StepSpec(sampler, **options)``, validated when first built and then kept: the public steps call this
    once per call, so a sampling loop's repeated configuration costs a lookup, not a validation."""
    if torch.compiler.is_compiling():  # dynamo traces the construction instead of the cache
        return StepSpec(sampler, **options)
    try:
        return _KEPT_SPECS(sampler, **options)
    except TypeError:  # an unhashable or ill-typed option: build it here, so the check names it
        return StepSpec(sampler, **options)


_PARSERS = {"str": str, "float": float, "int": int, "bool": lambda text: text == "True"}
_FIELD_TYPES = {f.name: _PARSERS[f.type] for f in dataclasses.fields(StepSpec)}  # str(value) -> value, by field


# ----------------------------------------------------------------------------------------------------
# The coefficients, derived once for the host (numpy) and the PyTorch path (torch)
# ----------------------------------------------------------------------------------------------------

def _derive(spec: StepSpec, a_t, a_p, noisy, at_least, where):
    """(c1, c2, ca, cx, ce, cz, ck, k) from abar_t and abar_prev in float64: Python floats, numpy scalars or
    arrays, or tensors, with ``at_least`` (max) and ``where`` (select) for that kind. Differences of nearby
    abar are formed as (abar_prev - abar_t) / abar_prev. A coefficient that is zero by construction (DDPM's
    ce, cx of DDIM for an epsilon model) is exactly 0: both backends then leave its term out. ck is
    learned_range's rate (0 otherwise): with var = max(fixed_small's sigma^2, 1e-20), sigma = sqrt(var) *
    exp((v + 1) / 2 * ck), ck = log(beta / var) / 2, which is diffusers' exp(((1 - frac) log var + frac log
    beta) / 2), frac = (v + 1) / 2; ``learned`` has cz = 1 and sigma = sqrt(v). k is how an epsilon model's x0
    is formed, (x + k * e) * c1 with k = -sqrt(1 - abar_t) (:func:`_x0`: at abar_t = 0 that is diffusers' +-inf,
    where c1 * x + c2 * e is inf - inf); c2 for the other prediction types."""
    b_t, b_p = 1 - a_t, 1 - a_p
    # the current (strided) step's beta
    beta = 1 - _round32(a_t / a_p) if spec.diffusers_rounding else (a_p - a_t) / a_p
    sa, sb = a_t ** 0.5, b_t ** 0.5
    zero = 0 * sa
    # x0 = c1 * x + c2 * e and eps = d1 * x + d2 * e, by prediction type
    if spec.prediction_type == "epsilon":
        c1, c2, d1, d2 = 1 / sa, -sb / sa, zero, zero + 1
    elif spec.prediction_type == "sample":
        c1, c2, d1, d2 = zero, zero + 1, 1 / sb, -sa / sb
    else:  # v_prediction
        c1, c2, d1, d2 = sa, -sb, sb, sa
    if spec.sampler == "ddpm":  # posterior mean of formula (7); sigma^2 fixed_small (clamped) or fixed_large
        beta = where(beta < 0, math.nan, beta)  # a step to a later timestep has no posterior: NaN, not a number
        ca, cx, ce = a_p ** 0.5 * beta / b_t, (a_t / a_p) ** 0.5 * b_p / b_t, zero
        var = at_least(b_p / b_t * beta, 1e-20)
        cz = beta ** 0.5 if spec.variance_type == "fixed_large" else zero + 1 if spec.variance_type == "learned" \
            else var ** 0.5
        ck = 0.5 * _log(beta / var) if spec.variance_type == "learned_range" else zero
    else:  # DDIM (formula 12); eta = 0 has no variance term (a step to a later timestep, inversion, has var < 0)
        ck, cz = zero, spec.eta * (b_p / b_t * beta) ** 0.5 if spec.eta else zero
        direction = at_least(b_p - cz * cz, 0.0) ** 0.5
        if spec.use_clipped_model_output:  # eps re-derived from the clipped x0: (x - sa * x0) / sb
            ca, cx, ce = a_p ** 0.5 - direction * sa / sb, direction / sb, zero
            if not (spec.clip_sample or spec.thresholding):  # x0 unclamped: at abar_t = 0 it is +-inf, c1 = inf,
                ca = ca + 0 * c1  # and diffusers' sa * x0 = 0 * inf makes the step NaN: so does 0 * c1 here
        else:
            ca, cx, ce = a_p ** 0.5, direction * d1, direction * d2
    k = -sb if spec.prediction_type == "epsilon" else c2
    return c1, c2, ca, cx, ce, where(noisy, cz, zero), ck, k  # never noise where t == 0


def _round32(x):
    """``x`` rounded to float32 and back, for each kind _derive takes (float, numpy, tensor)."""
    if isinstance(x, Tensor):
        return x.float().double()
    return np.float32(x).astype(np.float64) if isinstance(x, np.ndarray) else float(np.float32(x))


def _log(x):
    """The natural log for each kind _derive takes (a float's math.log raises where numpy gives -inf/NaN)."""
    return torch.log(x) if isinstance(x, Tensor) else np.log(x) if isinstance(x, (np.ndarray, np.floating)) else \
        math.log(x)


def _host_coefficients(spec: StepSpec, a_t: float, a_p: float, noisy: bool) -> tuple:
    """The coefficients of one host timestep as Python floats: derived with float arithmetic (a tenth of
    numpy scalars' cost, which dominated small CPU steps); where that raises or leaves the reals (a degenerate
    schedule, DDIM with prev_t > t) numpy's IEEE semantics give the inf/NaN the kernel gives."""
    try:
        coeffs = _derive(spec, a_t, a_p, noisy, max, lambda c, a, b: a if c else b)
        if not any(isinstance(c, complex) for c in coeffs):
            return coeffs
    except (ZeroDivisionError, ValueError):  # ValueError: math.log of a value <= 0
        pass
    with np.errstate(all="ignore"):
        return tuple(map(float, _derive(spec, np.float64(a_t), np.float64(a_p), noisy, np.maximum, np.where)))


@functools.lru_cache(maxsize=1024)
def _kept_coefficients(key: str, a_t: float, a_p: float, noisy: bool) -> tuple:
    """:func:`_host_coefficients` kept per spec and abar pair: a sampling loop repeats its timesteps for every
    batch it draws, and deriving them costs as much as a small step's arithmetic."""
    return _host_coefficients(StepSpec.from_key(key), a_t, a_p, noisy)


def step_coefficients(spec: StepSpec, alphas_cumprod: Tensor, t, prev_t) -> tuple:
    """The step's per-sample coefficients (c1, c2, ca, cx, ce, cz, ck, k: :func:`_derive`) for timesteps ``t``
    and ``prev_t + spec.prev_offset``: int64 tensors, or Python ints (one timestep on the host,
    :func:`apply_step`'s eager CPU path, which passes ``alphas_cumprod`` as the schedule's list of floats).

    On the host (ints, or CPU tensors in eager mode) they come from Python floats for one timestep and
    float64 (B,) numpy arrays for per-sample timesteps; elsewhere float64 device tensors (no host sync)."""
    below = spec.final_alpha_cumprod
    host_ints = isinstance(t, int)
    if host_ints or (t.device.type == "cpu" and not torch.compiler.is_compiling()):
        table = alphas_cumprod if isinstance(alphas_cumprod, list) else alphas_cumprod.numpy()
        if host_ints or (t.numel() == 1 and prev_t.numel() == 1):
            ti, pi = int(t), int(prev_t) + spec.prev_offset
            a_t = float(table[ti]) if ti < len(table) else math.nan
            a_p = below if pi < 0 else float(table[pi]) if pi < len(table) else math.nan
            return _kept_coefficients(spec.key, a_t, a_p, ti > 0)
        with np.errstate(all="ignore"):
            tn, pn = np.broadcast_arrays(t.numpy(), prev_t.numpy() + spec.prev_offset)
            return _derive(spec, gather_alphas_cumprod(table, tn, float("nan")),
                           gather_alphas_cumprod(table, pn, below), tn > 0, np.maximum, np.where)
    return _derive(spec, gather_alphas_cumprod(alphas_cumprod, t, float("nan")),
                   gather_alphas_cumprod(alphas_cumprod, prev_t + spec.prev_offset, below), t > 0,
                   torch.clamp_min, torch.where)


def _views(coeffs, like: Tensor) -> list:
    """Coefficients as the elementwise ops take them: Python floats stay floats (the cheapest broadcast),
    per-sample values (numpy arrays from the host, or tensors) become (B, 1, ..., 1) tensors in the math
    dtype, made by one conversion."""
    if all(isinstance(c, float) for c in coeffs):
        return list(coeffs)
    acc = accumulation_dtype(like.dtype)
    if isinstance(coeffs[0], np.ndarray):  # host math: stack, round and shape in numpy, then one tensor
        stacked = torch.from_numpy(np.stack(coeffs).astype(np.float64 if acc == torch.float64 else np.float32))
    else:
        stacked = torch.stack(torch.broadcast_tensors(*[c.reshape(-1) for c in coeffs])).to(acc)
    return list(stacked.reshape(len(coeffs), -1, *([1] * (like.dim() - 1))).unbind(0))


def _per_sample(v, like: Tensor):
    """A weight (a float, or a (1,) or (B,) tensor) as a Python float (one weight on the CPU) or a
    (B or 1, 1, ...) view."""
    if isinstance(v, float):
        return v
    if v.numel() == 1 and v.device.type == "cpu" and not torch.compiler.is_compiling():
        return float(v.reshape(()))
    return v.to(accumulation_dtype(like.dtype)).reshape(-1, *([1] * (like.dim() - 1)))


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: itself when it already is (``Tensor.to`` costs a dispatch even then)."""
    return t if t.dtype == dtype else t.to(dtype)


def add_scaled_(out: Tensor, t: Tensor, c) -> Tensor:
    """out += c * t in place, one pass; c a float or a broadcastable tensor."""
    return out.add_(t, alpha=c) if isinstance(c, float) else out.addcmul_(t, c)


@functools.lru_cache(maxsize=4096)
def _kept_scalar(value: float, dtype: torch.dtype) -> Tensor:
    """A 0-dim CPU tensor holding ``value``, kept per value and dtype (read-only: only ever a multiplier)."""
    return torch.full((), value, dtype=dtype, device="cpu")


def _factor(t: Tensor, c):
    """A float factor as the multiply takes it fastest: on the CPU, as a kept 0-dim tensor of t's dtype (a
    Python float is wrapped into a tensor at every call, half the cost of a 16K-element multiply)."""
    return _kept_scalar(c, t.dtype) if isinstance(c, float) and t.device.type == "cpu" else c


def scaled(t: Tensor, c) -> Tensor:
    """t * c in a new buffer; c a float or a broadcastable tensor."""
    return torch.mul(t, _factor(t, c))


def scale_(t: Tensor, c) -> Tensor:
    """t *= c in place; c a float or a broadcastable tensor."""
    return t.mul_(_factor(t, c))


# ----------------------------------------------------------------------------------------------------
# The PyTorch path (forward and backward)
# ----------------------------------------------------------------------------------------------------

def _mean_half(output: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """A model output's mean part: its first C channels where it has 2C (a learned variance), else itself."""
    return output if output is None or output.shape == like.shape else output[:, :like.shape[1]]


def _guided(model_output, uncond_output, guidance, acc):
    e = as_dtype(model_output, acc)
    if uncond_output is None:
        return e, None
    w = _per_sample(guidance, model_output)
    return torch.lerp(as_dtype(uncond_output, acc), e, 1.0 + w), w  # (1 + w) * m - w * u, one pass


def _noise_scale(spec: StepSpec, model_output: Tensor, like: Tensor, ck, acc):
    """f(v) of a learned variance (module docstring), from the model output's last C channels; None else."""
    if not spec.learned_variance:
        return None
    v = as_dtype(model_output[:, like.shape[1]:], acc)
    return v.sqrt() if spec.variance_type == "learned" else torch.exp(torch.mul(v + 1, 0.5 * ck))


def predicted_x0(spec: StepSpec, model_output, uncond_output, x_t, t, prev_t, guidance, alphas_cumprod) -> Tensor:
    """The unclamped predicted x0 (:func:`_x0`) in the math dtype (a buffer of its own)."""
    acc = accumulation_dtype(x_t.dtype)
    c1, c2, *_, k = _views(step_coefficients(spec, alphas_cumprod, t, prev_t), x_t)
    e, _ = _guided(_mean_half(model_output, x_t), _mean_half(uncond_output, x_t), guidance, acc)
    return _x0(spec, as_dtype(x_t, acc), e, c1, c2, k)


def _x0(spec: StepSpec, x: Tensor, e: Tensor, c1, c2, k) -> Tensor:
    """The unclamped predicted x0 in a buffer of its own, two passes: c1 * x + c2 * e, but for an epsilon
    model (x + k * e) * c1, diffusers' (x - sqrt(1 - abar_t) e) / sqrt(abar_t), so that abar_t = 0 (zero
    terminal SNR, c1 = inf) gives its +-inf (clip_sample then clamps it to +-clip_range), not inf - inf = NaN."""
    if spec.prediction_type == "epsilon":
        return scale_(torch.add(x, e, alpha=k) if isinstance(k, float) else torch.addcmul(x, e, k), c1)
    return add_scaled_(scaled(x, c1), e, c2)


def _finite(c) -> Optional[bool]:
    """Whether a coefficient (a float, or per-sample values) is finite everywhere: None for device tensors,
    which reading would sync."""
    if isinstance(c, float):
        return math.isfinite(c)
    return bool(np.isfinite(c).all()) if isinstance(c, np.ndarray) else None


def dynamic_threshold(spec: StepSpec, x0: Tensor) -> Tensor:
    """Imagen's dynamic threshold per sample as diffusers' ``_threshold_sample`` takes it: s =
    clamp(quantile(|x0|, dynamic_thresholding_ratio), min=1, max=sample_max_value) over each sample's x0, (B,)."""
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), spec.dynamic_thresholding_ratio, dim=1)
    return torch.clamp(s, min=1, max=spec.sample_max_value)


def _step_torch(spec: StepSpec, model_output, uncond_output, x_t, noise, t, prev_t, guidance, threshold,
                alphas_cumprod):
    """Per-sample coefficients, then in-place passes over fresh buffers. Without clipping (and without
    pred_x0 wanted) the x0 stage is folded into the coefficients: 3 passes (x, e, noise) plus the lerp; with
    clipping at one host timestep, c1 is taken out of the clamp (4 passes for DDIM, 5 for DDPM). An epsilon
    model at abar_t = 0 (c1 = inf: zero terminal SNR) is not folded, as in the kernel: x0 = (x + k e) * c1 is
    +-inf there, as in diffusers, where the folded map would give inf - inf. Per-sample coefficients on a
    device cannot be read without a sync: there an epsilon model's step forms x0 first (one pass more), which
    gives the kernel's result but for an inf input (the kernel folds where c1 is finite)."""
    acc = accumulation_dtype(x_t.dtype)
    coeffs = step_coefficients(spec, alphas_cumprod, t, prev_t)
    x = as_dtype(x_t, acc)
    e, _ = _guided(_mean_half(model_output, x_t), _mean_half(uncond_output, x_t), guidance, acc)
    x0 = None
    staged = spec.clip_sample or spec.thresholding or spec.return_pred_x0
    fold = not staged and (spec.prediction_type != "epsilon" or _finite(coeffs[0]))
    if fold:
        c1, c2, ca, cx, ce, cz, ck, _ = coeffs  # out = (ca c1 + cx) x + (ca c2 + ce) e + cz f(v) z
        kx, ke, cz, ck = _views((ca * c1 + cx, ca * c2 + ce, cz, ck), x_t)
        out = add_scaled_(scaled(x, kx), e, ke)
    elif (spec.clip_sample and not (spec.thresholding or spec.return_pred_x0) and isinstance(coeffs[0], float)
          and 0 < coeffs[0] < math.inf):
        # one timestep on the host: clamp(c1 x + c2 e, +-r) = c1 clamp(x + (c2 / c1) e, +-r / c1), one pass fewer
        c1, c2, ca, cx, ce, cz, ck, _ = coeffs
        bound = spec.clip_range / c1
        out = scale_(torch.add(x, e, alpha=c2 / c1).clamp_(-bound, bound), ca * c1)
    elif not staged:  # an epsilon model whose c1 is infinite, or not known to be finite: ca times x0, in its pass
        c1, c2, ca, cx, ce, cz, ck, k = _views(coeffs, x_t)
        out = _x0(spec, x, e, ca * c1, ca * c2, k)
    else:
        c1, c2, ca, cx, ce, cz, ck, k = _views(coeffs, x_t)
        x0 = _x0(spec, x, e, c1, c2, k)
        if spec.thresholding:
            s = threshold.to(acc).reshape(-1, *([1] * (x0.dim() - 1)))
            x0.clamp_(-s, s).div_(s)
        elif spec.clip_sample:
            x0.clamp_(-spec.clip_range, spec.clip_range)
        out = scaled(x0, ca) if spec.return_pred_x0 else scale_(x0, ca)  # x0's buffer when it is not returned
    if not fold:
        x_term, e_term = spec.terms
        if x_term:
            add_scaled_(out, x, cx)
        if e_term:
            add_scaled_(out, e, ce)
    z = None if noise is None else _noise_where_stepping(as_dtype(noise, acc), t)
    if z is not None:
        scale = _noise_scale(spec, model_output, x_t, ck, acc)
        add_scaled_(out, z if scale is None else scale.mul_(z), cz)
    out = as_dtype(out, x_t.dtype).contiguous()  # a copy only for non-contiguous inputs
    return out, (as_dtype(x0, x_t.dtype).contiguous() if spec.return_pred_x0 else x_t.new_empty(0))


def _noise_where_stepping(z: Tensor, t: Tensor):
    """``z`` with the samples at t == 0 zeroed (their coefficient is 0, and 0 * NaN would be NaN: noise is
    never added there, a NaN or inf in it included, as in the kernel and diffusers): ``z`` itself when every
    t > 0 (known on the host without a pass); None (no noise term) when the one timestep is 0."""
    steps = _host_values(t)
    if steps is not None:
        if _every(steps > 0):
            return z
        if np.size(steps) == 1:
            return None
    return torch.where((t > 0).reshape(-1, *([1] * (z.dim() - 1))), z, 0.0)


def _step_backward_torch(spec: StepSpec, grad, grad_pred_x0, model_output, uncond_output, x_t, t, prev_t, guidance,
                         alphas_cumprod, want_grad_noise):
    acc = accumulation_dtype(grad.dtype)
    c1, c2, ca, cx, ce, cz, _, k = _views(step_coefficients(spec, alphas_cumprod, t, prev_t), grad)
    g = grad.to(acc)
    g_x0 = torch.mul(g, ca)
    if grad_pred_x0 is not None:
        g_x0.add_(grad_pred_x0.to(acc))
    w = None if uncond_output is None else _per_sample(guidance, grad)
    if spec.clip_sample:  # the clamp passes the gradient where -r <= x0 <= r
        e, _ = _guided(model_output, uncond_output, guidance, acc)
        x0 = _x0(spec, x_t.to(acc), e, c1, c2, k)  # as the forward forms it
        g_x0.mul_((x0 >= -spec.clip_range) & (x0 <= spec.clip_range))
    g_e = add_scaled_(torch.mul(g_x0, c2), g, ce)
    g_x = add_scaled_(torch.mul(g_x0, c1), g, cx)
    grad_model = g_e if w is None else g_e * (1.0 + w)
    # an absent gradient is an empty tensor of its own: a custom op's outputs may not alias one another
    grad_uncond = grad.new_empty(0) if w is None else -w * g_e
    grad_noise = torch.mul(g, cz).to(grad.dtype).contiguous() if want_grad_noise else grad.new_empty(0)
    return (grad_model.to(grad.dtype).contiguous(), grad_uncond.to(grad.dtype).contiguous(),
            g_x.to(grad.dtype).contiguous(), grad_noise)


# ----------------------------------------------------------------------------------------------------
# The custom op: one body per direction, run by the backend apply_step chose
# ----------------------------------------------------------------------------------------------------

def _step_body(model_output: Tensor, uncond_output: Optional[Tensor], x_t: Tensor, noise: Optional[Tensor],
               seed: Optional[Tensor], t: Tensor, prev_t: Tensor, guidance: Optional[Tensor],
               threshold: Optional[Tensor], alphas_cumprod: Tensor, spec: str, triton: bool) -> tuple[Tensor, Tensor]:
    """The forward op's body: the step on the backend apply_step chose (``spec``: a StepSpec key;
    ``threshold``: the per-sample s of dynamic thresholding, else None)."""
    step = StepSpec.from_key(spec)
    if triton:
        from .kernels.diffusion import diffusion_step_forward

        return diffusion_step_forward(model_output=model_output, uncond_output=uncond_output, x_t=x_t, noise=noise,
                                      seed=seed, t=t, prev_t=prev_t, guidance=guidance, threshold=threshold,
                                      alphas_cumprod=alphas_cumprod, **step.options())
    if seed is not None:
        raise RuntimeError("fastssl::diffusion_step: a Philox seed needs the Triton kernels; the PyTorch path reads noise")
    return _step_torch(step, model_output, uncond_output, x_t, noise, t, prev_t, guidance, threshold, alphas_cumprod)


_step_op = torch.library.custom_op("fastssl::diffusion_step", _step_body, mutates_args=())


@_step_op.register_fake
def _(model_output, uncond_output, x_t, noise, seed, t, prev_t, guidance, threshold, alphas_cumprod, spec, triton):
    out = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    return out, (torch.empty_like(out) if StepSpec.from_key(spec).return_pred_x0 else x_t.new_empty(0))


# Options only the forward kernel takes: the steps that use the last three have no backward (apply_step).
_FORWARD_ONLY = ("return_pred_x0", "thresholding", "dynamic_thresholding_ratio", "sample_max_value")


@torch.library.custom_op("fastssl::diffusion_step_backward", mutates_args=())
def _step_backward_op(grad: Tensor, grad_pred_x0: Optional[Tensor], model_output: Tensor,
                      uncond_output: Optional[Tensor], x_t: Tensor, t: Tensor, prev_t: Tensor,
                      guidance: Optional[Tensor], alphas_cumprod: Tensor, spec: str, triton: bool,
                      want_grad_noise: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    step = StepSpec.from_key(spec)
    tensors = dict(grad=grad, grad_pred_x0=grad_pred_x0, model_output=model_output, uncond_output=uncond_output,
                   x_t=x_t, t=t, prev_t=prev_t, guidance=guidance, alphas_cumprod=alphas_cumprod,
                   want_grad_noise=want_grad_noise)
    if triton:
        from .kernels.diffusion import diffusion_step_backward

        return diffusion_step_backward(**tensors, **{k: v for k, v in step.options().items() if k not in _FORWARD_ONLY})
    return _step_backward_torch(step, **tensors)


@_step_backward_op.register_fake
def _(grad, grad_pred_x0, model_output, uncond_output, x_t, t, prev_t, guidance, alphas_cumprod, spec, triton,
      want_grad_noise):
    like = torch.empty_like(grad, memory_format=torch.contiguous_format)
    return (like, torch.empty_like(like) if uncond_output is not None else grad.new_empty(0), torch.empty_like(like),
            torch.empty_like(like) if want_grad_noise else grad.new_empty(0))


def _step_setup(ctx, inputs, output):
    model_output, uncond_output, x_t, noise, seed, t, prev_t, guidance, threshold, alphas_cumprod, spec, triton = inputs
    ctx.spec, ctx.triton = spec, triton
    ctx.has_uncond, ctx.has_noise = uncond_output is not None, noise is not None
    # The kernel re-reads model/uncond/x only when clipping (and the guidance gradient needs m - u).
    keep = StepSpec.from_key(spec).clip_sample or (guidance is not None and guidance.requires_grad)
    ctx.save_for_backward(model_output if keep else None, uncond_output if keep else None, x_t if keep else None,
                          t, prev_t, guidance, alphas_cumprod)


@first_order("fastssl's diffusion step (ddpm_step, ddim_step)")
def _step_backward(ctx, grad, grad_pred_x0):
    model_output, uncond_output, x_t, t, prev_t, guidance, alphas_cumprod = ctx.saved_tensors
    like = grad if model_output is None else model_output  # any tensor of the right shape when not re-read
    want_noise = ctx.has_noise and ctx.needs_input_grad[3]
    grad_model, grad_uncond, grad_x, grad_noise = _step_backward_op(
        grad=grad, grad_pred_x0=grad_pred_x0 if StepSpec.from_key(ctx.spec).return_pred_x0 else None,
        model_output=like, uncond_output=(like if uncond_output is None else uncond_output) if ctx.has_uncond else None,
        x_t=grad if x_t is None else x_t, t=t, prev_t=prev_t, guidance=guidance, alphas_cumprod=alphas_cumprod,
        spec=ctx.spec, triton=ctx.triton, want_grad_noise=want_noise)
    grad_guidance = None
    if guidance is not None and guidance.requires_grad:  # d x_prev / d w = (m - u) * d/de, summed per sample
        acc = accumulation_dtype(grad.dtype)
        g_e = grad_model.to(acc) + grad_uncond.to(acc)  # (1 + w) g_e - w g_e
        prod = (model_output.to(acc) - uncond_output.to(acc)) * g_e
        grad_guidance = prod.sum() if guidance.numel() == 1 else prod.reshape(prod.shape[0], -1).sum(1)
        grad_guidance = grad_guidance.reshape(guidance.shape).to(guidance.dtype)
    return (grad_model, grad_uncond if ctx.has_uncond else None, grad_x, grad_noise if want_noise else None, None,
            None, None, grad_guidance, None, None, None, None)


_step_op.register_autograd(_step_backward, setup_context=_step_setup)


# ----------------------------------------------------------------------------------------------------
# Noise, and the one way into the step
# ----------------------------------------------------------------------------------------------------

def check_generator(generator, noise) -> None:
    """``generator`` is None, an int64 seed or a torch.Generator, and not given with ``noise``."""
    if isinstance(generator, numbers.Integral) and not isinstance(generator, (bool, np.bool_)):
        check_int("generator", generator, low=-2**63, high=2**63 - 1)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")
    if generator is not None and noise is not None:
        raise ValueError("pass either noise or generator, not both (noise is used as given)")
    if isinstance(generator, torch.Generator) and torch.compiler.is_compiling():
        raise ValueError("generator: a torch.Generator cannot be traced by torch.compile (an opaque object to "
                         "dynamo); pass an int seed, or draw the noise outside and pass noise=")


def philox_seeds(generator, count: int, device) -> Tensor:
    """``count`` int64 Philox seeds on ``device`` for the kernels' in-kernel noise, without a host sync: an
    int seed is used as given (count 1), a torch.Generator draws them (so it advances: fresh noise each
    call), None draws them from the device's default generator."""
    if isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (count,), generator=generator, device=generator.device, dtype=torch.long)
        return seeds.to(device, non_blocking=True)
    if generator is None:
        return torch.randint(0, 2**62, (count,), device=device, dtype=torch.long)
    return torch.full((count,), int(generator), dtype=torch.long, device=device)


def _seeded_noise_body(like: Tensor, seed: int) -> Tensor:
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


# An int seed's noise as an op: a Generator made inside a compiled region is opaque to dynamo, an op is not.
_seeded_noise = torch.library.custom_op("fastssl::seeded_noise", _seeded_noise_body, mutates_args=())


@_seeded_noise.register_fake
def _(like, seed):
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def torch_noise(generator, like: Tensor) -> Tensor:
    """Standard normal noise like ``like`` drawn as diffusers' ``randn_tensor`` draws it (an int seeds a
    fresh generator on like's device; under torch.compile through ``fastssl::seeded_noise``, the same
    draw)."""
    if generator is None:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    if not isinstance(generator, torch.Generator):
        return (_seeded_noise if torch.compiler.is_compiling() else _seeded_noise_body)(like, int(generator))
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


def guidance_tensor(guidance, uncond_output: Optional[Tensor], like: Tensor, *, keep_float: bool = False):
    """The guidance as the op takes it: None without uncond_output, else one weight (a float becomes a (1,)
    tensor, or stays a float with ``keep_float``) or one per sample, in the math dtype on like's device."""
    guidance = check_guidance("guidance", guidance, like, "model_output")
    if uncond_output is None:
        if isinstance(guidance, Tensor):
            raise ValueError("guidance is a tensor but uncond_output is None: guidance needs the unconditional output")
        if guidance != 0:
            raise ValueError(f"guidance={guidance} needs uncond_output (classifier-free guidance combines the "
                             "conditional model_output with the unconditional one)")
        return None
    if isinstance(guidance, Tensor):
        return guidance.to(accumulation_dtype(like.dtype)).reshape(-1)
    return guidance if keep_float else guidance_weight(guidance, like)


def guidance_weight(value: float, like: Tensor) -> Tensor:
    """A float guidance as the op's (1,) weight in the math dtype on like's device."""
    acc = accumulation_dtype(like.dtype)
    if torch.compiler.is_compiling():
        return torch.full((1,), value, dtype=acc, device=like.device)
    return _weight(value, like.device, acc)


@functools.lru_cache(maxsize=64)
def _weight(value: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A one-element guidance table, kept per value, device and dtype (read-only: never written, never
    returned to the caller), so an eager step with a float guidance launches no fill."""
    return torch.full((1,), value, dtype=dtype, device=device)


def _check_step_tensors(spec: StepSpec, model_output, x_t, uncond_output, noise) -> None:
    check_float("model_output", model_output)
    check_float("x_t", x_t)
    check_same(("x_t", "model_output"), (x_t, model_output))
    if x_t.dim() == 0:
        raise ValueError("x_t must have a batch dimension (B, ...), got a 0-dim tensor")
    if spec.learned_variance:
        need = (x_t.shape[0], 2 * x_t.shape[1], *x_t.shape[2:]) if x_t.dim() >= 2 else None
        if tuple(model_output.shape) != need:
            raise ValueError(f"variance_type={spec.variance_type!r} needs model_output of shape (B, 2C, ...) = {need} "
                             f"for x_t {tuple(x_t.shape)} (the mean's C channels, then the variance's), got "
                             f"{tuple(model_output.shape)}")
    else:
        check_same_shape(("x_t", "model_output"), (x_t, model_output))
    for name, value, like in (("uncond_output", uncond_output, model_output), ("noise", noise, x_t)):
        if value is not None:
            check_float(name, value)
            check_same(("x_t", name), (x_t, value))
            check_same_shape(("model_output" if like is model_output else "x_t", name), (like, value))


def _some(flags) -> bool:
    """np.any of host comparisons, without numpy's reduce (~10 us) where they are one Python bool (int
    timesteps: the common eager step, where three such checks cost as much as a 16K-element step's math)."""
    return flags if isinstance(flags, bool) else bool(np.any(flags))


def _every(flags) -> bool:
    """np.all, as :func:`_some`."""
    return flags if isinstance(flags, bool) else bool(np.all(flags))


def _host_values(t):
    """Timesteps as the host reads them: a Python int as it is, a CPU tensor as a numpy array; None where
    reading them would sync (a device tensor, or under torch.compile)."""
    if isinstance(t, int):
        return t
    return None if t.device.type != "cpu" or torch.compiler.is_compiling() else t.numpy()


def _check_direction(spec: StepSpec, t, prev_t) -> None:
    """DDPM, and DDIM with eta > 0, step to an earlier timestep (prev_t + prev_offset <= t); only DDIM with
    eta = 0 may step to a later one (inversion, as diffusers' DDIMInverseScheduler). Checked where the
    timesteps are on the host; on CUDA (no sync) such a step comes out NaN."""
    if spec.sampler == "ddim" and spec.eta == 0:
        return
    steps, targets = _host_values(t), _host_values(prev_t)
    if steps is None or not _some(targets + spec.prev_offset > steps):
        return
    what = "DDPM" if spec.sampler == "ddpm" else f"DDIM with eta={spec.eta}"
    raise ValueError(f"prev_t must not be after t for {what} (a step goes to an earlier timestep; only DDIM with "
                     f"eta=0 inverts), got t={np.asarray(steps).tolist()} and prev_t="
                     f"{np.asarray(targets + spec.prev_offset).tolist()}")


def _timesteps(t, prev_t, schedule: NoiseSchedule, batch: int, device, host: bool):
    """(t, prev_t) as the step takes them: Python ints on the host path when both are ints (no tensor to
    make or read back), else int64 tensors (:func:`fastssl.schedules.timestep_tensor`); prev_t None is t."""
    if host:
        step = host_timestep("t", t, schedule)
        target = step if prev_t is None else host_timestep("prev_t", prev_t, schedule, allow_negative=True)
        if step is not None and target is not None:
            return step, target
    t = timestep_tensor("t", t, schedule, batch, device)
    return t, (t if prev_t is None else timestep_tensor("prev_t", prev_t, schedule, batch, device, allow_negative=True))


def _draws(spec: StepSpec, t) -> bool:
    """Whether the PyTorch path draws noise for a step that adds some, as diffusers' schedulers draw it: DDIM
    (eta > 0) always, at t == 0 too, where its std is 0 (diffusers' DDIMScheduler calls randn_tensor whenever
    eta > 0); DDPM only when some sample steps from t > 0 (DDPMScheduler draws only ``if t > 0``), read on the
    host and assumed for device timesteps (reading them would sync), so a shared generator advances as
    diffusers' does."""
    if spec.sampler == "ddim":
        return True
    steps = _host_values(t)
    return True if steps is None else _some(steps > 0)


def apply_step(spec: StepSpec, model_output: Tensor, t, x_t: Tensor, schedule: NoiseSchedule, *, prev_t=None,
               noise: Optional[Tensor] = None, generator=None, seed: Optional[Tensor] = None,
               uncond_output: Optional[Tensor] = None, guidance=0.0) -> tuple[Tensor, Tensor]:
    """Check one step's tensors (metadata only), decide the backend, prepare timesteps and noise, and run
    the step: returns (x_prev, pred_x0 or an empty tensor).

    ``prev_t`` defaults to ``t`` (the step then goes to ``t + spec.prev_offset``). Noise: ``noise`` as given;
    else, when the spec draws noise, drawn from ``generator`` (Triton: a Philox seed, or ``seed``, a (1,)
    int64 device tensor prepared by the caller; PyTorch: :func:`torch_noise` where diffusers' schedulers
    draw, :func:`_draws`)."""
    _check_step_tensors(spec, model_output, x_t, uncond_output, noise)
    check_schedule(schedule)
    check_generator(generator, noise)
    guidance = guidance_tensor(guidance, uncond_output, model_output, keep_float=True)
    batch, device = x_t.shape[0], x_t.device
    weight = guidance if isinstance(guidance, Tensor) else None
    # eager on the CPU with nothing to differentiate: the PyTorch path runs here, int timesteps stay ints
    host = runs_on_host(model_output, uncond_output, x_t, noise, weight)
    triton = not host and use_triton(x_t)
    direct = host or skip_dispatch(model_output, uncond_output, x_t, noise, weight)
    t, prev_t = _timesteps(t, prev_t, schedule, batch, device, host)
    _check_direction(spec, t, prev_t)
    if isinstance(guidance, float) and not host:
        guidance = guidance_weight(guidance, model_output)
    if not spec.draws_noise:
        noise = seed = None
    elif noise is None and triton:
        seed = philox_seeds(generator, 1, device) if seed is None else seed
    elif noise is None and _draws(spec, t):
        noise, seed = torch_noise(generator, x_t), None
    else:
        seed = None
    table = schedule.on(device)
    alphas_cumprod = table.host_alphas_cumprod() if isinstance(t, int) else table.alphas_cumprod
    threshold = None
    if spec.thresholding or spec.learned_variance:
        if torch.is_grad_enabled() and any(isinstance(v, Tensor) and v.requires_grad
                                           for v in (model_output, uncond_output, x_t, noise, guidance)):
            raise NotImplementedError(f"the step with {'thresholding' if spec.thresholding else spec.variance_type} "
                                      "has no backward (sampling only): run it under torch.no_grad()")
        if spec.thresholding:  # a per-sample reduction first, on the device (module docstring)
            threshold = dynamic_threshold(spec, predicted_x0(spec, model_output, uncond_output, x_t, t, prev_t,
                                                             guidance, alphas_cumprod))
    if host:
        return _step_torch(spec, model_output, uncond_output, x_t, noise, t, prev_t, guidance, threshold,
                           alphas_cumprod)
    tensors = dict(model_output=model_output, uncond_output=uncond_output, x_t=x_t, noise=noise, seed=seed, t=t,
                   prev_t=prev_t, guidance=guidance, threshold=threshold, alphas_cumprod=alphas_cumprod)
    return (_step_body if direct else _step_op)(**tensors, spec=spec.key, triton=triton)
