"""``postfix-bridge migrate``: move a Postfix configuration from ``memcache:`` to the bridge.

Theory of operation
-------------------
The planning here is pure (text in, text out); :mod:`bridge.migrate_run`
runs Postfix's own tools and the bridge's loader around it::

    postconf -n, postconf -P output      parse_postconf(), parse_postconf_master()
      ──► find_uses()        every memcache: table (also inside proxy:), in
                             every parameter and master.cf -o override, with
                             the kind of lookup Postfix makes there
      ──► make_plan()        one [tables.NAME] per (.cf file, kind), the
                             address search that reproduces Postfix's own
                             search for that kind, and the new parameter values
      ──► render_toml(), Plan.commands()    bridge.toml text, postconf commands

Kinds. Postfix asks a fixed table (``memcache:``) for partial keys in an
order that depends on who asks (README, *Address search*; AS-1..AS-6),
but asks ``socketmap:`` for the full key only, so the bridge must search
for it. Each use is classified by its parameter (``virtual_alias_maps``,
``transport_maps``, ...) or, in a restriction list, by the ``check_*``
keyword in front of the table; every other use is a plain single-key
lookup. A ``.cf`` file used in two kinds of places becomes two bridge
tables (``NAME-KIND``), each with its own search.

A table is left alone (reported, not planned) when its use cannot be
told or must not change: a bare table in a restriction list, a table
(without a ``check_*`` in front) in a parameter other parameters name as
``$name``, a ``.cf`` name that is not absolute, a master.cf override
whose new value postconf -P cannot write, a cache Postfix writes to, a
security-sensitive table. The caller adds the ``.cf`` files the bridge
cannot load (:func:`make_plan`'s ``unusable``). A file is migrated
everywhere it is used or nowhere.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "KINDS",
    "Location",
    "Plan",
    "PlannedTable",
    "PostfixSettings",
    "Token",
    "Use",
    "find_uses",
    "make_plan",
    "parse_postconf",
    "parse_postconf_master",
    "postfix_spec",
    "render_toml",
    "split_tokens",
]

MEMCACHE = "memcache:"
PROXY = "proxy:"

# ----------------------------------------------------------------- kinds

#: Kind name -> what the generated [tables.NAME] section says about it.
#: The address search of the access, transport and domain-list kinds
#: depends on parent_domain_matches_subdomains (see _search()).
KINDS = (
    "virtual",
    "canonical",
    "generic",
    "transport",
    "access",
    "client_access",
    "helo_access",
    "domains",
    "dot_domains",
    "single",
)

#: Parameters whose every table is looked up with one kind.
_PARAMETER_KINDS: Mapping[str, str] = {
    "virtual_alias_maps": "virtual",
    "canonical_maps": "canonical",
    "sender_canonical_maps": "canonical",
    "recipient_canonical_maps": "canonical",
    "smtp_generic_maps": "generic",
    "lmtp_generic_maps": "generic",
    "transport_maps": "transport",
    # Domain lists (match_list): the name, then its parent domains.
    "relay_domains": "domains",
    "mydestination": "domains",
    "virtual_alias_domains": "domains",
    "virtual_mailbox_domains": "domains",
    "fast_flush_domains": "domains",
}

#: Restriction keyword -> kind of the table that follows it (smtpd_check.c).
_CHECK_KINDS: Mapping[str, str] = {
    "check_sender_access": "access",
    "check_recipient_access": "access",
    "check_client_access": "client_access",
    "check_reverse_client_hostname_access": "client_access",
    "check_helo_access": "helo_access",
    # Host names (with parents) and IP addresses (with networks) of MX
    # hosts, name servers and A records: check_server_access.
    **{
        f"check_{who}_{what}_access": "client_access"
        for who in ("client", "reverse_client_hostname", "helo", "sender", "recipient")
        for what in ("mx", "ns", "a")
    },
    # Single keys: a certificate fingerprint, a SASL login name.
    "check_ccert_access": "single",
    "check_sasl_access": "single",
}

#: Where a memcache: word names a table proxymap may open, not a lookup.
_PROXY_LISTS = frozenset({"proxy_read_maps", "proxy_write_maps"})

#: Parameters whose tables are never migrated, and why.
_NEVER: Mapping[str, str] = {
    # memcache_table(5)'s own examples: caches Postfix writes to.
    "address_verify_map": "Postfix writes to this cache, and socketmap: is read-only",
    "postscreen_cache_map": "Postfix writes to this cache, and socketmap: is read-only",
    # README, Security: tables that name files, commands or privileges.
    **{
        name: "security-sensitive table: keep it out of memcache and the bridge"
        for name in ("alias_maps", "virtual_mailbox_maps", "virtual_uid_maps", "virtual_gid_maps")
    },
}

#: Parameters Postfix may search with partial keys in ways this migration
#: does not model; their tables are planned as single-key lookups with a note.
_UNMODELLED = frozenset(
    {
        "local_recipient_maps",
        "relay_recipient_maps",
        "smtpd_sender_login_maps",
        "sender_bcc_maps",
        "recipient_bcc_maps",
        "sender_dependent_relayhost_maps",
        "sender_dependent_default_transport_maps",
    }
)


# ------------------------------------------------------- postconf output


@dataclass(frozen=True, slots=True, order=True)
class Location:
    """A main.cf parameter, or a master.cf ``-o`` override (service and type set)."""

    parameter: str
    service: str = ""
    type: str = ""

    @property
    def in_master(self) -> bool:
        return bool(self.service)

    def __str__(self) -> str:
        if self.in_master:
            return f"{self.service}/{self.type}/{self.parameter}"
        return self.parameter


def parse_postconf(text: str) -> dict[str, str]:
    """``postconf -n`` (or ``-nx``) output: ``name = value`` per line."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip():
            values[name.strip()] = value.strip()
    return values


