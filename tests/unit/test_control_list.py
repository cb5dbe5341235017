"""GET /v1/sessions built from cached row text: the same answer as the dict-per-session encoding, byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any, cast

from aiohttp.test_utils import make_mocked_request

from gateway.control.api import LIST_CHUNK, WRITE_CHUNK, ControlAPI
from gateway.kinds import Protocol, Reason
from gateway.sessions.model import SessionSpec
from tests.unit.test_registry import make_harness


def jump_spec(user: str, vm: str, i: int) -> SessionSpec:
    return SessionSpec(
        user=user,
        source_ip="2001:db8::7" if i % 2 else "203.0.113.7",
        source_port=50000 + i,
        vm=vm,
        target_address="10.0.0.5",
        target_port=22 + i % 3,
        protocol=Protocol.SSH_JUMP if i % 3 else Protocol.SSH,
        login=None if i % 3 else "deploy",
        connection_id=f"c{i}",
        client_name='WS-\u00e9"quoted"' if i == 4 else None,
    )


def old_answer(api: ControlAPI, h_list: list[object], node: str) -> str:
    """What list_sessions answered before: a dict per session through json.dumps, sorted by started_at."""
    rows = [api._view(s) for s in h_list]  # type: ignore[arg-type]
    rows.sort(key=lambda r: r["started_at"])
    return json.dumps({"sessions": rows, "node": node})


async def test_list_answer_is_unchanged() -> None:
    """Sessions of several users, protocols and states (bytes moved, a pending end, ended): the old bytes, every filter too."""
    h = make_harness()
    api = ControlAPI(h.registry, (), h.clock, h.registry._log, node="gw1")
    async with contextlib.AsyncExitStack() as stack:
        sessions = []
        for i in range(LIST_CHUNK + 7):  # more than one chunk: the loop is given back in between
            h.clock.mono += 0.0015
            sessions.append(await stack.enter_async_context(h.registry.open(jump_spec("alice" if i % 4 else "bob", f"vm{i % 2}", i))))
        sessions[1].add_up(123)
        sessions[1].add_down(4567)
        h.registry.terminate(sessions[2].id, "maintenance", grace=30)
        sessions[3].end(Reason.VM_CLOSED)
        h.clock.mono += 12.3456
        for query in ("", "?user=bob", "?vm=vm1", "?protocol=ssh-jump", "?user=alice&vm=vm0&protocol=ssh", "?user=nobody"):
            q = make_mocked_request("GET", "/v1/sessions" + query).query
            expected = [s for s in h.registry.list() if all(getattr(s, k) == v for k, v in q.items())]
            assert (await api._session_list(q)).decode() == old_answer(api, expected, "gw1"), query  # type: ignore[arg-type]
        states = {r["id"]: r["state"] for r in json.loads(await api._session_list({}))["sessions"]}
        assert (states[sessions[2].id], states[sessions[3].id], states[sessions[0].id]) == ("terminating", "closed", "active")


async def test_bytes_and_state_are_read_on_every_list() -> None:
    """A row's cached text follows the session: bytes, a pending end and the end show on the next list."""
    h = make_harness()
    api = ControlAPI(h.registry, (), h.clock, h.registry._log, node="gw1")
    async with h.registry.open(jump_spec("alice", "vm0", 1)) as s:
        first = json.loads(await api._session_list({}))["sessions"][0]
        s.add_down(99)
        h.registry.terminate(s.id, "later", grace=60)
        h.clock.mono += 2
        second = json.loads(await api._session_list({}))["sessions"][0]
        s.end(Reason.VM_CLOSED)
        third = json.loads(await api._session_list({}))["sessions"][0]
    assert (first["bytes_down"], first["state"], first["ends_at"]) == (0, "active", None)
    assert (second["bytes_down"], second["state"], second["duration_s"]) == (99, "terminating", first["duration_s"] + 2)
    assert second["ends_at"] is not None
    assert (third["state"], third["ends_at"], third["bytes_down"]) == ("closed", None, 99)


