"""Batch capacity from memory: how many sequences (KV cache slots of ``max_seq_len`` tokens) a placement
can hold at once.

Each stage's devices keep their weights; a fraction of the free memory left beside them holds the KV
cache. The cluster's batch limit is the smallest stage's, since every running sequence has a slot on
every stage. A pure function of the plan, so it is tested with tables like the planner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coordinator import defaults
from coordinator.placement import DeviceCapacity, ModelProfile, PlacementError, Plan


@dataclass(frozen=True)
class StageCapacity:
    slot_bytes: int  # KV bytes one sequence slot takes on each device of the stage
    free_bytes: int  # per device, after the weights (the tightest member)
    slots_fit: int  # what kv_memory_fraction of free_bytes holds


def stage_capacities(plan: Plan, devices: Sequence[DeviceCapacity], model: ModelProfile, *, max_seq_len: int,
                     kv_memory_fraction: float = defaults.KV_MEMORY_FRACTION) -> list[StageCapacity]:
    if not 0.0 < kv_memory_fraction <= 1.0:
        raise ValueError(f"kv_memory_fraction={kv_memory_fraction} must be in (0, 1]")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len} must be >= 1")
    by_key = {d.key: d for d in devices}
    out = []
    for stage in plan.stages:
        tp = stage.tp_size
        weights = -(-stage.weight_bytes // tp)
        slot_bytes = -(-stage.num_layers * model.kv_bytes_per_token_layer * max_seq_len // min(tp, model.num_kv_heads))
        free = min(by_key[m].free_memory_bytes for m in stage.members) - weights
        out.append(StageCapacity(slot_bytes=slot_bytes, free_bytes=max(0, free),
                                 slots_fit=max(0, int(free * kv_memory_fraction)) // slot_bytes))
    return out


def choose_slots(capacities: Sequence[StageCapacity], *, requested: int | None,
                 max_slots: int = defaults.MAX_SLOTS) -> int:
    """The cluster's slot count: ``requested`` if every stage has room for it, else as many as the
    tightest stage holds, at most ``max_slots``."""
    if not capacities:
        raise ValueError("a placement without stages")
    fit = min(c.slots_fit for c in capacities)
    tight = min(range(len(capacities)), key=lambda i: capacities[i].slots_fit)
    cap = capacities[tight]
    if requested is not None:
        if requested < 1:
            raise ValueError(f"slots={requested} must be >= 1")
        need = requested * cap.slot_bytes
        if requested > fit:
            raise PlacementError(f"{requested} slots need {need / 2**30:.2f} GiB of KV cache per device on stage "
                                 f"{tight}, which has {cap.free_bytes / 2**30:.2f} GiB free beside its weights "
                                 f"(room for {fit}); lower --slots or --max-seq-len")
        return requested
    if fit < 1:
        raise PlacementError(f"stage {tight} has {cap.free_bytes / 2**30:.2f} GiB free beside its weights, less "
                             f"than one sequence slot ({cap.slot_bytes / 2**30:.2f} GiB of KV cache); "
                             f"lower --max-seq-len")
    return min(fit, max_slots)
