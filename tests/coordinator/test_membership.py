"""Membership: heartbeats, expiry by a fake clock, removal, drained members, lookup by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from coordinator.membership import MAX_CHANGES, Change, Membership


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def info(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name)


def test_a_member_expires_after_the_timeout_and_heartbeats_keep_it_alive() -> None:
    clock = Clock()
    m = Membership(timeout_s=1.0, clock=clock)
    a, b = m.join(info("a")), m.join(info("b"))
    assert a.node_id.startswith("a-") and a.node_id != b.node_id
    clock.now += 0.9
    assert m.heartbeat(a.node_id) == "ok"
    assert m.expired() == []
    clock.now += 0.2  # b: 1.1 s silent, a: 0.2 s
    assert [(x.node_id, round(age, 2)) for x, age in m.expired()] == [(b.node_id, 1.1)]


def test_forgotten_members_are_told_to_join_again_and_drained_ones_to_stop() -> None:
    m = Membership(timeout_s=1.0, clock=Clock())
    a, b = m.join(info("a")), m.join(info("b"))
    assert [x.node_id for x in m.remove([a.node_id, "nobody"])] == [a.node_id]
    assert m.heartbeat(a.node_id) == "unknown"
    m.remove([b.node_id], left=True)
    assert m.heartbeat(b.node_id) == "left"
    assert m.snapshot() == []


def test_find_by_id_or_unique_name() -> None:
    m = Membership(timeout_s=1.0, clock=Clock())
    a, b1, _ = m.join(info("a")), m.join(info("b")), m.join(info("b"))
    assert m.find("a") is a and m.find(b1.node_id) is b1
    with pytest.raises(KeyError, match="2 nodes are named 'b'"):
        m.find("b")
    with pytest.raises(KeyError, match="no node 'c'"):
        m.find("c")
    b1.leaving = True
    assert b1 not in m.planned() and a in m.planned()


def test_changes_are_bounded_and_the_timeout_validated() -> None:
    m = Membership(timeout_s=0.5)
    for i in range(MAX_CHANGES + 5):
        m.record(Change(kind="failure", nodes=[str(i)], reason="test"))
    assert len(m.changes) == MAX_CHANGES and m.changes[-1].nodes == [str(MAX_CHANGES + 4)]
    with pytest.raises(ValueError, match="must be positive"):
        Membership(timeout_s=0)


def test_a_heartbeat_stores_the_latest_report_of_its_member() -> None:
    clock = Clock()
    m = Membership(timeout_s=1.0, clock=clock)
    a = m.join(info("a"))
    assert (a.live_devices, a.links, a.reported_at) == ([], [], 0.0)
    clock.now += 0.5
    assert m.heartbeat(a.node_id, devices=("gpu0", "gpu1"), links=["link"]) == "ok"
    assert (a.live_devices, a.links, a.reported_at) == (["gpu0", "gpu1"], ["link"], 100.5)
    clock.now += 0.5
    m.heartbeat(a.node_id, devices=("gpu0'",))  # the stage is gone: its links go too
    assert (a.live_devices, a.links, a.reported_at) == (["gpu0'"], [], 101.0)
    assert m.heartbeat("nobody", devices=("x",)) == "unknown"
