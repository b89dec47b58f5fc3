"""Golden vectors from libmemcached itself: KetamaRing puts keys where it does.

libmemcached (Debian package ``libmemcached11``, the library under pylibmc
and PHP's memcached extension) is loaded through ctypes and configured the
way pylibmc configures it: behaviors first, then the servers, each with
its weight. Its answers are computed at test time, three ways:

* ``memcached_generate_hash_value`` for the key hashes (KETAMA-5);
* ``memcached_server_by_key``, which places a key without connecting, so
  pools can name hosts on the default port 11211, IPv6 hosts and unix
  sockets that do not exist (KETAMA-1 .. KETAMA-4);
* black-box: keys stored through libmemcached into 1, 2, 3 and 5 real
  memcached servers on free ports, then each server asked which keys it
  holds (KETAMA-1 .. KETAMA-4), and a real dead server auto-ejected by
  libmemcached (KETAMA-6).

The ring module cites the rules; the configurations are
``behaviors={"ketama": True}`` (:data:`PYLIBMC_KETAMA`),
``{"ketama_weighted": True}`` (:data:`KETAMA_WEIGHTED`) and
``{"ketama": True, "hash": "md5"}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.endpoint import Endpoint, InetEndpoint, UnixEndpoint
from bridge.memcache.ring import (
    KETAMA_WEIGHTED,
    POINTS_PER_SERVER,
    PYLIBMC_KETAMA,
    EjectingRing,
    KetamaConfig,
    KetamaRing,
    KeyHash,
    PoolServer,
    md5_hash,
    one_at_a_time_hash,
    point_name,
)
from tests.integration.harness import Memcached, closed_port, run_memcached

pytestmark = pytest.mark.integration

#: The Debian package that ships the library; named in the skip message
#: so that a missing install step is obvious (a skip fails CI).
LIBMEMCACHED_PACKAGE = "libmemcached11"

# memcached_behavior_t and memcached_hash_t values, from
# libmemcached-1.0/types/behavior.h and hash.h. They are part of the
# library's ABI (pylibmc compiled against any 1.x uses the same numbers).
BEHAVIOR_HASH = 2
BEHAVIOR_KETAMA = 3
BEHAVIOR_RETRY_TIMEOUT = 15
BEHAVIOR_KETAMA_WEIGHTED = 16
BEHAVIOR_SERVER_FAILURE_LIMIT = 21
BEHAVIOR_AUTO_EJECT_HOSTS = 28
HASH_DEFAULT = 0
HASH_MD5 = 1

#: memcached_return_t values the tests look at.
MEMCACHED_SUCCESS = 0
MEMCACHED_SERVER_MARKED_DEAD = 35

#: Keys per pool: enough that every arc of a 5-server ring is hit many times.
KEY_COUNT = 3000

#: Keys per pool stored into real servers; each is then read back once.
STORED_KEY_COUNT = 1500

#: How long libmemcached may take to put an ejected server back: its clock
#: has whole seconds, so retry_timeout=1 means up to about 2 s.
RESTORE_DEADLINE = 10.0


@dataclass(frozen=True, slots=True)
class Flavor:
    """A libmemcached configuration and the ring config that must agree with it."""

    name: str
    behaviors: tuple[tuple[int, int], ...]
    config: KetamaConfig


# Behaviors in the order pylibmc applies them (its table order: hash,
# ketama_hash, ketama, ketama_weighted).
KETAMA = Flavor("ketama", ((BEHAVIOR_KETAMA, 1),), PYLIBMC_KETAMA)
WEIGHTED = Flavor("ketama_weighted", ((BEHAVIOR_KETAMA_WEIGHTED, 1),), KETAMA_WEIGHTED)
KETAMA_MD5 = Flavor(
    "ketama+hash=md5",
    ((BEHAVIOR_HASH, HASH_MD5), (BEHAVIOR_KETAMA, 1)),
    KetamaConfig(KeyHash.MD5, weighted=False),
)
FLAVORS = [KETAMA, WEIGHTED, KETAMA_MD5]


class Libmemcached:
    """The few libmemcached calls the tests need, typed."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        pointer, text, size = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        signatures: dict[str, tuple[list[type], type | None]] = {
            "memcached_create": ([pointer], pointer),
            "memcached_free": ([pointer], None),
            "memcached_behavior_set": ([pointer, ctypes.c_int, ctypes.c_uint64], ctypes.c_int),
            "memcached_server_add_with_weight": (
                [pointer, text, ctypes.c_uint16, ctypes.c_uint32],
                ctypes.c_int,
            ),
            "memcached_server_add_unix_socket_with_weight": (
                [pointer, text, ctypes.c_uint32],
                ctypes.c_int,
            ),
            "memcached_server_by_key": (
                [pointer, text, size, ctypes.POINTER(ctypes.c_int)],
                pointer,
            ),
            "memcached_server_name": ([pointer], text),
            "memcached_server_port": ([pointer], ctypes.c_uint16),
            "memcached_generate_hash_value": ([text, size, ctypes.c_int], ctypes.c_uint32),
            "memcached_set": (
                [pointer, text, size, text, size, ctypes.c_long, ctypes.c_uint32],
                ctypes.c_int,
            ),
        }
        for name, (argtypes, restype) in signatures.items():
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = restype

    def hash_value(self, data: bytes, algorithm: int) -> int:
        return int(self._lib.memcached_generate_hash_value(data, len(data), algorithm))

    @contextlib.contextmanager
    def client(
        self, flavor: Flavor, servers: Sequence[PoolServer], extra: Sequence[tuple[int, int]] = ()
    ) -> Iterator[LibmemcachedClient]:
        handle = self._lib.memcached_create(None)
        assert handle
        try:
            for behavior, value in (*flavor.behaviors, *extra):
                assert self._lib.memcached_behavior_set(handle, behavior, value) == 0
            for server in servers:
                self._add_server(handle, server)
            yield LibmemcachedClient(self._lib, handle, servers)
        finally:
            self._lib.memcached_free(handle)

    def _add_server(self, handle: int, server: PoolServer) -> None:
        endpoint = server.endpoint
        if isinstance(endpoint, UnixEndpoint):
            rc = self._lib.memcached_server_add_unix_socket_with_weight(
                handle, endpoint.path.encode(), server.weight
            )
        else:
            rc = self._lib.memcached_server_add_with_weight(
                handle, endpoint.host.encode(), endpoint.port, server.weight
            )
        assert rc == MEMCACHED_SUCCESS, f"adding {endpoint}: rc {rc}"


