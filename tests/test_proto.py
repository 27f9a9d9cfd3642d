"""The generated stubs import, and messages survive a round trip through their wire form."""

from __future__ import annotations

from tensorfleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc


def test_stubs_import_and_define_the_services() -> None:
    assert coordinator_pb2.DESCRIPTOR.package == "tensorfleet.v1"
    assert set(coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods_by_name) == {
        "Generate",
        "Status",
        "Join",
        "Heartbeat",
        "Leave",
        "GetManifest",
        "FetchWeights",
    }
    assert set(node_pb2.DESCRIPTOR.services_by_name["Node"].methods_by_name) == {"LoadStage"}
    assert set(node_pb2.DESCRIPTOR.services_by_name["Stage"].methods_by_name) == {"Forward", "Probe", "Share"}
    for cls in (
        coordinator_pb2_grpc.CoordinatorStub,
        coordinator_pb2_grpc.CoordinatorServicer,
        node_pb2_grpc.NodeStub,
        node_pb2_grpc.NodeServicer,
    ):
        assert isinstance(cls, type)
    assert callable(coordinator_pb2_grpc.add_CoordinatorServicer_to_server)


def test_generate_request_round_trips() -> None:
    req = coordinator_pb2.GenerateRequest(
        request_id="req-1",
        token_ids=common_pb2.TokenIds(ids=[1, 2, 50_000]),
        sampling=common_pb2.SamplingParams(
            temperature=0.7,
            top_k=40,
            top_p=0.9,
            max_tokens=32,
            stop_token_ids=[2],
            stop=["\n\n"],
            seed=(1 << 63) - 1,
        ),
    )
    wire = req.SerializeToString()
    back = coordinator_pb2.GenerateRequest()
    back.ParseFromString(wire)
    assert back == req
    assert back.WhichOneof("prompt") == "token_ids"
    assert list(back.token_ids.ids) == [1, 2, 50_000]
    assert back.sampling.seed == (1 << 63) - 1
    assert back.sampling.HasField("top_p") and back.sampling.HasField("max_tokens")
    assert list(back.sampling.stop) == ["\n\n"]


def test_optional_sampling_fields_keep_their_presence() -> None:
    text_req = coordinator_pb2.GenerateRequest(request_id="r", text="hello")
    back = coordinator_pb2.GenerateRequest.FromString(text_req.SerializeToString())
    assert back.WhichOneof("prompt") == "text" and back.text == "hello"
    sampling = back.sampling
    # Absent means "use the server default", distinct from an explicit zero.
    assert not sampling.HasField("seed")
    assert not sampling.HasField("top_p")
    assert not sampling.HasField("repetition_penalty")
    assert not sampling.HasField("max_tokens")
    zero_seed = common_pb2.SamplingParams(seed=0)
    assert common_pb2.SamplingParams.FromString(zero_seed.SerializeToString()).HasField("seed")


def test_step_message_round_trips() -> None:
    msg = node_pb2.StepMessage(
        epoch=common_pb2.PlacementEpoch(value=3),
        step_id=17,
        sequences=[
            node_pb2.SequenceStep(request_id="a", slot=0, start=0, token_ids=[5, 6, 7], seed=42),
            node_pb2.SequenceStep(request_id="b", slot=4, start=9, token_ids=[11]),
        ],
        hidden=common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[4, 2], data=bytes(32)),
    )
    back = node_pb2.StepMessage.FromString(msg.SerializeToString())
    assert back == msg
    assert back.epoch.value == 3 and back.sequences[1].slot == 4
