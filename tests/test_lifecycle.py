"""The pure attach/idle state machine, driven by tables of events and plain numbers."""

from __future__ import annotations

import pytest

from keyhive._lifecycle import Lifecycle

T = 10.0  # idle timeout

# (events, expected deadline afterwards, expected attachments)
# events: ("start", now) | ("attach", owner) | ("detach", owner, now) | ("touch", now)
CASES = [
    ([("start", 0)], 10.0, 0),
    ([("start", 0), ("touch", 4)], 14.0, 0),
    ([("start", 0), ("attach", "a")], None, 1),
    ([("start", 0), ("attach", "a"), ("attach", "a")], None, 1),
    ([("start", 0), ("attach", "a"), ("attach", "b"), ("detach", "a", 5)], None, 1),
    ([("start", 0), ("attach", "a"), ("detach", "a", 5)], 15.0, 0),
    ([("start", 0), ("attach", "a"), ("touch", 3)], None, 1),
    ([("start", 0), ("attach", "a"), ("detach", "a", 5), ("touch", 7)], 17.0, 0),
    ([("start", 0), ("detach", "nobody", 5)], 10.0, 0),
    ([("start", 0), ("attach", "a"), ("attach", "b"), ("detach", "b", 2), ("detach", "a", 6)], 16.0, 0),
]


def _run(events: list[tuple]) -> Lifecycle:
    lc = Lifecycle()
    for event in events:
        kind = event[0]
        if kind == "start":
            lc.started(event[1], T)
        elif kind == "attach":
            lc.attached(event[1])
        elif kind == "detach":
            lc.detached(event[1], event[2], T)
        elif kind == "touch":
            lc.touched(event[1], T)
    return lc


@pytest.mark.parametrize(("events", "deadline", "attachments"), CASES)
def test_event_table(events: list[tuple], deadline: float | None, attachments: int) -> None:
    """Each sequence of events leaves the deadline and attachment count SPEC §4 prescribes."""
    lc = _run(events)
    assert lc.idle_deadline == deadline
    assert lc.attachments == attachments


def test_return_values_say_what_to_do() -> None:
    """Methods report whether the runtime must arm a timer or whether anything changed."""
    lc = Lifecycle()
    assert lc.started(0, T) is True
    assert lc.attached("a") is True
    assert lc.attached("a") is False
    assert lc.touched(1, T) is False  # attached: touch does nothing
    assert lc.detached("x", 2, T) is False
    assert lc.detached("a", 2, T) is True
    assert lc.touched(3, T) is True


def test_no_timeout_never_idles() -> None:
    """With idle_timeout None there is never a deadline, whatever happens."""
    lc = Lifecycle()
    assert lc.started(0, None) is False
    lc.attached("a")
    lc.detached("a", 5, None)
    assert lc.touched(6, None) is False
    assert lc.idle_deadline is None
    assert not lc.is_due(1e12)


@pytest.mark.parametrize(
    ("events", "now", "due"),
    [
        ([("start", 0)], 9.99, False),
        ([("start", 0)], 10.0, True),
        ([("start", 0), ("attach", "a")], 100.0, False),
        ([("start", 0), ("touch", 5)], 12.0, False),
        ([("start", 0), ("attach", "a"), ("detach", "a", 50)], 59.0, False),
        ([("start", 0), ("attach", "a"), ("detach", "a", 50)], 60.0, True),
    ],
)
def test_is_due(events: list[tuple], now: float, due: bool) -> None:
    """is_due is true exactly when unattached and the deadline has passed."""
    assert _run(events).is_due(now) is due


def test_clear_returns_owners() -> None:
    """clear() forgets owners and the deadline and hands back the owners it had."""
    lc = _run([("start", 0), ("attach", "a"), ("attach", "b")])
    assert lc.clear() == {"a", "b"}
    assert lc.attachments == 0
    assert lc.idle_deadline is None
