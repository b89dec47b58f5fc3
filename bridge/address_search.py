"""Address search: the partial keys Postfix asks a fixed table for, and what it does with a hit.

Theory of operation
-------------------
Postfix asks *fixed* tables (``hash:``, ``memcache:`` ...) for partial
forms of a key, but a ``socketmap:``/``tcp:`` table only for the full key
(G-3). When the bridge stands in for a ``memcache:`` table it must
therefore generate the partial forms itself, in Postfix's order, and
finish a hit the way Postfix's caller would have finished it::

    key as Postfix sent it
      ──► search_keys()       the forms listed in ``address_search``   (AS-1..AS-4)
      ──► (the table looks each one up; the first hit or error wins)
      ──► finish_mapped_result()   only for an address-mapping table and a
                                   hit through a form without the extension (AS-5, AS-6)

Two Postfix callers generate partial keys:

* address mapping (``virtual_alias_maps``, ``canonical_maps``,
  ``smtp_generic_maps``; mail_addr_find.c, mail_addr_map.c): the full
  address, the address without its extension, the bare local part for
  local domains, ``@domain``. A hit through a form without the extension
  remembers the extension; mail_addr_map.c then turns an ``@otherdomain``
  result into ``user@otherdomain`` and, where
  ``propagate_unmatched_extensions`` names the table's class, appends the
  extension to every address of the result. Since Postfix saw a *full*
  key hit from the bridge, it would do neither: the bridge does both
  before answering.
* access maps (smtpd_check.c): addresses are searched full, without
  extension, by domain and its parent domains, then by ``user@``; host
  names by their parent domains; client IP addresses by their parent
  networks. Which style of parent domain (``example.com`` or
  ``.example.com``) depends on Postfix's
  ``parent_domain_matches_subdomains``.

Each form applies to the key shapes it is defined for (an address with
``@``, a host name, an IP address), so one ``address_search`` list can
serve a table used by several restrictions. Everything here is pure
byte work on keys that were already folded (CASE-2); only
:func:`finish_mapped_result` looks at the key as Postfix sent it,
because Postfix rebuilds the result from the unfolded address.

Error handling
--------------
Setting values are checked when the configuration is loaded
(:func:`validate_address_forms`, :func:`validate_mapping`,
:func:`validate_extension_classes`), each raising :class:`KeyConfigError`
with the valid choices; per-request functions never raise.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from bridge.keys import KeyConfigError

__all__ = [
    "ADDRESS_FORMS",
    "ADDRESS_MAPPINGS",
    "EXTENSION_CLASSES",
    "SearchKey",
    "address_search_keys",
    "finish_mapped_result",
    "resolve_mapping",
    "search_keys",
    "validate_address_forms",
    "validate_extension_classes",
    "validate_mapping",
]

#: The forms ``address_search`` may list, in Postfix's own search order.
ADDRESS_FORMS = (
    "full",
    "nodelim",
    "localpart",
    "@domain",
    "domain",
    "parent_domains",
    ".parent_domains",
    "localpart@",
    "networks",
)

#: What ``address_mapping`` may say: the Postfix address mapping a table
#: serves (the classes of propagate_unmatched_extensions that go through
#: mail_addr_map.c), "none" for every other use, "auto" to infer it.
ADDRESS_MAPPINGS = ("auto", "virtual", "canonical", "generic", "none")

#: Postfix's propagate_unmatched_extensions values (postconf(5)). alias,
#: forward and include concern local(8), which looks up its own tables;
#: they are accepted so a value copied from main.cf is valid.
EXTENSION_CLASSES = ("canonical", "virtual", "alias", "forward", "include", "generic")

# Only address mapping asks for these forms (mail_addr_find.c's default
# strategy); access maps never do. That makes "auto" unambiguous.
_MAPPING_ONLY_FORMS = frozenset({"localpart", "@domain"})

# split_addr.c never splits these local parts, whatever the delimiter:
# mail for them must reach the real mailbox. The double-bounce name is
# Postfix's default double_bounce_sender.
_UNSPLITTABLE_LOCALPARTS = frozenset({b"postmaster", b"mailer-daemon", b"double-bounce"})


def _choices(names: Sequence[str]) -> str:
    return ", ".join(names)


def validate_address_forms(forms: Sequence[str]) -> tuple[str, ...]:
    """Check an ``address_search`` setting.

    Args:
      forms: form names, in the order the keys should be tried.

    Returns:
      The forms as a tuple, repeated names dropped, order kept.

    Raises:
      KeyConfigError: the list is empty or names an unknown form.
    """
    if not forms:
        raise KeyConfigError(
            f"invalid address_search: no forms given (choose from {_choices(ADDRESS_FORMS)})"
        )
    for form in forms:
        if form not in ADDRESS_FORMS:
            raise KeyConfigError(
                f"invalid address_search form {form!r} (choose from {_choices(ADDRESS_FORMS)})"
            )
    return tuple(dict.fromkeys(forms))


def validate_mapping(name: str) -> str:
    """Check an ``address_mapping`` setting; returns it unchanged.

    Raises:
      KeyConfigError: not one of :data:`ADDRESS_MAPPINGS`.
    """
    if name not in ADDRESS_MAPPINGS:
        raise KeyConfigError(
            f"invalid address_mapping {name!r} (choose from {_choices(ADDRESS_MAPPINGS)})"
        )
    return name


def validate_extension_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Check a ``propagate_unmatched_extensions`` setting (empty = never propagate).

    Raises:
      KeyConfigError: a name is not one of Postfix's classes.
    """
    for name in classes:
        if name not in EXTENSION_CLASSES:
            raise KeyConfigError(
                f"invalid propagate_unmatched_extensions class {name!r} "
                f"(choose from {_choices(EXTENSION_CLASSES)})"
            )
    return tuple(dict.fromkeys(classes))