def parse_postconf_master(text: str) -> dict[Location, str]:
    """``postconf -P`` output: ``service/type/name = value`` per line."""
    values: dict[Location, str] = {}
    for key, value in parse_postconf(text).items():
        parts = key.split("/")
        if len(parts) == 3 and all(parts):
            values[Location(parts[2], parts[0], parts[1])] = value
    return values


@dataclass(frozen=True, slots=True)
class Token:
    """One word of a parameter value: its text and where it stands."""

    text: str
    start: int
    end: int


def split_tokens(value: str) -> list[Token]:
    """Split a value as Postfix splits lists: at commas and whitespace outside ``{ }``."""
    tokens: list[Token] = []
    start: int | None = None
    depth = 0
    for index, char in enumerate(value):
        if char == "{":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        separator = depth == 0 and (char == "," or char.isspace())
        if separator:
            if start is not None:
                tokens.append(Token(value[start:index], start, index))
                start = None
        elif start is None:
            start = index
    if start is not None:
        tokens.append(Token(value[start:], start, len(value)))
    return tokens


def memcache_file(token: str) -> tuple[str, bool] | None:
    """(the .cf file, whether proxy: wraps it) of a ``memcache:`` word, else None."""
    proxied = token.startswith(PROXY)
    inner = token[len(PROXY) :] if proxied else token
    if not inner.startswith(MEMCACHE):
        return None
    return inner[len(MEMCACHE) :], proxied


# ------------------------------------------------------------------- uses


@dataclass(frozen=True, slots=True)
class Use:
    """One ``memcache:`` word in one parameter: which file, looked up how."""

    location: Location
    token: Token
    file: str
    proxied: bool
    kind: str


@dataclass(frozen=True, slots=True)
class Refused:
    """A ``memcache:`` word the migration leaves alone, and why."""

    location: Location
    file: str
    reason: str


def _referenced(name: str, values: Iterable[str]) -> bool:
    pattern = re.compile(
        rf"\$(?:{re.escape(name)}\b|\{{{re.escape(name)}[}}?:]|\({re.escape(name)}\))"
    )
    return any(pattern.search(value) for value in values)


