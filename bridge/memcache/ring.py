"""Ketama consistent hashing that places keys exactly where libmemcached does.

Theory of operation
-------------------
A memcache pool is a list of servers shared by many clients. Every client
must send a key to the same server, or one client's writes are invisible
to another's reads. The bridge therefore copies libmemcached (the C
library under pylibmc, PHP's ``memcached`` extension and Postfix-adjacent
tools) point for point, as of libmemcached 1.0 .. 1.1 (``hosts.cc``
``update_continuum``, ``hash.cc`` ``dispatch_host``, ``libhashkit``).
The rules, numbered so that code and tests can cite them:

KETAMA-1  *Continuum.* Each server owns points on a circle of 2**32
          values. A key goes to the owner of the first point whose value
          is >= the key's hash; past the last point it wraps to the first.
          Points with equal values are ordered by the server's position
          in the configured list, so the earlier server wins the tie.

KETAMA-2  *Point names.* The points of a server are hashes of the strings
          ``HOST:PORT-N`` for N = 0, 1, 2, ..., written ``HOST-N`` when the
          port is memcached's default 11211. HOST is the host exactly as
          configured (no brackets around an IPv6 address, no name
          resolution). A unix-domain server is ``PATH:0-N`` (port 0).

KETAMA-3  *Unweighted continuum* (``MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA``
          without the weighted flag): 100 points per server
          (``MEMCACHED_POINTS_PER_SERVER``), point N being the *key hash*
          (KETAMA-5) of name N.

KETAMA-4  *Weighted continuum* (libketama's scheme; the weighted flag is
          on): ``floor(weight / total_weight * 40 * live_servers + 1e-10)``
          MD5 digests per server, computed in C ``float`` arithmetic; each
          digest of name N gives 4 points, its bytes 0-3, 4-7, 8-11, 12-15
          read as little-endian 32-bit numbers. Equal weights thus give
          160 points (``MEMCACHED_POINTS_PER_SERVER_KETAMA``) per server,
          except where float rounding lands below a whole number: with
          25, 47, 50, 100 ... equal servers each gets 39 digests (156
          points), and so it does in libmemcached.
          libmemcached switches the weighted flag on by itself as soon as
          any server is added with a weight above 1.

KETAMA-5  *Key hash.* libmemcached's default (``MEMCACHED_HASH_DEFAULT``)
          is Bob Jenkins' one-at-a-time hash over the key bytes, where
          each byte is read as a *signed* C ``char`` (so bytes >= 0x80
          enter as 0xFFFFFF80 ..). ``MEMCACHED_HASH_MD5`` is the first
          four bytes of the key's MD5 digest, little-endian.

KETAMA-6  *Auto-eject* (``MEMCACHED_BEHAVIOR_AUTO_EJECT_HOSTS`` with
          ``SERVER_FAILURE_LIMIT`` and ``RETRY_TIMEOUT``): after the limit
          of consecutive failures a server is left out when the continuum
          is rebuilt, exactly as if it were not configured (the weight
          shares of KETAMA-4 are recomputed over the live servers). Its
          keys move to the next points; it is put back once its retry time
          has come.

Two libmemcached configurations matter in practice and are provided as
constants:

* :data:`PYLIBMC_KETAMA` -- ``MEMCACHED_BEHAVIOR_KETAMA = 1``, which is
  pylibmc's ``behaviors={"ketama": True}``. Since libmemcached 1.0 this
  sets only the distribution; the key hash stays one-at-a-time
  (KETAMA-5), and the continuum is unweighted (KETAMA-3) unless a server
  has a weight above 1 (KETAMA-4). pylibmc's documentation still says
  "ketama" implies MD5; that was true of libmemcached 0.x only.
* :data:`KETAMA_WEIGHTED` -- ``MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED = 1``
  (pylibmc ``{"ketama_weighted": True}``, PHP memcached's
  ``OPT_LIBKETAMA_COMPATIBLE``): MD5 key hash and the weighted continuum,
  i.e. classic libketama placement.

``MEMCACHED_BEHAVIOR_KETAMA_HASH`` (the "distribution hash") is not used
for placement by libmemcached 1.x, so it has no counterpart here.

A pool can instead be put behind mcrouter (or another proxy) and
configured as a single endpoint. Placement is then the proxy's own
business and this module is not involved; clients that talk to the pool
servers directly will not agree with it.

Everything in this module is pure: no sockets, no clock. Time is passed
in by the caller (:class:`EjectingRing`).
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from bridge.endpoint import Endpoint, InetEndpoint, UnixEndpoint

#: memcached's well-known port; libmemcached leaves it out of point names
#: (KETAMA-2), so "host" and "host:11211" are the same server on the ring.
DEFAULT_PORT = 11211

#: Points per server in the unweighted continuum (KETAMA-3); libmemcached's
#: MEMCACHED_POINTS_PER_SERVER.
POINTS_PER_SERVER = 100

#: Points per server of average weight in the weighted continuum
#: (KETAMA-4); libmemcached's MEMCACHED_POINTS_PER_SERVER_KETAMA, the value
#: libketama chose so that 4 points come from each of 40 MD5 digests.
POINTS_PER_SERVER_WEIGHTED = 160

#: A 16-byte MD5 digest yields four 32-bit points (KETAMA-4).
POINTS_PER_DIGEST = 4

#: libmemcached adds this float epsilon before flooring the digest count,
#: meaning to lift a share that float arithmetic put a hair below a whole
#: number. It is far below float's resolution near 40, so it rarely helps;
#: it is kept because it is part of the arithmetic we reproduce (KETAMA-4).
_WEIGHT_EPSILON = 0.0000000001

_UINT32 = 0xFFFFFFFF

#: A 32-bit hash function over bytes.
_Hasher = Callable[[bytes], int]


class KeyHash(enum.Enum):
    """libmemcached's key hash functions that ketama pools use (KETAMA-5)."""

    #: ``MEMCACHED_HASH_DEFAULT``: Jenkins one-at-a-time over signed chars.
    ONE_AT_A_TIME = "one_at_a_time"
    #: ``MEMCACHED_HASH_MD5``: first four digest bytes, little-endian.
    MD5 = "md5"


