"""Key preparation: everything that happens to a lookup key before memcache sees it.

A Postfix ``memcache:`` table does not send the caller's key as is. It runs
the key through a fixed pipeline (spec MC-13), and this module holds each
stage as a pure function or value, so the table code only strings them
together::

    raw key ──► fold_key()            case folding, UTF-8 check  (CASE-2, G-6)
            ──► DomainFilter.check()  the ``domain =`` pre-filter (DOM-1..DOM-6)
            ──► memcache_key()        key_format, key_digest, validation
                                                                  (MC-13 steps 1, 4-7)

The order of the first two does not matter: the domain filter folds the
domain on its own (CASE-2), so its verdict is the same either way.

Everything that can be wrong with a setting is found when the configuration
is loaded: :class:`KeyTemplate` and :class:`DomainFilter` parse their text
once (KF-1, DOM-2) and :func:`make_digest` checks the algorithm up front,
each raising :class:`KeyConfigError`. After that, per-request work is plain
byte slicing with no parsing and no exceptions.

The module is I/O-free apart from reading ``/file`` items of a domain list
at parse time (DOM-5). Tables named inside a domain list are *not* opened
here: :meth:`DomainFilter.check` calls back into a lookup function supplied
by the caller, which owns the opened maps. That is the only reason it is
``async``.

The partial keys Postfix asks a fixed table for (G-3) are generated in
:mod:`bridge.address_search`, before this pipeline runs for each of them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from bridge.outcome import ConfigFailure, Found, Outcome, Retry
from bridge.postfix_text import logical_lines

__all__ = [
    "DomainFilter",
    "DomainItem",
    "DomainLiteral",
    "DomainTable",
    "KeyConfigError",
    "KeyTemplate",
    "fold_key",
    "fold_table_key",
    "is_valid_memcache_key",
    "make_digest",
    "memcache_key",
]

_log = logging.getLogger("bridge.keys")


class KeyConfigError(ValueError):
    """A key-related setting (key_format, key_digest, domain, address search) is invalid.

    The message names the setting, the offending text and what would be valid.
    """


# ---------------------------------------------------------------------------
# Case folding (CASE-1..CASE-3, G-6)


def fold_key(key: bytes, *, smtputf8: bool = True) -> bytes | None:
    """Case-fold a key the way Postfix does for fixed-key tables (CASE-2).

    Args:
      key: the key as the client sent it.
      smtputf8: True mirrors ``smtputf8_enable = yes``: the key must be valid
        UTF-8 and gets full Unicode case folding (``Straße`` -> ``strasse``).
        False lowers ASCII letters only and accepts any bytes.

    Returns:
      The folded key, or None when ``smtputf8`` is on and the key is not
      valid UTF-8. Postfix never sends such a key to the table (G-6); the
      caller must answer "not found".
    """
    if key.isascii():
        # Unicode case folding of ASCII text is ASCII lowercasing, and this
        # is by far the common case, so skip the decode/encode round trip.
        return key.lower()
    if not smtputf8:
        return key.lower()  # bytes.lower() touches only A-Z: CAFÉ -> cafÉ
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.casefold().encode("utf-8")


def _fold_pattern(pattern: bytes, *, smtputf8: bool) -> bytes:
    """Fold a configured literal; text that is not UTF-8 still gets ASCII folding.

    Such a literal can never match under SMTPUTF8 (G-6 rejects the key
    first), so the fallback only keeps configuration loading from failing
    over a pattern that is merely useless.
    """
    folded = fold_key(pattern, smtputf8=smtputf8)
    return pattern.lower() if folded is None else folded


# ---------------------------------------------------------------------------
# key_format (KF-1..KF-8)

#: The only characters allowed after ``%`` in a key_format (KF-1).
_TEMPLATE_DIRECTIVES = "%sSuUdD123456789"
# Appended to every key_format error, so the fix is in the message itself.
_TEMPLATE_HELP = "use %%, %s, %S, %u, %U, %d, %D, %1-%9"


@dataclass(frozen=True, slots=True)
class _Literal:
    """Template text copied to the key as is (``%%`` already reduced to ``%``)."""

    text: bytes


class _Field(Enum):
    """A whole-key expansion. Upper- and lower-case spellings are the same field (KF-4)."""

    KEY = "s"
    LOCAL = "u"
    DOMAIN = "d"


@dataclass(frozen=True, slots=True)
class _Label:
    """``%1``..``%9``: a domain label counted from the right, 1 = last (KF-3 step 5)."""

    index: int


_TemplatePart = _Literal | _Field | _Label


def _encode_config_text(setting: str, text: str) -> bytes:
    """Turn configuration text back into the bytes Postfix would have seen.

    Bytes that were not UTF-8 in the file come back out unchanged when the
    reader decoded them with surrogate escapes; any other lone surrogate
    cannot have come from a file and is refused.
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise KeyConfigError(
            f"invalid {setting} {text!r}: {exc.object[exc.start : exc.end]!r} is not text"
        ) from exc


