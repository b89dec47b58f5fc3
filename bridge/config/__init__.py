"""The bridge configuration: one TOML file, optionally pulling in memcache_table(5) files.

Theory of operation
-------------------
:func:`load_config` reads the TOML file and turns it into frozen values
(:class:`BridgeConfig`, :class:`ListenerConfig`, :class:`TableConfig`) or
raises one :class:`ConfigError` listing *every* problem it found, so a
daemon either starts fully configured or not at all.

The package is four kinds of code, one private module each; everything
other modules use is re-exported here, and imported from here only:

``_schema``
    :class:`Parameter` records for the four sections (top level,
    ``[[listen]]``, ``[metrics]``, ``[tables.NAME]``): the one place each
    key's kind, default, minimum and description are written. Parsing is
    driven from it, and the documentation is generated from it.
``_convert``
    one converter per parameter kind, and Postfix's integer syntax
    (MC-2, :func:`parse_postfix_int`).
``_tables`` and ``_load``
    the loaders: tables (layered over the memcache_table(5) file a table
    may name, read by :mod:`bridge.postfix_cf`), then listeners, metrics
    and the top level, and :func:`load_config`.
``_results``
    what comes out: the problems and the frozen configuration values.

Warnings (ignored ``.cf`` names, repeated names) go to the
``bridge.config`` logger.
"""

from __future__ import annotations

from bridge.config._convert import parse_postfix_int
from bridge.config._load import load_config
from bridge.config._results import (
    BridgeConfig,
    ConfigError,
    ConfigProblem,
    ListenerConfig,
    TableConfig,
)
from bridge.config._schema import (
    LISTENER_PARAMETERS,
    METRICS_PARAMETERS,
    PARAMETERS,
    TOP_LEVEL_PARAMETERS,
    ByKey,
    Parameter,
    ParameterKind,
)
from bridge.config._tables import parse_cf_file

__all__ = [
    "LISTENER_PARAMETERS",
    "METRICS_PARAMETERS",
    "PARAMETERS",
    "TOP_LEVEL_PARAMETERS",
    "BridgeConfig",
    "ByKey",
    "ConfigError",
    "ConfigProblem",
    "ListenerConfig",
    "Parameter",
    "ParameterKind",
    "TableConfig",
    "load_config",
    "parse_cf_file",
    "parse_postfix_int",
]


def _fixup_module_names() -> None:
    """Let the re-exported classes and functions say they live in bridge.config.

    Reprs, tracebacks and documentation then name the public module, as
    trio does for its private modules.
    """
    for name in __all__:
        value = globals()[name]
        module = getattr(value, "__module__", None)
        if isinstance(module, str) and module.startswith(f"{__name__}."):
            value.__module__ = __name__


_fixup_module_names()
