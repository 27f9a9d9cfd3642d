"""One executor process per device: it loads its share of a stage and computes batch steps.

Rank 0 of a stage's tensor-parallel group is the leader: it serves Stage.Forward, hands each step to
its peers by broadcast on the stage's process group, and forwards the resulting hidden states to the
next stage (or samples, on the last stage). Peers loop on the broadcast.

The leader serves one placement epoch at a time and refuses steps of any other (fencing). When a
re-placement keeps its layers, the node daemon moves it to the new epoch and next hop over a control
pipe instead of restarting it: the weights stay loaded, and the KV cache is refilled by the replays.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.codecs import Codec
from engine.config import ModelConfig
from engine.graphs import DecodeGraphs, graphs_pay
from engine.kv_cache import KVCache
from engine.logs import dump_stacks_on_signal, log_line
from engine.parallel import TPGroup
from engine.sampling import SamplingParams, sample
from engine.stage import StageModel, parse_dtype
from engine.transfer import to_device, tokens_to_host
from node.link import CodecCost, LinkPolicy, TrafficCounters, measure_cost, measure_link, parse_link_codec
from node.peer_ring import MAX_RING_ROWS, RING_SLOTS, ReceivedRings, RingLink, SharedRing, device_id, host_id
from node.wire import (
    WireError,
    decode_from_proto,
    encoded_to_proto,
    sampling_from_proto,
    tensor_from_proto,
    tensor_to_proto,
)
from tensorfleet.v1 import common_pb2, node_pb2, node_pb2_grpc

OP_STEP, OP_STOP = 1, 2
MAX_OLD_KEYS = 8
# A tensor-parallel group's ranks wait this long for each other to arrive (the other nodes of a group
# spanning nodes load their weights meanwhile); then the load fails.
GROUP_FORM_TIMEOUT_S = 300.0
MAX_GROUP = 64  # the most ranks of one tensor-parallel group
KIND_IDS, KIND_HIDDEN = 1, 2
# Stage 0 remembers what this many recent steps sampled, for the rows sent ahead of them (after_step).
RECENT_STEPS = 64
PARAMS_KEPT = 4  # parsed sampling params kept, per slot
AHEAD_WAIT_S = 600.0  # how long a row sent ahead waits for the step it follows


@dataclass(frozen=True, kw_only=True)
class ExecutorSpec:
    rank: int
    world: int
    device: str  # "cpu" or "cuda:N"
    threads: int  # torch threads for a CPU executor (0: torch's default)
    store_host: str
    store_port: int
    store_prefix: str
    backend: str  # "gloo" | "nccl"
    hf_config: dict
    start: int
    end: int
    dtype: str
    num_slots: int
    max_seq_len: int
    epoch: int
    next_stage_address: str
    listen_host: str
    model_dir: str | None = None  # weights from a local Hugging Face directory...
    cache_dir: str | None = None  # ...or from the node's content-addressed cache
    manifest_path: str | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    codec: str = ""  # how hidden states to the next stage are compressed: node/link.py ("": exact)
    codec_min_tokens: int = 0  # messages of fewer tokens go uncompressed
    tp_codec: str = ""  # how the group's all-reduces are compressed: engine/collectives.py ("": exact)
    tp_codec_min_elements: int = 0  # all-reduces of fewer elements stay exact (0: the default)
    data_key: str = ""  # the epoch's data key: Stage calls must carry it, and calls downstream do
    tls_dir: str | None = None  # the cluster's certificates: the Stage service and calls downstream use TLS
    shared_memory: bool = True  # offer (and accept) step rings with stages on this machine: node/peer_ring.py


class StageRunner:
    """A loaded stage plus its KV cache: runs one step on this rank (leader and peers alike)."""

    def __init__(self, spec: ExecutorSpec, tp: TPGroup) -> None:
        cfg = ModelConfig.from_hf(spec.hf_config)
        self.cfg, self.spec, self.tp = cfg, spec, tp
        self.stage = StageModel(cfg, start=spec.start, end=spec.end, tp=tp, dtype=parse_dtype(spec.dtype),
                                device=spec.device)
        self.stage.load(_weight_reader(spec))
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.stage.parameters())
        self.stage.optimize_kernels()  # after counting: prepacked weights are no longer parameters
        use_graphs = graphs_pay(self.stage)
        self.cache: KVCache = self.stage.new_cache(num_slots=spec.num_slots, max_seq_len=spec.max_seq_len,
                                                   spare_slots=1 if use_graphs else 0)
        self.graphs = DecodeGraphs(self.stage, self.cache) if use_graphs else None

    def run(self, slots: list[int], starts: list[int], lengths: list[int], x: torch.Tensor) -> torch.Tensor:
        if self.graphs is not None and self.graphs.handles(lengths):
            return self.graphs.run(slots, starts, to_device(x, self.stage.device))
        meta = self.stage.make_meta(slots, starts, lengths)
        return self.stage(to_device(x, self.stage.device), meta, self.cache)


def _weight_reader(spec: ExecutorSpec):  # noqa: ANN202 - WeightReader or CachedWeightReader
    if spec.model_dir:
        from engine.weights import WeightReader

        return WeightReader(spec.model_dir)
    from pathlib import Path

    from node.weight_cache import CachedWeightReader, TensorCache
    from tensorfleet.v1 import coordinator_pb2

    manifest = coordinator_pb2.ModelManifest.FromString(Path(spec.manifest_path).read_bytes())
    return CachedWeightReader(manifest, TensorCache(Path(spec.cache_dir)))  # every tensor the cache holds


# ------------------------------------------------------------------------------- broadcast protocol
class StepBroadcast:
    """Leader → peers: the step's header and per-row metadata in one fixed-size tensor, then the payload
    (no pickle): two broadcasts, and one host sync on each peer, per step."""

    def __init__(self, tp: TPGroup, device: torch.device, hidden_size: int, dtype: torch.dtype, max_rows: int
                 ) -> None:
        self.tp, self.device, self.hidden_size, self.dtype = tp, device, hidden_size, dtype
        self.max_rows = max_rows  # a step has at most one row per KV slot

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=0, group=self.tp.group)
        return t

    def send(self, op: int, slots=(), starts=(), lengths=(), x: torch.Tensor | None = None) -> None:  # noqa: ANN001
        batch = len(slots)
        if batch > self.max_rows:
            raise ValueError(f"a step of {batch} rows is more than the stage's {self.max_rows} slots")
        num_tokens = int(x.shape[0]) if x is not None else 0
        kind = KIND_IDS if x is not None and x.dtype == torch.long else KIND_HIDDEN
        head = [op, batch, num_tokens, kind, *slots, *starts, *lengths]
        head += [0] * (4 + 3 * self.max_rows - len(head))
        self._bcast(torch.tensor(head, dtype=torch.long, device=self.device))
        if op == OP_STEP:
            self._bcast(x.to(self.device).contiguous())

    def receive(self) -> tuple[int, list[int], list[int], list[int], torch.Tensor | None]:
        head = self._bcast(torch.empty(4 + 3 * self.max_rows, dtype=torch.long, device=self.device)).tolist()
        op, batch, num_tokens, kind = head[:4]
        if op != OP_STEP:
            return op, [], [], [], None
        meta = head[4:4 + 3 * batch]
        shape = (num_tokens,) if kind == KIND_IDS else (num_tokens, self.hidden_size)
        x = self._bcast(torch.empty(shape, dtype=torch.long if kind == KIND_IDS else self.dtype, device=self.device))
        return op, meta[:batch], meta[batch:2 * batch], meta[2 * batch:], x


# ------------------------------------------------------------------------------------- the leader
class StageServicer(node_pb2_grpc.StageServicer):
    def __init__(self, runner: StageRunner, broadcast: StepBroadcast | None, spec: ExecutorSpec) -> None:
        self.runner, self.broadcast, self.spec = runner, broadcast, spec
        self.is_last = runner.stage.is_last
        self.history: dict[int, list[int]] = {}  # slot -> tokens so far (last stage, repetition penalty)
        # A step's rows carry their sampling params; each distinct message is parsed once (keyed by its
        # bytes, not the request id, which clients may choose and reuse).
        self.params: OrderedDict[bytes, SamplingParams] = OrderedDict()
        self.epoch, self.next_address = spec.epoch, spec.next_stage_address
        self.data_key = spec.data_key
        self.old_keys: list[str] = []  # of earlier epochs (a call with one is told it is stale)
        self.policy = LinkPolicy(parse_link_codec("exact" if self.is_last else spec.codec),
                                 min_tokens=spec.codec_min_tokens)
        self._cost: CodecCost | None = None  # of the policy's codec on this device, measured once
        self.traffic = TrafficCounters(stage_start=spec.start, stage_end=spec.end)  # read by the control pipe
        self.downstream = None
        self.route_lock = threading.Lock()  # epoch, next_address, downstream
        self.work: queue.Queue = queue.Queue()  # (step, future of its result), computed in order
        # Rows sent ahead (SequenceStep.after_step) take the token an earlier step sampled for their slot:
        # on stage 0, each recent step's {slot: token} once known and, where stage 0 is also the last
        # stage, its tokens still on the device (so the next step starts without waiting for the host).
        self.recent: OrderedDict[int, futures.Future] = OrderedDict()
        self.recent_device: OrderedDict[int, tuple[dict[int, int], torch.Tensor]] = OrderedDict()
        # The last stage hands each step's tokens to the host here, in order, while the next step computes
        # (and a stage whose next stage answers in a shared ring reads the tokens there).
        self.finisher = futures.ThreadPoolExecutor(1, thread_name_prefix="step-finisher")
        # Shared memory with stages on this machine (node/peer_ring.py): the rings upstream stages set up
        # here, and the one to the next stage.
        self.rings = ReceivedRings(runner.stage.device, is_last=self.is_last)
        self.link: RingLink | None = None

    def configure(self, epoch: int, next_address: str, data_key: str) -> None:
        """Serve ``epoch`` from now on, forwarding to ``next_address``; steps of older epochs are refused,
        and so are calls with an older epoch's data key."""
        with self.route_lock:
            if data_key != self.data_key:
                self.old_keys = [self.data_key, *self.old_keys][:MAX_OLD_KEYS]
                self.data_key = data_key
            old, self.downstream = self.downstream, None
            old_link, self.link = self.link, None
            if next_address != self.next_address:
                self.policy.forget_link()
            self.epoch, self.next_address = epoch, next_address
            self.history.clear()
            self.recent.clear()
            self.recent_device.clear()
            self.rings.clear()
        if old is not None:
            old.close()  # its steps in flight fail; their epoch is gone anyway
        if old_link is not None:
            old_link.close()

    def Forward(self, request_iterator, context):  # noqa: ANN001, ANN201, N802 - gRPC API
        """Steps may arrive while earlier ones are still downstream (micro-batches in flight): a reader
        thread queues every step at once, and results leave in arrival order."""
        results: queue.Queue = queue.Queue()

        def read() -> None:
            try:
                for msg in request_iterator:
                    done: futures.Future = futures.Future()
                    results.put(done)
                    self.work.put((msg, done))
            finally:
                results.put(None)

        threading.Thread(target=read, name="stage-reader", daemon=True).start()
        while (done := results.get()) is not None:
            yield done.result()

    def compute_forever(self) -> None:
        """Run steps on the calling thread: the process's main thread, whose OpenMP/oneDNN thread pool
        loaded the model (the same steps on a gRPC worker thread took 41 ms instead of 35). A step bound
        downstream is handed to the stream and not waited for, so the next step can start here."""
        while True:
            msg, done = self.work.get()
            try:
                out = self.handle(msg)
            except BaseException as e:  # noqa: BLE001 - the stream's handler re-raises it
                done.set_exception(e)
                continue
            if isinstance(out, futures.Future):
                out.add_done_callback(lambda f, done=done, msg=msg: done.set_result(self._relayed(f, msg)))
            else:
                done.set_result(out)

    def _relayed(self, downstream: futures.Future, msg: node_pb2.StepMessage) -> node_pb2.StepResult:
        try:
            return downstream.result()
        except Exception as e:  # noqa: BLE001 - the upstream stream reports it as this step's error
            return node_pb2.StepResult(epoch=msg.epoch, step_id=msg.step_id,
                                       error=f"stage {self.spec.start}-{self.spec.end - 1}: downstream: {e}")

    def handle(self, msg: node_pb2.StepMessage) -> node_pb2.StepResult | futures.Future:
        """Compute one step: the sampled tokens (last stage) or the future of the downstream result."""
        result = node_pb2.StepResult(epoch=msg.epoch, step_id=msg.step_id)
        if msg.epoch.value != self.epoch:
            result.error = f"stage serves epoch {self.epoch}, got a step of epoch {msg.epoch.value}"
            return result
        try:
            return self._step(msg, result)
        except (WireError, ValueError) as e:
            result.error = f"stage {self.spec.start}-{self.spec.end - 1}: {e}"
            return result

    def _step(self, msg: node_pb2.StepMessage, result: node_pb2.StepResult
              ) -> node_pb2.StepResult | futures.Future:
        seqs = msg.sequences
        if not seqs:
            raise ValueError("a step without sequences")
        slots = [s.slot for s in seqs]
        starts = [s.start for s in seqs]
        lengths = [1 if s.after_step else len(s.token_ids) for s in seqs]
        if min(lengths) < 1 or max(slots) >= self.spec.num_slots:
            raise ValueError(f"bad step: lengths {lengths}, slots {slots} of {self.spec.num_slots}")
        ahead = any(s.after_step for s in seqs)
        first = self.runner.stage.is_first
        params = self._params(seqs) if self.is_last or ahead else None
        if any(s.after_step and s.token_ids for s in seqs):
            raise ValueError("a row sent ahead (after_step) comes without token ids")
        # Stage 0 passes a row sent ahead on without its token (that stays on the device) only where no
        # stage needs the token on the host.
        if ahead and not first and self.is_last and _needs_history(params):
            raise ValueError("a row sent ahead (after_step) reached the last stage without the token its "
                             "repetition penalty needs")
        # Checked here, not left to torch: an id outside the vocabulary failed the embedding with an
        # IndexError, and a prefill past the KV cache's length a RuntimeError (both escaped as UNKNOWN and
        # ended the stream), while a decode past it went through unchecked.
        vocab, capacity = self.runner.cfg.vocab_size, self.runner.cache.spec.max_seq_len
        if any(not 0 <= t < vocab for s in seqs for t in s.token_ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if max(s.start + n for s, n in zip(seqs, lengths, strict=True)) > capacity:
            raise ValueError(f"a sequence goes past the KV cache's {capacity} positions: starts {starts}, "
                             f"lengths {lengths}")
        if ahead and first:
            x = self._ahead_tokens(seqs, params)
        elif first:
            x = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long)  # packed [N]
        else:
            x = self._hidden(msg, sum(lengths))
        if self.broadcast is not None:
            self.broadcast.send(OP_STEP, slots, starts, lengths, x)
        out = self.runner.run(slots, starts, lengths, x)
        if not self.is_last:
            down = node_pb2.StepMessage(epoch=msg.epoch, step_id=msg.step_id, sequences=seqs)
            stream, link = self._downstream()
            codec = self.policy.choose(out.shape[0])
            if link is not None and codec is None and link.fits(out.shape[0]):
                # The stream's own address: a re-placement between here and there changes next_address.
                self.traffic.add(stream.address, "shared", raw_bytes=out.numel() * out.element_size(), wire_bytes=0)
                sent = link.forward(stream, down, out, keep=first)
            else:
                codec, raw, wire = pack_hidden(down, out, codec, key=self.spec.end)
                self.traffic.add(stream.address, codec, raw_bytes=raw, wire_bytes=wire)
                sent = stream.submit(down)
            if first:  # rows sent ahead of this step wait for its tokens
                sampled = self._remember(msg.step_id)
                sent.add_done_callback(lambda f: _pass_tokens(f, sampled))
            return sent
        tokens = self._sample(seqs, params, lengths, out)  # on the stage's device
        if msg.HasField("shared_hidden") and self.rings.has_tokens(msg.shared_hidden):
            # The stage that set up the ring reads them there; this host does not wait for the device.
            result.shared_tokens.CopyFrom(self.rings.put_tokens(msg.shared_hidden, tokens))
            return result
        sampled = self._remember(msg.step_id) if first else None
        if sampled is not None and tokens.device.type == "cuda":
            self.recent_device[msg.step_id] = ({s: i for i, s in enumerate(slots)}, tokens)
            while len(self.recent_device) > RECENT_STEPS:
                self.recent_device.popitem(last=False)
        fetch = tokens_to_host(tokens)

        def finish() -> node_pb2.StepResult:
            ids = fetch()
            if sampled is not None:
                sampled.set_result(dict(zip(slots, ids, strict=True)))
            result.tokens.extend(node_pb2.SampledToken(request_id=s.request_id, slot=s.slot, token_id=t)
                                 for s, t in zip(seqs, ids, strict=True))
            return result

        if tokens.device.type != "cuda" or (sampled is None and self.work.empty()):
            # Nothing to start meanwhile (a stage after the first: its next step waits for these tokens
            # anyway at batch 1), so no hop through the finisher thread. Stage 0 may get a step sent
            # ahead any moment, which it launches before these tokens reach the host.
            return finish()
        return self.finisher.submit(finish)  # the next step starts meanwhile

    def _device_pools(self, followed: list[int]) -> dict[int, tuple[dict[int, int], torch.Tensor]] | None:
        """Each followed step's ({slot: row}, tokens on this device) for a gather on the device, or None
        where some step's tokens are on the host only: this stage sampled them (stage 0 is also the last
        stage) or the last stage left them in the ring (waits for its answer)."""
        pools = {}
        for step_id in followed:
            entry = self.recent_device.get(step_id)
            if entry is None and self.link is not None:
                entry = self.link.device_tokens(step_id, AHEAD_WAIT_S)
            if entry is None:
                return None
            pools[step_id] = entry
        return pools

    def _remember(self, step_id: int) -> futures.Future:
        """The future of step ``step_id``'s {slot: token}, for rows sent ahead of it."""
        sampled: futures.Future = futures.Future()
        self.recent[step_id] = sampled
        while len(self.recent) > RECENT_STEPS:
            self.recent.popitem(last=False)
        return sampled

    def _params(self, seqs) -> list[SamplingParams]:  # noqa: ANN001 - repeated SequenceStep
        """Each row's sampling params (ConfigError, a ValueError, for bad ones)."""
        out = []
        for s in seqs:
            key = s.sampling.SerializeToString(deterministic=True)
            p = self.params.get(key)
            if p is None:
                p = self.params[key] = sampling_from_proto(s.sampling)
                while len(self.params) > PARAMS_KEPT * self.spec.num_slots:
                    self.params.popitem(last=False)
            out.append(p)
        return out

    def _ahead_tokens(self, seqs, params: list[SamplingParams]) -> torch.Tensor:  # noqa: ANN001
        """The packed token ids [N] of a step with rows sent ahead. Where this stage sampled the steps they
        follow and no row needs its history on the host, the tokens never leave the device; otherwise
        each row waits for its step's tokens (on stage 0 before the last: that step's result passing back)
        and gets them written into its token_ids, for the stages after this one."""
        device = self.runner.stage.device
        followed = list(dict.fromkeys(s.after_step for s in seqs if s.after_step))
        pools = None if _needs_history(params) else self._device_pools(followed)
        if pools is not None:
            # One gather from [known ids..., each followed step's tokens...]: its index and the known ids
            # reach the device in one copy that does not wait for the step in flight.
            known = [t for s in seqs if not s.after_step for t in s.token_ids]
            base, offset = {}, len(known)
            for step_id in followed:
                base[step_id] = offset
                offset += pools[step_id][1].shape[0]
            index, k = [], 0
            for s in seqs:
                if s.after_step:
                    rows = pools[s.after_step][0]
                    if s.slot not in rows:
                        raise ValueError(f"slot {s.slot} was not in step {s.after_step}, which it follows")
                    index.append(base[s.after_step] + rows[s.slot])
                else:
                    index.extend(range(k, k + len(s.token_ids)))
                    k += len(s.token_ids)
            host = to_device(known + index, device)
            pool = torch.cat([host[:len(known)], *(pools[i][1] for i in followed)])
            return pool[host[len(known):]]
        for s in seqs:
            if not s.after_step:
                continue
            sampled = self.recent.get(s.after_step)
            if sampled is None:
                raise ValueError(f"a row follows step {s.after_step}, which this stage has not seen (recently)")
            try:
                tokens = sampled.result(timeout=AHEAD_WAIT_S)
            except Exception as e:  # noqa: BLE001 - this step fails with the reason
                raise ValueError(f"the step this one follows ({s.after_step}) failed: {e}") from e
            if s.slot not in tokens:
                raise ValueError(f"slot {s.slot} was not in step {s.after_step}, which it follows")
            s.token_ids.append(tokens[s.slot])
            s.after_step = 0
        return torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long)

    def _hidden(self, msg: node_pb2.StepMessage, num_tokens: int) -> torch.Tensor:
        """The step's incoming hidden states [num_tokens, hidden], plain or compressed, validated."""
        device = self.runner.stage.device  # decode where the stage computes: a GPU decodes in microseconds
        if msg.HasField("shared_hidden"):
            x = self.rings.hidden(msg.shared_hidden)  # the stream waits for the upstream stage's write
        elif msg.HasField("encoded_hidden"):
            x = decode_from_proto(msg.encoded_hidden, device=device)
        elif msg.HasField("hidden"):
            x = tensor_from_proto(msg.hidden, device=device)
        else:
            raise ValueError("a step for a stage after the first needs hidden states")
        if tuple(x.shape) != (num_tokens, self.runner.cfg.hidden_size) or not x.dtype.is_floating_point:
            raise ValueError(f"hidden states of shape {tuple(x.shape)} and {x.dtype} do not fit a step of "
                             f"{num_tokens} tokens")
        return x.to(self.runner.stage.dtype)

    def _sample(self, seqs, params: list[SamplingParams], lengths: list[int], logits: torch.Tensor  # noqa: ANN001
                ) -> torch.Tensor:
        for s in seqs:
            hist = self.history.setdefault(s.slot, [])
            if s.start == 0:
                hist.clear()
            hist.extend(s.token_ids)
        return sample(logits, params, [s.seed for s in seqs], [s.start + n for s, n in zip(seqs, lengths, strict=True)],
                      [self.history[s.slot] for s in seqs] if _needs_history(params) else None)

    def Probe(self, request, context):  # noqa: ANN001, ANN201, N802 - gRPC API
        return node_pb2.ProbeResponse(received_bytes=len(request.payload))

    def Share(self, request, context):  # noqa: ANN001, ANN201, N802 - gRPC API
        if request.epoch.value != self.epoch:
            return node_pb2.ShareResponse(reason=f"the stage serves epoch {self.epoch}, not {request.epoch.value}")
        if not self.spec.shared_memory:
            return node_pb2.ShareResponse(reason="shared memory is off on this node (--no-shared-memory)")
        return self.rings.accept(request, hidden_size=self.runner.cfg.hidden_size)

    def _downstream(self):  # noqa: ANN202 - (StageStream, RingLink | None)
        with self.route_lock:
            if self.downstream is None:
                from node.stream import StageStream

                self.downstream = StageStream(self.next_address, secret=self.data_key, tls_dir=self.spec.tls_dir)
                if self.policy.mode.mode == "auto":
                    threading.Thread(target=self._measure_link, args=(self.next_address, self.data_key),
                                     name="link-probe", daemon=True).start()
                if self.spec.shared_memory:
                    self.link = self._offer_ring(self.downstream)
            return self.downstream, self.link

    def _offer_ring(self, stream) -> RingLink | None:  # noqa: ANN001 - node.stream.StageStream
        """Set up a ring to the next stage where it shares this machine (and GPU); None otherwise."""
        import random

        import grpc

        stage, name = self.runner.stage, f"stage {self.spec.start}-{self.spec.end - 1}"
        shape = (RING_SLOTS, min(self.spec.num_slots, MAX_RING_ROWS), self.runner.cfg.hidden_size)
        try:
            hidden = SharedRing.allocate(shape, stage.dtype, stage.device)
        except (OSError, RuntimeError) as e:
            log_line("executor", f"{name}: no shared memory for a ring to {stream.address}: {e}")
            return None
        tokens, ring_id = None, random.getrandbits(63)
        try:
            answer = stream.share(node_pb2.ShareRequest(
                epoch=common_pb2.PlacementEpoch(value=self.epoch), ring_id=ring_id, host_id=host_id(),
                device_id=device_id(stage.device), hidden=hidden.export()))
            if answer.accepted and answer.HasField("tokens"):
                tokens = SharedRing.open(answer.tokens, stage.device)
        except (grpc.RpcError, WireError, OSError, RuntimeError) as e:
            answer = node_pb2.ShareResponse(reason=str(e))
        if not answer.accepted:
            hidden.close()
            log_line("executor", f"{name} -> {stream.address}: hidden states as bytes ({answer.reason})")
            return None
        log_line("executor", f"{name} -> {stream.address}: steps of up to {shape[1]} tokens through shared memory"
                             f"{' (tokens back the same way)' if tokens is not None else ''}")
        mps_pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"  # noqa: S108 - MPS's default
        if stage.device.type == "cuda" and not os.path.exists(os.path.join(mps_pipe, "control")):
            log_line("executor", f"{name}: two processes share {stage.device}; the GPU switches between their "
                                 "contexts twice a step unless MPS runs (nvidia-cuda-mps-control -d; README, GPU)")
        return RingLink(ring_id, hidden, tokens, finisher=self.finisher)

    def _measure_link(self, address: str, data_key: str) -> None:
        """Measure the link to ``address`` (and once, the codec's cost) for the auto policy; messages go
        uncompressed until it is done. Runs beside the steps, so its probes share the link with them."""
        name = f"stage {self.spec.start}-{self.spec.end - 1}"
        try:
            link = measure_link(address, secret=data_key, tls_dir=self.spec.tls_dir)
            if self._cost is None:
                stage = self.runner.stage
                self._cost = measure_cost(self.policy.codec, self.runner.cfg.hidden_size, stage.dtype, stage.device)
        except Exception as e:  # noqa: BLE001 - the link stays uncompressed; the steps report real failures
            log_line("executor", f"{name}: cannot measure the link to {address}, sending exact: {e}")
            return
        with self.route_lock:
            if address != self.next_address:
                return  # re-placed meanwhile; the new route measures its own link
            self.policy.measured(link, self._cost)
        log_line("executor", f"{name} -> {address}: {self.policy.describe()}")


