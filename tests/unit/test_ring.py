"""Tests for the ketama ring (bridge/memcache/ring.py, rules KETAMA-1 .. KETAMA-6).

The placement itself is proven against libmemcached in
tests/integration/test_ring_golden.py; these tests pin the pieces
(hashes, point names, point counts) and the ring's properties: balance,
stability when servers come and go, and the auto-eject state machine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.endpoint import Endpoint, InetEndpoint, UnixEndpoint
from bridge.memcache.ring import (
    KETAMA_WEIGHTED,
    POINTS_PER_SERVER,
    POINTS_PER_SERVER_WEIGHTED,
    PYLIBMC_KETAMA,
    EjectingRing,
    KetamaConfig,
    KetamaRing,
    KeyHash,
    PoolServer,
    md5_hash,
    one_at_a_time_hash,
    point_name,
    weighted_digest_count,
)

CONFIGS = [PYLIBMC_KETAMA, KETAMA_WEIGHTED, KetamaConfig(KeyHash.MD5, weighted=False)]
CONFIG_IDS = ["ketama", "ketama_weighted", "ketama+md5"]

#: Enough keys that a share of keys is measured to about +-1%.
KEY_COUNT = 20_000


def _pool(size: int, first_port: int = 22100) -> list[Endpoint]:
    return [InetEndpoint("10.1.0.1", first_port + number) for number in range(size)]


def _keys(count: int = KEY_COUNT) -> list[bytes]:
    return [b"user%d@example.%d" % (number, number % 7) for number in range(count)]


def _placement(ring: KetamaRing, keys: Sequence[bytes]) -> dict[bytes, Endpoint]:
    return {key: ring.server_for(key) for key in keys}


# Vectors computed by libmemcached 1.1.4's memcached_generate_hash_value();
# the first two are also the published one-at-a-time test values.
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x00000000),
        (b"a", 0xCA2E9442),
        (b"The quick brown fox jumps over the lazy dog", 0x519E91F5),
        # Bytes >= 0x80 enter as sign-extended C chars (KETAMA-5).
        (b"\x80", 0xC31D4E27),
        (b"\xff", 0xAE65A494),
    ],
)
def test_one_at_a_time_hash_vectors(data: bytes, expected: int) -> None:
    assert one_at_a_time_hash(data) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0xD98C1DD4),
        (b"a", 0xB975C10C),
        (b"The quick brown fox jumps over the lazy dog", 0x9D7D109E),
        (b"\x80", 0x7EDD398D),
    ],
)
def test_md5_hash_vectors(data: bytes, expected: int) -> None:
    assert md5_hash(data) == expected


@given(st.binary(max_size=300))
def test_hashes_are_unsigned_32_bit(data: bytes) -> None:
    assert 0 <= one_at_a_time_hash(data) < 2**32
    assert 0 <= md5_hash(data) < 2**32


@pytest.mark.parametrize(
    ("endpoint", "index", "expected"),
    [
        # KETAMA-2: the default port is left out of the name.
        (InetEndpoint("cache1.example", 11211), 0, b"cache1.example-0"),
        (InetEndpoint("10.0.0.1", 11211), 39, b"10.0.0.1-39"),
        (InetEndpoint("10.0.0.1", 11212), 3, b"10.0.0.1:11212-3"),
        (InetEndpoint("::1", 11212), 0, b"::1:11212-0"),
        (InetEndpoint("::1", 11211), 7, b"::1-7"),
        (UnixEndpoint("/run/memcached.sock"), 0, b"/run/memcached.sock:0-0"),
    ],
)
def test_point_name(endpoint: Endpoint, index: int, expected: bytes) -> None:
    assert point_name(endpoint, index) == expected


def test_default_port_and_explicit_port_differ_on_the_ring() -> None:
    default = KetamaRing([InetEndpoint("h", 11211), InetEndpoint("g", 11211)])
    other = KetamaRing([InetEndpoint("h", 11212), InetEndpoint("g", 11211)])
    keys = _keys(2000)
    moved = sum(
        (default.server_for(key) == InetEndpoint("h", 11211))
        != (other.server_for(key) == InetEndpoint("h", 11212))
        for key in keys
    )
    assert moved > 0


@pytest.mark.parametrize("live_servers", [1, 2, 3, 5, 7, 10, 33])
def test_equal_weights_give_40_digests(live_servers: int) -> None:
    assert weighted_digest_count(1, live_servers, live_servers) == 40
    assert weighted_digest_count(7, 7 * live_servers, live_servers) == 40


@pytest.mark.parametrize("live_servers", [25, 47, 50, 100])
def test_float_rounding_gives_some_equal_pools_39_digests(live_servers: int) -> None:
    # KETAMA-4: (1/n) * 160 / 4 * n lands just below 40 in C float and the
    # 1e-10 epsilon is far below float's resolution at 40, so libmemcached
    # floors to 39 (confirmed against it in test_ring_golden.py).
    assert weighted_digest_count(1, live_servers, live_servers) == 39


@pytest.mark.parametrize(
    ("weights", "digests"),
    [
        ((1, 2), (26, 53)),
        ((1, 1, 4), (20, 20, 80)),
        ((1, 4), (16, 64)),
        ((1, 2, 3, 4, 5), (13, 26, 40, 53, 66)),
    ],
)
def test_weighted_digest_counts(weights: tuple[int, ...], digests: tuple[int, ...]) -> None:
    total = sum(weights)
    counts = tuple(weighted_digest_count(w, total, len(weights)) for w in weights)
    assert counts == digests


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_continuum_sizes(size: int) -> None:
    pool = _pool(size)
    assert len(KetamaRing(pool).continuum) == POINTS_PER_SERVER * size
    assert len(KetamaRing(pool, config=KETAMA_WEIGHTED).continuum) == (
        POINTS_PER_SERVER_WEIGHTED * size
    )


def test_a_weight_above_one_switches_on_the_weighted_continuum() -> None:
    # KETAMA-4: libmemcached flips the weighted flag when such a server is added.
    pool = _pool(3)
    assert not KetamaRing(pool).weighted
    assert KetamaRing([(pool[0], 2), pool[1], pool[2]]).weighted
    ring = KetamaRing([(pool[0], 2), pool[1], pool[2]])
    per_server = Counter(point.endpoint for point in ring.continuum)
    total, live = 4, 3
    assert per_server[pool[0]] == 4 * weighted_digest_count(2, total, live)
    assert per_server[pool[1]] == 4 * weighted_digest_count(1, total, live)
    # The key hash stays the configured one: only the point scheme changes.
    assert ring.key_hash(b"k") == one_at_a_time_hash(b"k")


def test_continuum_is_sorted() -> None:
    values = [point.value for point in KetamaRing(_pool(5)).continuum]
    assert values == sorted(values)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@given(key=st.binary(max_size=300))
@settings(max_examples=200)
def test_server_for_is_the_first_point_at_or_after_the_key_hash(
    config: KetamaConfig, key: bytes
) -> None:
    ring = KetamaRing(_pool(3), config=config)
    continuum = ring.continuum
    position = ring.key_hash(key)
    after = [point for point in continuum if point.value >= position]
    expected = after[0].endpoint if after else continuum[0].endpoint
    assert ring.server_for(key) == expected


def test_keys_past_the_last_point_wrap_to_the_first() -> None:
    ring = KetamaRing(_pool(3))
    first, last = ring.continuum[0], ring.continuum[-1]
    assert first.endpoint != last.endpoint  # else the test could not tell
    beyond = next(key for key in _keys() if ring.key_hash(key) > last.value)
    assert ring.server_for(beyond) == first.endpoint


@pytest.mark.parametrize("config", [PYLIBMC_KETAMA, KETAMA_WEIGHTED], ids=["ketama", "weighted"])
def test_a_key_hashing_exactly_onto_a_point_belongs_to_that_point(config: KetamaConfig) -> None:
    # KETAMA-1 says ">=": a key spelled like a point name hashes onto that
    # very point (with the weighted flavor, onto its digest's first point).
    pool = _pool(3)
    ring = KetamaRing(pool, config=config)
    for endpoint in pool:
        for number in range(40):
            assert ring.server_for(point_name(endpoint, number)) == endpoint


@pytest.mark.parametrize("order", [1, -1], ids=["as-listed", "reversed"])
def test_equal_points_go_to_the_server_listed_first(order: int) -> None:
    # KETAMA-1: "a:1" on port 11211 and "a" on port 1 both name their
    # points "a:1-N", so every point is a tie; the earlier server wins all.
    pool = [InetEndpoint("a", 1), InetEndpoint("a:1", 11211)][::order]
    ring = KetamaRing(pool)
    assert {ring.server_for(key) for key in _keys(500)} == {pool[0]}


def test_a_single_server_gets_every_key() -> None:
    (only,) = _pool(1)
    ring = KetamaRing([only])
    assert {ring.server_for(key) for key in _keys(500)} == {only}


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("size", [2, 3, 5])
def test_equal_weights_share_keys_evenly(config: KetamaConfig, size: int) -> None:
    ring = KetamaRing(_pool(size), config=config)
    shares = Counter(_placement(ring, _keys()).values())
    fair = KEY_COUNT / size
    assert set(shares) == set(_pool(size))
    for count in shares.values():
        assert 0.6 * fair < count < 1.4 * fair


def test_weights_scale_the_share_of_keys() -> None:
    light, heavy = _pool(2)
    ring = KetamaRing([(light, 1), (heavy, 3)])
    shares = Counter(_placement(ring, _keys()).values())
    assert 0.65 < shares[heavy] / KEY_COUNT < 0.85


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("size", [1, 2, 4])
def test_adding_a_server_moves_only_its_share_to_it(config: KetamaConfig, size: int) -> None:
    pool = _pool(size + 1)
    before = _placement(KetamaRing(pool[:size], config=config), _keys())
    after = _placement(KetamaRing(pool, config=config), _keys())
    moved = [key for key in before if before[key] != after[key]]
    assert all(after[key] == pool[size] for key in moved)
    fair = KEY_COUNT / (size + 1)
    assert 0.6 * fair < len(moved) < 1.4 * fair


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_without_moves_only_the_removed_servers_keys(config: KetamaConfig) -> None:
    pool = _pool(5)
    full = KetamaRing(pool, config=config)
    removed = pool[2]
    smaller = full.without(removed)
    before, after = _placement(full, _keys()), _placement(smaller, _keys())
    for key, server in before.items():
        if server == removed:
            assert after[key] != removed
        else:
            assert after[key] == server
    # The orphaned keys spread over the others instead of piling on one.
    assert len({after[key] for key in before if before[key] == removed}) == 4


def test_without_equals_a_ring_configured_without_the_server() -> None:
    pool = _pool(5)
    assert KetamaRing(pool).without(pool[0], pool[3]).continuum == (
        KetamaRing([pool[1], pool[2], pool[4]]).continuum
    )


def test_unequal_weights_are_recomputed_over_the_live_servers() -> None:
    # KETAMA-4/6: with weights 1, 1, 4 the second server has 20 digests;
    # once the first is gone its share is 1/5 of 2 servers: 16 digests.
    # So, as in libmemcached, some of its keys move to the heavy server.
    first, second, heavy = _pool(3)
    full = KetamaRing([(first, 1), (second, 1), (heavy, 4)])
    smaller = full.without(first)
    assert Counter(point.endpoint for point in smaller.continuum)[second] == 16 * 4
    before, after = _placement(full, _keys()), _placement(smaller, _keys())
    assert any(before[key] == second and after[key] == heavy for key in before)


def test_server_order_is_kept_by_without() -> None:
    pool = _pool(4)
    assert [s.endpoint for s in KetamaRing(pool).without(pool[1]).servers] == [
        pool[0],
        pool[2],
        pool[3],
    ]


def test_pool_members_may_be_endpoints_pairs_or_pool_servers() -> None:
    first, second = _pool(2)
    ring = KetamaRing([first, (second, 2)])
    assert ring.servers == (PoolServer(first, 1), PoolServer(second, 2))
    assert KetamaRing(ring.servers).continuum == ring.continuum


@pytest.mark.parametrize(
    "members",
    [
        [],
        [InetEndpoint("a", 1), InetEndpoint("a", 1)],
        [(InetEndpoint("a", 1), 0)],
    ],
    ids=["empty", "duplicate", "zero-weight"],
)
def test_bad_pools_are_rejected(members: list[Endpoint | tuple[Endpoint, int]]) -> None:
    with pytest.raises(ValueError):
        KetamaRing(members)


def test_without_rejects_unknown_and_last_server() -> None:
    first, second = _pool(2)
    ring = KetamaRing([first])
    with pytest.raises(ValueError, match="not in the pool"):
        ring.without(second)
    with pytest.raises(ValueError, match="at least one server"):
        ring.without(first)


@given(key=st.binary(max_size=1000), size=st.integers(1, 6))
@settings(max_examples=200)
def test_any_key_maps_to_a_pool_member(key: bytes, size: int) -> None:
    pool = _pool(size)
    assert KetamaRing(pool).server_for(key) in pool


# --- auto-eject (KETAMA-6) -------------------------------------------------


def test_without_eject_after_failures_never_eject() -> None:
    pool = _pool(3)
    ring = EjectingRing(pool, retry_after=60.0)
    for _ in range(100):
        assert not ring.record_failure(pool[0], now=0.0)
    assert ring.ejected == {}
    assert all(
        ring.server_for(key, now=1.0) == ring.full_ring.server_for(key) for key in _keys(500)
    )


def test_consecutive_failures_eject_and_only_the_ejected_keys_move() -> None:
    pool = _pool(3)
    ring = EjectingRing(pool, eject_after=3, retry_after=30.0)
    keys = _keys(3000)
    before = {key: ring.server_for(key, now=0.0) for key in keys}
    assert not ring.record_failure(pool[1], now=10.0)
    assert not ring.record_failure(pool[1], now=10.0)
    assert ring.record_failure(pool[1], now=10.0)
    assert ring.ejected == {pool[1]: 40.0}
    during = {key: ring.server_for(key, now=39.9) for key in keys}
    for key in keys:
        if before[key] == pool[1]:
            assert during[key] in (pool[0], pool[2])
        else:
            assert during[key] == before[key]


def test_a_success_resets_the_failure_count() -> None:
    pool = _pool(2)
    ring = EjectingRing(pool, eject_after=2, retry_after=60.0)
    assert not ring.record_failure(pool[0], now=0.0)
    ring.record_success(pool[0])
    assert not ring.record_failure(pool[0], now=0.0)
    assert ring.record_failure(pool[0], now=0.0)


def test_an_ejected_server_comes_back_with_its_keys_after_retry_after() -> None:
    pool = _pool(3)
    ring = EjectingRing(pool, eject_after=1, retry_after=5.0)
    keys = _keys(2000)
    assert ring.record_failure(pool[0], now=100.0)
    assert all(ring.server_for(key, now=104.0) != pool[0] for key in keys)
    assert all(ring.server_for(key, now=105.0) == ring.full_ring.server_for(key) for key in keys)
    assert ring.ejected == {}


def test_a_restored_server_is_on_probation() -> None:
    pool = _pool(2)
    ring = EjectingRing(pool, eject_after=3, retry_after=5.0)
    for _ in range(3):
        ring.record_failure(pool[0], now=0.0)
    assert ring.restore_expired(now=5.0) == (pool[0],)
    # One failure puts it straight back out, as libmemcached's dead_timeout does.
    assert ring.record_failure(pool[0], now=6.0)
    assert ring.ejected == {pool[0]: 11.0}


def test_a_success_after_restore_ends_probation() -> None:
    pool = _pool(2)
    ring = EjectingRing(pool, eject_after=2, retry_after=5.0)
    ring.record_failure(pool[0], now=0.0)
    ring.record_failure(pool[0], now=0.0)
    ring.restore_expired(now=5.0)
    ring.record_success(pool[0])
    assert not ring.record_failure(pool[0], now=6.0)


def test_failures_of_an_ejected_server_do_not_extend_its_ejection() -> None:
    pool = _pool(2)
    ring = EjectingRing(pool, eject_after=1, retry_after=5.0)
    assert ring.record_failure(pool[0], now=0.0)
    assert not ring.record_failure(pool[0], now=3.0)
    assert ring.ejected == {pool[0]: 5.0}


def test_manual_eject_and_restore_expired() -> None:
    pool = _pool(4)
    ring = EjectingRing(pool, retry_after=60.0)
    ring.eject(pool[3], until=20.0)
    ring.eject(pool[1], until=10.0)
    keys = _keys(2000)
    smaller = ring.full_ring.without(pool[1], pool[3])
    assert all(ring.server_for(key, now=9.0) == smaller.server_for(key) for key in keys)
    assert ring.restore_expired(now=15.0) == (pool[1],)
    assert ring.restore_expired(now=15.0) == ()
    assert ring.restore_expired(now=25.0) == (pool[3],)
    assert ring.ejected == {}


def test_when_every_server_is_ejected_there_is_no_server() -> None:
    pool = _pool(2)
    ring = EjectingRing(pool, eject_after=1, retry_after=5.0)
    ring.record_failure(pool[0], now=0.0)
    ring.record_failure(pool[1], now=1.0)
    assert ring.server_for(b"key", now=2.0) is None
    assert ring.server_for(b"key", now=5.0) == pool[0]


def test_unknown_endpoints_and_bad_settings_are_rejected() -> None:
    pool = _pool(2)
    ring = EjectingRing(pool, eject_after=1, retry_after=60.0)
    stranger = UnixEndpoint("/nowhere")
    with pytest.raises(ValueError):
        ring.record_failure(stranger, now=0.0)
    with pytest.raises(ValueError):
        ring.record_success(stranger)
    with pytest.raises(ValueError):
        ring.eject(stranger, until=1.0)
    with pytest.raises(ValueError):
        EjectingRing(pool, eject_after=0, retry_after=60.0)
    with pytest.raises(ValueError):
        EjectingRing(pool, retry_after=-1.0)


@given(
    events=st.lists(
        st.tuples(st.sampled_from(["fail", "ok"]), st.integers(0, 2), st.floats(0, 5)),
        max_size=40,
    ),
    key=st.binary(max_size=50),
)
def test_ejecting_ring_always_agrees_with_a_ring_of_its_live_servers(
    events: list[tuple[str, int, float]], key: bytes
) -> None:
    pool = _pool(3)
    ring = EjectingRing(pool, eject_after=2, retry_after=3.0)
    now = 0.0
    for kind, member, step in events:
        now += step
        ring.restore_expired(now)
        if kind == "fail":
            ring.record_failure(pool[member], now)
        else:
            ring.record_success(pool[member])
        live = [server for server in pool if server not in ring.ejected]
        expected = KetamaRing(live).server_for(key) if live else None
        assert ring.server_for(key, now) == expected
