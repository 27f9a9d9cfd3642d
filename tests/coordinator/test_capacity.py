"""Batch capacity from memory: slots per stage worked out by hand for small tables of plans."""

from __future__ import annotations

import pytest

from coordinator.capacity import choose_slots, stage_capacities
from coordinator.placement import GIB, ModelProfile, PlacementError, Plan, StagePlan, plan_placement
from tests.coordinator.test_placement import big_model, dev

MIB = 1 << 20


def model(**over) -> ModelProfile:
    """4 layers of 1 GiB, no embedding/head, 1 MiB of K+V per token and layer, 8 kv heads."""
    args = dict(num_layers=4, layer_bytes=GIB, embedding_bytes=0, head_bytes=0, kv_bytes_per_token_layer=MIB,
                flops_per_token_layer=1e9, num_heads=8, num_kv_heads=8, intermediate_size=64, kv_reserve_tokens=1)
    return ModelProfile(**{**args, **over})


def two_stage_plan(mem_a: float, mem_b: float, *, tp_b: int = 1) -> tuple[Plan, list]:
    devices = [dev("a", mem_gib=mem_a)] + [dev("b", i, mem_gib=mem_b) for i in range(tp_b)]
    stages = (StagePlan(0, 2, (("a", 0),), weight_bytes=2 * GIB),
              StagePlan(2, 4, tuple(("b", i) for i in range(tp_b)), weight_bytes=2 * GIB))
    return Plan(stages=stages, est_step_time_s=1.0), devices


def test_slots_per_stage_from_free_memory_beside_the_weights() -> None:
    plan, devices = two_stage_plan(10.0, 6.0)
    # a slot of 256 tokens on 2 layers: 2 * 1 MiB * 256 = 512 MiB; stage 0 keeps 8 GiB, stage 1 4 GiB free
    caps = stage_capacities(plan, devices, model(), max_seq_len=256, kv_memory_fraction=0.5)
    assert [c.slot_bytes for c in caps] == [512 * MIB, 512 * MIB]
    assert [c.free_bytes for c in caps] == [8 * GIB, 4 * GIB]
    assert [c.slots_fit for c in caps] == [8, 4]
    assert choose_slots(caps, requested=None) == 4  # the tightest stage decides
    assert choose_slots(caps, requested=None, max_slots=3) == 3
    assert choose_slots(caps, requested=2) == 2


def test_tensor_parallel_stage_splits_weights_and_kv_heads() -> None:
    plan, devices = two_stage_plan(10.0, 6.0, tp_b=2)
    caps = stage_capacities(plan, devices, model(), max_seq_len=256, kv_memory_fraction=0.5)
    # stage 1 over 2 devices: 1 GiB of weights and 256 MiB of each slot per device: 5 GiB free -> 10 slots
    assert caps[1].slot_bytes == 256 * MIB and caps[1].free_bytes == 5 * GIB and caps[1].slots_fit == 10
    assert choose_slots(caps, requested=None) == 8


def test_too_many_slots_or_too_little_memory_is_a_clear_error() -> None:
    plan, devices = two_stage_plan(10.0, 6.0)
    caps = stage_capacities(plan, devices, model(), max_seq_len=256, kv_memory_fraction=0.5)
    with pytest.raises(PlacementError, match=r"5 slots need 2.50 GiB .* stage 1, which has 4.00 GiB free .*room "
                                             r"for 4\)"):
        choose_slots(caps, requested=5)
    plan, devices = two_stage_plan(10.0, 2.2)
    caps = stage_capacities(plan, devices, model(), max_seq_len=256, kv_memory_fraction=0.5)
    with pytest.raises(PlacementError, match="stage 1 has 0.20 GiB free .* less than one sequence slot"):
        choose_slots(caps, requested=None)
    with pytest.raises(ValueError, match="kv_memory_fraction=0"):
        stage_capacities(plan, devices, model(), max_seq_len=256, kv_memory_fraction=0)


def test_capacity_of_a_real_plan_never_exceeds_free_memory() -> None:
    devices = [dev("g0", mem_gib=24.0), dev("g1", mem_gib=16.0)]
    profile = big_model(kv_reserve_tokens=4096)
    plan = plan_placement(devices, profile)
    caps = stage_capacities(plan, devices, profile, max_seq_len=4096, kv_memory_fraction=0.9)
    slots = choose_slots(caps, requested=None, max_slots=1000)
    by_key = {d.key: d for d in devices}
    for stage, cap in zip(plan.stages, caps, strict=True):
        used = stage.weight_bytes + slots * cap.slot_bytes
        assert used <= min(by_key[m].free_memory_bytes for m in stage.members)
    assert slots >= 1
