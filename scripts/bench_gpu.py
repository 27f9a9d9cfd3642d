#!/usr/bin/env python
"""GPU speed in one run on one GPU: copy bandwidth and the roofline, transformers, the engine, the cluster.

For each model shape of ``--shapes`` (random-init Llamas of published shapes, tests/engine/reference.py
SHAPES, in ``--dtype``), each system of ``--systems`` is loaded, measured at each batch size of
``--batch-sizes``, and freed before the next one:

- ``copy``: device-to-device copy of a ``--copy-mib`` buffer, best of several; bandwidth = 2 * bytes / t
  (read and written). Per shape, roofline step time = weight bytes / bandwidth, the bytes of every
  parameter in the serving dtype, as if a decode step read each once. The KV cache and activations are
  left out; an untied input embedding, of which a step reads only B rows, is counted (its bytes are in
  the JSON as ``untied_embedding_bytes``, to subtract).
- ``hf``: transformers ``AutoModelForCausalLM.generate`` (greedy, KV cache, EOS ignored through
  ``min_new_tokens``) on the same weights;
- ``engine``: engine/llm.py ``LLM.generate`` in this process;
- ``cluster1``: coordinator/local_cluster.py, one node on the device; ``cluster2``: two nodes both on
  the same device, two pipeline stages. B concurrent streaming clients (threads), one prompt each.
- baselines, only when named in ``--systems``: ``engine_plain`` (no fused kernels, no pipelined decode),
  ``cluster1_nolookahead`` and ``cluster2_nolookahead`` (``coordinator start --no-lookahead``),
  ``cluster2_noshm`` (``node join --no-shared-memory``: steps between the stages as bytes over gRPC); and any
  ``clusterN_lookaheadK`` (``--lookahead K``, N of 1 or 2).

Every system gets the same prompts (seeded random token ids, ``--prompt-tokens`` long) and is timed the
same way: t_N, a generation of N = ``--tokens`` new tokens, and t_1, of one new token (prefill), best of
``--repeats`` after a warm-up; then ms per decode step = (t_N - t_1) / (N - 1) and tokens/s = B * 1000 /
ms. The clusters also report time to first token per client. JSON to ``--out`` after every measurement
(a run cut short keeps what it measured), a table to stdout at the end, progress to stderr.

    python scripts/bench_gpu.py                                    # both shapes, B=1,32, every system
    python scripts/bench_gpu.py --shapes llama-3.2-1b --systems copy,engine,cluster1
    .venv/bin/python scripts/bench_gpu.py --device cpu --shapes tiny --batch-sizes 1,2 --tokens 8
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import re
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "proto"))

SYSTEMS = ("copy", "hf", "engine", "cluster1", "cluster2")
# Not run by default: the same systems without this version's speed-ups, for side-by-side ratios.
BASELINES = ("engine_plain", "cluster1_nolookahead", "cluster2_nolookahead", "cluster2_noshm")
MODEL_SYSTEMS = (*SYSTEMS[1:], *BASELINES)
LOOKAHEAD_VARIANT = re.compile(r"cluster[12]_lookahead[0-4]")
COPY_REPEATS = 10
PROMPT_SEED = 1234
CLUSTER_START_S = 300.0
CLIENT_TIMEOUT_S = 300.0  # one whole generation
GIB = 1 << 30


class BenchError(Exception):
    """A result that cannot be trusted (e.g. a generation of the wrong length)."""


# ------------------------------------------------------------------------------------------ arguments
def known_system(name: str) -> bool:
    return name in SYSTEMS + BASELINES or LOOKAHEAD_VARIANT.fullmatch(name) is not None


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b", help="model shapes (default: %(default)s)")
    p.add_argument("--batch-sizes", default="1,32", help="concurrent sequences (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=64, help="N new tokens of the long generation (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in token ids (default 32)")
    p.add_argument("--repeats", type=int, default=2, help="t_1 and t_N are each the best of this many (default 2)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="a subset of %(default)s")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (the clusters' nodes on cuda:0) or cpu (tests, with --shapes tiny)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--copy-mib", type=int, default=None, help="copy buffer size (default 2048 on cuda, 256 on cpu)")
    p.add_argument("--max-seq-len", type=int, default=512, help="KV room per sequence (default 512)")
    p.add_argument("--workdir", default=None,
                   help="where models (reused when complete) and cluster logs go (default: a temporary directory)")
    p.add_argument("--out", default="out/bench_gpu.json")
    args = p.parse_args(argv)
    from tests.engine.reference import SHAPES

    args.shapes, args.systems = _csv(args.shapes), _csv(args.systems)
    try:
        args.batch_sizes = sorted({int(b) for b in _csv(args.batch_sizes)})
    except ValueError:
        p.error(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of integers")
    bad = [s for s in args.shapes if s not in SHAPES] + [s for s in args.systems if not known_system(s)]
    if bad:
        p.error(f"unknown {', '.join(bad)}; shapes: {', '.join(SHAPES)}; systems: {', '.join(SYSTEMS + BASELINES)}")
    if min(args.batch_sizes, default=0) < 1 or args.tokens < 2 or args.prompt_tokens < 1 or args.repeats < 1:
        p.error("need batch sizes >= 1, --tokens >= 2, --prompt-tokens >= 1 and --repeats >= 1")
    if args.prompt_tokens + args.tokens > args.max_seq_len:
        p.error(f"--prompt-tokens {args.prompt_tokens} + --tokens {args.tokens} "
                f"exceed --max-seq-len {args.max_seq_len}")
    args.copy_mib = args.copy_mib or (2048 if args.device == "cuda" else 256)
    return args


# --------------------------------------------------------------------------------------------- report
class Report:
    """The JSON report, rewritten after every measurement, and progress lines with the elapsed time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.path = Path(args.out)
        self.t0 = time.monotonic()
        self.data: dict[str, Any] = {"settings": vars(args).copy(), "machine": machine(args.device), "copy": None,
                                     "shapes": {}, "errors": [], "elapsed_s": 0.0}

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def machine(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_total_memory_gib=round(props.total_memory / GIB, 2),
                    gpu_capability=f"{props.major}.{props.minor}")
    return info


