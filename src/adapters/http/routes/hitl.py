"""Aura's approval API (contract section 4): read, approve and reject approval requests."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response
from quart_schema import document_request

from adapters.http.bodies import optional_body
from adapters.http.problems import Problem
from adapters.http.web import current_principal, json_response
from domain.model.errors import AlreadyDecided
from domain.services.desk import ApprovalDesk


class RejectBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    reason: str | None = Field(None, max_length=2000, description="Why the action is rejected.")


class ApproveBody(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _already_decided(error: AlreadyDecided) -> Problem:
    decided = error.request
    return Problem(409, error.code, error.message, extra={
        "requestStatus": decided.status.value, "decidedBy": decided.decided_by, "decidedAt": decided.decided_at})


def blueprint(desk: Callable[[], ApprovalDesk]) -> Blueprint:
    """The approval routes, given the approval desk's provider at app creation."""
    bp = Blueprint("hitl", __name__)

    @bp.get("/aura/hitl/requests/<request_id>")
    async def get_request(request_id: str) -> Response:
        """An approval request, as stored at hitl:request:{requestId}."""
        return json_response((await desk().get(current_principal(), request_id)).to_record())

    @bp.get("/aura/hitl/requests")
    async def pending_requests() -> Response:
        """The caller's pending approval requests."""
        return json_response({"requests": [r.to_record() for r in await desk().pending(current_principal())]})

    @bp.get("/aura/hitl/signals/<session_id>")
    async def get_signal(session_id: str) -> Response:
        """The last signal of a session, as stored at hitl:signal:{sessionId}."""
        return json_response(await desk().latest_signal(current_principal(), session_id))

    @bp.post("/aura/hitl/approve/<request_id>")
    @document_request(ApproveBody)
    async def approve(request_id: str) -> Response:
        """Approve a pending request; the waiting run carries on with the action."""
        await optional_body(ApproveBody)
        try:
            return json_response((await desk().decide(current_principal(), request_id, approve=True)).to_record())
        except AlreadyDecided as error:
            raise _already_decided(error) from None

    @bp.post("/aura/hitl/reject/<request_id>")
    @document_request(RejectBody)
    async def reject(request_id: str) -> Response:
        """Reject a pending request with an optional reason; the action does not run."""
        body = await optional_body(RejectBody)
        try:
            decided = await desk().decide(current_principal(), request_id, approve=False, reason=body.reason)
            return json_response(decided.to_record())
        except AlreadyDecided as error:
            raise _already_decided(error) from None

    return bp
