"""The Placer against fake nodes: a node whose LoadStage answers with an error (not UNAVAILABLE) is set
aside, the model is placed on the others, and the node is planned on again once its time aside ends."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import grpc
import pytest

from coordinator import placer as placer_module
from coordinator.placer import Placer
from coordinator.scheduler import Scheduler
from tensorfleet.v1 import common_pb2, node_pb2

HF_CONFIG = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 128, "tie_word_embeddings": False}
GIB = 1 << 30


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeNode:
    """A Node stub: LoadStage fails with ``error`` (a status code) while it is set, else succeeds."""

    def __init__(self, name: str, error: grpc.StatusCode | None = None) -> None:
        self.name, self.error = name, error
        self.loads: list[node_pb2.LoadStageRequest] = []

    def LoadStage(self, req: node_pb2.LoadStageRequest, timeout: float) -> node_pb2.LoadStageResponse:  # noqa: N802
        self.loads.append(req)
        if self.error is not None:
            raise FakeRpcError(self.error, "CUDA out of memory while loading")
        return node_pb2.LoadStageResponse(stage_address=f"127.0.0.1:1{len(self.loads)}", weight_bytes=1)


def config(**overrides) -> SimpleNamespace:  # noqa: ANN003
    base = dict(min_nodes=2, dtype="float32", num_stages=None, num_slots=2, max_slots=4, kv_memory_fraction=0.5,
                max_seq_len=64, micro_batches=None, codec="exact", codec_min_tokens=64, tp_codec="exact",
                tp_codec_min_elements=0, tls_dir=None, heartbeat_interval_ms=50, heartbeat_timeout_ms=60_000,
                capacity_wait_s=60.0, tp_across_nodes=False)
    return SimpleNamespace(**{**base, **overrides})


def node_info(name: str) -> common_pb2.NodeInfo:
    device = common_pb2.DeviceInfo(kind=common_pb2.DEVICE_KIND_CPU, index=0, name="cpu", total_memory_bytes=8 * GIB,
                                   free_memory_bytes=8 * GIB, matmul_flops=1e11, memory_bandwidth_bytes_per_s=1e10)
    return common_pb2.NodeInfo(name=name, address=f"{name}:1", devices=[device], store_port=7)


@pytest.fixture
def placer():  # noqa: ANN201
    served = threading.Event()
    scheduler = Scheduler(eos_ids=set())
    p = Placer(config=config(), hf_config=HF_CONFIG, model_name="m", scheduler=scheduler,
               set_serving=lambda on: served.set() if on else None)
    p.served = served
    yield p
    p.stop()
    scheduler.stop()


def join(placer: Placer, node: FakeNode):  # noqa: ANN201 - a Member
    return placer.membership.join(node_info(node.name), stub=node, health=None)


def test_a_node_that_refuses_its_stage_is_set_aside_and_the_others_serve(placer: Placer) -> None:
    bad, good = FakeNode("bad", grpc.StatusCode.RESOURCE_EXHAUSTED), FakeNode("good")
    bad_member, good_member = join(placer, bad), join(placer, good)
    placer.place_if_needed()
    assert placer.served.is_set(), placer.unavailable_reason
    assert bad.loads, "the planner tried the node first (both fit)"
    assert [m.node_id for s in placer.stages for m in s.members] == [good_member.node_id] * len(placer.stages)
    assert bad_member.node_id in [m.node_id for m in placer.membership.snapshot()]  # still a member
    assert bad_member.node_id not in [m.node_id for m in placer.candidates()]


def test_the_set_aside_node_comes_back_after_its_time(placer: Placer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placer_module, "SET_ASIDE_S", 0.0)
    bad, good = FakeNode("bad", grpc.StatusCode.INTERNAL), FakeNode("good")
    bad_member = join(placer, bad)
    join(placer, good)
    placer.place_if_needed()
    assert bad_member.node_id in [m.node_id for m in placer.candidates()]  # 0 s aside: already back
    assert placer._set_aside_expired() and not placer._set_aside_expired()  # reported once


def test_the_reason_names_the_set_aside_node_when_nothing_else_fits(placer: Placer) -> None:
    placer.config = config(min_nodes=1)
    bad = FakeNode("bad", grpc.StatusCode.FAILED_PRECONDITION)
    member = join(placer, bad)
    placer.place_if_needed()
    assert not placer.served.is_set()
    assert member.node_id in placer.unavailable_reason and "set aside" in placer.unavailable_reason


def test_a_group_spanning_nodes_loads_on_each_with_the_leaders_store(placer: Placer) -> None:
    """--tp-across-nodes, one stage: each node gets its own rank of one tp=2 group, the group's members,
    and the rendezvous store of the node holding rank 0; the stage's address is the leader's."""
    placer.config = config(num_stages=1, tp_across_nodes=True)
    a, b = FakeNode("a"), FakeNode("b")
    members = {m.node_id: n for n, m in ((a, join(placer, a)), (b, join(placer, b)))}
    placer.place_if_needed()
    assert placer.served.is_set(), placer.unavailable_reason
    (stage,) = placer.stages
    order = [members[m.node_id] for m in stage.members]
    assert [m.tp_rank for m in stage.members] == [0, 1] and {n.name for n in order} == {"a", "b"}
    (lead,), (peer,) = order[0].loads, order[1].loads
    for req in (lead, peer):
        assert req.group.world_size == 2
        assert req.group.store_address == f"{order[0].name}:7"
        assert list(req.group.members) == [f"{m.node_id}/{m.device_index}" for m in stage.members]
    assert lead.group.store_prefix == peer.group.store_prefix != ""
    assert [r.tp_rank for r in lead.local_ranks] == [0] and [r.tp_rank for r in peer.local_ranks] == [1]
    assert stage.address == "127.0.0.1:11"