# ----------------------------------------------------------------------------------- bandwidth, weights
def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device: str, mib: int) -> dict[str, Any]:
    """Best of several device-to-device copies of a ``mib`` buffer: bytes read plus bytes written per second."""
    import torch

    nbytes = mib << 20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(COPY_REPEATS):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    free_memory(device)
    best = min(times)
    return {"buffer_bytes": nbytes, "times_s": times, "best_s": best, "bandwidth_gb_s": 2 * nbytes / best / 1e9}


def weight_bytes(model_dir: Path) -> dict[str, int]:
    """Parameters and bytes of every tensor in the directory's safetensors files, read from their headers,
    and the bytes of the input embedding when the LM head is a separate tensor (0 when they are tied)."""
    sizes: dict[str, tuple[int, int]] = {}  # tensor name -> (elements, bytes)
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                sizes[name] = (math.prod(info["shape"]), info["data_offsets"][1] - info["data_offsets"][0])
    embedding = next((b for name, (_, b) in sizes.items() if name.endswith("embed_tokens.weight")), 0)
    untied = any(name.endswith("lm_head.weight") for name in sizes)
    return {"params": sum(n for n, _ in sizes.values()), "weight_bytes": sum(b for _, b in sizes.values()),
            "untied_embedding_bytes": embedding if untied else 0}


# ------------------------------------------------------------------------------------------- systems
class HFSystem:
    """transformers ``generate``: greedy, KV cache on, EOS ignored (min_new_tokens = max_new_tokens)."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, work: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.device = args.device
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
        self.model = self.model.to(args.device).eval()

    def generate(self, prompts: list[list[int]], n: int) -> tuple[float, list[float]]:
        import torch

        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)  # [B, prompt] (equal lengths)
        sync(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                      max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0)
        sync(self.device)
        elapsed = time.perf_counter() - t0
        if tuple(out.shape) != (len(prompts), ids.shape[1] + n):
            raise BenchError(f"hf returned {tuple(out.shape)} for {len(prompts)} prompts of {ids.shape[1]} + {n}")
        return elapsed, []

    def close(self) -> None:
        self.model = None


class EngineSystem:
    """engine/llm.py in this process: one stage, a slot per sequence of the largest batch."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, work: Path, *, plain: bool = False) -> None:
        from engine.llm import LLM, EngineConfig

        self.device = args.device
        fast = {} if not plain else {"fused_kernels": False, "pipelined_decode": False}
        self.llm = LLM(EngineConfig(model=str(model_dir), dtype=args.dtype, device=args.device,
                                    num_slots=max(args.batch_sizes), max_seq_len=args.max_seq_len, **fast),
                       load_tokenizer=False)

    def generate(self, prompts: list[list[int]], n: int) -> tuple[float, list[float]]:
        from engine.sampling import SamplingParams

        sync(self.device)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
        sync(self.device)
        elapsed = time.perf_counter() - t0
        check_lengths("engine", [len(o.token_ids) for o in outs], len(prompts), n)
        return elapsed, [o.time_to_first_token for o in outs]

    def close(self) -> None:
        self.llm = None


