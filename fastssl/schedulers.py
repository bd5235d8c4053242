"""Drop-in replacements for diffusers' ``DDPMScheduler`` and ``DDIMScheduler`` whose ``step`` is the fused
kernel of :mod:`fastssl.diffusion` (one pass over memory, no host sync for tensor timesteps on the device).

A diffusers pipeline accepts them in place of its own: the same constructor arguments and defaults,
``.config`` (a frozen dict with attribute access, like diffusers' ``FrozenDict``), ``from_config`` (takes a
diffusers scheduler config; unknown keys are ignored with a warning), ``set_timesteps``, ``.timesteps``,
``.init_noise_sigma``, ``.order``, ``scale_model_input``, ``add_noise``, ``get_velocity`` and ``step``
returning an output with ``.prev_sample`` and ``.pred_original_sample`` (a tuple with
``return_dict=False``). diffusers itself is not needed.

Implemented options: beta_schedule ``linear | scaled_linear | squaredcos_cap_v2 | sigmoid`` or
``trained_betas``; variance_type ``fixed_small | fixed_small_log | fixed_large`` (``fixed_small_log`` draws
the same sigma as ``fixed_small``); prediction_type ``epsilon | sample | v_prediction``; clip_sample and
clip_sample_range; timestep_spacing ``leading | linspace | trailing`` with steps_offset; DDIM's eta,
set_alpha_to_one and use_clipped_model_output; DDPM's custom ``timesteps``. Not implemented, raising
``NotImplementedError`` that names the option: ``thresholding=True``, ``rescale_betas_zero_snr=True``,
variance_type ``fixed_large_log | learned | learned_range``, other beta schedules.

Noise: ``step`` draws it as :mod:`fastssl.diffusion` documents: on the PyTorch path (CPU) exactly as
diffusers' ``randn_tensor`` does, so a pipeline run with the same generator reproduces diffusers' samples;
with the Triton kernels (CUDA) in the kernel by Philox, seeded from ``generator`` (equally distributed,
not bitwise diffusers'). A list of generators (one per sample) is always drawn as diffusers does and read.

Extensions (keyword-only, not in diffusers): ``step(..., uncond_output=None, guidance=0.0, noise=None)``
fuses classifier-free guidance, ``(1 + guidance) * model_output - guidance * uncond_output``, into the step.

>>> import torch
>>> from fastssl.schedulers import DDIMScheduler
>>> scheduler = DDIMScheduler(num_train_timesteps=1000)
>>> scheduler.set_timesteps(4)
>>> scheduler.timesteps
tensor([750, 500, 250,   0])
>>> out = scheduler.step(torch.zeros(1, 2), scheduler.timesteps[0], torch.ones(1, 2))
>>> out.prev_sample.shape
torch.Size([1, 2])
"""
from __future__ import annotations

import numbers
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .checks import check_int
from .diffusion import q_sample
from .diffusion_step import StepSpec, apply_step
from .schedules import NoiseSchedule


class FrozenConfig(OrderedDict):
    """A scheduler's configuration: a read-only ordered dict whose keys are also attributes (diffusers'
    ``FrozenDict``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["_frozen"] = True

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}") from None

    def _refuse(self, *args, **kwargs):
        raise TypeError("a scheduler config is frozen; build a new scheduler with from_config(config, key=value)")

    __setattr__ = __delattr__ = __delitem__ = setdefault = pop = popitem = update = clear = _refuse

    def __setitem__(self, key, value):
        if self.__dict__.get("_frozen"):
            self._refuse()
        super().__setitem__(key, value)


@dataclass
class SchedulerOutput:
    """What ``step`` returns: ``prev_sample`` (x_{t-1}) and ``pred_original_sample`` (the predicted x_0);
    also indexable like diffusers' outputs (``out[0]`` is prev_sample)."""

    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None

    def to_tuple(self):
        return self.prev_sample, self.pred_original_sample

    def __getitem__(self, index):
        if isinstance(index, str):
            return getattr(self, index)
        return self.to_tuple()[index]


DDPMSchedulerOutput = DDIMSchedulerOutput = SchedulerOutput

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
_SPACINGS = ("leading", "linspace", "trailing")


