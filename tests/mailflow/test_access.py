"""smtpd access restrictions: native ``memcache:`` vs the bridge, reply for reply.

One pair of instances with all four restrictions, each table through
``socketmap:`` with the ``address_search`` of README's table:

* check_client_access: ``["full", "parent_domains", "networks"]``;
* check_helo_access: ``["full", "parent_domains"]``;
* check_sender_access / check_recipient_access: ``["full", "nodelim",
  "domain", "parent_domains", "localpart@"]`` (smtpd_access_maps is in
  Postfix's default ``parent_domain_matches_subdomains``: ``example.com``
  matches ``sub.example.com``).

``OK`` answers are made visible by an ``inline:`` table after the tested
one that rejects their whole domain. smtpd_delay_reject is on (Postfix's
default), so client, HELO and sender rejections are reported at RCPT.
The test client connects from 127.1.0.1 unless a test says otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from tests.mailflow.conftest import StartScenario
from tests.mailflow.harness import Scenario, ScenarioSpec, Table

pytestmark = pytest.mark.integration

ADDRESS_SEARCH = ["full", "nodelim", "domain", "parent_domains", "localpart@"]

ACCESS_SCENARIO = ScenarioSpec(
    "access",
    [
        Table(
            "client_access",
            entries={"127.0.0": "REJECT client net", "127.2.0.9": "REJECT client host"},
            bridge={"address_search": ["full", "parent_domains", "networks"]},
        ),
        Table(
            "helo_access",
            entries={"bad.helo.test": "REJECT bad helo", "helo-parent.test": "REJECT helo parent"},
            bridge={"address_search": ["full", "parent_domains"]},
        ),
        Table(
            "sender_access",
            entries={
                "spammer@senders.test": "REJECT spammer",
                "example.com": "REJECT example parent",
                "friend@friends.test": "OK",
                "bulk@": "REJECT bulk localpart",
            },
            bridge={"address_search": ADDRESS_SEARCH},
        ),
        Table(
            "rcpt_access",
            entries={
                "blocked@dest.test": "REJECT no mail for blocked",
                "closed.test": "REJECT closed domain",
                "rcpt-parent.test": "REJECT recipient parent",
                "abuse@": "REJECT abuse localpart",
                "boss@vip.test": "OK",
            },
            bridge={"address_search": ADDRESS_SEARCH},
        ),
    ],
    {
        "smtpd_helo_required": "yes",
        "smtpd_client_restrictions": "check_client_access <table:client_access>",
        "smtpd_helo_restrictions": "check_helo_access <table:helo_access>",
        "smtpd_sender_restrictions": (
            "check_sender_access <table:sender_access>,"
            " check_sender_access inline:{ {friends.test = REJECT friends only} }"
        ),
        "smtpd_recipient_restrictions": (
            "check_recipient_access <table:rcpt_access>,"
            " check_recipient_access inline:{ {vip.test = REJECT vip only} },"
            " permit_mynetworks, reject_unauth_destination"
        ),
    },
)


@pytest.fixture(scope="module")
def access(mailflow: StartScenario) -> Iterator[Scenario]:
    with mailflow(ACCESS_SCENARIO) as scenario:
        yield scenario


def test_recipient_access(access: Scenario) -> None:
    result = access.send(
        "access-rcpt",
        "access-rcpt@senders.test",
        [
            "blocked@dest.test",
            "Blocked+tag@dest.test",
            "ok@dest.test",
            "x@sub.rcpt-parent.test",
            "abuse@any.test",
            "y@closed.test",
            "boss@vip.test",
            "other@vip.test",
        ],
    )
    access.check(
        result,
        rcpt={
            "blocked@dest.test": 554,
            "Blocked+tag@dest.test": 554,
            "ok@dest.test": 250,
            "x@sub.rcpt-parent.test": 554,
            "abuse@any.test": 554,
            "y@closed.test": 554,
            "boss@vip.test": 250,
            "other@vip.test": 554,
        },
        delivered={"default": ["ok@dest.test", "boss@vip.test"]},
    )


@pytest.mark.parametrize(
    ("case", "sender", "code"),
    [
        ("access-sender-full", "spammer@senders.test", 554),
        ("access-sender-nodelim", "spammer+x@senders.test", 554),
        ("access-sender-parent", "user@sub.example.com", 554),
        ("access-sender-domain", "user@example.com", 554),
        ("access-sender-localpart", "bulk@anywhere.test", 554),
        ("access-sender-ok", "friend@friends.test", 250),
        ("access-sender-inline", "stranger@friends.test", 554),
    ],
)
def test_sender_access(access: Scenario, case: str, sender: str, code: int) -> None:
    result = access.send(case, sender, [f"{case}@dest.test"])
    access.check(
        result,
        rcpt={f"{case}@dest.test": code},
        delivered={"default": [f"{case}@dest.test"]} if code == 250 else {},
    )


@pytest.mark.parametrize(
    ("case", "client_ip", "code"),
    [
        ("access-client-net", "127.0.0.1", 554),
        ("access-client-net2", "127.0.0.77", 554),
        ("access-client-host", "127.2.0.9", 554),
        ("access-client-neighbour", "127.2.0.10", 250),
    ],
)
def test_client_access(access: Scenario, case: str, client_ip: str, code: int) -> None:
    result = access.send(case, f"{case}@senders.test", [f"{case}@dest.test"], client_ip=client_ip)
    access.check(
        result,
        rcpt={f"{case}@dest.test": code},
        delivered={"default": [f"{case}@dest.test"]} if code == 250 else {},
    )


@pytest.mark.parametrize(
    ("case", "helo", "code"),
    [
        ("access-helo-full", "bad.helo.test", 554),
        ("access-helo-upper", "BAD.Helo.Test", 554),
        ("access-helo-parent", "mx.helo-parent.test", 554),
        ("access-helo-other", "good.helo.test", 250),
    ],
)
def test_helo_access(access: Scenario, case: str, helo: str, code: int) -> None:
    result = access.send(case, f"{case}@senders.test", [f"{case}@dest.test"], helo=helo)
    access.check(
        result,
        rcpt={f"{case}@dest.test": code},
        delivered={"default": [f"{case}@dest.test"]} if code == 250 else {},
    )


# -- smtpd_delay_reject = no: each restriction answers at its own command ---

NODELAY_SCENARIO = dataclasses.replace(
    ACCESS_SCENARIO,
    name="access-nodelay",
    main_cf={**ACCESS_SCENARIO.main_cf, "smtpd_delay_reject": "no"},
)


@pytest.fixture(scope="module")
def nodelay(mailflow: StartScenario) -> Iterator[Scenario]:
    with mailflow(NODELAY_SCENARIO) as scenario:
        yield scenario


def test_nodelay_client_rejected_at_connect(nodelay: Scenario) -> None:
    result = nodelay.send(
        "nodelay-client", "nodelay-client@senders.test", ["a@dest.test"], client_ip="127.0.0.5"
    )
    nodelay.check(result, connect=554, delivered={})


def test_nodelay_helo_rejected_at_ehlo(nodelay: Scenario) -> None:
    result = nodelay.send(
        "nodelay-helo", "nodelay-helo@senders.test", ["a@dest.test"], helo="x.helo-parent.test"
    )
    nodelay.check(result, helo=554, mail=503, delivered={})


def test_nodelay_sender_rejected_at_mail(nodelay: Scenario) -> None:
    result = nodelay.send("nodelay-sender", "user@deep.sub.example.com", ["a@dest.test"])
    nodelay.check(result, mail=554, rcpt={"a@dest.test": 503}, delivered={})


def test_nodelay_recipient_rejected_at_rcpt(nodelay: Scenario) -> None:
    result = nodelay.send(
        "nodelay-rcpt", "nodelay-rcpt@senders.test", ["abuse@x.test", "fine@dest.test"]
    )
    nodelay.check(
        result,
        rcpt={"abuse@x.test": 554, "fine@dest.test": 250},
        delivered={"default": ["fine@dest.test"]},
    )