def find_uses(
    main: Mapping[str, str], master: Mapping[Location, str]
) -> tuple[list[Use], list[Refused]]:
    """Every ``memcache:`` word of main.cf (``postconf -n``) and master.cf (``postconf -P``).

    Returns:
      The uses that can be migrated, and the words that cannot, with the
      reason. ``proxy_read_maps``/``proxy_write_maps`` words are neither:
      they follow the tables (:meth:`Plan.commands`).
    """
    everything: dict[Location, str] = {Location(name): value for name, value in main.items()}
    everything.update(master)
    class_names = {token.text for token in split_tokens(main.get("smtpd_restriction_classes", ""))}
    uses: list[Use] = []
    refused: list[Refused] = []
    for location, value in sorted(everything.items()):
        if location.parameter in _PROXY_LISTS:
            continue
        tokens = split_tokens(value)
        # proxy_read_maps names $virtual_alias_maps and kin by design: not a use.
        others = [
            v
            for loc, v in everything.items()
            if loc != location and loc.parameter not in _PROXY_LISTS
        ]
        restriction_list = (
            location.parameter.endswith("_restrictions") or location.parameter in class_names
        )
        for index, token in enumerate(tokens):
            found = memcache_file(token.text)
            if found is None:
                continue
            file, proxied = found

            def refuse(reason: str, file: str = file, location: Location = location) -> None:
                refused.append(Refused(location, file, reason))

            previous = tokens[index - 1].text if index else ""
            if location.parameter in _NEVER:
                refuse(_NEVER[location.parameter])
                continue
            if previous in _CHECK_KINDS:
                kind = _CHECK_KINDS[previous]
            elif location.parameter in _PARAMETER_KINDS:
                kind = _PARAMETER_KINDS[location.parameter]
            elif restriction_list:
                refuse("a table without a check_*_access in front in a restriction list")
                continue
            else:
                kind = "single"
            # A restriction list named as $name elsewhere is the same list
            # there: its check_* still says the kind. Anything else is not.
            if (
                previous not in _CHECK_KINDS
                and not location.in_master
                and _referenced(location.parameter, others)
            ):
                refuse(
                    f"${location.parameter} is used by other parameters, so the kind of "
                    "lookup cannot be told; name the table where it is used"
                )
                continue
            if not file.startswith("/"):
                refuse("the .cf file name is not absolute")
                continue
            uses.append(Use(location, token, file, proxied, kind))
    return uses, refused


# ------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class PostfixSettings:
    """The main.cf parameters the search depends on, as ``postconf -x`` shows them."""

    recipient_delimiter: str
    parent_domain_matches_subdomains: tuple[str, ...]
    propagate_unmatched_extensions: tuple[str, ...]
    local_domains: tuple[str, ...]

    @classmethod
    def from_postconf(cls, values: Mapping[str, str]) -> PostfixSettings:
        """From ``postconf -x`` output of the four parameters (and mydestination)."""

        def words(name: str) -> tuple[str, ...]:
            return tuple(token.text for token in split_tokens(values.get(name, "")))

        local = tuple(
            dict.fromkeys(
                word.lower()
                for word in words("mydestination")
                if ":" not in word and not word.startswith(("/", "$", "!"))
            )
        )
        return cls(
            recipient_delimiter=values.get("recipient_delimiter", ""),
            parent_domain_matches_subdomains=words("parent_domain_matches_subdomains"),
            propagate_unmatched_extensions=words("propagate_unmatched_extensions"),
            local_domains=local,
        )


#: The names of postconf -x that PostfixSettings reads.
SETTINGS_PARAMETERS = (
    "recipient_delimiter",
    "parent_domain_matches_subdomains",
    "propagate_unmatched_extensions",
    "mydestination",
)

_MAPPING_KINDS = frozenset({"virtual", "canonical", "generic"})


def table_settings(kind: str, settings: PostfixSettings) -> dict[str, object]:
    """The [tables.NAME] keys (besides ``config``) that reproduce Postfix's search for ``kind``."""
    matching = set(settings.parent_domain_matches_subdomains)
    access_parents = "parent_domains" if "smtpd_access_maps" in matching else ".parent_domains"
    delimiter: dict[str, object] = {"recipient_delimiter": settings.recipient_delimiter}
    if kind in _MAPPING_KINDS:
        return {
            "address_search": ["full", "nodelim", "localpart", "@domain"],
            "address_mapping": kind,
            "propagate_unmatched_extensions": list(settings.propagate_unmatched_extensions),
            "local_domains": list(settings.local_domains),
            **delimiter,
        }
    if kind == "access":
        return {
            "address_search": ["full", "nodelim", "domain", access_parents, "localpart@"],
            **delimiter,
        }
    if kind == "client_access":
        return {"address_search": ["full", access_parents, "networks"]}
    if kind == "helo_access":
        return {"address_search": ["full", access_parents]}
    if kind == "transport":
        parents = "parent_domains" if "transport_maps" in matching else ".parent_domains"
        return {"address_search": ["full", "nodelim", "domain", parents], **delimiter}
    if kind == "domains":
        return {"address_search": ["full", "parent_domains"]}
    if kind == "dot_domains":
        return {"address_search": ["full", ".parent_domains"]}
    return {"address_search": ["full"]}