def _template_error(text: str, detail: str) -> KeyConfigError:
    return KeyConfigError(f"invalid key_format {text!r}: {detail} ({_TEMPLATE_HELP})")


def _parse_template(text: str) -> tuple[_TemplatePart, ...]:
    """Split a key_format into parts, merging adjacent literal text (KF-1)."""
    _encode_config_text("key_format", text)  # refuse unencodable text up front
    parts: list[_TemplatePart] = []
    literal: list[str] = []
    position = 0
    while True:
        percent = text.find("%", position)
        if percent < 0:
            literal.append(text[position:])
            break
        literal.append(text[position:percent])
        directive = text[percent + 1 : percent + 2]
        if not directive:
            raise _template_error(text, "a '%' at the end has nothing to expand")
        if directive not in _TEMPLATE_DIRECTIVES:
            raise _template_error(text, f"'%{directive}' is not a valid expansion")
        position = percent + 2
        if directive == "%":
            literal.append("%")
            continue
        if any(literal):
            parts.append(_Literal("".join(literal).encode("utf-8", "surrogateescape")))
        literal.clear()
        if directive.isdigit():
            parts.append(_Label(int(directive)))
        else:
            parts.append(_Field(directive.lower()))
    if any(literal):
        parts.append(_Literal("".join(literal).encode("utf-8", "surrogateescape")))
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    """A parsed ``key_format`` (KF-1..KF-5).

    The text is parsed once, when the object is made, so :meth:`expand`
    does no parsing per request. Constructing ``KeyTemplate(text)`` directly
    validates exactly like :meth:`parse`.

    Attributes:
      text: the template as configured (``%s`` is the Postfix default).
      needs_user: it uses ``%u``/``%U`` (KF-2).
      needs_domain: it uses ``%d``/``%D`` or a label ``%1``..``%9`` (KF-2).
      label_count: the highest label number used, 0 if none (KF-2 ``nparts``).
    """

    text: str
    _parts: tuple[_TemplatePart, ...] = field(init=False, repr=False, compare=False)
    needs_user: bool = field(init=False, repr=False, compare=False)
    needs_domain: bool = field(init=False, repr=False, compare=False)
    label_count: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = _parse_template(self.text)
        labels = [part.index for part in parts if isinstance(part, _Label)]
        object.__setattr__(self, "_parts", parts)
        object.__setattr__(self, "needs_user", _Field.LOCAL in parts)
        object.__setattr__(self, "needs_domain", _Field.DOMAIN in parts or bool(labels))
        object.__setattr__(self, "label_count", max(labels, default=0))

    @classmethod
    def parse(cls, text: str) -> KeyTemplate:
        """Parse and validate a key_format setting.

        Args:
          text: the value of ``key_format``; the empty string is a valid
            template that expands to the empty key (MC-3).

        Returns:
          The parsed template.

        Raises:
          KeyConfigError: a ``%`` is followed by anything but ``%``, ``s``,
            ``S``, ``u``, ``U``, ``d``, ``D``, ``1``-``9``, or ends the text
            (KF-1). Postfix refuses to open such a table.
        """
        return cls(text)

    @property
    def is_identity(self) -> bool:
        """True for exactly ``%s``, the fast path that skips expansion (KF-5).

        An equivalent spelling such as ``%S`` is deliberately not identity:
        Postfix sends it through the full expansion. The result is the same;
        keeping the paths as Postfix has them just leaves nothing to argue.
        """
        return self.text == "%s"

    def expand(self, key: bytes) -> bytes | None:
        """Expand the template for one (already folded) key (KF-3).

        Args:
          key: the case-folded key.

        Returns:
          The expanded key, or None if the expansion is suppressed: the
          template needs a domain and the key has none (no ``@`` or nothing
          after the last ``@``), it needs a local part and the key starts
          with its last ``@``, or it needs more domain labels than there
          are. The result may be empty or contain whitespace; validating it
          is :func:`memcache_key`'s job (KF-7).
        """
        local = domain = key
        if self.needs_user or self.needs_domain:
            at = key.rfind(b"@")  # KF-8: the last '@' splits local part and domain
            if at < 0:
                if self.needs_domain:
                    return None
            else:
                if self.needs_user and at == 0:
                    return None
                local, domain = key[:at], key[at + 1 :]
                if self.needs_domain and not domain:
                    return None
        labels: list[bytes] = []
        if self.label_count:
            # Empty labels vanish instead of suppressing (KF-3 step 4).
            labels = [label for label in domain.split(b".") if label]
            if len(labels) < self.label_count:
                return None
        pieces: list[bytes] = []
        for part in self._parts:
            if isinstance(part, _Literal):
                pieces.append(part.text)
            elif isinstance(part, _Label):
                pieces.append(labels[-part.index])
            elif part is _Field.KEY:
                pieces.append(key)
            elif part is _Field.LOCAL:
                pieces.append(local)
            else:
                pieces.append(domain)
        return b"".join(pieces)


