"""The bound on queued bytes and the slow-consumer rule (broker.pressure), with plain calls:
no server, no loop; the time is a number the test chooses."""

from broker.fastpath import Outbox
from broker.pressure import HARD_LIMIT_FACTOR, HOLD, KEEP, RELEASE, Pressure

LIMIT = 1000
TIMEOUT = 2.0


def box() -> Outbox:
    return Outbox(None, LIMIT, LIMIT * HARD_LIMIT_FACTOR)


def test_a_backlog_above_the_soft_limit_is_a_slow_consumer_only_after_the_timeout():
    pressure, b = Pressure(1 << 30, TIMEOUT), box()
    assert not pressure.judge(b, LIMIT + 1, now=10.0)
    assert b in pressure.behind and b.over_since == 10.0
    assert not pressure.judge(b, LIMIT + 1, now=11.9)
    assert pressure.judge(b, LIMIT + 1, now=12.0)
    assert b not in pressure.behind


def test_catching_up_stops_the_timer_and_a_later_lag_starts_it_again():
    pressure, b = Pressure(1 << 30, TIMEOUT), box()
    assert not pressure.judge(b, LIMIT * 2, now=10.0)
    assert not pressure.judge(b, LIMIT, now=11.0)  # at the limit is not above it
    assert b not in pressure.behind and b.over_since == 0.0
    assert not pressure.judge(b, LIMIT * 2, now=11.5)
    assert not pressure.judge(b, LIMIT * 2, now=13.0)  # 1.5 s behind this time, not 3
    assert pressure.judge(b, LIMIT * 2, now=13.5)


def test_a_backlog_past_the_hard_limit_is_a_slow_consumer_at_once():
    pressure, b = Pressure(1 << 30, TIMEOUT), box()
    assert not pressure.judge(b, LIMIT * HARD_LIMIT_FACTOR, now=1.0)
    assert pressure.judge(b, LIMIT * HARD_LIMIT_FACTOR + 1, now=1.0)
    assert b not in pressure.behind


def test_the_total_counts_each_backlog_once_and_forgets_closed_ones():
    pressure, a, b = Pressure(1 << 30, TIMEOUT), box(), box()
    pressure.account(a, 300)
    pressure.account(b, 200)
    pressure.account(a, 500)  # seen again: replaces, not adds
    assert pressure.total == 700 and pressure.lagging == {a: 500, b: 200}
    pressure.account(b, 0)
    assert pressure.total == 500 and b not in pressure.lagging
    a.closed = True
    pressure.account(a, 900)  # a closed connection's queue is dropped
    assert pressure.total == 0 and not pressure.lagging


def test_publishers_are_held_past_the_bound_and_released_below_three_quarters():
    pressure, a = Pressure(1000, TIMEOUT), box()
    pressure.account(a, 1000)
    assert not pressure.over() and pressure.memory(1.0) == KEEP
    pressure.account(a, 1001)
    assert pressure.over() and pressure.memory(1.0) == HOLD
    assert pressure.holding and pressure.holds == 1 and pressure.holding_since == 1.0
    assert pressure.memory(1.5) == KEEP  # once
    pressure.account(a, 750)
    assert pressure.memory(2.0) == KEEP  # three quarters is not below them
    pressure.account(a, 749)
    assert pressure.memory(2.0) == RELEASE and not pressure.holding
    assert not pressure.over()


def test_held_for_the_timeout_the_largest_backlogs_go_until_the_total_is_below_three_quarters():
    pressure = Pressure(1000, TIMEOUT)
    boxes = [box() for _ in range(4)]
    for b, backlog in zip(boxes, (100, 300, 350, 400)):
        pressure.account(b, backlog)
    assert pressure.memory(5.0) == HOLD  # 1,150 queued
    assert pressure.overdue(6.9) == []  # not held for long enough
    # 1,150 - 400 = 750 is not below three quarters of the bound; 750 - 350 = 400 is
    assert pressure.overdue(7.0) == [boxes[3], boxes[2]]
    assert pressure.total == 400 and pressure.lagging == {boxes[0]: 100, boxes[1]: 300}
    assert pressure.memory(7.0) == RELEASE


def test_nothing_is_overdue_while_the_publishers_are_not_held():
    pressure, a = Pressure(1000, TIMEOUT), box()
    pressure.account(a, 900)
    assert pressure.overdue(100.0) == []


def test_forget_drops_a_closed_connection_from_the_total_and_the_timer():
    pressure, a = Pressure(1 << 30, TIMEOUT), box()
    pressure.account(a, LIMIT * 2)
    pressure.judge(a, LIMIT * 2, now=1.0)
    pressure.forget(a)
    assert pressure.total == 0 and not pressure.behind and not pressure.lagging