class LibmemcachedClient:
    """One ``memcached_st`` with its pool."""

    def __init__(self, lib: ctypes.CDLL, handle: int, servers: Sequence[PoolServer]) -> None:
        self._lib = lib
        self._handle = handle
        self._by_name: dict[tuple[str, int], Endpoint] = {}
        for server in servers:
            endpoint = server.endpoint
            if isinstance(endpoint, UnixEndpoint):
                self._by_name[endpoint.path, 0] = endpoint
            else:
                self._by_name[endpoint.host, endpoint.port] = endpoint

    def server_for(self, key: bytes) -> Endpoint:
        """``memcached_server_by_key``: placement without any connection."""
        error = ctypes.c_int()
        instance = self._lib.memcached_server_by_key(
            self._handle, key, len(key), ctypes.byref(error)
        )
        assert instance, f"memcached_server_by_key failed: rc {error.value}"
        name = bytes(self._lib.memcached_server_name(instance)).decode()
        port = int(self._lib.memcached_server_port(instance))
        return self._by_name[name, port]

    def set(self, key: bytes, value: bytes) -> int:
        """``memcached_set``; returns libmemcached's return code."""
        return int(self._lib.memcached_set(self._handle, key, len(key), value, len(value), 0, 0))


@pytest.fixture(scope="session")
def libmemcached() -> Libmemcached:
    path = ctypes.util.find_library("memcached") or "libmemcached.so.11"
    try:
        return Libmemcached(ctypes.CDLL(path))
    except OSError as error:
        pytest.skip(f"libmemcached not loadable ({error}); install {LIBMEMCACHED_PACKAGE}")


def _keys(count: int, seed: int) -> list[bytes]:
    """Distinct valid memcache keys, with bytes >= 0x80 to exercise KETAMA-5's signed chars."""
    generator = random.Random(seed)
    keys: set[bytes] = set()
    while len(keys) < count:
        length = generator.randrange(1, 60)
        keys.add(bytes(generator.randrange(0x21, 0x100) for _ in range(length)))
    return sorted(keys)


def _disagreements(
    ring: KetamaRing | EjectingRing,
    client: LibmemcachedClient,
    keys: Sequence[bytes],
    now: float = 0.0,
) -> list[bytes]:
    if isinstance(ring, EjectingRing):
        return [key for key in keys if ring.server_for(key, now) != client.server_for(key)]
    return [key for key in keys if ring.server_for(key) != client.server_for(key)]


# --- KETAMA-5: key hashes ------------------------------------------------


