"""The bench reads a server's CPU from its threads' run times (nanoseconds), not from clock ticks,
and falls back to ticks when a thread that ended took its run time with it."""

from __future__ import annotations

import sys
from pathlib import Path

from bench import servers as S

_BUSY = """
import sys, time
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
print("done", flush=True)
time.sleep(60)
"""


class _Busy(S.Server):
    """A child that spins for a given CPU time, then sleeps: ready once it says it is done."""

    def ready(self) -> bool:
        return self.log_path.read_text().strip() == "done"


class _Readings(S.Server):
    """A server whose two CPU readings are scripted."""

    def __init__(self, readings: list[tuple[float, float]]) -> None:
        super().__init__("scripted", [], {}, Path("/dev/null"), port=0)
        self._readings = iter(readings)
        self._now = (0.0, 0.0)

    def cpu(self) -> float:
        self._now = next(self._readings)
        return self._now[0]

    def cpu_ticks(self) -> float:
        return self._now[1]


def test_the_precise_reading_counts_unless_ticks_say_a_thread_ended() -> None:
    agreeing = _Readings([(1.0, 1.0), (1.123456, 1.13)])
    assert abs(S.cpu_used(agreeing, S.cpu_mark(agreeing)) - 0.123456) < 1e-9
    ended = _Readings([(1.0, 1.0), (1.1, 1.5)])  # 0.4 s more by ticks: a thread took it away
    assert abs(S.cpu_used(ended, S.cpu_mark(ended)) - 0.5) < 1e-9


def test_a_processes_cpu_is_read_finer_than_a_clock_tick(tmp_path: Path) -> None:
    server = _Busy("busy", [sys.executable, "-c", _BUSY, "0.0234"], {}, tmp_path / "busy.log", port=0).start()
    try:
        precise, ticks = server.cpu(), server.cpu_ticks()
        # the interpreter's start-up plus the 23.4 ms loop, to well under a tick; ticks count 10 ms
        assert precise >= 0.0234
        assert abs(precise - ticks) <= 0.02
        assert precise * 1e6 % 1000 != 0  # finer than a millisecond, let alone a 10 ms tick
    finally:
        server.stop()
