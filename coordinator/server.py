"""The coordinator (`coordinator start`): the gRPC surface over membership and placement (``Placer``),
the scheduler and the client API, plus the standard gRPC health service (SERVING only while a complete
placement is in force).

RPC handlers are thin: they convert protobuf to domain types and call plain code.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator import defaults
from coordinator.logs import log
from coordinator.metrics import ClusterCollector, Metrics
from coordinator.placer import Placer
from coordinator.scheduler import Event, Request, Scheduler
from engine.detokenize import IncrementalDetokenizer
from engine.errors import TensorfleetError
from engine.sampling import SamplingParams, resolve_seed
from node.security import (
    Check,
    Guard,
    add_port,
    add_reflection,
    allow_all,
    load_or_create,
    presented,
    require,
    state_dir,
    status_details,
)
from node.stream import CONTROL_SERVER_OPTIONS
from node.wire import sampling_from_proto
from tensorfleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

FINISH = {"stop": coordinator_pb2.FINISH_REASON_STOP, "length": coordinator_pb2.FINISH_REASON_LENGTH,
          "cancelled": coordinator_pb2.FINISH_REASON_CANCELLED}


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    min_nodes: int = 1
    dtype: str = "float32"
    num_slots: int | None = None  # KV slots (batch capacity); None: as many as memory holds, up to max_slots
    max_slots: int = defaults.MAX_SLOTS
    kv_memory_fraction: float = defaults.KV_MEMORY_FRACTION  # of the free memory beside the weights
    num_stages: int | None = None  # None: the planner's choice
    micro_batches: int | None = None  # steps in flight; None: one per stage on its own hardware
    lookahead: int = defaults.LOOKAHEAD  # steps decode rows are sent ahead (coordinator/scheduler.py); 0: off
    max_step_tokens: int = defaults.MAX_STEP_TOKENS
    max_queue: int = defaults.MAX_QUEUE
    max_streams_per_client: int = defaults.MAX_STREAMS_PER_CLIENT
    max_seq_len: int | None = None  # tokens per sequence; None: defaults.MAX_SEQ_LEN, or the model's positions if fewer
    heartbeat_interval_ms: int = defaults.HEARTBEAT_INTERVAL_MS
    heartbeat_timeout_ms: int = defaults.HEARTBEAT_TIMEOUT_MS
    capacity_wait_s: float = defaults.CAPACITY_WAIT_S  # without a placement, requests wait this long
    codec: str = "exact"  # how stages compress the hidden states they send on: exact, SPEC, auto[:SPEC] (node/link.py)
    codec_min_tokens: int = defaults.CODEC_MIN_TOKENS  # smaller messages go uncompressed
    tp_codec: str = "exact"  # how tensor-parallel all-reduces are compressed (engine/collectives.py)
    tp_codec_min_elements: int = 0  # smaller all-reduces stay exact (0: engine/collectives.py's default)
    tp_across_nodes: bool = False  # a tensor-parallel group may take devices of several nodes
    cache_dir: str | None = None
    state_dir: str | None = None  # join token, API keys (node/security.py); None: $TENSORFLEET_HOME, ~/.tensorfleet
    client_auth: bool = True  # clients need an API key (False: --no-auth, for local use)
    tls_dir: str | None = None  # the cluster's certificates (node/certs.py): TLS on every channel
    http_port: int | None = defaults.HTTP_PORT  # OpenAI API, /metrics, /health (coordinator/http_api.py); None: off

    def __post_init__(self) -> None:
        if not 10 <= self.heartbeat_interval_ms < self.heartbeat_timeout_ms:
            raise TensorfleetError(f"heartbeat interval {self.heartbeat_interval_ms} ms must be at least 10 ms and "
                                   f"below the timeout ({self.heartbeat_timeout_ms} ms)")
        if self.max_streams_per_client < 1:
            raise TensorfleetError(f"max_streams_per_client={self.max_streams_per_client} must be >= 1")
        if self.capacity_wait_s < 0:
            raise TensorfleetError(f"capacity wait {self.capacity_wait_s} s must be >= 0")
        from node.link import parse_link_codec

        parse_link_codec(self.codec)  # a ConfigError (a TensorfleetError) names what is wrong
        from engine.collectives import make_reducer

        make_reducer(self.tp_codec)
        if self.codec_min_tokens < 0 or self.tp_codec_min_elements < 0:
            raise TensorfleetError(f"codec_min_tokens={self.codec_min_tokens} and tp_codec_min_elements="
                                   f"{self.tp_codec_min_elements} must be >= 0")


SERVICE_NAME = "tensorfleet.v1.Coordinator"

class Coordinator(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, config: CoordinatorConfig) -> None:
        from transformers import AutoTokenizer

        from coordinator.manifest import WeightServer, build_manifest
        from engine.model_source import resolve_model

        self.config = config
        self.secrets = load_or_create(state_dir(config.state_dir))
        source = resolve_model(config.model, cache_dir=config.cache_dir)
        self.model_dir, self.model_name = Path(source.path), source.name
        self.hf_config = json.loads((self.model_dir / "config.json").read_text())
        self.config = config = replace(config, max_seq_len=resolve_max_seq_len(config.max_seq_len, self.hf_config))
        self.manifest = build_manifest(self.model_dir, name=source.name)
        self.weights = WeightServer(self.model_dir, self.manifest)
        self.tokenizer = None
        if any((self.model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        eos = self.hf_config.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.started = time.time()
        self.http = None  # coordinator.http_api.HttpServer, started by serve()
        self.health = health.HealthServicer()
        self.serving = False
        self._set_serving(False)
        self.metrics = Metrics()
        self.metrics.registry.register(ClusterCollector(self))
        self.streams = StreamLimiter(config.max_streams_per_client)
        self.scheduler = Scheduler(eos_ids=self.eos_ids, max_queue=config.max_queue,
                                   max_step_tokens=config.max_step_tokens, lookahead=config.lookahead,
                                   on_step_error=lambda error: self.placer.on_step_error(error))
        self.placer = Placer(config=config, hf_config=self.hf_config, model_name=self.model_name,
                             scheduler=self.scheduler, set_serving=self._set_serving,
                             join_token=self.secrets.join_token)

    def guard(self) -> Guard:
        """Who may call what (node/security.py): nodes and operators hold the join token, clients an
        API key (unless client auth is off)."""
        nodes = require("the cluster's join token", lambda: (self.secrets.join_token,),
                        others=lambda: self.secrets.api_keys)
        clients = self.client_check
        rpc = f"/{SERVICE_NAME}/"
        return Guard({rpc + "Generate": clients, rpc + "Status": clients, rpc + "Join": nodes,
                      rpc + "Heartbeat": nodes, rpc + "Leave": nodes, rpc + "GetManifest": nodes,
                      rpc + "FetchWeights": nodes})

    @property
    def client_check(self) -> Check:
        """What clients must present (also for the HTTP API): an API key, unless client auth is off."""
        if not self.config.client_auth:
            return allow_all
        return require("an API key", lambda: self.secrets.api_keys, others=lambda: (self.secrets.join_token,))

    def _set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        self.placer.stop()
        self.scheduler.stop()
        self.health.enter_graceful_shutdown()

    # ------------------------------------------------------------------------------- membership RPCs
    def Join(self, request, context):  # noqa: ANN001, ANN201, N802
        info = request.node
        if not info.address or not info.devices:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a joining node must give its address and devices")
        member = self.placer.join(info)
        return coordinator_pb2.JoinResponse(node_id=member.node_id,
                                            heartbeat_interval_ms=self.config.heartbeat_interval_ms,
                                            heartbeat_timeout_ms=self.config.heartbeat_timeout_ms,
                                            epoch=common_pb2.PlacementEpoch(value=self.placer.epoch))

    def Heartbeat(self, request, context):  # noqa: ANN001, ANN201, N802
        seen = self.placer.membership.heartbeat(request.node_id, devices=request.devices, links=request.links)
        return coordinator_pb2.HeartbeatResponse(epoch=common_pb2.PlacementEpoch(value=self.placer.epoch),
                                                 rejoin=seen == "unknown", leave=seen == "left")

    def Leave(self, request, context):  # noqa: ANN001, ANN201, N802
        from coordinator.placement import PlacementError

        try:
            member = self.placer.leave(request.node)
        except KeyError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, status_details(str(e.args[0])))
        except PlacementError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, status_details(f"cannot drain {request.node}: {e}"))
        return coordinator_pb2.LeaveResponse(node_id=member.node_id,
                                             epoch=common_pb2.PlacementEpoch(value=self.placer.epoch))

    def GetManifest(self, request, context):  # noqa: ANN001, ANN201, N802
        return self.manifest

    def FetchWeights(self, request, context):  # noqa: ANN001, ANN201, N802
        try:
            yield from self.weights.chunks(list(request.names))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_details(str(e)))
        except TensorfleetError as e:  # a model file changed or shrank under the coordinator
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, status_details(str(e)))

    # -------------------------------------------------------------------------------------- status
    def Status(self, request, context):  # noqa: ANN001, ANN201, N802
        load = self.scheduler.load()
        now = time.monotonic()
        placer, membership = self.placer, self.placer.membership
        nodes = [coordinator_pb2.NodeStatus(node_id=m.node_id, info=m.info, state=m.state,
                                            last_heartbeat_age_s=now - m.last_seen) for m in membership.snapshot()]
        with membership.lock:
            changes = [coordinator_pb2.PlacementChange(
                epoch=common_pb2.PlacementEpoch(value=c.epoch), kind=c.kind, nodes=c.nodes, reason=c.reason,
                detected_at=c.detected_at, resumed_at=c.resumed_at, requests_replayed=c.requests_replayed,
                layers_moved=c.layers_moved) for c in membership.changes]
        with placer.lock:
            return coordinator_pb2.StatusResponse(epoch=common_pb2.PlacementEpoch(value=placer.epoch),
                                                  model=self.model_name, nodes=nodes, stages=placer.stages,
                                                  requests_running=load.running, requests_waiting=load.waiting,
                                                  max_batch_size=load.slots, slots_free=load.slots_free,
                                                  max_step_tokens=self.scheduler.max_step_tokens,
                                                  micro_batches=load.micro_batches, max_queue=self.scheduler.max_queue,
                                                  placement_changes=changes,
                                                  unavailable_reason=placer.unavailable_reason,
                                                  coordinator_run=placer.run)

    # ------------------------------------------------------------------------------------ Generate
    def Generate(self, request, context):  # noqa: ANN001, ANN201, N802
        try:
            req = self._new_request(request)
        except ValueError as e:
            self.metrics.reject("grpc", "invalid")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_details(str(e)))
        client = client_identity(context)
        if not self.streams.acquire(client):
            self.metrics.reject("grpc", "overloaded")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"this client already holds {self.streams.limit} "
                                                              f"streams (--max-streams-per-client)")
        context.add_callback(lambda: self.streams.release(client))
        try:
            self.scheduler.submit(req)
        except OverflowError as e:
            self.metrics.reject("grpc", "overloaded")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, status_details(str(e)))
        tracker = self.metrics.track("grpc", len(req.prompt))
        context.add_callback(lambda: (self.scheduler.cancel(req), tracker.end("cancelled")))
        while True:
            ev = _coalesce(req.events)
            if ev.error:
                tracker.end("error")
                context.abort(grpc.StatusCode.UNAVAILABLE, status_details(ev.error))
            tracker.tokens(len(ev.token_ids))
            if ev.finish_reason:
                tracker.end(ev.finish_reason)
            resp = coordinator_pb2.GenerateResponse(request_id=req.request_id, token_ids=ev.token_ids,
                                                    text_delta=ev.text)
            if ev.finish_reason:
                resp.finish_reason = FINISH.get(ev.finish_reason, coordinator_pb2.FINISH_REASON_UNSPECIFIED)
                resp.usage.prompt_tokens, resp.usage.completion_tokens = len(req.prompt), len(req.output)
                yield resp
                return
            yield resp

    def _new_request(self, request: coordinator_pb2.GenerateRequest) -> Request:
        params = sampling_from_proto(request.sampling)
        if request.WhichOneof("prompt") == "text":
            ids = self.encode_chat([{"role": "user", "content": request.text}], raw_fallback=True)
        else:
            ids = list(request.token_ids.ids)
        return self.new_request(ids, params, request_id=request.request_id)

    # ------------------------------------------------------------- shared by the gRPC and HTTP APIs
    def _need_tokenizer(self, text_chars: int):  # noqa: ANN202 - a transformers tokenizer
        if text_chars > defaults.MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt has {text_chars} characters; at most {defaults.MAX_PROMPT_CHARS}")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids")
        return self.tokenizer

    def encode_text(self, text: str) -> list[int]:
        """A raw prompt's token ids (no chat template)."""
        return list(self._need_tokenizer(len(text)).encode(text))

    def encode_chat(self, messages: list[dict[str, str]], *, raw_fallback: bool = False) -> list[int]:
        """A conversation's token ids through the tokenizer's chat template, ready for the assistant's turn.
        Without a template: the last message's text raw (``raw_fallback``), else a ValueError."""
        tokenizer = self._need_tokenizer(sum(len(m.get("content") or "") for m in messages))
        if not tokenizer.chat_template:
            if raw_fallback:
                return list(tokenizer.encode(messages[-1]["content"]))
            raise ValueError("this model's tokenizer has no chat template: use the completions API")
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def new_request(self, ids: list[int], params: SamplingParams, *, request_id: str = "") -> Request:
        """A request for the scheduler; ValueError names what is wrong with the prompt or its length."""
        vocab = int(self.hf_config["vocab_size"])
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        if len(ids) + params.max_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens plus max_tokens={params.max_tokens} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        return Request(request_id=request_id or uuid.uuid4().hex, prompt=ids, params=params,
                       seed=resolve_seed(params), detok=IncrementalDetokenizer(self.tokenizer, params.stop))


