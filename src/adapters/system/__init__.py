"""Standard-library implementations of the clock and id ports."""

from __future__ import annotations

import secrets
import time

from domain.model.ports import Clock, IdFactory


class SystemClock(Clock):
    def now(self) -> float:
        return time.time()  # epoch seconds are UTC by definition; never a local wall clock


class SecureIdFactory(IdFactory):
    """128 random bits from the OS CSPRNG, hex encoded, behind a readable prefix."""

    def new_id(self, prefix: str) -> str:
        token = secrets.token_hex(16)
        return f"{prefix}_{token}" if prefix else token
