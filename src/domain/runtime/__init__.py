"""The asyncio machinery the services run on, each piece measured and pinned by its own tests
(tests/unit/runtime): deadlines (one timer for many), waits (first-of, a flag, a task set, backoff)
and the bounded feed of a run's events to its watchers.

Every object here is kept by every waiting run or open stream, some for the hours an approval can
take: that is why they have slots and hold no closures. Change one only with its memory test
(tests/unit/runtime/test_memory.py) and a same-run benchmark A/B."""
