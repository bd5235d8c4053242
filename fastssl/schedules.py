"""Noise schedules of the diffusion slice, and the timesteps that index them.

A :class:`NoiseSchedule` holds betas, alphas and abar_t (``alphas_cumprod``), built in float64 and kept as
float32 tensors. :func:`timestep_tensor` turns a user's ``t`` (an int or a LongTensor) into the int64
device tensor the ops read, without a host synchronisation: an int becomes a one-element view of a device
``arange`` the schedule keeps (no launch, no copy); tensor values are range-checked only on the CPU.
:func:`gather_alphas_cumprod` reads abar_t for such timesteps, as the kernels do.

>>> import torch
>>> s = NoiseSchedule.linear(1000)
>>> timestep_tensor("t", 5, s, batch=2, device=torch.device("cpu"))
tensor([5])
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .checks import check_int, check_number

# Up to this many per-sample timesteps on the CPU, every value is range-checked (beyond it only min and max).
_LISTED_TIMESTEPS = 64


class NoiseSchedule:
    """A discrete diffusion noise schedule: ``betas``, ``alphas = 1 - betas`` and ``alphas_cumprod``
    (abar_t, the product of alphas up to t), built in float64 and kept as float32 tensors.

    Construct it from any 1-D ``betas`` (a tensor, list or array with values in [0, 1]), or with the
    class methods :meth:`linear`, :meth:`scaled_linear` and :meth:`cosine`, which equal diffusers'
    ``linear``, ``scaled_linear`` and ``squaredcos_cap_v2`` schedules (built in float64 before the
    float32 rounding, so abar is closer to the exact product than diffusers' float32 cumprod, within
    ~1e-6 relative of it; :meth:`float32_built` builds them as diffusers does). :meth:`to` returns the schedule on another device; the ops accept a
    schedule on any device (:meth:`on` keeps one copy per device). The tables are read-only.

    ``q_coefficients`` is the (2, T) float64 table of sqrt(abar_t) and sqrt(1 - abar_t); :func:`fastssl.q_sample`
    reads it in the math dtype (:meth:`q_table`) on every backend.

    Args:
        betas: the per-step noise variances, 1-D, non-empty, finite, in [0, 1].

    Raises:
        ValueError: betas that are not 1-D, empty, non-finite or outside [0, 1].
        TypeError: betas that are not numbers.

    >>> import fastssl
    >>> s = fastssl.NoiseSchedule.linear(1000)
    >>> s.num_timesteps, s.betas.dtype, round(float(s.alphas_cumprod[-1]), 6)
    (1000, torch.float32, 4e-05)
    >>> fastssl.NoiseSchedule([0.1, 0.2]).alphas_cumprod
    tensor([0.9000, 0.7200])
    """

    def __init__(self, betas):
        betas64 = _check_betas(betas, torch.float64, unit_range=True)
        alphas64 = 1.0 - betas64
        self._build(betas64.float(), alphas64.float(), torch.cumprod(alphas64, 0).float())

    @classmethod
    def float32_built(cls, betas) -> "NoiseSchedule":
        """The tables as diffusers' schedulers build them: ``betas`` rounded to float32 first, then
        ``alphas = 1 - betas`` and their cumulative product in float32 (what :mod:`fastssl.schedulers` uses, so
        a drop-in reproduces diffusers' numbers). Float32 rounding at each of the T products leaves abar up to
        ~4e-7 (linear, T = 1000) to ~1.1e-6 (scaled_linear) relative from the exact product of the same
        betas, against ~6e-8 for the float64-built tables; at small t that is up to ~1e-3 relative in
        1 - abar_t. Like diffusers, any finite betas are accepted (values outside [0, 1] give an abar outside
        [0, 1], and NaN coefficients at the timesteps where abar < 0).

        >>> NoiseSchedule.float32_built([0.1, 0.2]).alphas_cumprod
        tensor([0.9000, 0.7200])
        """
        betas32 = _check_betas(betas, torch.float32, unit_range=False)
        alphas32 = 1.0 - betas32
        schedule = object.__new__(cls)
        schedule._build(betas32, alphas32, torch.cumprod(alphas32, 0))
        return schedule

    def _build(self, betas: Tensor, alphas: Tensor, alphas_cumprod: Tensor):
        """Set the float32 tables and derive the rest: q_sample's coefficients, in float64, of the float32 abar
        the step kernel reads."""
        abar64 = alphas_cumprod.double()
        self._set(betas, alphas, alphas_cumprod, torch.stack([abar64.sqrt(), (1 - abar64).sqrt()]),
                  torch.arange(-1, betas.numel(), dtype=torch.long))

    def _set(self, betas: Tensor, alphas: Tensor, alphas_cumprod: Tensor, q_coefficients: Tensor, steps: Tensor):
        self.betas, self.alphas, self.alphas_cumprod, self.q_coefficients = betas, alphas, alphas_cumprod, q_coefficients
        self.num_timesteps = betas.numel()
        self._device = betas.device  # read on every op: a tensor's .device builds a new object
        self._host_table = None
        self._q_rows = {}
        self._steps = steps  # int t -> _steps[t + 1:t + 2], a view (t = -1: "before the first step")
        self._step_views = {}
        self._copies = {}
        self._q_tables = {torch.float64: q_coefficients}

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """betas evenly spaced from ``beta_start`` to ``beta_end`` (DDPM's schedule; diffusers' ``linear``)."""
        _check_schedule_args(num_timesteps, beta_start, beta_end)
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """sqrt(betas) evenly spaced (latent diffusion's schedule; diffusers' ``scaled_linear``)."""
        _check_schedule_args(num_timesteps, beta_start, beta_end)
        return cls(torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal's cosine schedule: abar(u) = cos((u + s) / (1 + s) * pi / 2)^2 for u = t / T,
        beta_t = min(1 - abar((t + 1) / T) / abar(t / T), max_beta) (diffusers' ``squaredcos_cap_v2``)."""
        _check_schedule_args(num_timesteps, 0.0, 0.0)
        s = check_number("s", s, low=0, high=1, high_open=True)
        max_beta = check_number("max_beta", max_beta, low=0, high=1, low_open=True)

        def abar(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        T = num_timesteps
        return cls([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)])

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> "NoiseSchedule":
        """This schedule with its tables on ``device`` (a new object; ``self`` is unchanged)."""
        copy = object.__new__(NoiseSchedule)
        copy._set(*(x.to(device) for x in (self.betas, self.alphas, self.alphas_cumprod, self.q_coefficients,
                                            self._steps)))
        return copy

    def q_table(self, dtype: torch.dtype) -> Tensor:
        """``q_coefficients`` in the math dtype ``dtype`` (float64, or float32 for the other dtypes), made
        once and kept: the table q_sample reads on both backends (its values are those of the float64 table,
        rounded once)."""
        table = self._q_tables.get(dtype)
        if table is None:
            table = self.q_coefficients.to(dtype)
            if not torch.compiler.is_compiling():
                self._q_tables[dtype] = table
        return table

    def host_alphas_cumprod(self) -> list:
        """``alphas_cumprod`` as a list of Python floats, made once: how the host reads abar for one timestep
        (a tenth of a numpy lookup's cost, which showed in a small CPU step)."""
        if self._host_table is None:
            self._host_table = self.alphas_cumprod.tolist()
        return self._host_table

    def q_rows(self, dtype: torch.dtype, ndim: int) -> tuple[Tensor, Tensor]:
        """:meth:`q_table`'s two rows as (T, 1, ..., 1) tables of ``ndim`` dims, made once: ``index_select(0,
        t)`` gives per-sample factors that broadcast against (B, ...) with no view or split per call (the
        host path of q_sample; 0.84x -> 1.2x eager at 16K elements together with its direct dispatch)."""
        rows = self._q_rows.get((dtype, ndim))
        if rows is None:
            table = self.q_table(dtype)
            rows = self._q_rows[dtype, ndim] = tuple(c.reshape(-1, *[1] * (ndim - 1)).contiguous() for c in table)
        return rows

    def step_view(self, t: int) -> Tensor:
        """The int64 tensor [t] on this schedule's device (t >= -1; lower values read as -1): a one-element view
        of the schedule's steps, made once per t (a slice costs more than the small CPU step it feeds)."""
        index = max(t, -1) + 1
        if torch.compiler.is_compiling():
            return self._steps[index:index + 1]
        view = self._step_views.get(index)
        if view is None:
            view = self._step_views[index] = self._steps[index:index + 1]
        return view

    def on(self, device) -> "NoiseSchedule":
        """This schedule on ``device``: ``self`` if its tables are there, else a copy made once and kept (the
        tables are read-only, so one copy per device serves every op)."""
        if device == self._device:  # a tensor's device: no torch.device to build
            return self
        device = torch.device(device)
        if self._device == device:
            return self
        key = str(device)
        if key not in self._copies:
            self._copies[key] = self.to(device)
        return self._copies[key]

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_timesteps={self.num_timesteps}, device={self.device})"


