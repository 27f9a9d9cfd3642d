#!/usr/bin/env python
"""Serving load on a tensorfleet cluster: a closed-loop concurrency sweep and an open-loop Poisson run,
against Hugging Face transformers ``generate`` on the same prompts, in one run.

Workload: 16 fixed English prompts of different lengths, cycled; greedy; ``--max-tokens`` new tokens
each. ``--ignore-eos`` (the default) makes every request generate exactly that many tokens, so the
throughputs compare equal amounts of work; ``--no-ignore-eos`` lets requests stop at EOS. The prompts
go to the cluster as text (the coordinator applies the model's chat template); the baseline tokenizes
them the same way.

1. Closed loop, for each level C of ``--concurrency``: C client threads each send requests back to back
   until ``--requests-per-level`` (default 2*C, at least C) are done. Per request: time to first token
   (TTFT, the first delta with tokens), time per output token (TPOT = (e2e - TTFT) / (n - 1)), end-to-end
   latency, token count and the longest gap between tokens. Per level: p50/p90/p99 of each, output
   tokens/s (all tokens / wall time of the level) and requests/s.
2. Open loop: Poisson arrivals at ``--rate`` req/s (default ``--load-fraction`` of the closed loop's peak
   requests/s) for ``--duration`` seconds, each request on its own thread with a unique request id. The
   same metrics, the achieved rate, and integrity checks (also applied to the closed loop): every request
   gets exactly one final delta with a finish reason (else it is ``lost``; more than one or deltas after
   it: ``duplicated``), no delta carries another request's id (``misrouted``), with EOS ignored every
   request has exactly max-tokens tokens (``wrong_length``), and no call fails (``errors``). After the
   run the coordinator must report no request still running or waiting (``leaked``).
3. Baseline: transformers ``generate`` at batch B (``--baseline-batch``, default the largest concurrency
   level) in the same dtype, greedy, left padding; tokens/s = generated tokens / wall time (after a
   warm-up; median of ``--baseline-repeats``). It runs before the local cluster starts, so the two never
   share the CPU. Reported: (cluster tokens/s at concurrency B) / (transformers tokens/s).

Target: a local cluster started here (``--nodes``, ``--stages``, ``--micro-batches``, ``--slots``,
``--max-seq-len``, ``--pin``) or a running coordinator (``--address``; the baseline then runs while it
is up, and ``--model`` should name the model it serves). A table goes to stdout, progress to stderr,
every raw per-request record and the summaries to ``--out`` (JSON), and three PNG plots to
``--plots-dir``. Exit code 1 when an integrity check fails, 2 for bad arguments.

    .venv/bin/python scripts/bench_serving.py                         # 1 node, C=1,8,32, 60 s open loop
    .venv/bin/python scripts/bench_serving.py --duration 300          # the 5-minute soak
    .venv/bin/python scripts/bench_serving.py --nodes 2 --pin --concurrency 1,4,16 --rate 3
    .venv/bin/python scripts/bench_serving.py --address 10.0.0.5:50051 --no-baseline
    .venv/bin/python scripts/bench_serving.py --quick                 # seconds: for tests
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16")
QUICK = {"concurrency": "1,2", "max_tokens": 8, "duration": 5.0, "baseline_repeats": 1}
DEFAULTS = {"concurrency": "1,8,32", "max_tokens": 64, "duration": 60.0, "baseline_repeats": 3}
CLUSTER_FLAGS = ("nodes", "stages", "micro_batches", "slots", "max_seq_len")
PERCENTILES = (50, 90, 99)
PROMPTS = (
    "What is the capital of Italy?",
    "Write a haiku about autumn leaves.",
    "Explain in a few sentences why the sky looks blue during the day and red at sunset.",
    "List five fruits that are rich in vitamin C.",
    "A farmer has a field shaped like a rectangle, 120 meters long and 45 meters wide. He wants to plant "
    "apple trees in rows, leaving a path of two meters around the edge. How would you plan the rows?",
    "Translate 'good morning, how are you?' into French.",
    "Describe how a bicycle stays upright while it moves.",
    "I am planning a weekend trip to the mountains in early autumn. The weather can change quickly and I "
    "will be hiking for about six hours each day. What should I pack, and what should I leave at home?",
    "Give me three tips for writing clear emails.",
    "What does a compiler do?",
    "Summarize the story of a detective who solves a mystery in a small fishing village, in the style "
    "of a newspaper report. Keep it short and mention the weather.",
    "Why do cats purr?",
    "Suggest a name and a slogan for a bakery that only sells bread made from local grain.",
    "Compare trains and airplanes for a trip of about 500 kilometers: think about cost, time, comfort "
    "and the environment, then recommend one.",
    "How many legs does a spider have?",
    "Write the opening paragraph of a science fiction story set on a space station orbiting Jupiter, "
    "where the crew has just received a message from Earth after ten years of silence.",
)


class BenchError(Exception):
    """A bad argument or an unusable target; main() prints it on one line and returns 2."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--address", default=None, help="HOST:PORT of a running coordinator (default: start one here)")
    p.add_argument("--nodes", type=int, default=None, help="local cluster: CPU nodes (default 1)")
    p.add_argument("--stages", type=int, default=None, help="local cluster: pipeline stages (default: --nodes)")
    p.add_argument("--micro-batches", type=int, default=None, help="local cluster: steps in flight (default: "
                   "the coordinator's, one per stage)")
    p.add_argument("--slots", type=int, default=None, help="local cluster: KV slots (default: max concurrency)")
    p.add_argument("--max-seq-len", type=int, default=None, help="local cluster: longest sequence (default 512)")
    p.add_argument("--pin", action="store_true", help="local cluster: taskset node i to core i")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="cluster and baseline dtype (default float32)")
    p.add_argument("--baseline-dtype", default=None, choices=DTYPES,
                   help="run the transformers baseline in another dtype than the cluster (default: --dtype)")
    p.add_argument("--concurrency", default=None, help="closed-loop levels (default 1,8,32)")
    p.add_argument("--requests-per-level", type=int, default=None, help="requests per level (default 2*C, >= C)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 64)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --max-tokens tokens per request (default on: equal work everywhere)")
    p.add_argument("--rate", type=float, default=None, help="open-loop arrivals per second (default: "
                   "--load-fraction of the closed loop's peak requests/s)")
    p.add_argument("--load-fraction", type=float, default=0.8, help="see --rate (default 0.8)")
    p.add_argument("--duration", type=float, default=None, help="open-loop seconds of arrivals (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times and of each request (default 0)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.add_argument("--baseline-batch", type=int, default=None, help="transformers batch (default: max concurrency)")
    p.add_argument("--baseline-repeats", type=int, default=None, help="timed baseline runs, median (default 3)")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    p.add_argument("--out", default="out/bench_serving.json", help="JSON result file (folder is created)")
    p.add_argument("--plots-dir", default="out", help="folder for the PNG plots (default out/)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument("--quick", action="store_true", help="tiny settings for tests: concurrency 1,2, max-tokens 8, "
                   "duration 5 s, baseline batch 2, 1 baseline repeat (explicit flags win)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrency = parse_levels(args.concurrency)
    validate(args)
    return args


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--concurrency={text!r} must be comma-separated integers, e.g. 1,8,32") from None
    if not levels:
        raise BenchError("--concurrency is empty")
    if min(levels) < 1:
        raise BenchError(f"--concurrency level {min(levels)} must be >= 1")
    return sorted(set(levels))


def validate(args: argparse.Namespace) -> None:
    checks = [(args.max_tokens >= 1, f"--max-tokens={args.max_tokens} must be >= 1"),
              (args.rate is None or args.rate > 0, f"--rate={args.rate} must be > 0"),
              (args.duration > 0, f"--duration={args.duration} must be > 0"),
              (0 < args.load_fraction <= 1, f"--load-fraction={args.load_fraction} must be in (0, 1]"),
              (args.request_timeout > 0, f"--request-timeout={args.request_timeout} must be > 0"),
              (args.requests_per_level is None or args.requests_per_level >= 1,
               f"--requests-per-level={args.requests_per_level} must be >= 1"),
              (args.baseline_repeats >= 1, f"--baseline-repeats={args.baseline_repeats} must be >= 1")]
    for flag in ("nodes", "stages", "micro_batches", "slots", "max_seq_len", "baseline_batch"):
        value = getattr(args, flag)
        checks.append((value is None or value >= 1, f"--{flag.replace('_', '-')}={value} must be >= 1"))
    for ok, message in checks:
        if not ok:
            raise BenchError(message)
    if args.address:
        given = [f"--{f.replace('_', '-')}" for f in CLUSTER_FLAGS if getattr(args, f) is not None]
        if given or args.pin:
            raise BenchError(f"{', '.join(given + ['--pin'] * args.pin)} shape a local cluster: not with --address")
    args.baseline_batch = args.baseline_batch or max(args.concurrency)
    if not args.no_baseline and args.baseline_batch not in args.concurrency:
        raise BenchError(f"--baseline-batch={args.baseline_batch} must be one of the --concurrency levels "
                         f"{args.concurrency} (the ratio compares equal concurrency)")
    args.nodes = args.nodes or 1
    args.stages = args.stages or args.nodes
    args.slots = args.slots or max(args.concurrency)
    args.max_seq_len = args.max_seq_len or 512
    if args.rate is not None and args.rate * args.duration < 1:
        raise BenchError(f"--rate={args.rate} x --duration={args.duration} expects no arrival: raise either")


# ------------------------------------------------------------------------------------------ statistics
def percentile(values: list[float | None], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None values are left out."""
    if not 0 <= q <= 100:
        raise ValueError(f"q={q} is outside 0..100")
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def distribution(values: list[float | None]) -> dict[str, float | None]:
    xs = [v for v in values if v is not None]
    out: dict[str, float | None] = {f"p{q}": percentile(xs, q) for q in PERCENTILES}
    out.update(mean=statistics.fmean(xs) if xs else None, max=max(xs) if xs else None, n=len(xs))
    return out


def summarize(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Per-phase (or per-level) numbers: latency percentiles of the requests that completed without error,
    and rates over the phase's wall time."""
    ok = [r for r in records if r["done"] and r["error"] is None]
    tokens = sum(r["tokens"] for r in records)
    return {"requests": len(records), "completed": len(ok), "wall_s": wall_s, "output_tokens": tokens,
            "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
            "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
            **{key: distribution([r[key] for r in ok]) for key in ("ttft_s", "tpot_s", "e2e_s", "max_gap_s")}}


def integrity(records: list[dict[str, Any]], max_tokens: int, ignore_eos: bool) -> dict[str, Any]:
    lost = [r for r in records if not r["done"] or (r["error"] is None and r["finals"] == 0)
            or (r["error"] or "").find("without a finish reason") >= 0]
    errors = [r for r in records if r["done"] and r["error"] and r not in lost]
    counts = {"sent": len(records), "lost": len(lost), "errors": len(errors),
              "duplicated": sum(1 for r in records if r["finals"] > 1 or r["after_final"] > 0),
              "misrouted": sum(1 for r in records if r["foreign"] > 0),
              "wrong_length": sum(1 for r in records if ignore_eos and r["done"] and r["error"] is None
                                  and r["tokens"] != max_tokens)}
    counts["ok"] = not any(counts[k] for k in ("lost", "errors", "duplicated", "misrouted", "wrong_length"))
    counts["error_messages"] = sorted({r["error"] for r in errors + lost if r["error"]})[:10]
    return counts


# ------------------------------------------------------------------------------------------- requests
def new_record(request_id: str, index: int) -> dict[str, Any]:
    return {"request_id": request_id, "prompt_index": index % len(PROMPTS), "sent_s": None, "ttft_s": None,
            "tpot_s": None, "e2e_s": None, "tokens": 0, "finish_reason": None, "finals": 0, "after_final": 0,
            "foreign": 0, "max_gap_s": None, "max_gap_at_s": None, "error": None, "done": False, "token_ids": []}


def run_request(client: Any, rec: dict[str, Any], args: argparse.Namespace, t0: float) -> None:
    """Streams one request and fills ``rec`` (times are seconds; ``sent_s`` is relative to ``t0``)."""
    start = last = time.perf_counter()
    rec["sent_s"] = start - t0
    try:
        for delta in client.generate_stream(PROMPTS[rec["prompt_index"]], max_tokens=args.max_tokens,
                                            temperature=0.0, ignore_eos=args.ignore_eos,
                                            request_id=rec["request_id"], seed=args.seed):
            now = time.perf_counter()
            rec["foreign"] += delta.request_id != rec["request_id"]
            rec["after_final"] += rec["finals"] > 0
            if delta.token_ids:
                if rec["ttft_s"] is None:
                    rec["ttft_s"] = now - start
                elif now - last > (rec["max_gap_s"] or 0.0):  # the longest stall, and when it ended
                    rec["max_gap_s"], rec["max_gap_at_s"] = now - last, now - t0
                last = now
                rec["token_ids"].extend(delta.token_ids)
            if delta.finish_reason is not None:
                rec["finals"] += 1
                rec["finish_reason"] = delta.finish_reason
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported, none ends the run
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["e2e_s"] = time.perf_counter() - start
    rec["tokens"] = len(rec["token_ids"])
    if rec["ttft_s"] is not None and rec["tokens"] > 1:
        rec["tpot_s"] = (rec["e2e_s"] - rec["ttft_s"]) / (rec["tokens"] - 1)
    rec["done"] = True


def closed_loop(client: Any, level: int, args: argparse.Namespace, tag: str) -> tuple[list[dict], float]:
    total = max(args.requests_per_level or 2 * level, level)
    records = [new_record(f"{tag}-c{level}-{i}", i) for i in range(total)]
    next_index = iter(range(total))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            run_request(client, records[i], args, t0)

    threads = [threading.Thread(target=worker, name=f"client-{k}", daemon=True) for k in range(level)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def arrival_times(rate: float, duration: float, seed: int) -> list[float]:
    """Poisson arrivals: exponential gaps of mean 1/rate from a seeded RNG, up to ``duration`` seconds."""
    rng, times = random.Random(seed), []
    t = rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def open_loop(client: Any, rate: float, args: argparse.Namespace, tag: str) -> tuple[list[dict], dict[str, Any]]:
    arrivals = arrival_times(rate, args.duration, args.seed)
    records = [new_record(f"{tag}-o{i}", i) for i in range(len(arrivals))]
    threads, lag, outstanding, peak = [], 0.0, [0], [0]
    lock = threading.Lock()

    def one(rec: dict[str, Any]) -> None:
        with lock:
            outstanding[0] += 1
            peak[0] = max(peak[0], outstanding[0])
        try:
            run_request(client, rec, args, t0)
        finally:
            with lock:
                outstanding[0] -= 1

    t0, t0_unix = time.perf_counter(), time.time()
    for i, (at, rec) in enumerate(zip(arrivals, records, strict=True)):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        lag = max(lag, time.perf_counter() - t0 - at)
        threads.append(threading.Thread(target=one, args=(rec,), name=f"open-{i}", daemon=True))
        threads[-1].start()
    sent_s = time.perf_counter() - t0
    deadline = time.monotonic() + args.request_timeout + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    wall = time.perf_counter() - t0
    info = {"offered_rate": rate, "arrivals": len(arrivals), "achieved_rate": len(arrivals) / args.duration,
            "dispatch_s": sent_s, "max_dispatch_lag_s": lag, "peak_outstanding": peak[0], "wall_s": wall,
            "started_unix": t0_unix}
    return records, info


# ------------------------------------------------------------------------------------------- baseline
def encode_like_coordinator(tokenizer: Any, text: str) -> list[int]:
    """Token ids the coordinator makes of a text prompt (coordinator/server.py: the chat template if any)."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return list(tokenizer.encode(text))


def run_baseline(model_dir: Path, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    b, n = args.baseline_batch, args.max_tokens
    prompts = [encode_like_coordinator(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(b)]
    dtype = args.baseline_dtype or args.dtype
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)  # [b, width], left pad
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)

    def generate(model: Any, tokens: int) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens,
                              min_new_tokens=tokens if args.ignore_eos else None, pad_token_id=pad)
        return time.perf_counter() - t0, out[:, width:].tolist()

    log(f"baseline: transformers generate B={b}, warm-up")
    generate(hf, min(n, 8))
    walls, rows = [], []
    for k in range(args.baseline_repeats):
        wall, rows = generate(hf, n)
        walls.append(wall)
        log(f"baseline: run {k + 1}/{args.baseline_repeats}: {wall:.2f} s")
    generated = [row if args.ignore_eos else row[:row.index(eos) + 1] if eos in row else row for row in rows]
    tokens = sum(len(r) for r in generated)
    result = {"batch": b, "max_tokens": n, "dtype": dtype, "walls_s": walls, "wall_s": statistics.median(walls),
              "tokens": tokens,
              "threads": torch.get_num_threads(), "prompt_tokens": [len(p) for p in prompts], "eos_token_id": eos,
              "token_ids": generated[:len(PROMPTS)]}
    result["tokens_per_s"] = tokens / result["wall_s"]
    del hf  # the cluster needs the memory next
    gc.collect()
    return result


def agreement(records: list[dict[str, Any]], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Greedy outputs: how many prompts got more than one distinct output from the cluster (batched float
    math may part at near-ties), and how many of the cluster's first outputs equal the baseline's up to
    the cluster's first EOS (past it the two differ by design: transformers' min_new_tokens masks EOS,
    while the cluster with ignore_eos generates EOS and goes on)."""
    done = [r for r in records if r["done"] and r["error"] is None]
    outputs: dict[int, set[tuple[int, ...]]] = {}
    first: dict[int, list[int]] = {}
    for r in done:
        outputs.setdefault(r["prompt_index"], set()).add(tuple(r["token_ids"]))
        first.setdefault(r["prompt_index"], r["token_ids"])
    result: dict[str, Any] = {"prompts_with_several_outputs": sum(1 for s in outputs.values() if len(s) > 1)}
    if baseline:
        eos = baseline["eos_token_id"]
        pairs = [(first[i], row) for i, row in enumerate(baseline["token_ids"]) if i in first]
        cut = [a.index(eos) if eos in a else len(a) for a, _ in pairs]
        result.update(baseline_identical=sum(1 for (a, b), k in zip(pairs, cut, strict=True) if a[:k] == b[:k]),
                      baseline_compared=len(pairs))
    return result


# ------------------------------------------------------------------------------------------- target
@contextlib.contextmanager
def target(args: argparse.Namespace, model_dir: Path) -> Iterator[Any]:
    """Yields the local cluster (``.address``, ``.log(name)``), or None with ``--address``."""
    if args.address:
        yield None
        return
    from coordinator.local_cluster import LocalCluster, NodeSpec

    cores = sorted(os.sched_getaffinity(0))
    nodes = [NodeSpec(devices="cpu", model_dir=str(model_dir), taskset=str(cores[i % len(cores)]) if args.pin else None)
             for i in range(args.nodes)]
    cargs = ["--stages", str(args.stages), "--slots", str(args.slots), "--max-seq-len", str(args.max_seq_len),
             "--dtype", args.dtype]
    if args.micro_batches:
        cargs += ["--micro-batches", str(args.micro_batches)]
    log(f"starting a local cluster: {args.nodes} node(s), coordinator {' '.join(cargs)}")
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as work:
        with LocalCluster(work, model=str(model_dir), nodes=nodes, coordinator_args=cargs) as cluster:
            yield cluster


def check_reachable(address: str) -> None:
    from client.api import ClientError, TensorfleetClient

    try:
        with TensorfleetClient(address, timeout=10) as client:
            status = client.status()
    except (ClientError, ValueError) as e:
        raise BenchError(f"--address {address}: {e}") from None
    if not status.stages:
        raise BenchError(f"--address {address}: the coordinator has no placement yet (are its nodes up?)")


def wait_idle(client: Any, timeout_s: float = 10.0) -> dict[str, int]:
    """The coordinator's running/waiting counts once they reach 0 (or what they are after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.status(timeout=10)
        counts = {"running": status.requests_running, "waiting": status.requests_waiting}
        if not any(counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((x.split(":", 1)[1].strip() for x in lines if x.lower().startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "transformers": transformers.__version__, "loadavg": list(os.getloadavg())}


# ---------------------------------------------------------------------------------------------- run
def measure(address: str, args: argparse.Namespace) -> dict[str, Any]:
    from client.api import ClientError, TensorfleetClient, status_to_dict

    tag = f"bench-{uuid.uuid4().hex[:8]}"
    result: dict[str, Any] = {"closed_loop": [], "records": {"closed": [], "open": []}}
    with TensorfleetClient(address, timeout=args.request_timeout) as client:
        try:  # the longest prompt at full length: a target that cannot serve the workload fails here, clearly
            client.generate(max(PROMPTS, key=len), max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                            request_id=f"{tag}-warmup")
        except ClientError as e:
            raise BenchError(f"the warm-up request to {address} failed: {e}") from None
        for level in args.concurrency:
            records, wall = closed_loop(client, level, args, tag)
            s = {"concurrency": level, **summarize(records, wall)}
            result["closed_loop"].append(s)
            result["records"]["closed"] += [{**r, "level": level} for r in records]
            if not s["completed"]:
                raise BenchError(f"every request at concurrency {level} failed: {records[0]['error']}")
            log(f"closed loop C={level}: {s['requests']} requests in {wall:.1f} s, {s['tokens_per_s']:.1f} tok/s, "
                f"{s['requests_per_s']:.2f} req/s")
        peak = max(s["requests_per_s"] or 0.0 for s in result["closed_loop"])
        rate = args.rate or args.load_fraction * peak
        if rate * args.duration < 1:
            raise BenchError(f"open-loop rate {rate:.3g} req/s x {args.duration} s expects no arrival")
        log(f"open loop: Poisson {rate:.2f} req/s for {args.duration:.0f} s")
        records, info = open_loop(client, rate, args, tag)
        result["open_loop"] = {**info, "rate_source": "--rate" if args.rate else
                               f"{args.load_fraction} x closed-loop peak {peak:.3f} req/s",
                               **summarize(records, info["wall_s"])}
        result["records"]["open"] = records
        result["idle_after"] = wait_idle(client)
        result["status"] = status_to_dict(client.status(timeout=10))
    return result


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from engine.model_source import resolve_model

    if args.address:
        check_reachable(args.address)
    model_dir = Path(resolve_model(args.model).path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_tokens = [len(encode_like_coordinator(tokenizer, p)) for p in PROMPTS]
    if not args.address and max(prompt_tokens) + args.max_tokens > args.max_seq_len:
        raise BenchError(f"the longest prompt ({max(prompt_tokens)} tokens) + --max-tokens={args.max_tokens} "
                         f"exceeds --max-seq-len={args.max_seq_len}")
    load_start = list(os.getloadavg())
    baseline = None if args.no_baseline else run_baseline(model_dir, tokenizer, args)
    with target(args, model_dir) as cluster:
        measured = measure(args.address or cluster.address, args)
        if cluster is not None:
            measured["logs_tail"] = {name: cluster.log(name).splitlines()[-30:] for name in cluster.procs}
    settings = {**vars(args), "model_dir": str(model_dir), "prompts": list(PROMPTS), "prompt_tokens": prompt_tokens,
                "target": "address" if args.address else "local"}
    result = build_result(settings, {**machine_info(), "loadavg_start": load_start}, baseline, measured)
    print_report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out}")
    if not args.no_plots:
        for path in plot(result, Path(args.plots_dir), out.stem):
            log(f"wrote {path}")
    if not result["integrity"]["ok"]:
        log("bench_serving: integrity check FAILED (see 'integrity' in the JSON)")
        return 1
    return 0


def build_result(settings: dict[str, Any], machine: dict[str, Any], baseline: dict[str, Any] | None,
                 measured: dict[str, Any]) -> dict[str, Any]:
    closed, opened = measured["records"]["closed"], measured["records"]["open"]
    n, ignore_eos = settings["max_tokens"], settings["ignore_eos"]
    checks = {"closed": integrity(closed, n, ignore_eos), "open": integrity(opened, n, ignore_eos),
              "idle_after": measured["idle_after"]}
    checks["ok"] = checks["closed"]["ok"] and checks["open"]["ok"] and not any(measured["idle_after"].values())
    ratio = None
    if baseline:
        at_b = next(s for s in measured["closed_loop"] if s["concurrency"] == baseline["batch"])
        ratio = at_b["tokens_per_s"] / baseline["tokens_per_s"]
    return {"settings": settings, "machine": machine, "closed_loop": measured["closed_loop"],
            "open_loop": measured["open_loop"], "baseline": baseline, "ratio_cluster_over_transformers": ratio,
            "integrity": checks, "agreement": agreement(closed + opened, baseline), "status": measured["status"],
            "logs_tail": measured.get("logs_tail"), "records": measured["records"]}


# ------------------------------------------------------------------------------------------- report
def _ms(x: float | None) -> str:
    return "    n/a" if x is None else f"{x * 1000:7.1f}"


def _triple(d: dict[str, Any], scale_ms: bool = True) -> str:
    if scale_ms:
        return " ".join(_ms(d[f"p{q}"]) for q in PERCENTILES)
    return " ".join("  n/a" if d[f"p{q}"] is None else f"{d[f'p{q}']:5.2f}" for q in PERCENTILES)


def print_report(result: dict[str, Any]) -> None:
    s, m = result["settings"], result["machine"]
    eos = "EOS ignored" if s["ignore_eos"] else "stops at EOS"
    print(f"machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}, {m['platform']}")
    where = s["address"] or (f"local cluster: {s['nodes']} node(s), {s['stages']} stage(s), {s['slots']} slots"
                             + (", pinned" if s["pin"] else ""))
    print(f"target:  {where}; {s['dtype']}; {s['max_tokens']} tokens per request, greedy, {eos}")
    print()
    print(f"{'conc':>4} {'reqs':>5} {'tok/s':>8} {'req/s':>6} | {'TTFT ms p50     p90     p99':>23} | "
          f"{'TPOT ms p50     p90     p99':>23} | {'e2e s p50   p90   p99':>17} | {'max gap ms':>10}")
    for row in result["closed_loop"]:
        print(_row(str(row["concurrency"]), row))
    o = result["open_loop"]
    print(_row("open", o))
    print(f"open loop: Poisson {o['offered_rate']:.2f} req/s offered ({o['rate_source']}), {o['arrivals']} sent in "
          f"{s['duration']:.0f} s = {o['achieved_rate']:.2f} req/s achieved; peak outstanding {o['peak_outstanding']},"
          f" max dispatch lag {o['max_dispatch_lag_s'] * 1000:.0f} ms")
    for phase in ("closed", "open"):
        c = result["integrity"][phase]
        print(f"integrity ({phase}): sent {c['sent']}, lost {c['lost']}, duplicated {c['duplicated']}, misrouted "
              f"{c['misrouted']}, wrong length {c['wrong_length']}, errors {c['errors']}: "
              f"{'OK' if c['ok'] else 'FAILED ' + '; '.join(c['error_messages'])}")
    idle = result["integrity"]["idle_after"]
    print(f"after the run the coordinator reports {idle['running']} running, {idle['waiting']} waiting")
    b = result["baseline"]
    if b:
        print(f"baseline: transformers generate B={b['batch']} {b.get('dtype', s['dtype'])}: "
              f"{b['tokens_per_s']:.1f} tok/s (median of "
              f"{len(b['walls_s'])}, {b['threads']} threads)")
        print(f"ratio: cluster tok/s at concurrency {b['batch']} / transformers = "
              f"{result['ratio_cluster_over_transformers']:.2f}x")
    load = m["loadavg_start"][0]
    if load > 0.5 * m["usable_cores"]:
        print(f"WARNING: the load average was {load:.2f} before the run started: other processes compete for "
              "the CPU, so these numbers are noisy; rerun on a quiet machine")
    a = result["agreement"]
    if "baseline_compared" in a:
        print(f"greedy outputs (up to EOS) equal to transformers for {a['baseline_identical']}/"
              f"{a['baseline_compared']} prompts; "
              f"{a['prompts_with_several_outputs']} prompt(s) got more than one distinct output from the cluster")


def _row(label: str, row: dict[str, Any]) -> str:
    rps = "   n/a" if row["requests_per_s"] is None else f"{row['requests_per_s']:6.2f}"
    return (f"{label:>4} {row['requests']:>5} {row['tokens_per_s'] or 0:8.1f} {rps} | {_triple(row['ttft_s'])} | "
            f"{_triple(row['tpot_s'])} | {_triple(row['e2e_s'], scale_ms=False)} | {_ms(row['max_gap_s']['max']):>10}")


def plot(result: dict[str, Any], folder: Path, stem: str) -> list[Path]:
    """Three PNGs: closed-loop throughput, closed-loop latency percentiles, open-loop latency CDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in (("throughput", _plot_throughput), ("latency", _plot_latency), ("open_loop", _plot_open)):
        fig = draw(plt, result)
        fig.tight_layout()
        paths.append(folder / f"{stem}_{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _levels_axis(ax: Any, levels: list[int]) -> None:
    ax.set(xlabel="concurrent clients", xscale="log")
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()


def _plot_throughput(plt: Any, result: dict[str, Any]) -> Any:
    rows, b = result["closed_loop"], result["baseline"]
    levels = [r["concurrency"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(levels, [r["tokens_per_s"] for r in rows], "o-", label="cluster output tokens/s")
    if b:
        ax.axhline(b["tokens_per_s"], color="gray", ls="--", label=f"transformers generate B={b['batch']} tokens/s")
    ax.set(ylabel="output tokens/s", title="closed loop: throughput")
    _levels_axis(ax, levels)
    right = ax.twinx()
    right.plot(levels, [r["requests_per_s"] for r in rows], "s:", color="tab:orange", label="cluster requests/s")
    right.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    return fig


def _plot_latency(plt: Any, result: dict[str, Any]) -> Any:
    rows = result["closed_loop"]
    levels = [r["concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, name in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("time to first token", "time per output token",
                                                                     "end-to-end latency"), strict=True):
        for q, style in ((50, "o-"), (99, "s--")):
            ax.plot(levels, [(r[key][f"p{q}"] or 0) * 1000 for r in rows], style, label=f"p{q}")
        ax.set(ylabel="ms", title=f"closed loop: {name}")
        _levels_axis(ax, levels)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    return fig


def _plot_open(plt: Any, result: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    opened = [r for r in result["records"]["open"] if r["done"] and r["error"] is None]
    for key, name in (("ttft_s", "time to first token"), ("e2e_s", "end-to-end latency")):
        xs = sorted(r[key] for r in opened if r[key] is not None)
        ax.step([0.0, *xs], [i / max(len(xs), 1) for i in range(len(xs) + 1)], where="post", label=name)
    o = result["open_loop"]
    ax.set(xlabel="seconds", ylabel="fraction of requests", ylim=(0, 1.02),
           title=f"open loop: Poisson {o['offered_rate']:.2f} req/s, {o['arrivals']} requests (CDF)")
    ax.legend()
    return fig


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        args = parse_args(argv)
        if not args.no_plots:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise BenchError("matplotlib is not installed: pip install matplotlib, or pass --no-plots") from None
        return run(args)
    except BenchError as e:
        print(f"bench_serving: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
