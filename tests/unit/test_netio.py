"""bridge.netio: the busy-poll of Connection.receive stays within its bound."""

from __future__ import annotations

import socket
import time

import trio
import trio.testing

from bridge.netio import Connection, others_ready


async def test_spin_returns_data_that_is_already_there() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        connection = Connection(ours)
        theirs.sendall(b"VALUE")
        assert await connection.receive(100, spin=0.001) == b"VALUE"


async def test_spin_gives_up_after_its_bound_and_parks() -> None:
    # Nothing arrives for 100 ms: the read spins at most its 1 ms bound,
    # then waits in trio without burning CPU, and still gets the reply.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        connection = Connection(ours)
        cpu_before = time.process_time()
        async with trio.open_nursery() as nursery:

            async def reply_later() -> None:
                await trio.sleep(0.1)
                theirs.sendall(b"late")

            nursery.start_soon(reply_later)
            assert await connection.receive(100, spin=0.001) == b"late"
        # generous: the event loop's own work plus one 1 ms spin
        assert time.process_time() - cpu_before < 0.05


async def test_spin_yields_to_tasks_that_are_ready() -> None:
    # Another task is runnable: the read does not spin at all.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        connection = Connection(ours)
        ran: list[str] = []
        async with trio.open_nursery() as nursery:

            async def other() -> None:
                ran.append("other")
                theirs.sendall(b"x")

            nursery.start_soon(other)
            started = time.perf_counter()
            assert await connection.receive(100, spin=1.0) == b"x"
        assert ran == ["other"]
        assert time.perf_counter() - started < 0.5


async def test_spin_is_still_a_cancellation_point() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        connection = Connection(ours)
        theirs.sendall(b"data")
        with trio.CancelScope() as scope:
            scope.cancel()
            await connection.receive(100, spin=0.001)
        assert scope.cancelled_caught


async def test_others_ready_sees_queued_tasks() -> None:
    assert not others_ready()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.lowlevel.checkpoint)
        # Started, not yet run: queued behind this task.
        assert others_ready()
    assert not others_ready()
