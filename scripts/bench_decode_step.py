#!/usr/bin/env python
"""One stage's decode step on one GPU, taken apart: where a step's time goes, kernel by kernel.

For each shape (random-init Llamas of published shapes, tests/engine/reference.py SHAPES; the weights are
drawn on the device, nothing is written to disk) and each kernel variant (``torch``: plain PyTorch ops;
``kernels``: engine/kernels.py; ``fused``: those and the residual adds inside the matrix products), at
each batch size, with every row at ``--context`` tokens:

- ``replay_ms``: back-to-back replays of the step's CUDA graph, timed with CUDA events: the GPU's time;
- ``loop_ms``: what a serving loop does per step: ``DecodeGraphs.run`` (inputs in, outputs out), greedy
  argmax and the tokens to the host;
- the roofline: the stage's weight bytes over the measured copy bandwidth;
- kernels: an eager run of the same static step under torch.profiler, GPU time summed per kernel name
  (what a graph replays, without the graph).

Also each weight matrix's product alone (``F.linear``) at each batch size, as achieved GB/s: how close the
matrix products get to the copy bandwidth.

    python scripts/bench_decode_step.py --out $OUT/decode_step.json
    python scripts/bench_decode_step.py --shapes llama-3.2-1b --variants fused --batch-sizes 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "proto"))

VARIANTS = ("torch", "kernels", "fused")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--context", type=int, default=96, help="tokens each row has cached (default 96)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=50, help="timed steps per measurement (default 50)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kernel-top", type=int, default=12, help="kernels listed per breakdown (default 12)")
    p.add_argument("--no-gemm", action="store_true", help="skip the per-matrix products")
    p.add_argument("--out", default="out/decode_step.json")
    args = p.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    return args


def copy_bandwidth_gb_s(torch, nbytes: int = 2 << 30) -> float:  # noqa: ANN001
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / best / 1e9


def random_stage(shape: str, dtype, torch):  # noqa: ANN001, ANN201
    from engine.config import ModelConfig
    from engine.stage import StageModel
    from tests.engine.reference import SHAPES

    cfg = ModelConfig.from_hf({"model_type": "llama", **SHAPES[shape]})
    stage = StageModel(cfg, start=0, end=cfg.num_layers, dtype=dtype, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return stage


def set_variant(stage, variant: str) -> None:  # noqa: ANN001
    """``torch``: plain PyTorch; ``kernels``: engine/kernels.py, residual adds apart; ``fused``: what
    StageModel.optimize_kernels does on CUDA (the kernels, residual adds inside the products)."""
    stage.fused_kernels = False
    for module in stage.modules():
        for flag in ("fused_act", "fused", "fuse_residual"):
            if hasattr(module, flag):
                setattr(module, flag, False)
    if variant != "torch":
        stage.use_fused_kernels()
    if variant == "kernels":
        for module in stage.modules():
            if hasattr(module, "fuse_residual"):
                module.fuse_residual = False


def time_events(torch, fn, steps: int) -> float:  # noqa: ANN001
    """Median ms of ``fn`` over ``steps`` calls, each between two CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_loop(torch, fn, steps: int) -> float:  # noqa: ANN001
    """ms per call of ``fn`` run back to back (each ends with a host sync), wall clock."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def kernel_breakdown(torch, stage, cache, batch: int, context: int, top: int) -> dict[str, Any]:  # noqa: ANN001
    """GPU time per kernel name of one eager static step (the step a graph records)."""
    from torch.profiler import ProfilerActivity, profile

    from engine.graphs import DecodeGraphs

    eager = DecodeGraphs(stage, cache, capture=False)
    slots, starts, x = list(range(batch)), [context] * batch, torch.zeros(batch, dtype=torch.long, device="cuda")
    for _ in range(2):
        eager.run(slots, starts, x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eager.run(slots, starts, x)
        torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            per[ev.name[:90]].append(ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total)
    rows = sorted(((sum(t), len(t), name) for name, t in per.items()), reverse=True)
    return {"kernels": sum(n for _, n, _ in rows), "gpu_us": round(sum(t for t, _, _ in rows), 1),
            "top": [{"us": round(t, 1), "count": n, "name": name} for t, n, name in rows[:top]]}


def measure_stage(torch, stage, variant: str, args: argparse.Namespace, weight_bytes: int, bw: float
                  ) -> dict[str, Any]:  # noqa: ANN001
    from engine.graphs import DecodeGraphs

    set_variant(stage, variant)
    out: dict[str, Any] = {}
    for batch in args.batch_sizes:
        cache = stage.new_cache(num_slots=max(args.batch_sizes), max_seq_len=args.max_seq_len, spare_slots=1)
        graphs = DecodeGraphs(stage, cache)
        slots, starts = list(range(batch)), [args.context] * batch
        tokens = torch.randint(0, stage.cfg.vocab_size, (batch,), device="cuda")
        graphs.run(slots, starts, tokens)  # captures
        g = next(iter(graphs.graphs.values()))
        replay = time_events(torch, g.graph.replay, args.steps)

        def loop(graphs=graphs, slots=slots, starts=starts, tokens=tokens) -> None:  # noqa: ANN001
            graphs.run(slots, starts, tokens).argmax(-1).tolist()

        loop_ms = time_loop(torch, loop, args.steps)
        roofline = weight_bytes / (bw * 1e9) * 1e3
        row = {"replay_ms": round(replay, 4), "loop_ms": round(loop_ms, 4), "roofline_ms": round(roofline, 4),
               "replay_pct_of_roofline": round(100 * roofline / replay, 1),
               "loop_pct_of_roofline": round(100 * roofline / loop_ms, 1)}
        row["breakdown"] = kernel_breakdown(torch, stage, cache, batch, args.context, args.kernel_top)
        out[str(batch)] = row
        print(f"  {variant:6s} B={batch:3d}: replay {replay:.3f} ms, loop {loop_ms:.3f} ms, roofline "
              f"{roofline:.3f} ms ({row['replay_pct_of_roofline']}% / {row['loop_pct_of_roofline']}%), "
              f"{row['breakdown']['kernels']} kernels, {row['breakdown']['gpu_us']} us of kernels", flush=True)
        del graphs, cache
        torch.cuda.empty_cache()
    return out


def gemm_rates(torch, stage, batch_sizes: list[int], steps: int) -> list[dict[str, Any]]:  # noqa: ANN001
    import torch.nn.functional as F

    layer = stage.layers[0]
    mats = {"qkv": layer.attn.qkv.weight, "o_proj": layer.attn.o_proj.weight, "gate_up": layer.mlp.gate_up.weight,
            "down": layer.mlp.down.weight}
    if stage.head is not None:
        mats["lm_head"] = stage.head.lm_head.table.weight
    rows = []
    for name, w in mats.items():
        for batch in batch_sizes:
            x = torch.randn(batch, w.shape[1], dtype=w.dtype, device="cuda")
            graph = torch.cuda.CUDAGraph()
            reps = 20
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                F.linear(x, w)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    F.linear(x, w)
            ms = time_events(torch, graph.replay, max(5, steps // 5)) / reps
            nbytes = w.numel() * w.element_size()
            rows.append({"matrix": name, "shape": list(w.shape), "batch": batch, "us": round(ms * 1e3, 2),
                         "gb_s": round(nbytes / (ms / 1e3) / 1e9, 0)})
            print(f"  {name:8s} {tuple(w.shape)} B={batch}: {ms * 1e3:.1f} us, {rows[-1]['gb_s']:.0f} GB/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from engine.stage import parse_dtype

    dtype = parse_dtype(args.dtype)
    bw = copy_bandwidth_gb_s(torch)
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "copy_gb_s": round(bw, 1), "settings": {k: v for k, v in vars(args).items()},
                              "shapes": {}}
    print(f"{report['gpu']}: copy {bw:.0f} GB/s", flush=True)
    for shape in args.shapes:
        stage = random_stage(shape, dtype, torch)
        weight_bytes = sum(p.numel() * p.element_size() for p in stage.parameters())
        entry: dict[str, Any] = {"weight_bytes": weight_bytes, "variants": {}}
        report["shapes"][shape] = entry
        print(f"{shape}: {weight_bytes / 1e9:.2f} GB of weights", flush=True)
        for variant in args.variants:
            entry["variants"][variant] = measure_stage(torch, stage, variant, args, weight_bytes, bw)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        if not args.no_gemm:
            entry["gemm"] = gemm_rates(torch, stage, args.batch_sizes, args.steps)
        del stage
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for shape, entry in report["shapes"].items():
        for variant, rows in entry["variants"].items():
            for batch, r in rows.items():
                print(f"{shape} {variant} B={batch}: top kernels: "
                      + "; ".join(f"{k['us']}us x{k['count']} {k['name'][:50]}" for k in r["breakdown"]["top"][:6]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