def resolve_mapping(mapping: str, forms: Collection[str]) -> str:
    """``address_mapping`` with "auto" replaced (AS-5).

    "auto" is "virtual" when the search asks for a form only Postfix's
    address mapping asks for (``localpart``, ``@domain``), else "none":
    virtual and canonical tables search alike, and both are in Postfix's
    default propagate_unmatched_extensions.
    """
    if mapping != "auto":
        return mapping
    return "virtual" if _MAPPING_ONLY_FORMS.intersection(forms) else "none"


# ---------------------------------------------------------------------------
# The keys


@dataclass(frozen=True, slots=True)
class SearchKey:
    """One key to try. ``unmatched_extension``: the form dropped the key's extension."""

    key: bytes
    unmatched_extension: bool = False


def _strip_extension(localpart: bytes, delimiters: bytes) -> bytes | None:
    """Return the local part without its extension, or None if it has none.

    Follows split_addr.c: the extension starts at the first byte that is in
    the delimiter set; postmaster, mailer-daemon and double-bounce are never
    split; with ``-`` among the delimiters, ``owner-*`` and ``*-request``
    are not split either (owner_request_special = yes); and a split that
    would leave an empty local part is not made.
    """
    lowered = localpart.lower()
    if not delimiters or lowered in _UNSPLITTABLE_LOCALPARTS:
        return None
    if b"-" in delimiters and (
        lowered.startswith(b"owner-") or (len(lowered) > 8 and lowered.endswith(b"-request"))
    ):
        return None
    for index, byte in enumerate(localpart):
        if byte in delimiters:
            return localpart[:index] if index > 0 else None
    return None


# RFC 822 specials and space: a local part holding one is quoted (quote_822_local.c).
_NOT_IN_ATOMS = frozenset(b'()<>@,;:\\"[] ')


def _is_dot_string(localpart: bytes) -> bool:
    """Whether ``localpart`` may stand unquoted: atoms separated by single dots."""
    if not localpart or localpart.startswith(b".") or localpart.endswith(b"."):
        return False
    if b".." in localpart:
        return False
    # Bytes >= 0x80 stay unquoted, as Postfix leaves 8-bit data alone.
    return not any(byte in _NOT_IN_ATOMS or byte < 0x20 or byte == 0x7F for byte in localpart)


def _quote_local(localpart: bytes) -> bytes:
    """A local part in external form: quoted only when it must be (quote_822_local.c)."""
    if _is_dot_string(localpart):
        return localpart
    escaped = localpart.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + escaped + b'"'


def _unquote_local(localpart: bytes) -> bytes:
    """A local part in internal form: quotes removed, escapes resolved (unquote_822_local.c)."""
    if b'"' not in localpart:
        return localpart
    out = bytearray()
    escaped = False
    for byte in localpart:
        if escaped:
            out.append(byte)
            escaped = False
        elif byte == 0x5C:  # backslash
            escaped = True
        elif byte != 0x22:  # double quote
            out.append(byte)
    return bytes(out)


