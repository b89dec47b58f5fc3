"""virtual_alias_maps: native ``memcache:`` vs the bridge, mail for mail.

The bridge side asks ``socketmap:inet:...:NAME`` (and, in the proxy
scenario, ``proxy:socketmap:inet:...``), with ``address_search = ["full",
"nodelim", "localpart", "@domain"]``. Postfix asks a socketmap table only
for the full address, so the bridge must also do what Postfix does after
a partial match of a fixed table: propagate the unmatched extension
(``propagate_unmatched_extensions``) and turn ``@otherdomain`` into the
same user in otherdomain.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mailflow.conftest import StartScenario
from tests.mailflow.harness import Scenario, ScenarioSpec, Table, TomlValue

pytestmark = pytest.mark.integration

ALIAS_SEARCH = ["full", "nodelim", "localpart", "@domain"]

#: In memcache on both sides (and in the backup file).
ALIASES = {
    "alice@alias.test": "alice.real@plain.test",
    "bob@alias.test": "bob.real@plain.test",
    "team@alias.test": "a@plain.test, b@plain.test",
    "@catch.test": "catchall@plain.test",
    "moved@alias.test": "@b.test",
    "@rename.test": "@b.test",
    "chain@alias.test": "alice@alias.test",
    "dangling@alias.test": "nobody@alias.test",
}
#: Only in the texthash backup: a lookup refills memcache.
BACKUP_ONLY = {
    "refill@alias.test": "refill.real@plain.test",
    "refillx@alias.test": "refillx.real@plain.test",
}

ALIAS_MAIN_CF = {
    "virtual_alias_domains": "alias.test, catch.test, rename.test",
    "virtual_alias_maps": "<table:aliases>",
}


def alias_table(**bridge: TomlValue) -> Table:
    return Table(
        "aliases",
        entries=ALIASES,
        backup={**ALIASES, **BACKUP_ONLY},
        bridge={"address_search": ALIAS_SEARCH, **bridge},
    )


ALIAS_SCENARIO = ScenarioSpec("aliases", [alias_table()], ALIAS_MAIN_CF)

#: Extension propagation off: in the native main.cf, and per table on the bridge.
NOPROP_SCENARIO = ScenarioSpec(
    "aliases-noprop",
    [alias_table(propagate_unmatched_extensions=[])],
    ALIAS_MAIN_CF,
    native_main_cf={"propagate_unmatched_extensions": ""},
)

#: Through proxymap: proxy:memcache:/path.cf vs proxy:socketmap:inet:...
#: Postfix's default proxy_read_maps lists $virtual_alias_maps, which
#: approves both tables for proxymap; nothing else to set.
PROXY_SCENARIO = ScenarioSpec(
    "aliases-proxy",
    [alias_table()],
    {**ALIAS_MAIN_CF, "virtual_alias_maps": "proxy:<table:aliases>"},
)


@pytest.fixture(scope="module")
def aliases(mailflow: StartScenario) -> Iterator[Scenario]:
    with mailflow(ALIAS_SCENARIO) as scenario:
        yield scenario


@pytest.fixture(scope="module")
def noprop(mailflow: StartScenario) -> Iterator[Scenario]:
    with mailflow(NOPROP_SCENARIO) as scenario:
        yield scenario


@pytest.fixture(scope="module")
def proxied(mailflow: StartScenario) -> Iterator[Scenario]:
    with mailflow(PROXY_SCENARIO) as scenario:
        yield scenario


def sender(case: str) -> str:
    return f"{case}@senders.test"


def test_plain_alias(aliases: Scenario) -> None:
    result = aliases.send("alias-plain", sender("alias-plain"), ["alice@alias.test"])
    aliases.check(result, delivered={"default": ["alice.real@plain.test"]})


def test_extension_is_propagated(aliases: Scenario) -> None:
    """bob+news matches bob@alias.test; Postfix appends +news to the result."""
    result = aliases.send("alias-ext", sender("alias-ext"), ["bob+news@alias.test"])
    aliases.check(result, delivered={"default": ["bob.real+news@plain.test"]})


def test_upper_case_recipient(aliases: Scenario) -> None:
    result = aliases.send("alias-upper", sender("alias-upper"), ["ALICE@Alias.TEST"])
    aliases.check(result, delivered={"default": ["alice.real@plain.test"]})


def test_upper_case_extension(aliases: Scenario) -> None:
    result = aliases.send("alias-upper-ext", sender("alias-upper-ext"), ["Bob+NEWS@ALIAS.test"])
    aliases.check(result, delivered={"default": ["bob.real+NEWS@plain.test"]})


def test_list_value(aliases: Scenario) -> None:
    result = aliases.send("alias-list", sender("alias-list"), ["team@alias.test"])
    aliases.check(result, delivered={"default": ["a@plain.test", "b@plain.test"]})


def test_list_value_with_extension(aliases: Scenario) -> None:
    """The extension goes to every address of the list."""
    result = aliases.send("alias-list-ext", sender("alias-list-ext"), ["team+x@alias.test"])
    aliases.check(result, delivered={"default": ["a+x@plain.test", "b+x@plain.test"]})


def test_catch_all(aliases: Scenario) -> None:
    """An @domain match propagates no extension."""
    result = aliases.send("alias-catch", sender("alias-catch"), ["anyone+y@catch.test"])
    aliases.check(result, delivered={"default": ["catchall@plain.test"]})


def test_otherdomain_result(aliases: Scenario) -> None:
    """moved@alias.test -> @b.test: the same user in b.test, extension propagated."""
    result = aliases.send(
        "alias-otherdomain",
        sender("alias-otherdomain"),
        ["moved@alias.test", "moved+tag@alias.test"],
    )
    aliases.check(result, delivered={"default": ["moved@b.test", "moved+tag@b.test"]})


def test_catch_all_otherdomain(aliases: Scenario) -> None:
    """@rename.test -> @b.test keeps the whole local part, extension included."""
    result = aliases.send("alias-rename", sender("alias-rename"), ["carol+z@rename.test"])
    aliases.check(result, delivered={"default": ["carol+z@b.test"]})


def test_chained_aliases(aliases: Scenario) -> None:
    result = aliases.send("alias-chain", sender("alias-chain"), ["chain@alias.test"])
    aliases.check(result, delivered={"default": ["alice.real@plain.test"]})


def test_unknown_user_rejected_at_rcpt(aliases: Scenario) -> None:
    """smtpd looks virtual alias domain recipients up: unknown ones get 550."""
    result = aliases.send(
        "alias-unknown", sender("alias-unknown"), ["nobody@alias.test", "alice@alias.test"]
    )
    aliases.check(
        result,
        rcpt={"nobody@alias.test": 550, "alice@alias.test": 250},
        delivered={"default": ["alice.real@plain.test"]},
    )


def test_alias_to_unknown_user_bounces(aliases: Scenario) -> None:
    """smtpd accepts dangling@ (it is listed); its result is unknown: a bounce, on both sides."""
    result = aliases.send(
        "alias-dangling", sender("alias-dangling"), ["dangling@alias.test", "alice@alias.test"]
    )
    aliases.check(result, delivered={"default": ["alice.real@plain.test"]}, bounced=True)


def test_backup_only_key_is_refilled(aliases: Scenario) -> None:
    result = aliases.send("alias-refill", sender("alias-refill"), ["refill@alias.test"])
    aliases.check(result, delivered={"default": ["refill.real@plain.test"]})
    for side in ("native", "bridge"):
        items = aliases.items(side)["main"]
        assert items.get(b"aliases:refill@alias.test") == (0, b"refill.real@plain.test"), side


def test_backup_only_key_with_extension_is_refilled(aliases: Scenario) -> None:
    """refillx+tag misses memcache and backup; refillx@alias.test is refilled."""
    result = aliases.send(
        "alias-refill-ext", sender("alias-refill-ext"), ["refillx+tag@alias.test"]
    )
    aliases.check(result, delivered={"default": ["refillx.real+tag@plain.test"]})
    for side in ("native", "bridge"):
        items = aliases.items(side)["main"]
        assert items.get(b"aliases:refillx@alias.test") == (0, b"refillx.real@plain.test"), side
        assert b"aliases:refillx+tag@alias.test" not in items, side


# -- propagate_unmatched_extensions off ------------------------------------


def test_noprop_extension_dropped(noprop: Scenario) -> None:
    result = noprop.send("noprop-ext", sender("noprop-ext"), ["bob+news@alias.test"])
    noprop.check(result, delivered={"default": ["bob.real@plain.test"]})


def test_noprop_otherdomain(noprop: Scenario) -> None:
    """@otherdomain after a nodelim match: the user without the extension."""
    result = noprop.send(
        "noprop-otherdomain", sender("noprop-otherdomain"), ["moved+tag@alias.test"]
    )
    noprop.check(result, delivered={"default": ["moved@b.test"]})


def test_noprop_list(noprop: Scenario) -> None:
    result = noprop.send("noprop-list", sender("noprop-list"), ["team+x@alias.test"])
    noprop.check(result, delivered={"default": ["a@plain.test", "b@plain.test"]})


def test_noprop_catch_all_otherdomain(noprop: Scenario) -> None:
    """An @domain match keeps the whole local part whatever the setting."""
    result = noprop.send("noprop-rename", sender("noprop-rename"), ["carol+z@rename.test"])
    noprop.check(result, delivered={"default": ["carol+z@b.test"]})


# -- through proxymap --------------------------------------------------------


def test_proxy_plain_and_catch_all(proxied: Scenario) -> None:
    result = proxied.send(
        "proxy-plain", sender("proxy-plain"), ["alice@alias.test", "someone@catch.test"]
    )
    proxied.check(result, delivered={"default": ["alice.real@plain.test", "catchall@plain.test"]})


def test_proxy_extension(proxied: Scenario) -> None:
    result = proxied.send("proxy-ext", sender("proxy-ext"), ["bob+list@alias.test"])
    proxied.check(result, delivered={"default": ["bob.real+list@plain.test"]})


def test_proxy_unknown_user_rejected_at_rcpt(proxied: Scenario) -> None:
    result = proxied.send("proxy-unknown", sender("proxy-unknown"), ["ghost@alias.test"])
    proxied.check(result, rcpt={"ghost@alias.test": 550})
