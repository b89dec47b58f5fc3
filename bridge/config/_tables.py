"""The ``[tables.NAME]`` loader, with the memcache_table(5) file a table may name.

Theory of operation
-------------------
A table's settings are layered, lowest first::

    PARAMETERS defaults  <-  the .cf file named by ``config =``  <-  keys in [tables.NAME]

Each setting remembers where it was written (file, line, directory), so a
problem names the file that holds the bad value and relative file names
resolve against the directory of the file that mentions them. A ``.cf``
value overridden in the TOML is never converted, so it cannot be wrong.

The ``.cf`` file is read by :func:`bridge.postfix_cf.read_cf_file`, told
the memcache_table(5) names (MC-1: the schema's ``postfix`` keys) and the
bridge-only names (ignored there, with a warning that says to set them
in the TOML); its problems become :class:`ConfigProblem` values here.
:func:`parse_cf_file` is that reading on its own, for callers that want
a ``.cf`` file's text values.

Every key is converted by its kind (:mod:`bridge.config._convert`), in
schema order; ``domain`` is converted last, as it needs the table's
``smtputf8``, and ``backup`` again when the table is ``writable`` (the
backup type must then be writable, like proxywrite, PX-2).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from bridge.address_search import resolve_mapping
from bridge.config._convert import (
    CONVERTERS,
    Invalid,
    Setting,
    default_value,
    domain_filter,
    table_spec,
    toml_type,
    unknown_keys,
)
from bridge.config._results import ConfigError, ConfigProblem, TableConfig
from bridge.config._schema import (
    BRIDGE_ONLY_NAMES,
    PARAMETERS,
    POSTFIX_NAMES,
    Parameter,
    by_name,
)
from bridge.keys import DomainFilter, KeyTemplate
from bridge.postfix_cf import CfEntry, CfProblem, read_cf_file

_T = TypeVar("_T")

_PARAMETERS_BY_NAME = by_name(PARAMETERS)
#: The manual page of the files ``config =`` names, for messages.
_MANUAL = "memcache_table(5)"
#: Socketmap names go on the wire after the last ':' of the Postfix table
#: name and end at the first space (SM-1), so neither may appear; the rest
#: is kept to characters that are safe in file names and logs.
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)


@dataclass(frozen=True, slots=True)
class TomlFile:
    """The TOML file being loaded."""

    path: str  # as the user gave it, for messages
    base_dir: str  # absolute directory of the file


def os_reason(exc: OSError) -> str:
    """Why a file cannot be read, for a problem."""
    return f"cannot read file: {exc.strerror or exc}"


def take(values: Mapping[str, object], name: str, kind: type[_T]) -> _T:
    """``values[name]``, which the converters made a ``kind``."""
    value = values[name]
    assert isinstance(value, kind), (name, value)
    return value


def take_optional(values: Mapping[str, object], name: str, kind: type[_T]) -> _T | None:
    """``values[name]``, a ``kind`` or None."""
    value = values[name]
    assert value is None or isinstance(value, kind), (name, value)
    return value


# ----------------------------------------------------------- the .cf file


def _problem(problem: CfProblem, table: str | None = None) -> ConfigProblem:
    return ConfigProblem(problem.file, table, problem.name, problem.message, line=problem.line)


def parse_cf_file(path: str) -> dict[str, str]:
    """Read a memcache_table(5) ``.cf`` file as Postfix does (CF-1..CF-8).

    Args:
      path: the file name.

    Returns:
      The memcache_table(5) parameters it sets (MC-1 names only; other
      names are ignored with a warning), values trimmed and otherwise
      unchanged: no comment, quote or ``$name`` processing.

    Raises:
      ConfigError: the file cannot be read, or a line has no ``=`` or no
        name (CF-5). Every bad line is listed, with its line number.
    """
    try:
        cf = read_cf_file(path, POSTFIX_NAMES, manual=_MANUAL, elsewhere=BRIDGE_ONLY_NAMES)
    except OSError as exc:
        raise ConfigError([ConfigProblem(path, None, None, os_reason(exc))]) from None
    if cf.problems:
        raise ConfigError(_problem(problem) for problem in cf.problems)
    return cf.values()


@dataclass(frozen=True, slots=True)
class _CfSource:
    """A memcache_table(5) file named by ``config =``, read."""

    path: str
    base_dir: str
    entries: Mapping[str, CfEntry]


def _table_cf_file(config: object, toml: TomlFile) -> tuple[_CfSource | None, list[ConfigProblem]]:
    """Read the ``.cf`` file of a table (None: the table has no ``config =``)."""
    if config is None:
        return None, []
    if not isinstance(config, str):
        message = f"must be a file name (a string), not {toml_type(config)}"
        return None, [ConfigProblem(toml.path, None, "config", message)]
    if not config.strip():
        return None, [ConfigProblem(toml.path, None, "config", "empty file name")]
    path = os.path.normpath(os.path.join(toml.base_dir, config.strip()))
    try:
        cf = read_cf_file(path, POSTFIX_NAMES, manual=_MANUAL, elsewhere=BRIDGE_ONLY_NAMES)
    except OSError as exc:
        # MC-6: Postfix cannot use a table whose .cf file it cannot read.
        return None, [ConfigProblem(toml.path, None, "config", f"{path}: {os_reason(exc)}")]
    problems = [_problem(problem) for problem in cf.problems]
    return _CfSource(path, os.path.dirname(path), cf.entries), problems


# ---------------------------------------------------------------- tables


def load_table(
    name: str, raw: object, toml: TomlFile
) -> tuple[TableConfig | None, list[ConfigProblem]]:
    """Check one ``[tables.NAME]`` section, with its ``.cf`` file if it names one."""
    problems: list[ConfigProblem] = []
    if not _TABLE_NAME.fullmatch(name):
        message = (
            "invalid table name: use only letters, digits, '_', '.' and '-' "
            "(socketmap names cannot hold ':' or spaces, SM-1)"
        )
        problems.append(ConfigProblem(toml.path, name, None, message))
    if not isinstance(raw, dict):
        message = f"must be a table ([tables.{name}]), not {toml_type(raw)}"
        problems.append(ConfigProblem(toml.path, name, None, message))
        return None, problems
    for key, message in unknown_keys(raw, tuple(_PARAMETERS_BY_NAME)):
        problems.append(ConfigProblem(toml.path, name, key, message))

    cf, cf_problems = _table_cf_file(raw.get("config"), toml)
    problems.extend(dataclasses.replace(p, table=name) for p in cf_problems)
    settings = _layer_settings(raw, cf, toml)
    values, value_problems = _convert_settings(settings)
    problems.extend(dataclasses.replace(p, table=name) for p in value_problems)
    if problems:
        return None, problems

    # TableConfig has one base_dir for backup and for domain table items:
    # backup's own file wins, as a relative backup name is the common case.
    base_dir = cf.base_dir if cf else toml.base_dir
    if values["backup"] is not None:
        base_dir = settings["backup"].base_dir
    elif values["domain"] is not None:
        base_dir = settings["domain"].base_dir
    source = f"{toml.path} (via {cf.path})" if cf else toml.path
    return _table_config(name, source, base_dir, values), []


def _layer_settings(
    raw: Mapping[str, object], cf: _CfSource | None, toml: TomlFile
) -> dict[str, Setting]:
    """Defaults, then the ``.cf`` file, then the TOML section: the last one given wins."""
    settings: dict[str, Setting] = {}
    file, base_dir = (cf.path, cf.base_dir) if cf else (toml.path, toml.base_dir)
    for param in PARAMETERS:
        assert param.default is not None  # every table key has a plain default
        default = default_value(param, param.default)
        settings[param.name] = Setting(default, file, None, base_dir)
    if cf is not None:
        for key, entry in cf.entries.items():
            settings[key] = Setting(entry.value, cf.path, entry.line, cf.base_dir)
    for key, value in raw.items():
        if key in _PARAMETERS_BY_NAME:
            settings[key] = Setting(value, toml.path, None, toml.base_dir)
    return settings


def _convert_settings(
    settings: Mapping[str, Setting],
) -> tuple[dict[str, object], list[ConfigProblem]]:
    """Check and convert every setting, driven by the kinds in :data:`PARAMETERS`."""
    values: dict[str, object] = {}
    problems: list[ConfigProblem] = []

    def convert(name: str, converter: Callable[[Setting], object]) -> None:
        setting = settings[name]
        try:
            values[name] = converter(setting)
        except Invalid as exc:
            problems.append(ConfigProblem(setting.file, None, name, str(exc), line=setting.line))

    for param in PARAMETERS:
        converter = CONVERTERS.get(param.kind)
        if converter is not None:
            convert(param.name, _bind(converter, param))
    # The domain list folds its literals, so it needs the table's smtputf8.
    smtputf8 = values.get("smtputf8") is not False
    convert("domain", lambda setting: domain_filter(setting, smtputf8=smtputf8))
    # writable needs a backup type the bridge can write (like proxywrite, PX-2).
    if values.get("writable") is True and isinstance(values.get("backup"), str):
        convert("backup", lambda setting: table_spec(setting, writable=True))
    return values, problems


def _bind(
    converter: Callable[[Setting, Parameter], object], param: Parameter
) -> Callable[[Setting], object]:
    return lambda setting: converter(setting, param)


def _table_config(
    name: str, source: str, base_dir: str, values: Mapping[str, object]
) -> TableConfig:
    return TableConfig(
        name=name,
        source=source,
        base_dir=base_dir,
        memcache=take(values, "memcache", tuple),
        backup=take_optional(values, "backup", str),
        flags=take(values, "flags", int),
        ttl=take(values, "ttl", int),
        key_format=take(values, "key_format", KeyTemplate),
        key_digest=take_optional(values, "key_digest", str),
        domain=take_optional(values, "domain", DomainFilter),
        data_size_limit=take(values, "data_size_limit", int),
        line_size_limit=take(values, "line_size_limit", int),
        max_try=take(values, "max_try", int),
        retry_pause=take(values, "retry_pause", int),
        timeout=take(values, "timeout", int),
        fold_case=take(values, "fold_case", bool),
        writable=take(values, "writable", bool),
        smtputf8=take(values, "smtputf8", bool),
        address_search=take(values, "address_search", tuple),
        address_mapping=resolve_mapping(
            take(values, "address_mapping", str), take(values, "address_search", tuple)
        ),
        propagate_unmatched_extensions=take(values, "propagate_unmatched_extensions", tuple),
        recipient_delimiter=take(values, "recipient_delimiter", str),
        local_domains=take(values, "local_domains", tuple),
        ketama_hash=take(values, "ketama_hash", str),
        eject_after=take(values, "eject_after", int),
        retry_after=take(values, "retry_after", float),
        hot_cache_ttl=take(values, "hot_cache_ttl", float),
        hot_cache_size=take(values, "hot_cache_size", int),
        busy_poll_us=take(values, "busy_poll_us", int),
        queue_directory=take(values, "queue_directory", str),
        proxymap_protocol=take(values, "proxymap_protocol", str),
    )
