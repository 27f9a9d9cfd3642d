"""The placement planner: which devices run which layers, as a pure function of measured capacities.

``plan_placement`` splits the decoder layers into contiguous pipeline stages, each run by a "unit": one
device, or a tensor-parallel group of same-kind devices of one node. It minimizes the estimated time of
one decode step subject to memory (weights plus KV reserve on every device of a unit).

Cost model (all estimates, per decode token at small batch):
- A unit of t devices moves ``t * min(bandwidth) * TP_EFFICIENCY_PER_DOUBLING ** log2(t)`` bytes/s and
  computes at the same discount of ``t * min(flops)``: each doubling of a group loses ~10% to all-reduces.
- A stage takes ``max(weight bytes / bandwidth, flops / flop rate)`` over its layers, plus the LM head on
  the last stage (its FLOPs are taken proportional to its bytes). The embedding is a row lookup and costs
  no time; KV reads depend on context length and are left out.
- The step time is the slowest stage's time plus ``HOP_PENALTY_S`` per hop between stages: with several
  micro-batches in flight the slowest stage sets the pace, and each hop adds latency, so at equal speed
  fewer stages win, and a small model stays on one device rather than paying a hop for a tiny gain.

Search: for a bound T on stage time every unit can take a known number of layers in each role (first
stage: also the embedding; last: also the head), so choosing disjoint units whose capacities cover all
layers is a small dynamic program over devices (TP groups are windows of a node's devices sorted by
speed; with ``span_nodes``, windows of all the cluster's devices of a kind, ordered by node, so that
a group may take the devices of several nodes). A binary search over the candidate times finds the least
T for each stage count.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import TensorfleetError

GIB = 1024**3
HOP_PENALTY_S = 0.5e-3  # a gRPC hop between machines on a LAN: a few hundred microseconds plus framing
TP_EFFICIENCY_PER_DOUBLING = 0.9
PREFER_TOLERANCE = 0.05  # with ``prefer``, plans up to 5% slower than the best may be chosen to move less
DEVICE_KINDS = ("cuda", "cpu")
# Stage roles: (holds the embedding, holds the final norm + LM head).
_ROLES = ((False, False), (True, False), (False, True), (True, True))
_PLAIN, _FIRST, _LAST, _ONLY = range(4)


class PlacementError(TensorfleetError):
    """The cluster cannot run the model; the message says how much memory is missing."""


@dataclass(frozen=True, kw_only=True)
class DeviceCapacity:
    node_id: str
    device_index: int
    kind: str  # "cuda" | "cpu"
    free_memory_bytes: int  # usable for weights + KV cache
    matmul_flops: float  # measured, FLOP/s
    memory_bandwidth: float  # measured, bytes/s

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must not be empty")
        if self.device_index < 0:
            raise ValueError(f"device_index={self.device_index} of node {self.node_id!r} must be >= 0")
        if self.kind not in DEVICE_KINDS:
            raise ValueError(f"kind={self.kind!r} of {self.key} must be one of {DEVICE_KINDS}")
        if self.free_memory_bytes < 0:
            raise ValueError(f"free_memory_bytes={self.free_memory_bytes} of {self.key} must be >= 0")
        for name in ("matmul_flops", "memory_bandwidth"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value} of {self.key} must be positive and finite")

    @property
    def key(self) -> tuple[str, int]:
        return (self.node_id, self.device_index)


@dataclass(frozen=True, kw_only=True)
class ModelProfile:
    num_layers: int
    layer_bytes: int  # weights of one decoder layer (at the serving dtype)
    embedding_bytes: int  # held by the first stage
    head_bytes: int  # final norm + LM head, held by the last stage
    kv_bytes_per_token_layer: int  # K+V bytes per token per layer (all kv heads, before the TP split)
    flops_per_token_layer: float  # ~2 * params of a layer
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    kv_reserve_tokens: int  # tokens of KV cache each stage must be able to hold
    tied_bytes: int = 0  # bytes the head shares with the embedding: a stage holding both holds them once

    def __post_init__(self) -> None:
        for name in ("num_layers", "layer_bytes", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("embedding_bytes", "head_bytes", "kv_bytes_per_token_layer", "kv_reserve_tokens",
                     "tied_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not (self.flops_per_token_layer > 0 and math.isfinite(self.flops_per_token_layer)):
            raise ValueError(f"flops_per_token_layer={self.flops_per_token_layer} must be positive")
        if self.tied_bytes > min(self.embedding_bytes, self.head_bytes):
            raise ValueError(f"tied_bytes={self.tied_bytes} exceeds embedding_bytes={self.embedding_bytes} "
                             f"or head_bytes={self.head_bytes}")

    def valid_tp(self, tp: int) -> bool:
        """Whether one stage can be split ``tp`` ways (heads, MLP, and kv heads split or replicated)."""
        kv = self.num_kv_heads
        return (tp >= 1 and self.num_heads % tp == 0 and self.intermediate_size % tp == 0
                and (kv % tp == 0 or tp % kv == 0))

    def stage_weight_bytes(self, num_layers: int, *, first: bool, last: bool) -> int:
        shared = self.tied_bytes if (first and last) else 0
        return (num_layers * self.layer_bytes + first * self.embedding_bytes + last * self.head_bytes
                - shared)

    def stage_kv_bytes(self, num_layers: int) -> int:
        return num_layers * self.kv_bytes_per_token_layer * self.kv_reserve_tokens

    def device_bytes(self, num_layers: int, *, tp: int, first: bool, last: bool) -> int:
        """Bytes each of a stage's ``tp`` devices holds; kv heads are replicated beyond num_kv_heads ranks."""
        weights = -(-self.stage_weight_bytes(num_layers, first=first, last=last) // tp)
        return weights + -(-self.stage_kv_bytes(num_layers) // min(tp, self.num_kv_heads))


@dataclass(frozen=True)
class StagePlan:
    start: int
    end: int  # exclusive
    members: tuple[tuple[str, int], ...]  # (node_id, device_index) ordered by tp rank
    est_time_s: float = 0.0  # per decode token
    weight_bytes: int = 0  # the whole stage's weights (all ranks together)
    kv_bytes: int = 0  # the whole stage's KV reserve
    device_bytes: int = 0  # what each member device holds

    @property
    def tp_size(self) -> int:
        return len(self.members)

    @property
    def num_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]
    est_step_time_s: float  # slowest stage + HOP_PENALTY_S per hop

    def owner(self, layer: int) -> tuple[tuple[str, int], ...]:
        """The members of the stage that runs ``layer``."""
        for stage in self.stages:
            if stage.start <= layer < stage.end:
                return stage.members
        raise ValueError(f"layer {layer} is not in the plan (layers 0..{self.stages[-1].end - 1})")

    def describe(self) -> str:
        """A table for logs: one row per stage, then the estimated step time."""
        rows = [("stage", "layers", "tp", "devices", "weights", "kv", "per device", "time")]
        for i, s in enumerate(self.stages):
            rows.append((str(i), f"{s.start}-{s.end - 1} ({s.num_layers})", str(s.tp_size),
                         ",".join(f"{n}:{d}" for n, d in s.members), _gib(s.weight_bytes), _gib(s.kv_bytes),
                         _gib(s.device_bytes), f"{s.est_time_s * 1e3:.3f} ms"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        hops = len(self.stages) - 1
        slowest = max(s.est_time_s for s in self.stages)
        lines.append(f"est step time {self.est_step_time_s * 1e3:.3f} ms: slowest stage {slowest * 1e3:.3f} ms"
                     f" + {hops} hop(s) x {HOP_PENALTY_S * 1e3:.2f} ms")
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


class _Unit:
    """One device or a TP group: its speed, and per role its stage times and memory-bound layer count."""

    def __init__(self, devices: Sequence[DeviceCapacity], model: ModelProfile) -> None:
        self.keys = tuple(d.key for d in devices)
        self.tp = len(devices)
        discount = TP_EFFICIENCY_PER_DOUBLING ** math.log2(self.tp)
        self.bandwidth = self.tp * min(d.memory_bandwidth for d in devices) * discount
        self.flops = self.tp * min(d.matmul_flops for d in devices) * discount
        self.free = min(d.free_memory_bytes for d in devices)
        head_flops = model.flops_per_token_layer * model.head_bytes / model.layer_bytes
        # times[last][n]: seconds per token for n layers (nondecreasing in n, so bisect finds capacities)
        self.times = tuple(
            [max((n * model.layer_bytes + last * model.head_bytes) / self.bandwidth,
                 (n * model.flops_per_token_layer + last * head_flops) / self.flops)
             for n in range(model.num_layers + 1)]
            for last in (0, 1))
        # mem_cap[role]: most layers that fit in memory in that role (0: none, or not even the embedding)
        self.mem_cap = tuple(
            _lowest(lambda n, f=f, la=la: model.device_bytes(n + 1, tp=self.tp, first=f, last=la) > self.free,
                    0, model.num_layers)
            for f, la in _ROLES)

    def cap(self, role: int, bound_s: float) -> int:
        """Most layers this unit takes in ``role`` within ``bound_s`` seconds per token and its memory."""
        by_time = bisect.bisect_right(self.times[_ROLES[role][1]], bound_s) - 1
        return min(self.mem_cap[role], by_time)


def _validate(devices: Sequence[DeviceCapacity], max_tp: int | None) -> None:
    if max_tp is not None and max_tp < 1:
        raise ValueError(f"max_tp={max_tp} must be >= 1")
    seen: set[tuple[str, int]] = set()
    for d in devices:
        if d.key in seen:
            raise ValueError(f"device (node_id={d.node_id!r}, device_index={d.device_index}) is listed twice")
        seen.add(d.key)
    if not devices:
        raise PlacementError("the cluster cannot hold the model: it has no devices")


def _group_key(d: DeviceCapacity, span_nodes: bool) -> tuple[str, ...]:
    """Devices of one key may form a TP group: one node's devices of a kind, or a kind's (``span_nodes``)."""
    return (d.kind,) if span_nodes else (d.node_id, d.kind)


def _candidate_units(devices: Sequence[DeviceCapacity], model: ModelProfile, max_tp: int | None,
                     span_nodes: bool = False) -> tuple[list[_Unit], list[list[int]]]:
    """All units, and for each device position the indices of the units that start there.

    Devices line up by group (_group_key), fastest first within a node, so a TP unit is a window of
    similar devices; windows never cross a group.
    """
    groups: dict[tuple[str, ...], list[DeviceCapacity]] = {}
    for d in devices:
        groups.setdefault(_group_key(d, span_nodes), []).append(d)
    units: list[_Unit] = []
    starts: list[list[int]] = []
    for group_key in sorted(groups):
        group = sorted(groups[group_key], key=lambda d: (d.node_id if span_nodes else "", -d.memory_bandwidth,
                                                         -d.matmul_flops, -d.free_memory_bytes, d.device_index))
        for i in range(len(group)):
            here = []
            for t in range(1, len(group) - i + 1):
                if t == 1 or (model.valid_tp(t) and (max_tp is None or t <= max_tp)):
                    units.append(_Unit(sorted(group[i:i + t], key=lambda d: (d.node_id, d.device_index)), model))
                    here.append(len(units) - 1)
            starts.append(here)
    return units, starts


def _pack(units: list[_Unit], starts: list[list[int]], bound_s: float, kmax: int) -> dict[int, list]:
    """For each stage count k, disjoint units (with roles) whose capacities within ``bound_s`` cover the
    most layers: {k: (total capacity, [(unit, role), ...])}.

    DP over device positions; the state is (units taken, first role taken, last role taken). A unit
    starting at a position covers its window, so no device is used twice.
    """
    caps = [[u.cap(role, bound_s) for role in (_PLAIN, _FIRST, _LAST)] for u in units]
    tables: list[dict[tuple[int, int, int], tuple[int, Any]]] = [{} for _ in range(len(starts) + 1)]
    tables[0][(0, 0, 0)] = (0, None)

    def relax(table: dict, state: tuple[int, int, int], value: int, back: Any) -> None:
        if state not in table or value > table[state][0]:
            table[state] = (value, back)

    for p, here in enumerate(starts):
        for state, (value, _) in tables[p].items():
            relax(tables[p + 1], state, value, (p, state, None))
            j, f, last = state
            if j == kmax:
                continue
            for ui in here:
                for role, (rf, rl) in ((_PLAIN, (0, 0)), (_FIRST, (1, 0)), (_LAST, (0, 1))):
                    c = caps[ui][role]
                    if c >= 1 and not (rf and f) and not (rl and last):
                        relax(tables[p + units[ui].tp], (j + 1, f | rf, last | rl), value + c, (p, state, (ui, role)))
    out = {}
    for (j, f, last), (value, _) in tables[-1].items():
        if f and last:
            chosen, pos, state = [], len(starts), (j, f, last)
            while pos:
                pos, state, pick = tables[pos][state][1]
                if pick is not None:
                    chosen.append(pick)
            out[j] = (value, chosen[::-1])
    return out


def _lowest(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    """Least i in [lo, hi] with pred(i), for pred monotone and true at hi."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


class _Search:
    """The least stage-time bound for each stage count, found by binary search over candidate times."""

    def __init__(self, units: list[_Unit], starts: list[list[int]], model: ModelProfile) -> None:
        self.units, self.starts, self.num_layers = units, starts, model.num_layers
        self.kmax = min(len(starts), model.num_layers)
        self.bounds = sorted({t for u in units for times in u.times for t in times[1:]})
        self._memo: dict[int, dict[int, list]] = {}

    def feasible(self, i: int) -> dict[int, list]:
        """{stage count: [(unit, role), ...]} for the counts that fit within bounds[i]."""
        if i not in self._memo:
            bound, L = self.bounds[i], self.num_layers
            out = {}
            single = [ui for ui, u in enumerate(self.units) if u.cap(_ONLY, bound) >= L]
            if single:
                out[1] = [(single[0], _ONLY)]
            for k, (value, chosen) in _pack(self.units, self.starts, bound, self.kmax).items():
                if value >= L:
                    out[k] = chosen
            self._memo[i] = out
        return self._memo[i]

    def run(self, slack: float) -> list[tuple[float, int, int]]:
        """(cost, stages, bound index) per stage count worth trying, cost within ``slack`` of the best."""
        top = len(self.bounds) - 1
        if not self.feasible(top):
            return []
        floor = _lowest(lambda i: bool(self.feasible(i)), 0, top)
        found: list[tuple[float, int, int]] = []
        best, hi = math.inf, top
        for k in range(min(self.feasible(top)), self.kmax + 1):
            # A bound below the previous one needs exactly k stages: stop once those cannot pay off.
            if self.bounds[floor] + HOP_PENALTY_S * (k - 1) > best * (1 + slack) or (found and hi == floor):
                break
            i = _lowest(lambda i, k=k: any(j <= k for j in self.feasible(i)), floor, hi)
            j = min(self.feasible(i))
            cost = self.bounds[i] + HOP_PENALTY_S * (j - 1)
            if (cost, j, i) not in found:
                found.append((cost, j, i))
            best, hi = min(best, cost), i
        return sorted(found)


def _stage_plans(model: ModelProfile, seq: Sequence[_Unit], counts: Sequence[int]) -> Plan:
    stages, start, k = [], 0, len(seq)
    for i, (unit, n) in enumerate(zip(seq, counts, strict=True)):
        first, last = i == 0, i == k - 1
        stages.append(StagePlan(
            start, start + n, unit.keys, est_time_s=unit.times[last][n],
            weight_bytes=model.stage_weight_bytes(n, first=first, last=last), kv_bytes=model.stage_kv_bytes(n),
            device_bytes=model.device_bytes(n, tp=unit.tp, first=first, last=last)))
        start += n
    slowest = max(s.est_time_s for s in stages)
    return Plan(tuple(stages), slowest + HOP_PENALTY_S * (k - 1))


def _roles(k: int) -> list[int]:
    return [_ONLY] if k == 1 else [_FIRST] + [_PLAIN] * (k - 2) + [_LAST]


def _balanced(model: ModelProfile, units: list[_Unit], chosen: list, bound_s: float) -> Plan:
    """Order the chosen units (first, the rest by device, last) and split the layers: every stage starts
    at its capacity, then the slowest gives up layers until exactly all layers are placed."""
    by_role: dict[int, list[_Unit]] = {}
    for ui, role in chosen:
        by_role.setdefault(role, []).append(units[ui])
    seq = by_role.get(_ONLY) or [*by_role[_FIRST], *sorted(by_role.get(_PLAIN, []), key=lambda u: u.keys),
                                 *by_role[_LAST]]
    roles = _roles(len(seq))
    counts = [u.cap(r, bound_s) for u, r in zip(seq, roles, strict=True)]
    heap = [(-u.times[r >= _LAST][n], i) for i, (u, r, n) in enumerate(zip(seq, roles, counts, strict=True)) if n > 1]
    heapq.heapify(heap)
    for _ in range(sum(counts) - model.num_layers):
        _, i = heapq.heappop(heap)
        counts[i] -= 1
        if counts[i] > 1:
            heapq.heappush(heap, (-seq[i].times[roles[i] >= _LAST][counts[i]], i))
    return _stage_plans(model, seq, counts)


def _owners(plan: Plan, num_layers: int) -> list[frozenset | None]:
    owners: list[frozenset | None] = [None] * num_layers
    for s in plan.stages:
        for layer in range(max(0, s.start), min(num_layers, s.end)):
            owners[layer] = frozenset(s.members)
    return owners


def _moves(plan: Plan, owners: list[frozenset | None]) -> int:
    return sum(owners[layer] != frozenset(s.members) for s in plan.stages for layer in range(s.start, s.end))


def layers_moved(before: Plan | None, after: Plan, num_layers: int) -> int:
    """Layers that ``after`` puts on a different device group than ``before`` (all of them without one)."""
    if before is None:
        return sum(s.num_layers for s in after.stages)
    return _moves(after, _owners(before, num_layers))


def _least_moves(model: ModelProfile, seq: Sequence[_Unit], max_cost: float,
                 owners: list[frozenset | None]) -> Plan | None:
    """Split the layers over ``seq`` (in order) moving the fewest layers, each stage within the time bound
    that keeps the step under ``max_cost``; ties go to the faster split. None when no split fits."""
    k, L = len(seq), model.num_layers
    bound = max_cost - HOP_PENALTY_S * (k - 1)
    roles = _roles(k)
    caps = [u.cap(r, bound) for u, r in zip(seq, roles, strict=True)]
    if k > L or min(caps) < 1 or sum(caps) < L:
        return None
    best: list[tuple[int, float] | None] = [(0, 0.0)] + [None] * L  # best[b]: layers [0, b) placed
    picks = []
    for i, unit in enumerate(seq):
        mine = frozenset(unit.keys)
        moved = [0]
        for layer in range(L):
            moved.append(moved[-1] + (owners[layer] != mine))
        times = unit.times[roles[i] >= _LAST]
        nxt: list[tuple[int, float] | None] = [None] * (L + 1)
        pick = [0] * (L + 1)
        for b in range(i + 1, L - (k - 1 - i) + 1):
            for n in range(1, min(caps[i], b - i) + 1):
                prev = best[b - n]
                if prev is not None:
                    cand = (prev[0] + moved[b] - moved[b - n], max(prev[1], times[n]))
                    if nxt[b] is None or cand < nxt[b]:
                        nxt[b], pick[b] = cand, n
        best = nxt
        picks.append(pick)
    if best[L] is None:
        return None
    counts, b = [], L
    for pick in reversed(picks):
        counts.append(pick[b])
        b -= pick[b]
    return _stage_plans(model, seq, counts[::-1])


def _repairs(prefer: Plan, devices: Sequence[DeviceCapacity], units: list[_Unit], model: ModelProfile,
             max_tp: int | None, span_nodes: bool) -> list[list[_Unit]]:
    """The previous plan's surviving units in their order, alone and with one free unit put in where
    lost stages were."""
    by_key = {d.key: d for d in devices}
    survivors: list[_Unit] = []
    gaps: list[int] = []
    for s in prefer.stages:
        devs = [by_key.get(m) for m in s.members]
        ok = (all(devs) and len(set(s.members)) == len(devs) and len({_group_key(d, span_nodes) for d in devs}) == 1
              and (len(devs) == 1 or (model.valid_tp(len(devs)) and (max_tp is None or len(devs) <= max_tp))))
        if ok:
            survivors.append(_Unit(devs, model))
        elif not gaps or gaps[-1] != len(survivors):
            gaps.append(len(survivors))
    if not survivors:
        return []
    used = {key for u in survivors for key in u.keys}
    if len(used) < sum(u.tp for u in survivors):
        return []  # the previous plan used a device twice: nothing worth keeping
    free = [u for u in units if not used.intersection(u.keys)]
    return [survivors] + [survivors[:g] + [u] + survivors[g:] for g in gaps for u in free]


def _infeasible(devices: Sequence[DeviceCapacity], model: ModelProfile, search: _Search) -> PlacementError:
    L = model.num_layers
    weights = model.stage_weight_bytes(L, first=True, last=True) + (model.tied_bytes if len(devices) > 1 else 0)
    kv = model.stage_kv_bytes(L)
    usable = sum(d.free_memory_bytes for d in devices)
    totals = f"weights {_gib(weights)} + KV reserve {_gib(kv)}, usable {_gib(usable)} on {len(devices)} devices"
    if weights + kv > usable:
        return PlacementError(f"the cluster cannot hold the model: it needs {_gib(weights + kv - usable)} more "
                              f"({totals})")
    packed = _pack(search.units, search.starts, math.inf, search.kmax)
    most = max([value for value, _ in packed.values()] + [u.cap(_ONLY, math.inf) for u in search.units])
    per_layer = model.device_bytes(1, tp=1, first=False, last=False)
    biggest = max(d.free_memory_bytes for d in devices)
    return PlacementError(
        f"the cluster cannot hold the model: its memory suffices in total ({totals}) but layers are placed "
        f"whole and at most {most} of {L} fit (the first stage also holds the embedding, "
        f"{_gib(model.embedding_bytes)}, the last the head, {_gib(model.head_bytes)}); one layer with its KV "
        f"reserve needs {_gib(per_layer)} on one device, the largest device has {_gib(biggest)} free")


def _exactly(model: ModelProfile, units: list[_Unit], search: _Search, k: int) -> Plan:
    """The fastest plan with exactly ``k`` stages (an operator's choice, e.g. for benchmarks)."""
    top = len(search.bounds) - 1
    if k > model.num_layers or k not in search.feasible(top):
        raise PlacementError(f"the cluster cannot be split into exactly {k} stages: not enough devices or "
                             f"memory ({len(units)} candidate device groups, {model.num_layers} layers)")
    i = _lowest(lambda i: k in search.feasible(i), 0, top)
    return _balanced(model, units, search.feasible(i)[k], search.bounds[i])


def plan_placement(devices: Sequence[DeviceCapacity], model: ModelProfile, *, max_tp: int | None = None,
                   prefer: Plan | None = None, num_stages: int | None = None, span_nodes: bool = False) -> Plan:
    """The fastest placement of ``model`` on ``devices`` that fits in memory (see the module docstring).

    With ``prefer`` (the previous plan, e.g. after a failure), among plans within PREFER_TOLERANCE of the
    best step time the one that moves the fewest layers (to a different device set) wins.
    ``num_stages`` forces exactly that many stages (``prefer`` then picks among plans of that many).
    ``span_nodes`` lets a tensor-parallel group take devices (of one kind) of several nodes; the cost model
    does not price the network between them, so it is for nodes that share a host or a fast fabric.
    Raises PlacementError when nothing fits, ValueError on invalid input.
    """
    _validate(devices, max_tp)
    if num_stages is not None and num_stages < 1:
        raise ValueError(f"num_stages={num_stages} must be >= 1")
    units, starts = _candidate_units(devices, model, max_tp, span_nodes)
    search = _Search(units, starts, model)
    if num_stages is not None:
        best = _exactly(model, units, search, num_stages)
        if prefer is None:
            return best
        owners = _owners(prefer, model.num_layers)
        orders = [seq for seq in _repairs(prefer, devices, units, model, max_tp, span_nodes) if len(seq) == num_stages]
        max_cost = best.est_step_time_s * (1 + PREFER_TOLERANCE)
        options = [best] + [p for seq in orders if (p := _least_moves(model, seq, max_cost, owners)) is not None]
        return min(options, key=lambda p: (_moves(p, owners), p.est_step_time_s))
    found = search.run(PREFER_TOLERANCE if prefer is not None else 0.0)
    if not found:
        raise _infeasible(devices, model, search)
    plans = [_balanced(model, units, search.feasible(i)[j], search.bounds[i]) for _, j, i in found]
    best = min(plans, key=lambda p: (p.est_step_time_s, len(p.stages)))
    if prefer is None:
        return best
    owners = _owners(prefer, model.num_layers)
    by_keys = {u.keys: u for u in units}
    orders = [[by_keys[s.members] for s in p.stages] for p in plans]
    orders += _repairs(prefer, devices, units, model, max_tp, span_nodes)
    max_cost = best.est_step_time_s * (1 + PREFER_TOLERANCE)
    options = [best] + [p for seq in orders if (p := _least_moves(model, seq, max_cost, owners)) is not None]
    return min(options, key=lambda p: (_moves(p, owners), p.est_step_time_s, len(p.stages)))


def profile_from_config(hf_config: dict[str, Any], *, dtype_bytes: int, kv_reserve_tokens: int) -> ModelProfile:
    """Byte and FLOP counts of a Hugging Face config (Llama family: llama, mistral, qwen2; and OPT)."""
    if dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes={dtype_bytes} must be positive")
    is_opt = hf_config.get("model_type") == "opt" or "ffn_dim" in hf_config
    params = _opt_params(hf_config) if is_opt else _llama_params(hf_config)
    return ModelProfile(
        num_layers=int(hf_config["num_hidden_layers"]),
        layer_bytes=params["layer"] * dtype_bytes,
        embedding_bytes=params["embedding"] * dtype_bytes,
        head_bytes=params["head"] * dtype_bytes,
        tied_bytes=params["tied"] * dtype_bytes,
        kv_bytes_per_token_layer=2 * params["kv_dim"] * dtype_bytes,
        flops_per_token_layer=2.0 * params["layer"],
        num_heads=params["heads"],
        num_kv_heads=params["kv_heads"],
        intermediate_size=params["intermediate"],
        kv_reserve_tokens=kv_reserve_tokens,
    )


def _llama_params(hf: dict[str, Any]) -> dict[str, int]:
    h, inter, vocab = int(hf["hidden_size"]), int(hf["intermediate_size"]), int(hf["vocab_size"])
    heads = int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or heads)
    hd = int(hf.get("head_dim") or h // heads)
    q, kvd = heads * hd, kv * hd
    attn = h * q + 2 * h * kvd + q * h
    if hf.get("model_type") == "qwen2":  # q/k/v biases, no o bias
        attn += q + 2 * kvd
    elif hf.get("attention_bias", False):
        attn += q + 2 * kvd + h
    mlp = 3 * h * inter + (2 * inter + h if hf.get("mlp_bias", False) else 0)
    tied = bool(hf.get("tie_word_embeddings", False))
    return {"layer": attn + mlp + 2 * h, "embedding": vocab * h, "head": h + vocab * h,
            "tied": vocab * h if tied else 0, "kv_dim": kvd, "heads": heads, "kv_heads": kv,
            "intermediate": inter}


def _opt_params(hf: dict[str, Any]) -> dict[str, int]:
    h, ffn, vocab = int(hf["hidden_size"]), int(hf["ffn_dim"]), int(hf["vocab_size"])
    proj = int(hf.get("word_embed_proj_dim") or h)
    projection = h * proj if proj != h else 0  # project_in / project_out, no bias
    positions = (int(hf["max_position_embeddings"]) + 2) * h  # OPT's learned positions start at index 2
    final_norm = 2 * h if hf.get("do_layer_norm_before", True) else 0
    heads = int(hf["num_attention_heads"])
    layer = 4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * (2 * h)
    tied = bool(hf.get("tie_word_embeddings", True))
    return {"layer": layer, "embedding": vocab * proj + positions + projection,
            "head": final_norm + projection + vocab * proj, "tied": vocab * proj if tied else 0,
            "kv_dim": h, "heads": heads, "kv_heads": heads, "intermediate": ffn}
