"""The pure lifecycle, driven by tables of events and plain numbers: attach/idle, status,
stop request."""

from __future__ import annotations

import pytest

from keyhive._lifecycle import (
    RUNNING,
    STARTING,
    STOP_LATER,
    STOP_NOTHING,
    STOP_NOW,
    STOPPED,
    STOPPING,
    Lifecycle,
)

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


# -- status and the stop request --------------------------------------------------------------

S, R, G, X = STARTING, RUNNING, STOPPING, STOPPED

# (steps, expected results of the steps, status afterwards, pending stop request, stop reason)
# steps: ("activated",) | ("start_failed", reason) | ("begin_stop",) | ("stop_failed",)
#        | ("finished", reason) | ("request", reason, busy) | ("take",)
STATUS_CASES = [
    ([], [], S, None, None),
    ([("activated",)], [None], R, None, None),
    ([("start_failed", "boom")], [None], X, None, "boom"),
    ([("activated",), ("begin_stop",)], [None, None], G, None, None),
    ([("activated",), ("begin_stop",), ("stop_failed",)], [None, None, None], R, None, None),
    ([("activated",), ("stop_failed",)], [None, None], R, None, None),  # not stopping: no-op
    ([("activated",), ("begin_stop",), ("finished", "idle")], [None, None, None], X, None, "idle"),
    # the stop request, in every status
    ([("request", "n", False)], [STOP_LATER], S, "n", None),  # from on_start: after the start
    ([("activated",), ("request", "n", False)], [None, STOP_NOW], R, "n", None),
    ([("activated",), ("request", "n", True)], [None, STOP_LATER], R, "n", None),  # mid-turn
    ([("activated",), ("begin_stop",), ("request", "n", False)], [None, None, STOP_NOTHING], G, None, None),
    ([("start_failed", "x"), ("request", "n", False)], [None, STOP_NOTHING], X, None, "x"),
    ([("request", "n", False), ("activated",), ("take",)], [STOP_LATER, None, "n"], R, None, None),
    ([("activated",), ("take",)], [None, None], R, None, None),
    ([("activated",), ("request", "a", True), ("request", "b", True)],
     [None, STOP_LATER, STOP_LATER], R, "b", None),  # the last reason asked for wins
    # finishing forgets the request; stop_failed after it changes nothing
    ([("activated",), ("request", "n", True), ("begin_stop",), ("finished", "normal")],
     [None, STOP_LATER, None, None], X, None, "normal"),
    ([("activated",), ("begin_stop",), ("finished", "idle"), ("stop_failed",)],
     [None, None, None, None], X, None, "idle"),
    # a failed hibernate keeps a pending request for the retry
    ([("activated",), ("request", "n", True), ("begin_stop",), ("stop_failed",)],
     [None, STOP_LATER, None, None], R, "n", None),
]


def _drive(steps: list[tuple]) -> tuple[Lifecycle, list[object]]:
    lc = Lifecycle()
    results: list[object] = []
    for step in steps:
        kind = step[0]
        if kind == "activated":
            results.append(lc.activated())
        elif kind == "start_failed":
            results.append(lc.start_failed(step[1]))
        elif kind == "begin_stop":
            results.append(lc.begin_stop())
        elif kind == "stop_failed":
            results.append(lc.stop_failed())
        elif kind == "finished":
            lc.finished(step[1])
            results.append(None)
        elif kind == "request":
            results.append(lc.request_stop(step[1], step[2]))
        elif kind == "take":
            results.append(lc.take_stop_request())
    return lc, results


@pytest.mark.parametrize(("steps", "results", "status", "requested", "reason"), STATUS_CASES)
def test_status_and_stop_request_table(steps: list[tuple], results: list[object], status: int,
                                       requested: object, reason: object) -> None:
    """Each sequence of transitions returns what the table says and leaves that status,
    pending stop request and stop reason."""
    lc, got = _drive(steps)
    assert got == results
    assert lc._status == status
    assert lc.stop_requested == requested
    assert lc.stop_reason == reason


@pytest.mark.parametrize(("steps", "bad"), [
    ([], ("begin_stop",)),  # STARTING cannot begin a stop
    ([("activated",)], ("activated",)),  # activated twice
    ([("activated",), ("begin_stop",)], ("begin_stop",)),  # stopping already
    ([("start_failed", "x")], ("activated",)),  # a failed start never runs
    ([("activated",), ("begin_stop",), ("finished", "idle")], ("begin_stop",)),
])
def test_transitions_not_in_the_diagram_are_refused(steps: list[tuple], bad: tuple) -> None:
    """A transition the status diagram does not draw fails loudly instead of corrupting status."""
    lc, _ = _drive(steps)
    before = lc._status
    with pytest.raises(AssertionError):
        _drive_one(lc, bad)
    assert lc._status == before


def _drive_one(lc: Lifecycle, step: tuple) -> None:
    getattr(lc, step[0])(*step[1:])


def test_finished_hands_back_the_owners_and_clears_the_deadline() -> None:
    """finished() returns the owners it had, forgets the deadline and the request."""
    lc = Lifecycle()
    lc.started(0, T)
    lc.activated()
    lc.attached("a")
    lc.request_stop("n", True)
    lc.begin_stop()
    assert lc.finished("normal") == {"a"}
    assert lc.attachments == 0 and lc.idle_deadline is None
    assert lc.stop_requested is None and lc.stop_reason == "normal"
    assert lc._x is not None


def test_a_plain_incarnation_makes_no_rare_record() -> None:
    """Starting, attaching, touching and detaching allocate no Rare record: an idle incarnation
    carries none of the rarely used fields."""
    lc = _run([("start", 0), ("attach", "a"), ("touch", 3), ("detach", "a", 5)])
    lc.activated()
    lc.begin_stop()
    lc.stop_failed()
    assert lc.stop_requested is None and lc.stop_reason is None and lc.take_stop_request() is None
    assert lc._x is None
