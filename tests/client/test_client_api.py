"""client.api against a fake coordinator (tests/client/conftest.py): requests on the wire, streamed
and collected results, cancellation, error mapping, status, and import lightness."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from client import TensorfleetClient as LazyClient
from client.api import ClientError, Completion, Delta, TensorfleetClient, format_status, status_to_dict
from tensorfleet.v1 import coordinator_pb2

REPO = Path(__file__).resolve().parents[2]


def test_generate_stream_sends_the_sampling_params_and_yields_deltas(fake_coordinator) -> None:
    with TensorfleetClient(fake_coordinator.address, timeout=30) as tf:
        deltas = list(
            tf.generate_stream(
                "hi there",
                max_tokens=16,
                temperature=0.7,
                top_k=40,
                top_p=0.9,
                repetition_penalty=1.1,
                seed=7,
                stop=["\n\n", "###"],
                stop_token_ids=[2],
                ignore_eos=True,
                request_id="r1",
            )
        )
    assert deltas == [
        Delta("r1", "Hello", [101, 102], None),
        Delta("r1", ", ", [103], None),
        Delta("r1", "world!", [104, 105], None),
        Delta("r1", "", [], "stop"),
    ]
    (req,) = fake_coordinator.requests
    assert req.request_id == "r1"
    assert req.WhichOneof("prompt") == "text" and req.text == "hi there"
    s = req.sampling
    assert s.temperature == pytest.approx(0.7) and s.top_k == 40
    assert s.HasField("top_p") and s.top_p == pytest.approx(0.9)
    assert s.HasField("repetition_penalty") and s.repetition_penalty == pytest.approx(1.1)
    assert s.HasField("max_tokens") and s.max_tokens == 16
    assert s.HasField("seed") and s.seed == 7
    assert list(s.stop) == ["\n\n", "###"] and list(s.stop_token_ids) == [2] and s.ignore_eos


def test_token_id_prompt_defaults_and_no_seed(fake_coordinator) -> None:
    with TensorfleetClient(fake_coordinator.address) as tf:
        completion = tf.generate([5, 6, 7])
    (req,) = fake_coordinator.requests
    assert req.WhichOneof("prompt") == "token_ids" and list(req.token_ids.ids) == [5, 6, 7]
    s = req.sampling
    assert not s.HasField("seed"), "no seed given: the server must pick one"
    assert s.max_tokens == 64 and s.temperature == 0.0 and s.top_k == 0 and s.top_p == 1.0
    assert not s.stop and not s.stop_token_ids and not s.ignore_eos
    assert req.request_id == ""  # the coordinator assigns one ...
    assert completion.request_id == "assigned-1"  # ... and echoes it


def test_generate_collects_the_stream(fake_coordinator) -> None:
    with TensorfleetClient(fake_coordinator.address) as tf:
        completion = tf.generate("hi", max_tokens=None, request_id="r2")
    assert completion == Completion(
        request_id="r2",
        text="Hello, world!",
        token_ids=[101, 102, 103, 104, 105],
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=5,
    )
    assert not fake_coordinator.requests[0].sampling.HasField("max_tokens")  # None: the server's default


@pytest.mark.parametrize("how", ["close", "break"])
def test_stopping_the_iterator_cancels_the_rpc(fake_coordinator, how: str) -> None:
    fake_coordinator.endless = True
    with TensorfleetClient(fake_coordinator.address, timeout=30) as tf:
        stream = tf.generate_stream("go")
        if how == "close":
            assert next(stream).text == "a" and next(stream).text == "a"
            stream.close()
        else:
            for i, _ in enumerate(stream):
                if i == 2:
                    break
            del stream  # dropping an unfinished iterator finalizes it
        assert fake_coordinator.rpc_done.wait(10), "the server-side RPC did not end after the client stopped"
        assert not fake_coordinator.contexts[0].is_active()


def test_unreachable_coordinator_is_unavailable(free_port: int) -> None:
    address = f"127.0.0.1:{free_port}"
    with TensorfleetClient(address, timeout=20) as tf:
        for call in (lambda: tf.status(), lambda: tf.generate("hi"), lambda: next(tf.generate_stream("hi"))):
            with pytest.raises(ClientError) as exc:
                call()
            assert exc.value.code == "UNAVAILABLE"
            assert str(exc.value) == (
                f"UNAVAILABLE: cannot reach the coordinator at {address} (is `coordinator start` running?)"
            )


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "no capacity: the cluster lacks 2.5 GiB for layers 20-29"),
        (grpc.StatusCode.INVALID_ARGUMENT, "top_k=5 needs temperature > 0"),
        (grpc.StatusCode.UNAVAILABLE, "every node serving stage 1 failed and no capacity remains"),
    ],
)
def test_server_errors_keep_their_code_and_details(fake_coordinator, code, details) -> None:
    fake_coordinator.abort_with = (code, details)
    with TensorfleetClient(fake_coordinator.address) as tf:
        with pytest.raises(ClientError) as exc:
            tf.generate("hi")
        assert (exc.value.code, exc.value.details) == (code.name, details)
        assert str(exc.value) == f"{code.name}: {details}"
        with pytest.raises(ClientError, match=f"^{code.name}: "):
            tf.status()


def test_a_stream_without_a_finish_reason_is_an_error(fake_coordinator) -> None:
    fake_coordinator.responses = [coordinator_pb2.GenerateResponse(request_id="r", token_ids=[1], text_delta="x")]
    with TensorfleetClient(fake_coordinator.address) as tf:
        with pytest.raises(ClientError, match="^INTERNAL: .* ended the Generate stream of request r3 without"):
            tf.generate("hi", request_id="r3")


def test_timeout_is_deadline_exceeded(fake_coordinator) -> None:
    fake_coordinator.endless = True
    with TensorfleetClient(fake_coordinator.address, timeout=0.3) as tf:
        with pytest.raises(ClientError) as exc:
            tf.generate("hi")
    assert exc.value.code == "DEADLINE_EXCEEDED"
    assert "did not finish within the timeout of 0.3 s" in exc.value.details
    assert fake_coordinator.rpc_done.wait(10)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": -0.1}, ValueError, "temperature=-0.1 is out of range: it must be >= 0"),
        ({"temperature": float("nan")}, ValueError, "temperature=nan"),
        ({"top_p": 0.0}, ValueError, r"top_p=0.0 is out of range: it must be \(0, 1\]"),
        ({"top_p": 1.5}, ValueError, "top_p=1.5"),
        ({"min_p": 1.0}, ValueError, "min_p=1.0"),
        ({"repetition_penalty": 0}, ValueError, "repetition_penalty=0"),
        ({"top_k": -1}, ValueError, r"top_k=-1 is out of range 0\.\."),
        ({"max_tokens": 0}, ValueError, "max_tokens=0"),
        ({"max_tokens": 2.5}, TypeError, "max_tokens must be an integer"),
        ({"seed": -1}, ValueError, "seed=-1"),
        ({"seed": 2**63}, ValueError, "seed="),
        ({"stop": [""]}, ValueError, "non-empty"),
        ({"stop_token_ids": [-3]}, ValueError, "stop token id=-3"),
        ({"request_id": 5}, TypeError, "request_id must be a str"),
        ({"prompt": []}, ValueError, "empty list of token ids"),
        ({"prompt": [1, 2**31]}, ValueError, "prompt token id=2147483648"),
        ({"prompt": [1, True]}, TypeError, "got bool"),
        ({"prompt": b"bytes"}, TypeError, "decode it first"),
        ({"prompt": None}, TypeError, "NoneType"),
    ],
)
def test_bad_arguments_are_refused_before_sending(fake_coordinator, kwargs, error, match) -> None:
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "hi")
    with TensorfleetClient(fake_coordinator.address) as tf:
        with pytest.raises(error, match=match):
            tf.generate_stream(prompt, **kwargs)
        with pytest.raises(error, match=match):
            tf.generate(prompt, **kwargs)
    assert fake_coordinator.requests == []


def test_a_single_stop_string_is_not_split_into_characters(fake_coordinator) -> None:
    with TensorfleetClient(fake_coordinator.address) as tf:
        tf.generate("hi", stop="###")
    assert list(fake_coordinator.requests[0].sampling.stop) == ["###"]


def test_status_returns_the_protobuf(fake_coordinator) -> None:
    with TensorfleetClient(fake_coordinator.address, timeout=30) as tf:
        status = tf.status()
    assert isinstance(status, coordinator_pb2.StatusResponse)
    assert status == fake_coordinator.status_response
    d = status_to_dict(status)
    assert d["epoch"] == {"value": "3"} and d["model"] == "SmolLM2-135M"
    assert [n["node_id"] for n in d["nodes"]] == ["n1", "n2"] and d["requests_waiting"] == 1
    text = format_status(status)
    for expected in ("epoch     3", "alpha", "0-19 (20)", "n1:0 n1:1", "requests  2 running, 1 waiting"):
        assert expected in text


def test_format_status_of_an_empty_cluster() -> None:
    text = format_status(coordinator_pb2.StatusResponse())
    assert "epoch     none" in text and "nodes: none joined" in text and "serving   no: no placement in force" in text
    assert "stages: none (no placement in force)" in text and "requests  0 running, 0 waiting" in text


def test_close_and_a_channel_owned_by_the_caller(fake_coordinator) -> None:
    tf = TensorfleetClient(fake_coordinator.address)
    tf.close()
    tf.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        tf.status()
    channel = grpc.insecure_channel(fake_coordinator.address)
    try:
        with TensorfleetClient("the-head", channel=channel) as tf:
            assert tf.generate("hi").text == "Hello, world!"
        # The client did not close the caller's channel.
        assert TensorfleetClient(channel=channel).status().model == "SmolLM2-135M"
    finally:
        channel.close()


def test_bad_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout=0 must be > 0"):
        TensorfleetClient(timeout=0)


def test_client_package_reexports_the_api_lazily() -> None:
    assert LazyClient is TensorfleetClient


def test_importing_the_client_api_is_light() -> None:
    code = (
        "import sys\n"
        "import client\n"
        "assert 'grpc' not in sys.modules, 'import client alone loaded grpc'\n"
        "import client.api, client.cli, client.display\n"
        "from client import TensorfleetClient\n"
        "names = ('torch', 'engine', 'transformers', 'numpy', 'node', 'coordinator')\n"
        "print(','.join(sorted(m for m in names if m in sys.modules)))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "proto"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing client.api / client.cli pulled in: {out.stdout.strip()}"


def test_format_status_shows_placement_changes_and_why_nothing_serves() -> None:
    status = coordinator_pb2.StatusResponse(unavailable_reason="the nodes left cannot hold the model")
    status.placement_changes.add(kind="failure", nodes=["n2-abc"], reason="n2-abc: no heartbeat for 1.02 s",
                                 detected_at=100.0, resumed_at=101.25, requests_replayed=16, layers_moved=11,
                                 epoch={"value": 2})
    status.placement_changes.add(kind="failure", nodes=["n1-def"], reason="n1-def: no heartbeat", detected_at=200.0)
    text = format_status(status)
    assert "serving   no: the nodes left cannot hold the model" in text
    rows = text.split("placement changes (latest last)")[1].splitlines()
    at = time.strftime("%H:%M:%S", time.localtime(100.0))
    assert rows[2].split()[:7] == ["2", at, "failure", "n2-abc", "1.25", "s", "16"]
    assert rows[3].split()[:6] == ["-", time.strftime("%H:%M:%S", time.localtime(200.0)), "failure", "n1-def",
                                   "not", "resumed"]