class ClusterSystem:
    """A LocalCluster of ``nodes`` nodes on the same device (``--stages nodes``), one streaming client per
    sequence, each in its own thread with its own connection.

    Other layouts (scripts/bench_multigpu.py): ``devices`` gives each node's ``--devices`` (one node per
    entry), ``stages`` the stages to ask for and expect (default: one per node), ``extra_args`` more
    coordinator flags. ``status`` is the coordinator's status once placed; ``outputs`` the token ids of
    the last ``generate``, in prompt order."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, work: Path, *, nodes: int = 1,
                 devices: list[str] | None = None, stages: int | None = None, extra_args: Sequence[str] = (),
                 shared_memory: bool = True) -> None:
        from client.api import TensorfleetClient
        from coordinator.local_cluster import LocalCluster, NodeSpec

        devices = devices or ["cuda:0" if args.device == "cuda" else "cpu"] * nodes
        stages = stages or len(devices)
        batch = max(args.batch_sizes)
        coordinator_args = ["--stages", str(stages), "--dtype", args.dtype, "--slots", str(batch),
                            "--max-slots", str(max(batch, 64)), "--max-seq-len", str(args.max_seq_len),
                            "--max-step-tokens", str(batch * (args.prompt_tokens + 1)), "--no-http", *extra_args]
        specs = [NodeSpec(devices=d, model_dir=str(model_dir), shared_memory=shared_memory) for d in devices]
        self.cluster = LocalCluster(work, model=str(model_dir), nodes=specs, coordinator_args=coordinator_args)
        self.cluster.start(timeout_s=CLUSTER_START_S)  # stops what it started if it fails
        self.clients: list[Any] = []
        self.outputs: list[list[int]] = []
        try:
            self.clients = [TensorfleetClient(self.cluster.address, timeout=CLIENT_TIMEOUT_S) for _ in range(batch)]
            self.status = self.clients[0].status()
            self.stages = len(self.status.stages)
            if self.stages != stages:
                raise BenchError(f"the cluster placed {self.stages} stages, not {stages}")
        except BaseException:
            self.close()
            raise

    def generate(self, prompts: list[list[int]], n: int) -> tuple[float, list[float]]:
        barrier = threading.Barrier(len(prompts))
        spans: list[tuple[float, float, float, int] | BaseException | None] = [None] * len(prompts)
        self.outputs = [[] for _ in prompts]

        def one(i: int) -> None:
            try:
                barrier.wait()
                start, first, tokens = time.perf_counter(), None, self.outputs[i]
                for delta in self.clients[i].generate_stream(prompts[i], max_tokens=n, ignore_eos=True):
                    if delta.token_ids and first is None:
                        first = time.perf_counter()
                    tokens.extend(delta.token_ids)
                spans[i] = (start, first or time.perf_counter(), time.perf_counter(), len(tokens))
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread below
                spans[i] = e

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CLIENT_TIMEOUT_S + 30)
        failed = [s for s in spans if not isinstance(s, tuple)]
        if failed:
            raise failed[0] if isinstance(failed[0], BaseException) else BenchError("a client thread hung")
        check_lengths("cluster", [s[3] for s in spans], len(prompts), n)
        return max(s[2] for s in spans) - min(s[0] for s in spans), [s[1] - s[0] for s in spans]

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.cluster.stop()


def check_lengths(name: str, lengths: list[int], batch: int, n: int) -> None:
    if len(lengths) != batch or set(lengths) != {n}:
        raise BenchError(f"{name} returned {len(lengths)} outputs of lengths {sorted(set(lengths))} for "
                         f"{batch} prompts of max_tokens {n}")


def open_system(name: str, model_dir: Path, args: argparse.Namespace, work: Path) -> Any:
    if name == "hf":
        return HFSystem(model_dir, args, work)
    if name in ("engine", "engine_plain"):
        return EngineSystem(model_dir, args, work, plain=name == "engine_plain")
    nodes, _, variant = name.removeprefix("cluster").partition("_")
    if variant == "nolookahead":
        extra = ["--no-lookahead"]
    elif variant == "noshm":  # hidden states and tokens between the stages as bytes over gRPC
        extra = []
    else:  # "" (the default lookahead) or lookaheadK
        extra = ["--lookahead", variant.removeprefix("lookahead")] if variant else []
    return ClusterSystem(model_dir, args, work, nodes=int(nodes), extra_args=extra, shared_memory=variant != "noshm")


# ------------------------------------------------------------------------------------------- measure
def measure(system: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """t_1 and t_N (best of --repeats, after a warm-up) of one batch; ms per decode step from their difference."""
    system.generate(prompts, 2)  # warm-up: kernels, allocator, connections
    t1s, tns, ttfts = [], [], []
    for _ in range(args.repeats):
        t1s.append(system.generate(prompts, 1)[0])
        elapsed, ttft = system.generate(prompts, args.tokens)
        tns.append(elapsed)
        ttfts.append(ttft)
    t1, tn = min(t1s), min(tns)
    ms = (tn - t1) / (args.tokens - 1) * 1e3
    row = {"t1_s": t1s, "tN_s": tns, "t1_ms": t1 * 1e3, "ms_per_step": ms,
           "tokens_per_s": len(prompts) * 1e3 / ms if ms > 0 else None}
    best = ttfts[tns.index(tn)]
    if best:
        row.update(ttft_ms=statistics.median(best) * 1e3, ttft_max_ms=max(best) * 1e3)
    return row


def random_prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    rng = random.Random(PROMPT_SEED)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(count)]


def run_system(name: str, model_dir: Path, prompts: list[list[int]], entry: dict[str, Any],
               args: argparse.Namespace, report: Report, work: Path) -> None:
    started = time.monotonic()
    result: dict[str, Any] = {"batches": {}}
    if args.device == "cuda":
        import torch

        result["free_memory_gib_before"] = round(torch.cuda.mem_get_info()[0] / GIB, 2)
    entry["systems"][name] = result
    report.log(f"{entry['shape']}: loading {name}")
    system = None
    try:
        system = open_system(name, model_dir, args, work / name)
        result["load_s"] = round(time.monotonic() - started, 2)
        if isinstance(system, ClusterSystem):
            result["stages"] = system.stages
        report.log(f"{entry['shape']}: {name} loaded in {result['load_s']:.1f} s")
        for batch in args.batch_sizes:
            row = measure(system, prompts[:batch], args)
            if entry.get("roofline_ms") and row["ms_per_step"] > 0:
                row["pct_of_roofline"] = 100 * entry["roofline_ms"] / row["ms_per_step"]
            result["batches"][str(batch)] = row
            report.log(f"{entry['shape']}: {name} B={batch}: {row['ms_per_step']:.2f} ms/step, "
                       f"t_1 {row['t1_ms']:.1f} ms" + (f", TTFT {row['ttft_ms']:.1f} ms" if "ttft_ms" in row else ""))
            report.save()
    finally:
        if system is not None:
            system.close()
        system = None
        free_memory(args.device)
        result["section_s"] = round(time.monotonic() - started, 2)
        report.log(f"{entry['shape']}: {name} done in {result['section_s']:.1f} s")
        report.save()


def ratios(entry: dict[str, Any], batches: list[int]) -> dict[str, dict[str, float]]:
    """Per batch size, ms/step of one system over another (below 1: the first is faster)."""
    pairs = {"engine_over_hf": ("engine", "hf"), "cluster2_over_cluster1": ("cluster2", "cluster1"),
             "cluster1_over_engine": ("cluster1", "engine"), "cluster1_over_hf": ("cluster1", "hf"),
             "engine_over_engine_plain": ("engine", "engine_plain"),
             "cluster1_over_cluster1_nolookahead": ("cluster1", "cluster1_nolookahead"),
             "cluster2_over_cluster2_nolookahead": ("cluster2", "cluster2_nolookahead"),
             "cluster2_over_cluster2_noshm": ("cluster2", "cluster2_noshm")}
    out: dict[str, dict[str, float]] = {}
    for batch in map(str, batches):
        ms = {name: s["batches"][batch]["ms_per_step"] for name, s in entry["systems"].items() if batch in s["batches"]}
        out[batch] = {key: ms[a] / ms[b] for key, (a, b) in pairs.items() if a in ms and b in ms and ms[b] > 0}
    return out


def run_shape(shape: str, args: argparse.Namespace, report: Report, work: Path) -> None:
    import torch

    from engine.model_source import load_hf_config
    from tests.engine.reference import make_shaped_model

    started = time.monotonic()
    report.log(f"{shape}: making (or reusing) a random-init model in {args.dtype}")
    model_dir = make_shaped_model(shape, work / f"{shape}-{args.dtype}", dtype=getattr(torch, args.dtype),
                                  device=args.device)
    free_memory(args.device)
    weights = weight_bytes(model_dir)
    params, nbytes = weights["params"], weights["weight_bytes"]
    entry: dict[str, Any] = {"shape": shape, "model_dir": str(model_dir), **weights,
                             "make_s": round(time.monotonic() - started, 2), "systems": {}}
    if report.data["copy"]:
        entry["roofline_ms"] = nbytes / (report.data["copy"]["bandwidth_gb_s"] * 1e9) * 1e3
    report.data["shapes"][shape] = entry
    report.log(f"{shape}: {params / 1e6:.1f} M parameters, {nbytes / GIB:.3f} GiB"
               + (f", roofline {entry['roofline_ms']:.2f} ms/step" if "roofline_ms" in entry else ""))
    report.save()
    prompts = random_prompts(int(load_hf_config(model_dir)["vocab_size"]), max(args.batch_sizes), args.prompt_tokens)
    variants = [s for s in args.systems if s not in SYSTEMS + BASELINES]
    for name in [s for s in MODEL_SYSTEMS if s in args.systems] + variants:
        try:
            run_system(name, model_dir, prompts, entry, args, report, work / f"{shape}-runs")
        except Exception as e:  # noqa: BLE001 - recorded in the report and the exit status; the next system runs
            report.data["errors"].append({"shape": shape, "system": name, "error": f"{type(e).__name__}: {e}"})
            report.log(f"{shape}: {name} FAILED: {type(e).__name__}: {str(e)[-2000:]}")
        entry["ratios"] = ratios(entry, args.batch_sizes)
        report.save()
    report.log(f"{shape}: done in {time.monotonic() - started:.1f} s")


# --------------------------------------------------------------------------------------------- table
def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(data: dict[str, Any]) -> str:
    m, copy = data["machine"], data["copy"]
    lines = [f"{m.get('gpu', m['device'])}, torch {m['torch']} (CUDA {m['cuda']}), transformers {m['transformers']}"]
    if copy:
        lines.append(f"copy bandwidth: {copy['bandwidth_gb_s']:.0f} GB/s (2 x {copy['buffer_bytes'] / GIB:.2f} GiB "
                     f"in {copy['best_s'] * 1e3:.2f} ms)")
    lines += ["", "| shape | batch | system | roofline ms | ms/step | tokens/s | % of roofline | t_1 ms | TTFT ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape, entry in data["shapes"].items():
        for name, s in entry["systems"].items():
            for batch, r in s["batches"].items():
                cells = [_fmt(entry.get("roofline_ms")), _fmt(r["ms_per_step"]), _fmt(r["tokens_per_s"], 0),
                         _fmt(r.get("pct_of_roofline"), 1), _fmt(r["t1_ms"], 1), _fmt(r.get("ttft_ms"), 1)]
                lines.append(f"| {shape} | {batch} | {name} | " + " | ".join(cells) + " |")
    keys = sorted({k for entry in data["shapes"].values() for r in entry.get("ratios", {}).values() for k in r})
    lines += ["", "ms/step ratios (below 1: the first is faster)", "",
              "| shape | batch | " + " | ".join(k.replace("_over_", "/") for k in keys) + " |",
              "| --- | --- |" + " --- |" * len(keys)]
    for shape, entry in data["shapes"].items():
        for batch, r in entry.get("ratios", {}).items():
            lines.append(f"| {shape} | {batch} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    for e in data["errors"]:
        lines.append(f"FAILED {e['shape']} {e['system']}: {e['error'][:300]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(args)
    report.log(f"on {report.data['machine'].get('gpu', args.device)}; shapes {', '.join(args.shapes)}, "
               f"batch sizes {args.batch_sizes}, systems {', '.join(args.systems)}")
    report.save()
    if "copy" in args.systems:
        report.data["copy"] = copy_bandwidth(args.device, args.copy_mib)
        report.log(f"copy bandwidth {report.data['copy']['bandwidth_gb_s']:.0f} GB/s")
        report.save()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        for shape in args.shapes:
            run_shape(shape, args, report, work)
    report.save()
    print(table(report.data))
    report.log(f"wrote {report.path}")
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
