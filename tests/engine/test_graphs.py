"""The CUDA-graph decode path (engine/graphs.py). On CPU its padded, static-shaped step runs eagerly
(``capture=False``): logits and the keys/values it writes must equal the ordinary eager step's, padding rows
must touch only the spare slot. On CUDA (``gpu``): captured graphs give the eager path's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.graphs import DecodeGraphs, bucket, context_buckets
from engine.stage import StageModel
from tests.engine.reference import make_random_model

PROMPTS = [[5, 9, 2, 7], [11, 3], [8, 8, 1, 4, 6, 2, 9], [3]]


@pytest.fixture(scope="module", params=["llama-gqa-tied", "mistral-window", "qwen2-bias"])
def model_dir(request, tmp_path_factory) -> Path:  # noqa: ANN001
    return make_random_model(request.param, tmp_path_factory.mktemp(request.param))


def prefill(stage: StageModel, cache, rows: list[int]) -> None:  # noqa: ANN001 - KVCache
    for slot in rows:
        ids = torch.tensor(PROMPTS[slot])
        stage(ids, stage.make_meta([slot], [0], [len(ids)]), cache)


def test_buckets() -> None:
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert context_buckets(512) == (64, 128, 256, 512) and context_buckets(100) == (64, 100)
    with pytest.raises(ValueError, match="exceeds"):
        bucket(9, (1, 2, 4, 8))


@pytest.mark.parametrize("rows", [[0], [2, 0, 3], [0, 1, 2, 3]])
def test_static_decode_equals_the_eager_step(model_dir: Path, rows: list[int]) -> None:
    stage = StageModel.from_pretrained(model_dir)
    eager_cache = stage.new_cache(num_slots=6, max_seq_len=96)
    graph_cache = stage.new_cache(num_slots=6, max_seq_len=96, spare_slots=1)
    prefill(stage, eager_cache, rows)
    prefill(stage, graph_cache, rows)
    graphs = DecodeGraphs(stage, graph_cache, capture=False)
    starts = [len(PROMPTS[r]) for r in rows]
    tokens = torch.tensor([r + 20 for r in rows])
    for _ in range(3):  # several steps: the second reads what the first wrote
        want = stage(tokens, stage.make_meta(rows, starts, [1] * len(rows)), eager_cache)
        got = graphs.run(rows, starts, tokens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tokens = want.argmax(-1)
        starts = [s + 1 for s in starts]
    spec = eager_cache.spec
    torch.testing.assert_close(graph_cache.k[:, :spec.num_slots], eager_cache.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graph_cache.v[:, :spec.num_slots], eager_cache.v, rtol=1e-5, atol=1e-5)
    padded = bucket(len(rows), graphs.batch_buckets) > len(rows)
    assert (graph_cache.k[:, spec.num_slots].abs().sum() > 0) == padded  # padding rows write the spare only
    assert list(graphs.graphs) == [(bucket(len(rows), graphs.batch_buckets), 64)]


def test_the_spare_slot_is_required(model_dir: Path) -> None:
    stage = StageModel.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="spare slot"):
        DecodeGraphs(stage, stage.new_cache(num_slots=2, max_seq_len=32))


def eager_and_replayed(stage: StageModel, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor], DecodeGraphs]:
    """Prefill 3 slots in two caches, then ``steps`` decode steps of those rows, eager on one cache and
    replayed through captured graphs on the other (each step's tokens: the eager step's argmax). Returns
    the fp32 outputs of both, on the CPU, and the graphs."""
    device = stage.device
    rows = [2, 0, 3]
    eager_cache = stage.new_cache(num_slots=6, max_seq_len=96)
    graph_cache = stage.new_cache(num_slots=6, max_seq_len=96, spare_slots=1)
    for cache in (eager_cache, graph_cache):
        for slot in rows:
            ids = torch.tensor(PROMPTS[slot], device=device)
            stage(ids, stage.make_meta([slot], [0], [len(ids)]), cache)
    graphs = DecodeGraphs(stage, graph_cache)
    starts = [len(PROMPTS[r]) for r in rows]
    tokens = torch.tensor([r + 20 for r in rows], device=device)
    eager, replayed = [], []
    for _ in range(steps):
        want = stage(tokens, stage.make_meta(rows, starts, [1] * len(rows)), eager_cache).float()
        replayed.append(graphs.run(rows, starts, tokens).float().cpu())
        eager.append(want.cpu())
        tokens = want.argmax(-1)
        starts = [s + 1 for s in starts]
    return eager, replayed, graphs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_graphs_track_the_eager_step(tmp_path: Path, dtype: str) -> None:
    """Replayed graphs against the eager step on the same cache state: fp32 within 1e-4 (TF32 off), bf16
    within the relative error of 16-bit arithmetic (the padded batch changes the GEMM shapes, so the low
    bits may differ: tokens are compared where the logits are not near a tie)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = make_random_model("llama-gqa-tied", tmp_path / "m")
    stage = StageModel.from_pretrained(model, dtype=dtype, device="cuda")
    eager, replayed, graphs = eager_and_replayed(stage, 8)
    for want, got in zip(eager, replayed, strict=True):
        if dtype == "float32":
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            assert float((got - want).norm() / want.norm()) < 0.02
    assert graphs.replays == 8 and all(g.graph is not None for g in graphs.graphs.values())


def _tp_graph_worker(rank: int, world: int, model: str, port: int, results) -> None:  # noqa: ANN001 - a Queue
    """One rank of test_graphs_under_nccl_tensor_parallelism: eager and graph decode steps, fp32."""
    import torch.distributed as dist

    from engine.graphs import graphs_pay
    from engine.parallel import TPGroup

    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device(f"cuda:{rank}"))
    try:
        tp = TPGroup.from_group() if world > 1 else TPGroup.single()
        stage = StageModel.from_pretrained(model, tp=tp, device=f"cuda:{rank}")
        eager, replayed, graphs = eager_and_replayed(stage, 6)
        # As numpy (pickled by value): a tensor in a Queue is shared through this process, which exits.
        results.put((rank, graphs_pay(stage), graphs.replays, torch.stack(eager).numpy(),
                     torch.stack(replayed).numpy()))
        del graphs, stage  # destroy_process_group was seen to hang with a group's graphs alive
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_graphs_under_nccl_tensor_parallelism(tmp_path: Path) -> None:
    """tp=2 over NCCL: every rank captures graphs with the all-reduces in them; replays equal the group's
    eager steps and the single-GPU eager steps (fp32, TF32 off, within 1e-4)."""
    import torch.multiprocessing as mp

    from coordinator.local_cluster import free_port

    model = str(make_random_model("llama-gqa-tied", tmp_path / "m"))
    runs = {}
    for world in (1, 2):
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        procs = mp.start_processes(_tp_graph_worker, args=(world, model, free_port(), results), nprocs=world,
                                   start_method="spawn", join=False)
        runs[world] = sorted((results.get(timeout=120) for _ in range(world)), key=lambda r: r[0])
        procs.join()
    runs = {w: [(rank, pays, n, torch.from_numpy(e), torch.from_numpy(g)) for rank, pays, n, e, g in r]
            for w, r in runs.items()}
    (_, pays1, replays1, eager1, graph1), = runs[1]
    assert pays1 and replays1 == 6
    torch.testing.assert_close(graph1, eager1, rtol=1e-4, atol=1e-4)
    for _, pays, replays, eager, graph in runs[2]:
        assert pays and replays == 6
        torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(eager, eager1, rtol=1e-4, atol=1e-4)
