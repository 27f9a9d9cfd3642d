#!/usr/bin/env python
"""Throughput of a 2-stage local cluster with one micro-batch in flight against two, in one run.

Two nodes, each pinned to its own core (taskset), one stage each; C concurrent clients each generate N
greedy tokens (EOS ignored); throughput = all generated tokens / wall time. With one micro-batch in
flight a stage idles while the other computes; with two, both work at once.

    .venv/bin/python scripts/bench_microbatch.py                       # C=16, N=64, micro-batches 1 and 2
    .venv/bin/python scripts/bench_microbatch.py --concurrency 32 --new-tokens 32 --micro-batches 1,2,3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Describe a city at night.", "Explain how rain forms.", "Write a limerick about a cat.",
           "What makes bread rise?", "Give advice to a new runner.", "Summarize a famous myth."]


def measure(model_dir: str, micro_batches: int, args: argparse.Namespace) -> dict:
    from client.api import TensorfleetClient
    from coordinator.local_cluster import LocalCluster, NodeSpec

    cores = sorted(os.sched_getaffinity(0))
    nodes = [NodeSpec(devices="cpu", model_dir=model_dir, taskset=str(cores[i % len(cores)])) for i in range(2)]
    coordinator_args = ["--stages", "2", "--micro-batches", str(micro_batches), "--slots", str(args.concurrency),
                        "--max-seq-len", "512"]
    if args.max_step_tokens:
        coordinator_args += ["--max-step-tokens", str(args.max_step_tokens)]
    with tempfile.TemporaryDirectory() as work, LocalCluster(work, model=model_dir, nodes=nodes,
                                                             coordinator_args=coordinator_args) as cluster:
        with TensorfleetClient(cluster.address) as client:
            client.generate(PROMPTS[0], max_tokens=4)  # warm-up

            def one(i: int) -> int:
                return client.generate(PROMPTS[i % len(PROMPTS)], max_tokens=args.new_tokens,
                                       ignore_eos=True).completion_tokens

            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                tokens = sum(pool.map(one, range(args.concurrency)))
            seconds = time.perf_counter() - started
    return {"micro_batches": micro_batches, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--micro-batches", default="1,2",
                   help="comma-separated steps-in-flight settings; each is compared with the first (default 1,2)")
    p.add_argument("--max-step-tokens", type=int, default=None, help="coordinator --max-step-tokens")
    p.add_argument("--out", default="out/bench_microbatch.json")
    args = p.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from engine.model_source import resolve_model

    model_dir = str(resolve_model(args.model).path)
    try:
        settings = [int(x) for x in args.micro_batches.split(",")]
    except ValueError:
        settings = []
    if not settings or min(settings) < 1:
        p.error(f"--micro-batches {args.micro_batches!r} must be comma-separated integers >= 1")
    results = []
    for mb in settings:
        print(f"micro-batches in flight: {mb} ...", file=sys.stderr, flush=True)
        results.append(measure(model_dir, mb, args))
        r = results[-1]
        print(f"  {r['tokens']} tokens in {r['seconds']:.1f} s: {r['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    base = results[0]["tokens_per_s"]
    print(f"2 stages (one core each), {args.concurrency} concurrent requests x {args.new_tokens} tokens:")
    for r in results:
        r["ratio"] = r["tokens_per_s"] / base
        print(f"  {r['micro_batches']} micro-batch(es) in flight: {r['tokens_per_s']:.1f} tokens/s, {r['ratio']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "concurrency": args.concurrency, "new_tokens": args.new_tokens,
                               "max_step_tokens": args.max_step_tokens}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