# ---------------------------------------------------------------------------
# key_digest (MC-13 step 5, spec 12.6)


def make_digest(name: str) -> Callable[[bytes], bytes]:
    """Check a ``key_digest`` algorithm once and return the hashing function.

    Args:
      name: any algorithm :func:`hashlib.new` knows (``sha256``, ``SHA256``,
        ``md5``, ``sha3_256`` ...), as Postfix accepts any OpenSSL digest name.

    Returns:
      A function from key bytes to the lower-case hex digest, as ASCII bytes.

    Raises:
      KeyConfigError: the algorithm is unknown or unusable here (Postfix:
        the table is unusable, G-7), or it is a SHAKE variant: those have no
        fixed output length, and OpenSSL 3.4+ refuses them without one, so
        Postfix cannot use them either.
    """
    if name.lower().startswith("shake"):
        raise KeyConfigError(
            f"invalid key_digest {name!r}: SHAKE digests have no fixed output length; "
            "use a fixed-length digest such as sha256"
        )
    try:
        prototype = hashlib.new(name)
    except (ValueError, TypeError) as exc:
        available = ", ".join(
            sorted(a for a in hashlib.algorithms_available if not a.startswith("shake"))
        )
        raise KeyConfigError(
            f"invalid key_digest {name!r}: unknown digest algorithm (available: {available})"
        ) from exc

    def digest(key: bytes) -> bytes:
        # Copying an already constructed object avoids the name lookup per key.
        hasher = prototype.copy()
        hasher.update(key)
        return hasher.hexdigest().encode("ascii")

    return digest


# ---------------------------------------------------------------------------
# Key validation and the memcache key pipeline (MC-13)

# Whitespace (SP HT LF VT FF CR) and control bytes (0x00-0x1F, 0x7F) end a
# token in the memcache text protocol, so such a key could not be sent
# intact (MC-13 step 7, 3.12 rule). Bytes >= 0x80 are neither.
_INVALID_KEY_BYTE = re.compile(rb"[\x00-\x20\x7f]")


def fold_table_key(key: bytes, *, smtputf8: bool = True) -> bytes:
    """Fold a key stored in a backup table exactly like lookup keys (TH-4 bridge note).

    A stored key that is not valid UTF-8 can never match under SMTPUTF8
    (such lookup keys are refused before they reach a table, G-6); it is
    ASCII-lowercased so that it still has one stable form for iteration.
    """
    folded = fold_key(key, smtputf8=smtputf8)
    return key.lower() if folded is None else folded


def is_valid_memcache_key(key: bytes) -> bool:
    """Tell whether a prepared key can be sent to memcache (MC-13 steps 6-7).

    Args:
      key: the key after key_format and key_digest.

    Returns:
      True if the key is non-empty and has no whitespace or control byte.
    """
    return bool(key) and _INVALID_KEY_BYTE.search(key) is None


