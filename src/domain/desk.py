"""The approval desk: reading and deciding approval requests through Aura's own API.

Rules: a request is visible only inside its tenant (another tenant gets "not found", so ids leak
nothing); only its own user or an approver role of that tenant may read or decide it; a decision
is compare-and-set in the store and published exactly as the DWP backend publishes it, both in
one step of the store (after the read that checks who may act: two round trips in all).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from domain.approval import ApprovalRequest, ApprovalStatus, Signal
from domain.errors import Conflict, Forbidden, Gone, NotFound
from domain.gate import audit_line
from domain.identity import Principal
from domain.ports import ApprovalStore, Clock, SignalBus

log = logging.getLogger("aura.hitl")


class AlreadyDecided(Conflict):
    code = "already_decided"

    def __init__(self, request: ApprovalRequest) -> None:
        super().__init__(f"The request was already {request.status.value}.")
        self.request = request


class ApprovalExpired(Gone):
    code = "approval_expired"


class ApprovalDesk:
    def __init__(self, store: ApprovalStore, bus: SignalBus, clock: Clock, approver_roles: Collection[str]) -> None:
        self._store = store
        self._bus = bus
        self._clock = clock
        self._approver_roles = frozenset(approver_roles)

    def _may_act(self, principal: Principal, request: ApprovalRequest) -> bool:
        return principal.user_id == request.user_id or (
            principal.role is not None and principal.role in self._approver_roles)

    def _visible(self, principal: Principal, request: ApprovalRequest | None) -> ApprovalRequest:
        if request is None or request.tenant_id != principal.tenant_id:
            raise NotFound("No such approval request.", code="approval_not_found")
        if not self._may_act(principal, request):
            raise Forbidden("Only the requesting user or an approver may see or decide this request.",
                            code="not_an_approver")
        return request

    async def get(self, principal: Principal, request_id: str) -> ApprovalRequest:
        return self._visible(principal, await self._store.get(request_id))

    async def pending(self, principal: Principal) -> list[ApprovalRequest]:
        now = self._clock.now()
        return [r for r in await self._store.pending_for_user(principal.tenant_id, principal.user_id)
                if not r.is_expired_at(now)]

    async def latest_signal(self, principal: Principal, session_id: str) -> dict[str, Any]:
        raw = await self._bus.latest(session_id)
        signal = Signal.parse(raw)
        request = await self._store.get(signal.request_id) if signal else None
        if signal is None or request is None or request.tenant_id != principal.tenant_id \
                or request.session_id != session_id:
            raise NotFound("No signal for this session.", code="signal_not_found")
        if not self._may_act(principal, request):
            raise Forbidden("Only the requesting user or an approver may see this signal.", code="not_an_approver")
        return signal.to_record()

    async def decide(self, principal: Principal, request_id: str, *, approve: bool,
                     reason: str | None = None) -> ApprovalRequest:
        seen = await self._store.read(request_id)
        request = self._visible(principal, None if seen is None else seen.request)
        now = self._clock.timestamp()
        if request.status is ApprovalStatus.PENDING and request.is_expired_at(now):
            result = await self._store.decide(request_id, ApprovalStatus.EXPIRED, decided_by=None,
                                              decided_at=now, reason=None, expected=seen)
            if result is not None:
                request = result.request
        if request.status is ApprovalStatus.EXPIRED:
            raise ApprovalExpired("The approval request has expired.")
        if request.status.is_decided:
            raise AlreadyDecided(request)
        status = ApprovalStatus.APPROVED if approve else ApprovalStatus.REJECTED
        signal = (Signal.approval(request_id, principal.user_id, now) if approve
                  else Signal.rejection(request_id, principal.user_id, now, reason))
        result = await self._store.decide(request_id, status, decided_by=principal.user_id, decided_at=now,
                                          reason=None if approve else reason, expected=seen, signal=signal)
        if result is None:
            raise NotFound("No such approval request.", code="approval_not_found")
        if not result.applied:
            if result.request.status is ApprovalStatus.EXPIRED:
                raise ApprovalExpired("The approval request has expired.")
            raise AlreadyDecided(result.request)
        if not result.signalled:
            # The decision is stored and final: answering an error would make the caller retry into
            # 409. The waiting run re-reads the store every recheck_seconds, so it still sees it.
            log.warning("decided %s but could not publish its signal; the run's recheck will see it", request_id)
        audit_line("decided", result.request, via="api", actorId=principal.actor_id)
        return result.request
