"""The seal on the signals of decisions Aura's API stored: it verifies only for the exact decision
and request it was made for, and only with the key it was made with."""

from __future__ import annotations

from dataclasses import replace

import pytest

from domain.model.approval import ApprovalRequest, ApprovalStatus, DecisionSeal, Signal, SignalType

SEAL = DecisionSeal(b"k" * 32)


def test_a_sealed_signal_round_trips_the_wire_and_verifies() -> None:
    signal = SEAL.seal(Signal.rejection("req_1", "mgr", 1_767_000_000, 'not "now" ✓'))
    parsed = Signal.parse(signal.to_json())
    assert parsed == signal and SEAL.verifies(parsed)
    assert signal.to_json().endswith(f',"timestamp":1767000000,"seal":"{signal.seal}"}}')


@pytest.mark.parametrize("change", [
    {"request_id": "req_2"},
    {"type": SignalType.APPROVAL, "reason": None},
    {"user_id": "mallory"},
    {"user_id": None},
    {"timestamp": 1_767_000_001},
    {"reason": "later"},
    {"reason": None},
])
def test_a_seal_does_not_verify_for_any_other_decision(change: dict[str, object]) -> None:
    signal = SEAL.seal(Signal.rejection("req_1", "mgr", 1_767_000_000, "no"))
    assert not SEAL.verifies(replace(signal, **change))  # type: ignore[arg-type]


def test_a_seal_verifies_only_with_its_own_key_and_a_missing_seal_never() -> None:
    signal = Signal.approval("req_1", "mgr", 1)
    assert not DecisionSeal(b"o" * 32).verifies(SEAL.seal(signal))
    assert not SEAL.verifies(signal)
    assert not SEAL.verifies(replace(signal, seal=""))
    with pytest.raises(ValueError):
        DecisionSeal(b"short")


def test_the_sealed_decision_is_the_request_as_the_desk_stored_it() -> None:
    request = ApprovalRequest("req_1", "ses_1", "run_1", "commit", "commit", "Commit?", {}, "alice", "acme",
                              created_at=10, expires_at=310)
    approval = SEAL.seal(Signal.approval("req_1", "mgr", 20))
    assert SEAL.decided(request, approval) == request.decide(ApprovalStatus.APPROVED, by="mgr", at=20, reason=None)
