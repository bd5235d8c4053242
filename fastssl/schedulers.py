"""Drop-in replacements for diffusers' ``DDPMScheduler`` and ``DDIMScheduler`` whose ``step`` is the fused
kernel of :mod:`fastssl.diffusion` (one pass over memory, no host sync for tensor timesteps on the device).

They are diffusers schedulers in every way a user or a pipeline touches: the same constructor arguments and
defaults, ``.config``, ``register_to_config``, ``from_config`` (a diffusers scheduler's config converts both
ways), ``save_config`` / ``save_pretrained`` / ``from_pretrained`` (``scheduler_config.json`` in a folder, or
its ``subfolder=``), ``compatibles``, ``order``, ``set_timesteps`` (``timestep_spacing`` "leading",
"trailing", "linspace", ``steps_offset``), ``.timesteps``, ``.init_noise_sigma``, ``scale_model_input``,
``add_noise``, ``get_velocity``, ``previous_timestep``, ``_get_variance``, and ``step`` returning an output
that behaves as diffusers' ``BaseOutput`` (``out.prev_sample``, ``out["prev_sample"]``, ``out[0]``) or a tuple
with ``return_dict=False``. With diffusers installed they subclass its ``SchedulerMixin`` and ``ConfigMixin``
(so a pipeline holding one saves it in ``model_index.json`` as ``["fastssl.schedulers", "DDPMScheduler"]`` and
loads it back once ``fastssl.schedulers`` is imported); without it :mod:`fastssl.scheduler_config` stands in.

Numbers: the tables are built as diffusers builds them (float32 betas, float32 cumulative product:
:meth:`NoiseSchedule.float32_built`) and the step's beta is rounded as diffusers rounds it,
1 - fl32(abar_t / abar_prev) (``StepSpec.diffusers_rounding``), so a loop reproduces diffusers' numbers
within its own tests' tolerances. Both are less exact than :class:`fastssl.NoiseSchedule`'s float64-built
tables and exact beta (:func:`fastssl.ddpm_step`): at t = 1 of the linear schedule diffusers' beta is 3e-4
relative off, and its 1000-step test loops land up to ~5e-5 relative from a float64 reference where the
exact path lands within ~1e-6. The remaining difference from diffusers is the rounding of the step's
arithmetic (coefficients in float64 on the host, float32 in the kernel, against diffusers' float32 tensor
ops): ~1e-6 relative over diffusers' test loops.

Options: beta_schedule ``linear | scaled_linear | squaredcos_cap_v2 | sigmoid`` or ``trained_betas``, with
``rescale_betas_zero_snr`` (Lin et al. 2024, Algorithm 1); variance_type ``fixed_small | fixed_small_log |
fixed_large | learned | learned_range`` (``fixed_small_log`` draws the same sigma as ``fixed_small``; the
learned ones take a model output of 2C channels, split as diffusers splits it, and compute each element's
sigma in the fused step; another name steps as ``fixed_small``, as diffusers does, with a warning);
prediction_type ``epsilon | sample | v_prediction``; clip_sample and clip_sample_range, or dynamic
``thresholding`` (``dynamic_thresholding_ratio``, ``sample_max_value``; its per-sample quantile is a torch
reduction on the device before the fused step, see :mod:`fastssl.diffusion_step`); DDIM's eta,
set_alpha_to_one and use_clipped_model_output; DDPM's custom ``timesteps``. Not implemented, raising
``NotImplementedError`` that names the option: variance_type ``fixed_large_log`` (diffusers' step gives NaN
with it), beta schedules other than the above. Steps with thresholding or a learned variance have no backward
(sampling only, as in a pipeline under ``torch.no_grad``).

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
>>> out.prev_sample.shape, out[0] is out["prev_sample"] is out.prev_sample
(torch.Size([1, 2]), True)
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .checks import check_choice, check_int
from .diffusion import q_sample
from .diffusion_step import PREDICTION_TYPES, StepSpec, apply_step, step_spec
from .scheduler_config import KARRAS_SCHEDULERS, BaseOutput, ConfigMixin, SchedulerMixin, register_to_config
from .schedules import NoiseSchedule


@dataclass
class SchedulerOutput(BaseOutput):
    """What ``step`` returns: ``prev_sample`` (x_{t-1}) and ``pred_original_sample`` (the predicted x_0), by
    attribute, key or index, as diffusers' ``DDPMSchedulerOutput`` / ``DDIMSchedulerOutput``."""

    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None


DDPMSchedulerOutput = DDIMSchedulerOutput = SchedulerOutput

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
_SPACINGS = ("leading", "linspace", "trailing")


