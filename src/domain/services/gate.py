"""The approval gate: stop before a risky action until a human decides (contract section 4)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from domain.model.approval import ApprovalRequest, ApprovalStatus, DecisionSeal, Signal
from domain.model.errors import ApprovalTimeout, RunCancelled, StoreUnavailable
from domain.model.events import EventType, RunStatus
from domain.model.plan import PlanStep, StepStatus
from domain.model.ports import ApprovalStore, Clock, IdFactory, SignalBus
from domain.model.run import Run
from domain.model.telemetry import Telemetry
from domain.runtime.waits import Backoff
from domain.services.recheck import ApprovalRecheck

log = logging.getLogger("aura.hitl")
audit = logging.getLogger("aura.audit")

# Writing the session record of a decision heard from elsewhere: attempts, and the pauses between
# them (0.05, 0.1, 0.2 s: at most 0.35 s more before the run goes on; each attempt has the Redis
# client's own retries inside it).
SETTLE_ATTEMPTS = 4
SETTLE_BACKOFF_SECONDS = 0.05
SETTLE_BACKOFF_MAX_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class GateSettings:
    """Values come from the settings (app/settings.py, the one place a default is written)."""

    timeout_seconds: float


def audit_line(event: str, request: ApprovalRequest, **extra: Any) -> None:
    audit.info(
        "hitl %s", event,
        extra={"audit": {
            "event": event, "requestId": request.request_id, "sessionId": request.session_id,
            "runId": request.run_id, "tenantId": request.tenant_id, "userId": request.user_id,
            "toolName": request.tool_name, "actionType": request.action_type,
            "status": request.status.value, "decidedBy": request.decided_by,
            "decidedAt": request.decided_at, "reason": request.reason, **extra,
        }},
    )


class ApprovalGate:
    def __init__(self, store: ApprovalStore, bus: SignalBus, clock: Clock, ids: IdFactory,
                 settings: GateSettings, telemetry: Telemetry, recheck: ApprovalRecheck,
                 seal: DecisionSeal | None = None) -> None:
        self._telemetry = telemetry
        # The seal Aura's API puts on its signals; without it every signal is recorded in the store.
        self._seal = seal
        self._store = store
        self._bus = bus
        self._clock = clock
        self._ids = ids
        self._settings = settings
        # One per process: every waiting run's request is re-read from the store each interval, so
        # a decision whose signal was lost (publisher crashed between SET and PUBLISH, Pub/Sub
        # outage) is still seen.
        self._recheck = recheck

    async def await_decision(self, run: Run, step: PlanStep, tool_name: str, action_type: str,
                             args: Mapping[str, Any], message: str) -> ApprovalRequest:
        """Subscribe, store, announce, wait. Returns the decided request (approved or rejected);
        raises ApprovalTimeout when nobody decided in time.

        Subscribed before the request is stored, so before anyone can know of it: every signal
        for it arrives on the subscription, and no stored signal needs reading first."""
        now = self._clock.timestamp()
        # The arguments are not copied into the request: both are kept for the whole wait.
        request = ApprovalRequest(
            request_id=self._ids.new_id("req"), session_id=run.ids.session_id, run_id=run.ids.run_id,
            action_type=action_type, tool_name=tool_name, message=message, context=args,
            user_id=run.principal.user_id, tenant_id=run.principal.tenant_id,
            created_at=now, expires_at=now + int(self._settings.timeout_seconds),
        )
        timeline_id = f"approval_{step.index}_{run.tool_calls}"
        timeline_title = f"Approval: {tool_name}"
        async with self._bus.subscribe(run.ids.session_id) as subscription:
            try:
                await self._store.create(request)
            except asyncio.CancelledError:
                # The write may have reached the store before the cancellation did: a request left
                # pending there would wait for a decision nobody waits for.
                await asyncio.shield(self._store.decide(request.request_id, ApprovalStatus.CANCELLED,
                                                        decided_by=None, decided_at=self._clock.timestamp(),
                                                        reason=None))
                raise
            audit_line("requested", request, actorId=run.principal.actor_id)
            self._telemetry.approval_wait_started()
            waited_from = self._clock.now()
            outcome = "cancelled"
            try:
                run.pending_approval = request
                run.status = RunStatus.WAITING_APPROVAL
                await run.emit(EventType.HITL, {
                    "requestId": request.request_id, "sessionId": request.session_id,
                    "actionType": action_type, "message": message, "context": dict(args),
                    "requiresApproval": True, "expiresAt": request.expires_at,
                })
                await run.step_update(step, StepStatus.WAITING_APPROVAL, step.progress,
                                      f"Waiting for approval of {tool_name}")
                await run.timeline_update(timeline_id, timeline_title, StepStatus.WAITING_APPROVAL, 0.0)
                # The wait is in this frame, not a coroutine of its own: a parked run's chain of
                # suspended frames is what every parked run holds (pinned by test_memory.py). Two
                # ways out: a signal on the channel; and the process's re-check, which wakes this
                # wait when the stored request was decided without a signal reaching it, vanished,
                # or reached its expiry (by the re-check's timer at the earliest expiry of the
                # process). `unsettled`: someone else stored the decision and not its session's
                # record (that is then this run's to write).
                signalled = subscription.receive()
                rechecked = self._recheck.watch(request, also=signalled)
                try:
                    while True:
                        if request.expires_at - self._clock.now() <= 0:
                            unsettled = False
                            decided = await self._close(request, ApprovalStatus.EXPIRED, None)
                            break
                        # The pending request itself when the signal came or its expiry is due;
                        # the request as re-read when it was decided; None when it vanished.
                        current = await rechecked
                        if current is None:  # vanished (flushed) or unreadable: nothing can approve it now
                            unsettled = False
                            decided = await self._close(request, ApprovalStatus.EXPIRED, None)
                            break
                        if current.status.is_decided:
                            decided, unsettled = current, True
                            break
                        del current
                        if not signalled.done():
                            rechecked = self._recheck.watch(request, also=signalled)  # its expiry is due
                            continue
                        raw = signalled.result()
                        signalled = subscription.receive()
                        # watched again before the signal is considered: a decision the re-check
                        # finds meanwhile wakes the next round
                        rechecked = self._recheck.watch(request, also=signalled)
                        considered = await self._consider(request, raw)
                        del raw
                        if considered is not None:
                            decided, unsettled = considered
                            break
                finally:
                    self._recheck.unwatch(request.request_id, rechecked)
                    if not signalled.done():
                        signalled.cancel()
                    elif not signalled.cancelled():
                        signalled.exception()  # a failure after the wait ended is not news
                outcome = decided.status.value
            except asyncio.CancelledError:
                await asyncio.shield(self._close(request, ApprovalStatus.CANCELLED, None))
                raise
            finally:
                self._telemetry.approval_wait_ended(outcome, self._clock.now() - waited_from)
                run.pending_approval = None
                if run.status is RunStatus.WAITING_APPROVAL:
                    run.status = RunStatus.RUNNING
        # A decision stored by someone else, its session's record not: that is this run's to write, beside
        # the events that report the decision (and before this returns, so the run's next request
        # cannot overtake it).
        settling = asyncio.ensure_future(self._settle_session(decided)) if unsettled else None
        try:
            return await self._report(run, step, tool_name, decided, timeline_id, timeline_title)
        finally:
            if settling is not None:
                await asyncio.shield(settling)

    async def _report(self, run: Run, step: PlanStep, tool_name: str, decided: ApprovalRequest,
                      timeline_id: str, timeline_title: str) -> ApprovalRequest:
        if decided.status is ApprovalStatus.APPROVED:
            await run.timeline_update(timeline_id, timeline_title, StepStatus.COMPLETED, 1.0)
            await run.step_update(step, StepStatus.IN_PROGRESS, step.progress, f"{tool_name} approved")
            return decided
        if decided.status is ApprovalStatus.REJECTED:
            await run.timeline_update(timeline_id, timeline_title, StepStatus.SKIPPED, 1.0)
            await run.step_update(step, StepStatus.IN_PROGRESS, step.progress, f"{tool_name} rejected")
            return decided
        await run.timeline_update(timeline_id, timeline_title, StepStatus.FAILED, 1.0)
        if decided.status is ApprovalStatus.CANCELLED:
            raise RunCancelled("The run was cancelled while it waited for approval.")
        raise ApprovalTimeout(f"Nobody approved {tool_name} within {int(self._settings.timeout_seconds)} s.")

    async def _consider(self, request: ApprovalRequest, raw: str | bytes) -> tuple[ApprovalRequest, bool] | None:
        signal = Signal.parse(raw)
        if signal is None:
            log.warning("ignored a malformed signal on session %s", request.session_id)
            return None
        if signal.request_id != request.request_id:
            log.info("ignored a signal for request %s while waiting for %s", signal.request_id,
                     request.request_id)
            return None
        if self._seal is not None and self._seal.verifies(signal):
            # Aura's API stored this decision in the step that published the signal: only the
            # session record, which the run's instance writes, is left, unless that step wrote it
            # too (its seal says so).
            return self._seal.decided(request, signal), not self._seal.settled(signal)
        # The backend's signal names who decided, but Aura can check only one name: the user the
        # request belongs to (it stored that itself). Any other name (a manager, a forged or
        # missing one) is not recorded as `decidedBy`; the audit line keeps it as `claimedBy`.
        checked = signal.user_id if signal.user_id == request.user_id else None
        return await self._close(request, signal.status, checked, signal.reason, via="signal",
                                 claimed_by=signal.user_id), False

    async def _settle_session(self, decided: ApprovalRequest) -> None:
        # The write is idempotent; a blip (a failover, an unconfirmed write) is worth a few quick
        # retries, bounded because the run goes on only after this. The decision stands either way.
        backoff = Backoff(SETTLE_BACKOFF_SECONDS, SETTLE_BACKOFF_MAX_SECONDS)
        while True:
            try:
                await self._store.settle_session(decided)
                return
            except StoreUnavailable:
                if backoff.failed() >= SETTLE_ATTEMPTS:
                    # Only the session record still says pending, until its TTL.
                    log.warning("could not record the decision of %s in its session (%d attempts)",
                                decided.request_id, SETTLE_ATTEMPTS)
                    return
                await backoff.pause()

    async def _close(self, request: ApprovalRequest, status: ApprovalStatus, by: str | None,
                     reason: str | None = None, *, via: str = "aura",
                     claimed_by: str | None = None) -> ApprovalRequest:
        """Decide atomically; when another decision won first, that one stands. One store step
        either way: the store decides only a request still pending and, when it was decided
        meanwhile (by Aura's API on an instance whose seal this gate cannot verify), answers with
        that decision instead. A signal the DWP backend published without touching the request is
        recorded here. (The gate keeps no stored copy to compare against: a parked run would hold
        its whole record for as long as the approval takes.)"""
        # Shielded: a run cancelled while its decision is on the way to the store may still see it
        # applied there; the decision is then finished and audited, not left unaccounted for.
        return await asyncio.shield(self._record(request, status, by, reason, via, claimed_by))

    async def _record(self, request: ApprovalRequest, status: ApprovalStatus, by: str | None,
                      reason: str | None, via: str, claimed_by: str | None) -> ApprovalRequest:
        result = await self._store.decide(request.request_id, status, decided_by=by,
                                          decided_at=self._clock.timestamp(), reason=reason)
        if result is None:  # the request vanished from the store (flushed): treat as expired
            return request.decide(ApprovalStatus.EXPIRED, by=None, at=self._clock.timestamp(), reason=None)
        if result.applied:
            unchecked = {"claimedBy": claimed_by} if claimed_by is not None and claimed_by != by else {}
            audit_line("decided", result.request, via=via, **unchecked)
        return result.request