def memcache_key(
    folded_key: bytes,
    template: KeyTemplate,
    digest: Callable[[bytes], bytes] | None,
) -> bytes | None:
    """Turn a folded, domain-checked key into the key sent to memcache (MC-13).

    Args:
      folded_key: the lookup key after :func:`fold_key` (where folding
        applies) and after the domain filter accepted it.
      template: the parsed key_format.
      digest: the function from :func:`make_digest`, or None without
        ``key_digest``.

    Returns:
      The memcache key, or None when the operation must be skipped: an
      empty input key (step 1), a suppressed expansion (step 4), or a result
      that is empty or holds whitespace/control bytes (steps 6-7). Because
      the digest comes before validation, a key with spaces becomes usable
      with a digest, and an empty template with a digest yields the digest
      of ``b""`` (MC-13, last paragraph).
    """
    if not folded_key:
        return None
    key: bytes | None = folded_key if template.is_identity else template.expand(folded_key)
    if key is None:
        return None
    if digest is not None:
        key = digest(key)
    return key if is_valid_memcache_key(key) else None


# ---------------------------------------------------------------------------
# The domain filter (DOM-1..DOM-6)

# Item separators of a Postfix list (DOM-2). VT and FF are not among them.
_LIST_SEPARATORS = frozenset(b", \t\r\n")
_OPEN_BRACE, _CLOSE_BRACE = ord("{"), ord("}")

# Postfix follows /file items without any limit, so a file that names
# itself recurses until the process dies. Real configurations nest one
# level, if at all; anything this deep is a loop.
_MAX_FILE_NESTING = 8


@dataclass(frozen=True, slots=True)
class DomainLiteral:
    """A literal domain item; ``domain`` is stored case-folded (DOM-2, DOM-4)."""

    domain: bytes
    negated: bool


@dataclass(frozen=True, slots=True)
class DomainTable:
    """A ``type:name`` item, kept as its text; the caller opens the table (DOM-6)."""

    spec: str
    negated: bool


DomainItem = DomainLiteral | DomainTable


def _list_tokens(text: bytes) -> Iterator[bytes]:
    """Split list text into items; separators inside ``{...}`` do not split (DOM-2)."""
    position, end = 0, len(text)
    while True:
        while position < end and text[position] in _LIST_SEPARATORS:
            position += 1
        if position == end:
            return
        start, depth = position, 0
        while position < end:
            byte = text[position]
            if byte == _OPEN_BRACE:
                depth += 1
            elif byte == _CLOSE_BRACE and depth > 0:
                depth -= 1
            elif depth == 0 and byte in _LIST_SEPARATORS:
                break
            position += 1
        yield text[start:position]


def _is_table_item(item: bytes) -> bool:
    # "[" guards IPv6 address literals such as [::1], which hold ':' too.
    return b":" in item and not item.startswith(b"[")


def _parse_list(
    text: bytes, *, negated: bool, smtputf8: bool, source: str, nesting: int
) -> list[DomainItem]:
    """Parse list text; ``negated`` is the polarity inherited from a ``!/file`` item."""
    items: list[DomainItem] = []
    for token in _list_tokens(text):
        if token.startswith(b"#"):
            _log.warning(
                "%s: a '#' comment after other text is not supported; ignoring %r and the rest",
                source,
                token.decode("utf-8", "backslashreplace"),
            )
            break
        item = token.lstrip(b"!")
        item_negated = negated ^ ((len(token) - len(item)) % 2 == 1)
        if not item:
            raise KeyConfigError(f"invalid domain list in {source}: no pattern after '!'")
        if item.startswith(b"/"):
            items.extend(
                _read_list_file(item, negated=item_negated, smtputf8=smtputf8, nesting=nesting)
            )
        elif _is_table_item(item):
            spec = item.decode("utf-8", "surrogateescape")
            items.append(DomainTable(spec=spec, negated=item_negated))
        else:
            folded = _fold_pattern(item, smtputf8=smtputf8)
            items.append(DomainLiteral(domain=folded, negated=item_negated))
    return items