def _strip_quoted_extension(localpart: bytes, delimiters: bytes) -> tuple[bytes, bytes] | None:
    """(local part without extension in external form, the extension), or None.

    Postfix strips the extension from the internal (unquoted) form and
    quotes the rest again for the query, so ``"a b+x"`` gives ``"a b"``.
    """
    inner = _unquote_local(localpart)
    stripped = _strip_extension(inner, delimiters)
    if stripped is None:
        return None
    return _quote_local(stripped), inner[len(stripped) :]


def _parent_domains(name: bytes, *, dot_style: bool) -> Iterator[bytes]:
    """The parents of ``name`` in the order Postfix tries them (AS-3), ``name`` excluded.

    ``sub.example.com`` gives ``example.com``, ``com``; in dot style
    (parent_domain_matches_subdomains without smtpd_access_maps)
    ``.example.com``, ``.com``. Like Postfix's loop, the next parent
    starts at the first dot after the first byte, so odd names (trailing
    dots, address literals) give what Postfix asks for.
    """
    while True:
        dot = name.find(b".", 1)
        if dot < 0:
            return
        name = name[dot:] if dot_style else name[dot + 1 :]
        if not name:
            return
        yield name


def _ip_address(key: bytes) -> str | None:
    """``key`` as text if it is an IPv4 or IPv6 address (valid_hostaddr), else None."""
    try:
        text = key.decode("ascii")
        ipaddress.ip_address(text)
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None
    return text


def _parent_networks(address: str) -> Iterator[bytes]:
    """192.0.2.7 -> 192.0.2, 192.0, 192; IPv6 by ':' groups (smtpd_check.c, AS-4)."""
    delimiter = ":" if ":" in address else "."
    while delimiter in address:
        address = address.rpartition(delimiter)[0]
        yield address.encode("ascii")


def search_keys(
    key: bytes,
    forms: Sequence[str],
    *,
    delimiter: bytes = b"+",
    local_domains: Collection[bytes] = (),
) -> list[SearchKey]:
    """List the keys a Postfix fixed-table search would try, in order (AS-1..AS-4).

    For ``user+ext@sub.example.com`` with delimiter ``+`` the forms give:
    ``full`` -> ``user+ext@sub.example.com``; ``nodelim`` ->
    ``user@sub.example.com``; ``localpart`` -> ``user+ext``, ``user`` (only
    for a local domain); ``@domain`` -> ``@sub.example.com``; ``domain`` ->
    ``sub.example.com``; ``parent_domains`` -> ``example.com``, ``com``;
    ``.parent_domains`` -> ``.example.com``, ``.com``; ``localpart@`` ->
    ``user+ext@``, ``user@``.

    A key without ``@`` is a bare local part, a host name or an IP
    address, and is its own full key. ``nodelim`` strips the extension of
    a bare local part too (Postfix does). ``parent_domains`` and
    ``.parent_domains`` give the parents of a host name, never of an IP
    address (check_domain_access skips numerical names); ``networks``
    gives the parent networks of an IP address and nothing else.

    The reading of mail_addr_find.c and strip_addr.c behind the address
    forms: ``@domain`` uses the whole text after the last ``@`` even when
    it is empty (Postfix asks for ``@``), and ``localpart@`` of
    ``@example.com`` is ``@`` for the same reason; but ``domain`` is
    skipped for an empty domain, as Postfix's domain loop never runs then.
    Empty keys are never listed: no table can hold one (MC-13 step 1).

    Args:
      key: the already folded key.
      forms: forms from :func:`validate_address_forms`, in search order.
      delimiter: the recipient_delimiter set: any one of these bytes starts
        an extension (Postfix 2.11+). Empty disables extension handling.
      local_domains: folded domains for which the bare local part is
        searched (Postfix: $myorigin, $mydestination, the interface
        addresses).

    Returns:
      The keys, duplicates removed, first occurrence kept.
    """
    at = key.rfind(b"@")
    localpart, domain = (key, b"") if at < 0 else (key[:at], key[at + 1 :])
    split = _strip_quoted_extension(localpart, delimiter)
    stripped = None if split is None else split[0]
    ip_text = _ip_address(key) if at < 0 else None

    keys: list[SearchKey] = []

    def add(candidate: bytes, *, unmatched_extension: bool = False) -> None:
        keys.append(SearchKey(candidate, unmatched_extension))

    def add_localparts(suffix: bytes) -> None:
        add(localpart + suffix)
        if stripped is not None:
            add(stripped + suffix, unmatched_extension=True)

    for form in forms:
        if form == "full":
            add(key)
        elif form == "nodelim":
            if stripped is not None:
                add(stripped if at < 0 else stripped + b"@" + domain, unmatched_extension=True)
        elif form in ("parent_domains", ".parent_domains"):
            name = domain if at >= 0 else (None if ip_text else key)
            if name is not None:
                for parent in _parent_domains(name, dot_style=form.startswith(".")):
                    add(parent)
        elif form == "networks":
            if ip_text is not None:
                for network in _parent_networks(ip_text):
                    add(network)
        elif at < 0:
            continue  # every other form needs an '@'
        elif form == "localpart":
            if domain in local_domains:
                add_localparts(b"")
        elif form == "@domain":
            add(b"@" + domain)
        elif form == "domain":
            add(domain)
        elif form == "localpart@":
            add_localparts(b"@")
        else:
            raise KeyConfigError(
                f"invalid address_search form {form!r} (choose from {_choices(ADDRESS_FORMS)})"
            )
    unique: dict[bytes, SearchKey] = {}
    for candidate in keys:
        if candidate.key:
            unique.setdefault(candidate.key, candidate)
    return list(unique.values())


