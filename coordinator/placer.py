"""Placement in force and its changes: the first placement, failover, drains and rebalancing.

The Placer owns the membership, the plan in force, its epoch and the stream into stage 0. Every change
of placement goes one way, under one lock:

1. pause the scheduler (a drain first lets the steps in flight return; after a failure they are lost),
   so the running requests wait at the head of the queue with the tokens they have;
2. bump the epoch and re-plan over the members that remain, preferring the plan that moves the fewest
   layers (``plan_placement(prefer=...)``);
3. have every stage's node load its stage under the new epoch (a node that keeps its layer range only
   switches epoch and next hop; one that gets new layers starts new executors);
4. open a stream into the new stage 0 and resume the scheduler, which replays each waiting request.

Failures are noticed two ways: a member's heartbeats stop for longer than the timeout (the monitor
thread), or a step fails on the data plane, after which every stage's node is probed through its gRPC
health service (a dead or unhealthy one is failed; if all answer, the step itself was bad and its
requests end with its error). Executors fence by epoch: a step of another epoch is refused, so a node
that was cut off and comes back cannot corrupt anything.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.capacity import choose_slots, stage_capacities
from coordinator.logs import log
from coordinator.membership import Change, Member, Membership
from coordinator.scheduler import Scheduler
from engine.errors import TensorfleetError
from node.security import data_key, open_channel, with_bearer
from node.stream import CHANNEL_OPTIONS, StageStream
from node.wire import dtype_to_proto
from tensorfleet.v1 import common_pb2, coordinator_pb2, node_pb2, node_pb2_grpc

PROBE_TIMEOUT_S = 1.0  # a node's health must answer within this after a failed step
DRAIN_WAIT_S = 30.0  # a drain waits this long for the steps in flight to return
LOAD_TIMEOUT_S = 900.0
MAX_ATTEMPTS = 4  # re-plans in one change when nodes fail while it loads
SET_ASIDE_S = 60.0  # a node whose LoadStage failed with an error is not planned on for this long
REBALANCE_GAIN = 1.25  # a node that joins triggers a re-placement when the estimated step gets this much faster


class Placer:
    def __init__(self, *, config: Any, hf_config: dict, model_name: str, scheduler: Scheduler,
                 set_serving: Callable[[bool], None], join_token: str | None = None) -> None:
        self.config, self.hf_config, self.model_name = config, hf_config, model_name
        self.join_token = join_token or ""  # presented to the nodes' Node service; makes the data keys
        self.run = secrets.token_hex(8)  # this process's id: data keys differ from a previous run's
        from engine.stage import parse_dtype

        self.scheduler = scheduler
        self.set_serving = set_serving
        self.dtype = parse_dtype(config.dtype)
        self.membership = Membership(timeout_s=config.heartbeat_timeout_ms / 1000)
        self.lock = threading.RLock()  # the fields below
        self.epoch = 0
        self.plan = None  # coordinator.placement.Plan in force, or the last one (re-plans prefer it)
        self.stages: list[coordinator_pb2.StageInfo] = []
        self.stream: StageStream | None = None
        self.unavailable_reason = f"waiting for {config.min_nodes} node(s) to join"
        self.pending: Change | None = None  # a change that could not finish yet (no capacity)
        self.placing = threading.Lock()  # one placement change at a time
        self.set_aside_until: dict[str, float] = {}  # node id -> monotonic time it may be planned on again
        self.stopped = threading.Event()

    # ----------------------------------------------------------------------------------- members
    def join(self, info: common_pb2.NodeInfo) -> Member:
        channel = open_channel(info.address, self.config.tls_dir, options=CHANNEL_OPTIONS)
        member = self.membership.join(info, stub=node_pb2_grpc.NodeStub(with_bearer(channel, self.join_token)),
                                      health=health_pb2_grpc.HealthStub(channel))
        log(f"{member.node_id} joined from {info.address} with {len(info.devices)} device(s)")
        threading.Thread(target=self.place_if_needed, name="place", daemon=True).start()
        return member

    def candidates(self) -> list[Member]:
        """Members a placement may use: joined, not leaving, not set aside after a failed load."""
        now = time.monotonic()
        with self.lock:
            return [m for m in self.membership.planned() if self.set_aside_until.get(m.node_id, 0.0) <= now]

    def set_aside(self, node_id: str, reason: str) -> None:
        with self.lock:
            self.set_aside_until[node_id] = time.monotonic() + SET_ASIDE_S
        log(f"{reason}; planning without {node_id} for {SET_ASIDE_S:g} s")

    def _set_aside_expired(self) -> bool:
        """Whether a node's time aside has just ended (then a placement may be possible, or better)."""
        now = time.monotonic()
        with self.lock:
            ended = [n for n, until in self.set_aside_until.items() if until <= now]
            for n in ended:
                del self.set_aside_until[n]
        return bool(ended)

    def in_placement(self, node_id: str) -> bool:
        with self.lock:
            return any(m.node_id == node_id for s in self.stages for m in s.members)

    def start_monitor(self) -> None:
        threading.Thread(target=self._monitor, name="failure-detector", daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()

    def _monitor(self) -> None:
        """Missed heartbeats fail a member; requests that waited past the deadline without capacity fail."""
        period = max(0.02, min(self.config.heartbeat_interval_ms, self.config.heartbeat_timeout_ms / 4) / 1000)
        while not self.stopped.wait(period):
            expired = self.membership.expired()
            if expired:
                reason = "; ".join(f"{m.node_id}: no heartbeat for {age:.2f} s" for m, age in expired)
                self.fail([m.node_id for m, _ in expired], reason)
            with self.lock:
                reason = self.unavailable_reason
            self.scheduler.expire_waiting(self.config.capacity_wait_s, reason)
            if self._set_aside_expired():
                threading.Thread(target=self.place_if_needed, name="place", daemon=True).start()

    # ---------------------------------------------------------------------------------- failures
    def fail(self, node_ids: list[str], reason: str) -> None:
        """Declare members failed: forget them, and re-place if the placement used any."""
        gone = self.membership.remove(node_ids)
        if not gone:
            return
        names = [m.node_id for m in gone]
        log(f"node(s) failed: {reason}")
        if any(self.in_placement(n) for n in names):
            self.change(Change(kind="failure", nodes=names, reason=reason))

    def on_step_error(self, error: str) -> None:
        """A step failed (the scheduler holds): probe the placement's nodes; fail over if one is gone."""
        with self.lock:
            node_ids = {m.node_id for s in self.stages for m in s.members}
        members = {m.node_id: m for m in self.membership.snapshot()}
        dead = {}
        for node_id in node_ids:
            member = members.get(node_id)
            if member is None:
                dead[node_id] = "no longer a member"
                continue
            try:
                status = member.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    dead[node_id] = f"its health is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
            except grpc.RpcError as e:
                dead[node_id] = f"health probe failed: {e.code().name}"
        if dead:
            # A node already forgotten is being (or was) replaced by the change that forgot it, whose
            # pause also released the scheduler's hold.
            reason = f"a step failed ({error}); " + "; ".join(f"{n}: {why}" for n, why in dead.items())
            self.fail([n for n in dead if n in members], reason)
        else:
            log(f"a step failed but every node is healthy: failing its requests ({error})")
            self.scheduler.fail_held()

    # --------------------------------------------------------------------------------- placement
    def place_if_needed(self) -> None:
        """After a join: place when nothing is in force (first placement, or after capacity ran out), or
        rebalance when the new member makes the best plan much faster than the one in force."""
        with self.placing:
            with self.lock:
                placed = bool(self.stages)
            if not placed:
                if len(self.candidates()) < self.config.min_nodes and self.plan is None:
                    return
                change = self.pending or Change(kind="initial", nodes=[], reason="nodes joined")
                self._place_with_retries(change)
                return
            rebalance = self._rebalance_pays()
        if rebalance is not None:
            self.change(rebalance)

    def _rebalance_pays(self) -> Change | None:
        from coordinator.placement import PlacementError

        members = self.candidates()
        try:
            best = self._plan(*self._devices_and_profile(members), prefer=None)
        except PlacementError:
            return None
        current = self.plan.est_step_time_s if self.plan is not None else 0.0
        if best.est_step_time_s * REBALANCE_GAIN > current:
            return None
        with self.lock:
            serving = {m.node_id for s in self.stages for m in s.members}
        joined = [m.node_id for m in members if m.node_id not in serving]
        reason = (f"estimated step {current * 1e3:.2f} ms -> {best.est_step_time_s * 1e3:.2f} ms "
                  f"with {len(members)} nodes")
        return Change(kind="rebalance", nodes=joined, reason=reason)

    def change(self, change: Change) -> None:
        """Pause, re-plan over the remaining members and resume (see the module docstring)."""
        with self.placing:
            self.set_serving(False)
            drain_s = DRAIN_WAIT_S if change.kind in ("drain", "rebalance") else 0.0
            change.requests_replayed = self.scheduler.pause(drain_s=drain_s)
            self._close_pipeline(f"{change.kind}: {change.reason}")
            self.membership.record(change)
            self._place_with_retries(change)

    def _close_pipeline(self, reason: str) -> None:
        with self.lock:
            stream, self.stream, self.stages = self.stream, None, []
            self.unavailable_reason = reason
        if stream is not None:
            stream.close()

    def _place_with_retries(self, change: Change) -> bool:
        from coordinator.placement import PlacementError

        for _ in range(MAX_ATTEMPTS):
            members = self.candidates()
            try:
                self._place(members, change)
                self.pending = None
                return True
            except PlacementError as e:
                reason = f"the nodes left cannot hold the model: {e}"
                with self.lock:
                    aside = sorted(self.set_aside_until)
                if aside:
                    reason += f" (set aside after failed loads: {', '.join(aside)})"
            except _LoadRefused as e:  # it answered with an error: keep it, but plan without it for a while
                reason = str(e)
                self.set_aside(e.node_id, reason)
                continue
            except _LoadFailed as e:
                reason = str(e)
                self.membership.remove([e.node_id])  # it failed while loading: plan without it
                change.nodes.append(e.node_id)
                continue
            except (TensorfleetError, grpc.RpcError) as e:
                reason = e.details() if isinstance(e, grpc.RpcError) else str(e)
            break
        else:
            reason = f"nodes kept failing while the stages loaded ({change.reason})"
        with self.lock:
            self.unavailable_reason = reason
        self.pending = change if change.kind != "initial" else None
        log(f"no placement: {reason}; requests wait up to {self.config.capacity_wait_s:g} s for capacity")
        return False

    def _place(self, members: list[Member], change: Change) -> None:
        from coordinator.placement import PlacementError, layers_moved

        if not members:
            raise PlacementError("no node is left")
        devices, profile = self._devices_and_profile(members)
        plan = self._plan(devices, profile, prefer=self.plan)
        capacities = stage_capacities(plan, devices, profile, max_seq_len=self.config.max_seq_len,
                                      kv_memory_fraction=self.config.kv_memory_fraction)
        num_slots = choose_slots(capacities, requested=self.config.num_slots, max_slots=self.config.max_slots)
        with self.lock:
            epoch = self.epoch + 1
            self.epoch = epoch  # even if loading fails: stages loaded under it are never used
        key = data_key(self.join_token, self.run, epoch)  # the stages of this epoch accept only it
        infos = self._load_stages(plan, {m.node_id: m for m in members}, epoch, num_slots, capacities, key)
        stream = StageStream(infos[0].address, secret=key, tls_dir=self.config.tls_dir)
        moved = layers_moved(self.plan, plan, profile.num_layers)
        with self.lock:
            self.stages, self.stream, self.plan = infos, stream, plan
            self.unavailable_reason = ""
        micro_batches = self.config.micro_batches or distinct_hardware(infos, {m.node_id: m for m in members})
        self.scheduler.set_pipeline(stream.submit, epoch=epoch, num_slots=num_slots, micro_batches=micro_batches)
        self.set_serving(True)
        change.epoch, change.layers_moved, change.resumed_at = epoch, moved, time.time()
        took = f" {change.resumed_at - change.detected_at:.2f} s after it began" if change.kind != "initial" else ""
        log(f"placement epoch {epoch} ({change.kind}{took}, {moved} layer(s) moved, {change.requests_replayed} "
            f"request(s) replayed): batch capacity {num_slots} sequences of up to {self.config.max_seq_len} "
            f"tokens; " + ", ".join(f"stage {s.index} layers {s.layers.start}-{s.layers.end - 1} on "
                                    + "+".join(f"{m.node_id}:{m.device_index}" for m in s.members) for s in infos))

    def _devices_and_profile(self, members: list[Member]) -> tuple[list, Any]:
        from coordinator.placement import DeviceCapacity, profile_from_config

        devices = [DeviceCapacity(node_id=m.node_id, device_index=d.index,
                                  kind="cuda" if d.kind == common_pb2.DEVICE_KIND_CUDA else "cpu",
                                  free_memory_bytes=d.free_memory_bytes, matmul_flops=d.matmul_flops,
                                  memory_bandwidth=d.memory_bandwidth_bytes_per_s)
                   for m in members for d in m.info.devices]
        profile = profile_from_config(self.hf_config, dtype_bytes=self.dtype.itemsize,
                                      kv_reserve_tokens=(self.config.num_slots or 1) * self.config.max_seq_len)
        return devices, profile

    def _check_fits(self, members: list[Member]) -> None:
        """Raise PlacementError unless ``members`` can hold the model."""
        from coordinator.placement import PlacementError

        if not members:
            raise PlacementError("no other node would be left")
        self._plan(*self._devices_and_profile(members), prefer=self.plan)

    def _plan(self, devices: list, profile: Any, *, prefer: Any) -> Any:
        from coordinator.placement import PlacementError, plan_placement

        span = self.config.tp_across_nodes
        try:
            return plan_placement(devices, profile, num_stages=self.config.num_stages, prefer=prefer, span_nodes=span)
        except PlacementError:
            if self.config.num_stages is None or self.plan is None:
                raise
            # After a failure the operator's stage count may no longer fit: the planner's choice does.
            return plan_placement(devices, profile, prefer=prefer, span_nodes=span)

    def _load_stages(self, plan: Any, by_id: dict[str, Member], epoch: int, num_slots: int,
                     capacities: list, data_key: str) -> list[coordinator_pb2.StageInfo]:
        """LoadStage on every stage's nodes, last stage first (each needs the next one's address). A stage
        whose tensor-parallel group spans nodes loads on all of them at once: their ranks meet in the
        store of the node holding rank 0 (its NodeInfo.store_port), which then leads the stage."""
        infos, next_address = [], ""
        for index in range(len(plan.stages) - 1, -1, -1):
            sp = plan.stages[index]
            leader = by_id[sp.members[0][0]]
            nodes = list(dict.fromkeys(n for n, _ in sp.members))  # rank order: the leader first
            group = node_pb2.TensorParallelGroup(world_size=len(sp.members))
            if len(nodes) > 1:
                if not leader.info.store_port:
                    raise _LoadRefused(leader.node_id, f"{leader.node_id} serves no rendezvous store (an older "
                                                       f"node?): it cannot lead a group spanning nodes")
                host = leader.info.address.rpartition(":")[0]
                group.store_address, group.store_prefix = f"{host}:{leader.info.store_port}", secrets.token_hex(8)
                group.members.extend(f"{n}/{d}" for n, d in sp.members)
            base = node_pb2.LoadStageRequest(
                epoch=common_pb2.PlacementEpoch(value=epoch), model=self.model_name, stage_index=index,
                num_stages=len(plan.stages), layers=common_pb2.LayerRange(start=sp.start, end=sp.end),
                dtype=dtype_to_proto(self.dtype), group=group, num_slots=num_slots,
                max_seq_len=self.config.max_seq_len, next_stage_address=next_address,
                weight_source=node_pb2.WEIGHT_SOURCE_UNSPECIFIED, codec=self.config.codec if next_address else "",
                codec_min_tokens=self.config.codec_min_tokens, tp_codec=self.config.tp_codec,
                tp_codec_min_elements=self.config.tp_codec_min_elements, data_key=data_key)
            requests = {}
            for node_id in nodes:
                req = node_pb2.LoadStageRequest()
                req.CopyFrom(base)
                req.local_ranks.extend(node_pb2.LocalRank(device_index=d, tp_rank=r)
                                       for r, (n, d) in enumerate(sp.members) if n == node_id)
                requests[node_id] = req
            responses = self._load_on(index, {n: by_id[n] for n in nodes}, requests)
            resp = responses[leader.node_id]
            next_address = resp.stage_address
            infos.append(coordinator_pb2.StageInfo(
                index=index, layers=base.layers, address=resp.stage_address,
                weight_bytes=sum(r.weight_bytes for r in responses.values()),
                kv_cache_bytes=sum(r.kv_cache_bytes for r in responses.values()), num_slots=num_slots,
                slots_fit=capacities[index].slots_fit,
                members=[coordinator_pb2.StageMember(node_id=n, device_index=d, tp_rank=r)
                         for r, (n, d) in enumerate(sp.members)]))
        planned = {n for s in plan.stages for n, _ in s.members}
        for member in by_id.values():
            if member.node_id not in planned:
                member.state = coordinator_pb2.NODE_STATE_IDLE
        return list(reversed(infos))

    def _load_on(self, index: int, members: dict[str, Member], requests: dict[str, node_pb2.LoadStageRequest]
                 ) -> dict[str, node_pb2.LoadStageResponse]:
        """One stage's LoadStage on each of its nodes, concurrently (a group's ranks wait for each other);
        raises the first node's failure (_LoadFailed, or _LoadRefused for an error answered)."""
        results: dict[str, Any] = {}

        def load(member: Member) -> None:
            member.state = coordinator_pb2.NODE_STATE_LOADING
            try:
                results[member.node_id] = member.stub.LoadStage(requests[member.node_id], timeout=LOAD_TIMEOUT_S)
                member.state = coordinator_pb2.NODE_STATE_SERVING
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    results[member.node_id] = _LoadFailed(
                        member.node_id, f"{member.node_id} failed while loading stage {index}: {e.code().name}")
                else:
                    member.state = coordinator_pb2.NODE_STATE_IDLE
                    results[member.node_id] = _LoadRefused(
                        member.node_id, f"{member.node_id} could not load stage {index}: {e.code().name}: "
                                        f"{e.details()}")

        if len(members) == 1:
            load(next(iter(members.values())))
        else:
            threads = [threading.Thread(target=load, args=(m,), name=f"load-{m.node_id}", daemon=True)
                       for m in members.values()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for result in results.values():
            if isinstance(result, _LoadFailed):
                raise result
        return results

    # ------------------------------------------------------------------------------------- drain
    def leave(self, key: str) -> Member:
        """Drain a member: move its layers to the others, then forget it (its heartbeats are told to stop).
        Raises KeyError for an unknown node, PlacementError when the others cannot hold the model."""
        from coordinator.placement import PlacementError

        member = self.membership.find(key)
        others = [m for m in self.candidates() if m.node_id != member.node_id]
        if self.in_placement(member.node_id):
            self._check_fits(others)  # before pausing anything: a refused drain leaves service alone
        else:
            self.membership.remove([member.node_id], left=True)
            log(f"{member.node_id} left (it held no stage)")
            return member
        member.leaving = True
        try:
            self.change(Change(kind="drain", nodes=[member.node_id], reason=f"{member.node_id} asked to leave"))
        finally:
            member.leaving = False
        if self.in_placement(member.node_id) or not self.stages:
            raise PlacementError(self.unavailable_reason or f"{member.node_id} still holds a stage")
        self.membership.remove([member.node_id], left=True)
        log(f"{member.node_id} drained and left")
        return member


class _LoadFailed(TensorfleetError):
    """A node stopped answering while it loaded its stage: it is treated as failed."""

    def __init__(self, node_id: str, message: str) -> None:
        super().__init__(message)
        self.node_id = node_id


class _LoadRefused(_LoadFailed):
    """A node answered LoadStage with an error (out of memory, a bad cache, ...): it stays a member, set
    aside from placement for ``SET_ASIDE_S``."""


def distinct_hardware(stages: list, members: dict[str, Member]) -> int:
    """How many of the pipeline's stages can compute at the same time: stages whose devices share a GPU
    (nodes on one machine, with the same DeviceInfo.uuid) take turns on it. The default number of steps in
    flight: more would only split each step's rows, and every split reads the stage's weights again."""
    groups: list[set[str]] = []
    for stage in stages:
        ids = set()
        for m in stage.members:
            info = members[m.node_id].info.devices
            uuid = info[m.device_index].uuid if m.device_index < len(info) else ""
            ids.add(uuid or f"{m.node_id}:{m.device_index}")
        joined = [g for g in groups if g & ids]
        for g in joined:
            groups.remove(g)
            ids |= g
        groups.append(ids)
    return max(1, len(groups))