def _needs_history(params: list[SamplingParams]) -> bool:
    """Whether sampling these rows needs each slot's earlier tokens on the host (repetition penalty)."""
    return any(p.repetition_penalty != 1.0 for p in params)


def _pass_tokens(downstream: futures.Future, sampled: futures.Future) -> None:
    """A relayed step's result, as {slot: token} for the rows sent ahead of it (or its failure)."""
    try:
        result = downstream.result()
    except Exception as e:  # noqa: BLE001 - the rows that follow fail with it
        sampled.set_exception(e)
        return
    if result.error:
        sampled.set_exception(RuntimeError(result.error))
    else:
        sampled.set_result({t.slot: t.token_id for t in result.tokens})


def pack_hidden(down: node_pb2.StepMessage, out: torch.Tensor, codec: Codec | None, *, key: object
                ) -> tuple[str, int, int]:
    """Put the hidden states ``out`` [tokens, hidden] in ``down``, encoded with ``codec`` (None: exact).
    Returns what the link's traffic counters take: (codec name, raw bytes, wire bytes)."""
    raw = out.numel() * out.element_size()
    if codec is None:
        down.hidden.CopyFrom(tensor_to_proto(out))
        return "exact", raw, len(down.hidden.data)
    down.encoded_hidden.CopyFrom(encoded_to_proto(codec.encode(out, key=key)))
    return codec.spec, raw, sum(len(part.data) for part in down.encoded_hidden.parts.values())


