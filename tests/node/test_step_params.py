"""A stage parses each step's sampling params once per distinct message, whatever the request ids say."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

from node.executor import PARAMS_KEPT, StageServicer
from tensorfleet.v1 import node_pb2


def params_of(servicer: SimpleNamespace, rows: list[tuple[str, float]]) -> list[float]:
    msg = node_pb2.StepMessage()
    for request_id, temperature in rows:
        msg.sequences.add(request_id=request_id).sampling.temperature = temperature
    return [p.temperature for p in StageServicer._params(servicer, msg.sequences)]


def test_a_request_id_used_again_with_other_params_gets_its_own() -> None:
    # Clients choose request ids (x-request-id, GenerateRequest.request_id) and may reuse them.
    servicer = SimpleNamespace(params=OrderedDict(), spec=SimpleNamespace(num_slots=2))
    assert params_of(servicer, [("same", 0.0)]) == [0.0]
    assert params_of(servicer, [("same", 0.7), ("other", 0.0)]) == [0.7, 0.0]
    assert len(servicer.params) == 2  # one entry per distinct params, shared by requests


def test_the_parsed_params_are_bounded() -> None:
    servicer = SimpleNamespace(params=OrderedDict(), spec=SimpleNamespace(num_slots=1))
    for i in range(20):
        params_of(servicer, [(f"r{i}", 0.1 * i)])
    assert len(servicer.params) <= PARAMS_KEPT
