"""Conversation memory in Redis: a bounded list of turns per tenant, user and thread.

A thread id names a thread within one user's namespace, never globally: another user or tenant
sending the same id reaches a thread of their own, so nobody can block, read or extend someone
else's thread, and the owner is never locked out.

Keys (Aura's own; ids percent-encoded, see `keys.key_part`):
- `aura:thread:{<tenant>:<user>}:<threadId>:turns`: a list of JSON turns trimmed to the newest
  `max_turns`; it expires `ttl_seconds` after the last turn;
- `aura:threads:{<tenant>:<user>}:bytes`: a hash of the bytes each of the user's threads holds, so
  one user cannot store more than `max_user_bytes` in all; a thread whose list has expired is
  dropped from it on the user's next append.
Both carry the user's hash tag (the braces are literal): on a cluster all of a user's threads live
in one slot, which the append script, reading the user's other threads, needs.

A turn longer than `max_turn_bytes` is stored shortened (its tool notes dropped, then its prompt
and answer cut, with a visible marker)."""

from __future__ import annotations

import logging
from typing import Any, cast

import orjson
from redis.exceptions import RedisError

from adapters.redis.client import RedisClient
from adapters.redis.keys import key_part, user_tag
from domain.model.errors import StoreUnavailable
from domain.model.ports import ConversationStore

log = logging.getLogger(__name__)

CUT_MARKER = " …[shortened for memory]"
_TEXT_FIELDS = ("prompt", "answer")


def turns_key(tenant_id: str, user_id: str, thread_id: str) -> str:
    return f"{_thread_prefix(tenant_id, user_id)}{key_part(thread_id)}:turns"


def usage_key(tenant_id: str, user_id: str) -> str:
    return f"aura:threads:{user_tag(tenant_id, user_id)}:bytes"


def _thread_prefix(tenant_id: str, user_id: str) -> str:
    return f"aura:thread:{user_tag(tenant_id, user_id)}:"


# KEYS: the thread's turns, the user's usage hash. ARGV: the turn, max turns, ttl, the usage field
# (the encoded thread id), max bytes per user, the prefix of the user's turns keys.
# Returns 1 when stored, 0 when the user's threads would hold more than the limit.
_APPEND = """
local turns, usage = KEYS[1], KEYS[2]
local turn, max_turns, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local field, max_bytes, prefix = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local held = redis.call('HGETALL', usage)
local others = 0
for i = 1, #held, 2 do
  if held[i] ~= field then
    if redis.call('EXISTS', prefix .. held[i] .. ':turns') == 1 then
      others = others + tonumber(held[i + 1])
    else
      redis.call('HDEL', usage, held[i])
    end
  end
end
local kept = redis.call('LRANGE', turns, -(max_turns - 1), -1)
if max_turns == 1 then kept = {} end
local size = #turn
for _, item in ipairs(kept) do size = size + #item end
if others + size > max_bytes then return 0 end
redis.call('RPUSH', turns, turn)
redis.call('LTRIM', turns, -max_turns, -1)
redis.call('EXPIRE', turns, ttl)
redis.call('HSET', usage, field, size)
redis.call('EXPIRE', usage, ttl)
return 1
"""


class RedisConversationStore(ConversationStore):
    def __init__(self, redis: RedisClient, *, ttl_seconds: int, max_turns: int, max_turn_bytes: int,
                 max_user_bytes: int) -> None:
        self._redis = redis
        self._append = redis.register_script(_APPEND)
        self._ttl = ttl_seconds
        self._max_turns = max_turns
        self._max_turn_bytes = max_turn_bytes
        self._max_user_bytes = max_user_bytes

    async def open(self, tenant_id: str, user_id: str, thread_id: str) -> list[dict[str, Any]]:
        try:
            turns = await self._redis.lrange(turns_key(tenant_id, user_id, thread_id), 0, -1)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("Conversation memory is unavailable.") from exc
        return [cast(dict[str, Any], orjson.loads(turn)) for turn in turns]

    async def append(self, tenant_id: str, user_id: str, thread_id: str, turn: dict[str, Any]) -> bool:
        packed = fitted(turn, self._max_turn_bytes)
        try:
            stored = await self._append(
                keys=[turns_key(tenant_id, user_id, thread_id), usage_key(tenant_id, user_id)],
                args=[packed, self._max_turns, self._ttl, key_part(thread_id), self._max_user_bytes,
                 _thread_prefix(tenant_id, user_id)])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("Conversation memory is unavailable.") from exc
        if not stored:
            log.warning("a turn was not kept: the user's threads hold %d bytes at most", self._max_user_bytes)
        return bool(stored)


def fitted(turn: dict[str, Any], limit: int) -> bytes:
    """The turn as JSON of at most `limit` bytes: whole when it fits, else without its tool notes,
    then with its prompt and answer cut to what fits (each marked as shortened)."""
    packed = orjson.dumps(turn)
    if len(packed) <= limit:
        return packed
    shorter = {**turn, "tools": []}
    packed = orjson.dumps(shorter)
    excess = len(packed) - limit
    if excess <= 0:
        return packed
    texts = {name: str(shorter.get(name) or "") for name in _TEXT_FIELDS}
    room = sum(len(text.encode()) for text in texts.values()) - excess - 2 * len(CUT_MARKER.encode()) - 16
    for name, text in texts.items():
        share = max(0, room // len(texts))
        # JSON escapes may make the encoded text longer than its UTF-8 bytes: cut until it fits.
        data = text.encode()[:share].decode("utf-8", errors="ignore")
        shorter[name] = data + CUT_MARKER if len(data) < len(text) else text
    packed = orjson.dumps(shorter)
    while len(packed) > limit and any(len(str(shorter[name])) > len(CUT_MARKER) for name in _TEXT_FIELDS):
        for name in _TEXT_FIELDS:
            text = str(shorter[name]).removesuffix(CUT_MARKER)
            shorter[name] = text[: len(text) * 3 // 4] + CUT_MARKER
        packed = orjson.dumps(shorter)
    return packed