class _RecordingWriter:
    """The response's payload writer: what the handler hands to the transport, and how often the loop turned meanwhile."""

    def __init__(self, turns: list[int]) -> None:
        self._turns = turns
        self.writes: list[tuple[int, int]] = []  # (bytes, loop turns seen so far)
        self.body = bytearray()
        self.buffer_size = 0
        self.output_size = 0
        self.length: int | None = None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append((len(data), self._turns[0]))
        self.body += data

    async def write_headers(self, status_line: str, headers: object) -> None:
        pass

    async def write_eof(self, data: bytes = b"") -> None:
        self.body += data

    async def drain(self) -> None:
        pass

    def enable_chunking(self) -> None:
        pass

    def enable_compression(self, encoding: str = "deflate", strategy: object = None) -> None:
        pass

    def send_headers(self) -> None:
        pass

    def set_eof(self) -> None:
        pass


@contextlib.asynccontextmanager
async def loop_turns() -> AsyncIterator[list[int]]:
    """[n]: how many times another task has run so far (it runs once per turn of the loop until the block ends)."""
    turns = [0]
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            turns[0] += 1
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(ticker(), name="ticker")
        try:
            yield turns
        finally:
            stop.set()


async def test_a_long_list_goes_out_in_small_slices_with_the_loop_given_back() -> None:
    """1,500 sessions: the answer reaches the transport in slices of about WRITE_CHUNK bytes (never the whole list or
    a quarter of a MiB at once), and other tasks run between any two slices, so relays are not held up by TLS."""
    h = make_harness()
    api = ControlAPI(h.registry, (), h.clock, h.registry._log, node="gw1")

    async with contextlib.AsyncExitStack() as stack:
        for i in range(1500):
            await stack.enter_async_context(h.registry.open(jump_spec("alice", f"vm{i % 2}", i)))
        expected = await api._session_list({})
        async with loop_turns() as turns:
            writer = _RecordingWriter(turns)
            request = make_mocked_request("GET", "/v1/sessions", writer=writer)
            await api.list_sessions(request)
    assert bytes(writer.body) == expected
    sizes = [n for n, _ in writer.writes]
    longest_row = max(len(json.dumps(r)) for r in json.loads(expected)["sessions"])
    assert len(sizes) > 2
    assert max(sizes) <= WRITE_CHUNK + longest_row + 2
    seen = [t for _, t in writer.writes]
    assert all(b > a for a, b in itertools.pairwise(seen)), seen


async def test_a_heartbeat_of_many_sessions_gives_the_loop_back() -> None:
    """A cluster node's (or worker's) heartbeat of 1,500 sessions holds every row as one json.dumps line each,
    and other tasks run while it is encoded (one stretch of 9,000 rows held every relay up, every heartbeat)."""
    from gateway.sessions.cluster import RedisCluster

    h = make_harness()
    cluster = RedisCluster(
        h.registry, "gw1.w1", "unix:///nowhere", heartbeat=1.0, node_ttl=3.0, timeout=1.0, log=h.registry._log, clock=h.clock
    )

    async with contextlib.AsyncExitStack() as stack:
        for i in range(1500):
            await stack.enter_async_context(h.registry.open(jump_spec("alice", f"vm{i % 2}", i)))
        async with loop_turns() as turns:
            before = turns[0]
            at, count, payload = await cluster._heartbeat_payload()
            during = turns[0] - before
        head, *lines = payload.split("\n")
        assert json.loads(head) == {"node": "gw1.w1", "at": at, "sessions": 1500} and count == 1500
        assert [json.loads(line) for line in lines] == [s.as_dict() for s in h.registry.list()]
        # The next beat re-encodes only the rows that moved, and still shows every row as it is now.
        live = h.registry.sessions()
        live[3].add_up(1234)
        live[7].add_down(99)
        h.registry.terminate(live[11].id, "maintenance", grace=60.0)
        _, _, again = await cluster._heartbeat_payload()
        head, *lines = again.split("\n")
        assert [json.loads(line) for line in lines] == [s.as_dict() for s in h.registry.list()]
        moved = [i for i, (a, b) in enumerate(zip(payload.split("\n")[1:], lines, strict=True)) if a != b]
        assert moved == [3, 7, 11]
        assert json.loads(lines[11])["state"] == "terminating"
    assert during >= 1500 // 256


