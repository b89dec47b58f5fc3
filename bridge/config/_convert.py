"""Value converters: one per parameter kind, from what a user wrote to what the code uses.

Theory of operation
-------------------
Every key of every section goes through :func:`convert`, which picks the
converter for the key's :data:`~bridge.config._schema.ParameterKind`. A
converter takes a :class:`Setting` (the raw value with the file and the
directory it came from, as relative names resolve there) and returns the
checked value, or raises :class:`Invalid` with a message that the caller
turns into a :class:`~bridge.config.ConfigProblem` naming the file, the
section and the key.

A value that was not written is the schema's default text, fed to the
same converter (:func:`default_value` spells it as TOML would give it),
so defaults are checked like written values and never restated here.

Values come from TOML (typed) or from a ``.cf`` file (always text), so a
converter accepts both spellings where Postfix has one: integers follow
Postfix's syntax (MC-2, :func:`parse_postfix_int`), and lists may be one
string separated by commas and/or whitespace (DOM-2). Booleans must be
TOML booleans; no ``.cf`` key is a boolean.

``domain`` (it folds its literals, so it needs the table's ``smtputf8``)
and ``path`` (``config =`` is read before the other keys) have no entry
in :data:`CONVERTERS`; the table loader converts them itself.
"""

from __future__ import annotations

import difflib
import grp
import math
import os
import pwd
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network

from bridge.address_search import (
    validate_address_forms,
    validate_extension_classes,
    validate_mapping,
)
from bridge.config._schema import Parameter
from bridge.endpoint import Endpoint, EndpointError, parse_endpoint
from bridge.keys import DomainFilter, KeyConfigError, KeyTemplate, make_digest
from bridge.logs import LOG_TARGETS, SYSLOG_FACILITIES
from bridge.maps import OpenOptions, validate_spec
from bridge.maps.base import MapError
from bridge.memcache.ring import PoolServer
from bridge.postfix_text import WHITESPACE

#: Postfix keeps integer parameters in a C int (MC-2).
_INT_MIN = -(2**31)
_INT_MAX = 2**31 - 1
#: MC-2: optional sign, ASCII decimal digits, nothing else. Written out
#: because Python's int() also takes '_' separators and non-ASCII digits.
_POSTFIX_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
#: Separators of list-valued keys given as one string, as in Postfix lists (DOM-2).
_LIST_SEPARATORS = re.compile(r"[,\s]+")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_LOG_FORMATS = ("text", "json")
_PROTOCOLS = ("socketmap", "tcp")
_SERVING = ("events", "tasks")
_KETAMA_HASHES = ("one_at_a_time", "md5")
_PROXYMAP_PROTOCOLS = ("auto", "2.9", "3.11")


def parse_postfix_int(text: str) -> int:
    """Parse an integer parameter exactly as Postfix's cfg_parser does (MC-2).

    Args:
      text: the value; surrounding whitespace is ignored, as the ``.cf``
        reader trims it anyway.

    Returns:
      The number. ``010`` is ten; a leading ``+`` is allowed.

    Raises:
      ValueError: for an empty value, anything but an optional sign and
        decimal digits (``0x10``, ``1e3``, ``10s``), or a number outside
        the 32-bit signed range.
    """
    stripped = text.strip(WHITESPACE.decode("ascii"))
    if not stripped:
        raise ValueError("empty value: an integer is required")
    if not _POSTFIX_INT.fullmatch(stripped):
        raise ValueError(f"invalid integer {text!r}: use an optional sign and decimal digits only")
    number = int(stripped)
    if not _INT_MIN <= number <= _INT_MAX:
        raise ValueError(f"integer {text!r} is out of range ({_INT_MIN}..{_INT_MAX})")
    return number


class Invalid(Exception):
    """A value failed its check; the caller knows where it came from."""


@dataclass(frozen=True, slots=True)
class Setting:
    """A raw value and where it was written (``line`` for ``.cf`` files)."""

    value: object
    file: str
    line: int | None
    base_dir: str


def default_value(parameter: Parameter, text: str) -> object:
    """The default ``text`` of ``parameter`` as a TOML value, ready for :func:`convert`.

    The schema spells booleans as TOML does (``true``), but a TOML user
    must write a real boolean, so only those are turned into one here.
    """
    return text == "true" if parameter.kind == "boolean" else text