@given(data=st.binary(max_size=300))
@settings(max_examples=500)
def test_key_hashes_match_libmemcached(libmemcached: Libmemcached, data: bytes) -> None:
    assert one_at_a_time_hash(data) == libmemcached.hash_value(data, HASH_DEFAULT)
    assert md5_hash(data) == libmemcached.hash_value(data, HASH_MD5)


# --- KETAMA-1 .. KETAMA-4: placement via memcached_server_by_key ---------


def _inet_pool(hosts_ports: Sequence[tuple[str, int]], weights: Sequence[int]) -> list[PoolServer]:
    return [
        PoolServer(InetEndpoint(host, port), weight)
        for (host, port), weight in zip(hosts_ports, weights, strict=True)
    ]


def _pool_shapes(size: int) -> dict[str, list[PoolServer]]:
    equal = [1] * size
    rising = list(range(1, size + 1))
    return {
        "loopback-ports": _inet_pool([("127.0.0.1", 21000 + n) for n in range(size)], equal),
        # KETAMA-2: on port 11211 the point names are HOST-N.
        "default-port": _inet_pool([(f"cache{n}.example.org", 11211) for n in range(size)], equal),
        "mixed-ports-weighted": _inet_pool(
            [(f"10.0.0.{n + 1}", 11211 if n % 2 else 11300 + n) for n in range(size)], rising
        ),
        "ipv6": _inet_pool([("::1", 11211 + n) for n in range(size)], equal),
        "unix": [PoolServer(UnixEndpoint(f"/run/memcached/{n}.sock")) for n in range(size)],
    }


PLACEMENT_CASES = [
    pytest.param(flavor, pool, id=f"{flavor.name}-{size}-{shape}")
    for flavor in FLAVORS
    for size in (1, 2, 3, 5)
    for shape, pool in _pool_shapes(size).items()
]


@pytest.mark.parametrize(("flavor", "pool"), PLACEMENT_CASES)
def test_placement_matches_server_by_key(
    libmemcached: Libmemcached, flavor: Flavor, pool: list[PoolServer]
) -> None:
    ring = KetamaRing(pool, config=flavor.config)
    with libmemcached.client(flavor, pool) as client:
        assert _disagreements(ring, client, _keys(KEY_COUNT, seed=len(pool))) == []


@pytest.mark.parametrize("size", [25, 100])
def test_float_rounded_point_counts_match(libmemcached: Libmemcached, size: int) -> None:
    # KETAMA-4: with 25 or 100 equal servers libmemcached's float arithmetic
    # gives each server 39 digests instead of 40.
    pool = [PoolServer(InetEndpoint(f"10.2.{n // 250}.{n % 250}", 11211)) for n in range(size)]
    ring = KetamaRing(pool, config=WEIGHTED.config)
    with libmemcached.client(WEIGHTED, pool) as client:
        assert _disagreements(ring, client, _keys(KEY_COUNT, seed=size)) == []


@pytest.mark.parametrize("flavor", FLAVORS, ids=[f.name for f in FLAVORS])
def test_keys_on_a_point_and_ties_match(libmemcached: Libmemcached, flavor: Flavor) -> None:
    # A key spelled like a point name hashes onto that point (KETAMA-1's
    # ">="); "a:1" on 11211 and "a" on port 1 share all point names, so
    # every point is a tie and the server listed first must win.
    pool = _pool_shapes(3)["loopback-ports"]
    names = [point_name(s.endpoint, n) for s in pool for n in range(POINTS_PER_SERVER)]
    with libmemcached.client(flavor, pool) as client:
        assert _disagreements(KetamaRing(pool, config=flavor.config), client, names) == []
    for twins in ([("a", 1), ("a:1", 11211)], [("a:1", 11211), ("a", 1)]):
        tied = _inet_pool(twins, [1, 1])
        with libmemcached.client(flavor, tied) as client:
            ring = KetamaRing(tied, config=flavor.config)
            assert _disagreements(ring, client, _keys(500, seed=3)) == []


def test_ketama_behavior_does_not_hash_keys_with_md5(libmemcached: Libmemcached) -> None:
    # pylibmc's documentation says "ketama" implies MD5; libmemcached 1.x
    # keeps the default one-at-a-time key hash (KETAMA-5), and so must we.
    pool = _pool_shapes(3)["loopback-ports"]
    keys = _keys(KEY_COUNT, seed=7)
    with libmemcached.client(KETAMA, pool) as client:
        assert _disagreements(KetamaRing(pool, config=PYLIBMC_KETAMA), client, keys) == []
        md5_ring = KetamaRing(pool, config=KetamaConfig(KeyHash.MD5, weighted=False))
        assert len(_disagreements(md5_ring, client, keys)) > KEY_COUNT // 3