def address_search_keys(
    key: bytes,
    forms: Sequence[str],
    *,
    delimiter: bytes = b"+",
    local_domains: Collection[bytes] = (),
) -> list[bytes]:
    """The keys of :func:`search_keys` alone."""
    return [
        candidate.key
        for candidate in search_keys(key, forms, delimiter=delimiter, local_domains=local_domains)
    ]


# ---------------------------------------------------------------------------
# Finishing a hit as mail_addr_map.c would


def finish_mapped_result(
    value: bytes, original: bytes, *, delimiter: bytes, propagate: bool
) -> bytes:
    """The answer Postfix would have made of ``value``, found without the extension (AS-6).

    Postfix's mail_addr_map.c, given a hit for ``user@domain`` while
    looking up ``user+ext@domain``:

    * an ``@otherdomain`` result becomes the original local part without
      its extension in that domain: ``user@otherdomain``;
    * with propagation, the unmatched extension goes into every address
      of the result, before its last ``@``: ``a@x, b@y`` ->
      ``a+ext@x, b+ext@y``.

    The bridge answers the finished value as a full-key hit, for which
    Postfix does neither (its extension is then empty), so mail goes
    where it would have gone with a ``memcache:`` table.

    Args:
      value: the table's value.
      original: the key exactly as Postfix sent it (not folded: Postfix
        rebuilds addresses from its own, unfolded, copy).
      delimiter: the table's recipient_delimiter set.
      propagate: the table's class is in propagate_unmatched_extensions.
    """
    at = original.rfind(b"@")
    split = _strip_quoted_extension(original if at < 0 else original[:at], delimiter)
    if split is None:
        return value  # nothing was dropped from this spelling of the key
    stripped, extension = split
    if value.startswith(b"@"):
        value = stripped + value
    if not propagate:
        return value
    return b", ".join(_insert_extension(address, extension) for address in _split_list(value))


def _split_list(value: bytes) -> list[bytes]:
    """The addresses of a result list: split at commas outside quotes and angle brackets."""
    items: list[bytes] = []
    start = 0
    quoted = False
    angle = 0
    index = 0
    while index < len(value):
        byte = value[index : index + 1]
        if byte == b"\\" and quoted:
            index += 1  # the next byte is escaped
        elif byte == b'"':
            quoted = not quoted
        elif not quoted and byte == b"<":
            angle += 1
        elif not quoted and byte == b">" and angle:
            angle -= 1
        elif not quoted and not angle and byte == b",":
            items.append(value[start:index])
            start = index + 1
        index += 1
    items.append(value[start:])
    return [item.strip() for item in items if item.strip()]


def _insert_extension(address: bytes, extension: bytes) -> bytes:
    """``a@x`` -> ``a+ext@x``; ``a`` -> ``a+ext``; ``"a b"@x`` -> ``"a b+ext"@x``.

    As mail_addr_crunch.c: the extension goes into the internal form of
    the local part, which is then quoted again where it must be.
    ``Name <a@x>`` is reduced to the address, as Postfix's parser does.
    """
    if address.endswith(b">") and b"<" in address:
        address = address[address.rfind(b"<") + 1 : -1]
    at = address.rfind(b"@")
    localpart, rest = (address, b"") if at < 0 else (address[:at], address[at:])
    return _quote_local(_unquote_local(localpart) + extension) + rest