# ------------------------------------------------------------------------------------ process main
def executor_main(spec: ExecutorSpec, events, control=None, *, watch_parent: bool = True) -> None:  # noqa: ANN001
    """Entry point of an executor process; reports ("ready", rank, info) or ("error", rank, text).

    ``control`` (the leader's end of a pipe from the daemon) carries the daemon's requests (see
    _control_loop)."""
    if watch_parent:
        _exit_with_parent()
    dump_stacks_on_signal()
    try:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        tp = _join_group(spec)
        started = time.perf_counter()
        runner = StageRunner(spec, tp)
        info = {"weight_bytes": runner.weight_bytes, "kv_cache_bytes": runner.cache.spec.nbytes,
                "load_seconds": time.perf_counter() - started}
        broadcast = None
        if tp.size > 1:
            comm = torch.device(spec.device) if spec.backend == "nccl" else torch.device("cpu")
            broadcast = StepBroadcast(tp, comm, runner.cfg.hidden_size, runner.stage.dtype, spec.num_slots)
        if spec.rank != 0:
            events.put(("ready", spec.rank, info))
            _peer_loop(runner, broadcast)
            return
        servicer = StageServicer(runner, broadcast, spec)
        _server, address = _serve(servicer, spec.listen_host)
        if control is not None:
            threading.Thread(target=_control_loop, args=(control, servicer), name="control", daemon=True).start()
        events.put(("ready", spec.rank, {**info, "address": address}))
        servicer.compute_forever()
    except BaseException:  # noqa: BLE001 - reported to the daemon, which answers LoadStage with it
        events.put(("error", spec.rank, traceback.format_exc()))
        raise


