"""The node daemon (`node join`): inventory and probe, join and heartbeats, and LoadStage, which starts one
executor process per device of the stage it is given. Heartbeats also carry the node's report: live device
stats (node/telemetry.py) and its stage leader's link traffic counters (asked over the control pipe).

Membership is kept alive by the daemon: when the coordinator no longer knows it (it was declared failed,
or the coordinator restarted) it drops its stage and joins again as a new member, retrying with backoff
for as long as it runs; when the coordinator says it has left (a drain), it stops. Its gRPC health
service reports NOT_SERVING once an executor of its stage has died, which the coordinator's probe after
a failed step reads as a failed node. A LoadStage that keeps the stage the executors already hold (same
layers, devices, dtype and slots) only moves them to the new epoch and next hop: no reload.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import socket
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import torch.distributed as dist
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.errors import TensorfleetError
from engine.logs import log_line
from node.control import ControlPipe
from node.executor import GROUP_FORM_TIMEOUT_S, MAX_GROUP, ExecutorSpec, executor_main, standby_main
from node.security import Guard, add_port, add_reflection, open_channel, require, status_details, with_bearer
from node.stream import CHANNEL_OPTIONS, CONTROL_SERVER_OPTIONS, split_address
from node.telemetry import Telemetry
from node.wire import dtype_from_proto
from tensorfleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc

LOAD_TIMEOUT_S = 900.0
CONFIGURE_TIMEOUT_S = 10.0
STATS_TIMEOUT_S = 0.2  # a heartbeat waits at most this (or half its interval) for the link counters
REJOIN_BACKOFF_S = (0.2, 5.0)  # first and longest wait between join attempts
STANDBY_DELAY_S = 10.0  # a used standby executor is replaced this long after its stage loaded


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    coordinator: str
    devices: str | None = None
    name: str = ""
    host: str = "127.0.0.1"  # the address the coordinator and other nodes use to reach this node
    port: int = 0
    cache_dir: str = ""
    model_dir: str | None = None
    probe: bool = True
    standby: bool = True  # keep an executor process started ahead (faster failover; costs its memory)
    join_token: str = ""  # the cluster's join token (node/security.py)
    tls_dir: str | None = None  # the cluster's certificates (node/certs.py): TLS everywhere, mutual on our servers
    shared_memory: bool = True  # steps to a next stage on this machine through shared memory (node/peer_ring.py)


def log(msg: str) -> None:
    log_line("node", msg)


class NodeDaemon(node_pb2_grpc.NodeServicer):
    def __init__(self, config: NodeConfig) -> None:
        from node.inventory import inventory

        self.config = config
        self.name = config.name or socket.gethostname()
        self.devices = inventory(config.devices)
        self.telemetry = Telemetry(self.devices)  # live device stats for heartbeats
        self.cache_dir = Path(config.cache_dir or _default_cache()).expanduser()
        self.channel = open_channel(config.coordinator, config.tls_dir, options=CHANNEL_OPTIONS)
        self.coordinator = coordinator_pb2_grpc.CoordinatorStub(with_bearer(self.channel, config.join_token))
        self.procs: list[mp.Process] = []
        self.procs_lock = threading.Lock()
        self.control: ControlPipe | None = None  # the daemon's end of the pipe to the leader executor
        self.links: tuple[ControlPipe | None, list] = (None, [])  # the last link counters, and whose
        self.stage_key: tuple | None = None  # what the running executors hold (see _reuse_key)
        self.stage_response: node_pb2.LoadStageResponse | None = None
        self.node_id = ""
        self.info: common_pb2.NodeInfo | None = None
        self.epoch = 0
        self.stop_event = threading.Event()
        self.load_lock = threading.Lock()
        self.server: grpc.Server | None = None
        self.health = health.HealthServicer()
        self.standby: tuple | None = None  # (process, events queue, control pipe) of a started executor
        self.address = ""
        self.store = None  # the rendezvous store of the groups this node leads (see start)
        # Executors wait on each other (pipeline stages sharing a host, tensor-parallel peers); libgomp's
        # default spin of 300k iterations after each parallel region then steals the cores of the stage
        # that computes (measured: 15 ms per pipeline hop on 2 cores, 1-4 ms with 2k-30k). A short spin
        # keeps the back-to-back regions of one step hot. The user's own setting wins.
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        token = require("the cluster's join token", lambda: (self.config.join_token,))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=CONTROL_SERVER_OPTIONS,
                                  interceptors=[Guard({"tensorfleet.v1.Node": token})])
        node_pb2_grpc.add_NodeServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        add_reflection(self.server, "tensorfleet.v1.Node")
        port = add_port(self.server, f"{self.config.host}:{self.config.port}", self.config.tls_dir,
                        require_client_cert=True)
        if port == 0:
            raise TensorfleetError(f"cannot listen on {self.config.host}:{self.config.port} (in use?)")
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.server.start()
        self.address = f"{self.config.host}:{port}"
        # Where the ranks of every tensor-parallel group this node leads meet (a group's ranks may run on
        # other nodes): one store for the daemon's life, a fresh key prefix per load. Like the groups'
        # gloo/NCCL traffic, it is not authenticated: tensor-parallel peers need a trusted network.
        self.store = dist.TCPStore(self.config.host, 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=GROUP_FORM_TIMEOUT_S))
        self.info = self._node_info()
        reply = self._join(deadline_s=60.0)
        log(f"joined {self.config.coordinator} as {self.node_id} ({self.name}, {len(self.devices)} device(s)), "
            f"serving control on {self.address}")
        interval = max(reply.heartbeat_interval_ms, 10) / 1000.0
        threading.Thread(target=self._heartbeats, args=(interval,), name="heartbeats", daemon=True).start()
        threading.Thread(target=self._watch_executors, name="executor-watch", daemon=True).start()
        self._spawn_standby()

    def _join(self, *, deadline_s: float | None) -> coordinator_pb2.JoinResponse:
        """Join (again), retrying with backoff while the coordinator is unreachable: until ``deadline_s``,
        or for as long as the daemon runs (None)."""
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        wait = REJOIN_BACKOFF_S[0]
        while True:
            try:
                reply = self.coordinator.Join(coordinator_pb2.JoinRequest(node=self.info), timeout=10)
                self.node_id = reply.node_id
                return reply
            except grpc.RpcError as e:
                retry = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retry or (deadline is not None and time.monotonic() > deadline):
                    raise TensorfleetError(f"cannot join the coordinator at {self.config.coordinator}: "
                                           f"{e.code().name}: {e.details()}") from e
            if self.stop_event.wait(wait):
                raise TensorfleetError("stopped while joining")
            wait = min(wait * 2, REJOIN_BACKOFF_S[1])

    def wait(self) -> None:
        try:
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        standby = self._take_standby()
        if standby is not None:
            standby[0].terminate()
        self._stop_executors()
        if self.server is not None:
            self.server.stop(grace=1)
        self.telemetry.close()

    def _heartbeats(self, interval: float) -> None:
        failing = False
        while not self.stop_event.wait(interval):
            try:
                reply = self.coordinator.Heartbeat(self._heartbeat_request(interval), timeout=max(interval * 4, 1.0))
            except grpc.RpcError as e:
                if not failing:
                    log(f"heartbeats failing: {e.code().name}; retrying every {interval:.2f} s")
                failing = True
                continue
            if failing:
                log("heartbeats answered again")
                failing = False
            if reply.leave:
                log(f"{self.node_id} has left the cluster: stopping")
                self.stop_event.set()
                return
            if reply.rejoin:
                log(f"the coordinator does not know {self.node_id} (declared failed, or it restarted): "
                    f"dropping the stage and joining again")
                self._stop_executors()
                try:
                    reply = self._join(deadline_s=None)
                except TensorfleetError:
                    return  # stopped
                interval = max(reply.heartbeat_interval_ms, 10) / 1000.0
                log(f"joined again as {self.node_id}")

    def _heartbeat_request(self, interval: float) -> coordinator_pb2.HeartbeatRequest:
        """Liveness plus the node's report: live device stats (node/telemetry.py) and the leader executor's
        link counters. Counters the executor is too busy to give in time are the last ones it gave (they only
        grow, so a repeat is merely stale)."""
        devices = self.telemetry.report(self.info.devices)
        control = self.control
        links = self.links[1] if self.links[0] is control else []
        if control is not None:
            answer = control.ask(("stats",), timeout_s=min(STATS_TIMEOUT_S, interval / 2))
            if answer is not None and answer[0] == "stats":
                links = [coordinator_pb2.LinkTraffic(**fields) for fields in answer[1]]
                self.links = (control, links)
        epoch = common_pb2.PlacementEpoch(value=self.epoch)
        return coordinator_pb2.HeartbeatRequest(node_id=self.node_id, epoch=epoch, devices=devices, links=links)

    def _watch_executors(self) -> None:
        """Health NOT_SERVING once an executor of the current stage has died (crash, OOM kill)."""
        while not self.stop_event.wait(0.2):
            with self.procs_lock:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            if dead:
                log(f"executor(s) died: {', '.join(f'{p.name} (exit {p.exitcode})' for p in dead)}; health NOT_SERVING")
                with self.procs_lock:
                    self.procs = [p for p in self.procs if p not in dead]
                    self.stage_key = None  # never reuse a broken stage

    def _node_info(self) -> common_pb2.NodeInfo:
        from node.inventory import host_memory
        from node.probe import estimate

        results = [estimate(dev) for dev in self.devices]
        if self.config.probe:
            results = _probe_devices(self.devices)
        infos = []
        for i, (dev, result) in enumerate(zip(self.devices, results, strict=True)):
            log(f"device {i}: {dev.kind}:{dev.index} {dev.name}, {dev.free_memory_bytes / 2**30:.1f} GiB free, "
                f"{result.matmul_flops / 1e9:.0f} GFLOP/s, {result.memory_bandwidth / 1e9:.1f} GB/s")
            infos.append(common_pb2.DeviceInfo(
                kind=common_pb2.DEVICE_KIND_CUDA if dev.kind == "cuda" else common_pb2.DEVICE_KIND_CPU,
                index=i, ordinal=dev.index, name=dev.name, total_memory_bytes=dev.total_memory_bytes,
                free_memory_bytes=dev.free_memory_bytes, matmul_flops=result.matmul_flops,
                memory_bandwidth_bytes_per_s=result.memory_bandwidth, uuid=dev.uuid))
        return common_pb2.NodeInfo(name=self.name, address=self.address, devices=infos, version="0.1.0",
                                   host_memory_bytes=host_memory()[0], store_port=self.store.port if self.store else 0)

    # ------------------------------------------------------------------------------------ LoadStage
    def LoadStage(self, request: node_pb2.LoadStageRequest, context: grpc.ServicerContext):  # noqa: N802
        with self.load_lock:
            try:
                return self._load_stage(request)
            except TensorfleetError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, status_details(str(e)))
            except (ValueError, KeyError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_details(str(e)))

    def _check_request(self, req: node_pb2.LoadStageRequest) -> None:
        """Refuse a malformed request (ValueError: INVALID_ARGUMENT) before the running stage is touched."""
        from engine.collectives import make_reducer
        from node.link import parse_link_codec

        if not req.model or req.epoch.value < 1 or not 0 <= req.layers.start < req.layers.end:
            raise ValueError(f"a stage needs a model, an epoch >= 1 and layers start < end (got {req.model!r}, "
                             f"epoch {req.epoch.value}, layers {req.layers.start}-{req.layers.end})")
        if req.num_slots < 1 or req.max_seq_len < 1:
            raise ValueError(f"num_slots={req.num_slots} and max_seq_len={req.max_seq_len} must be >= 1")
        if not req.local_ranks:
            raise ValueError("a stage needs at least one local rank")
        ranks = sorted(r.tp_rank for r in req.local_ranks)
        world = req.group.world_size or len(req.local_ranks)
        if (len(set(ranks)) != len(ranks) or ranks[-1] >= world
                or len({r.device_index for r in req.local_ranks}) != len(ranks)):
            raise ValueError(f"tensor-parallel ranks {ranks} must be distinct, below the group's world size "
                             f"{world}, and on distinct devices")
        if world > MAX_GROUP:
            raise ValueError(f"a tensor-parallel group of {world} ranks is more than {MAX_GROUP}")
        if world != len(req.local_ranks):  # a group spanning nodes: its ranks meet in the leader's store
            if not req.group.store_address or not req.group.store_prefix:
                raise ValueError(f"a tensor-parallel group of {world} with {len(req.local_ranks)} rank(s) here "
                                 f"needs the leader's store address and a store prefix")
            if len(req.group.members) != world:
                raise ValueError(f"a group spanning nodes names its {world} members ({len(req.group.members)} "
                                 f"given)")
            split_address(req.group.store_address)
        elif ranks != list(range(world)):
            raise ValueError(f"tensor-parallel ranks {ranks} must be 0..{world - 1}")
        for r in req.local_ranks:
            if r.device_index >= len(self.devices):
                raise ValueError(f"device index {r.device_index} does not exist on {self.name}")
        if _dtype_name(req.dtype) not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"a stage computes in float32, bfloat16 or float16, not {_dtype_name(req.dtype)}")
        parse_link_codec(req.codec)
        make_reducer(req.tp_codec or "exact")

    def _load_stage(self, req: node_pb2.LoadStageRequest) -> node_pb2.LoadStageResponse:
        started = time.perf_counter()
        self._check_request(req)
        key = _reuse_key(req)
        if key == self.stage_key and self.stage_response is not None:
            try:
                return self._reconfigure(req, started)
            except TensorfleetError as e:
                log(f"cannot move the running stage to epoch {req.epoch.value} ({e}): loading it anew")
        self._stop_executors()
        local, world = len(req.local_ranks), req.group.world_size or len(req.local_ranks)
        source, fetched = self._weights_for(req)
        kinds = {self.devices[r.device_index].kind for r in req.local_ranks}
        backend = req.group.backend or ("nccl" if kinds == {"cuda"} else "gloo")
        store_host, store_port = (split_address(req.group.store_address) if req.group.store_address
                                  else (self.config.host, self.store.port))
        prefix = f"{req.group.store_prefix or uuid.uuid4().hex}/epoch{req.epoch.value}/stage{req.stage_index}/"
        leads = any(r.tp_rank == 0 for r in req.local_ranks)
        standby = self._take_standby() if world == 1 else None
        if standby is not None:
            proc, events, control = standby
        else:
            events = mp.get_context("spawn").Queue()
            control, leader_end = mp.get_context("spawn").Pipe()
        self.epoch = req.epoch.value
        procs = []
        for r in sorted(req.local_ranks, key=lambda r: r.tp_rank):
            dev = self.devices[r.device_index]
            spec = ExecutorSpec(rank=r.tp_rank, world=world, device="cpu" if dev.kind == "cpu" else f"cuda:{dev.index}",
                                threads=dev.threads, store_host=store_host, store_port=store_port,
                                store_prefix=prefix, backend=backend,
                                start=req.layers.start, end=req.layers.end, dtype=_dtype_name(req.dtype),
                                num_slots=req.num_slots, max_seq_len=req.max_seq_len, epoch=req.epoch.value,
                                next_stage_address=req.next_stage_address, listen_host=self.config.host,
                                codec=req.codec, codec_min_tokens=req.codec_min_tokens, tp_codec=req.tp_codec,
                                tp_codec_min_elements=req.tp_codec_min_elements, data_key=req.data_key,
                                tls_dir=self.config.tls_dir, shared_memory=self.config.shared_memory, **source)
            if standby is not None:  # torch already imported there: about 1.5 s sooner on CPU
                control.send(("start", spec))
                procs.append(proc)
                continue
            args = (spec, events, leader_end if r.tp_rank == 0 else None)
            proc = mp.get_context("spawn").Process(target=executor_main, args=args, daemon=True,
                                                   name=f"tensorfleet-executor-{r.tp_rank}")
            proc.start()
            procs.append(proc)
        with self.procs_lock:
            self.procs = procs
        infos = self._wait_ready(events, local, procs)
        address = infos[0]["address"] if leads else ""
        where = f"ready at {address}" if leads else "ready (ranks " + ",".join(map(str, sorted(infos))) + ")"
        log(f"stage {req.stage_index} (layers {req.layers.start}-{req.layers.end - 1}, tp={world}) {where} in "
            f"{time.perf_counter() - started:.1f}s")
        response = node_pb2.LoadStageResponse(
            epoch=req.epoch, weight_bytes=sum(i["weight_bytes"] for i in infos.values()),
            kv_cache_bytes=sum(i["kv_cache_bytes"] for i in infos.values()),
            load_seconds=time.perf_counter() - started, stage_address=address, fetched_bytes=fetched)
        # A group spanning nodes is never kept for a later epoch (stage_key None): each of its nodes would
        # decide alone, and one that reloads would leave the others' ranks waiting in a dead group.
        self.control = ControlPipe(control) if leads else None
        self.stage_key = key if world == local else None
        self.stage_response = response
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if standby is not None:  # later: its imports would slow the replays that follow a failover
            timer = threading.Timer(STANDBY_DELAY_S, self._spawn_standby)
            timer.daemon = True
            timer.start()
        return response

    # ----------------------------------------------------------------------------------- standby
    def _spawn_standby(self) -> None:
        """Keep one executor process started ahead, with torch imported, for the next single-device stage:
        a failover that moves layers here then skips the interpreter start and imports."""
        if not self.config.standby or self.stop_event.is_set() or self.standby is not None:
            return
        ctx = mp.get_context("spawn")
        events = ctx.Queue()
        control, child = ctx.Pipe()
        proc = ctx.Process(target=standby_main, args=(events, child), daemon=True, name="tensorfleet-executor-0")
        proc.start()
        self.standby = (proc, events, control)

    def _take_standby(self) -> tuple | None:
        standby, self.standby = self.standby, None
        if standby is not None and standby[0].is_alive():
            return standby
        return None

    def _reconfigure(self, req: node_pb2.LoadStageRequest, started: float) -> node_pb2.LoadStageResponse:
        """Move the running stage to the request's epoch and next hop (same layers: nothing to load)."""
        with self.procs_lock:
            alive = bool(self.procs) and all(p.is_alive() for p in self.procs)
        if not alive or self.control is None:
            raise TensorfleetError("its executors are not running")
        answer = self.control.ask(("configure", req.epoch.value, req.next_stage_address, req.data_key),
                                  timeout_s=CONFIGURE_TIMEOUT_S)
        if answer is None:
            raise TensorfleetError(f"the leader executor did not answer within {CONFIGURE_TIMEOUT_S:.0f} s")
        if answer != ("configured", req.epoch.value):
            raise TensorfleetError(f"the leader executor answered {answer}")
        self.epoch = req.epoch.value
        response = node_pb2.LoadStageResponse()
        response.CopyFrom(self.stage_response)
        response.epoch.CopyFrom(req.epoch)
        response.load_seconds, response.fetched_bytes = time.perf_counter() - started, 0
        log(f"stage {req.stage_index} (layers {req.layers.start}-{req.layers.end - 1}) kept, now epoch "
            f"{req.epoch.value}, next hop {req.next_stage_address or '(last stage)'}")
        return response

    def _weights_for(self, req: node_pb2.LoadStageRequest) -> tuple[dict, int]:
        """Where the executors read weights: the local --model-dir, or the cache filled from the coordinator."""
        manifest = self.coordinator.GetManifest(coordinator_pb2.ManifestRequest(), timeout=60)
        hf_config = json.loads(manifest.config_json)
        if self.config.model_dir and req.weight_source != node_pb2.WEIGHT_SOURCE_COORDINATOR:
            return {"hf_config": hf_config, "model_dir": self.config.model_dir}, 0
        from node.weight_cache import TensorCache, fetch_missing, stage_tensor_names

        cache = TensorCache(self.cache_dir)
        names = stage_tensor_names(manifest, hf_config, req.layers.start, req.layers.end,
                                   int(hf_config["num_hidden_layers"]))
        fetched = fetch_missing(self.coordinator, manifest, names, cache, node_id=self.node_id)
        manifest_path = self.cache_dir / f"manifest-{manifest.fingerprint[:16]}.pb"
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_bytes(manifest.SerializeToString())
        log(f"weights for layers {req.layers.start}-{req.layers.end - 1}: {len(names)} tensors, "
            f"{fetched / 2**20:.1f} MiB fetched, the rest from the cache in {self.cache_dir}")
        return {"hf_config": hf_config, "cache_dir": str(self.cache_dir), "manifest_path": str(manifest_path)}, fetched

    def _wait_ready(self, events, world: int, procs: list) -> dict[int, dict]:  # noqa: ANN001
        infos: dict[int, dict] = {}
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while len(infos) < world:
            try:  # short waits: a stopping daemon or a dead executor must not wait out the whole timeout
                kind, rank, payload = events.get(timeout=0.25)
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive()]
                problem = ("the daemon is stopping" if self.stop_event.is_set() else
                           f"{dead[0].name} exited with {dead[0].exitcode} while loading" if dead else
                           f"the stage's executors did not load within {LOAD_TIMEOUT_S:.0f}s"
                           if time.monotonic() > deadline else None)
                if problem is None:
                    continue
                self._stop_executors()
                raise TensorfleetError(problem) from None
            if kind == "error":
                self._stop_executors()
                last = payload.strip().splitlines()[-1]
                log(f"executor {rank} failed:\n{payload}")
                raise TensorfleetError(f"executor {rank} failed to load its stage: {last}")
            infos[rank] = payload
        return infos

    def _stop_executors(self) -> None:
        with self.procs_lock:
            procs, self.procs = self.procs, []
            self.stage_key, self.stage_response, self.control = None, None, None
            self.health.set("", health_pb2.HealthCheckResponse.SERVING)  # healthy, with no stage
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _reuse_key(req: node_pb2.LoadStageRequest) -> tuple:
    """What running executors must already hold for a LoadStage to keep them (all but epoch and next hop;
    a stage that was last and is no longer, or the reverse, differs in its layers' end)."""
    ranks = tuple(sorted((r.device_index, r.tp_rank) for r in req.local_ranks))
    return (req.model, req.layers.start, req.layers.end, req.dtype, req.group.world_size, req.group.backend, ranks,
            req.num_slots, req.max_seq_len, req.weight_source, req.codec, req.codec_min_tokens, req.tp_codec,
            req.tp_codec_min_elements)


def _dtype_name(code: int) -> str:
    if code == common_pb2.DTYPE_UNSPECIFIED:
        return "float32"
    return str(dtype_from_proto(code)).removeprefix("torch.")


def _default_cache() -> str:
    return os.environ.get("TENSORFLEET_CACHE") or str(Path("~/.cache/tensorfleet").expanduser())


def _probe_devices(devices: list) -> list:  # noqa: ANN001 - node.inventory.Device, node.probe.ProbeResult
    """Probe every device; GPUs in a short-lived child process, so that the daemon holds no CUDA context
    (hundreds of MiB per GPU for as long as it lives)."""
    from node.probe import probe

    if all(d.kind == "cpu" for d in devices):
        return [probe(d) for d in devices]
    with futures.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(probe, devices))
