"""The placement planner, with tables of clusters (see coordinator/placement.py for the cost model).

Numbers are in the planner's units: bytes, FLOP/s, bytes/s. A "big" model here is 32 layers of 0.4 GB
(a 7B model in fp16): one GPU at 1 TB/s needs 13.3 ms per token, far more than the 0.5 ms hop penalty,
so splitting pays; a "small" model (0.27 ms per token) stays on one device.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import time

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from coordinator.placement import (
    GIB,
    HOP_PENALTY_S,
    PREFER_TOLERANCE,
    DeviceCapacity,
    ModelProfile,
    PlacementError,
    Plan,
    StagePlan,
    layers_moved,
    plan_placement,
    profile_from_config,
)

GB = 10**9


def dev(node: str, index: int = 0, *, mem_gib: float = 24.0, bw: float = 1e12, flops: float = 1e14,
        kind: str = "cuda") -> DeviceCapacity:
    return DeviceCapacity(node_id=node, device_index=index, kind=kind, free_memory_bytes=int(mem_gib * GIB),
                          matmul_flops=flops, memory_bandwidth=bw)


def cpu(node: str) -> DeviceCapacity:
    return dev(node, mem_gib=64.0, bw=50e9, flops=1e12, kind="cpu")


def big_model(**over) -> ModelProfile:
    """7B-like: 32 x 0.4 GB layers, 0.5 GB embedding and head, 128 MiB of KV reserve per layer."""
    args = dict(num_layers=32, layer_bytes=int(0.4 * GB), embedding_bytes=int(0.5 * GB), head_bytes=int(0.5 * GB),
                kv_bytes_per_token_layer=131072, flops_per_token_layer=0.4e9, num_heads=32, num_kv_heads=8,
                intermediate_size=11008, kv_reserve_tokens=1024)
    return ModelProfile(**{**args, **over})


def small_model(**over) -> ModelProfile:
    """135M-like with tied embeddings: 30 layers of 7 MB, a 57 MB embedding shared with the head."""
    args = dict(num_layers=30, layer_bytes=7 * 10**6, embedding_bytes=57 * 10**6, head_bytes=57 * 10**6,
                tied_bytes=57 * 10**6, kv_bytes_per_token_layer=2560, flops_per_token_layer=7e6, num_heads=9,
                num_kv_heads=3, intermediate_size=1536, kv_reserve_tokens=4096)
    return ModelProfile(**{**args, **over})


def need(model: ModelProfile, n: int, tp: int, first: bool, last: bool) -> int:
    """Bytes per device, written out independently of the planner."""
    weights = n * model.layer_bytes
    weights += model.embedding_bytes if first else 0
    weights += model.head_bytes if last else 0
    weights -= model.tied_bytes if (first and last) else 0
    kv = n * model.kv_bytes_per_token_layer * model.kv_reserve_tokens
    return math.ceil(weights / tp) + math.ceil(kv / min(tp, model.num_kv_heads))


def assert_valid(plan: Plan, devices: list[DeviceCapacity], model: ModelProfile, *, span_nodes: bool = False
                 ) -> None:
    """Layers 0..L covered once, contiguously; no device twice; every device holds its share; a TP group's
    devices are of one kind, and of one node unless ``span_nodes``."""
    by_key = {d.key: d for d in devices}
    assert plan.stages[0].start == 0 and plan.stages[-1].end == model.num_layers
    for a, b in itertools.pairwise(plan.stages):
        assert a.end == b.start
    used = [m for s in plan.stages for m in s.members]
    assert len(used) == len(set(used))
    k = len(plan.stages)
    for i, s in enumerate(plan.stages):
        assert s.end > s.start
        assert len({by_key[m].kind for m in s.members}) == 1
        assert span_nodes or len({by_key[m].node_id for m in s.members}) == 1  # a TP group lives on one node
        n_need = need(model, s.num_layers, s.tp_size, i == 0, i == k - 1)
        assert s.device_bytes == n_need
        for m in s.members:
            assert by_key[m].free_memory_bytes >= n_need, (m, n_need)
    slowest = max(s.est_time_s for s in plan.stages)
    assert plan.est_step_time_s == pytest.approx(slowest + HOP_PENALTY_S * (k - 1))


def layers(plan: Plan) -> list[tuple[tuple[tuple[str, int], ...], int]]:
    return [(s.members, s.num_layers) for s in plan.stages]


def moves(plan: Plan, previous: Plan) -> int:
    return sum(set(plan.owner(layer)) != set(previous.owner(layer)) for layer in range(plan.stages[-1].end))


def test_one_gpu_that_fits_all():
    model = big_model()
    plan = plan_placement([dev("a")], model)
    assert layers(plan) == [((("a", 0),), 32)]
    assert_valid(plan, [dev("a")], model)
    # The one stage holds embedding and head: 32 layers at 0.4 GB plus the head at 1 TB/s.
    assert plan.est_step_time_s == pytest.approx((32 * 0.4 + 0.5) * GB / 1e12)


@pytest.mark.parametrize("model, expected", [
    # Big model: halving 13.3 ms beats the 0.5 ms hop. The last stage also reads the 0.5 GB head
    # (1.25 layers' worth), so the even split is 17/15: max(6.8, 15 * 0.4 + 0.5 = 6.5) ms beats
    # 16/16 = max(6.4, 6.9) ms.
    (big_model(), [((("a", 0),), 17), ((("b", 0),), 15)]),
    # Same model without a head cost: exactly even.
    (big_model(head_bytes=0), [((("a", 0),), 16), ((("b", 0),), 16)]),
    # Small model: 0.27 ms on one GPU; splitting saves ~0.13 ms but pays the 0.5 ms hop, so one stage.
    (small_model(), [((("a", 0),), 30)]),
])
def test_two_equal_gpus(model, expected):
    devices = [dev("a"), dev("b")]
    plan = plan_placement(devices, model)
    assert layers(plan) == expected
    assert_valid(plan, devices, model)


def test_fast_gpu_gets_more_layers_than_slow():
    model = big_model(head_bytes=0)
    devices = [dev("fast", bw=3e12, flops=3e14), dev("slow", bw=1e12, flops=1e14)]
    plan = plan_placement(devices, model)
    assert_valid(plan, devices, model)
    counts = {s.members[0][0]: s.num_layers for s in plan.stages}
    # 3x the bandwidth: 24 vs 8 layers balances the stages exactly.
    assert counts == {"fast": 24, "slow": 8}
    times = [s.est_time_s for s in plan.stages]
    assert max(times) == pytest.approx(min(times))


def test_cpu_node_gets_nothing_when_the_gpu_suffices():
    model = big_model()
    devices = [dev("gpu"), cpu("cpu")]
    plan = plan_placement(devices, model)
    assert layers(plan) == [((("gpu", 0),), 32)]


def test_cpu_node_gets_few_layers_when_needed():
    # The 12 GiB GPU cannot hold all 32 layers (16.9 GiB with KV): the 20x slower CPU takes the rest,
    # and the plan gives the GPU as much as its memory allows.
    model = big_model()
    devices = [dev("gpu", mem_gib=12), cpu("cpu")]
    plan = plan_placement(devices, model)
    assert_valid(plan, devices, model)
    counts = {s.members[0][0]: s.num_layers for s in plan.stages}
    assert counts["cpu"] < counts["gpu"]
    assert need(model, counts["gpu"] + 1, 1, True, False) > 12 * GIB  # the GPU is full


def test_memory_forces_a_split():
    model = big_model()  # 16.85 GiB of weights and KV reserve
    devices = [dev("a", mem_gib=7), dev("b", mem_gib=7), dev("c", mem_gib=7)]
    plan = plan_placement(devices, model)
    assert len(plan.stages) == 3
    assert_valid(plan, devices, model)


def big_head_model(**over) -> ModelProfile:
    """Small layers and a 1 GB LM head: pipeline stages cannot split the head, tensor parallelism can."""
    args = dict(num_layers=4, layer_bytes=50 * 10**6, embedding_bytes=GB, head_bytes=GB,
                kv_bytes_per_token_layer=4096, flops_per_token_layer=5e7, num_heads=32, num_kv_heads=8,
                intermediate_size=11008, kv_reserve_tokens=1024)
    return ModelProfile(**{**args, **over})


def test_tensor_parallel_unit_when_fastest():
    # One stage over both GPUs reads 1.2 GB at 2 x 0.9 TB/s = 0.67 ms; any pipeline puts the whole
    # head (1 GB, 1 ms) on its last stage.
    model = big_head_model()
    devices = [dev("a", 0), dev("a", 1)]
    plan = plan_placement(devices, model)
    assert layers(plan) == [((("a", 0), ("a", 1)), 4)]
    assert plan.stages[0].tp_size == 2
    assert plan.est_step_time_s == pytest.approx((4 * 50e6 + 1e9) / (2 * 1e12 * 0.9))
    assert_valid(plan, devices, model)
    # max_tp=1 forbids it: the head then sits on one GPU.
    plan = plan_placement(devices, model, max_tp=1)
    assert all(s.tp_size == 1 for s in plan.stages)


def test_no_tensor_parallel_group_across_nodes():
    model = big_head_model()
    devices = [dev("a"), dev("b")]
    plan = plan_placement(devices, model)
    assert all(s.tp_size == 1 for s in plan.stages)


def test_span_nodes_forms_a_group_across_nodes():
    """With span_nodes the same two one-GPU nodes form one tp=2 stage (as two GPUs of one node do in
    test_tensor_parallel_unit_when_fastest), ranks ordered by node; devices of different kinds never mix."""
    model = big_head_model()
    devices = [dev("b"), dev("a"), cpu("c")]
    plan = plan_placement(devices, model, span_nodes=True)
    assert layers(plan) == [((("a", 0), ("b", 0)), 4)]
    assert plan.est_step_time_s == pytest.approx((4 * 50e6 + 1e9) / (2 * 1e12 * 0.9))
    assert_valid(plan, devices, model, span_nodes=True)
    # Heterogeneous: a 2-GPU group (one GPU each on a and b) then a single GPU, when asked for 2 stages.
    devices = [dev("a"), dev("b"), dev("c")]
    plan = plan_placement(devices, big_model(), num_stages=2, span_nodes=True)
    assert sorted(s.tp_size for s in plan.stages) == [1, 2]
    assert_valid(plan, devices, big_model(), span_nodes=True)


def test_span_nodes_repair_keeps_the_surviving_group():
    """After a failure elsewhere, a group spanning nodes that survived is kept (it moves no layers)."""
    model = big_model()
    previous = Plan((StagePlan(0, 20, (("a", 0), ("b", 0))), StagePlan(20, 32, (("c", 0),))), 0.0)
    devices = [dev("a"), dev("b"), dev("d")]  # c died, d is a spare
    kept = plan_placement(devices, model, num_stages=2, prefer=previous, span_nodes=True)
    assert_valid(kept, devices, model, span_nodes=True)
    assert kept.stages[0].members == (("a", 0), ("b", 0))


@pytest.mark.parametrize("heads, kv_heads, three_ok", [
    (4, 4, False),  # 3 does not divide 4 heads
    (6, 2, False),  # 3 ranks over 2 kv heads: neither divides the other
    (6, 6, True),
])
def test_tensor_parallel_divisibility(heads, kv_heads, three_ok):
    # Three GPUs on one node and a big head: the widest allowed group wins (TP=3 reads the 1.2 GB at
    # 3 * 0.9**log2(3) = 2.54x one GPU; otherwise a pair alone, since a pipeline pays the hop).
    model = big_head_model(num_heads=heads, num_kv_heads=kv_heads, intermediate_size=12)
    devices = [dev("a", i) for i in range(3)]
    plan = plan_placement(devices, model)
    assert_valid(plan, devices, model)
    assert [s.tp_size for s in plan.stages] == ([3] if three_ok else [2])


def test_kv_heads_replicate_beyond_their_count():
    # 4 ranks over 2 kv heads: each rank holds half the KV (one head), not a quarter.
    model = big_head_model(num_heads=8, num_kv_heads=2, intermediate_size=16)
    full = model.stage_kv_bytes(4)
    assert model.device_bytes(4, tp=4, first=False, last=False) == model.stage_weight_bytes(
        4, first=False, last=False) // 4 + full // 2
    devices = [dev("a", i) for i in range(4)]
    plan = plan_placement(devices, model)
    assert plan.stages[0].tp_size == 4
    assert_valid(plan, devices, model)


def test_infeasible_cluster_names_missing_memory():
    model = big_model()
    devices = [dev("a", mem_gib=4), dev("b", mem_gib=4)]
    weights = 32 * model.layer_bytes + model.embedding_bytes + model.head_bytes
    kv = 32 * model.kv_bytes_per_token_layer * model.kv_reserve_tokens
    missing = (weights + kv - 8 * GIB) / GIB
    with pytest.raises(PlacementError) as info:
        plan_placement(devices, model)
    message = str(info.value)
    assert f"needs {missing:.2f} GiB more" in message
    assert f"weights {weights / GIB:.2f} GiB + KV reserve 4.00 GiB, usable 8.00 GiB on 2 devices" in message


def test_infeasible_when_layers_do_not_fit_whole():
    # 3 devices x 0.3 GiB hold 0.9 GiB in total, more than 2 layers of 0.4 GiB, but each holds no layer.
    model = big_model(num_layers=2, layer_bytes=int(0.4 * GIB), embedding_bytes=0, head_bytes=0,
                      kv_reserve_tokens=0)
    devices = [dev(n, mem_gib=0.3) for n in "abc"]
    with pytest.raises(PlacementError, match=r"at most 0 of 2 fit"):
        plan_placement(devices, model)


def test_first_and_last_stage_hold_embedding_and_head():
    # 16 x 0.1 GB layers, a 2 GB embedding and a 0.1 GB head (3.7 GB) on 3 GiB + 1 GiB of equal speed:
    # only the 3 GiB device can hold the embedding, so it must run the first stage.
    model = big_model(embedding_bytes=2 * GB, head_bytes=int(0.1 * GB), num_layers=16, layer_bytes=int(0.1 * GB),
                      kv_reserve_tokens=0)
    devices = [dev("small", mem_gib=1), dev("big", mem_gib=3)]
    plan = plan_placement(devices, model)
    assert_valid(plan, devices, model)
    first, last = plan.stages
    assert (first.members, last.members) == ((("big", 0),), (("small", 0),))
    assert first.weight_bytes == first.num_layers * model.layer_bytes + model.embedding_bytes
    assert last.weight_bytes == last.num_layers * model.layer_bytes + model.head_bytes
    assert first.device_bytes > 2 * GB and last.device_bytes <= GIB


@pytest.mark.parametrize("model", [big_model(), small_model(), big_model(tied_bytes=int(0.5 * GB))])
def test_single_device_memory_is_exact(model):
    # A device with exactly what one stage needs fits (tied weights counted once); one byte less does not.
    exact = need(model, model.num_layers, 1, True, True)
    plan = plan_placement([DeviceCapacity(node_id="a", device_index=0, kind="cuda", free_memory_bytes=exact,
                                          matmul_flops=1e14, memory_bandwidth=1e12)], model)
    assert plan.stages[0].device_bytes == exact
    with pytest.raises(PlacementError, match="needs 0.00 GiB more"):
        plan_placement([DeviceCapacity(node_id="a", device_index=0, kind="cuda", free_memory_bytes=exact - 1,
                                       matmul_flops=1e14, memory_bandwidth=1e12)], model)


def test_prefer_keeps_an_equally_good_plan():
    model = big_model()
    devices = [dev("a"), dev("b")]
    fresh = plan_placement(devices, model)
    previous = Plan(tuple(StagePlan(s.start, s.end, m) for s, m in
                          zip(fresh.stages, [(("b", 0),), (("a", 0),)], strict=True)), fresh.est_step_time_s)
    again = plan_placement(devices, model, prefer=previous)
    assert [(s.start, s.end, s.members) for s in again.stages] == [(0, 17, (("b", 0),)), (17, 32, (("a", 0),))]


def test_prefer_moves_fewest_layers_after_a_failure():
    model = big_model()
    order = ["d", "c", "b", "a"]  # a previous plan in an order the planner would not pick by itself
    previous = Plan(tuple(StagePlan(8 * i, 8 * i + 8, ((n, 0),)) for i, n in enumerate(order)), 0.0)
    devices = [dev("a"), dev("b"), dev("d")]  # "c" (layers 8-15) died
    fresh = plan_placement(devices, model)
    kept = plan_placement(devices, model, prefer=previous)
    assert_valid(kept, devices, model)
    assert kept.est_step_time_s <= fresh.est_step_time_s * (1 + PREFER_TOLERANCE)
    # Best is 11/11/10 layers (5.5 ms); within 5% no stage can take 12, so the least-moving split keeps the
    # order d, b, a: d gains 8-10, b gains 11-15 and keeps 16-21, a gains 22-23: 3 + 5 + 2 = 10 layers move
    # (the fresh plan, in its own order, may move all 32).
    assert [(s.start, s.end, s.members[0][0]) for s in kept.stages] == [(0, 11, "d"), (11, 22, "b"), (22, 32, "a")]
    assert moves(kept, previous) == 10 <= moves(fresh, previous)


def test_prefer_with_a_fixed_stage_count_keeps_the_surviving_stage():
    model = big_model()
    previous = Plan((StagePlan(0, 16, (("b", 0),)), StagePlan(16, 32, (("c", 0),))), 0.0)
    devices = [dev("a"), dev("b")]  # "c" died; "a" was a spare
    kept = plan_placement(devices, model, num_stages=2, prefer=previous)
    assert_valid(kept, devices, model)
    # b keeps its 16 layers (it also takes layer 16: the same 16 moves, and a faster split); a takes the rest.
    assert [(s.start, s.end, s.members[0][0]) for s in kept.stages] == [(0, 17, "b"), (17, 32, "a")]
    assert layers_moved(previous, kept, 32) == moves(kept, previous) == 16
    assert layers_moved(None, kept, 32) == 32


def test_prefer_is_ignored_when_much_slower():
    model = big_model()
    previous = plan_placement([dev("slow")], model)
    devices = [dev("slow"), dev("fast", bw=4e12, flops=4e14)]
    fresh = plan_placement(devices, model)
    again = plan_placement(devices, model, prefer=previous)
    # Staying on the slow GPU (13.3 ms) is 4x slower than the best (3.2 ms): the fast GPU takes 27 layers,
    # and the slow one keeps the 5 it can run as fast.
    assert layers(again) == layers(fresh) == [((("fast", 0),), 27), ((("slow", 0),), 5)]


def test_deterministic_and_order_independent():
    model = big_model()
    devices = [dev(f"n{i}", j, mem_gib=8 + i + j, bw=(1 + i % 2) * 1e12) for i in range(3) for j in range(2)]
    plan = plan_placement(devices, model)
    assert plan_placement(devices, model) == plan
    shuffled = devices[:]
    random.Random(7).shuffle(shuffled)
    assert plan_placement(shuffled, model) == plan


def seventy_b() -> ModelProfile:
    return big_model(num_layers=80, layer_bytes=int(1.7 * GB), embedding_bytes=GB, head_bytes=GB,
                     kv_bytes_per_token_layer=327680, flops_per_token_layer=1.7e9, num_heads=64, num_kv_heads=8,
                     intermediate_size=28672)


def test_twelve_devices_plan_quickly():
    model = seventy_b()
    devices = [dev(f"n{i // 4}", i % 4, mem_gib=10 + i, bw=(1 + i // 4) * 1e12) for i in range(12)]
    devices += [cpu("cpu0")]
    start = time.perf_counter()
    plan = plan_placement(devices, model)
    survivors = [d for d in devices if d.key != ("n2", 1)]
    again = plan_placement(survivors, model, prefer=plan)
    assert time.perf_counter() - start < 2.0
    assert_valid(plan, devices, model)
    assert_valid(again, survivors, model)
    assert "est step time" in plan.describe()


def test_describe_lists_every_stage():
    text = plan_placement([dev("a", mem_gib=7), dev("b", mem_gib=7), dev("c", mem_gib=7)], big_model()).describe()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["stage", "layers", "tp"]
    assert len(lines) == 1 + 3 + 1
    assert re.search(r"2 hop\(s\)", lines[-1])


@pytest.mark.parametrize("make, message", [
    (lambda: dev("a", mem_gib=-1), "free_memory_bytes=-1073741824"),
    (lambda: dev("a", kind="tpu"), "kind='tpu'"),
    (lambda: dev("a", bw=0.0), "memory_bandwidth=0.0"),
    (lambda: big_model(num_layers=0), "num_layers=0"),
    (lambda: big_model(layer_bytes=-5), "layer_bytes=-5"),
    (lambda: big_model(tied_bytes=GB), "tied_bytes=1000000000"),
    (lambda: plan_placement([dev("a"), dev("a")], big_model()), "node_id='a', device_index=0"),
    (lambda: plan_placement([dev("a")], big_model(), max_tp=0), "max_tp=0"),
])
def test_invalid_input(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_no_devices():
    with pytest.raises(PlacementError, match="no devices"):
        plan_placement([], big_model())


# -- properties -------------------------------------------------------------------------------------------


@st.composite
def clusters(draw, *, one_device_per_node: bool = False):
    heads = draw(st.sampled_from([4, 6, 8, 12]))
    emb = draw(st.integers(0, GIB // 4))
    head = draw(st.integers(0, GIB // 4))
    model = ModelProfile(
        num_layers=draw(st.integers(1, 12)), layer_bytes=draw(st.integers(1, GIB // 8)), embedding_bytes=emb,
        head_bytes=head, tied_bytes=draw(st.sampled_from([0, min(emb, head)])),
        kv_bytes_per_token_layer=draw(st.integers(0, 1024)), kv_reserve_tokens=draw(st.integers(0, 4096)),
        flops_per_token_layer=draw(st.floats(1e6, 1e9)), num_heads=heads,
        num_kv_heads=draw(st.sampled_from([d for d in (1, 2, 3, 4, 6) if heads % d == 0])),
        intermediate_size=draw(st.sampled_from([12, 16, 24])))
    # Memory as a fraction of what one device would need for everything, and bandwidths down to 1 GB/s
    # (a 128 MB layer then takes far longer than a hop): many clusters are feasible only with a split.
    whole = need(model, model.num_layers, 1, True, True)
    devices = []
    for n in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cuda", "cuda", "cpu"]))
        count = 1 if (kind == "cpu" or one_device_per_node) else draw(st.integers(1, 3))
        for i in range(count):
            devices.append(DeviceCapacity(
                node_id=f"n{n}", device_index=i, kind=kind,
                free_memory_bytes=int(whole * draw(st.floats(0.15, 1.2))),
                matmul_flops=draw(st.floats(1e11, 1e15)), memory_bandwidth=draw(st.floats(1e9, 1e12))))
    return devices, model


@settings(max_examples=50, deadline=None)
@given(clusters(), st.booleans())
def test_any_plan_is_valid(cluster, span_nodes):
    devices, model = cluster
    try:
        plan = plan_placement(devices, model, span_nodes=span_nodes)
    except PlacementError:
        event("infeasible")
        # Never refused when one device could hold everything.
        assert all(d.free_memory_bytes < need(model, model.num_layers, 1, True, True) for d in devices)
        return
    event(f"{len(plan.stages)} stage(s)")
    assert_valid(plan, devices, model, span_nodes=span_nodes)
    # Re-planning after losing a device, preferring the old plan: valid, and within the tolerance.
    survivors = devices[1:]
    try:
        fresh = plan_placement(survivors, model, span_nodes=span_nodes)
    except PlacementError:
        return
    again = plan_placement(survivors, model, prefer=plan, span_nodes=span_nodes)
    assert_valid(again, survivors, model, span_nodes=span_nodes)
    assert again.est_step_time_s <= fresh.est_step_time_s * (1 + PREFER_TOLERANCE) * (1 + 1e-12)
    assert moves(again, plan) <= moves(fresh, plan)


def stage_time(model: ModelProfile, d: DeviceCapacity, n: int, last: bool) -> float:
    head_flops = model.flops_per_token_layer * model.head_bytes / model.layer_bytes
    return max((n * model.layer_bytes + last * model.head_bytes) / d.memory_bandwidth,
               (n * model.flops_per_token_layer + last * head_flops) / d.matmul_flops)


def brute_force_cost(devices: list[DeviceCapacity], model: ModelProfile) -> float:
    """Every ordered choice of devices and every split of the layers (no TP: one device per node)."""
    L, best = model.num_layers, math.inf
    for k in range(1, min(len(devices), L) + 1):
        for seq in itertools.permutations(devices, k):
            for cuts in itertools.combinations(range(1, L), k - 1):
                counts = [b - a for a, b in zip((0, *cuts), (*cuts, L), strict=True)]
                ends = [(i == 0, i == k - 1) for i in range(k)]
                if all(d.free_memory_bytes >= need(model, n, 1, f, la)
                       for d, n, (f, la) in zip(seq, counts, ends, strict=True)):
                    slowest = max(stage_time(model, d, n, la) for d, n, (_, la) in zip(seq, counts, ends, strict=True))
                    best = min(best, slowest + HOP_PENALTY_S * (k - 1))
    return best


@settings(max_examples=50, deadline=None)
@given(clusters(one_device_per_node=True))
def test_plan_matches_brute_force(cluster):
    devices, model = cluster
    best = brute_force_cost(devices, model)
    try:
        plan = plan_placement(devices, model)
    except PlacementError:
        event("infeasible")
        assert best == math.inf
        return
    event(f"{len(plan.stages)} stage(s)")
    assert plan.est_step_time_s == pytest.approx(best, rel=1e-9)


# -- profile_from_config ----------------------------------------------------------------------------------


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=100, max_position_embeddings=128)


@pytest.mark.parametrize("family, extra", [
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {"tie_word_embeddings": False}),
    ("mistral", {"tie_word_embeddings": False}),
])
def test_profile_matches_llama_family_parameters(family, extra):
    transformers = pytest.importorskip("transformers")
    config_class = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[family]
    model_class = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[family]
    config = getattr(transformers, config_class)(**LLAMA, **extra)
    model = getattr(transformers, model_class)(config)
    profile = profile_from_config(config.to_dict(), dtype_bytes=2, kv_reserve_tokens=16)
    assert profile.layer_bytes == numel(model.model.layers[0]) * 2
    assert profile.embedding_bytes == numel(model.model.embed_tokens) * 2
    assert profile.head_bytes == (numel(model.model.norm) + model.lm_head.weight.numel()) * 2
    assert profile.tied_bytes == (profile.embedding_bytes if extra.get("tie_word_embeddings") else 0)
    assert profile.kv_bytes_per_token_layer == 2 * 2 * 32 * 2  # K and V, 2 kv heads of 32, 2 bytes
    assert profile.flops_per_token_layer == 2 * numel(model.model.layers[0])
    assert (profile.num_layers, profile.num_heads, profile.num_kv_heads, profile.kv_reserve_tokens) == (2, 4, 2, 16)


@pytest.mark.parametrize("proj", [32, 64])
def test_profile_matches_opt_parameters(proj):
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=proj)
    decoder = transformers.OPTForCausalLM(config).model.decoder
    lm_head_numel = 100 * proj
    profile = profile_from_config(config.to_dict(), dtype_bytes=4, kv_reserve_tokens=8)
    assert profile.layer_bytes == numel(decoder.layers[0]) * 4
    projections = [m for m in (decoder.project_in, decoder.project_out) if m is not None]
    assert profile.embedding_bytes == (numel(decoder.embed_tokens) + numel(decoder.embed_positions)
                                       + (numel(projections[0]) if projections else 0)) * 4
    assert profile.head_bytes == (numel(decoder.final_layer_norm) + lm_head_numel
                                  + (numel(projections[1]) if projections else 0)) * 4
    assert profile.tied_bytes == lm_head_numel * 4
    assert profile.kv_bytes_per_token_layer == 2 * 64 * 4
    assert profile.intermediate_size == 128 and profile.num_kv_heads == 4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exact_stage_count(k: int) -> None:
    devices = [dev("a"), dev("b"), dev("c")]
    model = small_model()
    plan = plan_placement(devices, model, num_stages=k)
    assert len(plan.stages) == k
    assert_valid(plan, devices, model)


def test_exact_stage_count_beyond_the_devices_is_a_clear_error() -> None:
    with pytest.raises(PlacementError, match="exactly 3 stages"):
        plan_placement([dev("a"), dev("b")], small_model(), num_stages=3)
    with pytest.raises(ValueError, match="num_stages=0"):
        plan_placement([dev("a")], small_model(), num_stages=0)
