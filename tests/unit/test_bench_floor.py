"""The bench's approval floor writes the frames it is told to (Aura's approved run's shape), so its
CPU per approval is the same wire work without Aura's; without a body it writes one frame each side
of its wait."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from bench.apps import floor


class _Waiters(dict[str, "asyncio.Future[bytes]"]):
    """The floor's waits, telling the test when one is registered."""

    def __init__(self) -> None:
        super().__init__()
        self.registered = asyncio.Event()

    def __setitem__(self, key: str, value: asyncio.Future[bytes]) -> None:
        super().__setitem__(key, value)
        self.registered.set()


async def _approved(method: str, body: dict[str, int] | None, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    waiters = _Waiters()
    monkeypatch.setattr(floor, "_waiters", waiters)
    client = floor.app.test_client()
    call = (client.post("/wait/w1", data=orjson.dumps(body)) if method == "POST" else client.get("/wait/w1"))
    response_task = asyncio.ensure_future(call)
    await waiters.registered.wait()
    waiters["w1"].set_result(b'{"status":"running"}')
    response = await response_task
    assert response.status_code == 200
    return (await response.get_data(as_text=False)).split(b"\n\n")[:-1]


@pytest.mark.asyncio
async def test_the_same_frames_floor_writes_the_runs_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = await _approved("POST", {"before": 14, "after": 39, "size": 430}, monkeypatch)

    kinds = [frame.split(b"\n")[1] if frame.startswith(b"id:") else frame.split(b"\n")[0] for frame in frames]
    assert kinds == [b"event: content"] * 13 + [b"event: ready", b"event: tool_execution"] + \
        [b"event: content"] * 38 + [b"data: [DONE]"]
    # padded for a three-digit seq, as the /stream route's frames are: seqs 1-9 are 4 bytes shorter
    assert {len(frame) + 2 for frame in frames if frame.startswith(b"id:")} == {426, 428}
    assert "w1" not in floor._waiters  # the finished wait is forgotten


@pytest.mark.asyncio
async def test_the_wake_only_floor_writes_one_frame_each_side(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = await _approved("GET", None, monkeypatch)

    assert [frame.split(b"\n")[0] for frame in frames] == [b"event: ready", b"event: tool_execution",
                                                           b"data: [DONE]"]