def _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas) -> NoiseSchedule:
    if trained_betas is not None:
        return NoiseSchedule(trained_betas)
    if beta_schedule == "linear":
        return NoiseSchedule.linear(num_train_timesteps, beta_start, beta_end)
    if beta_schedule == "scaled_linear":
        return NoiseSchedule.scaled_linear(num_train_timesteps, beta_start, beta_end)
    if beta_schedule == "squaredcos_cap_v2":
        return NoiseSchedule.cosine(num_train_timesteps)
    if beta_schedule == "sigmoid":
        x = torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64)
        return NoiseSchedule(torch.sigmoid(x) * (beta_end - beta_start) + beta_start)
    raise NotImplementedError(f"beta_schedule={beta_schedule!r} is not implemented; use one of {_BETA_SCHEDULES} "
                              "or trained_betas")


def _spaced_timesteps(spacing: str, T: int, n: int, steps_offset: int) -> np.ndarray:
    """diffusers' timestep spacings (Lin et al. 2024, Table 2), descending int64."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose one of {_SPACINGS}")


class _FusedScheduler:
    """What both schedulers share: config, schedule tables, timesteps, add_noise."""

    order = 1
    init_noise_sigma = 1.0
    _defaults: dict = {}

    def _setup(self, config: dict):
        self._internal_dict = FrozenConfig(config)
        if config.get("thresholding"):
            raise NotImplementedError("thresholding=True (dynamic thresholding) is not implemented by fastssl's "
                                      f"{type(self).__name__}; use clip_sample instead")
        if config.get("rescale_betas_zero_snr"):
            raise NotImplementedError(f"rescale_betas_zero_snr=True is not implemented by fastssl's {type(self).__name__}")
        if config["prediction_type"] not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be one of ('epsilon', 'sample', 'v_prediction'), "
                             f"got {config['prediction_type']!r}")
        self.schedule = _betas(config["num_train_timesteps"], config["beta_start"], config["beta_end"],
                               config["beta_schedule"], config["trained_betas"])
        self.betas, self.alphas, self.alphas_cumprod = self.schedule.betas, self.schedule.alphas, self.schedule.alphas_cumprod
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, len(self.schedule))[::-1].copy().astype(np.int64))

    @property
    def config(self) -> FrozenConfig:
        return self._internal_dict

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build a scheduler from a config dict (ours or a diffusers scheduler's ``.config``; an object with a
        ``.config`` is accepted too). ``kwargs`` override config entries. Keys starting with ``_`` are
        dropped; other unknown keys are ignored with a warning, as diffusers does."""
        if config is not None and not isinstance(config, dict) and hasattr(config, "config"):
            config = config.config
        config = dict(config or {})
        known = {k: v for k, v in {**config, **kwargs}.items() if k in cls._defaults}
        unknown = {k: v for k, v in config.items() if k not in cls._defaults and not k.startswith("_")}
        unused = {k: v for k, v in kwargs.items() if k not in cls._defaults}
        if unknown:
            warnings.warn(f"The config attributes {unknown} were passed to {cls.__name__}, but are not expected and "
                          "will be ignored.", UserWarning, stacklevel=2)
        scheduler = cls(**known)
        return (scheduler, unused) if return_unused_kwargs else scheduler

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """The identity (DDPM and DDIM do not scale the model input); for interchangeability."""
        return sample

    def _spacing(self, num_inference_steps: int) -> np.ndarray:
        T = self.config.num_train_timesteps
        num_inference_steps = check_int("num_inference_steps", num_inference_steps, low=1)
        if num_inference_steps > T:
            raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than "
                             f"`self.config.train_timesteps`: {T}")
        return _spaced_timesteps(self.config.timestep_spacing, T, int(num_inference_steps), self.config.steps_offset)

    def _timestep(self, timestep, sample: Tensor):
        """An int for host values (Python ints, CPU tensors of one element: no device sync), else the
        device tensor itself."""
        if isinstance(timestep, Tensor):
            if timestep.device.type == "cpu" and timestep.numel() == 1:
                return int(timestep.reshape(()).item())
            if timestep.device != sample.device:
                timestep = timestep.to(sample.device)
            return timestep.reshape(()) if timestep.numel() == 1 and sample.shape[0] != 1 else timestep
        if isinstance(timestep, numbers.Integral):
            return int(timestep)
        raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """``sqrt(abar_t) * original_samples + sqrt(1 - abar_t) * noise`` (:func:`fastssl.q_sample`, one fused
        pass); ``timesteps`` (B,) or one for all, moved to the samples' device; noise cast to their dtype."""
        return q_sample(original_samples, self._noise_timesteps(timesteps, original_samples),
                        noise.to(original_samples.dtype), self.schedule)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps) -> Tensor:
        """The v-prediction target ``sqrt(abar_t) * noise - sqrt(1 - abar_t) * sample``."""
        return q_sample(sample, self._noise_timesteps(timesteps, sample), noise.to(sample.dtype), self.schedule,
                        return_v=True)[1]

    def _noise_timesteps(self, timesteps, like: Tensor):
        if isinstance(timesteps, numbers.Integral):
            return int(timesteps)
        timesteps = torch.as_tensor(timesteps)
        if timesteps.device.type == "cpu" and timesteps.numel() == 1:
            return int(timesteps.reshape(()).item())
        timesteps = timesteps.to(like.device).long()
        return timesteps.reshape(()) if timesteps.numel() == 1 else timesteps.reshape(-1)

    def _noise_for(self, generator, noise, sample: Tensor):
        """A list of generators is drawn per sample as diffusers' randn_tensor does, then read."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != sample.shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {sample.shape[0]}")
            noise = torch.cat([torch.randn((1, *sample.shape[1:]), generator=g, dtype=sample.dtype,
                                           device=g.device).to(sample.device) for g in generator])
            return None, noise
        return generator, noise


class DDPMScheduler(_FusedScheduler):
    """diffusers' ``DDPMScheduler`` with the fused step (module docstring for what is implemented).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule.
        variance_type: ``fixed_small`` (default), ``fixed_small_log`` or ``fixed_large``.
        clip_sample: clamp the predicted x0 to ``[-clip_sample_range, clip_sample_range]`` (default True).
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        thresholding, dynamic_thresholding_ratio, sample_max_value: accepted; thresholding=True raises.
        timestep_spacing, steps_offset: how :meth:`set_timesteps` spaces inference steps.
        rescale_betas_zero_snr: accepted; True raises NotImplementedError.

    Raises:
        NotImplementedError: an option fastssl does not implement (named in the message).
        ValueError: an unknown prediction_type.

    >>> import torch
    >>> from fastssl.schedulers import DDPMScheduler
    >>> s = DDPMScheduler(num_train_timesteps=10)
    >>> s.config.clip_sample, s.config.variance_type
    (True, 'fixed_small')
    >>> s.step(torch.zeros(1, 3), 0, torch.full((1, 3), 0.5)).prev_sample
    tensor([[0.5000, 0.5000, 0.5000]])
    """

    _defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
                     thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
                     timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False)
    _VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        config = {k: v for k, v in locals().items() if k in self._defaults}
        if variance_type not in self._VARIANCES:
            raise NotImplementedError(f"variance_type={variance_type!r} is not implemented by fastssl's DDPMScheduler; "
                                      f"use one of {tuple(self._VARIANCES)}")
        self._setup(config)
        self.variance_type = variance_type
        self.custom_timesteps = False
        self._set_prev(None)

    def _set_prev(self, timesteps: Optional[np.ndarray]):
        """prev[t] for every train timestep t: the next timestep of the inference schedule (-1 after the
        last), or t - 1 without one (diffusers' previous_timestep), as a host table and per-device copies."""
        T = self.config.num_train_timesteps
        prev = np.arange(-1, T - 1, dtype=np.int64)
        if timesteps is not None:
            steps = [int(s) for s in timesteps]
            for s, p in zip(steps, steps[1:] + [-1]):
                if 0 <= s < T:
                    prev[s] = p
        self._prev_host = torch.from_numpy(prev)
        self._prev_device = {}

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None):
        """Set the inference timesteps: ``num_inference_steps`` spaced by ``config.timestep_spacing``
        (default "leading": k * (T // n) + steps_offset, descending), or explicit descending ``timesteps``."""
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            timesteps = np.array(list(timesteps), dtype=np.int64)
            if (np.diff(timesteps) >= 0).any():
                raise ValueError("`custom_timesteps` must be in descending order.")
            if timesteps[0] >= self.config.num_train_timesteps:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: "
                                 f"{self.config.num_train_timesteps}.")
            self.custom_timesteps, self.num_inference_steps = True, len(timesteps)
        else:
            timesteps = self._spacing(num_inference_steps)
            self.custom_timesteps, self.num_inference_steps = False, int(num_inference_steps)
        self._set_prev(timesteps)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def previous_timestep(self, timestep):
        """The timestep the step from ``timestep`` goes to (-1 after the last)."""
        if isinstance(timestep, Tensor):
            table = self._prev_on(timestep.device)
            return table.index_select(0, timestep.reshape(-1).long()).reshape(timestep.shape)
        return int(self._prev_host[int(timestep)])

    def _prev_on(self, device) -> Tensor:
        key = str(device)
        if key not in self._prev_device:
            self._prev_device[key] = self._prev_host.to(device)
        return self._prev_device[key]

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True, *,
             uncond_output: Optional[Tensor] = None, guidance=0.0, noise: Optional[Tensor] = None):
        """One fused DDPM step (:func:`fastssl.ddpm_step`) from ``timestep`` to :meth:`previous_timestep`.

        Args:
            model_output: the model's prediction at ``timestep``; shape of ``sample``.
            timestep: an int or an integer tensor (0-dim, or (B,) per sample).
            sample: x_t.
            generator: a torch.Generator, a list of them (one per sample), an int seed, or None.
            return_dict: return a :class:`SchedulerOutput` (else a tuple).
            uncond_output, guidance, noise: fused classifier-free guidance and explicit noise (extensions).

        Returns:
            ``SchedulerOutput(prev_sample, pred_original_sample)`` or the tuple of both.
        """
        t = self._timestep(timestep, sample)
        prev = self.previous_timestep(t)
        if isinstance(generator, (list, tuple)) and noise is None and not (isinstance(t, int) and t == 0):
            generator, noise = self._noise_for(generator, None, sample)
        elif isinstance(generator, (list, tuple)):
            generator = None
        c = self.config
        spec = StepSpec("ddpm", prediction_type=c.prediction_type, variance_type=self._VARIANCES[c.variance_type],
                        clip_sample=bool(c.clip_sample), clip_range=float(c.clip_sample_range), return_pred_x0=True)
        prev_sample, pred_x0 = apply_step(spec, model_output, t, sample, self.schedule, prev_t=prev, noise=noise,
                                          generator=generator, uncond_output=uncond_output, guidance=guidance)
        return SchedulerOutput(prev_sample, pred_x0) if return_dict else (prev_sample, pred_x0)


