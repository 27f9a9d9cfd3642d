#!/usr/bin/env python
"""Many concurrent streaming clients for a while: no errors, and memory that does not keep growing.

A local cluster (2 CPU nodes, 2 stages, client authentication on) serves ``--clients`` client threads,
each with its own connection, each streaming one generation after another (a random prompt of
``--prompt-tokens`` token ids, ``--max-tokens`` tokens) for ``--duration`` seconds. Every
``--sample-every`` seconds it records the resident memory (RSS) of the coordinator and of each node
with its executors (their process groups). It reports requests, tokens, errors by status code, and
the RSS after the warm-up, at the end, and its growth over the second half of the run (a leak keeps
growing; a warm cache levels off). JSON to ``--out``.

    .venv/bin/python scripts/bench_load.py                   # 128 clients, 60 s, the embedded model
    .venv/bin/python scripts/bench_load.py --clients 8 --duration 5 --model DIR   # quick
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "proto"))

MIB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=128)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load after the warm-up")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the first memory sample")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--out", default="out/bench_load.json")
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.max_tokens < 1 or args.prompt_tokens < 1:
        p.error("--clients, --duration, --max-tokens and --prompt-tokens must be positive, --warmup >= 0")
    return args


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group ``pgid`` (a daemon and the executors it spawned)."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                total += proc.memory_info().rss
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return total


class Load:
    def __init__(self, address: str, args: argparse.Namespace, vocab: int) -> None:
        self.address, self.args, self.vocab = address, args, vocab
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.requests = self.tokens = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.samples: list[dict[str, Any]] = []

    def client(self, index: int) -> None:
        from client.api import ClientError, TensorfleetClient

        rng = random.Random(index)
        with TensorfleetClient(self.address, timeout=120) as client:
            while not self.stop.is_set():
                prompt = [rng.randrange(self.vocab) for _ in range(self.args.prompt_tokens)]
                try:
                    got = 0
                    for delta in client.generate_stream(prompt, max_tokens=self.args.max_tokens, ignore_eos=True):
                        got += len(delta.token_ids)
                    with self.lock:
                        self.requests += 1
                        self.tokens += got
                        if got != self.args.max_tokens:
                            self.errors[f"short ({got} of {self.args.max_tokens} tokens)"] += 1
                except ClientError as e:
                    with self.lock:
                        self.errors[e.code] += 1


def run(args: argparse.Namespace, model_dir: str, work: Path) -> dict[str, Any]:
    from coordinator.local_cluster import LocalCluster, NodeSpec
    from engine.model_source import load_hf_config

    vocab = int(load_hf_config(model_dir)["vocab_size"])
    nodes = [NodeSpec(devices="cpu", model_dir=model_dir) for _ in range(2)]
    seq = args.prompt_tokens + args.max_tokens + 8
    cluster = LocalCluster(work, model=model_dir, nodes=nodes, coordinator_args=[
        "--stages", "2", "--slots", str(args.slots), "--max-seq-len", str(seq)])
    with cluster:
        groups = {"coordinator": cluster.pid("coordinator"), **{f"node{i}": cluster.pid(f"node{i}") for i in range(2)}}
        load = Load(cluster.address, args, vocab)
        threads = [threading.Thread(target=load.client, args=(i,), daemon=True) for i in range(args.clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        log(f"{args.clients} clients streaming; warm-up {args.warmup:g} s, then {args.duration:g} s")
        end = started + args.warmup + args.duration
        next_sample = started + args.warmup
        while True:
            now = time.monotonic()
            if now >= next_sample:
                with load.lock:
                    sample = {"t_s": round(now - started, 1), "requests": load.requests, "tokens": load.tokens,
                              "errors": sum(load.errors.values())}
                sample.update({f"{name}_rss_mib": round(group_rss(pgid) / MIB, 1) for name, pgid in groups.items()})
                load.samples.append(sample)
                log("  " + ", ".join(f"{k} {v}" for k, v in sample.items()))
                next_sample += args.sample_every
            if now >= end:
                break
            time.sleep(min(0.2, max(0.0, min(next_sample, end) - now)))
        load.stop.set()
        for t in threads:
            t.join(150)
        hung = sum(t.is_alive() for t in threads)
        alive = {name: cluster.procs[name].poll() is None for name in groups}
    first, last = load.samples[0], load.samples[-1]
    half = load.samples[len(load.samples) // 2]
    rss = {name: {"after_warmup_mib": first[f"{name}_rss_mib"], "end_mib": last[f"{name}_rss_mib"],
                  "growth_second_half_mib": round(last[f"{name}_rss_mib"] - half[f"{name}_rss_mib"], 1)}
           for name in groups}
    seconds = args.warmup + args.duration
    return {"requests": load.requests, "tokens": load.tokens, "tokens_per_s": round(load.tokens / seconds, 1),
            "errors": dict(load.errors), "clients_hung": hung, "processes_alive": alive, "rss": rss,
            "samples": load.samples}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from engine.model_source import resolve_model

    model_dir = args.model or str(resolve_model(None).path)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        result = run(args, model_dir, Path(tmp))
    import torch

    report = {"settings": vars(args), "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                                  "torch": torch.__version__}, **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{result['requests']} requests, {result['tokens']} tokens ({result['tokens_per_s']} tok/s), "
          f"errors {result['errors'] or 0}, clients hung {result['clients_hung']}")
    print("| process | RSS after warm-up MiB | RSS at end MiB | growth over the second half MiB |")
    print("| --- | --- | --- | --- |")
    for name, r in result["rss"].items():
        print(f"| {name} | {r['after_warmup_mib']} | {r['end_mib']} | {r['growth_second_half_mib']} |")
    log(f"wrote {out}")
    ok = not result["errors"] and not result["clients_hung"] and all(result["processes_alive"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
