"""The coordinator (`coordinator start`): membership, placement, the scheduler and the client API.

RPC handlers are thin: they convert protobuf to domain types and call plain code.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from coordinator import defaults
from coordinator.capacity import choose_slots, stage_capacities
from coordinator.scheduler import Event, Request, Scheduler
from engine.detokenize import IncrementalDetokenizer
from engine.errors import TensorfleetError
from engine.sampling import resolve_seed
from node.stream import CHANNEL_OPTIONS, SERVER_OPTIONS, StageStream
from node.wire import dtype_to_proto, sampling_from_proto
from tensorfleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc

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
    micro_batches: int | None = None  # steps in flight; None: one per stage
    max_step_tokens: int = defaults.MAX_STEP_TOKENS
    max_queue: int = defaults.MAX_QUEUE
    max_seq_len: int = 2048
    heartbeat_interval_ms: int = 500
    heartbeat_timeout_ms: int = 2000
    cache_dir: str | None = None


@dataclass
class Member:
    node_id: str
    info: common_pb2.NodeInfo
    stub: node_pb2_grpc.NodeStub
    last_seen: float = field(default_factory=time.monotonic)
    state: int = coordinator_pb2.NODE_STATE_IDLE


def log(msg: str) -> None:
    print(f"[coordinator] {msg}", file=sys.stderr, flush=True)


class Coordinator(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, config: CoordinatorConfig) -> None:
        from transformers import AutoTokenizer

        from coordinator.manifest import WeightServer, build_manifest
        from engine.model_source import resolve_model

        self.config = config
        source = resolve_model(config.model, cache_dir=config.cache_dir)
        self.model_dir, self.model_name = Path(source.path), source.name
        self.hf_config = json.loads((self.model_dir / "config.json").read_text())
        self.manifest = build_manifest(self.model_dir, name=source.name)
        self.weights = WeightServer(self.model_dir, self.manifest)
        self.tokenizer = None
        if any((self.model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        eos = self.hf_config.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.scheduler = Scheduler(eos_ids=self.eos_ids, max_queue=config.max_queue,
                                   max_step_tokens=config.max_step_tokens)
        self.lock = threading.RLock()
        self.members: dict[str, Member] = {}
        self.epoch = 0
        self.stages: list[coordinator_pb2.StageInfo] = []
        self.stream: StageStream | None = None
        self.placing = threading.Lock()

    # ------------------------------------------------------------------------------- membership RPCs
    def Join(self, request, context):  # noqa: ANN001, ANN201, N802
        info = request.node
        if not info.address or not info.devices:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a joining node must give its address and devices")
        node_id = f"{info.name or 'node'}-{uuid.uuid4().hex[:6]}"
        channel = grpc.insecure_channel(info.address, options=CHANNEL_OPTIONS)
        with self.lock:
            self.members[node_id] = Member(node_id, info, node_pb2_grpc.NodeStub(channel))
        log(f"{node_id} joined from {info.address} with {len(info.devices)} device(s)")
        threading.Thread(target=self._maybe_place, daemon=True).start()
        return coordinator_pb2.JoinResponse(node_id=node_id, heartbeat_interval_ms=self.config.heartbeat_interval_ms,
                                            heartbeat_timeout_ms=self.config.heartbeat_timeout_ms,
                                            epoch=common_pb2.PlacementEpoch(value=self.epoch))

    def Heartbeat(self, request, context):  # noqa: ANN001, ANN201, N802
        with self.lock:
            member = self.members.get(request.node_id)
            if member is not None:
                member.last_seen = time.monotonic()
        return coordinator_pb2.HeartbeatResponse(epoch=common_pb2.PlacementEpoch(value=self.epoch),
                                                 rejoin=member is None)

    def GetManifest(self, request, context):  # noqa: ANN001, ANN201, N802
        return self.manifest

    def FetchWeights(self, request, context):  # noqa: ANN001, ANN201, N802
        try:
            yield from self.weights.chunks(list(request.names))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TensorfleetError as e:  # a model file changed or shrank under the coordinator
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    # -------------------------------------------------------------------------------------- status
    def Status(self, request, context):  # noqa: ANN001, ANN201, N802
        load = self.scheduler.load()
        now = time.monotonic()
        with self.lock:
            nodes = [coordinator_pb2.NodeStatus(node_id=m.node_id, info=m.info, state=m.state,
                                                last_heartbeat_age_s=now - m.last_seen)
                     for m in self.members.values()]
            return coordinator_pb2.StatusResponse(epoch=common_pb2.PlacementEpoch(value=self.epoch),
                                                  model=self.model_name, nodes=nodes, stages=self.stages,
                                                  requests_running=load.running, requests_waiting=load.waiting,
                                                  max_batch_size=load.slots, slots_free=load.slots_free,
                                                  max_step_tokens=self.scheduler.max_step_tokens,
                                                  micro_batches=load.micro_batches, max_queue=self.scheduler.max_queue)

    # ------------------------------------------------------------------------------------ Generate
    def Generate(self, request, context):  # noqa: ANN001, ANN201, N802
        try:
            req = self._new_request(request)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            self.scheduler.submit(req)
        except OverflowError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        context.add_callback(lambda: self.scheduler.cancel(req))
        while True:
            ev = _coalesce(req.events)
            if ev.error:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"the pipeline failed: {ev.error}")
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
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: send token ids")
            ids = list(self.tokenizer.apply_chat_template([{"role": "user", "content": request.text}],
                                                          add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)
                       if self.tokenizer.chat_template else self.tokenizer.encode(request.text))
        else:
            ids = list(request.token_ids.ids)
        vocab = int(self.hf_config["vocab_size"])
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if len(ids) + params.max_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens plus max_tokens={params.max_tokens} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        return Request(request_id=request.request_id or uuid.uuid4().hex, prompt=ids, params=params,
                       seed=resolve_seed(params), detok=IncrementalDetokenizer(self.tokenizer, params.stop))

    # ----------------------------------------------------------------------------------- placement
    def _maybe_place(self) -> None:
        with self.placing:
            with self.lock:
                if self.stages or len(self.members) < self.config.min_nodes:
                    return
                members = list(self.members.values())
            try:
                self._place(members)
            except (TensorfleetError, grpc.RpcError) as e:
                detail = e.details() if isinstance(e, grpc.RpcError) else str(e)
                log(f"no placement yet: {detail}")

    def _place(self, members: list[Member]) -> None:
        from coordinator.placement import DeviceCapacity, plan_placement, profile_from_config
        from engine.stage import parse_dtype

        dtype = parse_dtype(self.config.dtype)
        devices = [DeviceCapacity(node_id=m.node_id, device_index=d.index,
                                  kind="cuda" if d.kind == common_pb2.DEVICE_KIND_CUDA else "cpu",
                                  free_memory_bytes=d.free_memory_bytes, matmul_flops=d.matmul_flops,
                                  memory_bandwidth=d.memory_bandwidth_bytes_per_s)
                   for m in members for d in m.info.devices]
        profile = profile_from_config(self.hf_config, dtype_bytes=dtype.itemsize,
                                      kv_reserve_tokens=(self.config.num_slots or 1) * self.config.max_seq_len)
        plan = plan_placement(devices, profile, num_stages=self.config.num_stages)
        capacities = stage_capacities(plan, devices, profile, max_seq_len=self.config.max_seq_len,
                                      kv_memory_fraction=self.config.kv_memory_fraction)
        num_slots = choose_slots(capacities, requested=self.config.num_slots, max_slots=self.config.max_slots)
        epoch = self.epoch + 1
        by_id = {m.node_id: m for m in members}
        infos, next_address = [], ""
        for index in range(len(plan.stages) - 1, -1, -1):  # last stage first: each needs the next's address
            sp = plan.stages[index]
            node_ids = {n for n, _ in sp.members}
            if len(node_ids) != 1:
                raise TensorfleetError("stages spanning nodes are not supported yet")
            member = by_id[next(iter(node_ids))]
            member.state = coordinator_pb2.NODE_STATE_LOADING
            req = node_pb2.LoadStageRequest(
                epoch=common_pb2.PlacementEpoch(value=epoch), model=self.model_name, stage_index=index,
                num_stages=len(plan.stages), layers=common_pb2.LayerRange(start=sp.start, end=sp.end),
                dtype=dtype_to_proto(dtype), group=node_pb2.TensorParallelGroup(world_size=len(sp.members)),
                local_ranks=[node_pb2.LocalRank(device_index=d, tp_rank=r) for r, (_, d) in enumerate(sp.members)],
                num_slots=num_slots, max_seq_len=self.config.max_seq_len,
                next_stage_address=next_address, weight_source=node_pb2.WEIGHT_SOURCE_UNSPECIFIED)
            resp = member.stub.LoadStage(req, timeout=900)
            member.state = coordinator_pb2.NODE_STATE_SERVING
            next_address = resp.stage_address
            infos.append(coordinator_pb2.StageInfo(
                index=index, layers=req.layers, address=resp.stage_address, weight_bytes=resp.weight_bytes,
                kv_cache_bytes=resp.kv_cache_bytes, num_slots=req.num_slots, slots_fit=capacities[index].slots_fit,
                members=[coordinator_pb2.StageMember(node_id=n, device_index=d, tp_rank=r)
                         for r, (n, d) in enumerate(sp.members)]))
        stream = StageStream(next_address)
        with self.lock:
            self.epoch, self.stages, self.stream = epoch, list(reversed(infos)), stream
        self.scheduler.set_pipeline(stream.submit, epoch=epoch, num_slots=num_slots,
                                    micro_batches=self.config.micro_batches or len(infos))
        log(f"placement epoch {epoch}: batch capacity {num_slots} sequences of up to {self.config.max_seq_len} "
            f"tokens; " + ", ".join(
            f"stage {s.index} layers {s.layers.start}-{s.layers.end - 1} on "
            + "+".join(f"{m.node_id}:{m.device_index}" for m in s.members) for s in self.stages))


def _coalesce(events: queue.Queue) -> Event:
    """The next event, merged with those already waiting behind it: a client that reads slower than
    tokens come gets them in fewer, larger responses instead of falling further behind."""
    ev = events.get()
    while ev.finish_reason is None and not ev.error:
        try:
            nxt = events.get_nowait()
        except queue.Empty:
            break
        ev = Event(ev.token_ids + nxt.token_ids, ev.text + nxt.text, nxt.finish_reason, nxt.error)
    return ev


def serve(config: CoordinatorConfig) -> tuple[grpc.Server, Coordinator]:
    coordinator = Coordinator(config)
    # Each Generate stream holds a worker thread for its whole life: room for every running and queued
    # request, plus some for heartbeats, status and weight transfers (threads start only when needed).
    workers = max(config.num_slots or 0, config.max_slots) + config.max_queue + 32
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(coordinator, server)
    bound = server.add_insecure_port(f"{config.host}:{config.port}")
    if bound == 0:
        raise TensorfleetError(f"cannot listen on {config.host}:{config.port} (in use?)")
    server.start()
    log(f"serving {coordinator.model_name} on {config.host}:{bound}; waiting for {config.min_nodes} node(s)")
    return server, coordinator
