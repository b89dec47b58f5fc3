"""Table features end to end, asked through Postfix's own ``postmap -q``.

Theory of operation
-------------------
Each feature is checked the way Postfix will meet it: a real bridge in
front of a real memcached, queried with ``postmap -q KEY socketmap:...``
(or ``tcp:...``), and memcached seeded or inspected directly with the
harness's text-protocol client.

* ``key_digest`` (spec 12.6) and ``address_search`` (G-3) share one bridge
  for the module (:func:`features`); every test starts from an empty
  memcached. Postfix 3.7 has no ``key_digest``, so only the bridge can be
  asked here; the expected memcache keys are the spec's literal vectors,
  not recomputed, so the test does not share the code's assumptions.
* Chained lookup servers (``backup`` and ``domain`` naming a
  ``socketmap:`` or ``tcp:`` table) need two bridges: A, the one Postfix
  asks, and B, the upstream A asks. Each test gets its own pair
  (:func:`chain`), because stopping B is part of what is tested.
* The configuration checks run ``postfix-bridge check`` and read its exit
  status and messages (README "Command line").

``postmap`` exits 1 both for "not found" and for errors, so errors are
told apart by ``fatal:`` on stderr (PM-1); :attr:`PostmapResult.outcome`
does that. Every fatal ``postmap`` exit costs a 1 s sleep (PM-1), which is
why the failure checks are few and grouped.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import NextPort, StartBridge
from tests.integration.harness import (
    Bridge,
    Memcached,
    age_file,
    closed_port,
    free_port,
    postmap_query,
    run_bridge,
    run_memcached,
)

#: The repository's example configuration, checked as shipped.
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

#: sysexits(3) EX_CONFIG: what ``check`` returns for a bad configuration.
EXIT_CONFIG = 78

#: Upper bound for a bridge to exit after SIGTERM; it has nothing to finish.
STOP_TIMEOUT = 30.0

#: Long enough that ``virt:<this>@example.com`` exceeds memcached's 250-byte
#: key limit, so memcached answers CLIENT_ERROR (MC-12): a memcache error
#: on the first address form while a later form would be found.
OVERLONG_LOCALPART = "x" * 260


def _bridge_command(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``postfix-bridge ARGS`` from outside the repository."""
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )


def _socketmap_listener(port: int) -> str:
    return f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'


def _stop(bridge: Bridge) -> None:
    """Stop a bridge now; the fixture that started it no longer has to."""
    bridge.signal(signal.SIGTERM)
    assert bridge.process.wait(timeout=STOP_TIMEOUT) == 0


# ---------------------------------------------------------------- one bridge for the module


@dataclass(frozen=True)
class Features:
    """The module's bridge: its memcached and the socketmap table prefix."""

    memcached: Memcached
    port: int

    def table(self, name: str) -> str:
        return f"socketmap:inet:127.0.0.1:{self.port}:{name}"


#: Spec 12.6 key_digest vectors: table settings, the key Postfix is asked
#: for, and the memcache key the spec says it must become. Each row has its
#: own table so that the value found also proves which table answered.
DIGEST_VECTORS = {
    "sha256": (
        'key_digest = "sha256"',
        "User@Example.com",
        b"b4c9a289323b21a01c3e940f150eb9b8c542587f1abfd8f0e1cc1ffc5e475514",
    ),
    "sha1": (
        'key_digest = "sha1"',
        "User@Example.com",
        b"63a710569261a24b3766275b7000ce8d7b32e2f7",
    ),
    "md5": (
        'key_digest = "md5"',
        "User@Example.com",
        b"b58996c504c5638798eb6b511e6f49af",
    ),
    # The worked example under the table: folded, then key_format, then digest.
    "pfx_sha256": (
        'key_format = "pfx:%s"\nkey_digest = "sha256"',
        "User@Example.com",
        b"fc19aea3f0fb237f3a37b5e6d8f56c96a20ee0e957829b0ed38ded21294d0907",
    ),
    # MC-13: validation follows the digest, so a key with a space is usable.
    "space_sha256": (
        'key_digest = "sha256"',
        "a b",
        b"c8687a08aa5d6ed2044328fa6a697ab8e96dc34291e8c2034ae8c38e6fcc6d65",
    ),
    # MC-13, last paragraph: an empty template is the digest of b"".
    "empty_sha256": (
        'key_format = ""\nkey_digest = "sha256"',
        "anything",
        b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ),
    "sha512": (
        'key_digest = "sha512"',
        "k",
        b"2af8a9104b3f64ed640d8c7e298d2d480f03a3610cbc2b33474321ec59024a48"
        b"592ea8545e41e09d5d1108759df48ede0054f225df39d4f0f312450e0aa9dd25",
    ),
}


