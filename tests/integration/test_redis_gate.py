"""The approval gate and desk over the real Redis adapters (fakeredis and redis-server): exact
records after each kind of decision, and the round trips each side makes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster

from adapters.redis import RedisApprovalStore, RedisSignalBus
from adapters.redis.approvals import pending_index_key
from adapters.system import SecureIdFactory
from domain.model.approval import ApprovalRequest, ApprovalStatus, DecisionSeal, Signal
from domain.model.events import Event
from domain.model.identity import Principal
from domain.runtime.feed import Subscription
from domain.services.desk import ApprovalDesk
from domain.services.gate import GateSettings
from domain.services.recheck import ApprovalRecheck
from tests.integration.commands import CommandLog, packed
from tests.unit.fakes import RecordingTool, ScriptedModel, text, tool_call
from tests.unit.harness import Harness

PLAN = json.dumps({"steps": [{"description": "Commit the work", "tool": "commit"}]})
MANAGER = Principal("mgr", "acme", "mgr", "manager")
SEAL = DecisionSeal(b"shared-by-every-instance-0123456")


def desk_decision(client: object) -> list[str]:
    """An API decision's round trips on the desk: on one server the decision script also stores and
    publishes the signal; on a cluster the signal's key is on another node, so a pipeline stores it
    after the script, and a PUBLISH follows (a cluster pipeline takes no PUBLISH)."""
    return ["EVALSHA", "PIPELINE", "PUBLISH"] if isinstance(client, RedisCluster) else ["PACKED EVALSHA"]


def settle_after_sealed(client: object) -> list[str]:
    """The run's round trips once it heard a sealed API decision: on one server none (the desk's
    script wrote the session record too, and its seal says so); on a cluster its session's record
    (one SET: the session key is in another slot than the request's)."""
    return ["SET"] if isinstance(client, RedisCluster) else []


def mget(client: object) -> str:
    """One MGET on a server; on a cluster, one per slot in a pipeline."""
    return "PIPELINE" if isinstance(client, RedisCluster) else "MGET"


def compact_json(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def redis_harness(redis_client: Redis, *, recheck_seconds: float = 60.0,
                  seal: DecisionSeal | None = None) -> tuple[Harness, RecordingTool]:
    commit = RecordingTool("commit", requires_approval=True, result={"summary": "committed"})
    model = ScriptedModel(text(PLAN), tool_call("commit", '{"value": "v"}'), text("note"), text("Done."))
    h = Harness(model, tools=[commit],
                gate_settings=GateSettings(timeout_seconds=300), recheck_seconds=recheck_seconds)
    h.store = RedisApprovalStore(redis_client)  # type: ignore[assignment]
    h.bus = RedisSignalBus(redis_client)  # type: ignore[assignment]
    h.rebuild(seal=seal)
    return h, commit


@pytest.fixture(params=[SEAL, None], ids=["shared-seal", "own-seal"])
async def harness(redis_client: Redis, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Harness, RecordingTool]]:
    # The gate shares the desk's seal key (instances configured with one AURA_HITL__SEAL_KEY), or
    # has none the desk's signals verify with (an instance left on its own random key).
    h, commit = redis_harness(redis_client, seal=request.param)
    # The server learns the decision scripts once; every test here counts steady-state round trips.
    await redis_client.script_load(h.store._swap.script)  # type: ignore[attr-defined]
    await redis_client.script_load(h.store._decide_in_place_script.script)  # type: ignore[attr-defined]
    try:
        yield h, commit
    finally:
        await h.bus.close()  # type: ignore[attr-defined]


async def until(watcher: Subscription, matches: Any) -> Event:
    while True:
        event = await watcher.next(10)
        assert event is not None, "the run went quiet"
        if matches(event):
            return event


def is_type(kind: str) -> Any:
    return lambda event: event.type.value == kind


def tool_status(status: str) -> Any:
    return lambda event: event.type.value == "tool_execution" and event.data["status"] == status


async def request_of(redis_client: Redis, request_id: str) -> ApprovalRequest:
    raw = await redis_client.get("hitl:request:" + request_id)
    assert isinstance(raw, bytes)
    return ApprovalRequest.from_record(json.loads(raw))


async def test_a_dwp_signal_is_recorded_by_the_gate_in_one_round_trip(
    redis_client: Redis, harness: tuple[Harness, RecordingTool]
) -> None:
    h, commit = harness
    _, watcher = await h.start()
    hitl = await until(watcher, is_type("hitl"))
    request_id, session = hitl.data["requestId"], hitl.data["sessionId"]
    pending = await request_of(redis_client, request_id)
    payload = b'{"type":"approval","requestId":"%s","userId":"dwp-user","timestamp":1767000005}' % request_id.encode()
    # The DWP backend: SET + PUBLISH, without touching the request record.
    await redis_client.set("hitl:signal:" + session, payload, ex=300)
    log = CommandLog(redis_client)
    await redis_client.publish("hitl:channel:" + session, payload)

    await until(watcher, tool_status("running"))

    # the gate: the decision, then its follow-ups
    assert log.take() == ["PUBLISH", packed(redis_client, "EVALSHA"), "PIPELINE"]
    # "dwp-user" is not the request's own user, so Aura cannot check it: decidedBy stays null.
    approved = pending.decide(ApprovalStatus.APPROVED, by=None, at=h.clock.timestamp(), reason=None)
    assert await redis_client.get("hitl:request:" + request_id) == compact_json(approved.to_record())
    assert await redis_client.get("hitl:session:" + session) == compact_json(approved.session_record())
    assert 1798 <= await redis_client.ttl("hitl:request:" + request_id) <= 1800
    assert 3598 <= await redis_client.ttl("hitl:session:" + session) <= 3600
    # The decision leaves the pending index alone; listing skips the decided request and drops it.
    assert await redis_client.zrange(pending_index_key("acme", "alice"), 0, -1) == [request_id.encode()]
    assert await h.store.pending_for_user("acme", "alice") == []
    assert await redis_client.zrange(pending_index_key("acme", "alice"), 0, -1) == []
    assert await redis_client.get("hitl:signal:" + session) == payload  # the gate publishes nothing
    await until(watcher, is_type("end"))
    assert commit.calls == [{"value": "v"}]


async def test_an_api_decision_is_one_round_trip_on_the_desk_and_none_on_a_gate_that_trusts_its_seal(
    redis_client: Redis, harness: tuple[Harness, RecordingTool]
) -> None:
    h, commit = harness
    desk = ApprovalDesk(h.store, h.bus, h.clock, ["manager"], SEAL)
    _, watcher = await h.start()
    hitl = await until(watcher, is_type("hitl"))
    request_id, session = hitl.data["requestId"], hitl.data["sessionId"]
    pending = await request_of(redis_client, request_id)
    log = CommandLog(redis_client)

    decided = await desk.decide(MANAGER, request_id, approve=False, reason="not now")
    events = [await until(watcher, tool_status("rejected"))]

    # The desk checks who may decide and decides, then stores the signal and publishes it. The
    # gate hears the PUBLISH, so its round trips come after, though they may go out before
    # desk.decide has returned: the log is read once, in causal order.
    desk_commands = desk_decision(redis_client)
    sealed = h.gate._seal is SEAL  # type: ignore[attr-defined]
    # The gate, on the signal: with the shared seal it knows the decision is stored, and that its
    # session's record is too (on a cluster it writes that: one SET); otherwise it records the
    # decision (finds the desk's and makes sure of its follow-ups, the session's compare-and-set
    # among them).
    gate_commands = settle_after_sealed(redis_client) if sealed else [packed(redis_client, "EVALSHA"), "PIPELINE"]
    assert log.take() == desk_commands + gate_commands
    rejected = pending.decide(ApprovalStatus.REJECTED, by="mgr", at=h.clock.timestamp(), reason="not now")
    assert decided == rejected
    assert await redis_client.get("hitl:request:" + request_id) == compact_json(rejected.to_record())
    assert await redis_client.get("hitl:session:" + session) == compact_json(rejected.session_record())
    # on one server sealed as one whose step wrote the session record too
    signal = SEAL.seal(Signal.rejection(request_id, "mgr", h.clock.timestamp(), "not now"),
                       settled=not isinstance(redis_client, RedisCluster))
    assert await redis_client.get("hitl:signal:" + session) == (
        b'{"type":"rejection","requestId":"%s","status":"rejected","reason":"not now","userId":"mgr",'
        b'"timestamp":%d,"seal":"%s"}' % (request_id.encode(), h.clock.timestamp(), str(signal.seal).encode()))
    assert events[0].data["error"] == "Rejected: not now"
    await until(watcher, is_type("end"))
    assert commit.calls == []


async def test_the_process_recheck_reads_every_waiting_request_with_one_mget_per_chunk(
    redis_client: Redis,
) -> None:
    runs = [redis_harness(redis_client) for _ in range(3)]
    first = runs[0][0]
    recheck = ApprovalRecheck(first.store, first.clock, interval_seconds=3600, chunk_size=2)
    for h, _ in runs:  # one process: every gate shares the re-check
        h.ids = SecureIdFactory()  # type: ignore[assignment]  # distinct request ids across the runs
        h.rebuild(recheck=recheck)
    try:
        watchers: list[Subscription] = []
        request_ids: list[str] = []
        for h, _ in runs:
            _, watcher = await h.start()
            request_ids.append((await until(watcher, is_type("hitl"))).data["requestId"])
            watchers.append(watcher)
        assert recheck.watching() == 3
        log = CommandLog(redis_client)

        await recheck.check()
        # 3 waits in chunks of 2; nothing decided, nobody woken (on a cluster: MGETs by slot in a pipeline)
        assert log.take() == [mget(redis_client)] * 2

        # Another instance decided the second request, and its signal was lost.
        other = RedisApprovalStore(redis_client)
        await other.decide(request_ids[1], ApprovalStatus.APPROVED, decided_by="elsewhere", decided_at=5, reason=None)
        stored = await redis_client.get("hitl:request:" + request_ids[1])
        log.take()
        await recheck.check()
        await until(watchers[1], tool_status("running"))

        # the woken run takes the stored decision as it is, and writes its session's record (an API
        # decision leaves that to the run; here it is the same record again)
        assert log.take() == [mget(redis_client)] * 2 + [packed(redis_client, "SET")]
        assert await redis_client.get("hitl:request:" + request_ids[1]) == stored
        decided = ApprovalRequest.from_record(json.loads(stored))
        assert await redis_client.get("hitl:session:" + decided.session_id) == compact_json(decided.session_record())
        await until(watchers[1], is_type("end"))
        assert runs[1][1].calls == [{"value": "v"}]
        assert runs[0][1].calls == [] and runs[2][1].calls == []
        assert recheck.watching() == 2
        pending = await RedisApprovalStore(redis_client).get_many(request_ids)
        assert [request.status if request else None for request in pending] == [
            ApprovalStatus.PENDING, ApprovalStatus.APPROVED, ApprovalStatus.PENDING]
    finally:
        for h, _ in runs:
            for handle in h.service.active():
                handle.cancel("test over")
            await asyncio.sleep(0.05)
            await h.bus.close()  # type: ignore[attr-defined]


async def test_one_approval_is_one_round_trip_on_the_run_and_one_on_the_desk(
    redis_client: Redis, harness: tuple[Harness, RecordingTool]
) -> None:
    h, _ = harness
    desk = ApprovalDesk(h.store, h.bus, h.clock, ["manager"], SEAL)
    log = CommandLog(redis_client)  # the bus's own Pub/Sub connection is not seen here
    _, watcher = await h.start()
    hitl = await until(watcher, is_type("hitl"))
    # the pending index, the request and its session in one pipeline; subscribed before it was
    # stored, the run reads no stored signal
    assert log.take() == [packed(redis_client, "ZADD EXPIRE SET SET", "PIPELINE")]

    await desk.decide(MANAGER, hitl.data["requestId"], approve=True, reason=None)
    await until(watcher, tool_status("running"))
    # the desk: the decision with the session's record and the signal stored and published (on a
    # cluster: the signal after it, the session left to the run); the run, once it heard it:
    # nothing when it trusts the desk's seal (on a cluster its session's record, one SET), else the
    # decision recorded (the session's compare-and-set among its follow-ups). Read once, in causal
    # order.
    assert log.take() == desk_decision(redis_client) + (
        settle_after_sealed(redis_client) if h.gate._seal is SEAL  # type: ignore[attr-defined]
        else [packed(redis_client, "EVALSHA"), "PIPELINE"])
    await until(watcher, is_type("end"))


_CONNECTION_SET_UP = {"info", "hello", "client|setname", "client|setinfo", "select", "ping", "script|load"}


async def _commands_run(client: Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


async def test_one_approval_costs_exactly_these_commands_on_a_real_server(real_redis: Redis) -> None:
    """The commands Redis executes for one approval, a script's own calls included (what INFO
    commandstats counts, as the bench does): the run stores the pending-index entry, the request
    and the session (one pipeline); the desk decides, writes the session's decided record, stores
    and publishes the signal (one script); the run, once it heard the signal, writes nothing (the
    signal's seal says the session record is written). Nothing else: the run's wait rides on its process's one pattern
    subscription (subscribed at start-up), and the decision leaves the pending index to be
    trimmed when it is read."""
    h, _ = redis_harness(real_redis, seal=SEAL)
    await real_redis.script_load(h.store._decide_in_place_script.script)  # type: ignore[attr-defined]
    await real_redis.script_load(h.store._swap.script)  # type: ignore[attr-defined]
    desk = ApprovalDesk(h.store, h.bus, h.clock, ["manager"], SEAL)
    try:
        async with h.bus.subscribe("sess_earlier_run"):  # the process's pattern subscription, once
            pass
        before = await _commands_run(real_redis)
        _, watcher = await h.start()
        hitl = await until(watcher, is_type("hitl"))
        await desk.decide(MANAGER, hitl.data["requestId"], approve=True, reason=None)
        await until(watcher, is_type("end"))
        await h.bus.settled()  # type: ignore[attr-defined]
        after = await _commands_run(real_redis)
    finally:
        await h.bus.close()  # type: ignore[attr-defined]
    executed = {name: n - before.get(name, 0) for name, n in after.items()
                if n != before.get(name, 0) and name not in _CONNECTION_SET_UP}
    assert executed == {
        # the run: ZADD + EXPIRE pending index, SET request, SET session
        "zadd": 1, "expire": 1,
        # the desk: EVALSHA (GET + SET request); SET session, SET signal, PUBLISH
        "evalsha": 1, "get": 1, "publish": 1,
        "set": 5,  # 2 by the run at the request, 3 by the desk (the request, the session, the signal)
    }
    assert sum(executed.values()) == 10
