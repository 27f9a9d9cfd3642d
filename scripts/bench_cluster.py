#!/usr/bin/env python
"""Decode speed of a local cluster at batch 1 with 1, 2 and 3 nodes (one pipeline stage each), against
the single-process engine, in one run; and the time one pipeline hop adds per step.

Each cluster is real processes on loopback started through the public CLIs (coordinator plus nodes
with --model-dir); the client streams a greedy generation of N tokens with EOS ignored, and the decode
rate is (N - 1) / (time of the last token - time of the first). Hop time = (per-step time with k stages
- per-step time with 1 stage) / (k - 1).

    .venv/bin/python scripts/bench_cluster.py                      # embedded model, 1/2/3 nodes
    .venv/bin/python scripts/bench_cluster.py --nodes 1,2 --new-tokens 128 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper and a storm."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--nodes", default="1,2,3", help="cluster sizes to measure (default 1,2,3)")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="out/bench_cluster.json")
    args = p.parse_args(argv)
    args.nodes = sorted({int(x) for x in args.nodes.split(",")})
    if args.new_tokens < 8 or args.repeats < 1 or min(args.nodes) < 1:
        p.error("--new-tokens must be >= 8, --repeats >= 1, node counts >= 1")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def decode_rate(token_times: list[float]) -> float:
    return (len(token_times) - 1) / (token_times[-1] - token_times[0])


def measure_cluster(model_dir: str, n: int, args: argparse.Namespace) -> list[float]:
    from client.api import TensorfleetClient
    from coordinator.local_cluster import LocalCluster, NodeSpec

    with tempfile.TemporaryDirectory() as work:
        nodes = [NodeSpec(devices="cpu", model_dir=model_dir) for _ in range(n)]
        with LocalCluster(work, model=model_dir, nodes=nodes,
                          coordinator_args=["--stages", str(n), "--slots", "2", "--max-seq-len", "1024"]) as cluster:
            rates = []
            with TensorfleetClient(cluster.address) as client:
                client.generate(PROMPT, max_tokens=8, ignore_eos=True)  # warm-up
                for r in range(args.repeats):
                    times = []
                    for delta in client.generate_stream(PROMPT, max_tokens=args.new_tokens, ignore_eos=True):
                        times.extend([time.perf_counter()] * len(delta.token_ids))
                    rates.append(decode_rate(times))
                    log(f"  {n} node(s), round {r + 1}: {rates[-1]:.1f} tokens/s")
            return rates


def measure_engine(model_dir: str, args: argparse.Namespace) -> list[float]:
    from engine.llm import LLM, EngineConfig
    from engine.sampling import SamplingParams

    llm = LLM(EngineConfig(model=model_dir, num_slots=2, max_seq_len=1024))
    ids = llm.encode(PROMPT, chat=True)
    rates = []
    for r in range(args.repeats + 1):
        times: list[float] = []
        llm.generate([ids], SamplingParams(max_tokens=args.new_tokens, ignore_eos=True),
                     on_token=lambda _i, _t, times=times: times.append(time.perf_counter()))
        if r:  # the first is a warm-up
            rates.append(decode_rate(times))
            log(f"  single process, round {r}: {rates[-1]:.1f} tokens/s")
    return rates


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from engine.model_source import resolve_model

    model_dir = str(resolve_model(args.model).path)
    log("single-process engine")
    results = {"engine": measure_engine(model_dir, args)}
    for n in args.nodes:
        log(f"cluster of {n} node(s)")
        results[f"{n}_nodes"] = measure_cluster(model_dir, n, args)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"decode tokens/s at batch 1, median of {args.repeats} ({args.new_tokens} tokens, greedy, EOS ignored):")
    print(f"  single-process engine: {med['engine']:.1f}")
    base = med.get("1_nodes")
    hops = {}
    for n in args.nodes:
        m = med[f"{n}_nodes"]
        line = f"  {n} node(s): {m:.1f} ({m / med['engine']:.2f}x single process"
        if base and n > 1:
            hops[n] = (1 / m - 1 / base) / (n - 1) * 1000
            line += f", {m / base:.2f}x 1 node; {hops[n]:.2f} ms per hop per step"
        print(line + ")")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"raw": results, "median": med, "hop_ms": hops, "new_tokens": args.new_tokens,
                               "repeats": args.repeats, "prompt": PROMPT}, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