def _features_config(memcache: str, port: int) -> str:
    digest_tables = "".join(
        f'\n[tables.{name}]\nmemcache = "{memcache}"\n{settings}\n'
        for name, (settings, _, _) in DIGEST_VECTORS.items()
    )
    return f"""{_socketmap_listener(port)}
{digest_tables}
[tables.plain]
memcache = "{memcache}"

[tables.virtual]
memcache = "{memcache}"
key_format = "virt:%s"
address_search = ["full", "nodelim", "localpart", "@domain"]
local_domains = ["example.com"]
max_try = 1

[tables.virtual_down]
memcache = "inet:127.0.0.1:{closed_port()}"
key_format = "virt:%s"
address_search = ["full", "nodelim", "localpart", "@domain"]
local_domains = ["example.com"]

[tables.access]
memcache = "{memcache}"
key_format = "acc:%s"
address_search = ["full", "nodelim", "domain", "localpart@"]

[tables.access_parents]
memcache = "{memcache}"
key_format = "acc:%s"
address_search = ["full", "nodelim", "domain", "parent_domains", "localpart@", "networks"]

[tables.access_dot_parents]
memcache = "{memcache}"
key_format = "acc:%s"
address_search = ["full", "nodelim", "domain", ".parent_domains", "localpart@", "networks"]

[tables.virtual_no_propagation]
memcache = "{memcache}"
key_format = "virt:%s"
address_search = ["full", "nodelim", "localpart", "@domain"]
propagate_unmatched_extensions = []
"""


@pytest.fixture(scope="module")
def features_running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Features]:
    """One memcached and one bridge serving every digest and address-search table.

    Module-scoped because stopping memcached costs most of a second; the
    tables are read-only from the bridge's side, so sharing is safe.
    """
    config = tmp_path_factory.mktemp("features") / "bridge.toml"
    port = free_port()
    with run_memcached() as memcached:
        config.write_text(_features_config(memcached.endpoint, port))
        with run_bridge(config) as bridge:
            yield Features(memcached, port)
            assert bridge.process.poll() is None, "".join(bridge.log)


@pytest.fixture
def features(features_running: Features) -> Features:
    """The module's bridge with an empty memcached."""
    features_running.memcached.flush()
    return features_running


# ---------------------------------------------------------------- key_digest


@pytest.mark.parametrize(
    ("table", "key", "memcache_key"),
    [(name, key, mc_key) for name, (_, key, mc_key) in DIGEST_VECTORS.items()],
    ids=list(DIGEST_VECTORS),
)
def test_key_digest_finds_the_spec_vector_key(
    features: Features, table: str, key: str, memcache_key: bytes
) -> None:
    # Spec 12.6: the bridge must ask memcache for exactly this key.
    features.memcached.set(memcache_key, f"value-of-{table}".encode())
    assert postmap_query(key, features.table(table)).outcome == f"found:value-of-{table}"


def test_key_with_space_is_skipped_without_a_digest(features: Features) -> None:
    # The counterpart of the space_sha256 vector: MC-13 step 7 skips it.
    features.memcached.set(DIGEST_VECTORS["space_sha256"][2], b"digest-only")
    result = postmap_query("a b", features.table("plain"))
    assert result.outcome == "notfound", result


# ---------------------------------------------------------------- address_search


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("user@example.com", "found:user-exact"),
        # nodelim; the unmatched extension is propagated (AS-6)
        ("user+ext@example.com", "found:user-exact+ext"),
        ("User+Ext@Example.COM", "found:user-exact+Ext"),  # folded first
        ("nobody@example.com", "found:catchall"),  # @domain
        ("other@example.com", "found:local-other"),  # localpart, local domain
        ("other@elsewhere.net", "notfound"),  # localpart only for local domains
    ],
)
def test_address_search_virtual_order(features: Features, key: str, expected: str) -> None:
    # G-3: the partial forms Postfix would ask a fixed virtual(5) table for.
    features.memcached.set(b"virt:@example.com", b"catchall")
    features.memcached.set(b"virt:user@example.com", b"user-exact")
    features.memcached.set(b"virt:other", b"local-other")
    assert postmap_query(key, features.table("virtual")).outcome == expected


