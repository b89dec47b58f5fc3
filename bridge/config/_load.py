"""The TOML file: its top level, ``[[listen]]`` entries and ``[metrics]``, and load_config.

Theory of operation
-------------------
:func:`load_config` reads the TOML file and checks each section against
its tuple of parameters in :mod:`bridge.config._schema`: the top level,
each ``[[listen]]`` entry, ``[metrics]`` here, each ``[tables.NAME]`` in
:mod:`bridge.config._tables`. Every problem of every section is
collected, in file order (top-level keys, tables, listeners, metrics),
and raised together as one :class:`ConfigError`; nothing is returned
half-configured.

The top level, a listener and ``[metrics]`` go through one schema-driven
pass, :func:`_convert_section`: for each parameter in schema order, the
value written, else its default (required keys are reported missing, and
a :class:`~bridge.config._schema.ByKey` default is looked up by the
converted value of the key it depends on, e.g. a listener's
``idle_timeout`` by its ``protocol``), converted by the parameter's kind.
What is particular to a section is given to that pass as data:

* ``scope``: keys that do not apply to a value already converted
  (``allow`` and ``reuse_port`` for inet listeners only; ``mode``,
  ``owner`` and ``group`` for unix ones);
* ``checks``: rules on a converted value beyond its kind (a tcp
  listener's table must be configured; the metrics endpoint is inet;
  ``health_interval`` is above 0).

The few rules across sections (one endpoint per listener) are checked
at the end.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Literal

from bridge.config._convert import (
    Invalid,
    Setting,
    convert,
    default_value,
    toml_type,
    unknown_keys,
)
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
    TOP_LEVEL_PARAMETERS,
    Parameter,
    by_name,
)
from bridge.config._tables import TomlFile, load_table, os_reason, take, take_optional
from bridge.endpoint import Endpoint, InetEndpoint, UnixEndpoint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

_LISTENER_PARAMETERS_BY_NAME = by_name(LISTENER_PARAMETERS)
_METRICS_PARAMETERS_BY_NAME = by_name(METRICS_PARAMETERS)
_TOP_LEVEL_KEYS = ("listen", "tables", "metrics", *(p.name for p in TOP_LEVEL_PARAMETERS))
#: Listener keys that only mean something for one kind of endpoint.
_INET_ONLY = ("allow", "reuse_port")
_UNIX_ONLY = ("mode", "owner", "group")

#: Reports a problem with one key of a section (None: the section itself).
_Report = Callable[[str | None, str], None]
#: Says why a key may not be written, given the section's values so far.
_Scope = Callable[[Parameter, Mapping[str, object]], str | None]
#: Says what is wrong with a converted value beyond its kind.
_Check = Callable[[object], str | None]


def _everywhere(parameter: Parameter, values: Mapping[str, object]) -> str | None:
    return None


def _convert_section(
    parameters: Sequence[Parameter],
    raw: Mapping[str, object],
    toml: TomlFile,
    report: _Report,
    *,
    scope: _Scope = _everywhere,
    checks: Mapping[str, _Check] = MappingProxyType({}),
) -> dict[str, object]:
    """Every key of a TOML section, converted: the value written, else the schema's default.

    Returns:
      The converted values by key. A key that was reported (missing, bad,
      not allowed here) is left out, so the caller builds its result only
      when nothing was reported.
    """
    values: dict[str, object] = {}
    for param in parameters:
        given = param.name in raw
        if given:
            misplaced = scope(param, values)
            if misplaced is not None:
                report(param.name, misplaced)
                continue
        default = param.default
        if param.by is not None:
            context = values.get(param.by.key)
            if not isinstance(context, str):
                # The key this default depends on is itself missing or wrong
                # (and reported): check a written value all the same.
                if not given:
                    continue
            elif not param.by.applies(context):
                if given:
                    why = f": {param.by.otherwise}" if param.by.otherwise else ""
                    report(param.name, f"not allowed for {context}{why}")
                else:
                    values[param.name] = None
                continue
            else:
                default = param.by.default_for(context)
        if given:
            value = raw[param.name]
        elif default is not None:
            value = default_value(param, default)
        else:
            report(param.name, f"missing: {param.missing}" if param.missing else "missing")
            continue
        try:
            converted = convert(param, Setting(value, toml.path, None, toml.base_dir))
        except Invalid as exc:
            report(param.name, str(exc))
            continue
        check = checks.get(param.name)
        complaint = check(converted) if check is not None else None
        if complaint is not None:
            report(param.name, complaint)
            continue
        values[param.name] = converted
    return values


def _schema_default(parameter: Parameter, toml: TomlFile) -> object:
    """The converted default of a key with a plain default, for a section left out."""
    assert parameter.default is not None, parameter.name
    setting = Setting(default_value(parameter, parameter.default), toml.path, None, toml.base_dir)
    return convert(parameter, setting)


# ------------------------------------------------------------- listeners


def _listener_scope(parameter: Parameter, values: Mapping[str, object]) -> str | None:
    endpoint = values.get("endpoint")
    if parameter.name in _INET_ONLY and isinstance(endpoint, UnixEndpoint):
        return "only for inet: listeners"
    if parameter.name in _UNIX_ONLY and isinstance(endpoint, InetEndpoint):
        return "only for unix: listeners"
    return None


def _load_listener(
    index: int, raw: object, table_names: Iterable[str], toml: TomlFile
) -> tuple[ListenerConfig | None, list[ConfigProblem]]:
    problems: list[ConfigProblem] = []

    def report(key: str | None, message: str) -> None:
        problems.append(ConfigProblem(toml.path, None, key, message, listener=index))

    if not isinstance(raw, dict):
        report(None, f"must be a table ([[listen]]), not {toml_type(raw)}")
        return None, problems
    for key, message in unknown_keys(raw, tuple(_LISTENER_PARAMETERS_BY_NAME)):
        report(key, message)

    names = tuple(table_names)

    def configured(table: object) -> str | None:
        if table in names:
            return None
        return f"unknown table {table!r}: no [tables.{table}] section"

    values = _convert_section(
        LISTENER_PARAMETERS,
        raw,
        toml,
        report,
        scope=_listener_scope,
        checks={"table": configured},
    )
    if problems:
        return None, problems
    endpoint = values["endpoint"]
    assert isinstance(endpoint, InetEndpoint | UnixEndpoint), endpoint
    protocol: Literal["socketmap", "tcp"] = "tcp" if values["protocol"] == "tcp" else "socketmap"
    return ListenerConfig(
        endpoint=endpoint,
        protocol=protocol,
        table=take_optional(values, "table", str),
        idle_timeout=take(values, "idle_timeout", float),
        max_connections=take(values, "max_connections", int),
        request_timeout=take(values, "request_timeout", float),
        allow=take(values, "allow", tuple),
        reuse_port=take(values, "reuse_port", bool),
        serving="tasks" if values["serving"] == "tasks" else "events",
        busy_poll_us=take(values, "busy_poll_us", int),
        mode=take(values, "mode", int),
        owner=take_optional(values, "owner", int),
        group=take_optional(values, "group", int),
    ), []


def _load_listeners(
    raw: object, table_names: Iterable[str], toml: TomlFile
) -> tuple[list[ListenerConfig], list[ConfigProblem]]:
    if raw is None or raw == []:
        return [], [ConfigProblem(toml.path, None, None, "no listeners: add a [[listen]] section")]
    if not isinstance(raw, list):
        message = f"must be an array of tables (write [[listen]]), not {toml_type(raw)}"
        return [], [ConfigProblem(toml.path, None, "listen", message)]
    names = tuple(table_names)
    listeners: list[ListenerConfig] = []
    problems: list[ConfigProblem] = []
    first_use: dict[Endpoint, int] = {}
    for index, item in enumerate(raw, start=1):
        listener, listener_problems = _load_listener(index, item, names, toml)
        problems.extend(listener_problems)
        if listener is None:
            continue
        endpoint = _comparable(listener.endpoint)
        if endpoint in first_use:
            message = f"{listener.endpoint} is already used by listener #{first_use[endpoint]}"
            problems.append(ConfigProblem(toml.path, None, "endpoint", message, listener=index))
            continue
        first_use[endpoint] = index
        listeners.append(listener)
    return listeners, problems


def _comparable(endpoint: Endpoint) -> Endpoint:
    """The endpoint with its path normalised, so ``a/../s`` and ``s`` count as the same socket."""
    if isinstance(endpoint, UnixEndpoint):
        return UnixEndpoint(os.path.normpath(endpoint.path))
    return InetEndpoint(endpoint.host.lower(), endpoint.port)


# --------------------------------------------------------------- metrics


def _inet_endpoint(endpoint: object) -> str | None:
    if isinstance(endpoint, InetEndpoint):
        return None
    return "must be inet:HOST:PORT (HTTP for Prometheus)"


def _above_zero(interval: object) -> str | None:
    assert isinstance(interval, float)
    return None if interval > 0 else "must be above 0 seconds"


def _metrics_section(
    raw: object, toml: TomlFile
) -> tuple[InetEndpoint | None, float, list[ConfigProblem]]:
    """``[metrics]``: endpoint (inet only) and health_interval."""
    interval = _schema_default(_METRICS_PARAMETERS_BY_NAME["health_interval"], toml)
    assert isinstance(interval, float)
    if raw is None:
        return None, interval, []
    problems: list[ConfigProblem] = []

    def report(key: str | None, message: str) -> None:
        problems.append(
            ConfigProblem(toml.path, None, f"metrics.{key}" if key else "metrics", message)
        )

    if not isinstance(raw, dict):
        report(None, f"must be a table ([metrics]), not {toml_type(raw)}")
        return None, interval, problems
    for key, message in unknown_keys(raw, tuple(_METRICS_PARAMETERS_BY_NAME)):
        report(key, message)
    values = _convert_section(
        METRICS_PARAMETERS,
        raw,
        toml,
        report,
        checks={"endpoint": _inet_endpoint, "health_interval": _above_zero},
    )
    if problems:
        return None, interval, problems
    return take(values, "endpoint", InetEndpoint), take(values, "health_interval", float), []


# -------------------------------------------------------------- the file


def _read_toml(toml: TomlFile) -> dict[str, object]:
    """Parse the TOML file.

    Raises:
      ConfigError: unreadable file or TOML syntax error (with its line).
    """
    try:
        with open(toml.path, "rb") as stream:
            return tomllib.load(stream)
    except OSError as exc:
        raise ConfigError([ConfigProblem(toml.path, None, None, os_reason(exc))]) from None
    except UnicodeDecodeError:
        message = "not valid UTF-8 (TOML files must be UTF-8)"
        raise ConfigError([ConfigProblem(toml.path, None, None, message)]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_syntax_problem(toml.path, exc)]) from None


#: tomllib puts the position at the end of its message; Python 3.14 also
#: has attributes for it, but 3.10-3.13 do not.
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _toml_syntax_problem(path: str, exc: ValueError) -> ConfigProblem:
    message = str(exc)
    position = _TOML_POSITION.search(message)
    if position is None:
        return ConfigProblem(path, None, None, f"TOML syntax error: {message}")
    line, column = int(position[1]), int(position[2])
    text = message[: position.start()]
    return ConfigProblem(
        path, None, None, f"TOML syntax error: {text} (column {column})", line=line
    )


def _load_tables(
    raw_tables: object, toml: TomlFile
) -> tuple[dict[str, TableConfig], Mapping[str, object], list[ConfigProblem]]:
    """Every ``[tables.NAME]``; also the names written, good or bad, for the listeners."""
    problems: list[ConfigProblem] = []
    if not isinstance(raw_tables, dict):
        message = f"must be a table of tables ([tables.NAME]), not {toml_type(raw_tables)}"
        return {}, {}, [ConfigProblem(toml.path, None, "tables", message)]
    if not raw_tables:
        message = "no tables: add a [tables.NAME] section"
        problems.append(ConfigProblem(toml.path, None, None, message))
    tables: dict[str, TableConfig] = {}
    for name, raw_table in raw_tables.items():
        table, table_problems = load_table(name, raw_table, toml)
        problems.extend(table_problems)
        if table is not None:
            tables[name] = table
    return tables, raw_tables, problems


def load_config(path: str) -> BridgeConfig:
    """Read and check the whole configuration.

    Args:
      path: the TOML file. Relative file names inside it resolve against
        its directory; relative names inside a ``.cf`` file against the
        ``.cf`` file's directory.

    Returns:
      The configuration, every value checked and converted.

    Raises:
      ConfigError: listing every problem found (unknown keys, bad values,
        unreadable or malformed ``.cf`` files, listener mistakes, ...).
        Nothing is returned half-configured.
    """
    toml = TomlFile(path, os.path.dirname(os.path.abspath(path)))
    raw = _read_toml(toml)
    problems: list[ConfigProblem] = []

    def report(key: str | None, message: str) -> None:
        problems.append(ConfigProblem(toml.path, None, key, message))

    for key, message in unknown_keys(raw, _TOP_LEVEL_KEYS):
        report(key, message)
    values = _convert_section(TOP_LEVEL_PARAMETERS, raw, toml, report)

    tables, raw_tables, table_problems = _load_tables(raw.get("tables", {}), toml)
    problems.extend(table_problems)
    listeners, listener_problems = _load_listeners(raw.get("listen"), raw_tables, toml)
    problems.extend(listener_problems)
    metrics_endpoint, health_interval, metrics_problems = _metrics_section(raw.get("metrics"), toml)
    problems.extend(metrics_problems)
    if problems:
        raise ConfigError(problems)
    return BridgeConfig(
        path=os.path.abspath(path),
        listeners=tuple(listeners),
        tables=MappingProxyType(tables),
        log_level=take(values, "log_level", str),
        metrics_endpoint=metrics_endpoint,
        health_interval=health_interval,
        user=take_optional(values, "user", int),
        group=take_optional(values, "group", int),
        workers=take(values, "workers", int),
        log_format=take(values, "log_format", str),
        log_target=take(values, "log_target", str),
        syslog_facility=take(values, "syslog_facility", str),
        syslog_socket=take(values, "syslog_socket", str),
    )
