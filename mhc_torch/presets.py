"""Named option sets and explicit configuration (PyTorch).

:func:`get_preset` returns a ready set of skip options::

    stack = MHCSequential(layers, **get_preset("stable"))

:class:`MHCConfig` holds the options a project fixes once, read from the
``[tool.mhc]`` table of a ``pyproject.toml`` by :func:`load_config_from_toml`
and handed over explicitly::

    config = load_config_from_toml("pyproject.toml")
    stack = MHCSequential(layers, **config.sequential_options())

There is no process-wide default: a global that one call changes would alter
every model built anywhere after it, far from the line that changed it.
:func:`set_default_config` therefore refuses, naming the explicit form above.
The twin is :mod:`mhc_jax.presets` (same presets, the same TOML table).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from os import PathLike

from .history import check_bool
from .inject import SCOPES
from .skip import check_skip_options

__all__ = [
    "PRESETS",
    "ConfigError",
    "MHCConfig",
    "get_preset",
    "get_default_config",
    "set_default_config",
    "load_config_from_toml",
]

#: The named option sets. Every preset uses ``mode="mhc"``:
#:
#: * ``"stable"``: the latest state always keeps at least ``epsilon = 0.1`` of
#:   the weight (``constraint="identity"``) and a fresh skip starts as a
#:   near-plain residual (``init="identity"``);
#: * ``"aggressive"``: the bare simplex projection at ``temperature=0.7``
#:   (sharper, so history slots reach exactly 0 sooner), from uniform weights;
#: * ``"research"``: the bare simplex projection from uniform weights (its
#:   ``epsilon`` is only read by ``constraint="identity"``).
PRESETS: dict[str, dict] = {
    "stable": dict(mode="mhc", constraint="identity", epsilon=0.1, temperature=1.0, init="identity"),
    "aggressive": dict(mode="mhc", constraint="simplex", epsilon=0.0, temperature=0.7, init="uniform"),
    "research": dict(mode="mhc", constraint="simplex", epsilon=0.05, temperature=1.0, init="uniform"),
}


class ConfigError(ValueError, TypeError):
    """An unknown option in a configuration.

    A ``ValueError`` like every bad value here, and a ``TypeError`` as well,
    which is what the ``mhc`` package raised for the same mistake: an
    ``except`` clause written for either catches it.
    """


def get_preset(name: str) -> dict:
    """A new dict of skip options for the preset ``name`` (case-insensitive).

    The options are valid for :class:`MHCSkip`, :class:`MHCSequential` and
    :func:`inject_mhc`; see :data:`PRESETS` for what each one chooses.

    Raises:
        ValueError: ``name`` is not one of :data:`PRESETS` (the message lists them).
    """
    key = name.lower() if isinstance(name, str) else None
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {sorted(PRESETS)}")
    return dict(PRESETS[key])


@dataclass(frozen=True)
class MHCConfig:
    """Options a project fixes once: a value to pass on, never a global.

    The fields are the skip's options (:class:`MHCSkip`) plus the stack's
    (:class:`MHCSequential`) and :func:`inject_mhc`'s ``history_scope``; the
    defaults are this package's own. Values are checked on construction.
    Hand them over with :meth:`skip_options`, :meth:`sequential_options`
    or :meth:`inject_options`.
    """

    max_history: int = 4
    mode: str = "mhc"
    constraint: str = "simplex"
    epsilon: float = 0.1
    temperature: float = 1.0
    init: str = "identity"
    detach_history: bool = False
    clear_history_each_forward: bool = True
    auto_project: bool = False
    history_scope: str = "global"
    leak: float = 0.0

    def __post_init__(self):
        check_skip_options(
            self.mode, self.max_history, self.constraint, self.epsilon, self.temperature, self.init, 0.0,
            leak=self.leak,
        )
        for name in ("detach_history", "clear_history_each_forward", "auto_project"):
            check_bool(name, getattr(self, name))
        if self.history_scope not in SCOPES:
            raise ValueError(f"history_scope must be one of {SCOPES}, got {self.history_scope!r}")

    def skip_options(self) -> dict:
        """Keyword arguments for :class:`MHCSkip`."""
        return dict(
            mode=self.mode,
            max_history=self.max_history,
            constraint=self.constraint,
            epsilon=self.epsilon,
            temperature=self.temperature,
            init=self.init,
            auto_project=self.auto_project,
            leak=self.leak,
        )

    def sequential_options(self) -> dict:
        """Keyword arguments for :class:`MHCSequential`."""
        return dict(
            self.skip_options(),
            detach_history=self.detach_history,
            clear_history_each_forward=self.clear_history_each_forward,
        )

    def inject_options(self) -> dict:
        """Keyword arguments for :func:`inject_mhc` (after ``model, target_types``).

        Raises:
            ValueError: ``detach_history=True``, which ``inject_mhc`` does not offer.
        """
        if self.detach_history:
            raise ValueError(
                "inject_mhc keeps its windows attached to the autograd graph; "
                "detach_history=True applies to MHCSequential only"
            )
        options = self.skip_options()
        options.update(history_scope=self.history_scope, clear_on_forward=self.clear_history_each_forward)
        return options


def get_default_config() -> MHCConfig:
    """A new :class:`MHCConfig` holding this package's defaults."""
    return MHCConfig()


def set_default_config(config: MHCConfig) -> None:
    """Not offered: there are no process-wide defaults to set.

    In the ``mhc`` package this changed the defaults of every model built
    afterwards, anywhere in the process. Here options travel with the call
    that uses them.

    Raises:
        NotImplementedError: always, naming the explicit replacement.
    """
    raise NotImplementedError(
        "mhc_torch has no process-wide default configuration (one call would change every "
        "model built after it). Pass the options where they are used: "
        "MHCSequential(layers, **config.sequential_options()), "
        "MHCSkip(**config.skip_options()) or inject_mhc(model, types, **config.inject_options())"
    )


def load_config_from_toml(path: str | PathLike) -> MHCConfig:
    """The :class:`MHCConfig` of the ``[tool.mhc]`` table in the TOML file ``path``.

    Example ``pyproject.toml``::

        [tool.mhc]
        max_history = 6
        constraint = "identity"
        epsilon = 0.05

    Options the table leaves out keep their defaults; a file without the
    table gives the defaults.

    Raises:
        FileNotFoundError: no file at ``path``.
        ConfigError: a key that is not an :class:`MHCConfig` field (the message lists them).
        ValueError, TypeError: a value the option does not accept.
    """
    with open(path, "rb") as handle:
        table = tomllib.load(handle).get("tool", {}).get("mhc", {})
    return _config_from_table(MHCConfig, table, str(path))


def _config_from_table(config_type: type, table, where: str):
    """``config_type(**table)``, with an unknown key an error naming it and the valid ones."""
    if not isinstance(table, dict):
        raise ConfigError(f"[tool.mhc] in {where} must be a table, got {table!r}")
    fields = [f.name for f in dataclasses.fields(config_type)]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} in [tool.mhc] of {where}; the options are {fields}")
    return config_type(**table)
