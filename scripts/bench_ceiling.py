#!/usr/bin/env python
"""The compute ceiling of the serving workload on this machine: how fast could *any* engine that runs the
model's exact matrix products serve it, and what ratio to transformers ``generate`` that allows.

bench_serving.py's workload at concurrency B: B requests (its 16 prompts cycled, chat template applied)
each generate ``--max-tokens`` tokens. Whatever the scheduling, an exact engine must at least

- run every prompt token through every layer's projections (q/k/v, o, gate/up, down), in chunks of
  ``--max-step-tokens`` rows, and the LM head once per request (the first token);
- run ``max_tokens - 1`` decode steps of B rows through every projection and the LM head.

This script times exactly those matrix products, with the engine's own kernels (oneDNN prepacked weights
on CPU, as served) and nothing else: no attention, norms, sampling, scheduling or RPC. That time is a lower
bound on the workload's wall time, so ``B * max_tokens / floor`` is an upper bound on any exact engine's
tokens/s here. In the same run, transformers ``generate`` at batch B on the same prompts (bench_serving's
baseline) gives the ratio that bound allows.

    .venv/bin/python scripts/bench_ceiling.py                      # float32, B=32, 64 tokens
    .venv/bin/python scripts/bench_ceiling.py --dtype bfloat16 --out out/ceiling_bf16.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def load_bench_serving() -> Any:
    spec = importlib.util.spec_from_file_location("bench_serving", REPO_ROOT / "scripts" / "bench_serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=32, help="concurrent requests B (default 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--max-step-tokens", type=int, default=256, help="prompt rows per prefill step (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each part, median (default 3)")
    p.add_argument("--baseline-repeats", type=int, default=3, help="timed transformers runs (default 3)")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers generate")
    p.add_argument("--out", default="out/bench_ceiling.json", help="JSON result file")
    args = p.parse_args(argv)
    for name in ("batch", "max_tokens", "max_step_tokens", "repeats", "baseline_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def projections(stage: Any) -> tuple[list[tuple[Any, int]], tuple[Any, int]]:
    """Every layer projection with its input width, and the LM head with its own."""
    from engine.parallel import ParallelLMHead, ShardedLinear

    layers = [(m, m.weight.shape[1]) for m in stage.layers.modules() if isinstance(m, ShardedLinear)]
    head = next(m for m in stage.head.modules() if isinstance(m, ParallelLMHead))
    return layers, (head, head.table.weight.shape[1])


def time_rows(mods: list[tuple[Any, int]], rows: int, dtype: Any, repeats: int) -> float:
    """Median seconds to run ``rows`` rows through each module of ``mods`` once, in order."""
    import torch

    inputs = [torch.randn(rows, width, dtype=dtype) for _, width in mods]
    with torch.inference_mode():
        for (m, _), x in zip(mods, inputs, strict=True):  # warm-up
            m(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for (m, _), x in zip(mods, inputs, strict=True):
                m(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from engine.model_source import resolve_model
    from engine.stage import StageModel, parse_dtype

    bench = load_bench_serving()
    model_dir = Path(resolve_model(args.model).path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [bench.encode_like_coordinator(tokenizer, bench.PROMPTS[i % len(bench.PROMPTS)])
               for i in range(args.batch)]
    prompt_tokens = sum(len(p) for p in prompts)
    dtype = parse_dtype(args.dtype)

    baseline = None
    if not args.no_baseline:
        ns = SimpleNamespace(baseline_batch=args.batch, max_tokens=args.max_tokens, baseline_dtype=args.dtype,
                             dtype=args.dtype, ignore_eos=True, baseline_repeats=args.baseline_repeats)
        baseline = bench.run_baseline(model_dir, tokenizer, ns)

    stage = StageModel.from_pretrained(model_dir, dtype=dtype)
    layers, head = projections(stage)  # widths first: prepacking frees the plain weights
    stage.optimize_kernels()
    chunks = [args.max_step_tokens] * (prompt_tokens // args.max_step_tokens)
    if prompt_tokens % args.max_step_tokens:
        chunks.append(prompt_tokens % args.max_step_tokens)
    bench.log(f"ceiling: timing {len(layers)} projections: prefill {prompt_tokens} rows in {len(chunks)} chunks, "
              f"{args.max_tokens - 1} decode steps of {args.batch} rows")
    per_chunk = {rows: time_rows(layers, rows, dtype, args.repeats) for rows in set(chunks)}
    prefill_s = sum(per_chunk[rows] for rows in chunks)
    first_head_s = time_rows([head], args.batch, dtype, args.repeats)
    step_s = time_rows([*layers, head], args.batch, dtype, args.repeats)
    floor_s = prefill_s + first_head_s + (args.max_tokens - 1) * step_s
    tokens = args.batch * args.max_tokens
    ceiling = tokens / floor_s
    result: dict[str, Any] = {
        "settings": {**vars(args), "model_dir": str(model_dir)}, "machine": bench.machine_info(),
        "prompt_tokens": prompt_tokens, "prefill_chunks": chunks,
        "prefill_projections_s": prefill_s, "first_head_s": first_head_s, "decode_step_projections_s": step_s,
        "floor_s": floor_s, "ceiling_tokens_per_s": ceiling,
        "baseline": None if baseline is None else {k: v for k, v in baseline.items() if k != "token_ids"},
    }
    print(f"workload: B={args.batch}, {prompt_tokens} prompt tokens, {args.max_tokens} new tokens each "
          f"({args.dtype}, {torch.get_num_threads()} threads)")
    print(f"matrix products only: prefill {prefill_s:.2f} s, decode step {step_s * 1e3:.1f} ms "
          f"x {args.max_tokens - 1}; floor {floor_s:.2f} s -> at most {ceiling:.1f} tokens/s")
    if baseline is not None:
        ratio = ceiling / baseline["tokens_per_s"]
        result["ceiling_ratio_to_baseline"] = ratio
        print(f"transformers generate B={args.batch}: {baseline['tokens_per_s']:.1f} tokens/s "
              f"-> an exact engine can reach at most {ratio:.2f}x here")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    bench.log(f"wrote {out}")
    return 0 if math.isfinite(floor_s) else 1


if __name__ == "__main__":
    sys.exit(main())
