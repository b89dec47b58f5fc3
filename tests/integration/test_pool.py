"""Memcache pools through the daemon: placement, a down server, ejection."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from bridge.endpoint import InetEndpoint
from bridge.memcache.ring import KetamaRing
from tests.integration.conftest import NextPort, StartBridge
from tests.integration.harness import Memcached, postmap_query, run_memcached

KEYS = [f"user{i}@example.com" for i in range(24)]


@contextlib.contextmanager
def three_servers() -> Iterator[list[Memcached]]:
    with run_memcached() as a, run_memcached() as b, run_memcached() as c:
        yield [a, b, c]


def _config(path: Path, port: int, servers: list[Memcached], extra: str = "") -> Path:
    pool = ", ".join(f'"{server.endpoint}"' for server in servers)
    path.write_text(
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'
        f"[tables.pool]\nmemcache = [{pool}]\n{extra}"
    )
    return path


def _placement(servers: list[Memcached]) -> dict[str, Memcached]:
    """Where libmemcached (and so the bridge) puts each key: the ring's answer."""
    ring = KetamaRing([InetEndpoint("127.0.0.1", server.port) for server in servers])
    by_port = {server.port: server for server in servers}
    placed = {}
    for key in KEYS:
        endpoint = ring.server_for(key.encode())
        assert isinstance(endpoint, InetEndpoint)
        placed[key] = by_port[endpoint.port]
    return placed


def test_keys_are_read_from_their_ketama_server_and_a_down_server_costs_only_its_keys(
    tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> None:
    port = ports()
    table = f"socketmap:inet:127.0.0.1:{port}:pool"
    with three_servers() as servers:
        placed = _placement(servers)
        assert len({server.port for server in placed.values()}) == 3
        for key, server in placed.items():
            server.set(key.encode(), b"on-" + str(server.port).encode())
        start_bridge(_config(tmp_path / "bridge.toml", port, servers))
        for key, server in placed.items():
            assert postmap_query(key, table).outcome == f"found:on-{server.port}"
        down = servers[1]
        down.process.kill()
        down.process.wait()
        for key, server in placed.items():
            outcome = postmap_query(key, table).outcome
            if server is down:
                assert outcome == "error", key  # TEMP, never "not found"
            else:
                assert outcome == f"found:on-{server.port}", key


def test_backup_answers_for_a_down_server_and_ejection_moves_its_keys(
    tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> None:
    port = ports()
    table = f"socketmap:inet:127.0.0.1:{port}:pool"
    backup = tmp_path / "backup"
    backup.write_text("".join(f"{key} from-backup\n" for key in KEYS))
    with three_servers() as servers:
        placed = _placement(servers)
        extra = f'backup = "texthash:{backup}"\neject_after = 1\nretry_after = 600\n'
        start_bridge(_config(tmp_path / "bridge.toml", port, servers, extra))
        down = servers[0]
        victims = [key for key, server in placed.items() if server is down]
        assert victims
        down.process.kill()
        down.process.wait()
        # A down server's keys are answered by the backup (MC-16) ...
        for key in victims:
            assert postmap_query(key, table).outcome == "found:from-backup"
        # ... and once ejected, its keys live on the surviving servers: the
        # backup's answers were refilled there, as libmemcached would place them.
        survivors = KetamaRing([InetEndpoint("127.0.0.1", s.port) for s in servers]).without(
            InetEndpoint("127.0.0.1", down.port)
        )
        by_port = {server.port: server for server in servers}
        for key in victims:
            assert postmap_query(key, table).outcome == "found:from-backup"
            endpoint = survivors.server_for(key.encode())
            assert isinstance(endpoint, InetEndpoint)
            assert by_port[endpoint.port].get(key.encode()) == (0, b"from-backup"), key