@dataclass(frozen=True, slots=True)
class KetamaConfig:
    """Which libmemcached configuration the ring agrees with.

    Attributes:
      key_hash: the hash applied to keys (``MEMCACHED_BEHAVIOR_HASH``); in
        the unweighted continuum it also names the points (KETAMA-3).
      weighted: the weighted flag (KETAMA-4). Even when False the ring is
        weighted if any server's weight is above 1, as in libmemcached.
    """

    key_hash: KeyHash = KeyHash.ONE_AT_A_TIME
    weighted: bool = False


#: pylibmc ``{"ketama": True}`` = ``MEMCACHED_BEHAVIOR_KETAMA``: the
#: configuration pylibmc users actually run with libmemcached 1.x.
PYLIBMC_KETAMA = KetamaConfig(KeyHash.ONE_AT_A_TIME, weighted=False)

#: ``MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED`` (pylibmc ``{"ketama_weighted": True}``,
#: PHP ``Memcached::OPT_LIBKETAMA_COMPATIBLE``): classic libketama placement.
KETAMA_WEIGHTED = KetamaConfig(KeyHash.MD5, weighted=True)


@dataclass(frozen=True, slots=True)
class PoolServer:
    """One configured pool member.

    Attributes:
      endpoint: where the server listens.
      weight: its relative share of keys (libmemcached's server weight, >= 1).
    """

    endpoint: Endpoint
    weight: int = 1


@dataclass(frozen=True, slots=True)
class ContinuumPoint:
    """One point on the ring: keys hashing up to ``value`` go to ``endpoint``."""

    value: int
    endpoint: Endpoint


def one_at_a_time_hash(data: bytes) -> int:
    """libmemcached's default hash (KETAMA-5).

    Args:
      data: the bytes to hash.

    Returns:
      An unsigned 32-bit hash, as ``hashkit_one_at_a_time`` computes it on
      a platform with signed ``char`` (x86, and what libmemcached users run).
    """
    value = 0
    for byte in data:
        # A signed char sign-extends into uint32_t.
        value = (value + (byte if byte < 0x80 else byte | 0xFFFFFF00)) & _UINT32
        value = (value + (value << 10)) & _UINT32
        value ^= value >> 6
    value = (value + (value << 3)) & _UINT32
    value ^= value >> 11
    return (value + (value << 15)) & _UINT32