def _check_betas(betas, dtype: torch.dtype, *, unit_range: bool) -> Tensor:
    """``betas`` as a 1-D, non-empty, finite CPU tensor of ``dtype`` (in [0, 1] when ``unit_range``)."""
    try:
        betas = torch.as_tensor(betas).detach().to("cpu", dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"betas must be a 1-D tensor, list or array of numbers, got {type(betas).__name__}") from exc
    if betas.dim() != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
    if not torch.isfinite(betas).all() or (unit_range and ((betas < 0).any() or (betas > 1).any())):
        raise ValueError(f"betas must be finite{' and in [0, 1]' if unit_range else ''}, got min "
                         f"{betas.min().item()} max {betas.max().item()}")
    return betas


def _check_schedule_args(num_timesteps, beta_start, beta_end):
    check_int("num_timesteps", num_timesteps, low=1)
    check_number("beta_start", beta_start, low=0, high=1)
    check_number("beta_end", beta_end, low=0, high=1)


def check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastssl.NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def host_timestep(name: str, t, schedule: NoiseSchedule, *, allow_negative: bool = False) -> Optional[int]:
    """``t`` checked and returned as a Python int when it is one (an int below 0 becomes -1 with
    ``allow_negative``), else None (a tensor, which :func:`timestep_tensor` checks).

    Raises:
        ValueError: an int out of range.
    """
    if type(t) is not int and not (isinstance(t, numbers.Integral) and not isinstance(t, (bool, np.bool_))):
        return None
    t, T = int(t), schedule.num_timesteps
    if t >= T or (t < 0 and not allow_negative):
        raise _out_of_range(name, t, T, allow_negative)
    return max(t, -1)


