"""Named option sets and explicit configuration (JAX/Flax).

:func:`get_preset` returns a ready set of skip options::

    stack = MHCSequential(layers, **get_preset("stable"))

:class:`MHCConfig` holds the options a project fixes once, read from the
``[tool.mhc]`` table of a ``pyproject.toml`` by :func:`load_config_from_toml`
and handed over explicitly::

    config = load_config_from_toml("pyproject.toml")
    stack = MHCSequential(layers, **config.sequential_options())

The table and the presets are those of :mod:`mhc_torch.presets`, so one
``pyproject.toml`` configures both packages; the only difference is the name
of the init option, ``mixing_init`` here (Linen reserves ``Module.init``), which
the options this module returns already use. There is no process-wide default:
:func:`set_default_config` refuses, naming the explicit form above.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from os import PathLike

from .skip import check_bools, check_skip_options

__all__ = [
    "PRESETS",
    "ConfigError",
    "MHCConfig",
    "get_preset",
    "get_default_config",
    "set_default_config",
    "load_config_from_toml",
]

#: The named option sets (see :data:`mhc_torch.presets.PRESETS` for what each
#: chooses); the same values, with ``init`` spelled ``mixing_init``.
PRESETS: dict[str, dict] = {
    "stable": dict(mode="mhc", constraint="identity", epsilon=0.1, temperature=1.0, mixing_init="identity"),
    "aggressive": dict(mode="mhc", constraint="simplex", epsilon=0.0, temperature=0.7, mixing_init="uniform"),
    "research": dict(mode="mhc", constraint="simplex", epsilon=0.05, temperature=1.0, mixing_init="uniform"),
}

#: ``history_scope`` values (read by ``mhc_torch.inject_mhc``; checked here too,
#: so a table that one package rejects the other rejects as well).
SCOPES = ("module", "global")


class ConfigError(ValueError, TypeError):
    """An unknown option in a configuration.

    A ``ValueError`` like every bad value here, and a ``TypeError`` as well,
    which is what the ``mhc`` package raised for the same mistake: an
    ``except`` clause written for either catches it.
    """


def get_preset(name: str) -> dict:
    """A new dict of skip options for the preset ``name`` (case-insensitive).

    The options are valid for :class:`MHCSkip` and :class:`MHCSequential`.

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

    The same fields (and TOML keys) as :class:`mhc_torch.MHCConfig`, so
    ``init`` keeps that name here and :meth:`skip_options` hands it over as
    ``mixing_init``. ``history_scope`` is read by ``mhc_torch.inject_mhc``
    only. Values are checked on construction.
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
        check_bools(
            detach_history=self.detach_history,
            clear_history_each_forward=self.clear_history_each_forward,
            auto_project=self.auto_project,
        )
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
            mixing_init=self.init,
            auto_project=self.auto_project,
            leak=self.leak,
        )

    def sequential_options(self) -> dict:
        """Keyword arguments for :class:`MHCSequential`.

        Raises:
          ValueError: ``clear_history_each_forward=False``: a Flax stack keeps no
            state between calls; carry a window by passing ``history=`` instead.
        """
        if not self.clear_history_each_forward:
            raise ValueError(
                "clear_history_each_forward=False has no Flax equivalent: mhc_jax.MHCSequential "
                "starts every call from a fresh window unless you pass history= (a History) and "
                "keep the one it returns"
            )
        return dict(self.skip_options(), detach_history=self.detach_history)


def get_default_config() -> MHCConfig:
    """A new :class:`MHCConfig` holding this package's defaults."""
    return MHCConfig()


def set_default_config(config: MHCConfig) -> None:
    """Not offered: there are no process-wide defaults to set.

    Raises:
      NotImplementedError: always, naming the explicit replacement.
    """
    raise NotImplementedError(
        "mhc_jax has no process-wide default configuration (one call would change every "
        "model built after it). Pass the options where they are used: "
        "MHCSequential(layers, **config.sequential_options()) or MHCSkip(**config.skip_options())"
    )


def load_config_from_toml(path: str | PathLike) -> MHCConfig:
    """The :class:`MHCConfig` of the ``[tool.mhc]`` table in the TOML file ``path``.

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