def resolve_max_seq_len(asked: int | None, hf_config: dict) -> int:
    """The KV room per sequence: ``asked``, or defaults.MAX_SEQ_LEN capped by the model's positions. Asking
    for more positions than the model has is a TensorfleetError (its steps would fail past them)."""
    limit = hf_config.get("max_position_embeddings")
    if asked is None:
        return min(defaults.MAX_SEQ_LEN, int(limit)) if limit else defaults.MAX_SEQ_LEN
    if limit and asked > int(limit):
        raise TensorfleetError(f"--max-seq-len {asked} exceeds the model's max_position_embeddings={limit}")
    return asked


def client_identity(context) -> str:  # noqa: ANN001 - a grpc.ServicerContext
    """Whose stream this is: the API key it presented (hashed), else the peer's address without its port."""
    peer = context.peer() or ""
    return identity(presented(context.invocation_metadata()),
                    peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer)


def identity(key: str | None, address: str) -> str:
    """A client for the stream limits: its API key (hashed), else its address (the HTTP API's too)."""
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "peer:" + address


class StreamLimiter:
    """At most ``limit`` streams at once per client identity."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.active: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        with self.lock:
            if self.active.get(client, 0) >= self.limit:
                return False
            self.active[client] = self.active.get(client, 0) + 1
            return True

    def release(self, client: str) -> None:
        with self.lock:
            left = self.active.get(client, 0) - 1
            if left > 0:
                self.active[client] = left
            else:
                self.active.pop(client, None)


def _coalesce(events: queue.Queue) -> Event:
    """The next event, merged with those already waiting behind it: a client that reads slower than
    tokens come gets them in fewer, larger responses instead of falling further behind."""
    ev = events.get()
    while ev.finish_reason is None and not ev.error:
        try:
            ev = ev.then(events.get_nowait())
        except queue.Empty:
            break
    return ev


def serve(config: CoordinatorConfig) -> tuple[grpc.Server, Coordinator]:
    """Start the coordinator: its gRPC server (with health and reflection) and, unless ``http_port`` is
    None, its HTTP server; ``coordinator.stop()`` stops the latter."""
    coordinator = Coordinator(config)
    # Each Generate stream holds a worker thread for its whole life: room for every running and queued
    # request, plus some for heartbeats, status and weight transfers (threads start only when needed).
    workers = max(config.num_slots or 0, config.max_slots) + config.max_queue + 32
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CONTROL_SERVER_OPTIONS,
                         interceptors=[coordinator.guard()])
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(coordinator, server)
    health_pb2_grpc.add_HealthServicer_to_server(coordinator.health, server)
    add_reflection(server, SERVICE_NAME)
    # Clients present no certificate (their API key identifies them); nodes' servers require one.
    bound = add_port(server, f"{config.host}:{config.port}", config.tls_dir, require_client_cert=False)
    if bound == 0:
        raise TensorfleetError(f"cannot listen on {config.host}:{config.port} (in use?)")
    if config.http_port is not None:
        from coordinator.http_api import HttpApi, HttpServer

        coordinator.http = HttpServer(HttpApi(coordinator), config.host, config.http_port, config.tls_dir)
        coordinator.http.start()
    server.start()
    coordinator.placer.start_monitor()
    log(f"serving {coordinator.model_name} on {config.host}:{bound}; waiting for {config.min_nodes} node(s)")
    return server, coordinator