def _diffusers_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                     rescale_betas_zero_snr) -> Tensor:
    """The float32 betas exactly as diffusers' schedulers build them (``squaredcos_cap_v2``: the same Python
    float formula as :meth:`NoiseSchedule.cosine`, rounded to float32)."""
    T = check_int("num_train_timesteps", num_train_timesteps, low=1)
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas), dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = NoiseSchedule.cosine(T).betas
    elif beta_schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
    else:
        raise NotImplementedError(f"beta_schedule={beta_schedule!r} is not implemented; use one of {_BETA_SCHEDULES} "
                                  "or trained_betas")
    return _rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1, in float32 as diffusers: shift sqrt(abar) so its last value is 0, scale it
    so its first is unchanged, and return the betas of that abar (the last beta is 1: zero terminal SNR)."""
    root = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    abar = ((root - last) * (first / (first - last))) ** 2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def _spaced_timesteps(spacing: str, T: int, n: int, steps_offset: int) -> np.ndarray:
    """diffusers' timestep spacings (Lin et al. 2024, Table 2), descending int64."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1  # trailing


class _FusedScheduler(SchedulerMixin, ConfigMixin):
    """What both schedulers share: config, schedule tables, timesteps, add_noise, the variance terms."""

    _compatibles = KARRAS_SCHEDULERS
    order = 1

    @classmethod
    def _get_compatibles(cls) -> list:
        """Both fastssl schedulers, then diffusers' DDPM/DDIM compatibles (when it is installed)."""
        ours = [DDPMScheduler, DDIMScheduler]
        return ours + [c for c in super()._get_compatibles() if c not in ours]

    def _setup(self):
        """The tables and timesteps from the registered config."""
        c = self.config
        check_choice("prediction_type", c.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", c.timestep_spacing, _SPACINGS)
        self.schedule = NoiseSchedule.float32_built(_diffusers_betas(
            c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas, c.rescale_betas_zero_snr))
        self.betas, self.alphas, self.alphas_cumprod = self.schedule.betas, self.schedule.alphas, self.schedule.alphas_cumprod
        self.one = torch.tensor(1.0)
        self._alpha_before_first = self.one  # abar of a previous timestep below 0 (DDIM: final_alpha_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, c.num_train_timesteps)[::-1].copy().astype(np.int64))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _spec(self, sampler: str, **options) -> StepSpec:
        """The fused step's configuration from the config (validated once per distinct configuration)."""
        c = self.config
        return step_spec(sampler, prediction_type=c.prediction_type, clip_sample=bool(c.clip_sample),
                         clip_range=float(c.clip_sample_range), thresholding=bool(c.thresholding),
                         dynamic_thresholding_ratio=float(c.dynamic_thresholding_ratio),
                         sample_max_value=float(c.sample_max_value), return_pred_x0=True, diffusers_rounding=True,
                         **options)

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

    def _variance_terms(self, timestep, prev_timestep) -> tuple[Tensor, Tensor]:
        """diffusers' float32 (variance, beta) of the step timestep -> prev_timestep: beta = 1 - abar_t /
        abar_prev, variance = (1 - abar_prev) / (1 - abar_t) * beta (abar_prev of a negative timestep: 1, or
        DDIM's final_alpha_cumprod). A host helper, as diffusers' own (it reads the timesteps' values)."""
        a_t = self.alphas_cumprod[timestep]
        a_p = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self._alpha_before_first
        beta = 1 - a_t / a_p
        return (1 - a_p) / (1 - a_t) * beta, beta

    def _timestep(self, timestep, sample: Tensor):
        """An int for host values (Python ints, CPU tensors of one element: no device sync), else the
        device tensor itself. Host values must lie in [0, num_train_timesteps) (checked: diffusers' table
        lookup raises there too); device tensors are not read (no sync): a timestep past the table steps to
        NaN. A float timestep is refused, as diffusers' lookup refuses it (999.6 is no timestep)."""
        if isinstance(timestep, Tensor):
            if timestep.dtype.is_floating_point or timestep.dtype.is_complex or timestep.dtype == torch.bool:
                raise TypeError(f"timestep must be an int or an integer tensor (diffusers indexes its tables by "
                                f"it), got a {timestep.dtype} tensor")
            if timestep.device.type == "cpu":
                self._check_range(timestep.numpy())
                if timestep.numel() == 1:
                    return int(timestep.reshape(()).item())
            if timestep.device != sample.device:
                timestep = timestep.to(sample.device)
            return timestep.reshape(()) if timestep.numel() == 1 and sample.shape[0] != 1 else timestep
        if isinstance(timestep, numbers.Integral) and not isinstance(timestep, bool):
            timestep = int(timestep)
            if not 0 <= timestep < self.config.num_train_timesteps:  # plain Python: torch.compile traces it
                self._check_range(np.asarray(timestep))
            return timestep
        raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")

    def _check_range(self, timesteps: np.ndarray) -> None:
        T = self.config.num_train_timesteps
        if timesteps.size and (timesteps.min() < 0 or timesteps.max() >= T):
            raise ValueError(f"timestep must be in [0, {T}) (num_train_timesteps={T}), got "
                             f"{timesteps.tolist()}")

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """``sqrt(abar_t) * original_samples + sqrt(1 - abar_t) * noise`` (:func:`fastssl.q_sample`, one fused
        pass); ``timesteps`` an int or an integer tensor, (B,) or one for all, moved to the samples' device;
        noise cast to their dtype.

        Raises:
            TypeError: float timesteps (a float, or a float tensor even of whole numbers), as diffusers' table
                lookup refuses them (10.9 was read as 10): judged by type and dtype, so a CUDA tensor is not read.
        """
        return q_sample(original_samples, self._noise_timesteps(timesteps, original_samples),
                        noise.to(original_samples.dtype), self.schedule)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps) -> Tensor:
        """The v-prediction target ``sqrt(abar_t) * noise - sqrt(1 - abar_t) * sample``; ``timesteps`` as in
        :meth:`add_noise` (float ones are a TypeError)."""
        return q_sample(sample, self._noise_timesteps(timesteps, sample), noise.to(sample.dtype), self.schedule,
                        return_v=True)[1]

    def _noise_timesteps(self, timesteps, like: Tensor):
        """add_noise's timesteps as q_sample takes them: an int, or an int64 tensor on like's device. Anything
        but ints and integer tensors (lists and arrays of them) is a TypeError: a float would be truncated."""
        if isinstance(timesteps, numbers.Integral) and not isinstance(timesteps, (bool, np.bool_)):
            return int(timesteps)
        given = timesteps
        if not isinstance(timesteps, (Tensor, bool, np.bool_, numbers.Number)):
            timesteps = torch.as_tensor(timesteps)  # a list or an array: its dtype decides
        if not isinstance(timesteps, Tensor) or timesteps.dtype.is_floating_point or timesteps.dtype.is_complex \
                or timesteps.dtype == torch.bool:
            what = f"a {timesteps.dtype} tensor" if isinstance(timesteps, Tensor) else type(given).__name__
            raise TypeError(f"timesteps must be an int or an integer tensor (diffusers indexes its tables by them), "
                            f"got {what}")
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
    """diffusers' ``DDPMScheduler`` with the fused step (module docstring for what is implemented and how its
    numbers compare with diffusers').

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule.
        variance_type: ``fixed_small`` (default), ``fixed_small_log``, ``fixed_large``, or ``learned`` /
            ``learned_range`` (the model output has 2C channels: the prediction, then the variance).
        clip_sample: clamp the predicted x0 to ``[-clip_sample_range, clip_sample_range]`` (default True).
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of the predicted x0
            (in place of clip_sample): s = clamp(quantile(|x0|, ratio), 1, sample_max_value) per sample.
        timestep_spacing, steps_offset: how :meth:`set_timesteps` spaces inference steps.
        rescale_betas_zero_snr: rescale the betas to zero terminal SNR.

    Raises:
        NotImplementedError: an option fastssl does not implement (named in the message).
        ValueError: an unknown prediction_type or timestep_spacing.

    >>> import torch
    >>> from fastssl.schedulers import DDPMScheduler
    >>> s = DDPMScheduler(num_train_timesteps=10)
    >>> s.config.clip_sample, s.config.variance_type
    (True, 'fixed_small')
    >>> s.step(torch.zeros(1, 3), 0, torch.full((1, 3), 0.5)).prev_sample
    tensor([[0.5000, 0.5000, 0.5000]])
    """

    # variance_type -> the fused step's (an unknown name steps as fixed_small, as in diffusers)
    _VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                  "learned": "learned", "learned_range": "learned_range"}

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if variance_type == "fixed_large_log":  # diffusers' step takes sqrt(log(beta)) of a log < 0: NaN
            raise NotImplementedError("variance_type='fixed_large_log' is not implemented by fastssl's DDPMScheduler "
                                      "(diffusers' step returns NaN for every t > 0 with it: it takes the square root "
                                      f"of log(beta) < 0); use one of {tuple(self._VARIANCES)}")
        if variance_type not in self._VARIANCES:
            warnings.warn(f"variance_type={variance_type!r} is not one of diffusers' variance types; diffusers' "
                          "DDPMScheduler steps with the fixed_small variance for it, and so does this one",
                          UserWarning, stacklevel=3)
        self._setup()
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
        self._prev_host, self._prev_list = torch.from_numpy(prev), prev.tolist()  # the list: int lookups compile
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
        if isinstance(timestep, Tensor):  # clamped: a device timestep past the table must not read past it
            table = self._prev_on(timestep.device)
            index = timestep.reshape(-1).long().clamp(0, table.numel() - 1)
            return table.index_select(0, index).reshape(timestep.shape)
        return self._prev_list[int(timestep)]

    def _prev_on(self, device) -> Tensor:
        key = str(device)
        if key not in self._prev_device:
            self._prev_device[key] = self._prev_host.to(device)
        return self._prev_device[key]

    def _get_variance(self, t, predicted_variance: Optional[Tensor] = None, variance_type: Optional[str] = None):
        """diffusers' ``DDPMScheduler._get_variance`` (its pipelines call it), from the float32 tables as diffusers
        computes it: with var = max((1 - abar_prev) / (1 - abar_t) * beta, 1e-20) and beta = 1 - abar_t /
        abar_prev for the step from ``t``, it returns var (fixed_small, and names diffusers does not know),
        sqrt(var) (fixed_small_log), beta (fixed_large), log(beta) (fixed_large_log), ``predicted_variance``
        (learned) or frac * log(beta) + (1 - frac) * log(var) with frac = (predicted_variance + 1) / 2
        (learned_range, a log-variance). The step itself derives its sigma in the kernel.

        >>> round(float(DDPMScheduler()._get_variance(487)), 5)
        0.00979
        """
        var, beta = self._variance_terms(t, self.previous_timestep(t))
        var = torch.clamp(var, min=1e-20)
        kind = variance_type or self.config.variance_type
        if kind == "fixed_small_log":
            return var.sqrt()
        if kind in ("fixed_large", "fixed_large_log"):
            return beta if kind == "fixed_large" else torch.log(beta)
        if kind in ("learned", "learned_range"):
            frac = (predicted_variance + 1) / 2
            return predicted_variance if kind == "learned" else frac * torch.log(beta) + (1 - frac) * torch.log(var)
        return var

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True, *,
             uncond_output: Optional[Tensor] = None, guidance=0.0, noise: Optional[Tensor] = None):
        """One fused DDPM step (:func:`fastssl.ddpm_step`) from ``timestep`` to :meth:`previous_timestep`.

        Args:
            model_output: the model's prediction at ``timestep``; shape of ``sample`` (with 2C channels for a
                learned variance_type: the prediction, then the variance).
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
        spec = self._spec("ddpm", variance_type=self._VARIANCES.get(self.variance_type, "fixed_small"))
        prev_sample, pred_x0 = apply_step(spec, model_output, t, sample, self.schedule, prev_t=prev, noise=noise,
                                          generator=generator, uncond_output=uncond_output, guidance=guidance)
        return SchedulerOutput(prev_sample, pred_x0) if return_dict else (prev_sample, pred_x0)


class DDIMScheduler(_FusedScheduler):
    """diffusers' ``DDIMScheduler`` with the fused step (module docstring for what is implemented and how its
    numbers compare with diffusers').

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule.
        clip_sample: clamp the predicted x0 (default True); clip_sample_range its bound.
        set_alpha_to_one: abar_prev = 1 past the first step (else abar_0).
        steps_offset, timestep_spacing: how :meth:`set_timesteps` spaces inference steps.
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding (as DDPMScheduler).
        rescale_betas_zero_snr: rescale the betas to zero terminal SNR.

    >>> from fastssl.schedulers import DDIMScheduler
    >>> DDIMScheduler(steps_offset=1).config.steps_offset
    1
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False):
        self._setup()
        self.final_alpha_cumprod = self.one if set_alpha_to_one else self.alphas_cumprod[0]
        self._alpha_before_first, self._final_alpha = self.final_alpha_cumprod, float(self.final_alpha_cumprod)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Set ``num_inference_steps`` timesteps spaced by ``config.timestep_spacing`` (default "leading")."""
        timesteps = self._spacing(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def _get_variance(self, timestep, prev_timestep) -> Tensor:
        """diffusers' ``DDIMScheduler._get_variance``: (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        from the float32 tables (abar_prev = final_alpha_cumprod for a negative prev_timestep).

        >>> round(float(DDIMScheduler()._get_variance(420, 400)), 4)
        0.1477
        """
        return self._variance_terms(timestep, prev_timestep)[0]

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
        spec = self._spec("ddim", eta=float(eta), final_alpha_cumprod=self._final_alpha,
                          use_clipped_model_output=bool(use_clipped_model_output),
                          prev_offset=-(self.config.num_train_timesteps // self.num_inference_steps))
        prev_sample, pred_x0 = apply_step(spec, model_output, t, sample, self.schedule, noise=variance_noise,
                                          generator=generator, uncond_output=uncond_output, guidance=guidance)
        return SchedulerOutput(prev_sample, pred_x0) if return_dict else (prev_sample, pred_x0)
