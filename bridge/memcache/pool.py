"""A table's memcache servers: one server, or a pool placed by ketama.

Theory of operation
-------------------
Each server has its own :class:`~bridge.memcache.client.MemcacheClient`
(connections, Postfix's retry loop). The pool picks the server for a key
with the libmemcached-compatible ring of :mod:`bridge.memcache.ring`, so
other clients of the same pool (pylibmc, PHP, libmemcached tools) agree
on where each key lives. A single server is a pool of one and skips the
ring.

Every command answers in the project's outcome vocabulary
(:mod:`bridge.outcome`), so the table above never sees the client's
raw results: a get is Found, NOT_FOUND or Retry; a store or delete is
WRITTEN, NotWritten (value too large, key absent) or Retry.

Error handling
--------------
A server's failure only affects its own keys: they are answered TEMP (or
by the backup, MC-16), the others as usual. With ``eject_after = N``, a
server that failed N commands in a row leaves the ring for
``retry_after`` seconds, as libmemcached's auto-eject does: its keys move
to the next servers on the ring (and are refilled there from the backup).
Ejection is off by default because moving keys makes answers change.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from bridge.endpoint import Endpoint
from bridge.memcache.client import MemcacheClient, MemcacheSettings
from bridge.memcache.ring import (
    KETAMA_WEIGHTED,
    PYLIBMC_KETAMA,
    EjectingRing,
    PoolServer,
)
from bridge.outcome import NOT_FOUND, WRITTEN, Found, NotFound, NotWritten, Retry, Written

#: Why a value was not stored; the client has already logged the sizes.
_TOO_LARGE = "value exceeds data_size_limit"


class MemcachePool:
    """get / set / set_many / delete routed to the server that holds each key.

    Implements :class:`bridge.memcache.MemcacheBackend`.

    Args:
      servers: the pool (one or more servers with weights).
      settings: the memcache_table(5) parameters shared by every server.
      ketama_hash: "one_at_a_time" (libmemcached's default) or "md5" (libketama).
      eject_after: failures in a row before a server is ejected; 0 = never.
      retry_after: seconds an ejected server stays out.
    """

    def __init__(
        self,
        servers: Sequence[PoolServer],
        settings: MemcacheSettings,
        *,
        ketama_hash: str,
        eject_after: int,
        retry_after: float,
    ) -> None:
        self._clients = {
            server.endpoint: MemcacheClient(server.endpoint, settings) for server in servers
        }
        self._single = next(iter(self._clients.values())) if len(servers) == 1 else None
        config = KETAMA_WEIGHTED if ketama_hash == "md5" else PYLIBMC_KETAMA
        self._ring = EjectingRing(
            servers, config=config, eject_after=eject_after or None, retry_after=retry_after
        )
        self._ejecting = eject_after > 0

    def _client(self, key: bytes) -> MemcacheClient | Retry:
        if self._single is not None:
            return self._single
        endpoint = self._ring.server_for(key, time.monotonic())
        if endpoint is None:
            return Retry("every memcache server of the pool is ejected")
        return self._clients[endpoint]

    def _note(self, endpoint: Endpoint, result: object) -> None:
        """Feed a command's result to the ejection bookkeeping."""
        if not self._ejecting:
            return
        if isinstance(result, Retry):
            self._ring.record_failure(endpoint, time.monotonic())
        else:
            self._ring.record_success(endpoint)

    async def get(self, key: bytes) -> Found | NotFound | Retry:
        """The value stored under ``key`` (as stored: the caller checks it), or a miss."""
        client = self._client(key)
        if isinstance(client, Retry):
            return client
        result = await client.get(key)
        self._note(client.endpoint, result)
        if isinstance(result, Retry):
            return result
        return NOT_FOUND if result is None else Found(result)

    async def set(
        self, key: bytes, value: bytes, *, flags: int, ttl: int
    ) -> Written | NotWritten | Retry:
        """Store ``value`` (MC-17); NotWritten when it exceeds data_size_limit."""
        client = self._client(key)
        if isinstance(client, Retry):
            return client
        result = await client.set(key, value, flags=flags, ttl=ttl)
        self._note(client.endpoint, result)
        if isinstance(result, Retry):
            return result
        return WRITTEN if result else NotWritten(_TOO_LARGE)

    async def delete(self, key: bytes) -> Written | NotWritten | Retry:
        """Delete ``key``; NotWritten when it was not there."""
        client = self._client(key)
        if isinstance(client, Retry):
            return client
        result = await client.delete(key)
        self._note(client.endpoint, result)
        if isinstance(result, Retry):
            return result
        return WRITTEN if result else NotWritten("not found")

    async def set_many(
        self, items: Sequence[tuple[bytes, bytes]], *, flags: int, ttl: int
    ) -> Written | Retry:
        """Bulk store, one pipelined exchange per server; the first failure is returned."""
        groups: dict[Endpoint, list[tuple[bytes, bytes]]] = {}
        for key, value in items:
            client = self._client(key)
            if isinstance(client, Retry):
                return client
            groups.setdefault(client.endpoint, []).append((key, value))
        outcome: Written | Retry = WRITTEN
        for endpoint, group in groups.items():
            result = await self._clients[endpoint].set_many(group, flags=flags, ttl=ttl)
            self._note(endpoint, result)
            if isinstance(result, Retry) and outcome is WRITTEN:
                outcome = result
        return outcome

    async def probe(self) -> list[Retry]:
        """Ask every server for its version once; the failures, if any."""
        failures = []
        for client in self._clients.values():
            failure = await client.ping()
            if failure is not None:
                failures.append(failure)
        return failures

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