@pytest.mark.parametrize(
    ("table", "key", "expected"),
    [
        # Found through the full key: answered as stored; Postfix itself
        # puts the local part in front of "@b.test".
        ("virtual", "moved@example.com", "found:@b.test"),
        ("virtual", "moved+tag@example.com", "found:moved+tag@b.test"),
        ("virtual_no_propagation", "moved+tag@example.com", "found:moved@b.test"),
        ("virtual", "list+x@example.com", "found:a+x@plain.test, b+x@plain.test"),
        ("virtual_no_propagation", "list+x@example.com", "found:a@plain.test, b@plain.test"),
        # a hit through the full key or @domain carries no unmatched extension
        ("virtual", "exact+x@example.com", "found:exact@plain.test"),
        ("virtual", "nobody+x@example.com", "found:catchall"),
    ],
)
def test_address_mapping_finishes_hits_without_the_extension(
    features: Features, table: str, key: str, expected: str
) -> None:
    # AS-6: what mail_addr_map.c makes of a hit for user@domain.
    features.memcached.set(b"virt:moved@example.com", b"@b.test")
    features.memcached.set(b"virt:list@example.com", b"a@plain.test, b@plain.test")
    features.memcached.set(b"virt:exact+x@example.com", b"exact@plain.test")
    features.memcached.set(b"virt:@example.com", b"catchall")
    assert postmap_query(key, features.table(table)).outcome == expected


@pytest.mark.parametrize(
    ("table", "key", "expected"),
    [
        ("access_parents", "user@mail.sub.example.com", "found:REJECT parent"),
        ("access_parents", "mail.sub.example.com", "found:REJECT parent"),  # a host name
        ("access_dot_parents", "user@mail.sub.example.com", "found:REJECT dot parent"),
        ("access_dot_parents", "mail.sub.example.com", "found:REJECT dot parent"),
        ("access_parents", "192.0.2.7", "found:REJECT network"),
        ("access_parents", "2001:db8::7", "found:REJECT v6 network"),
        ("access", "user@mail.sub.example.com", "notfound"),  # no parent forms listed
        ("access", "192.0.2.7", "notfound"),
    ],
)
def test_address_search_access_parents_and_networks(
    features: Features, table: str, key: str, expected: str
) -> None:
    # AS-3, AS-4: smtpd_check.c's parent domains and parent networks.
    features.memcached.set(b"acc:sub.example.com", b"REJECT parent")
    features.memcached.set(b"acc:.sub.example.com", b"REJECT dot parent")
    features.memcached.set(b"acc:192.0.2", b"REJECT network")
    features.memcached.set(b"acc:2001:db8", b"REJECT v6 network")
    assert postmap_query(key, features.table(table)).outcome == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("user+x@example.com", "found:OK user"),  # nodelim before domain
        ("someone@example.com", "found:REJECT domain"),  # domain
        ("postmaster@example.com", "found:REJECT domain"),  # domain before localpart@
        ("postmaster@elsewhere.net", "found:OK postmaster"),  # localpart@
        ("someone@elsewhere.net", "notfound"),
    ],
)
def test_address_search_access_map_order(features: Features, key: str, expected: str) -> None:
    # G-3: access(5) order, full -> nodelim -> domain -> localpart@.
    features.memcached.set(b"acc:user@example.com", b"OK user")
    features.memcached.set(b"acc:example.com", b"REJECT domain")
    features.memcached.set(b"acc:postmaster@", b"OK postmaster")
    assert postmap_query(key, features.table("access")).outcome == expected


def test_address_search_stops_at_the_first_memcache_error(features: Features) -> None:
    # The full key is over memcached's key limit (CLIENT_ERROR, MC-12); the
    # @domain form would be found, but an error must end the search as
    # TEMP, never fall through to another answer.
    features.memcached.set(b"virt:@example.com", b"catchall")
    assert postmap_query("nobody@example.com", features.table("virtual")).outcome == (
        "found:catchall"
    )
    overlong = postmap_query(f"{OVERLONG_LOCALPART}@example.com", features.table("virtual"))
    assert overlong.outcome == "error", overlong
    down = postmap_query("nobody@example.com", features.table("virtual_down"))
    assert down.outcome == "error", down