def convert(parameter: Parameter, setting: Setting) -> object:
    """Check and convert ``setting`` as a value of ``parameter``.

    Raises:
      Invalid: the value is wrong; the message says why.
    """
    return CONVERTERS[parameter.kind](setting, parameter)


def toml_type(value: object) -> str:
    """``value``'s TOML type, for messages: "a string", "an array", ..."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def unknown_keys(found: Iterable[str], known: Sequence[str]) -> Iterable[tuple[str, str]]:
    """Yield (key, message) for every key not in ``known``, with a spelling hint."""
    for key in found:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        yield key, f"unknown key{hint}"


# ----------------------------------------------------------- plain values


def text(value: object) -> str:
    """A string, as it is."""
    if not isinstance(value, str):
        raise Invalid(f"must be a string, not {toml_type(value)}")
    return value


def integer(value: object, minimum: int | None) -> int:
    """A TOML integer, or a string in Postfix's integer syntax (MC-2)."""
    if isinstance(value, bool):
        raise Invalid("must be an integer, not a boolean")
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise Invalid(f"integer {value} is out of range ({_INT_MIN}..{_INT_MAX})")
        number = value
    elif isinstance(value, str):
        try:
            number = parse_postfix_int(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    else:
        raise Invalid(f"must be an integer, not {toml_type(value)}")
    if minimum is not None and number < minimum:
        raise Invalid(f"{number} is below the minimum {minimum}")
    return number


def seconds(value: object) -> float:
    """A non-negative, finite number of seconds (TOML number or Postfix integer text)."""
    if isinstance(value, bool):
        raise Invalid("must be a number of seconds, not a boolean")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(parse_postfix_int(value))
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    else:
        raise Invalid(f"must be a number of seconds, not {toml_type(value)}")
    if not math.isfinite(number) or number < 0:
        raise Invalid(f"{value!r} is not a number of seconds >= 0 (0 = never)")
    return number


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise Invalid(f"must be true or false (a TOML boolean), not {toml_type(value)}")


def string_list(value: object) -> list[str]:
    """A TOML array of strings, or one string separated by commas and/or whitespace."""
    if isinstance(value, str):
        return [item for item in _LIST_SEPARATORS.split(value) if item]
    if isinstance(value, list):
        items: list[str] = []
        for item in value:
            if not isinstance(item, str):
                raise Invalid(f"list items must be strings, not {toml_type(item)}")
            if not item or _LIST_SEPARATORS.search(item):
                raise Invalid(f"list item {item!r} must be one non-empty word")
            items.append(item)
        return items
    raise Invalid(f"must be a list of strings or one string, not {toml_type(value)}")


def _choice(value: object, choices: Sequence[str]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    spelled = " or ".join(f'"{choice}"' for choice in choices)
    raise Invalid(f"must be {spelled}, not {value!r}")


def _ketama_hash(value: object) -> str:
    spelled = text(value).strip()
    if spelled not in _KETAMA_HASHES:
        raise Invalid(f'must be "one_at_a_time" or "md5", not {value!r}')
    return spelled


def _syslog_facility(value: object) -> str:
    """A facility name as syslog.h spells it (Postfix's syslog_facility takes the same)."""
    if isinstance(value, str) and value.strip().lower() in SYSLOG_FACILITIES:
        return value.strip().lower()
    close = difflib.get_close_matches(str(value).lower(), list(SYSLOG_FACILITIES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise Invalid(
        f"must be a syslog facility ({', '.join(SYSLOG_FACILITIES)}), not {value!r}{hint}"
    )


def _log_level(value: object) -> str:
    if isinstance(value, str) and value.lower() in _LOG_LEVELS:
        return value.lower()
    raise Invalid(f"must be one of {', '.join(_LOG_LEVELS)}, not {value!r}")


# -------------------------------------------------------------- endpoints


def endpoint(setting: Setting) -> Endpoint:
    """inet:HOST:PORT, inet:[ADDR]:PORT or unix:PATH (relative to the setting's file)."""
    spelled = text(setting.value)
    if not spelled.strip():
        # MC-3: unlike other empty values, an empty server is not "none".
        raise Invalid("empty value: a server is required (inet:HOST:PORT or unix:PATH)")
    try:
        return parse_endpoint(spelled, base_dir=setting.base_dir)
    except EndpointError as exc:
        raise Invalid(str(exc)) from None


def _servers(setting: Setting) -> tuple[PoolServer, ...]:
    """One memcache server, or a pool: a TOML array, or endpoints separated by spaces/commas."""
    raw = setting.value
    items = raw if isinstance(raw, list) else [raw]
    servers: list[PoolServer] = []
    for item in items:
        weight, spelled = 1, item
        if isinstance(item, dict):
            unknown = set(item) - {"endpoint", "weight"}
            if unknown or "endpoint" not in item:
                raise Invalid('a pool entry is {endpoint = "inet:HOST:PORT", weight = N}')
            weight = integer(item.get("weight", 1), 1)
            spelled = item["endpoint"]
        for word in re.split(r"[\s,]+", text(spelled)):
            if not word:
                continue
            parsed = endpoint(Setting(word, setting.file, setting.line, setting.base_dir))
            servers.append(PoolServer(parsed, weight))
    if not servers:
        # MC-3: unlike other empty values, an empty server is not "none".
        raise Invalid("empty value: a server is required (inet:HOST:PORT or unix:PATH)")
    if len({server.endpoint for server in servers}) != len(servers):
        raise Invalid("a server is listed twice")
    return tuple(servers)


# --------------------------------------------------- keys, tables, domains


def table_spec(setting: Setting, *, writable: bool = False) -> str | None:
    """A Postfix ``type:name`` table (syntax only; opened later); empty = none."""
    spelled = text(setting.value).strip()
    if not spelled:
        return None  # MC-3: "backup =" means no backup.
    try:
        validate_spec(spelled, OpenOptions(setting.base_dir, writable=writable))
    except MapError as exc:
        raise Invalid(str(exc)) from None
    return spelled


def _template(setting: Setting) -> KeyTemplate:
    try:
        # MC-3: an empty template is valid (every lookup is skipped).
        return KeyTemplate.parse(text(setting.value))
    except KeyConfigError as exc:
        raise Invalid(str(exc)) from None


def _digest(setting: Setting) -> str | None:
    name = text(setting.value).strip()
    if not name:
        return None  # MC-3
    try:
        make_digest(name)
    except KeyConfigError as exc:
        # MC-6 makes this a table Postfix cannot use; the bridge refuses to start.
        raise Invalid(str(exc)) from None
    return name


def domain_filter(setting: Setting, *, smtputf8: bool) -> DomainFilter | None:
    """The ``domain`` list (DOM-2); empty = no filter. Its literals fold by ``smtputf8``."""
    value = setting.value
    # A TOML array is the same list as its items joined by commas (DOM-2).
    spelled = ", ".join(string_list(value)) if isinstance(value, list) else text(value)
    if not spelled.strip(WHITESPACE.decode("ascii")):
        # MC-3: "domain =" means no filter. A list of only separators
        # ("domain = ,") is not empty to Postfix: it matches nothing.
        return None
    try:
        domain = DomainFilter.parse(spelled, base_dir=setting.base_dir, smtputf8=smtputf8)
    except KeyConfigError as exc:
        raise Invalid(str(exc)) from None
    # DOM-6 tables are opened later; check their syntax now so a typo is
    # reported with everything else instead of at first use.
    for spec in domain.table_specs:
        try:
            validate_spec(spec, OpenOptions(setting.base_dir))
        except MapError as exc:
            raise Invalid(str(exc)) from None
    return domain


def _forms(setting: Setting) -> tuple[str, ...]:
    try:
        return validate_address_forms(string_list(setting.value))
    except KeyConfigError as exc:
        raise Invalid(str(exc)) from None


def _address_mapping(setting: Setting) -> str:
    try:
        return validate_mapping(text(setting.value).strip())
    except KeyConfigError as exc:
        raise Invalid(str(exc)) from None


def _extension_classes(setting: Setting) -> tuple[str, ...]:
    try:
        return validate_extension_classes(string_list(setting.value))
    except KeyConfigError as exc:
        raise Invalid(str(exc)) from None


def _delimiter(setting: Setting) -> str:
    spelled = text(setting.value)
    bad = [char for char in spelled if char == "@" or char.isspace() or not char.isprintable()]
    if bad:
        raise Invalid(f"{spelled!r}: '@', whitespace and control characters cannot be delimiters")
    return spelled


def _domains(setting: Setting) -> tuple[str, ...]:
    # Duplicates are harmless but dropped so the tuple reads as a set.
    return tuple(dict.fromkeys(string_list(setting.value)))


def _directory(setting: Setting) -> str:
    """A directory name; a relative one resolves against the setting's file (not checked)."""
    spelled = text(setting.value).strip()
    if not spelled:
        raise Invalid("empty value: a directory is required")
    if "\0" in spelled:
        raise Invalid("a directory name cannot hold NUL")
    return os.path.normpath(os.path.join(setting.base_dir, spelled))


# ---------------------------------------------------- sockets and identity


def _socket_file(setting: Setting) -> str:
    """A unix socket file name; a relative one resolves against the setting's file."""
    spelled = text(setting.value).strip()
    if not spelled:
        raise Invalid("empty value: a socket file name is required")
    if "\0" in spelled:
        raise Invalid("a socket file name cannot hold NUL")
    return os.path.normpath(os.path.join(setting.base_dir, spelled))


def _networks(value: object) -> tuple[IPv4Network | IPv6Network, ...]:
    networks = []
    for item in string_list(value):
        try:
            networks.append(ip_network(item, strict=False))
        except ValueError:
            raise Invalid(f"{item!r} is not an address or network (e.g. 10.1.0.0/16)") from None
    return tuple(networks)


def _mode(value: object) -> int:
    spelled = text(value).strip()
    if not re.fullmatch(r"0?[0-7]{3}", spelled):
        raise Invalid(f'must be an octal permission string such as "0660", not {value!r}')
    return int(spelled, 8)


def _account_id(value: object, lookup: Callable[[str], int], what: str) -> int | None:
    """A name or a number; empty = none. ``lookup`` maps a name, raising KeyError."""
    spelled = text(value)
    if spelled == "":
        return None
    spelled = spelled.strip()
    if spelled.isdigit():
        return int(spelled)
    try:
        return lookup(spelled)
    except KeyError:
        raise Invalid(f"no such {what} {spelled!r}") from None


def _uid(value: object) -> int | None:
    """A user name or uid; empty = none (keep the current one)."""
    return _account_id(value, lambda name: pwd.getpwnam(name).pw_uid, "user")


def _gid(value: object) -> int | None:
    """A group name or gid; empty = none (keep, or the user's primary group)."""
    return _account_id(value, lambda name: grp.getgrnam(name).gr_gid, "group")


#: How each kind of key is checked (see the module docstring for the two
#: kinds that are not here).
CONVERTERS: Mapping[str, Callable[[Setting, Parameter], object]] = {
    "endpoint": lambda setting, param: endpoint(setting),
    "table": lambda setting, param: table_spec(setting),
    "integer": lambda setting, param: integer(setting.value, param.minimum),
    "template": lambda setting, param: _template(setting),
    "digest": lambda setting, param: _digest(setting),
    "boolean": lambda setting, param: _boolean(setting.value),
    "forms": lambda setting, param: _forms(setting),
    "address_mapping": lambda setting, param: _address_mapping(setting),
    "extension_classes": lambda setting, param: _extension_classes(setting),
    "delimiter": lambda setting, param: _delimiter(setting),
    "domains": lambda setting, param: _domains(setting),
    "seconds": lambda setting, param: seconds(setting.value),
    "servers": lambda setting, param: _servers(setting),
    "ketama_hash": lambda setting, param: _ketama_hash(setting.value),
    "protocol": lambda setting, param: _choice(setting.value, _PROTOCOLS),
    "serving": lambda setting, param: _choice(setting.value, _SERVING),
    "name": lambda setting, param: text(setting.value),
    "log_level": lambda setting, param: _log_level(setting.value),
    "log_format": lambda setting, param: _choice(setting.value, _LOG_FORMATS),
    "log_target": lambda setting, param: _choice(setting.value, LOG_TARGETS),
    "syslog_facility": lambda setting, param: _syslog_facility(setting.value),
    "socket_file": lambda setting, param: _socket_file(setting),
    "directory": lambda setting, param: _directory(setting),
    "proxymap_protocol": lambda setting, param: _choice(setting.value, _PROXYMAP_PROTOCOLS),
    "networks": lambda setting, param: _networks(setting.value),
    "mode": lambda setting, param: _mode(setting.value),
    "user": lambda setting, param: _uid(setting.value),
    "group": lambda setting, param: _gid(setting.value),
}
