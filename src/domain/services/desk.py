"""The approval desk: reading and deciding approval requests through Aura's own API.

Rules: a request is visible only inside its tenant (another tenant gets "not found", so ids leak
nothing); only its own user or an approver role of that tenant may read or decide it; a decision
is compare-and-set in the store, checked against who may decide and published exactly as the DWP
backend publishes it, all in one step of the store (one round trip). Its signal carries a seal
(`DecisionSeal`) that tells the waiting run the decision is already stored.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from domain.model.approval import ApprovalRequest, ApprovalStatus, Decider, DecisionSeal, Signal
from domain.model.errors import AlreadyDecided, ApprovalExpired, NotFound
from domain.model.identity import Principal
from domain.model.ports import ApprovalStore, Clock, SignalBus
from domain.services.gate import audit_line

log = logging.getLogger("aura.hitl")


class ApprovalDesk:
    def __init__(self, store: ApprovalStore, bus: SignalBus, clock: Clock, approver_roles: Collection[str],
                 seal: DecisionSeal) -> None:
        self._store = store
        self._seal = seal
        self._bus = bus
        self._clock = clock
        self._approver_roles = frozenset(approver_roles)

    def _decider(self, principal: Principal) -> Decider:
        return Decider(principal.tenant_id, principal.user_id,
                       approver=principal.role is not None and principal.role in self._approver_roles)

    def _visible(self, principal: Principal, request: ApprovalRequest | None) -> ApprovalRequest:
        # Someone who may not see a request gets exactly the answer for an unknown id: a 403 would
        # tell a colleague which ids exist.
        if request is None or request.tenant_id != principal.tenant_id or not self._decider(principal).may_see(request):
            raise NotFound("No such approval request.", code="approval_not_found")
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
                or request.session_id != session_id or not self._decider(principal).may_see(request):
            raise NotFound("No signal for this session.", code="signal_not_found")
        return replace(signal, seal=None).to_record()  # the seal is for Aura's instances, not for readers

    async def decide(self, principal: Principal, request_id: str, *, approve: bool,
                     reason: str | None = None) -> ApprovalRequest:
        now = self._clock.timestamp()
        status = ApprovalStatus.APPROVED if approve else ApprovalStatus.REJECTED
        unsealed = (Signal.approval(request_id, principal.user_id, now) if approve
                    else Signal.rejection(request_id, principal.user_id, now, reason))
        # One store step checks who may decide and decides (and, where the store can, writes the
        # session's record too, saying so in the signal's seal: the waiting run then writes
        # nothing); only a refusal costs more, to say why.
        result = await self._store.decide(request_id, status, decided_by=principal.user_id, decided_at=now,
                                          reason=None if approve else reason, signal=self._seal.seal(unsealed),
                                          decider=self._decider(principal),
                                          settled_signal=self._seal.seal(unsealed, settled=True))
        if result is None:
            raise NotFound("No such approval request.", code="approval_not_found")
        if not result.applied:
            raise await self._refusal(principal, result.request, now)
        if not result.signalled:
            # The decision is stored and final: answering an error would make the caller retry into
            # 409. The waiting run re-reads the store every recheck_seconds, so it still sees it.
            log.warning("decided %s but could not publish its signal; the run's recheck will see it", request_id)
        audit_line("decided", result.request, via="api", actorId=principal.actor_id)
        return result.request

    async def _refusal(self, principal: Principal, request: ApprovalRequest, now: int) -> Exception:
        request = self._visible(principal, request)  # raises for another tenant or user
        if request.status is ApprovalStatus.PENDING and request.is_expired_at(now):
            expired = await self._store.decide(request.request_id, ApprovalStatus.EXPIRED, decided_by=None,
                                               decided_at=now, reason=None)
            if expired is None:
                return NotFound("No such approval request.", code="approval_not_found")
            request = expired.request
        if request.status is ApprovalStatus.EXPIRED:
            return ApprovalExpired("The approval request has expired.")
        if request.status.is_decided:
            return AlreadyDecided(request)
        raise AssertionError(f"the store refused a decision its rules allow on {request.request_id}")