# ---------------------------------------------------------------- chained lookup servers


@dataclass(frozen=True)
class Chain:
    """Bridge A (asked by postmap) chained to bridge B, each with its own memcached."""

    memcached_a: Memcached
    memcached_b: Memcached
    bridge_b: Bridge
    port_a: int

    def table(self, name: str) -> str:
        return f"socketmap:inet:127.0.0.1:{self.port_a}:{name}"


#: flags and ttl of A's refills, so a refill is told apart from a seed.
REFILL_FLAGS = 5
REFILL_TTL = 600


@pytest.fixture
def chain(
    memcached: Memcached, start_bridge: StartBridge, ports: NextPort, tmp_path: Path
) -> Iterator[Chain]:
    port_a, port_b_socketmap, port_b_tcp = ports(), ports(), ports()
    with run_memcached() as memcached_b:
        config_b = tmp_path / "b.toml"
        config_b.write_text(f"""{_socketmap_listener(port_b_socketmap)}
[[listen]]
endpoint = "inet:127.0.0.1:{port_b_tcp}"
protocol = "tcp"
table = "upstream"

[tables.upstream]
memcache = "{memcached_b.endpoint}"
key_format = "up:%s"

[tables.domains]
memcache = "{memcached_b.endpoint}"
key_format = "dom:%s"
""")
        config_a = tmp_path / "a.toml"
        config_a.write_text(f"""{_socketmap_listener(port_a)}
[tables.viasocketmap]
memcache = "{memcached.endpoint}"
key_format = "a:%s"
backup = "socketmap:inet:127.0.0.1:{port_b_socketmap}:upstream"
flags = {REFILL_FLAGS}
ttl = {REFILL_TTL}

[tables.viatcp]
memcache = "{memcached.endpoint}"
key_format = "a:%s"
backup = "tcp:127.0.0.1:{port_b_tcp}"
flags = {REFILL_FLAGS}
ttl = {REFILL_TTL}

[tables.filtered]
memcache = "{memcached.endpoint}"
key_format = "f:%s"
domain = "socketmap:inet:127.0.0.1:{port_b_socketmap}:domains"
""")
        bridge_b = start_bridge(config_b)
        start_bridge(config_a)
        yield Chain(memcached, memcached_b, bridge_b, port_a)


@pytest.mark.parametrize("table", ["viasocketmap", "viatcp"])
def test_chained_backup_answers_refills_and_fails_temporarily(chain: Chain, table: str) -> None:
    value = "50% off, Grüße"  # needs %-quoting over tcp, UTF-8 on both
    chain.memcached_b.set(b"up:user@example.com", value.encode())

    # MC-16: A's memcache misses, B answers, A refills its memcache.
    assert postmap_query("User@Example.com", chain.table(table)).outcome == f"found:{value}"
    assert chain.memcached_a.get(b"a:user@example.com") == (REFILL_FLAGS, value.encode())
    # A miss on both sides is "not found", not an error.
    assert postmap_query("nobody@example.com", chain.table(table)).outcome == "notfound"

    # Now A must answer from its own memcache, without B's changed value.
    chain.memcached_b.set(b"up:user@example.com", b"changed-upstream")
    assert postmap_query("user@example.com", chain.table(table)).outcome == f"found:{value}"

    _stop(chain.bridge_b)
    # A hit in A's memcache never needs B...
    assert postmap_query("user@example.com", chain.table(table)).outcome == f"found:{value}"
    # ...but a miss with B gone is TEMP: never "not found" (README "Reply codes").
    down = postmap_query("nobody@example.com", chain.table(table))
    assert down.outcome == "error", down


def test_domain_filter_with_a_chained_socketmap_table(chain: Chain) -> None:
    chain.memcached_b.set(b"dom:example.com", b"yes")
    chain.memcached_a.set(b"f:user@example.com", b"filtered-hit")
    chain.memcached_a.set(b"f:user@other.org", b"must-not-be-read")
    chain.memcached_a.set(b"f:user", b"must-not-be-read")

    # DOM-6: the folded domain is asked of the table; a hit makes the key eligible.
    assert postmap_query("User@EXAMPLE.com", chain.table("filtered")).outcome == (
        "found:filtered-hit"
    )
    # Not in the table: skipped, so memcache is not read (MC-14).
    assert postmap_query("user@other.org", chain.table("filtered")).outcome == "notfound"
    # DOM-1: no '@', skipped before any table is asked.
    assert postmap_query("user", chain.table("filtered")).outcome == "notfound"

    _stop(chain.bridge_b)
    # DOM-6: a failing domain table is that error, never a skip.
    down = postmap_query("user@example.com", chain.table("filtered"))
    assert down.outcome == "error", down
    assert postmap_query("user", chain.table("filtered")).outcome == "notfound"


