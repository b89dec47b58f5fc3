"""memcache outage: temporary failures on both sides, never a bounce, never lost mail.

Two tables without backup, each on its own memcached per side so that
one can fail while the other works:

* ``aliases`` (virtual_alias_maps, socketmap): smtpd looks ``alias.test``
  recipients up at RCPT (``reject_unlisted_recipient`` for that domain
  only), cleanup looks every recipient up after DATA;
* ``transport`` (transport_maps, tcp): trivial-rewrite asks it for smtpd
  at RCPT (smtpd resolves every recipient) and for the queue manager
  before delivery. Mail for ``hold.test`` is put on hold at RCPT, so it
  can be queued while memcached works and released into an outage.

memcached is killed on both sides, mail is sent, memcached is restarted
empty on the same port and re-seeded; then the client retries (4xx) or
the queue is flushed until the deferred mail is delivered.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mailflow.conftest import StartScenario
from tests.mailflow.harness import (
    SETTLE_TIMEOUT,
    CaseResult,
    Scenario,
    ScenarioSpec,
    Table,
    wait_until,
)

pytestmark = pytest.mark.integration

OUTAGE_SCENARIO = ScenarioSpec(
    "outage",
    [
        Table(
            "aliases",
            entries={"out1@alias.test": "out1.real@plain.test"},
            bridge={"address_search": ["full", "nodelim", "localpart", "@domain"]},
            memcached="aliases",
        ),
        Table(
            "transport",
            entries={
                "route.test": "smtp:[127.0.0.1]:<sink:routed>",
                "hold.test": "smtp:[127.0.0.1]:<sink:routed>",
            },
            bridge={"address_search": ["full", "nodelim", "domain", ".parent_domains"]},
            protocol="tcp",
            memcached="transport",
        ),
    ],
    {
        "virtual_alias_domains": "alias.test",
        "virtual_alias_maps": "<table:aliases>",
        "transport_maps": "<table:transport>",
        "smtpd_reject_unlisted_recipient": "no",
        "smtpd_recipient_restrictions": (
            "check_recipient_access"
            " inline:{ alias.test=reject_unlisted_recipient, hold.test=HOLD },"
            " permit_mynetworks, reject_unauth_destination"
        ),
    },
    sinks=("default", "routed"),
)


@pytest.fixture(scope="module")
def outage(mailflow: StartScenario) -> Iterator[Scenario]:
    with mailflow(OUTAGE_SCENARIO) as scenario:
        yield scenario


def test_alias_outage_is_a_temporary_smtp_reply(outage: Scenario) -> None:
    outage.stop_memcached("aliases")
    try:
        at_rcpt = outage.send(
            "outage-alias-rcpt", "outage-alias-rcpt@senders.test", ["out1@alias.test"]
        )
        outage.check(at_rcpt, rcpt={"out1@alias.test": 451}, delivered={})
        at_data = outage.send(
            "outage-alias-data", "outage-alias-data@senders.test", ["out2@plain.test"]
        )
        outage.check(at_data, rcpt={"out2@plain.test": 250}, data=451, delivered={})
    finally:
        outage.start_memcached("aliases")
    # The SMTP client's retry, once memcached is back.
    retry = outage.send(
        "outage-alias-retry",
        "outage-alias-retry@senders.test",
        ["out1@alias.test", "out2@plain.test"],
    )
    outage.check(retry, delivered={"default": ["out1.real@plain.test", "out2@plain.test"]})


def test_transport_outage_at_rcpt(outage: Scenario) -> None:
    """smtpd resolves the recipient at RCPT: the failed transport lookup is a 451."""
    outage.stop_memcached("transport")
    try:
        result = outage.send(
            "outage-transport-rcpt", "outage-rcpt@senders.test", ["now@route.test"]
        )
        outage.check(result, rcpt={"now@route.test": 451}, delivered={})
    finally:
        outage.start_memcached("transport")
    retry = outage.send("outage-transport-retry", "outage-retry@senders.test", ["now@route.test"])
    outage.check(retry, delivered={"routed": ["now@route.test"]})


def _flush_until_delivered(outage: Scenario, result: CaseResult) -> CaseResult:
    """Flush both queues until neither holds the case's mail and both delivered it."""
    current = [result]

    def delivered_everywhere() -> bool:
        for side in outage.sides.values():
            side.postfix.flush()
        current[0] = outage.recheck(result)
        return all(
            not side.queued and side.delivered for side in (current[0].native, current[0].bridge)
        )

    # The queue manager may try again only after its backoff: repeat the flush.
    wait_until(
        delivered_everywhere,
        timeout=SETTLE_TIMEOUT + 30,
        what=f"{result.case}: deferred mail delivered after memcached came back",
        details=outage.diagnostics,
        interval=0.5,
    )
    return current[0]


def test_transport_outage_defers_queued_mail(outage: Scenario) -> None:
    """Mail queued before the outage is deferred by the queue manager, then delivered."""
    sender = "outage-queued@senders.test"
    try:
        held = outage.send("outage-transport-queued", sender, ["late@hold.test"])
        outage.check(held, data=250, delivered={}, queued=["late@hold.test"])
        outage.stop_memcached("transport")
        try:
            # postsuper -H moves the mail to the deferred queue untried;
            # the flush makes the queue manager try it now.
            for side in outage.sides.values():
                side.postfix.release_held()
                side.postfix.flush()
            outage.wait_deferred("released mail")
            deferred = outage.recheck(held)
            outage.check(deferred, delivered={}, queued=["late@hold.test"])
        finally:
            outage.start_memcached("transport")
        # The queue manager's resolve client keeps its last answer, the
        # failure included, for 30 s (resolve_clnt.c, one-entry cache keyed
        # by sender and address). Other mail replaces it, as on any server
        # with traffic; without it the flushes below succeed after 30 s.
        other = outage.send("outage-transport-other", "outage-other@senders.test", ["x@route.test"])
        outage.check(other, delivered={"routed": ["x@route.test"]})
        outage.check(_flush_until_delivered(outage, held), delivered={"routed": ["late@hold.test"]})
    finally:
        for side in outage.sides.values():
            side.postfix.purge()