@dataclass(frozen=True, slots=True)
class PlannedTable:
    """One ``[tables.NAME]`` of the generated bridge.toml."""

    name: str
    file: str
    kind: str
    locations: tuple[Location, ...]
    settings: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Plan:
    """What the migration does: the bridge tables, and the new parameter values."""

    listen: str
    config_dir: str
    tables: tuple[PlannedTable, ...]
    #: Location -> its value after the migration (only locations that change).
    changes: Mapping[Location, str]
    #: Location -> its value before (for the same locations).
    before: Mapping[Location, str]
    refused: tuple[Refused, ...] = field(default=())
    #: Things to tell the user about tables that are migrated.
    notes: tuple[str, ...] = field(default=())

    @property
    def refused_files(self) -> list[str]:
        """The .cf files left alone, each once, in order."""
        return list(dict.fromkeys(refused.file for refused in self.refused))

    def commands(self, postconf: str = "postconf") -> list[list[str]]:
        """The postconf commands that make the changes: -e for main.cf, -P for master.cf."""
        commands: list[list[str]] = []
        for location, value in sorted(self.changes.items(), key=_command_order):
            if location.in_master:
                commands.append([postconf, "-c", self.config_dir, "-P", f"{location}={value}"])
            else:
                commands.append([postconf, "-c", self.config_dir, "-e", f"{location} = {value}"])
        return commands

    def shell_commands(self, postconf: str = "postconf") -> list[str]:
        return [shlex.join(command) for command in self.commands(postconf)]


def _command_order(item: tuple[Location, str]) -> tuple[bool, str]:
    """main.cf first, then master.cf, each by name."""
    return item[0].in_master, str(item[0])


def postfix_spec(listen: str, name: str, *, proxied: bool) -> str:
    """The Postfix table name of bridge table ``name`` behind socketmap ``listen``."""
    spec = f"socketmap:{listen}:{name}"
    return PROXY + spec if proxied else spec


_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def _base_name(file: str) -> str:
    stem = file.rstrip("/").rsplit("/", 1)[-1]
    stem = stem.removesuffix(".cf")
    stem = _NAME_CHARS.sub("_", stem).strip("_-")
    return stem or "table"


