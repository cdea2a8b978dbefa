"""Errors the domain raises, each with a stable machine code that crosses the wire unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from domain.model.approval import ApprovalRequest


class AuraError(Exception):
    """Base of every expected failure. `code` is stable; `message` is safe to show to a client."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable


class AuthError(AuraError):
    """A caller could not be authenticated (401), is not allowed to act as claimed (403) or named
    itself ambiguously (400)."""

    def __init__(self, code: str, message: str, *, status: int = 401) -> None:
        super().__init__(message, code=code)
        self.status = status


class NotFound(AuraError):
    code = "not_found"


class Conflict(AuraError):
    code = "conflict"


class Gone(AuraError):
    code = "gone"


class Forbidden(AuraError):
    code = "forbidden"


class InvalidInput(AuraError):
    code = "invalid_input"


class ModelError(AuraError):
    """The model failed. Codes: llm_timeout (retryable), llm_unavailable, llm_bad_response,
    invalid_directive (offline model)."""

    code = "llm_unavailable"


class ToolFailure(AuraError):
    """A tool ran and failed; the agent reports it and carries on."""

    code = "tool_failed"


class UnknownTool(AuraError):
    code = "unknown_tool"


class BudgetExceeded(AuraError):
    code = "budget_exceeded"


class ApprovalTimeout(AuraError):
    code = "hitl_timeout"


class StoreUnavailable(AuraError):
    """The shared store (Redis) could not be reached."""

    code = "store_unavailable"
    retryable = True


class RunCancelled(AuraError):
    """The run was cancelled from elsewhere (another instance's cancel, a cancelled approval)."""

    code = "user_cancelled"


class RunFenced(AuraError):
    """This instance no longer owns the run: its lease lapsed (it may have been declared lost), the
    log already holds the run's `end`, or another writer logged a different event at this seq.
    Nothing more of the run may be logged or done by this instance."""

    code = "run_lost"
    retryable = True


class ContextOverflow(AuraError):
    """The request cannot be made to fit the model's context window."""

    code = "context_overflow"


class TooManyRuns(AuraError):
    code = "too_many_runs"
    retryable = True

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"Too many concurrent runs for this {scope} (limit {limit}); retry when one ends.")
        self.scope = scope


class RunStartsTooFrequent(AuraError):
    code = "too_many_run_starts"
    retryable = True

    def __init__(self, retry_after_seconds: float) -> None:
        super().__init__(f"Too many runs started; retry in {retry_after_seconds:g} s.")
        self.retry_after_seconds = retry_after_seconds


class ShuttingDown(AuraError):
    code = "shutting_down"
    retryable = True


class IdempotencyKeyReused(InvalidInput):
    code = "idempotency_key_reused"


class ResumedWithAnotherRequest(Conflict):
    code = "resume_request_mismatch"


class AlreadyDecided(Conflict):
    code = "already_decided"

    def __init__(self, request: ApprovalRequest) -> None:
        super().__init__(f"The request was already {request.status.value}.")
        self.request = request


class ApprovalExpired(Gone):
    code = "approval_expired"