def standby_main(events, control) -> None:  # noqa: ANN001 - multiprocessing objects
    """A process started ahead of need, with torch imported: it waits for ("start", spec) on ``control``
    and then becomes that spec's executor (the same pipe then carries its control messages)."""
    _exit_with_parent()
    try:
        op, spec = control.recv()
    except EOFError:
        return
    if op == "start":
        executor_main(spec, events, control, watch_parent=False)


def _control_loop(conn, servicer: StageServicer) -> None:  # noqa: ANN001 - a multiprocessing Connection
    """Answers each of the daemon's requests, in order (the protocol: node/control.py)."""
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the daemon is gone; _exit_with_parent ends the process
            return
        op = request[0]
        if op == "configure":
            _, epoch, next_address, data_key = request
            servicer.configure(epoch, next_address, data_key)
            conn.send(("configured", epoch))
        elif op == "stats":
            conn.send(("stats", servicer.traffic.snapshot()))
        else:  # answered all the same: the daemon pairs answers with requests by their order
            conn.send(("unknown", op))


def _exit_with_parent() -> None:
    """An executor must not outlive its node daemon (killed, crashed): it would hold memory and ports."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _join_group(spec: ExecutorSpec) -> TPGroup:
    if spec.world == 1:
        return TPGroup.single()
    # The store is the leading node daemon's (node/daemon.py); the ranks may run on several nodes.
    store = dist.TCPStore(spec.store_host, spec.store_port, spec.world, is_master=False,
                          timeout=timedelta(seconds=GROUP_FORM_TIMEOUT_S))
    dist.init_process_group(spec.backend, store=dist.PrefixStore(spec.store_prefix, store), rank=spec.rank,
                            world_size=spec.world, timeout=timedelta(seconds=600))
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(spec.device))
    reducer = None
    if spec.tp_codec and spec.tp_codec != "exact":
        from engine.collectives import DEFAULT_MIN_ELEMENTS, make_reducer

        reducer = make_reducer(spec.tp_codec, min_elements=spec.tp_codec_min_elements or DEFAULT_MIN_ELEMENTS)
    return TPGroup.from_group(reducer=reducer)


def _peer_loop(runner: StageRunner, broadcast: StepBroadcast) -> None:
    while True:
        op, slots, starts, lengths, x = broadcast.receive()
        if op == OP_STOP:
            return
        runner.run(slots, starts, lengths, x)


def _serve(servicer: StageServicer, host: str):  # noqa: ANN202
    import grpc

    from node.security import Guard, add_port, require
    from node.stream import SERVER_OPTIONS

    key = require("this placement epoch's data key", lambda: (servicer.data_key,), stale=lambda: servicer.old_keys)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=SERVER_OPTIONS,
                         interceptors=[Guard({"tensorfleet.v1.Stage": key})])
    node_pb2_grpc.add_StageServicer_to_server(servicer, server)
    port = add_port(server, f"{host}:0", servicer.spec.tls_dir, require_client_cert=True)
    server.start()
    return server, f"{host}:{port}"