def _read_list_file(
    path: bytes, *, negated: bool, smtputf8: bool, nesting: int
) -> list[DomainItem]:
    """Read a ``/file`` item: each logical line is more list text (DOM-5, 3.12 rules)."""
    name = os.fsdecode(path)
    if nesting >= _MAX_FILE_NESTING:
        raise KeyConfigError(
            f"invalid domain list: file {name} is nested more than {_MAX_FILE_NESTING} "
            "levels deep (does a file name itself?)"
        )
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise KeyConfigError(f"cannot read domain list file {name}: {exc.strerror}") from exc
    items: list[DomainItem] = []
    for line in logical_lines(data, source=name):
        # Each line is parsed on its own, so a '#' item ends only that line.
        items += _parse_list(
            line.text,
            negated=negated,
            smtputf8=smtputf8,
            source=f"{name}, line {line.lineno}",
            nesting=nesting + 1,
        )
    return items


@dataclass(frozen=True, slots=True)
class DomainFilter:
    """A parsed ``domain`` setting: the key pre-filter of MC-13 step 2.

    Attributes:
      items: the patterns in order; ``/file`` items are already expanded
        into the items they contain.
      smtputf8: how candidate domains are folded (DOM-3, same as CASE-2).
    """

    items: tuple[DomainItem, ...]
    smtputf8: bool = True

    @classmethod
    def parse(
        cls, text: str, *, base_dir: str | None = None, smtputf8: bool = True
    ) -> DomainFilter:
        """Parse a ``domain`` list once, at configuration load (DOM-2).

        An empty setting means "no filter" (MC-3); that is the caller's
        decision. Parsing ``""`` here gives a filter that matches nothing,
        which is what Postfix does with a list of only separators.

        Args:
          text: the value of ``domain``. Bytes that are not UTF-8 can be
            carried in as surrogate escapes.
          base_dir: accepted for interface stability and not used: ``/file``
            items are absolute by definition (DOM-2), and table items are
            opened by the caller, who resolves their names.
          smtputf8: fold literals and candidate domains with full Unicode
            case folding (True) or ASCII only (False).

        Returns:
          The filter.

        Raises:
          KeyConfigError: an item is only ``!``, a ``/file`` cannot be
            read (naming the file), or files nest too deep.
        """
        del base_dir  # see Args: nothing in a domain list is relative
        items = _parse_list(
            _encode_config_text("domain", text),
            negated=False,
            smtputf8=smtputf8,
            source="domain",
            nesting=0,
        )
        return cls(items=tuple(items), smtputf8=smtputf8)

    @property
    def table_specs(self) -> tuple[str, ...]:
        """Every distinct ``type:name`` item in order, so the caller can open each once."""
        return tuple(dict.fromkeys(i.spec for i in self.items if isinstance(i, DomainTable)))

    async def check(
        self, key: bytes, lookup: Callable[[str, bytes], Awaitable[Outcome]]
    ) -> bool | Retry | ConfigFailure:
        """Decide whether a key is eligible for the memcache table (DOM-1, DOM-3).

        Args:
          key: the lookup key (folded or not; the domain is folded here).
          lookup: ``lookup(spec, domain)`` looks the folded domain up, exactly
            as given, in the table opened from ``spec`` (DOM-6: domain tables
            are opened without case folding).

        Returns:
          True if the first matching item is positive; False if it is
          negated, if nothing matches, if the key has no ``@`` or an empty
          local part, or if the domain is not UTF-8 under SMTPUTF8 (G-6
          would have rejected that key anyway). A Retry or ConfigFailure
          from a table lookup is returned as is, even for a negated table
          or when a later item would have matched (spec 12.8): an error must
          not turn into "skip".
        """
        at = key.rfind(b"@")
        if at <= 0:  # no '@', or an empty local part
            return False
        domain = fold_key(key[at + 1 :], smtputf8=self.smtputf8)
        if domain is None:
            return False
        for item in self.items:
            if isinstance(item, DomainLiteral):
                if item.domain == domain:  # DOM-4: equality only, no parent domains
                    return not item.negated
                continue
            outcome = await lookup(item.spec, domain)
            if isinstance(outcome, Found):
                return not item.negated
            if isinstance(outcome, (Retry, ConfigFailure)):
                return outcome
        return False