def _out_of_range(name: str, value: int, T: int, allow_negative: bool) -> ValueError:
    low = "any negative int" if allow_negative else "0"
    return ValueError(f"{name} must be in [{low}, {T - 1}] for this {T}-step schedule, got {value}")


def timestep_tensor(name: str, t, schedule: NoiseSchedule, batch: int, device: torch.device, *,
                    allow_negative: bool = False) -> Tensor:
    """``t`` as an int64 device tensor of shape (1,) (one timestep for all) or (batch,), without a sync.

    Ints are checked here; tensor values only when they are on the CPU in eager mode. With
    ``allow_negative`` (prev_t), values below 0 mean "before the first step" and an int below 0 becomes -1.

    Raises:
        TypeError: a ``t`` that is neither an int nor an integer tensor.
        ValueError: a tensor on another device or of the wrong shape; a value out of range.
    """
    if not isinstance(t, Tensor):
        value = host_timestep(name, t, schedule, allow_negative=allow_negative)
        if value is None:
            raise TypeError(f"{name} must be an int or a LongTensor of shape ({batch},), got {type(t).__name__}")
        return schedule.on(device).step_view(value)
    dtype, ndim = t.dtype, t.dim()
    if dtype is not torch.long and (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the samples are on {device}; move it to one device")
    if not (ndim == 0 or (ndim == 1 and t.shape[0] == batch)):
        raise ValueError(f"{name} must be an int, a 0-dim tensor or a ({batch},) tensor (one timestep per sample), "
                         f"got shape {tuple(t.shape)}")
    if t.is_cpu and t.numel() and not torch.compiler.is_compiling():  # eager CPU only: no sync
        values = t.tolist() if t.numel() <= _LISTED_TIMESTEPS else [int(t.min()), int(t.max())]
        values = values if ndim else [values]
        T = schedule.num_timesteps
        if max(values) >= T or (min(values) < 0 and not allow_negative):
            bad = next(v for v in values if v >= T or (v < 0 and not allow_negative))
            raise _out_of_range(name, bad, T, allow_negative)
    t = t.reshape(1) if ndim == 0 else t
    return t if dtype is torch.long else t.long()


def gather_alphas_cumprod(alphas_cumprod, t, below: float):
    """abar[t] in float64 as the kernels gather it: ``below`` where t < 0, NaN where t >= T. ``alphas_cumprod``
    and ``t`` are both torch tensors or both numpy arrays (the host computes coefficients with numpy)."""
    T = alphas_cumprod.shape[0]
    if isinstance(t, Tensor):
        values = alphas_cumprod.double().index_select(0, t.clamp(0, T - 1))
        values = torch.where(t < T, values, torch.full_like(values, float("nan")))
        return torch.where(t < 0, torch.full_like(values, below), values)
    values = alphas_cumprod[np.minimum(np.maximum(t, 0), T - 1)].astype(np.float64)
    return np.where(t < 0, below, np.where(t < T, values, np.nan))
