"""An event is made for every event of every run by its own constructor: it stays a frozen,
comparable dataclass with the fields, defaults and keywords of the generated one."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from adapters.wire import envelope_bytes
from domain.model.events import Event, EventType, RunIds

IDS = RunIds("run_1", "ses_1", "thr_1", "t" * 32)


def test_an_event_is_made_by_position_or_keyword_with_the_dataclass_defaults() -> None:
    by_position = Event(EventType.CONTENT, 3, IDS, 7, {"content": "x", "chunk": True})
    by_keyword = Event(type=EventType.CONTENT, seq=3, ids=IDS, timestamp=7, data={"content": "x", "chunk": True})
    assert by_position == by_keyword
    assert repr(by_position) == repr(by_keyword)
    assert "encoded" not in repr(by_position)
    bare = Event(EventType.START, 1, IDS, 0)
    assert bare.data == {} and bare.encoded == []
    assert bare.encoded is not Event(EventType.START, 1, IDS, 0).encoded  # each event its own cache
    assert [f.name for f in dataclasses.fields(Event)] == ["type", "seq", "ids", "timestamp", "data", "encoded"]


def test_an_event_is_frozen_and_replace_makes_another() -> None:
    event = Event(EventType.CONTENT, 3, IDS, 7, {"content": "x", "chunk": True})
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.seq = 4  # type: ignore[misc]
    later = dataclasses.replace(event, seq=4)
    assert (later.seq, later.data, event.seq) == (4, event.data, 3)
    assert not hasattr(event, "__dict__")


def test_the_envelope_holds_any_mapping_as_an_object() -> None:
    class Frozen(dict[str, object]):
        pass

    for data in ({"content": "x"}, Frozen(content="x")):
        event = Event(EventType.CONTENT, 1, IDS, 0, data)
        assert orjson.loads(envelope_bytes(event))["data"] == {"content": "x"}
        assert orjson.loads(envelope_bytes(event))["type"] == "content"
