"""Property: what a real SSE parser (httpx-sse over an httpx response) reads back from Aura's encoder
is exactly what was sent — for arbitrary unicode, CR, LF and CRLF in data, split at any byte."""

from __future__ import annotations

import itertools

import httpx
import orjson
import pytest
from httpx_sse import EventSource, ServerSentEvent
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapters.http.sse import DONE_FRAME, HEARTBEAT_FRAME, encode_comment, encode_event, encode_run_event
from domain.model.events import Event, EventType, RunIds

# Any unicode (hypothesis' text() has no lone surrogates, which UTF-8 cannot carry anyway), with
# line breaks of every kind mixed in often.
BREAKS = st.sampled_from(["\n", "\r", "\r\n", "\n\r", "\r\r\n", "\n\n"])
TEXT = st.lists(st.one_of(st.text(), BREAKS), max_size=8).map("".join)
FIELD = st.text().filter(lambda s: not any(c in s for c in "\r\n\0"))
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse(body: bytes, cuts: list[int]) -> list[ServerSentEvent]:
    """Feed `body` through httpx + httpx-sse in chunks cut at the given byte offsets."""
    bounds = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    response = httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=httpx.ByteStream(b"") if not chunks else _Chunks(chunks))
    return list(EventSource(response).iter_sse())


class _Chunks(httpx.SyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from self._chunks


def normalise(data: str) -> str:
    """SSE knows CRLF, CR and LF as line breaks and gives them back as LF."""
    return data.replace("\r\n", "\n").replace("\r", "\n")


@PROPS
@given(data=TEXT, event=st.none() | FIELD, event_id=st.none() | FIELD | st.integers(0, 2**63),
       retry=st.none() | st.integers(0, 10**9), cuts=st.lists(st.integers(0, 10**6), max_size=6))
@example(data="", event=None, event_id=None, retry=None, cuts=[])
@example(data="a\r\nb\rc\nd", event="x", event_id=7, retry=None, cuts=[1, 5, 9])
@example(data="\r", event=None, event_id=None, retry=None, cuts=[6])  # a CR split from its LF
@example(data="é😀", event=None, event_id=None, retry=None, cuts=[7, 8, 9])  # cut inside a code point
@example(data=" leading space", event=" spaced", event_id=" 1", retry=None, cuts=[])
@example(data="data: [DONE]", event=None, event_id=None, retry=None, cuts=[])
def test_httpx_sse_reads_back_exactly_what_was_encoded(data: str, event: str | None,
                                                       event_id: str | int | None, retry: int | None,
                                                       cuts: list[int]) -> None:
    frame = encode_event(data, event=event, event_id=event_id, retry_ms=retry)
    body = HEARTBEAT_FRAME + encode_comment("before\r\nframes") + frame + DONE_FRAME
    events = parse(body, cuts)
    assert len(events) == 2
    got, done = events
    assert got.data == normalise(data)
    assert got.event == (event or "message")  # httpx-sse reports an empty/absent type as "message"
    assert got.id == ("" if event_id is None else str(event_id))
    assert got.retry == retry
    assert done.data == "[DONE]" and done.event == "message"


def test_heartbeats_and_the_reconnect_hint_never_reach_httpx_sse_as_events() -> None:
    """httpx-sse 0.4.x dispatches an empty "message" on any blank line once a last event id is set
    (and for a retry-only block), so a heartbeat of `: ping` plus a blank line reached its callers
    as an event with empty data (`json.loads("")` fails). Aura's heartbeat is the comment line
    alone, and its reconnect hint has no blank line either."""
    assert HEARTBEAT_FRAME == b": ping\n"
    body = (encode_event("{}", event="content", event_id=3) + HEARTBEAT_FRAME + HEARTBEAT_FRAME
            + encode_event("[]", event="content", event_id=4) + HEARTBEAT_FRAME + DONE_FRAME)
    assert [(e.event, e.data, e.id) for e in parse(body, [])] == [
        ("content", "{}", "3"), ("content", "[]", "4"), ("message", "[DONE]", "4")]
    cut_short = encode_event("{}", event="content", event_id=3) + encode_comment("reconnect") + b"retry: 1000\n"
    assert [(e.event, e.data) for e in parse(cut_short, [])] == [("content", "{}")]


@PROPS
@given(frames=st.lists(st.tuples(TEXT, st.integers(1, 10**6)), min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_a_sequence_of_frames_is_read_back_in_order(frames: list[tuple[str, int]], cuts: list[int]) -> None:
    body = b"".join(encode_event(d, event="content", event_id=i) for d, i in frames) + DONE_FRAME
    events = parse(body, cuts)
    assert [(e.data, e.id, e.event) for e in events[:-1]] == [(normalise(d), str(i), "content") for d, i in frames]
    assert events[-1].data == "[DONE]"


@PROPS
@given(text=TEXT, cuts=st.lists(st.integers(0, 10**6), max_size=4))
def test_comments_of_any_text_are_invisible_to_the_parser(text: str, cuts: list[int]) -> None:
    events = parse(encode_comment(text) + encode_comment() + DONE_FRAME, cuts)
    assert [(e.event, e.data, e.id) for e in events] == [("message", "[DONE]", "")]


@PROPS
@given(before=st.text(), bad=st.sampled_from(["\r", "\n", "\0", "\r\n"]), after=st.text(),
       which=st.sampled_from(["event", "event_id"]))
def test_line_breaks_or_nul_in_single_line_fields_are_refused(before: str, bad: str, after: str,
                                                              which: str) -> None:
    with pytest.raises(ValueError, match="must not contain CR, LF or NUL"):
        encode_event("x", **{which: before + bad + after})  # type: ignore[arg-type]


def test_a_negative_retry_is_refused() -> None:
    with pytest.raises(ValueError, match="retry must not be negative"):
        encode_event("x", retry_ms=-1)


ENVELOPE_TEXT = st.text() | TEXT


@PROPS
@given(type_=st.sampled_from(list(EventType)), seq=st.integers(0, 2**63 - 1), content=ENVELOPE_TEXT,
       extra=st.dictionaries(st.text(max_size=8), ENVELOPE_TEXT, max_size=3),
       retry=st.none() | st.integers(0, 10**9))
@example(type_=EventType.CONTENT, seq=1, content="a\nb\r\nc\u2028\0", extra={}, retry=None)
def test_the_run_event_fast_path_gives_the_general_encoders_bytes(
        type_: EventType, seq: int, content: str, extra: dict[str, str], retry: int | None) -> None:
    event = Event(type_, seq, RunIds("run_1", "ses_1", "thr_1", "t" * 32), 1767000000000,
                  {**extra, "content": content})
    general = encode_event(orjson.dumps(event.envelope()).decode(), event=type_.value, event_id=f"run_1:{seq}",
                           retry_ms=retry)
    assert encode_run_event(event, retry_ms=retry) == general
    (parsed,) = parse(general + DONE_FRAME, [])[:1]
    assert parsed.id == f"run_1:{seq}"  # the id names the run: a retried POST resumes it
    assert orjson.loads(parsed.data)["data"]["content"] == content
