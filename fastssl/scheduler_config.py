"""The configuration layer under :mod:`fastssl.schedulers`: diffusers' own when it is installed, else a small
stand-in with the same behaviour for what a scheduler user touches.

With diffusers installed this module re-exports its ``ConfigMixin``, ``register_to_config``,
``SchedulerMixin``, ``BaseOutput`` and ``FrozenDict``, so fastssl's schedulers save, load, convert and sit in
pipelines exactly as diffusers' do (``scheduler_config.json``, ``from_pretrained(path, subfolder=...)``,
``compatibles``, ``model_index.json`` entries). Without it (diffusers stays optional) the stand-ins below
give the same local behaviour: ``.config`` (a frozen dict with attribute access), ``register_to_config``,
``from_config`` (unknown keys ignored with a warning), ``save_config`` / ``save_pretrained`` writing
``scheduler_config.json`` and ``load_config`` / ``from_pretrained`` reading it from a local folder (or its
``subfolder``), and outputs that are dicts, tuples and dataclasses at once. Nothing is downloaded.

>>> config = FrozenDict(a=1)
>>> config.a, config["a"]
(1, 1)
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import warnings
from collections import OrderedDict

try:
    from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
    from diffusers.utils import BaseOutput

    DIFFUSERS = True
    KARRAS_SCHEDULERS = [e.name for e in KarrasDiffusionSchedulers]  # diffusers' DDPM/DDIM `_compatibles`
except ImportError:
    DIFFUSERS = False
    KARRAS_SCHEDULERS = []

    class FrozenDict(OrderedDict):
        """A read-only ordered dict whose keys are also attributes (diffusers' ``FrozenDict``)."""

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

    class BaseOutput(OrderedDict):
        """A dataclass that is also an ordered dict of its non-None fields and indexable like a tuple
        (diffusers' ``BaseOutput``): ``out.prev_sample``, ``out["prev_sample"]`` and ``out[0]`` agree."""

        def __post_init__(self):
            for field in dataclasses.fields(self):
                if getattr(self, field.name) is not None:
                    super().__setitem__(field.name, getattr(self, field.name))

        def __getitem__(self, key):
            return super().__getitem__(key) if isinstance(key, str) else self.to_tuple()[key]

        def to_tuple(self) -> tuple:
            return tuple(self[k] for k in self.keys())

    def _init_keys(cls) -> list:
        return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs")]

    def register_to_config(init):
        """Decorate ``__init__``: its arguments (defaults filled in) become the config before it runs."""

        @functools.wraps(init)
        def inner(self, *args, **kwargs):
            bound = inspect.signature(init).bind(self, *args, **kwargs)
            bound.apply_defaults()
            self.register_to_config(**{k: v for k, v in list(bound.arguments.items())[1:] if k != "kwargs"})
            init(self, *args, **kwargs)

        return inner

    class ConfigMixin:
        """``.config``, ``register_to_config``, ``from_config``, ``save_config``, ``load_config``."""

        config_name = None
        ignore_for_config: list = []
        has_compatibles = False
        _deprecated_kwargs: list = []

        def register_to_config(self, **kwargs):
            self._internal_dict = FrozenDict({**getattr(self, "_internal_dict", {}), **kwargs})

        @property
        def config(self) -> FrozenDict:
            return self._internal_dict

        @classmethod
        def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
            """Build from a config dict; ``kwargs`` override it. Keys of compatible classes and private keys
            are dropped quietly, other unknown keys with a warning (as diffusers)."""
            keys = _init_keys(cls)
            quiet = {k for c in cls._get_compatibles() for k in _init_keys(c)} if cls.has_compatibles else set()
            config = dict(config or {})
            unknown = {k: v for k, v in config.items() if k not in keys and k not in quiet and not k.startswith("_")}
            if unknown:
                warnings.warn(f"The config attributes {unknown} were passed to {cls.__name__}, but are not expected "
                              f"and will be ignored. Please verify your {cls.config_name} configuration file.",
                              UserWarning, stacklevel=2)
            init = {k: v for k, v in {**config, **kwargs}.items() if k in keys}
            scheduler = cls(**init)
            unused = {k: v for k, v in kwargs.items() if k not in keys}
            return (scheduler, unused) if return_unused_kwargs else scheduler

        def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
            """Write the config to ``save_directory/config_name`` as JSON (with ``_class_name``)."""
            if push_to_hub:
                raise NotImplementedError("push_to_hub needs diffusers (pip install diffusers)")
            if os.path.isfile(save_directory):
                raise ValueError(f"save_directory ({save_directory}) should be a directory, not a file")
            os.makedirs(save_directory, exist_ok=True)
            with open(os.path.join(save_directory, self.config_name), "w", encoding="utf-8") as f:
                json.dump({"_class_name": type(self).__name__, **self.config}, f, indent=2, sort_keys=True,
                          default=lambda value: value.tolist())

        @classmethod
        def load_config(cls, pretrained_model_name_or_path, subfolder=None, return_unused_kwargs: bool = False,
                        **kwargs):
            """The config dict in a local folder (or its ``subfolder``), or a JSON file's path."""
            path = os.fspath(pretrained_model_name_or_path)
            if os.path.isdir(path):
                path = os.path.join(path, subfolder or "", cls.config_name)
            if not os.path.isfile(path):
                raise OSError(f"no {cls.config_name} at {path}; without diffusers installed only local folders "
                              "load (nothing is downloaded)")
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            return (config, kwargs) if return_unused_kwargs else config

    class SchedulerMixin:
        """``from_pretrained``, ``save_pretrained`` and ``compatibles`` over :class:`ConfigMixin`."""

        config_name = "scheduler_config.json"
        _compatibles: list = []
        has_compatibles = True

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False,
                            **kwargs):
            config, kwargs = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder,
                                             return_unused_kwargs=True, **kwargs)
            return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

        def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
            self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

        @property
        def compatibles(self) -> list:
            return self._get_compatibles()

        @classmethod
        def _get_compatibles(cls) -> list:
            return [cls]
