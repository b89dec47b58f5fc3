"""Mail-flow tests: real mail through private Postfix 3.7 instances, native vs bridge.

Each scenario runs two Postfix instances side by side (see harness.py):
NATIVE with ``memcache:/path/NAME.cf`` tables, BRIDGE with
``socketmap:``/``tcp:``/``proxy:socketmap:`` tables served by the bridge
from the same .cf files, each side with its own memcached, both
delivering to the same in-process SMTP sinks. Every case sends the same
mail to both and requires the same SMTP replies, the same envelope
recipients at the same sinks (no bounce unless expected), the same queue
left over, and the same memcache items afterwards. Each run prints the
table below again at the end (``pytest_terminal_summary``).

Snapshot, 2026-11-30, bridge at e2efeb4, Postfix
3.7.11: every case the same on both sides (47 tests, ~15 s on 2 cores).
"dflt", "fast", "slow", "routed" are sinks; the sink's recipient is the
envelope recipient it received; reply texts are Postfix's own.

=================  ====================================  =========================================
case               mail                                  native memcache: = bridge
=================  ====================================  =========================================
alias-plain        alice@alias.test                      dflt alice.real@plain.test
alias-ext          bob+news@alias.test                   dflt bob.real+news@plain.test
alias-upper        ALICE@Alias.TEST                      dflt alice.real@plain.test
alias-upper-ext    Bob+NEWS@ALIAS.test                   dflt bob.real+NEWS@plain.test
alias-list         team@alias.test                       dflt a@plain.test, b@plain.test
alias-list-ext     team+x@alias.test                     dflt a+x@plain.test, b+x@plain.test
alias-catch        anyone+y@catch.test (@catch.test)     dflt catchall@plain.test
alias-otherdomain  moved@, moved+tag@alias.test (@b.test) dflt moved@b.test, moved+tag@b.test
alias-rename       carol+z@rename.test (@rename->@b)     dflt carol+z@b.test
alias-chain        chain@ -> alice@ -> alice.real@       dflt alice.real@plain.test
alias-unknown      nobody@, alice@alias.test             RCPT nobody 550 5.1.1 User unknown in
                                                         virtual alias table; dflt alice.real@
alias-dangling     dangling@ -> nobody@alias.test        bounce to the sender; dflt alice.real@
alias-refill       refill@ (backup only)                 dflt refill.real@; memcache item set
alias-refill-ext   refillx+tag@ (backup only)            dflt refillx.real+tag@; item refillx@ set
noprop-ext         bob+news@ (propagation off)           dflt bob.real@plain.test
noprop-otherdomain moved+tag@alias.test                  dflt moved@b.test
noprop-list        team+x@alias.test                     dflt a@plain.test, b@plain.test
noprop-rename      carol+z@rename.test                   dflt carol+z@b.test
proxy-plain        alice@alias, someone@catch (proxy:)   dflt alice.real@, catchall@plain.test
proxy-ext          bob+list@alias.test (proxy:)          dflt bob.real+list@plain.test
proxy-unknown      ghost@alias.test (proxy:)             RCPT 550 5.1.1 User unknown ...
transport-address  fast@, slow@, other@route.test (tcp)  fast, slow, dflt
transport-domain   x@fast, Y@FAST, y@a.sub, z@sub,       fast, fast, slow (.sub.test), dflt,
                   w@deep.parent.test                    dflt (parent.test is no .parent.test)
transport-vip      vip@, vip+x@, notvip@fast.test        slow, slow, fast
access-rcpt        blocked@, Blocked+tag@, x@sub.rcpt-   RCPT 554 5.7.1 ... Recipient address
                   parent, abuse@any, y@closed.test      rejected: TEXT (each); ok@dest and
                   ok@dest, boss@vip (OK), other@vip     boss@vip to dflt; other@vip 554 (inline)
access-sender-*    spammer@, spammer+x@, user@sub.       RCPT 554 5.7.1 <SENDER>: Sender address
                   example.com, user@example.com, bulk@  rejected: TEXT; friend@friends.test
                   friend@friends.test (OK), stranger@   (OK) delivered; stranger@ 554 (inline)
access-client-*    from 127.0.0.1, 127.0.0.77 (127.0.0)  RCPT 554 <unknown[IP]>: Client host
                   127.2.0.9 (host), 127.2.0.10          rejected: TEXT; 127.2.0.10 delivered
access-helo-*      bad.helo.test, BAD.Helo.Test,         RCPT 554 <HELO>: Helo command rejected:
                   mx.helo-parent.test, good.helo.test   TEXT; good.helo.test delivered
nodelay-client     from 127.0.0.5, smtpd_delay_reject=no CONNECT 554 Client host rejected
nodelay-helo       EHLO x.helo-parent.test               EHLO 554; MAIL 503; RCPT 503
nodelay-sender     MAIL FROM user@deep.sub.example.com   MAIL 554 Sender address rejected
nodelay-rcpt       abuse@x.test, fine@dest.test          RCPT 554 abuse localpart; dflt fine@
outage-alias-rcpt  out1@alias.test, memcached down       RCPT 451 4.3.0 Temporary lookup failure
outage-alias-data  out2@plain.test, memcached down       DATA 451 4.3.0 Error: queue file write
                                                         error (cleanup's lookup)
outage-alias-retry both again, memcached back            dflt out1.real@, out2@plain.test
outage-transport-  now@route.test, memcached down        RCPT 451 4.3.0 Temporary lookup failure;
rcpt / -retry                                            then routed now@route.test
outage-transport-  late@hold.test: held, released into   deferred "address resolver failure",
queued             the outage, memcached back, flush     no bounce; then routed late@hold.test
=================  ====================================  =========================================

With the bridge before address search was finished (68184dd), the same
suite gives 26 errors (the bridge refuses ``parent_domains``,
``.parent_domains``, ``networks`` and ``propagate_unmatched_extensions``
at start) and 5 failures (alias-ext, alias-upper-ext, alias-list-ext,
alias-refill-ext, proxy-ext: the extension is not propagated).
"""
