"""Differential test: Postfix's own memcache client vs the bridge.

For every scenario, the same memcache_table(5) file is used twice:

* natively, ``postmap -q KEY memcache:FILE.cf`` against memcached A;
* through the bridge, ``postmap -q KEY socketmap:inet:...:NAME`` where the
  bridge reads FILE.cf via ``config =`` and only ``memcache`` is
  overridden to point at memcached B.

A and B are seeded identically before each scenario. Each lookup must give
the same answer (found + value, not found, error), and afterwards both
memcacheds must hold the same items (values and flags), which checks the
refill ``set`` as well.

The installed Postfix is 3.7; scenarios avoid the few places where it
differs from the 3.12 spec (key_digest, control bytes in keys, domain file
continuation lines). Those are covered by unit tests and by
tests/integration/test_spec_only.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bridge.keys import KeyTemplate
from tests.integration.conftest import NextPort
from tests.integration.harness import (
    Bridge,
    Memcached,
    age_file,
    closed_port,
    postmap_query,
    run_bridge,
    run_memcached,
)

#: Keys that exercise every key_format expansion and its suppression rules
#: (spec 12.7), case folding (12.13) and skipped keys (MC-13).
ADDRESS_CORPUS = (
    "user@example.com",
    "User@Example.COM",
    "user",
    "@example.com",
    "user@",
    "@",
    "a@b@c.d",
    "user@mail.example.com",
    "user@example.com.",
    "user@example..com",
    "user@.example.com",
    "a@x..y.z",
    "example.com",
    "a@1.2.3.4.5.6.7.8.9",
    "a+b@c",
    "a@b.",
    "user@com",
    "Straße@example.com",
    "CAFÉ@Example.com",
    "k",
    "",
    "a b@example.com",
)

TEMPLATES = (
    "%s",
    "pfx:%s",
    "U=%u",
    "D=%d",
    "%u/%d",
    "%1",
    "%2.%1",
    "%3",
    "%9",
    "%%%s%%",
    "%S",
    "%U",
    "%D",
    "x",
    "%d:%u",
    "%1%2",
    "a b %s",
)


@dataclass
class Scenario:
    """One memcache_table(5) file and the keys asked of it."""

    name: str
    cf: str
    keys: Sequence[str]
    #: memcache items present before the lookups (key -> value)
    seed: dict[bytes, bytes] = field(default_factory=dict)
    #: extra files next to the .cf (name -> content)
    files: dict[str, str] = field(default_factory=dict)
    #: the memcache server is down for both clients
    memcache_down: bool = False


def _fold(key: str) -> bytes:
    return key.casefold().encode("utf-8")


def _template_scenarios() -> Iterator[Scenario]:
    for number, template in enumerate(TEMPLATES):
        parsed = KeyTemplate.parse(template)
        seed: dict[bytes, bytes] = {}
        for index, key in enumerate(ADDRESS_CORPUS):
            expanded = parsed.expand(_fold(key)) if key else None
            if expanded and b" " not in expanded:
                seed[expanded] = f"value-{index}".encode()
        # Also items under unfolded and unexpanded keys: a client that
        # forgot to fold or expand would find these and differ.
        for key in ("User@Example.COM", "user@example.com"):
            seed.setdefault(key.encode(), b"raw-" + key.encode())
        yield Scenario(f"tpl{number}", f"key_format = {template}\n", ADDRESS_CORPUS, seed)
    yield Scenario("tplempty", "key_format =\n", ADDRESS_CORPUS[:6])


DOMAIN_KEYS = (
    "user@example.com",
    "user@EXAMPLE.COM",
    "user@sub.example.com",
    "user@other.com",
    "user",
    "@example.com",
    "user@",
    "",
    "user@x.example.net",
    "user@Good.example.net",
    "user@bad.example.net",
    "user@sub.example.org",
    "user@tbl.example.com",
    "user@TBL.example.com",
    "a@b@example.com",
    "user@bad.com",
    "user@Upper.example.com",
)

DOMAIN_FILES = {
    # DOM-5 file; one item list per physical line (3.7 and 3.12 agree on this form).
    "domains": "sub.example.org\n# a comment line\n!bad.example.net, good.example.net\n",
    "tbl": "tbl.example.com OK\nUpper.Example.com OK\n",
}


def _domain_scenarios(directory: Path) -> Iterator[Scenario]:
    settings = (
        f"example.com, {directory}/domains texthash:{directory}/tbl",
        "!example.com",
        "!!example.com",
        "!bad.com, bad.com",
        ".example.com",
        "{example.com}",
        "example.com #x other.com",
        f"texthash:{directory}/tbl",
        "inline:{tbl.example.com=x}",
        f"!{directory}/domains, example.com, bad.example.net",
    )
    seed = {_fold(key): f"value-{i}".encode() for i, key in enumerate(DOMAIN_KEYS) if key}
    for number, setting in enumerate(settings):
        yield Scenario(f"dom{number}", f"domain = {setting}\n", DOMAIN_KEYS, seed, DOMAIN_FILES)


BACKUP_FILE = (
    "bk1 backupvalue\nbk2 other value\nBigKey 0123456789abcdef\nuser@example.com aliased\n"
)
BACKUP_KEYS = ("BK1", "bk2", "zz", "bigkey", "mc", "User@Example.com", "nobody@example.com")


def _backup_scenarios(directory: Path) -> Iterator[Scenario]:
    backup = f"backup = texthash:{directory}/backup\n"
    variants = (
        "ttl = 100\nflags = 7\nkey_format = p:%s\n",
        "",
        "data_size_limit = 5\n",
        "key_format = %d\n",
        "ttl = 2592001\n",
        "ttl = -5\nflags = -3\n",
        "domain = example.com\n",
        "key_format = U=%u\nttl = 0\n",
    )
    for number, variant in enumerate(variants):
        yield Scenario(
            f"bak{number}",
            backup + variant,
            BACKUP_KEYS,
            {b"mc": b"from-memcache", b"p:mc": b"from-memcache-p"},
            {"backup": BACKUP_FILE},
        )
    # memcache down: the backup answers hits and masks errors on misses (MC-16).
    yield Scenario("bakdown", backup, BACKUP_KEYS[:4], {}, {"backup": BACKUP_FILE}, True)
    yield Scenario("down", "key_format = p:%s\n", ("k", "user@example.com", ""), {}, {}, True)


@dataclass
class Pair:
    native: Memcached
    bridged: Memcached
    bridge: Bridge | None = None


def _seed(server: Memcached, items: dict[bytes, bytes]) -> None:
    server.flush()
    for key, value in items.items():
        server.set(key, value)


def _compare_items(scenario: Scenario, native: Memcached, bridged: Memcached) -> list[str]:
    """Both memcacheds hold the same items (value and flags) after the lookups.

    memcached's key listing (lru_crawler metadump) can miss items, so it
    only nominates keys: every seed key and every key either side lists is
    read back with ``get`` from both.
    """
    keys = set(scenario.seed) | set(native.items()) | set(bridged.items())
    differences = []
    for key in sorted(keys):
        theirs, ours = native.get(key), bridged.get(key)
        if theirs != ours:
            differences.append(
                f"{scenario.name}: memcache item {key!r}: postfix {theirs!r} bridge {ours!r}"
            )
    return differences


def test_postfix_and_bridge_agree(tmp_path: Path, ports: NextPort) -> None:
    directory = tmp_path
    for name, content in {**DOMAIN_FILES, "backup": BACKUP_FILE}.items():
        (directory / name).write_text(content)
    scenarios = [
        *_template_scenarios(),
        *_domain_scenarios(directory),
        *_backup_scenarios(directory),
    ]
    down_port = closed_port()
    sm_port = ports()

    with run_memcached() as native, run_memcached() as bridged:
        toml = [f'[[listen]]\nendpoint = "inet:127.0.0.1:{sm_port}"\nprotocol = "socketmap"\n']
        for scenario in scenarios:
            cf = directory / f"{scenario.name}.cf"
            native_port = down_port if scenario.memcache_down else native.port
            bridge_port = down_port if scenario.memcache_down else bridged.port
            cf.write_text(f"memcache = inet:127.0.0.1:{native_port}\n{scenario.cf}")
            age_file(cf)
            toml.append(
                f'[tables.{scenario.name}]\nconfig = "{cf}"\n'
                f'memcache = "inet:127.0.0.1:{bridge_port}"\n'
            )
        config = directory / "bridge.toml"
        config.write_text("\n".join(toml))

        compared = 0
        mismatches: list[str] = []
        with run_bridge(config), ThreadPoolExecutor(max_workers=1) as pool:
            for scenario in scenarios:
                _seed(native, scenario.seed)
                _seed(bridged, scenario.seed)
                cf_table = f"memcache:{directory}/{scenario.name}.cf"
                sm_table = f"socketmap:inet:127.0.0.1:{sm_port}:{scenario.name}"
                for key in scenario.keys:
                    # One key at a time (a refill can answer a later key, as
                    # in Postfix), each asked of both sides at once.
                    native_answer = pool.submit(postmap_query, key, cf_table)
                    ours = postmap_query(key, sm_table)
                    theirs = native_answer.result()
                    compared += 1
                    if ours.outcome != theirs.outcome:
                        mismatches.append(
                            f"{scenario.name} {scenario.cf.strip()!r} key {key!r}: "
                            f"postfix {theirs.outcome!r} bridge {ours.outcome!r}"
                        )
                if not scenario.memcache_down:
                    mismatches.extend(_compare_items(scenario, native, bridged))

    assert not mismatches, f"{len(mismatches)} of {compared} differ:\n" + "\n".join(mismatches)
    # The bar: at least 300 compared lookups.
    assert compared >= 300, compared
    kinds = {s.name[:3] for s in scenarios}
    assert {"tpl", "dom", "bak", "dow"} <= kinds


def test_every_expansion_is_in_the_corpus() -> None:
    # Guards the corpus: each % form of KF-1 appears in some template.
    joined = "".join(TEMPLATES)
    for form in ("%%", "%s", "%S", "%u", "%U", "%d", "%D", "%1", "%2", "%3", "%9"):
        assert form in joined
