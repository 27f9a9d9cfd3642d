"""Steps in flight by default: one per stage that computes on hardware of its own."""

from __future__ import annotations

from types import SimpleNamespace

from coordinator.placer import distinct_hardware
from tensorfleet.v1 import common_pb2


def member(node: str, *uuids: str) -> SimpleNamespace:
    return SimpleNamespace(node_id=node, info=common_pb2.NodeInfo(
        devices=[common_pb2.DeviceInfo(index=i, uuid=u) for i, u in enumerate(uuids)]))


def stage(*placed: tuple[str, int]) -> SimpleNamespace:
    return SimpleNamespace(members=[SimpleNamespace(node_id=n, device_index=d) for n, d in placed])


def test_stages_on_one_gpu_count_once() -> None:
    members = {"a": member("a", "GPU-1"), "b": member("b", "GPU-1"), "c": member("c", "GPU-2")}
    assert distinct_hardware([stage(("a", 0)), stage(("b", 0))], members) == 1  # two nodes, one GPU
    assert distinct_hardware([stage(("a", 0)), stage(("c", 0))], members) == 2
    assert distinct_hardware([stage(("a", 0)), stage(("b", 0)), stage(("c", 0))], members) == 2


def test_devices_without_an_id_are_their_own() -> None:
    members = {"a": member("a", "", ""), "b": member("b", "")}  # CPU devices, or GPUs whose id is unknown
    assert distinct_hardware([stage(("a", 0)), stage(("a", 1)), stage(("b", 0))], members) == 3


def test_tensor_parallel_stages_sharing_a_gpu_are_merged() -> None:
    members = {"a": member("a", "GPU-1", "GPU-2"), "b": member("b", "GPU-2", "GPU-3"), "c": member("c", "GPU-4")}
    stages = [stage(("a", 0), ("a", 1)), stage(("b", 0), ("b", 1)), stage(("c", 0))]
    assert distinct_hardware(stages, members) == 2  # the first two share GPU-2
