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
should not change. ``auto`` in ``--codecs`` lets each link choose (node/link.py). JSON to ``--out``, a
table to stdout.

On a GPU, ``--device cuda --shape llama-3.2-1b`` serves a random-init model of that shape in bf16, both
nodes on cuda:0 (compute no longer hides the link; the embedded model's accuracy is measured by
scripts/bench_codecs.py, not here).

    sudo .venv/bin/python scripts/bench_links.py
    sudo python3 scripts/bench_links.py --device cuda --shape llama-3.2-1b --dtype bfloat16
    .venv/bin/python scripts/bench_links.py --rates 100mbit --codecs exact,int8 --prompt-tokens 512
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "proto"))


AUTO_SETTLE_S = 3.0  # an auto link's probes (a few MB) finish before the timed prompts start


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
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where both nodes compute (cuda: both on cuda:0; default cpu, each node pinned to a core)")
    p.add_argument("--shape", default=None, help="serve a random-init model of this shape (tests/engine/"
                   "reference.py SHAPES, e.g. llama-3.2-1b) instead of the embedded model")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="serving dtype, also the wire's (default float32: bf16 prefill is several times slower "
                        "on CPUs without AVX-512 BF16)")
    p.add_argument("--out", default="out/bench_links.json")
    args = p.parse_args(argv)
    from engine.codecs import split_specs

    try:
        args.codecs = split_specs(args.codecs)
    except ValueError as e:
        p.error(str(e))
    args.rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    args.prompt_tokens = [int(n) for n in args.prompt_tokens.split(",")]
    if not args.codecs or not args.rates or min(args.prompt_tokens) < 1 or args.repeats < 1:
        p.error("need codecs, rates, positive prompt lengths and --repeats >= 1")
    from node.link import parse_link_codec

    for spec in args.codecs:
        try:
            parse_link_codec(spec)
        except ValueError as e:
            p.error(str(e))
    return args


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
    rng = random.Random(1234)
    prompts = {n: [rng.randrange(vocab) for _ in range(n)] for n in args.prompt_tokens}
    rows = []
    for rate in args.rates:  # a cluster per rate: an auto link measures its bandwidth when it connects
        rows.append(measure_at(rate, codec, args, model_dir, prompts, work))
    return rows


def measure_at(rate: str, codec: str, args: argparse.Namespace, model_dir: str, prompts: dict[int, list[int]],
               work: Path) -> dict[str, Any]:
    from client.api import TensorfleetClient
    from coordinator.local_cluster import LocalCluster, NodeSpec
    from tests.faults.netns import Fabric

    with Fabric(2, prefix=f"tfl{os.getpid() % 1000}", subnet=f"10.79.{os.getpid() % 250}") as fabric:
        for i in range(2):
            fabric.limit(i, rate)
        on_gpu = args.device == "cuda"
        nodes = [NodeSpec(devices="cuda:0" if on_gpu else "cpu", model_dir=model_dir, netns=fabric.netns(i),
                          host=fabric.address(i), taskset=None if on_gpu else str(i)) for i in range(2)]
        seq = max(args.prompt_tokens) + args.decode_tokens + 8
        name = f"{codec}_{rate}".replace(":", "_").replace(",", "_")
        cluster = LocalCluster(work / name, model=model_dir, nodes=nodes,
                               host=fabric.host_address, coordinator_args=[
                                   "--stages", "2", "--slots", "2", "--max-seq-len", str(seq), "--dtype", args.dtype,
                                   "--codec", codec, "--codec-min-tokens", str(args.codec_min_tokens),
                                   "--max-step-tokens", str(args.max_step_tokens)])
        with cluster, TensorfleetClient(cluster.address, timeout=600) as client:
            ttft(client, prompts[min(prompts)])  # warm-up; an auto link starts measuring itself
            if codec.startswith("auto"):
                time.sleep(AUTO_SETTLE_S)
            row: dict[str, Any] = {"codec": codec, "rate": rate}
            for n, prompt in prompts.items():
                times = [ttft(client, prompt) for _ in range(args.repeats)]
                row[f"ttft_{n}_s"] = statistics.median(times)
                row[f"ttft_{n}_all_s"] = times
            row["decode_tok_s"] = decode_rate(client, prompts[min(prompts)], args.decode_tokens)
            row["link_policy"] = re.findall(r"\[executor\] (.*)", cluster.log("node0") + cluster.log("node1"))
            log(f"{codec} @ {rate}: " + ", ".join(f"TTFT {n} {row[f'ttft_{n}_s']:.2f} s" for n in prompts)
                + f", decode {row['decode_tok_s']:.1f} tok/s" + "".join(f"\n  {x}" for x in row["link_policy"]))
    return row


def machine(device: str) -> dict[str, Any]:
    import platform

    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.faults.netns import netns_unavailable

    reason = netns_unavailable()
    if reason:
        print(f"bench_links: network namespaces are needed: {reason}", file=sys.stderr)
        return 2
    from engine.model_source import load_hf_config, resolve_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-links-") as tmp:
        if args.shape:
            import torch

            from tests.engine.reference import make_shaped_model

            log(f"making a random-init {args.shape} in {args.dtype} ...")
            model_dir = str(make_shaped_model(args.shape, Path(tmp) / "model", dtype=getattr(torch, args.dtype),
                                              device=args.device))
        else:
            model_dir = str(resolve_model(None).path)
        vocab = int(load_hf_config(model_dir)["vocab_size"])
        for codec in args.codecs:
            rows += measure(codec, args, model_dir, vocab, Path(tmp))
            write_json(args, rows)  # so far: a run cut short keeps what it measured
    base = {r["rate"]: r for r in rows if r["codec"] == "exact"}
    header = "| codec | link | " + " | ".join(f"TTFT {n} s (speedup)" for n in args.prompt_tokens) + " | decode tok/s |"
    print(header)
    print("|" + " --- |" * (3 + len(args.prompt_tokens)))
    for r in rows:
        b = base.get(r["rate"])
        cells = [f"{r[f'ttft_{n}_s']:.2f}" + (f" ({b[f'ttft_{n}_s'] / r[f'ttft_{n}_s']:.2f}x)" if b else "")
                 for n in args.prompt_tokens]
        print(f"| {r['codec']} | {r['rate']} | " + " | ".join(cells) + f" | {r['decode_tok_s']:.1f} |")
    log(f"wrote {args.out}")
    return 0


def write_json(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()}, "machine": machine(args.device),
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
