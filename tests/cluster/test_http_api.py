"""Tier 3: the coordinator's HTTP API through the official ``openai`` client, against a running cluster
(the embedded model, real tokenizer and chat template, one CPU node), plus /metrics and /health.

Greedy answers over HTTP must equal what the gRPC client gets for the same prompt; bad requests get
the OpenAI error format with the right status; the Prometheus counters and histograms move as
requests run.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from client.api import TensorfleetClient
from coordinator.local_cluster import LocalCluster, NodeSpec

openai = pytest.importorskip("openai")

QUESTION = "What is the capital of France?"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir) -> LocalCluster:  # noqa: ANN001
    work = tmp_path_factory.mktemp("http")
    nodes = [NodeSpec(standby=False, devices="cpu", model_dir=str(embedded_model_dir))]
    with LocalCluster(work, model=str(embedded_model_dir), nodes=nodes,
                      coordinator_args=["--max-slots", "4", "--max-seq-len", "256"]) as c:
        yield c


@pytest.fixture(scope="module")
def api(cluster: LocalCluster):  # noqa: ANN201 - an openai.OpenAI
    client = openai.OpenAI(base_url=cluster.http_url + "/v1", api_key=cluster.api_key, max_retries=0, timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def model(cluster: LocalCluster) -> str:
    with TensorfleetClient(cluster.address) as client:
        return client.status().model


@pytest.fixture(scope="module")
def grpc_answer(cluster: LocalCluster):  # noqa: ANN201 - a client.api.Completion
    """The gRPC client's greedy answer to QUESTION (a single user turn through the chat template)."""
    with TensorfleetClient(cluster.address) as client:
        return client.generate(QUESTION, max_tokens=MAX_TOKENS)


def test_models_lists_the_served_model(api, model: str) -> None:  # noqa: ANN001
    listed = api.models.list()
    assert [m.id for m in listed.data] == [model]
    assert api.models.retrieve(model).id == model