def _table_names(keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """A unique bridge table name per (file, kind): the file's name, plus -KIND when needed."""
    kinds_per_file: dict[str, list[str]] = {}
    for file, kind in keys:
        kinds_per_file.setdefault(file, []).append(kind)
    names: dict[tuple[str, str], str] = {}
    taken: set[str] = set()
    for file, kind in keys:
        base = _base_name(file)
        if len(kinds_per_file[file]) > 1:
            base = f"{base}-{kind.replace('_', '-')}"
        name, number = base, 2
        while name in taken:
            name, number = f"{base}-{number}", number + 1
        taken.add(name)
        names[file, kind] = name
    return names


def _replace(value: str, replacements: Mapping[int, str], *, commas: bool) -> str | None:
    """``value`` with the tokens starting at the given offsets replaced.

    ``commas``: join the words with commas instead of keeping the text
    between them (postconf -P refuses whitespace in a value); None when a
    word itself holds whitespace (``inline:{ a=b }``).
    """
    tokens = split_tokens(value)
    if commas:
        words = [replacements.get(token.start, token.text) for token in tokens]
        if any(any(char.isspace() for char in word) for word in words):
            return None
        return ",".join(words)
    out: list[str] = []
    position = 0
    for token in tokens:
        if token.start in replacements:
            out.append(value[position : token.start])
            out.append(replacements[token.start])
            position = token.end
    out.append(value[position:])
    return "".join(out)


def make_plan(
    main: Mapping[str, str],
    master: Mapping[Location, str],
    settings: PostfixSettings,
    *,
    listen: str,
    config_dir: str,
    unusable: Mapping[str, str] | None = None,
) -> Plan:
    """Plan the migration.

    Args:
      main: ``postconf -n`` values; master: ``postconf -P`` overrides.
      settings: the search-related main.cf parameters.
      listen: the bridge's socketmap endpoint (``inet:127.0.0.1:10027``).
      config_dir: Postfix's configuration directory, for the commands.
      unusable: .cf file -> why the bridge cannot serve it; such files
        are refused wherever they are used.
    """
    unusable = unusable or {}
    uses, refused = find_uses(main, master)
    # Domain lists match subdomains by "example.com" entries when their
    # parameter is in parent_domain_matches_subdomains, else by ".example.com".
    matching = set(settings.parent_domain_matches_subdomains)
    uses = [
        dataclasses.replace(use, kind="dot_domains")
        if use.kind == "domains" and use.location.parameter not in matching
        else use
        for use in uses
    ]
    refused_files = {r.file for r in refused}
    for use in uses:
        if use.file in unusable and use.file not in refused_files:
            refused.append(Refused(use.location, use.file, unusable[use.file]))
            refused_files.add(use.file)
    # A file is migrated everywhere or nowhere: half a migration would
    # leave one .cf file served two ways.
    values: dict[Location, str] = {Location(k): v for k, v in main.items()}
    values.update(master)

    def plan_uses(uses: list[Use]) -> tuple[dict[Location, str], dict[tuple[str, str], str]]:
        keys = list(dict.fromkeys((use.file, use.kind) for use in uses))
        names = _table_names(keys)
        per_location: dict[Location, dict[int, str]] = {}
        for use in uses:
            spec = postfix_spec(listen, names[use.file, use.kind], proxied=use.proxied)
            per_location.setdefault(use.location, {})[use.token.start] = spec
        changes: dict[Location, str] = {}
        for location, replacements in per_location.items():
            new = _replace(values[location], replacements, commas=location.in_master)
            if new is None:
                for use in uses:
                    if use.location == location and use.file not in refused_files:
                        refused.append(
                            Refused(
                                location,
                                use.file,
                                f"master.cf override {location} holds a word with whitespace, "
                                "which postconf -P cannot write",
                            )
                        )
                        refused_files.add(use.file)
                continue
            changes[location] = new
        return changes, names

    while True:
        kept = [use for use in uses if use.file not in refused_files]
        before_refused = len(refused_files)
        changes, names = plan_uses(kept)
        if len(refused_files) == before_refused:
            break

    # proxy_read_maps / proxy_write_maps: proxymap opens only the tables
    # listed there; list the new proxied names where the old ones stood.
    proxied_specs: dict[str, list[str]] = {}
    for use in kept:
        if use.proxied:
            spec = postfix_spec(listen, names[use.file, use.kind], proxied=True)
            proxied_specs.setdefault(use.file, [])
            if spec not in proxied_specs[use.file]:
                proxied_specs[use.file].append(spec)
    for parameter in sorted(_PROXY_LISTS):
        value = main.get(parameter)
        if value is None:
            continue
        replacements: dict[int, str] = {}
        for token in split_tokens(value):
            found = memcache_file(token.text)
            if found is not None and found[0] in proxied_specs:
                replacements[token.start] = " ".join(proxied_specs[found[0]])
        if replacements:
            new = _replace(value, replacements, commas=False)
            assert new is not None
            changes[Location(parameter)] = new

    tables: list[PlannedTable] = []
    for (file, kind), name in names.items():
        locations = tuple(
            dict.fromkeys(u.location for u in kept if (u.file, u.kind) == (file, kind))
        )
        tables.append(PlannedTable(name, file, kind, locations, table_settings(kind, settings)))
    notes = [
        f"table {table.name}: {location} may be searched by Postfix with partial keys "
        "(user@domain, @domain); planned as a single-key lookup: set address_search "
        "by hand if the table has such entries"
        for table in tables
        for location in table.locations
        if location.parameter in _UNMODELLED
    ]
    return Plan(
        notes=tuple(notes),
        listen=listen,
        config_dir=config_dir,
        tables=tuple(sorted(tables, key=lambda table: table.name)),
        changes=changes,
        before={location: values[location] for location in changes},
        refused=tuple(refused),
    )


# ------------------------------------------------------------------- TOML


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def render_toml(plan: Plan) -> str:
    """The bridge.toml of a plan: one socketmap listener, one [tables.NAME] per table."""
    lines = [
        f"# Generated by postfix-bridge migrate from {plan.config_dir}.",
        "# Each table reads its memcache_table(5) file unchanged (config =); the",
        "# address search reproduces Postfix's own search where the table is used.",
        "",
        "[[listen]]",
        f"endpoint = {_toml_value(plan.listen)}",
        'protocol = "socketmap"',
    ]
    for table in plan.tables:
        lines += [
            "",
            f"# {table.kind}: " + ", ".join(str(location) for location in table.locations),
            f"[tables.{table.name}]",
            f"config = {_toml_value(table.file)}",
        ]
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.settings.items()]
    return "\n".join(lines) + "\n"