def md5_hash(data: bytes) -> int:
    """libmemcached's MD5 hash (KETAMA-5): digest bytes 0-3, little-endian.

    Args:
      data: the bytes to hash.

    Returns:
      An unsigned 32-bit hash.
    """
    return _md5_points(data)[0]


def _md5_points(data: bytes) -> tuple[int, int, int, int]:
    """The four little-endian 32-bit words of an MD5 digest (KETAMA-4)."""
    digest = hashlib.md5(data, usedforsecurity=False).digest()
    first, second, third, fourth = struct.unpack("<4I", digest)
    return first, second, third, fourth


def _key_hasher(key_hash: KeyHash) -> _Hasher:
    return one_at_a_time_hash if key_hash is KeyHash.ONE_AT_A_TIME else md5_hash


def point_name(endpoint: Endpoint, index: int) -> bytes:
    """The string libmemcached hashes for a server's ``index``-th point (KETAMA-2).

    Args:
      endpoint: the server.
      index: the point (or, weighted, the digest) number, from 0.

    Returns:
      ``HOST-N`` on the default port, ``HOST:PORT-N`` otherwise,
      ``PATH:0-N`` for a unix-domain socket.
    """
    if isinstance(endpoint, UnixEndpoint):
        host, port = endpoint.path, 0
    else:
        host, port = endpoint.host, endpoint.port
    if port == DEFAULT_PORT:
        return f"{host}-{index}".encode()
    return f"{host}:{port}-{index}".encode()


def _f32(value: float) -> float:
    """Round to C ``float``.

    Rounding each double result of a float operation back to float gives
    the correctly rounded float result, since a double holds more than
    twice float's precision; so this reproduces libmemcached's float
    arithmetic step by step.
    """
    rounded: float = struct.unpack("f", struct.pack("f", value))[0]
    return rounded


def weighted_digest_count(weight: int, total_weight: int, live_servers: int) -> int:
    """How many MD5 digests a server gets in the weighted continuum (KETAMA-4).

    Args:
      weight: the server's weight.
      total_weight: the sum of the weights of the live servers.
      live_servers: how many servers are on the ring.

    Returns:
      The digest count; the server gets four times as many points.
    """
    share = _f32(_f32(weight) / _f32(total_weight))
    scaled = _f32(share * POINTS_PER_SERVER_WEIGHTED)
    scaled = _f32(scaled / POINTS_PER_DIGEST)
    scaled = _f32(scaled * _f32(live_servers))
    scaled = _f32(scaled + _f32(_WEIGHT_EPSILON))
    return math.floor(scaled)


def _as_pool_server(member: PoolServer | Endpoint | tuple[Endpoint, int]) -> PoolServer:
    if isinstance(member, PoolServer):
        return member
    if isinstance(member, (InetEndpoint, UnixEndpoint)):
        return PoolServer(member)
    endpoint, weight = member
    return PoolServer(endpoint, weight)