# ---------------------------------------------------------------- configuration checks


def test_check_accepts_the_example_configuration() -> None:
    completed = _bridge_command("check", "--config", str(EXAMPLES / "bridge.toml"))
    assert completed.returncode == 0, completed
    tables = [line for line in completed.stdout.splitlines() if line.startswith("table ")]
    assert [line.split(":")[0] for line in tables] == ["table aliases", "table transport"]
    # The transport table comes from memcache-transport.cf through config =.
    assert "key_format 'transport:%s'" in tables[1], tables
    assert "backup texthash:transport" in tables[1], tables


def _table_config(tmp_path: Path, setting: str, *, via_cf: bool) -> tuple[Path, Path]:
    """A configuration whose table ``t`` has ``setting``, in the TOML or in a .cf file.

    Returns:
      The TOML file and the file that holds the setting.
    """
    toml = tmp_path / "bridge.toml"
    holder = toml
    table = f"[tables.t]\n{setting}\n"
    if via_cf:
        holder = tmp_path / "t.cf"
        holder.write_text(setting.replace('"', "") + "\n")
        age_file(holder)
        table = f'[tables.t]\nconfig = "{holder}"\n'
    toml.write_text(_socketmap_listener(free_port()) + table)
    return toml, holder


@pytest.mark.parametrize("via_cf", [False, True], ids=["toml", "cf"])
def test_check_refuses_an_unknown_digest(tmp_path: Path, via_cf: bool) -> None:
    # Spec 12.6 last row: the table is unusable, so the bridge does not start.
    toml, holder = _table_config(tmp_path, 'key_digest = "nosuchdigest"', via_cf=via_cf)
    completed = _bridge_command("check", "--config", str(toml))
    assert completed.returncode == EXIT_CONFIG, completed
    assert f"{holder}" in completed.stderr
    assert "table t: key_digest:" in completed.stderr
    assert "nosuchdigest" in completed.stderr


@pytest.mark.parametrize("via_cf", [False, True], ids=["toml", "cf"])
def test_check_refuses_an_unsupported_backup_type(tmp_path: Path, via_cf: bool) -> None:
    toml, holder = _table_config(tmp_path, 'backup = "hash:/etc/aliases"', via_cf=via_cf)
    completed = _bridge_command("check", "--config", str(toml))
    assert completed.returncode == EXIT_CONFIG, completed
    assert f"{holder}" in completed.stderr
    assert "table t: backup:" in completed.stderr
    assert "'hash'" in completed.stderr


def test_hot_cache_answers_within_ttl_and_never_keeps_failures(
    memcached: Memcached, tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> None:
    port = ports()
    config = tmp_path / "hot.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'
        f'[tables.hot]\nmemcache = "{memcached.endpoint}"\nhot_cache_ttl = 1\n'
    )
    start_bridge(config)
    table = f"socketmap:inet:127.0.0.1:{port}:hot"
    memcached.set(b"k", b"old")
    assert postmap_query("k", table).outcome == "found:old"
    memcached.set(b"k", b"new")
    # Within the ttl the remembered answer stands (the documented staleness) ...
    assert postmap_query("k", table).outcome == "found:old"
    # ... and after it memcache is asked again.
    deadline = time.monotonic() + 10
    while postmap_query("k", table).outcome != "found:new":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_hot_cache_never_keeps_a_failure(
    tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> None:
    port, mc_port = ports(), ports()
    config = tmp_path / "hot.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'
        f'[tables.hot]\nmemcache = "inet:127.0.0.1:{mc_port}"\nhot_cache_ttl = 600\n'
    )
    start_bridge(config)
    table = f"socketmap:inet:127.0.0.1:{port}:hot"
    assert postmap_query("k", table).outcome == "error"  # memcache down
    with run_memcached(mc_port) as memcached:
        memcached.set(b"k", b"v")
        assert postmap_query("k", table).outcome == "found:v"