def test_duration_text_is_repr_of_round() -> None:
    """The list's duration, formatted from integer microseconds, is `repr(round(us / 10**6, 3))` for every kind of
    value: ties (left to round()), zero and below, whole seconds, days, years, and the float's far end."""
    import random

    from gateway.control.api import _duration_text

    rng = random.Random(13)
    values = [0, -1, -(10**9), 1, 499, 500, 501, 999, 1000, 1499, 1500, 1501, 2500, 10**6, 10**6 + 500, 86_400 * 10**6, 10**15, 10**18 + 7]
    values += [rng.randrange(0, 10**13) for _ in range(50_000)] + [rng.randrange(0, 10**7) for _ in range(50_000)]
    values += [rng.randrange(0, 10**9) * 1000 + 500 for _ in range(2_000)]
    for us in values:
        assert _duration_text(us) == repr(round(max(0.0, us / 1_000_000), 3)), us


async def test_other_nodes_rows_are_listed_as_they_wrote_them() -> None:
    """Another node's heartbeat lines go into this node's list without a dict per row: each is that session's
    as_dict() plus its duration on this node's clock, in started_at order with this node's rows, filters apply to
    them, and a line that is not a row is left out."""
    from gateway.sessions.cluster import RedisCluster, RemoteView

    here, there = make_harness(), make_harness()
    there.registry._node = "gw2"
    other = RedisCluster(
        there.registry, "gw2", "unix:///nowhere", heartbeat=1.0, node_ttl=3.0, timeout=1.0, log=there.registry._log, clock=there.clock
    )

    class OneOtherNode:  # the cluster as the list reads it: the other nodes' rows, already read from Redis
        def __init__(self, lines: list[str]) -> None:
            self.lines = lines

        async def view(self) -> RemoteView:
            return RemoteView(self.lines, {"gw1": "t", "gw2": "t"}, False)

    async with contextlib.AsyncExitStack() as stack:
        for i in range(6):
            here.clock.mono += 1.0
            there.clock.mono = here.clock.mono + 0.5  # the other node's sessions start half a second after each of ours
            await stack.enter_async_context(here.registry.open(jump_spec("alice" if i % 2 else "bob", f"vm{i % 2}", i)))
            await stack.enter_async_context(there.registry.open(jump_spec("carol" if i % 2 else "bob", f"vm{i % 3}", 100 + i)))
        theirs = there.registry.sessions()
        theirs[1].add_up(77)
        there.registry.terminate(theirs[2].id, "maintenance", grace=30)
        _, _, doc = await other._heartbeat_payload()
        lines = [*doc.split("\n")[1:], '{"id": "not one of ours"', "garbage"]
        api = ControlAPI(here.registry, (), here.clock, here.registry._log, node="gw1", cluster=cast(Any, OneOtherNode(lines)))
        here.clock.mono += 12.3456
        now = here.clock.now()
        for query in ("", "?user=bob", "?vm=vm2", "?protocol=ssh", "?user=carol&vm=vm1"):
            q = make_mocked_request("GET", "/v1/sessions" + query).query
            answer = json.loads(await api._session_list(q))
            mine = [api._view(s) for s in here.registry.list() if all(str(getattr(s, k)) == v for k, v in q.items())]
            other_rows = [
                {**s.as_dict(), "duration_s": round((now - s.started_at).total_seconds(), 3)}
                for s in there.registry.list()
                if all(str(getattr(s, k)) == v for k, v in q.items())
            ]
            expected = sorted([*mine, *other_rows], key=lambda r: r["started_at"])
            assert answer["sessions"] == expected, query
            assert answer["nodes"] == {"gw1": "t", "gw2": "t"} and answer["degraded"] is False
        assert {r["state"] for r in json.loads(await api._session_list({}))["sessions"] if r["node"] == "gw2"} == {"active", "terminating"}