class DDIMScheduler(_FusedScheduler):
    """diffusers' ``DDIMScheduler`` with the fused step (module docstring for what is implemented).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule.
        clip_sample: clamp the predicted x0 (default True); clip_sample_range its bound.
        set_alpha_to_one: abar_prev = 1 past the first step (else abar_0).
        steps_offset, timestep_spacing: how :meth:`set_timesteps` spaces inference steps.
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        thresholding, dynamic_thresholding_ratio, sample_max_value, rescale_betas_zero_snr: accepted; True
            values raise NotImplementedError.

    >>> from fastssl.schedulers import DDIMScheduler
    >>> DDIMScheduler(steps_offset=1).config.steps_offset
    1
    """

    _defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                     prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                     clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
                     rescale_betas_zero_snr=False)

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False):
        config = {k: v for k, v in locals().items() if k in self._defaults}
        self._setup(config)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Set ``num_inference_steps`` timesteps spaced by ``config.timestep_spacing`` (default "leading")."""
        timesteps = self._spacing(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[Tensor] = None,
             return_dict: bool = True, *, uncond_output: Optional[Tensor] = None, guidance=0.0):
        """One fused DDIM step (:func:`fastssl.ddim_step`) from ``timestep`` to
        ``timestep - num_train_timesteps // num_inference_steps`` (diffusers' rule).

        Args:
            model_output, timestep, sample, generator, return_dict: as in :meth:`DDPMScheduler.step`.
            eta: the noise weight (0: deterministic).
            use_clipped_model_output: re-derive epsilon from the clipped predicted x0.
            variance_noise: explicit noise (not with generator).
            uncond_output, guidance: fused classifier-free guidance (extension).

        Raises:
            ValueError: ``set_timesteps`` was not called; both generator and variance_noise with eta > 0.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either `generator` "
                             "or `variance_noise` stays `None`.")
        if eta == 0:
            generator = variance_noise = None
        t = self._timestep(timestep, sample)
        generator, variance_noise = self._noise_for(generator, variance_noise, sample)
        c = self.config
        final = 1.0 if c.set_alpha_to_one else float(self.alphas_cumprod[0])
        spec = StepSpec("ddim", prediction_type=c.prediction_type, clip_sample=bool(c.clip_sample),
                        clip_range=float(c.clip_sample_range), eta=float(eta), final_alpha_cumprod=final,
                        use_clipped_model_output=bool(use_clipped_model_output),
                        prev_offset=-(c.num_train_timesteps // self.num_inference_steps), return_pred_x0=True)
        prev_sample, pred_x0 = apply_step(spec, model_output, t, sample, self.schedule, noise=variance_noise,
                                          generator=generator, uncond_output=uncond_output, guidance=guidance)
        return SchedulerOutput(prev_sample, pred_x0) if return_dict else (prev_sample, pred_x0)
