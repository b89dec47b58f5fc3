"""Tests for bridge.address_search: the partial keys and the finishing of a hit.

Vectors cite the rule of docs/behaviour.md they come from (AS-1..AS-6);
the expected keys and results are what Postfix's mail_addr_find.c,
mail_addr_map.c and smtpd_check.c do for a fixed table.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.address_search import (
    ADDRESS_FORMS,
    SearchKey,
    address_search_keys,
    finish_mapped_result,
    resolve_mapping,
    search_keys,
    validate_address_forms,
    validate_extension_classes,
    validate_mapping,
)
from bridge.keys import KeyConfigError

# ---------------------------------------------------------------------------
# The address forms (AS-1, AS-2)


def test_address_search_all_forms_for_a_local_domain() -> None:
    keys = address_search_keys(
        b"user+ext@example.com", ADDRESS_FORMS, local_domains={b"example.com"}
    )
    assert keys == [
        b"user+ext@example.com",
        b"user@example.com",
        b"user+ext",
        b"user",
        b"@example.com",
        b"example.com",
        b"com",
        b".com",
        b"user+ext@",
        b"user@",
    ]


def test_address_search_localpart_needs_a_local_domain() -> None:
    assert address_search_keys(b"user+ext@example.com", ["localpart"]) == []
    assert address_search_keys(
        b"user@example.com", ["localpart"], local_domains=[b"example.com"]
    ) == [b"user"]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        # A bare local part is its own full key; only nodelim adds to it.
        (b"user+ext", [b"user+ext", b"user"]),
        (b"user", [b"user"]),
    ],
)
def test_address_search_bare_localpart(key: bytes, expected: list[bytes]) -> None:
    assert address_search_keys(key, ADDRESS_FORMS, local_domains={b""}) == expected


def test_address_search_follows_the_given_order_and_removes_duplicates() -> None:
    keys = address_search_keys(b"user@example.com", ["domain", "full", "nodelim", "@domain"])
    assert keys == [b"example.com", b"user@example.com", b"@example.com"]
    # Without an extension the stripped forms equal the full ones.
    assert address_search_keys(b"user@x", ["full", "nodelim", "localpart@"]) == [
        b"user@x",
        b"user@",
    ]


@pytest.mark.parametrize(
    ("key", "delimiter", "stripped"),
    [
        (b"user-ext@x", b"+-", b"user@x"),  # any byte of the set starts an extension
        (b"user-a+b@x", b"+-", b"user@x"),  # the first delimiter byte wins
        (b"user+a-b@x", b"-", b"user+a@x"),
        (b"user+ext@x", b"", None),  # no delimiter: no extension
        (b"+ext@x", b"+", None),  # the local part would become empty
        (b"postmaster@x", b"t", None),  # never split (split_addr.c)
        (b"postmaster+x@x", b"+", b"postmaster@x"),  # only the exact name is special
        (b"mailer-daemon@x", b"-", None),
        (b"double-bounce@x", b"-", None),
        (b"owner-list@x", b"-", None),  # owner_request_special
        (b"list-request@x", b"-", None),
        (b"owner+x@x", b"+", b"owner@x"),  # only special with '-' in the set
        (b"-request@x", b"-", None),  # too short to be "*-request"; splits to ""
        # The local part ends at the last '@', and strip_addr.c keeps only
        # the text from that '@' on after the stripped local part.
        (b"a+b@c@d", b"+", b"a@d"),
    ],
)
def test_address_search_extension_rules(
    key: bytes, delimiter: bytes, stripped: bytes | None
) -> None:
    expected = [key] if stripped is None else [key, stripped]
    assert address_search_keys(key, ["full", "nodelim"], delimiter=delimiter) == expected


def test_address_search_empty_parts() -> None:
    # "@domain" of "user@" is "@", as Postfix asks; "domain" of "user@" is skipped.
    assert address_search_keys(b"user@", ["@domain", "domain"]) == [b"@"]
    # An empty local part: no empty key, but "localpart@" is "@".
    assert address_search_keys(
        b"@example.com", ["localpart", "localpart@"], local_domains={b"example.com"}
    ) == [b"@"]


def test_address_search_unknown_form_is_refused() -> None:
    with pytest.raises(KeyConfigError, match="'user'"):
        address_search_keys(b"u@x", ["full", "user"])


def test_validate_address_forms() -> None:
    assert validate_address_forms(["domain", "full", "domain"]) == ("domain", "full")
    assert validate_address_forms(list(ADDRESS_FORMS)) == ADDRESS_FORMS
    with pytest.raises(KeyConfigError, match="'@domains'"):
        validate_address_forms(["full", "@domains"])
    with pytest.raises(KeyConfigError, match="no forms"):
        validate_address_forms([])


_ADDRESS = st.binary(max_size=30) | st.text(alphabet="u+-@.xé", max_size=12).map(str.encode)


@given(
    _ADDRESS,
    st.lists(st.sampled_from(ADDRESS_FORMS), min_size=1),
    st.sampled_from([b"", b"+", b"+-"]),
)
def test_address_search_properties(key: bytes, forms: list[str], delimiter: bytes) -> None:
    keys = address_search_keys(key, forms, delimiter=delimiter, local_domains={b"x"})
    assert len(keys) == len(set(keys))
    assert all(keys)
    if forms[0] == "full" and key:
        assert keys[0] == key


# ---------------------------------------------------------------------------
# Access-map forms (AS-3, AS-4)

ACCESS_ADDRESS = ["full", "nodelim", "domain", "parent_domains", "localpart@"]


@pytest.mark.parametrize(
    ("key", "forms", "expected"),
    [
        # check_sender_access with smtpd_access_maps in parent_domain_matches_subdomains
        (
            b"user+x@mail.example.com",
            ACCESS_ADDRESS,
            [
                b"user+x@mail.example.com",
                b"user@mail.example.com",
                b"mail.example.com",
                b"example.com",
                b"com",
                b"user+x@",
                b"user@",
            ],
        ),
        # ... and without it: the dot style
        (
            b"user@mail.example.com",
            ["full", "domain", ".parent_domains", "localpart@"],
            [b"user@mail.example.com", b"mail.example.com", b".example.com", b".com", b"user@"],
        ),
        # check_helo_access / check_client_access: a host name and its parents
        (
            b"mail.example.com",
            ["full", "parent_domains"],
            [b"mail.example.com", b"example.com", b"com"],
        ),
        (
            b"mail.example.com",
            ["full", ".parent_domains"],
            [b"mail.example.com", b".example.com", b".com"],
        ),
        # a host name has no networks, an IP address no parent domains
        (b"mail.example.com", ["full", "networks"], [b"mail.example.com"]),
        (b"192.0.2.7", ["full", "parent_domains"], [b"192.0.2.7"]),
        (
            b"192.0.2.7",
            ["full", "parent_domains", "networks"],
            [b"192.0.2.7", b"192.0.2", b"192.0", b"192"],
        ),
        (
            b"2001:db8::1",
            ["full", "networks"],
            [b"2001:db8::1", b"2001:db8:", b"2001:db8", b"2001"],
        ),
        # "::1" splits to ":" and then to the empty key, which is never asked
        (b"::1", ["full", "networks"], [b"::1", b":"]),
        # Postfix's loop on odd names: trailing dots, address literals
        (b"a.b.", ["parent_domains"], [b"b."]),
        (b"a.b.", [".parent_domains"], [b".b.", b"."]),
        (
            b"u@[192.0.2.1]",
            ["domain", "parent_domains"],
            [b"[192.0.2.1]", b"0.2.1]", b"2.1]", b"1]"],
        ),
        (b"localhost", ["full", "parent_domains"], [b"localhost"]),
        (b"unknown", ["full", "parent_domains", "networks"], [b"unknown"]),
    ],
)
def test_access_forms(key: bytes, forms: list[str], expected: list[bytes]) -> None:
    assert address_search_keys(key, forms) == expected


def test_one_list_serves_every_key_shape_in_postfixs_order() -> None:
    forms = ["full", "nodelim", "domain", "parent_domains", "localpart@", "networks"]
    assert address_search_keys(b"a@b.c", forms) == [b"a@b.c", b"b.c", b"c", b"a@"]
    assert address_search_keys(b"h.b.c", forms) == [b"h.b.c", b"b.c", b"c"]
    assert address_search_keys(b"10.1.2.3", forms) == [b"10.1.2.3", b"10.1.2", b"10.1", b"10"]


# ---------------------------------------------------------------------------
# Which forms dropped the extension (AS-5)


def test_forms_without_the_extension_are_marked() -> None:
    keys = search_keys(
        b"user+ext@example.com",
        ["full", "nodelim", "localpart", "@domain", "localpart@"],
        local_domains={b"example.com"},
    )
    assert keys == [
        SearchKey(b"user+ext@example.com"),
        SearchKey(b"user@example.com", unmatched_extension=True),
        SearchKey(b"user+ext"),
        SearchKey(b"user", unmatched_extension=True),
        SearchKey(b"@example.com"),
        SearchKey(b"user+ext@"),
        SearchKey(b"user@", unmatched_extension=True),
    ]


def test_quoted_local_parts_are_stripped_inside_the_quotes() -> None:
    # Postfix strips the internal form and quotes the rest again.
    assert address_search_keys(b'"a b+x"@example.com', ["full", "nodelim"]) == [
        b'"a b+x"@example.com',
        b'"a b"@example.com',
    ]
    # The extension held the only reason to quote.
    assert address_search_keys(b'"a+x y"@example.com', ["nodelim"]) == [b"a@example.com"]


# ---------------------------------------------------------------------------
# Finishing a hit (AS-6): mail_addr_map.c's own cases, in the bridge's terms


@pytest.mark.parametrize(
    ("value", "original", "propagate", "expected"),
    [
        (b"bb@example.com", b"aa+ext@example.com", True, b"bb+ext@example.com"),
        (b"bb@example.com", b"aa+ext@example.com", False, b"bb@example.com"),
        (
            b"dd@example.com,ee@example.com",
            b"cc+ext@example.com",
            True,
            b"dd+ext@example.com, ee+ext@example.com",
        ),
        (b'"b b"@example.com', b'"a a+ext"@example.com', True, b'"b b+ext"@example.com'),
        # @otherdomain: the original local part without its extension ...
        (b"@b.test", b"moved+tag@a.test", False, b"moved@b.test"),
        # ... and the extension propagated back
        (b"@b.test", b"moved+tag@a.test", True, b"moved+tag@b.test"),
        # the local part is Postfix's unfolded copy
        (b"@b.test", b"Moved+Tag@A.test", True, b"Moved+Tag@b.test"),
        (b"@b.test", b'"a b+x"@a.test', False, b'"a b"@b.test'),
        # a bare name: Postfix qualifies it later, with the extension in place
        (b"user", b"u+x@a.test", True, b"user+x"),
        (b"Name <a@x>, b@y", b"u+x@a.test", True, b"a+x@x, b+x@y"),
        (b'"a,b"@x, c@y', b"u+x@a.test", True, b'"a,b+x"@x, c+x@y'),
        # a key without an extension is left alone
        (b"@b.test", b"plain@a.test", True, b"@b.test"),
    ],
)
def test_finish_mapped_result(
    value: bytes, original: bytes, propagate: bool, expected: bytes
) -> None:
    assert finish_mapped_result(value, original, delimiter=b"+", propagate=propagate) == expected


def test_finish_uses_the_first_delimiter_of_the_set() -> None:
    assert finish_mapped_result(b"x@y", b"a-b+c@z", delimiter=b"+-", propagate=True) == b"x-b+c@y"


# ---------------------------------------------------------------------------
# Settings


def test_resolve_mapping() -> None:
    assert resolve_mapping("auto", ("full", "nodelim", "localpart", "@domain")) == "virtual"
    assert resolve_mapping("auto", ("full", "@domain")) == "virtual"
    assert resolve_mapping("auto", ("full", "nodelim", "domain", "localpart@")) == "none"
    assert resolve_mapping("auto", ("full",)) == "none"
    assert resolve_mapping("canonical", ("full",)) == "canonical"
    assert resolve_mapping("none", ("localpart",)) == "none"


def test_validate_mapping_and_classes() -> None:
    assert validate_mapping("generic") == "generic"
    with pytest.raises(KeyConfigError, match="'virtal'"):
        validate_mapping("virtal")
    assert validate_extension_classes(["virtual", "canonical", "virtual"]) == (
        "virtual",
        "canonical",
    )
    assert validate_extension_classes([]) == ()
    with pytest.raises(KeyConfigError, match="'aliases'"):
        validate_extension_classes(["aliases"])