# --- black box: keys stored through libmemcached into real servers -------


@pytest.fixture(scope="module")
def five_servers() -> Iterator[list[Memcached]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(run_memcached()) for _ in range(5)]


STORE_CASES = [
    pytest.param(flavor, weights, id=f"{flavor.name}-{len(weights)}-w{''.join(map(str, weights))}")
    for flavor in (KETAMA, WEIGHTED)
    for weights in ((1,), (1, 1), (1, 1, 1), (1, 1, 1, 1, 1), (1, 2, 3), (3, 1, 1, 2, 5))
]


@pytest.mark.parametrize(("flavor", "weights"), STORE_CASES)
def test_keys_stored_by_libmemcached_are_where_the_ring_says(
    libmemcached: Libmemcached,
    five_servers: list[Memcached],
    flavor: Flavor,
    weights: tuple[int, ...],
) -> None:
    servers = five_servers[: len(weights)]
    for server in servers:
        server.flush()
    pool = [
        PoolServer(InetEndpoint("127.0.0.1", server.port), weight)
        for server, weight in zip(servers, weights, strict=True)
    ]
    keys = _keys(STORED_KEY_COUNT, seed=sum(weights))
    with libmemcached.client(flavor, pool) as client:
        for key in keys:
            assert client.set(key, b"v") == MEMCACHED_SUCCESS
    ring = KetamaRing(pool, config=flavor.config)
    held: dict[bytes, Endpoint] = {}
    for server, member in zip(servers, pool, strict=True):
        for key in server.items():
            assert key not in held, f"{key!r} stored twice"
            held[key] = member.endpoint
    assert sorted(held) == keys
    assert [key for key in keys if ring.server_for(key) != held[key]] == []


# --- KETAMA-6: libmemcached's auto-eject ---------------------------------


@pytest.mark.parametrize(
    ("flavor", "weights", "dead_index"),
    [
        pytest.param(KETAMA, (1, 1, 1), 1, id="ketama-equal"),
        # Unequal weights: the live servers' shares are recomputed.
        pytest.param(WEIGHTED, (1, 2, 4), 0, id="ketama_weighted-1-2-4"),
    ],
)
def test_auto_eject_matches_libmemcached(
    libmemcached: Libmemcached,
    five_servers: list[Memcached],
    flavor: Flavor,
    weights: tuple[int, int, int],
    dead_index: int,
) -> None:
    live = iter(five_servers)
    endpoints = [
        InetEndpoint("127.0.0.1", closed_port() if n == dead_index else next(live).port)
        for n in range(3)
    ]
    pool = [PoolServer(e, w) for e, w in zip(endpoints, weights, strict=True)]
    dead = endpoints[dead_index]
    retry_after = 1
    eject_behaviors = [
        (BEHAVIOR_AUTO_EJECT_HOSTS, 1),
        (BEHAVIOR_SERVER_FAILURE_LIMIT, 1),
        (BEHAVIOR_RETRY_TIMEOUT, retry_after),
    ]
    ring = EjectingRing(pool, config=flavor.config, eject_after=1, retry_after=retry_after)
    keys = _keys(KEY_COUNT, seed=11)
    dead_keys = [key for key in keys if ring.full_ring.server_for(key) == dead]
    with libmemcached.client(flavor, pool, eject_behaviors) as client:
        assert _disagreements(ring, client, keys) == []

        # The first failure marks the server; libmemcached rebuilds its
        # ring when it next picks that server, answering SERVER_MARKED_DEAD.
        assert client.set(dead_keys[0], b"v") != MEMCACHED_SUCCESS
        assert ring.record_failure(dead, now=0.0)
        assert client.set(dead_keys[1], b"v") == MEMCACHED_SERVER_MARKED_DEAD
        assert _disagreements(ring, client, keys, now=0.0) == []
        assert _disagreements(ring.full_ring.without(dead), client, keys) == []

        # After retry_timeout libmemcached puts the server back; its
        # rebuild runs inside a keyed call, so keep storing a live key.
        deadline = time.monotonic() + RESTORE_DEADLINE
        live_key = next(key for key in keys if ring.full_ring.server_for(key) != dead)
        while _disagreements(ring.full_ring, client, keys):
            assert time.monotonic() < deadline, "libmemcached never restored the server"
            client.set(live_key, b"v")
            time.sleep(0.05)
        assert _disagreements(ring, client, keys, now=float(retry_after)) == []
