"""transport_maps over ``tcp:``: native ``memcache:`` vs the bridge choose the same sink.

Two tables, both served over tcp (one listener each), in this order:

* ``transport_addr`` with the default ``address_search = ["full"]``:
  per-address entries, which Postfix asks a tcp table for anyway;
* ``transport`` with transport(5)'s search, ``["full", "nodelim",
  "domain", ".parent_domains"]``: per-domain entries, and ``.domain``
  entries for subdomains (transport_maps is not in Postfix's default
  ``parent_domain_matches_subdomains``, so a plain ``parent.test`` entry
  must NOT match ``deep.parent.test``).

Each sink stands for a transport; the default sink is the relayhost.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mailflow.conftest import StartScenario
from tests.mailflow.harness import Scenario, ScenarioSpec, Table

pytestmark = pytest.mark.integration

FAST = "smtp:[127.0.0.1]:<sink:fast>"
SLOW = "smtp:[127.0.0.1]:<sink:slow>"

TRANSPORT_SCENARIO = ScenarioSpec(
    "transport",
    [
        Table(
            "transport_addr",
            entries={"fast@route.test": FAST, "slow@route.test": SLOW},
            protocol="tcp",
        ),
        Table(
            "transport",
            entries={
                "fast.test": FAST,
                "vip@fast.test": SLOW,
                ".sub.test": SLOW,
                "parent.test": FAST,
            },
            bridge={"address_search": ["full", "nodelim", "domain", ".parent_domains"]},
            protocol="tcp",
        ),
    ],
    {"transport_maps": "<table:transport_addr>, <table:transport>"},
    sinks=("default", "fast", "slow"),
)


@pytest.fixture(scope="module")
def transport(mailflow: StartScenario) -> Iterator[Scenario]:
    with mailflow(TRANSPORT_SCENARIO) as scenario:
        yield scenario


def test_per_address_entries(transport: Scenario) -> None:
    result = transport.send(
        "transport-address",
        "transport-address@senders.test",
        ["fast@route.test", "slow@route.test", "other@route.test"],
    )
    transport.check(
        result,
        delivered={
            "fast": ["fast@route.test"],
            "slow": ["slow@route.test"],
            "default": ["other@route.test"],
        },
    )


def test_per_domain_entries(transport: Scenario) -> None:
    result = transport.send(
        "transport-domain",
        "transport-domain@senders.test",
        ["x@fast.test", "Y@FAST.TEST", "y@a.sub.test", "z@sub.test", "w@deep.parent.test"],
    )
    transport.check(
        result,
        delivered={
            "fast": ["x@fast.test", "Y@FAST.TEST"],
            "slow": ["y@a.sub.test"],
            "default": ["z@sub.test", "w@deep.parent.test"],
        },
    )


def test_address_entry_beats_domain_entry(transport: Scenario) -> None:
    """vip@fast.test has its own entry; vip+x@fast.test finds it without the extension."""
    result = transport.send(
        "transport-vip",
        "transport-vip@senders.test",
        ["vip@fast.test", "vip+x@fast.test", "notvip@fast.test"],
    )
    transport.check(
        result,
        delivered={"slow": ["vip@fast.test", "vip+x@fast.test"], "fast": ["notvip@fast.test"]},
    )