def test_chat_greedy_equals_grpc(api, model: str, grpc_answer) -> None:  # noqa: ANN001
    out = api.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                      max_tokens=MAX_TOKENS, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == grpc_answer.text and "Paris" in grpc_answer.text
    assert out.choices[0].finish_reason == grpc_answer.finish_reason
    assert out.usage.completion_tokens == len(grpc_answer.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_stream_equals_whole_answer(api, model: str, grpc_answer) -> None:  # noqa: ANN001
    chunks = list(api.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for piece in content if piece) >= 2  # tokens arrived as several events
    assert "".join(content) == grpc_answer.text
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [grpc_answer.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(grpc_answer.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_completions_with_token_ids_and_text(api, model: str, cluster: LocalCluster) -> None:  # noqa: ANN001
    """A raw prompt (no chat template), as text and as the same token ids, whole and streamed: one answer."""
    from transformers import AutoTokenizer

    from engine.model_source import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cluster.model).path)
    prompt = "The three primary colors are"
    ids = tokenizer.encode(prompt)
    with TensorfleetClient(cluster.address) as client:
        expected = client.generate(ids, max_tokens=MAX_TOKENS)
    whole = api.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text == expected.text
    assert whole.usage.prompt_tokens == len(ids)
    by_ids = api.completions.create(model=model, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert by_ids.choices[0].text == expected.text
    streamed = list(api.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    assert streamed[-1].choices[0].finish_reason == "length"
    echoed = api.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(prompt)


def test_stop_string_and_seeded_sampling(api, model: str) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    whole = api.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    assert "\n" in whole.choices[0].message.content.strip()
    stopped = api.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, stop=["\n"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == whole.choices[0].message.content.split("\n")[0]
    a, b = (api.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.9, seed=7)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.parametrize(("kwargs", "error", "needle"), [
    (dict(model="no-such-model"), "NotFoundError", "does not exist"),
    (dict(max_tokens=100000), "BadRequestError", "max_seq_len"),
    (dict(temperature=-1), "BadRequestError", "temperature"),
    (dict(n=2), "BadRequestError", "n (only 1)"),
    (dict(presence_penalty=0.5), "BadRequestError", "presence_penalty"),
    (dict(messages=[]), "BadRequestError", "messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "BadRequestError", "role"),
])
def test_bad_requests_get_openai_errors(api, model: str, kwargs: dict, error: str, needle: str) -> None:  # noqa: ANN001
    args = dict(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    args.update(kwargs)
    with pytest.raises(getattr(openai, error)) as caught:
        api.chat.completions.create(**args)
    assert needle in caught.value.message
    assert caught.value.body["type"] in ("invalid_request_error", "not_found_error")


def test_a_lone_surrogate_is_a_bad_request(cluster: LocalCluster, model: str) -> None:
    """JSON may escape a lone UTF-16 surrogate, which no tokenizer takes (the HTTP fuzzing found a 500)."""
    body = json.dumps({"model": model, "max_tokens": 1, "messages": [{"role": "system", "content": "a\ud800b"}]})
    request = urllib.request.Request(cluster.http_url + "/v1/chat/completions", data=body.encode(), method="POST",
                                     headers={"Authorization": f"Bearer {cluster.api_key}",
                                              "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 400
    assert "lone surrogate" in json.loads(caught.value.read())["error"]["message"]


def test_api_keys(cluster: LocalCluster, model: str) -> None:
    wrong = (("wrong-key", openai.AuthenticationError), (cluster.secrets.join_token, openai.PermissionDeniedError))
    for key, error in wrong:
        with openai.OpenAI(base_url=cluster.http_url + "/v1", api_key=key, max_retries=0) as bad, \
                pytest.raises(error) as caught:
            bad.models.list()
        assert "API key" in caught.value.message
    request = urllib.request.Request(cluster.http_url + "/v1/models")  # no Authorization header at all
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 401 and json.loads(caught.value.read())["error"]["code"] == "invalid_api_key"


def _post(cluster: LocalCluster, path: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(cluster.http_url + path, data=data, method="POST", headers={
        "authorization": f"Bearer {cluster.api_key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _oversized(cluster: LocalCluster, framing: bytes) -> tuple[int, dict]:
    """Send a body over the 4 MiB limit (declared, or streamed in chunks) and read the answer as soon as it
    comes (the server answers before the body ends and closes the connection)."""
    import socket

    host, port = cluster.http_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer " + cluster.api_key.encode() + b"\r\n" + framing + b"\r\n\r\n")
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(5):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if b"chunked" in framing else chunk)
        except OSError:
            pass  # the server answered and closed while we were still sending
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])


def test_malformed_bodies_and_routes(cluster: LocalCluster) -> None:
    status, body = _post(cluster, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = _post(cluster, "/v1/completions", json.dumps({"model": "x"}).encode())
    assert status == 400 and "prompt" in body["error"]["message"]
    for framing in (b"content-length: %d" % (5 << 20), b"transfer-encoding: chunked"):
        status, body = _oversized(cluster, framing)
        assert status == 413 and "exceeds" in body["error"]["message"]
    status, body = _post(cluster, "/v1/nothing-here", b"{}")
    assert status == 404 and "error" in body


def test_metrics_move_as_requests_run(api, model: str, cluster: LocalCluster) -> None:  # noqa: ANN001
    before = cluster.metrics()
    api.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=5,
                                temperature=0)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=10**6)
    after = cluster.metrics()

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved("tensorfleet_requests_total{api=http,finish_reason=length}") == 1
    assert moved("tensorfleet_requests_rejected_total{api=http,reason=invalid}") == 1
    assert moved("tensorfleet_generation_tokens_total{api=http}") == 5
    assert moved("tensorfleet_time_to_first_token_seconds_count{api=http}") == 1
    assert moved("tensorfleet_time_per_output_token_seconds_count{api=http}") == 1
    assert moved("tensorfleet_e2e_request_latency_seconds_count{api=http}") == 1
    assert after["tensorfleet_e2e_request_latency_seconds_sum{api=http}"] > before.get(
        "tensorfleet_e2e_request_latency_seconds_sum{api=http}", 0.0)
    assert after["tensorfleet_serving{}"] == 1 and after["tensorfleet_kv_slots{}"] >= 1
    assert after["tensorfleet_requests_waiting{}"] == 0 and after["tensorfleet_nodes{}"] == 1
    ages = [v for k, v in after.items() if k.startswith("tensorfleet_node_heartbeat_age_seconds{")]
    assert len(ages) == 1 and 0 <= ages[0] < 5
    memory = [v for k, v in after.items() if k.startswith("tensorfleet_device_memory_total_bytes{")]
    assert len(memory) == 1 and memory[0] > 0


def test_health_is_serving(cluster: LocalCluster) -> None:
    with urllib.request.urlopen(cluster.http_url + "/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "serving"
    with urllib.request.urlopen(cluster.http_url + "/health/live", timeout=10) as r:
        assert r.status == 200


def test_the_grafana_dashboard_uses_only_exported_metrics(cluster: LocalCluster) -> None:
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "docs/grafana/tensorfleet-dashboard.json"
    dashboard = json.loads(path.read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"tensorfleet_[a-z0-9_]+", target["expr"])}
    with urllib.request.urlopen(cluster.http_url + "/metrics", timeout=10) as r:
        families = set(re.findall(r"^# TYPE (\S+) (\S+)", r.read().decode(), flags=re.M))
    exported = set()
    for name, kind in families:  # what a query may name: counters with _total, histograms by their series
        if kind == "counter":
            exported.add(name.removesuffix("_total") + "_total")
        elif kind == "histogram":
            exported |= {name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            exported.add(name)
    assert len(used) >= 15 and used <= exported, used - exported