class KetamaRing:
    """An immutable libmemcached-compatible continuum over a pool.

    Args:
      servers: the pool in configuration order (the order breaks ties,
        KETAMA-1). Each member is an endpoint (weight 1), an
        ``(endpoint, weight)`` pair or a :class:`PoolServer`.
      config: the libmemcached configuration to agree with.

    Raises:
      ValueError: for an empty pool, a repeated endpoint or a weight below 1.
    """

    __slots__ = ("_config", "_endpoints", "_key_hash", "_servers", "_values", "_weighted")

    def __init__(
        self,
        servers: Iterable[PoolServer | Endpoint | tuple[Endpoint, int]],
        *,
        config: KetamaConfig = PYLIBMC_KETAMA,
    ) -> None:
        pool = tuple(_as_pool_server(member) for member in servers)
        _check_pool(pool)
        self._servers = pool
        self._config = config
        self._key_hash = _key_hasher(config.key_hash)
        # libmemcached turns the weighted flag on when a server with
        # weight > 1 is added to a consistent distribution (KETAMA-4).
        self._weighted = config.weighted or any(s.weight > 1 for s in pool)
        points = _build_continuum(pool, weighted=self._weighted, key_hash=self._key_hash)
        self._values = [value for value, _ in points]
        self._endpoints = [pool[index].endpoint for _, index in points]

    @property
    def servers(self) -> tuple[PoolServer, ...]:
        """The pool, in configuration order."""
        return self._servers

    @property
    def config(self) -> KetamaConfig:
        """The libmemcached configuration this ring reproduces."""
        return self._config

    @property
    def weighted(self) -> bool:
        """Whether the weighted continuum (KETAMA-4) is in use."""
        return self._weighted

    @property
    def continuum(self) -> tuple[ContinuumPoint, ...]:
        """Every point, in ring order (KETAMA-1)."""
        return tuple(map(ContinuumPoint, self._values, self._endpoints))

    def key_hash(self, key: bytes) -> int:
        """The key's position on the ring (KETAMA-5)."""
        return self._key_hash(key)

    def server_for(self, key: bytes) -> Endpoint:
        """The server that holds ``key`` (KETAMA-1).

        Args:
          key: the memcache key, exactly as sent on the wire.

        Returns:
          The endpoint libmemcached would send this key to.
        """
        position = bisect.bisect_left(self._values, self._key_hash(key))
        if position == len(self._values):
            position = 0
        return self._endpoints[position]

    def without(self, *endpoints: Endpoint) -> KetamaRing:
        """The ring libmemcached rebuilds once ``endpoints`` are ejected (KETAMA-6).

        Args:
          endpoints: servers to leave out.

        Returns:
          A ring over the remaining servers, in their original order.

        Raises:
          ValueError: if an endpoint is not in the pool, or none would remain.
        """
        known = {server.endpoint for server in self._servers}
        for endpoint in endpoints:
            if endpoint not in known:
                raise ValueError(f"{endpoint} is not in the pool")
        gone = set(endpoints)
        remaining = [server for server in self._servers if server.endpoint not in gone]
        return KetamaRing(remaining, config=self._config)

    def __repr__(self) -> str:
        members = ", ".join(f"{s.endpoint}*{s.weight}" for s in self._servers)
        return f"KetamaRing([{members}], config={self._config!r})"


def _check_pool(pool: Sequence[PoolServer]) -> None:
    if not pool:
        raise ValueError("a memcache pool needs at least one server")
    seen: set[Endpoint] = set()
    for server in pool:
        if server.weight < 1:
            raise ValueError(f"weight of {server.endpoint} must be at least 1")
        if server.endpoint in seen:
            raise ValueError(f"{server.endpoint} is listed twice in the pool")
        seen.add(server.endpoint)


def _build_continuum(
    pool: Sequence[PoolServer], *, weighted: bool, key_hash: _Hasher
) -> list[tuple[int, int]]:
    """``(value, server index)`` pairs sorted as libmemcached sorts them (KETAMA-1)."""
    points: list[tuple[int, int]] = []
    total_weight = sum(server.weight for server in pool)
    for index, server in enumerate(pool):
        if weighted:
            digests = weighted_digest_count(server.weight, total_weight, len(pool))
            for number in range(digests):
                points.extend(
                    (value, index) for value in _md5_points(point_name(server.endpoint, number))
                )
        else:
            points.extend(
                (key_hash(point_name(server.endpoint, number)), index)
                for number in range(POINTS_PER_SERVER)
            )
    points.sort()
    return points


