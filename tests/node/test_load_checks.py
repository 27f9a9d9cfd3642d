"""The node daemon's checks of a LoadStage request (node/daemon.py NodeDaemon._check_request): the
tensor-parallel group's ranks, here and across nodes. A refused request never touches the running stage."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from node.daemon import NodeDaemon
from node.stream import split_address
from tensorfleet.v1 import common_pb2, node_pb2


def request(ranks: list[tuple[int, int]], *, world: int = 0, store: str = "", prefix: str = "",
            members: int = 0) -> node_pb2.LoadStageRequest:
    return node_pb2.LoadStageRequest(
        model="m", epoch=common_pb2.PlacementEpoch(value=1), layers=common_pb2.LayerRange(start=0, end=2),
        num_slots=1, max_seq_len=8, local_ranks=[node_pb2.LocalRank(device_index=d, tp_rank=r) for d, r in ranks],
        group=node_pb2.TensorParallelGroup(world_size=world, store_address=store, store_prefix=prefix,
                                           members=[f"n{i}/0" for i in range(members)]))


def check(req: node_pb2.LoadStageRequest, devices: int = 2) -> None:
    NodeDaemon._check_request(SimpleNamespace(devices=[None] * devices, name="test"), req)  # noqa: SLF001


@pytest.mark.parametrize("req", [
    request([(0, 0)]),
    request([(0, 0), (1, 1)], world=2),
    request([(0, 1)], world=2, store="10.0.0.5:4000", prefix="p", members=2),  # rank 1 of a group led elsewhere
    request([(1, 0)], world=2, store="[::1]:4000", prefix="p", members=2),  # rank 0 here, rank 1 elsewhere
])
def test_valid_groups(req: node_pb2.LoadStageRequest) -> None:
    check(req)


@pytest.mark.parametrize("req, message", [
    (request([(0, 0), (1, 0)], world=2), "distinct"),
    (request([(0, 0), (0, 1)], world=2), "distinct devices"),
    (request([(0, 2)], world=2, store="h:1", prefix="p", members=2), "below the group's world size"),
    (request([(0, 1)], world=2), "needs the leader's store address"),
    (request([(0, 1)], world=2, store="h:1", members=2), "store prefix"),
    (request([(0, 1)], world=2, store="h:1", prefix="p", members=1), "names its 2 members"),
    (request([(0, 1)], world=2, store="h", prefix="p", members=2), "is not HOST:PORT"),
    (request([(0, 1)], world=2, store="h:0", prefix="p", members=2), "1..65535"),
    (request([(0, 1)], world=1), "below the group's world size"),
    (request([(0, 0)], world=100, store="h:1", prefix="p", members=100), "more than 64"),
])
def test_refused_groups(req: node_pb2.LoadStageRequest, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check(req)


def test_split_address() -> None:
    assert split_address("10.0.0.5:29500") == ("10.0.0.5", 29500)
    assert split_address("[::1]:29500") == ("::1", 29500)
    for bad in ("::1:29500", "host", ":1", "[]:1", "host:65536", "host:0", "host:x"):
        with pytest.raises(ValueError):
            split_address(bad)
