"""The node daemon (`node join`): inventory and probe, join and heartbeats, and LoadStage, which starts one
executor process per device of the stage it is given.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import socket
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from engine.errors import TensorfleetError
from node.executor import ExecutorSpec, executor_main
from node.stream import CHANNEL_OPTIONS, SERVER_OPTIONS
from node.wire import dtype_from_proto
from tensorfleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc

LOAD_TIMEOUT_S = 900.0


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


def log(msg: str) -> None:
    print(f"[node] {msg}", file=sys.stderr, flush=True)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NodeDaemon(node_pb2_grpc.NodeServicer):
    def __init__(self, config: NodeConfig) -> None:
        from node.inventory import inventory

        self.config = config
        self.name = config.name or socket.gethostname()
        self.devices = inventory(config.devices)
        self.cache_dir = Path(config.cache_dir or _default_cache()).expanduser()
        self.channel = grpc.insecure_channel(config.coordinator, options=CHANNEL_OPTIONS)
        self.coordinator = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.procs: list[mp.Process] = []
        self.node_id = ""
        self.epoch = 0
        self.stop_event = threading.Event()
        self.load_lock = threading.Lock()
        self.server: grpc.Server | None = None
        self.address = ""

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
        node_pb2_grpc.add_NodeServicer_to_server(self, self.server)
        port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        self.server.start()
        self.address = f"{self.config.host}:{port}"
        info = self._node_info()
        reply = self._join(info)
        self.node_id = reply.node_id
        log(f"joined {self.config.coordinator} as {self.node_id} ({self.name}, {len(self.devices)} device(s)), "
            f"serving control on {self.address}")
        interval = max(reply.heartbeat_interval_ms, 50) / 1000.0
        threading.Thread(target=self._heartbeats, args=(interval,), daemon=True).start()

    def _join(self, info: common_pb2.NodeInfo) -> coordinator_pb2.JoinResponse:
        deadline = time.monotonic() + 60
        while True:
            try:
                return self.coordinator.Join(coordinator_pb2.JoinRequest(node=info), timeout=10)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise TensorfleetError(f"cannot join the coordinator at {self.config.coordinator}: "
                                           f"{e.code().name}: {e.details()}") from e
                time.sleep(0.5)

    def wait(self) -> None:
        try:
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        self._stop_executors()
        if self.server is not None:
            self.server.stop(grace=1)

    def _heartbeats(self, interval: float) -> None:
        while not self.stop_event.wait(interval):
            try:
                self.coordinator.Heartbeat(coordinator_pb2.HeartbeatRequest(
                    node_id=self.node_id, epoch=common_pb2.PlacementEpoch(value=self.epoch)), timeout=interval * 4)
            except grpc.RpcError as e:
                log(f"heartbeat failed: {e.code().name}")

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
                memory_bandwidth_bytes_per_s=result.memory_bandwidth))
        return common_pb2.NodeInfo(name=self.name, address=self.address, devices=infos, version="0.1.0",
                                   host_memory_bytes=host_memory()[0])

    # ------------------------------------------------------------------------------------ LoadStage
    def LoadStage(self, request: node_pb2.LoadStageRequest, context: grpc.ServicerContext):  # noqa: N802
        with self.load_lock:
            try:
                return self._load_stage(request)
            except TensorfleetError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except (ValueError, KeyError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _load_stage(self, req: node_pb2.LoadStageRequest) -> node_pb2.LoadStageResponse:
        started = time.perf_counter()
        self._stop_executors()
        world = req.group.world_size or len(req.local_ranks)
        if world != len(req.local_ranks):
            raise TensorfleetError(f"a tensor-parallel group of {world} spanning nodes is not supported yet "
                                   f"(this node holds {len(req.local_ranks)} of its ranks)")
        for r in req.local_ranks:
            if r.device_index >= len(self.devices):
                raise ValueError(f"device index {r.device_index} does not exist on {self.name}")
        source, fetched = self._weights_for(req)
        kinds = {self.devices[r.device_index].kind for r in req.local_ranks}
        backend = req.group.backend or ("nccl" if kinds == {"cuda"} else "gloo")
        port = free_port(self.config.host)
        # Executors wait on each other (pipeline stages sharing a host, tensor-parallel peers); libgomp's
        # default spin of 300k iterations after each parallel region then steals the cores of the stage
        # that computes (measured: 15 ms per pipeline hop on 2 cores, 1-4 ms with 2k-30k). A short spin
        # keeps the back-to-back regions of one step hot. The user's own setting wins.
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
        events = mp.get_context("spawn").Queue()
        self.epoch = req.epoch.value
        for r in sorted(req.local_ranks, key=lambda r: r.tp_rank):
            dev = self.devices[r.device_index]
            spec = ExecutorSpec(rank=r.tp_rank, world=world, device="cpu" if dev.kind == "cpu" else f"cuda:{dev.index}",
                                threads=dev.threads, store_host=self.config.host, store_port=port,
                                store_prefix=f"epoch{req.epoch.value}/stage{req.stage_index}/", backend=backend,
                                start=req.layers.start, end=req.layers.end, dtype=_dtype_name(req.dtype),
                                num_slots=req.num_slots, max_seq_len=req.max_seq_len, epoch=req.epoch.value,
                                next_stage_address=req.next_stage_address, listen_host=self.config.host, **source)
            proc = mp.get_context("spawn").Process(target=executor_main, args=(spec, events), daemon=True,
                                                   name=f"tensorfleet-executor-{r.tp_rank}")
            proc.start()
            self.procs.append(proc)
        infos = self._wait_ready(events, world)
        log(f"stage {req.stage_index} (layers {req.layers.start}-{req.layers.end - 1}, tp={world}) ready at "
            f"{infos[0]['address']} in {time.perf_counter() - started:.1f}s")
        return node_pb2.LoadStageResponse(
            epoch=req.epoch, weight_bytes=sum(i["weight_bytes"] for i in infos.values()),
            kv_cache_bytes=sum(i["kv_cache_bytes"] for i in infos.values()),
            load_seconds=time.perf_counter() - started, stage_address=infos[0]["address"], fetched_bytes=fetched)

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

    def _wait_ready(self, events, world: int) -> dict[int, dict]:  # noqa: ANN001
        infos: dict[int, dict] = {}
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while len(infos) < world:
            try:
                kind, rank, payload = events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self._stop_executors()
                raise TensorfleetError(f"the stage's executors did not load within {LOAD_TIMEOUT_S:.0f}s") from None
            if kind == "error":
                self._stop_executors()
                last = payload.strip().splitlines()[-1]
                log(f"executor {rank} failed:\n{payload}")
                raise TensorfleetError(f"executor {rank} failed to load its stage: {last}")
            infos[rank] = payload
        return infos

    def _stop_executors(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.procs = []


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