class EjectingRing:
    """libmemcached's auto-eject as a pure state machine (KETAMA-6).

    The caller reports each server's successes and failures and passes the
    current time; the ring answers where a key lives right now. Nothing is
    ejected unless ``eject_after`` is set, because ejection moves keys
    (libmemcached's auto-eject is off by default too).

    A server comes back on probation: after its ``retry_after`` seconds it
    is on the ring again, but a single further failure ejects it at once;
    a success clears its record. This is libmemcached's ``DEAD_TIMEOUT``
    rule ("retry dead servers once before assuming failure again").

    The ring is always the one libmemcached builds for the same set of
    live servers. Where libmemcached differs, it is in timing only:

    * it rebuilds lazily, when it next picks the failed server, and fails
      that request with ``MEMCACHED_SERVER_MARKED_DEAD``; here the server
      leaves the ring at the failure that reaches the limit;
    * its clock has whole seconds, so a server may come back up to a
      second later there;
    * with every server ejected it keeps its last ring; here there is no
      server (None), which the caller turns into TEMP.

    Args:
      servers: the pool, as for :class:`KetamaRing`.
      config: the libmemcached configuration to agree with.
      eject_after: consecutive failures that eject a server
        (``MEMCACHED_BEHAVIOR_SERVER_FAILURE_LIMIT``); None never ejects.
      retry_after: seconds an ejected server stays off the ring
        (``MEMCACHED_BEHAVIOR_RETRY_TIMEOUT``); no default here, the
        table's ``retry_after`` parameter (bridge.config) has it.

    Raises:
      ValueError: for a bad pool, ``eject_after`` below 1 or a negative
        ``retry_after``.
    """

    def __init__(
        self,
        servers: Iterable[PoolServer | Endpoint | tuple[Endpoint, int]],
        *,
        config: KetamaConfig = PYLIBMC_KETAMA,
        eject_after: int | None = None,
        retry_after: float,
    ) -> None:
        if eject_after is not None and eject_after < 1:
            raise ValueError("eject_after must be at least 1")
        if retry_after < 0:
            raise ValueError("retry_after must not be negative")
        self._full = KetamaRing(servers, config=config)
        self._eject_after = eject_after
        self._retry_after = retry_after
        self._failures: dict[Endpoint, int] = {}
        self._ejected: dict[Endpoint, float] = {}
        # Rebuilt only when the set of ejected servers changes.
        self._live: KetamaRing | None = self._full

    @property
    def full_ring(self) -> KetamaRing:
        """The ring with every server on it."""
        return self._full

    @property
    def ejected(self) -> Mapping[Endpoint, float]:
        """Ejected servers and the time each may come back."""
        return dict(self._ejected)

    def server_for(self, key: bytes, now: float) -> Endpoint | None:
        """Where ``key`` lives at time ``now``.

        Servers whose retry time has come are restored first.

        Args:
          key: the memcache key.
          now: the current time, on the clock used for ``record_failure``.

        Returns:
          The endpoint, or None when every server is ejected (the caller
          answers TEMP; libmemcached would keep using its stale ring).
        """
        self.restore_expired(now)
        if self._live is None:
            return None
        return self._live.server_for(key)

    def record_failure(self, endpoint: Endpoint, now: float) -> bool:
        """Count a failed exchange with ``endpoint``.

        Args:
          endpoint: the server that failed (connect, I/O or timeout).
          now: the current time.

        Returns:
          True if this failure ejected the server.

        Raises:
          ValueError: if the endpoint is not in the pool.
        """
        self._check_member(endpoint)
        if self._eject_after is None or endpoint in self._ejected:
            return False
        failures = self._failures.get(endpoint, 0) + 1
        self._failures[endpoint] = failures
        if failures < self._eject_after:
            return False
        self.eject(endpoint, until=now + self._retry_after)
        return True

    def record_success(self, endpoint: Endpoint) -> None:
        """Clear ``endpoint``'s failure count: only consecutive failures eject."""
        self._check_member(endpoint)
        self._failures.pop(endpoint, None)

    def eject(self, endpoint: Endpoint, until: float) -> None:
        """Take ``endpoint`` off the ring until time ``until`` (KETAMA-6).

        Raises:
          ValueError: if the endpoint is not in the pool.
        """
        self._check_member(endpoint)
        self._ejected[endpoint] = until
        self._rebuild()

    def restore_expired(self, now: float) -> tuple[Endpoint, ...]:
        """Put back every server whose retry time is at or before ``now``.

        Returns:
          The servers restored, in pool order.
        """
        due = [
            server.endpoint
            for server in self._full.servers
            if self._ejected.get(server.endpoint, math.inf) <= now
        ]
        if not due:
            return ()
        for endpoint in due:
            del self._ejected[endpoint]
            if self._eject_after is not None:
                # On probation: the next failure ejects again.
                self._failures[endpoint] = self._eject_after - 1
        self._rebuild()
        return tuple(due)

    def _rebuild(self) -> None:
        if not self._ejected:
            self._live = self._full
        elif len(self._ejected) == len(self._full.servers):
            self._live = None
        else:
            self._live = self._full.without(*self._ejected)

    def _check_member(self, endpoint: Endpoint) -> None:
        if all(server.endpoint != endpoint for server in self._full.servers):
            raise ValueError(f"{endpoint} is not in the pool")
