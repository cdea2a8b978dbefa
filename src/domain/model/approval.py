"""Human approval: the request's life cycle and the signal value object (contract section 4)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def is_decided(self) -> bool:
        return self is not ApprovalStatus.PENDING


class SignalType(StrEnum):
    APPROVAL = "approval"
    REJECTION = "rejection"


_SIGNAL_STATUS = {SignalType.APPROVAL: ApprovalStatus.APPROVED, SignalType.REJECTION: ApprovalStatus.REJECTED}


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    request_id: str
    session_id: str
    run_id: str
    action_type: str
    tool_name: str
    message: str
    context: Mapping[str, Any]
    user_id: str
    tenant_id: str
    created_at: int
    expires_at: int
    status: ApprovalStatus = ApprovalStatus.PENDING
    decided_at: int | None = None
    decided_by: str | None = None
    reason: str | None = None

    def decide(self, status: ApprovalStatus, *, by: str | None, at: int, reason: str | None) -> ApprovalRequest:
        """Return the decided request. Deciding twice is the caller's bug: stores make this atomic."""
        if self.status.is_decided:
            raise ValueError(f"request {self.request_id} is already {self.status}")
        if not status.is_decided:
            raise ValueError("a decision must leave the pending state")
        return replace(self, status=status, decided_at=at, decided_by=by, reason=reason)

    def is_expired_at(self, now: float) -> bool:
        return self.status is ApprovalStatus.EXPIRED or (
            self.status is ApprovalStatus.PENDING and now >= self.expires_at
        )

    def to_record(self) -> dict[str, Any]:
        """The exact JSON stored at `hitl:request:{requestId}`."""
        return {
            "requestId": self.request_id,
            "sessionId": self.session_id,
            "runId": self.run_id,
            "actionType": self.action_type,
            "toolName": self.tool_name,
            "message": self.message,
            "context": dict(self.context),
            "status": self.status.value,
            "userId": self.user_id,
            "tenantId": self.tenant_id,
            "createdAt": self.created_at,
            "expiresAt": self.expires_at,
            "decidedAt": self.decided_at,
            "decidedBy": self.decided_by,
            "reason": self.reason,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ApprovalRequest:
        return cls(
            request_id=str(record["requestId"]),
            session_id=str(record["sessionId"]),
            run_id=str(record["runId"]),
            action_type=str(record["actionType"]),
            tool_name=str(record["toolName"]),
            message=str(record["message"]),
            context=dict(record.get("context") or {}),
            status=ApprovalStatus(record["status"]),
            user_id=str(record["userId"]),
            tenant_id=str(record["tenantId"]),
            created_at=int(record["createdAt"]),
            expires_at=int(record["expiresAt"]),
            decided_at=None if record.get("decidedAt") is None else int(record["decidedAt"]),
            decided_by=record.get("decidedBy"),
            reason=record.get("reason"),
        )

    def session_record(self) -> dict[str, Any]:
        """The exact JSON stored at `hitl:session:{sessionId}`."""
        return {
            "sessionId": self.session_id,
            "runId": self.run_id,
            "requestId": self.request_id,
            "userId": self.user_id,
            "tenantId": self.tenant_id,
            "status": self.status.value,
        }


@dataclass(frozen=True, slots=True)
class Signal:
    """A decision as published on `hitl:channel:{sessionId}` and stored at `hitl:signal:{sessionId}`."""

    type: SignalType
    request_id: str
    user_id: str | None
    timestamp: int
    reason: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Set on the signals Aura's own API publishes (see DecisionSeal); absent on the DWP backend's.
    seal: str | None = None

    @property
    def status(self) -> ApprovalStatus:
        return _SIGNAL_STATUS[self.type]

    @classmethod
    def approval(cls, request_id: str, user_id: str, timestamp: int) -> Signal:
        return cls(SignalType.APPROVAL, request_id, user_id, timestamp)

    @classmethod
    def rejection(cls, request_id: str, user_id: str, timestamp: int, reason: str | None) -> Signal:
        return cls(SignalType.REJECTION, request_id, user_id, timestamp, reason)

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "type": self.type.value,
            "requestId": self.request_id,
            "status": self.status.value,
        }
        if self.type is SignalType.REJECTION:
            record["reason"] = self.reason
        record["userId"] = self.user_id
        record["timestamp"] = self.timestamp
        if self.seal is not None:
            record["seal"] = self.seal
        return record

    def to_json(self) -> str:
        return json.dumps(self.to_record(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def parse(cls, raw: str | bytes | None) -> Signal | None:
        """Parse a published or stored signal; None for anything that is not a well-formed
        approval or rejection (including JSON that repeats a key, at any depth). A `status` that
        contradicts the `type` is refused too, so a confused publisher can never turn a rejection
        into an approval."""
        if raw is None:
            return None
        try:
            record = json.loads(raw, object_pairs_hook=_unique_keys)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(record, dict):
            return None
        try:
            signal_type = SignalType(str(record.get("type")))
        except ValueError:
            return None
        request_id = record.get("requestId")
        if not isinstance(request_id, str) or not request_id:
            return None
        status = record.get("status")
        if status is not None and status != _SIGNAL_STATUS[signal_type].value:
            return None
        user_id = record.get("userId")
        reason = record.get("reason")
        timestamp = record.get("timestamp")
        seal = record.get("seal")
        return cls(
            type=signal_type,
            request_id=request_id,
            user_id=user_id if isinstance(user_id, str) else None,
            timestamp=timestamp if isinstance(timestamp, int) and not isinstance(timestamp, bool) else 0,
            reason=reason if isinstance(reason, str) else None,
            seal=seal if isinstance(seal, str) else None,
        )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key repeats: Python keeps the last value, another DWP
    component may keep the first, and a signal must mean the same to every reader."""
    record = dict(pairs)
    if len(record) != len(pairs):
        raise ValueError("a key repeats in a JSON object")
    return record


# The prefix of a seal that says the session record was written too (no base64url character is a dot).
_SETTLED = "s."


class DecisionSeal:
    """Marks the signals of decisions Aura's API has already stored.

    The approval store publishes such a signal only in the atomic step that recorded its decision,
    so a waiting run that finds a valid seal knows the stored request says exactly what the signal
    says, and need not record it again (one store round trip less per approval). The seal is an
    HMAC-SHA256 over the request id and the decision, with a key every instance shares: a signal
    without one or with a wrong one (the DWP backend's, a copy of another request's, another
    deployment's) is recorded in the store first, as any signal is.

    A store whose decision step also wrote the session's decided record publishes the signal
    sealed as such (`settled=True`: the seal starts with `s.` and covers that claim too), and the
    run that waited writes nothing more. A run of an earlier version does not verify that seal and
    records the signal as any other (finding it decided, it changes nothing); a plain seal (an
    earlier version's desk, or a store that could not write the session) leaves the session record
    to the run, as before.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a decision seal needs a key of at least 16 bytes")
        # Keyed once: each seal copies it instead of hashing the key again.
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def _mac(self, signal: Signal, settled: bool = False) -> str:
        fields: list[Any] = [signal.request_id, signal.type.value, signal.user_id, signal.timestamp, signal.reason]
        if settled:
            fields.append(_SETTLED)
        decision = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        mac = self._keyed.copy()
        mac.update(decision)
        digest = mac.digest()[:16]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def seal(self, signal: Signal, *, settled: bool = False) -> Signal:
        return replace(signal, seal=_SETTLED + self._mac(signal, True) if settled else self._mac(signal))

    def verifies(self, signal: Signal) -> bool:
        """Whether Aura's API stored this decision (the seal either kind)."""
        seal = signal.seal
        if seal is None:
            return False
        if seal.startswith(_SETTLED):
            return hmac.compare_digest(seal, _SETTLED + self._mac(signal, True))
        return hmac.compare_digest(seal, self._mac(signal))

    @staticmethod
    def settled(signal: Signal) -> bool:
        """Of a signal `verifies` accepts (its seal covers this claim): whether the step that stored
        its decision also wrote the session's decided record."""
        return signal.seal is not None and signal.seal.startswith(_SETTLED)

    def decided(self, request: ApprovalRequest, signal: Signal) -> ApprovalRequest:
        """The request as the sealed signal's store step decided it (the desk decides with the
        signal's user, timestamp and reason)."""
        return request.decide(signal.status, by=signal.user_id, at=signal.timestamp, reason=signal.reason)


@dataclass(frozen=True, slots=True)
class Decider:
    """Who asks Aura's API to decide. A store given one applies the decision only while
    `may_decide` holds for the stored request, in the same atomic step (the Redis store mirrors
    these rules in its script), so checking and deciding take one round trip."""

    tenant_id: str
    user_id: str
    approver: bool  # holds an approver role: may decide any request of the tenant

    def may_see(self, request: ApprovalRequest) -> bool:
        return request.tenant_id == self.tenant_id and (self.approver or request.user_id == self.user_id)

    def may_decide(self, request: ApprovalRequest, at: int) -> bool:
        return self.may_see(request) and request.status is ApprovalStatus.PENDING and at < request.expires_at


@dataclass(frozen=True, slots=True)
class StoredApproval:
    """A request as a store read or wrote it. `version` is the store's exact stored form (opaque to
    the domain): a decision based on it applies only while the store still holds exactly that."""

    request: ApprovalRequest
    version: bytes


@dataclass(frozen=True, slots=True)
class DecisionResult:
    """Outcome of an atomic decide: `applied` is False when another decision had already won;
    `request` is then that winning state. `signalled` is True when the decision's signal was
    stored and published in the same step (only when one was asked for and the decision applied)."""

    applied: bool
    request: ApprovalRequest
    signalled: bool = False
