"""Cluster membership: who has joined, who is alive, who left, and the record of re-placements.

Plain code with an injectable clock, so failure detection is unit-tested without processes. A member is
alive while its heartbeats arrive within ``timeout_s``; past that it is expired (declared failed by the
coordinator and forgotten: its later heartbeats are answered with "join again", and it comes back as a
new member with a new id). A member that drained and left is remembered so that its heartbeats are
answered with "stop".
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_CHANGES = 20  # placement changes kept for status
MAX_LEFT = 256  # ids of members that left, remembered to tell them to stop


@dataclass
class Member:
    node_id: str
    info: Any  # common_pb2.NodeInfo
    stub: Any = None  # node_pb2_grpc.NodeStub
    health: Any = None  # grpc health stub of the node daemon
    last_seen: float = 0.0
    state: int = 0  # coordinator_pb2.NodeState
    leaving: bool = False  # a drain is moving its layers away: not planned on
    # The node's latest report, from its last heartbeat (replaced whole, never edited: readers may keep
    # the lists): live device state and the link counters of its stage leader (for metrics and status).
    live_devices: list = field(default_factory=list)  # common_pb2.DeviceInfo with the live fields
    links: list = field(default_factory=list)  # coordinator_pb2.LinkTraffic
    reported_at: float = 0.0  # the membership clock's time of that heartbeat (0: none yet)


@dataclass
class Change:
    """One re-placement (see PlacementChange in coordinator.proto)."""

    kind: str  # "failure" | "drain" | "rebalance"
    nodes: list[str]
    reason: str
    detected_at: float = field(default_factory=time.time)
    resumed_at: float = 0.0
    epoch: int = 0
    requests_replayed: int = 0
    layers_moved: int = 0


class Membership:
    def __init__(self, *, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError(f"heartbeat timeout {timeout_s} s must be positive")
        self.timeout_s = timeout_s
        self.clock = clock
        self.lock = threading.RLock()
        self.members: dict[str, Member] = {}
        self.left: deque[str] = deque(maxlen=MAX_LEFT)
        self.changes: deque[Change] = deque(maxlen=MAX_CHANGES)

    def join(self, info: Any, **handles: Any) -> Member:
        member = Member(f"{info.name or 'node'}-{uuid.uuid4().hex[:6]}", info, last_seen=self.clock(), **handles)
        with self.lock:
            self.members[member.node_id] = member
        return member

    def heartbeat(self, node_id: str, *, devices: Iterable[Any] = (), links: Iterable[Any] = ()) -> str:
        """Record a heartbeat and the report it carries (``devices``: DeviceInfo, ``links``: LinkTraffic):
        "ok", "left" (it drained: stop) or "unknown" (join again)."""
        with self.lock:
            member = self.members.get(node_id)
            if member is not None:
                member.last_seen = member.reported_at = self.clock()
                member.live_devices, member.links = list(devices), list(links)
                return "ok"
            return "left" if node_id in self.left else "unknown"

    def expired(self) -> list[tuple[Member, float]]:
        """Members whose last heartbeat is older than the timeout, with its age in seconds."""
        now = self.clock()
        with self.lock:
            return [(m, now - m.last_seen) for m in self.members.values() if now - m.last_seen > self.timeout_s]

    def remove(self, node_ids: list[str], *, left: bool = False) -> list[Member]:
        """Forget these members; ``left`` remembers them as drained."""
        with self.lock:
            gone = [self.members.pop(n) for n in node_ids if n in self.members]
            if left:
                self.left.extend(m.node_id for m in gone)
            return gone

    def find(self, key: str) -> Member:
        """A member by id, or by display name when exactly one member has it; KeyError otherwise."""
        with self.lock:
            if key in self.members:
                return self.members[key]
            named = [m for m in self.members.values() if m.info.name == key]
        if len(named) != 1:
            raise KeyError(f"no node {key!r}" if not named else f"{len(named)} nodes are named {key!r}: use the id")
        return named[0]

    def planned(self) -> list[Member]:
        """Members a placement may use (joined, not leaving)."""
        with self.lock:
            return [m for m in self.members.values() if not m.leaving]

    def snapshot(self) -> list[Member]:
        with self.lock:
            return list(self.members.values())

    def record(self, change: Change) -> Change:
        with self.lock:
            self.changes.append(change)
        return change
