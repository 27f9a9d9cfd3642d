#!/usr/bin/env python
"""Compressed exchange over slow links: time to first token and decode speed, exact against codecs.

Two CPU nodes, each in its own network namespace behind a veth pair (tests/faults/netns.py; needs
root), serve the model as 2 stages; both nodes' links are limited with `tc ... tbf` to each rate of
``--rates``, so the hidden states between the stages cross a link of that bandwidth (twice: up to the
bridge and down again). For each codec of ``--codecs`` (a cluster each, `coordinator start --codec`),
and each rate, it measures:

- TTFT for prompts of each length in ``--prompt-tokens`` (seeded random token ids, `max_tokens` 1,
  median of ``--repeats``), prefilled in chunks of ``--max-step-tokens``;
- decode tokens/s of one request of ``--decode-tokens`` tokens (after its first token).

Decode messages (fewer than ``--codec-min-tokens`` rows) go uncompressed by design, so decode speed
should not change. JSON to ``--out``, a table to stdout.

    sudo .venv/bin/python scripts/bench_links.py
    .venv/bin/python scripts/bench_links.py --rates 100mbit --codecs exact,int8 --prompt-tokens 512
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "proto"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codecs", default="exact,int8:rotate=true,outliers=3,int4:outliers=4")
    p.add_argument("--rates", default="100mbit,1gbit", help="tc rates, comma-separated (default 100mbit,1gbit)")
    p.add_argument("--prompt-tokens", default="512,2048", help="prompt lengths (default 512,2048)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-step-tokens", type=int, default=256)
    p.add_argument("--codec-min-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="serving dtype, also the wire's (default float32: bf16 prefill is several times slower "
                        "on CPUs without AVX-512 BF16)")
    p.add_argument("--out", default="out/bench_links.json")
    args = p.parse_args(argv)
    args.codecs = _split_specs(args.codecs)
    args.rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    args.prompt_tokens = [int(n) for n in args.prompt_tokens.split(",")]
    if not args.codecs or not args.rates or min(args.prompt_tokens) < 1 or args.repeats < 1:
        p.error("need codecs, rates, positive prompt lengths and --repeats >= 1")
    from engine.codecs import make_codec

    for spec in args.codecs:
        try:
            make_codec(spec)
        except ValueError as e:
            p.error(str(e))
    return args


def _split_specs(text: str) -> list[str]:
    """'exact,int8:rotate=true,outliers=3,int4' -> specs: a part with '=' but no ':' continues the last."""
    specs: list[str] = []
    for part in (s.strip() for s in text.split(",")):
        if "=" in part and ":" not in part and specs:
            specs[-1] += "," + part
        elif part:
            specs.append(part)
    return specs


def ttft(client: Any, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    for delta in client.generate_stream(prompt, max_tokens=1, ignore_eos=True):
        if delta.token_ids:
            return time.perf_counter() - t0
    raise RuntimeError("no token came back")


def decode_rate(client: Any, prompt: list[int], n: int) -> float:
    first = last = None
    count = 0
    for delta in client.generate_stream(prompt, max_tokens=n, ignore_eos=True):
        now = time.perf_counter()
        if delta.token_ids:
            first = first or now
            last = now
            count += len(delta.token_ids)
    return (count - 1) / (last - first)


def measure(codec: str, args: argparse.Namespace, model_dir: str, vocab: int, work: Path) -> list[dict[str, Any]]:
    from client.api import TensorfleetClient
    from coordinator.local_cluster import LocalCluster, NodeSpec
    from tests.faults.netns import Fabric

    rng = random.Random(1234)
    prompts = {n: [rng.randrange(vocab) for _ in range(n)] for n in args.prompt_tokens}
    rows = []
    with Fabric(2, prefix=f"tfl{os.getpid() % 1000}", subnet=f"10.79.{os.getpid() % 250}") as fabric:
        nodes = [NodeSpec(devices="cpu", model_dir=model_dir, netns=fabric.netns(i), host=fabric.address(i),
                          taskset=str(i)) for i in range(2)]
        seq = max(args.prompt_tokens) + args.decode_tokens + 8
        cluster = LocalCluster(work / codec.replace(":", "_").replace(",", "_"), model=model_dir, nodes=nodes,
                               host=fabric.host_address, coordinator_args=[
                                   "--stages", "2", "--slots", "2", "--max-seq-len", str(seq), "--dtype", args.dtype,
                                   "--codec", codec, "--codec-min-tokens", str(args.codec_min_tokens),
                                   "--max-step-tokens", str(args.max_step_tokens)])
        with cluster, TensorfleetClient(cluster.address, timeout=600) as client:
            ttft(client, prompts[min(prompts)])  # warm-up
            for rate in args.rates:
                for i in range(2):
                    fabric.limit(i, rate)
                row: dict[str, Any] = {"codec": codec, "rate": rate}
                for n, prompt in prompts.items():
                    times = [ttft(client, prompt) for _ in range(args.repeats)]
                    row[f"ttft_{n}_s"] = statistics.median(times)
                    row[f"ttft_{n}_all_s"] = times
                row["decode_tok_s"] = decode_rate(client, prompts[min(prompts)], args.decode_tokens)
                log(f"{codec} @ {rate}: " + ", ".join(f"TTFT {n} {row[f'ttft_{n}_s']:.2f} s" for n in prompts)
                    + f", decode {row['decode_tok_s']:.1f} tok/s")
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.faults.netns import netns_unavailable

    reason = netns_unavailable()
    if reason:
        print(f"bench_links: network namespaces are needed: {reason}", file=sys.stderr)
        return 2
    from engine.model_source import load_hf_config, resolve_model

    model_dir = str(resolve_model(None).path)
    vocab = int(load_hf_config(model_dir)["vocab_size"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-links-") as tmp:
        for codec in args.codecs:
            rows += measure(codec, args, model_dir, vocab, Path(tmp))
    base = {r["rate"]: r for r in rows if r["codec"] == "exact"}
    header = "| codec | link | " + " | ".join(f"TTFT {n} s (speedup)" for n in args.prompt_tokens) + " | decode tok/s |"
    print(header)
    print("|" + " --- |" * (3 + len(args.prompt_tokens)))
    for r in rows:
        b = base.get(r["rate"])
        cells = [f"{r[f'ttft_{n}_s']:.2f}" + (f" ({b[f'ttft_{n}_s'] / r[f'ttft_{n}_s']:.2f}x)" if b else "")
                 for n in args.prompt_tokens]
        print(f"| {r['codec']} | {r['rate']} | " + " | ".join(cells) + f" | {r['decode_tok_s']:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()}, "rows": rows}, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
