"""Payloads shared by the baseline servers: envelopes shaped like Aura's, padded to a given size,
so every server streams the same number of events of the same mean size."""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson


def envelope(seq: int, run_id: str, content: str) -> dict[str, Any]:
    return {"type": "content", "version": "1.0", "seq": seq, "runId": run_id, "sessionId": run_id,
            "threadId": run_id, "traceId": run_id, "timestamp": int(time.time()),
            "data": {"content": content, "chunk": True}}


def frame_bytes(seq: int, run_id: str, content: str) -> bytes:
    """What Aura's encoder writes for one event: id, event and one data line."""
    data = orjson.dumps(envelope(seq, run_id, content))
    return b"id: %d\nevent: content\ndata: %s\n\n" % (seq, data)


def pad_for(size: int, run_id: str) -> int:
    """Characters of content that make one frame `size` bytes long (at least 1)."""
    bare = len(frame_bytes(100, run_id, ""))
    return max(1, size - bare)


def new_run_id() -> str:
    return "run_" + secrets.token_hex(16)
