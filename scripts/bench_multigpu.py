#!/usr/bin/env python
"""Multi-GPU measurements in one run on one host with N >= 2 GPUs: tensor-parallel fidelity and speed, a
pipeline of stages of different tensor-parallel degrees, failover, and compressed all-reduces.

One random-init Llama of a published shape (tests/engine/reference.py SHAPES, ``--shape``, saved once in
``--dtype``) serves every section; prompts, timing and the clusters' streaming clients are
scripts/bench_gpu.py's (t_1 and t_N, best of ``--repeats`` after a warm-up; ms per decode step = (t_N -
t_1) / (N - 1); tokens/s = B * 1000 / ms). Sections (``--sections``, default all):

- ``tp_logits`` (engine, no cluster): TP = 1, 2 (and 4 with 4 GPUs) as spawned processes joined over NCCL
  (gloo on CPU), rank r on cuda:r, each an ``engine.llm.LLM`` with ``TPGroup.from_group()``: logits of
  every prompt position (teacher-forced) of ``--logit-prompts`` prompts, then ``--logit-tokens`` greedy
  tokens each. Per degree against TP=1: max abs logit difference (all positions and the last), relative
  error ||diff|| / ||logits||, top-1 agreement over the positions, greedy outputs identical and where each
  first diverges.
- ``tp_speed`` (the cluster, the product path): ``tp1`` one node on cuda:0; ``tp2`` one node on cuda:0,1
  (``--stages 1``); ``tp2_span`` two nodes of one GPU each (``--stages 1 --tp-across-nodes``); ``tp4``
  with 4 GPUs. The placement (from the coordinator's status) must be the intended one; ms/step and
  tokens/s per batch size, speedups against tp1 (the goal at batch 1: tp2 >= 1.7x), greedy outputs
  identical to tp1's.
- ``hetero``: node A on cuda:0,1 and node B on cuda:2 (with 3 GPUs; else on cuda:0, shared), ``--stages
  2``: a TP=2 stage and a TP=1 stage (the order is the planner's, recorded); speed, outputs against tp1.
- ``failover``: nodes on cuda:0 and cuda:1 as 2 stages, a third node (cuda:0) spare; ``--failover-requests``
  greedy streams of ``--failover-tokens``, once undisturbed and once while the node of the last stage is
  killed (SIGKILL) at ``--fault-at`` of the tokens (as scripts/bench_faults.py): lost requests, outputs
  identical to the undisturbed run, the longest pause between a stream's tokens, the re-placement. Per
  dtype of ``--failover-dtypes`` (bf16 recomputation of a replayed prefix may part at near-ties).
- ``allreduce``: 2 spawned ranks; a plain ``dist.all_reduce`` against engine/collectives.py reducers
  (``--allreduce-specs``, compressing at every size: min_elements=0; ``default_compresses`` says what the
  default policy would do) on [tokens, hidden] tensors in ``--dtype``: median us of ``--allreduce-iters``
  calls (synchronized, timed on rank 0), bytes each rank sends, error against the exact fp32 sum.

Each section (and each of its sub-measurements) records ``{"error": ...}`` when it fails and the run goes
on; the exit status is 1 if anything failed. JSON to ``--out`` after every measurement, progress to
stderr, tables to stdout at the end.

    python3 scripts/bench_multigpu.py                                 # every section, llama-3.1-8b, bf16
    python3 scripts/bench_multigpu.py --sections tp_logits,allreduce --shape llama-3.2-1b
    .venv/bin/python scripts/bench_multigpu.py --device cpu --shape tiny --dtype float32 --tokens 8 \\
        --batch-sizes 1,2 --sections tp_logits,allreduce,hetero          # a smoke test on CPU (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "proto"))

from scripts.bench_faults import report as fault_report  # noqa: E402 - after the path setup
from scripts.bench_faults import victim_node  # noqa: E402
from scripts.bench_gpu import (  # noqa: E402
    BenchError,
    ClusterSystem,
    Report,
    _csv,
    _fmt,
    free_memory,
    machine,
    measure,
    random_prompts,
    sync,
    weight_bytes,
)

SECTIONS = ("tp_logits", "tp_speed", "hetero", "failover", "allreduce")
SPEC_SEPARATOR = ";"  # specs hold commas: int8:rotate=true,outliers=3
DEFAULT_SPECS = "int8;int8:rotate=true,outliers=3;int4;lowrank:rank=8"
DTYPES = ("bfloat16", "float16", "float32")
SPEED_GOAL = 1.7  # tp2 over tp1 at batch 1
ALLREDUCE_WARMUP = 5
GROUP_TIMEOUT = timedelta(minutes=10)  # a collective waiting longer fails
LEAVE_TIMEOUT_S = 30.0


# ------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help="a subset of %(default)s")
    p.add_argument("--shape", default="llama-3.1-8b", help="model shape (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (NCCL), or cpu (gloo; CPU executors stand in for GPUs: a smoke test)")
    p.add_argument("--num-devices", type=int, default=None,
                   help="GPUs to use, cuda:0 to cuda:N-1 (default: all; on cpu: 2 CPU executors)")
    p.add_argument("--batch-sizes", default="1,32", help="concurrent sequences (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=64, help="N new tokens of the long generation (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in token ids (default 32)")
    p.add_argument("--repeats", type=int, default=2, help="t_1 and t_N are each the best of this many (default 2)")
    p.add_argument("--max-seq-len", type=int, default=512, help="KV room per sequence (default 512)")
    p.add_argument("--logit-prompts", type=int, default=4, help="tp_logits: prompts (default 4)")
    p.add_argument("--logit-tokens", type=int, default=32, help="tp_logits: greedy tokens per prompt (default 32)")
    p.add_argument("--failover-dtypes", default="bfloat16,float32", help="failover: serving dtypes (default: "
                                                                         "%(default)s)")
    p.add_argument("--failover-requests", type=int, default=8, help="failover: concurrent requests (default 8)")
    p.add_argument("--failover-tokens", type=int, default=64, help="failover: tokens per request (default 64)")
    p.add_argument("--fault-at", type=float, default=0.3,
                   help="failover: kill once this share of the expected tokens arrived (default 0.3)")
    p.add_argument("--allreduce-specs", default=DEFAULT_SPECS,
                   help=f"allreduce: reducer specs, separated by '{SPEC_SEPARATOR}' (default: %(default)s)")
    p.add_argument("--allreduce-tokens", default="1,32,512,2048", help="allreduce: rows (default: %(default)s)")
    p.add_argument("--allreduce-iters", type=int, default=50, help="allreduce: timed calls each (default 50)")
    p.add_argument("--rank-timeout", type=float, default=900.0,
                   help="tp_logits, allreduce: kill a spawned group still running after this many seconds, "
                        "its ranks' stacks printed to stderr first (default 900)")
    p.add_argument("--workdir", default=None,
                   help="where the model (reused when complete) and cluster logs go (default: a temporary directory)")
    p.add_argument("--out", default="out/bench_multigpu.json")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def _ints(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        return sorted({int(x) for x in _csv(text)})
    except ValueError:
        p.error(f"{flag} {text!r} is not a comma-separated list of integers")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tests.engine.reference import SHAPES

    args.sections, args.failover_dtypes = _csv(args.sections), _csv(args.failover_dtypes)
    args.batch_sizes = _ints(p, "--batch-sizes", args.batch_sizes)
    args.allreduce_tokens = _ints(p, "--allreduce-tokens", args.allreduce_tokens)
    args.allreduce_specs = [s.strip() for s in args.allreduce_specs.split(SPEC_SEPARATOR) if s.strip()]
    bad = ([s for s in args.sections if s not in SECTIONS] + [args.shape] * (args.shape not in SHAPES)
           + [d for d in args.failover_dtypes if d not in DTYPES])
    if bad or not args.sections:
        p.error(f"unknown {', '.join(bad) or 'sections: none given'}; shapes: {', '.join(SHAPES)}; "
                f"sections: {', '.join(SECTIONS)}; dtypes: {', '.join(DTYPES)}")
    if min(args.batch_sizes + args.allreduce_tokens, default=0) < 1 or args.tokens < 2 or args.prompt_tokens < 1:
        p.error("need batch sizes and all-reduce rows >= 1, --tokens >= 2 and --prompt-tokens >= 1")
    if min(args.repeats, args.logit_prompts, args.logit_tokens, args.failover_requests, args.allreduce_iters) < 1 \
            or args.failover_tokens < 2 or not 0.0 < args.fault_at < 1.0 or args.rank_timeout <= 0:
        p.error("need --repeats, --logit-prompts, --logit-tokens, --failover-requests, --allreduce-iters >= 1, "
                "--failover-tokens >= 2, 0 < --fault-at < 1 and --rank-timeout > 0")
    longest = args.prompt_tokens + max(args.tokens, args.logit_tokens, args.failover_tokens)
    if longest > args.max_seq_len:
        p.error(f"--prompt-tokens {args.prompt_tokens} plus the longest generation exceed --max-seq-len "
                f"{args.max_seq_len} ({longest})")
    from engine.collectives import make_reducer
    from engine.errors import ConfigError

    for spec in args.allreduce_specs:
        try:
            make_reducer(spec)
        except ConfigError as e:
            p.error(f"--allreduce-specs: {e}")
    if args.device == "cuda":
        import torch

        found = torch.cuda.device_count()
        args.num_devices = args.num_devices or found
        if not 2 <= args.num_devices <= found:
            p.error(f"need 2 or more GPUs and --num-devices within the {found} this machine has; "
                    f"got {args.num_devices} (use --device cpu for a smoke test without GPUs)")
    elif (args.num_devices or 2) < 2:
        p.error("--num-devices must be >= 2")
    else:
        args.num_devices = args.num_devices or 2


# ---------------------------------------------------------------------------------- devices, report
def one_device(args: argparse.Namespace, i: int) -> str:
    """A node's --devices for device i alone (every CPU node has one executor)."""
    return f"cuda:{i}" if args.device == "cuda" else "cpu"


def devices_of(args: argparse.Namespace, k: int) -> str:
    """A node's --devices for devices 0..k-1 (on CPU: k executors)."""
    if args.device == "cuda":
        return ",".join(f"cuda:{i}" for i in range(k))
    return "cpu" if k == 1 else f"cpu:{k}"


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info = machine(args.device)
    info["devices_used"] = args.num_devices
    if args.device == "cuda":
        info["gpu_count"] = torch.cuda.device_count()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


def error_text(e: BaseException) -> str:
    """The exception and the last frames of its traceback (a spawned rank's traceback is in its message)."""
    frames = "".join(traceback.format_tb(e.__traceback__)[-4:]).rstrip()
    return f"{type(e).__name__}: {str(e).strip()[-3000:]}\n{frames}"


class Bench:
    """What the sections share: the arguments, the report, the work directory, the model (made once) and
    the tp1 cluster's outputs per batch size (the reference of the other clusters)."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.report = Report(args)  # its log and save; the data are this script's
        self.report.data = {"settings": vars(args).copy(), "command": [sys.executable, *sys.argv],
                            "machine": machine_info(args), "model": None, "sections": {}, "failed": [],
                            "elapsed_s": 0.0}
        self._model_dir: Path | None = None
        self.vocab = 0
        self.tp1_outputs: dict[int, list[list[int]]] | None = None
        self.current = ""  # the section running (names failed sub-measurements)

    def log(self, msg: str) -> None:
        self.report.log(msg)

    def model_dir(self) -> Path:
        if self._model_dir is None:
            import torch

            from engine.model_source import load_hf_config
            from tests.engine.reference import make_shaped_model

            a = self.args
            started = time.monotonic()
            self.log(f"making (or reusing) a random-init {a.shape} in {a.dtype}")
            path = make_shaped_model(a.shape, self.work / f"{a.shape}-{a.dtype}", dtype=getattr(torch, a.dtype),
                                     device="cuda" if a.device == "cuda" else "cpu")
            free_memory(a.device)
            self.vocab = int(load_hf_config(path)["vocab_size"])
            self.report.data["model"] = {"shape": a.shape, "dir": str(path), **weight_bytes(path),
                                         "make_s": round(time.monotonic() - started, 2)}
            self.report.save()
            self._model_dir = path
        return self._model_dir

    def prompts(self, count: int) -> list[list[int]]:
        self.model_dir()
        return random_prompts(self.vocab, count, self.args.prompt_tokens)

    def attempt(self, entry: dict[str, Any], name: str, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Run ``fn(sub)`` on ``entry[name] = sub``; a failure is recorded there (and in "failed"), not raised."""
        sub: dict[str, Any] = {}
        entry[name] = sub
        started = time.monotonic()
        try:
            fn(sub)
        except Exception as e:  # noqa: BLE001 - recorded in the report and the exit status; the run goes on
            sub["error"] = error_text(e)
            self.report.data["failed"].append(name if entry is self.report.data["sections"] else
                                              f"{self.current}/{name}")
            self.log(f"{name} FAILED: {type(e).__name__}: {str(e)[-1500:]}")
        finally:
            sub["elapsed_s"] = round(time.monotonic() - started, 2)
            self.report.save()
        return sub


# ------------------------------------------------------------------------------- spawned rank groups
def spawn_group(fn: Callable[..., None], world: int, job: dict[str, Any], timeout_s: float) -> None:
    """``fn(rank, world, port, job)`` in ``world`` spawned processes; a rank's exception is raised here with
    its traceback (torch.multiprocessing stops the other ranks). Ranks still running after ``timeout_s``
    (a collective that never completes) print their stacks to stderr shortly before, and are killed."""
    import torch.multiprocessing as mp

    from coordinator.local_cluster import free_port

    job = {**job, "dump_stacks_after_s": max(1.0, timeout_s - 10)}
    ctx = mp.start_processes(fn, args=(world, free_port(), job), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise BenchError(f"the {world} rank(s) of {fn.__name__} still ran after {timeout_s:.0f} s "
                             f"(--rank-timeout) and were killed; their stacks are in the run's stderr")


def join_group(rank: int, world: int, port: int, job: dict[str, Any]) -> tuple[str, Any]:
    """This rank's torch device and TPGroup (None alone): NCCL with rank r on cuda:r, or gloo on CPU."""
    import faulthandler

    import torch
    import torch.distributed as dist

    from engine.parallel import TPGroup

    faulthandler.dump_traceback_later(job["dump_stacks_after_s"], exit=False)
    device = job["device"]
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world == 1:
        return (f"cuda:{rank}" if device == "cuda" else "cpu"), None
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=GROUP_TIMEOUT,
                            device_id=torch.device(f"cuda:{rank}") if device == "cuda" else None)
    return (f"cuda:{rank}" if device == "cuda" else "cpu"), TPGroup.from_group()


def leave_group(world: int) -> None:
    """Destroy the group once this rank's work is done and saved. With the model and its decode graphs
    (which hold captured NCCL collectives) still alive, and no ``device_id`` given at init,
    ``destroy_process_group`` was seen never to return (2 H200s, torch 2.11, NCCL 2.28.9); the callers
    drop the model first and ``join_group`` passes ``device_id``, and it returned since. Should it hang
    again, the rank says so on stderr after ``LEAVE_TIMEOUT_S`` and exits without it."""
    import gc
    import threading

    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return
    gc.collect()  # the model and its graphs, dropped by the caller
    done = threading.Event()
    threading.Thread(target=lambda: (dist.destroy_process_group(), done.set()), daemon=True).start()
    if not done.wait(LEAVE_TIMEOUT_S):
        print(f"rank {dist.get_rank()}: destroy_process_group did not return within {LEAVE_TIMEOUT_S:.0f} s; "
              "exiting without it (the results were saved before)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)


# --------------------------------------------------------------------------------------- tp_logits
def logits_rank(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """One rank of a TP group: logits of every prompt position, then greedy tokens; rank 0 saves them."""
    import torch

    from engine.llm import LLM, EngineConfig
    from engine.sampling import SamplingParams

    device, tp = join_group(rank, world, port, job)
    started = time.perf_counter()
    prompts = job["prompts"]
    llm = LLM(EngineConfig(model=job["model"], dtype=job["dtype"], device=device, num_slots=len(prompts),
                           max_seq_len=job["max_seq_len"]), tp=tp, load_tokenizer=False)
    load_s = time.perf_counter() - started
    with torch.inference_mode():
        logits = llm.forward(list(range(len(prompts))), [0] * len(prompts), prompts, all_logits=True)
    outs = llm.generate(prompts, SamplingParams(max_tokens=job["tokens"], ignore_eos=True))
    if rank == 0:  # [prompts, prompt_tokens, vocab], every rank holds the whole (gathered) logits
        # No pickle (tests/security/test_no_unsafe_loads.py): the logits as safetensors, the rest as JSON.
        from safetensors.torch import save_file

        save_file({"logits": logits.float().cpu().contiguous()}, job["out"])
        Path(job["out"] + ".json").write_text(json.dumps({"tokens": [o.token_ids for o in outs], "load_s": load_s,
                                                          "cuda_graphs": llm.graphs is not None}))
    del llm, logits
    leave_group(world)  # only after success: a failed rank exits with its exception, and spawn_group stops the rest


def compare_outputs(got: list[list[int]], want: list[list[int]]) -> dict[str, Any]:
    """How many outputs are identical, and the index where each first differs (None: identical)."""
    first = []
    for a, b in zip(got, want, strict=True):
        diverge = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        first.append(diverge if diverge is not None or len(a) == len(b) else min(len(a), len(b)))
    return {"identical": sum(f is None for f in first), "of": len(want), "first_divergence": first}


def compare_logits(got: Any, want: Any) -> dict[str, Any]:
    diff = (got - want).abs()
    last_diff = (got[:, -1] - want[:, -1]).abs()
    return {"max_abs_diff": diff.max().item(), "last_max_abs_diff": last_diff.max().item(),
            "rel_error": (diff.norm() / want.norm()).item(),
            "last_rel_error": (last_diff.norm() / want[:, -1].norm()).item(),
            "top1_agree": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
            "positions": want.shape[0] * want.shape[1], "max_abs_logit": want.abs().max().item()}


def section_tp_logits(bench: Bench, entry: dict[str, Any]) -> None:

    from engine.config import ModelConfig
    from engine.model_source import load_hf_config

    a = bench.args
    model = bench.model_dir()
    cfg = ModelConfig.from_hf(load_hf_config(model))
    prompts = bench.prompts(a.logit_prompts)
    entry.update(prompts=len(prompts), prompt_tokens=a.prompt_tokens, greedy_tokens=a.logit_tokens, tp={})
    results: dict[int, dict[str, Any]] = {}
    for tp in [1, 2] + ([4] if a.num_devices >= 4 else []):
        def run(sub: dict[str, Any], tp: int = tp) -> None:
            cfg.check_tensor_parallel(tp)
            out = bench.work / f"tp_logits_{tp}.safetensors"
            job = {"device": a.device, "model": str(model), "dtype": a.dtype, "prompts": prompts,
                   "tokens": a.logit_tokens, "max_seq_len": a.max_seq_len, "out": str(out)}
            bench.log(f"tp_logits: TP={tp}")
            spawn_group(logits_rank, tp, job, a.rank_timeout)
            from safetensors.torch import load_file

            results[tp] = {**json.loads(Path(f"{out}.json").read_text()), **load_file(out)}
            sub["load_s"] = round(results[tp]["load_s"], 2)
            if tp != 1 and 1 in results:
                sub.update(compare_logits(results[tp]["logits"], results[1]["logits"]),
                           greedy=compare_outputs(results[tp]["tokens"], results[1]["tokens"]))
                bench.log(f"tp_logits: TP={tp} vs 1: max |diff| {sub['max_abs_diff']:.3g}, rel "
                          f"{sub['rel_error']:.3g}, top-1 {sub['top1_agree']:.2%}, greedy identical "
                          f"{sub['greedy']['identical']}/{sub['greedy']['of']}")
            elif tp != 1:
                raise BenchError("no TP=1 result to compare with")

        bench.attempt(entry["tp"], str(tp), run)


# ------------------------------------------------------------------------------------ the clusters
def placement(status: Any) -> list[dict[str, Any]]:
    """The stages of a coordinator status: layers and members (node name, device, tp rank)."""
    from tensorfleet.v1 import common_pb2

    nodes = {n.node_id: n for n in status.nodes}
    stages = []
    for s in status.stages:
        members = []
        for m in s.members:
            node = nodes.get(m.node_id)
            dev = next((d for d in node.info.devices if d.index == m.device_index), None) if node else None
            kind = "cuda" if dev is not None and dev.kind == common_pb2.DEVICE_KIND_CUDA else "cpu"
            members.append({"node": node.info.name if node else m.node_id, "tp_rank": m.tp_rank,
                            "device": f"{kind}:{dev.ordinal}" if dev is not None else f"?{m.device_index}",
                            "device_name": dev.name if dev is not None else ""})
        stages.append({"stage": s.index, "layers": [s.layers.start, s.layers.end], "members": members})
    return stages


def describe(stages: list[dict[str, Any]]) -> str:
    return "; ".join(f"stage {s['stage']} layers {s['layers'][0]}-{s['layers'][1] - 1} on "
                     + "+".join(f"{m['node']}/{m['device']}" for m in s["members"]) for s in stages)


def run_cluster(bench: Bench, sub: dict[str, Any], name: str, devices: list[str], *, stages: int,
                extra_args: tuple[str, ...] = (), check: Callable[[list[dict[str, Any]]], None] | None = None,
                ) -> dict[int, list[list[int]]]:
    """A cluster of one node per entry of ``devices``; its placement (``check`` raises BenchError if it is not
    the intended one), then each batch size measured. Returns the greedy outputs of each batch's t_N run."""
    a = bench.args
    model, prompts = bench.model_dir(), bench.prompts(max(a.batch_sizes))
    sub.update(devices=devices, coordinator_args=["--stages", str(stages), *extra_args], batches={})
    started = time.monotonic()
    bench.log(f"{name}: starting nodes {devices}")
    system, outputs = None, {}
    try:
        system = ClusterSystem(model, a, bench.work / name, devices=devices, stages=stages, extra_args=extra_args)
        sub["load_s"] = round(time.monotonic() - started, 2)
        sub["placement"] = placement(system.status)
        bench.log(f"{name}: placed in {sub['load_s']:.1f} s: {describe(sub['placement'])}")
        bench.report.save()
        if check is not None:
            check(sub["placement"])
        for batch in a.batch_sizes:
            row = measure(system, prompts[:batch], a)
            outputs[batch] = system.outputs
            if bench.tp1_outputs and batch in bench.tp1_outputs and name != "tp1":
                row["greedy_vs_tp1"] = compare_outputs(system.outputs, bench.tp1_outputs[batch])
            sub["batches"][str(batch)] = row
            bench.log(f"{name} B={batch}: {row['ms_per_step']:.2f} ms/step, {_fmt(row['tokens_per_s'], 1)} tok/s"
                      + (f", identical to tp1 {row['greedy_vs_tp1']['identical']}/{batch}"
                         if "greedy_vs_tp1" in row else ""))
            bench.report.save()
    finally:
        if system is not None:
            system.close()
        free_memory(a.device)
    return outputs


def expect_tp(tp: int, nodes: int) -> Callable[[list[dict[str, Any]]], None]:
    def check(stages: list[dict[str, Any]]) -> None:
        got_nodes = len({m["node"] for s in stages for m in s["members"]})
        if len(stages) != 1 or len(stages[0]["members"]) != tp or got_nodes != nodes:
            raise BenchError(f"intended one stage of tp={tp} over {nodes} node(s), got: {describe(stages)}")
    return check


def tp1_reference(bench: Bench, entry: dict[str, Any]) -> None:
    """The tp1 cluster (one node, one device), once per run: its outputs are every cluster's reference."""
    if bench.tp1_outputs is not None:
        return

    def run(sub: dict[str, Any]) -> None:
        bench.tp1_outputs = run_cluster(bench, sub, "tp1", [one_device(bench.args, 0)], stages=1,
                                        check=expect_tp(1, 1))

    bench.attempt(entry, "tp1", run)


def section_tp_speed(bench: Bench, entry: dict[str, Any]) -> None:
    a = bench.args
    tp1_reference(bench, entry)
    variants = [("tp2", [devices_of(a, 2)], (), expect_tp(2, 1)),
                ("tp2_span", [one_device(a, 0), one_device(a, 1)], ("--tp-across-nodes",), expect_tp(2, 2))]
    if a.num_devices >= 4:
        variants.append(("tp4", [devices_of(a, 4)], (), expect_tp(4, 1)))
    for name, devices, extra, check in variants:
        bench.attempt(entry, name, lambda sub, n=name, d=devices, x=extra, c=check:
                      run_cluster(bench, sub, n, d, stages=1, extra_args=x, check=c))
    entry["speedup_vs_tp1"] = {}
    tp1 = entry.get("tp1", {}).get("batches", {})
    for name in [v[0] for v in variants]:
        rows = entry.get(name, {}).get("batches", {})
        entry["speedup_vs_tp1"][name] = {b: tp1[b]["ms_per_step"] / r["ms_per_step"]
                                         for b, r in rows.items() if b in tp1 and r["ms_per_step"] > 0}
    at1 = entry["speedup_vs_tp1"].get("tp2", {}).get("1")
    entry["tp2_speedup_batch1"] = {"speedup": at1, "goal": SPEED_GOAL,
                                   "met": None if at1 is None else at1 >= SPEED_GOAL}


def section_hetero(bench: Bench, entry: dict[str, Any]) -> None:
    a = bench.args
    tp1_reference(bench, entry)
    shared = a.num_devices < 3 or a.device != "cuda"
    node_b = one_device(a, 0 if shared else 2)
    entry.update(node_b_shares_device_0=shared and a.device == "cuda")

    def check(stages: list[dict[str, Any]]) -> None:
        degrees = [len(s["members"]) for s in stages]
        entry.update(tp_per_stage=degrees, as_intended=degrees == [2, 1])
        if sorted(degrees) != [1, 2]:
            raise BenchError(f"intended a tp=2 stage and a tp=1 stage, got: {describe(stages)}")

    bench.attempt(entry, "hetero", lambda sub: run_cluster(bench, sub, "hetero", [devices_of(a, 2), node_b],
                                                        stages=2, check=check))


# ---------------------------------------------------------------------------------------- failover
def max_gap(records: list[Any]) -> float | None:
    """The longest wait between two consecutive tokens of one stream, over all streams."""
    gaps = [later - earlier for r in records for earlier, later in zip(r.arrivals, r.arrivals[1:], strict=False)]
    return max(gaps, default=None)


def run_failover(bench: Bench, sub: dict[str, Any], dtype: str) -> None:
    from client.api import TensorfleetClient
    from client.workload import StreamingWorkload

    a = bench.args
    count, tokens = a.failover_requests, a.failover_tokens
    args = argparse.Namespace(**{**vars(a), "dtype": dtype, "batch_sizes": [count]})
    devices = [one_device(a, 0), one_device(a, 1), one_device(a, 0)]
    prompts = bench.prompts(count)
    sub.update(devices=devices, requests=count, tokens=tokens)
    bench.log(f"failover {dtype}: starting nodes {devices}, 2 stages")
    system = ClusterSystem(bench.model_dir(), args, bench.work / f"failover-{dtype}", devices=devices, stages=2,
                           extra_args=("--heartbeat-ms", "200", "--heartbeat-timeout-ms", "1000"))
    try:
        cluster = system.cluster
        sub["placement_before"] = placement(system.status)
        held = {m["node"] for s in sub["placement_before"] for m in s["members"]}
        sub["spare"] = sorted({f"node{i}" for i in range(len(devices))} - held)
        bench.log(f"failover {dtype}: {describe(sub['placement_before'])}; spare {sub['spare']}")

        def workload(tag: str) -> StreamingWorkload:
            return StreamingWorkload(cluster.address, prompts, count=count, max_tokens=tokens, tag=tag,
                                     timeout=600)

        workload("warm").run()  # decode graphs captured, connections made: the reference's pauses are its own
        reference = workload("ref").run()
        if reference.lost():
            raise BenchError(f"the undisturbed run lost {len(reference.lost())} requests: "
                             f"{[r.error for r in reference.lost()][:3]}")
        victim = victim_node(cluster.address, -1)
        run = workload("kill").start()
        if not run.wait_tokens(int(a.fault_at * count * tokens), 600):
            raise BenchError("the streams did not get going")
        t_fault = time.time()
        cluster.signal_node(victim, signal.SIGKILL)
        run.join()
        with TensorfleetClient(cluster.address, timeout=10) as client:
            status = client.status()
        sub.update(fault_report("kill", victim, t_fault, reference, run, None, status))
        sub.update(greedy=compare_outputs(run.outputs(), reference.outputs()), max_gap_s=max_gap(run.records),
                   reference_max_gap_s=max_gap(reference.records), placement_after=placement(status))
        bench.log(f"failover {dtype}: killed {victim}; lost {sub['lost']}, identical {sub['greedy']['identical']}"
                  f"/{count}, pause {_fmt(sub['max_gap_s'])} s; now {describe(sub['placement_after'])}")
        if sub["lost"]:
            raise BenchError(f"{sub['lost']} of {count} requests did not complete: {sub['errors'][:3]}")
    finally:
        system.close()
        free_memory(a.device)


def section_failover(bench: Bench, entry: dict[str, Any]) -> None:
    for dtype in bench.args.failover_dtypes:
        bench.attempt(entry, dtype, lambda sub, d=dtype: run_failover(bench, sub, d))


# --------------------------------------------------------------------------------------- allreduce
def allreduce_rank(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """Times every reducer at every size on this rank; rank 0 saves the rows."""
    import torch

    device, _ = join_group(rank, world, port, job)
    dtype, rows = getattr(torch, job["dtype"]), []
    for tokens in job["tokens"]:
        # Every rank's partial, drawn on the CPU from the same seeds: each rank knows the exact sum.
        parts = [torch.randn(tokens, job["hidden"], generator=torch.Generator().manual_seed(1000 * r + tokens))
                 .to(dtype) for r in range(world)]
        exact = torch.stack([p.float() for p in parts]).sum(0).to(device)  # [tokens, hidden] fp32
        for spec in ["all_reduce", *job["specs"]]:
            rows.append(time_reducer(spec, parts[rank].to(device), exact, job))
    if rank == 0:
        Path(job["out"]).write_text(json.dumps(rows))
    leave_group(world)


def time_reducer(spec: str, mine: Any, exact: Any, job: dict[str, Any]) -> dict[str, Any]:
    """``job["iters"]`` all-reduces of ``mine`` (after a warm-up), each started together (barrier) and timed
    to its end on this rank's device; the bytes this rank sent per call, the last result's error."""
    import torch.distributed as dist

    from engine.collectives import make_reducer, ring_bytes

    world, shape = dist.get_world_size(), tuple(mine.shape)
    reducer = None if spec == "all_reduce" else make_reducer(spec, min_elements=0)
    exact_bytes = ring_bytes(mine.numel() * mine.element_size(), world)
    y, times, sent = None, [], exact_bytes
    for i in range(ALLREDUCE_WARMUP + job["iters"]):
        x = mine.clone()
        sync(job["device"])
        dist.barrier()
        before = reducer.stats.bytes_sent if reducer else 0
        t0 = time.perf_counter()
        if reducer is None:
            dist.all_reduce(x)
            y = x
        else:
            y = reducer.all_reduce(x, key="bench")
        sync(job["device"])
        if i >= ALLREDUCE_WARMUP:
            times.append(time.perf_counter() - t0)
            if reducer is not None:
                sent = reducer.stats.bytes_sent - before
    err = y.float() - exact
    return {"spec": spec, "tokens": shape[0], "hidden": shape[1], "median_us": statistics.median(times) * 1e6,
            "min_us": min(times) * 1e6, "max_us": max(times) * 1e6, "bytes_sent_per_rank": sent,
            "exact_bytes_per_rank": exact_bytes, "compressed": bool(reducer and reducer.compresses(shape, mine.dtype)),
            "default_compresses": bool(reducer and make_reducer(spec).compresses(shape, mine.dtype)),
            "rel_error": (err.norm() / exact.norm()).item(), "max_abs_error": err.abs().max().item()}


def section_allreduce(bench: Bench, entry: dict[str, Any]) -> None:

    from engine.model_source import load_hf_config

    a = bench.args
    hidden = int(load_hf_config(bench.model_dir())["hidden_size"])
    out = bench.work / "allreduce.json"
    entry.update(world=2, hidden=hidden, dtype=a.dtype, iters=a.allreduce_iters, min_elements=0,
                 error_of="the last call (low-rank: Q warm-started by the calls before it)")
    bench.log(f"allreduce: 2 ranks, hidden {hidden}, rows {a.allreduce_tokens}, specs {a.allreduce_specs}")
    spawn_group(allreduce_rank, 2, {"device": a.device, "dtype": a.dtype, "hidden": hidden, "tokens":
                                    a.allreduce_tokens, "specs": a.allreduce_specs, "iters": a.allreduce_iters,
                                    "out": str(out)}, a.rank_timeout)
    entry["rows"] = json.loads(out.read_text())
    base = {r["tokens"]: r["median_us"] for r in entry["rows"] if r["spec"] == "all_reduce"}
    for r in entry["rows"]:
        r["time_vs_all_reduce"] = r["median_us"] / base[r["tokens"]] if base.get(r["tokens"]) else None
        r["bytes_ratio"] = r["exact_bytes_per_rank"] / r["bytes_sent_per_rank"] if r["bytes_sent_per_rank"] else None


# ------------------------------------------------------------------------------------------- tables
def tables(data: dict[str, Any]) -> str:
    m, s = data["machine"], data["sections"]
    gpus = ", ".join(m.get("gpus", [])) or m["device"]
    lines = [f"{gpus}; torch {m['torch']}, NCCL {m.get('nccl', '-')}; model {data['settings']['shape']} "
             f"{data['settings']['dtype']}"]
    if "tp_logits" in s:
        lines += ["", "| TP | max abs logit diff | last-position max diff | rel error | top-1 agree | "
                  "greedy identical | first divergence |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for tp, r in s["tp_logits"].get("tp", {}).items():
            if "max_abs_diff" in r:
                lines.append(f"| {tp} | {r['max_abs_diff']:.3g} | {r['last_max_abs_diff']:.3g} | {r['rel_error']:.3g} "
                             f"| {r['top1_agree']:.2%} | {r['greedy']['identical']}/{r['greedy']['of']} | "
                             f"{r['greedy']['first_divergence']} |")
    runs = [(name, r) for sec in ("tp_speed", "hetero") for name, r in s.get(sec, {}).items()
            if isinstance(r, dict) and "batches" in r]
    if runs:
        lines += ["", "| cluster | placement | batch | ms/step | tokens/s | t_1 ms | identical to tp1 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in runs:
            for b, row in r["batches"].items():
                same = row.get("greedy_vs_tp1")
                same_text = "-" if same is None else f"{same['identical']}/{same['of']}"
                lines.append(f"| {name} | {describe(r.get('placement', []))} | {b} | {_fmt(row['ms_per_step'])} | "
                             f"{_fmt(row['tokens_per_s'], 1)} | {_fmt(row['t1_ms'], 1)} | {same_text} |")
    goal = s.get("tp_speed", {}).get("tp2_speedup_batch1")
    if goal and goal["speedup"] is not None:
        lines.append(f"\ntp2 over tp1 at batch 1: {goal['speedup']:.2f}x (goal {goal['goal']}x: "
                     f"{'met' if goal['met'] else 'not met'})")
    if "failover" in s:
        lines += ["", "| dtype | victim | lost | identical | max pause s | detection s | tokens again s | replayed |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for dtype, r in s["failover"].items():
            if isinstance(r, dict) and "lost" in r:
                lines.append(f"| {dtype} | {r['victim']} | {r['lost']} | {r['greedy']['identical']}/{r['requests']} "
                             f"| {_fmt(r['max_gap_s'])} | {_fmt(r['detection_s'])} | {_fmt(r['tokens_again_s'])} "
                             f"| {r['replayed']} |")
    if "allreduce" in s and "rows" in s["allreduce"]:
        lines += ["", "| spec | rows x hidden | us (median) | vs all_reduce | bytes ratio | rel error | compressed |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in s["allreduce"]["rows"]:
            lines.append(f"| {r['spec']} | {r['tokens']}x{r['hidden']} | {r['median_us']:.1f} | "
                         f"{_fmt(r['time_vs_all_reduce'])} | {_fmt(r['bytes_ratio'])} | {r['rel_error']:.2e} | "
                         f"{'yes' if r['compressed'] else 'no'} |")
    lines += [f"FAILED {name}" for name in data["failed"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = {"tp_logits": section_tp_logits, "tp_speed": section_tp_speed, "hetero": section_hetero,
                "failover": section_failover, "allreduce": section_allreduce}
    with tempfile.TemporaryDirectory(prefix="bench-multigpu-") as tmp:
        bench = Bench(args, Path(args.workdir) if args.workdir else Path(tmp))
        m = bench.report.data["machine"]
        bench.log(f"on {', '.join(m.get('gpus', [])) or 'cpu'} ({args.num_devices} used); {args.shape} "
                  f"{args.dtype}; sections {', '.join(args.sections)}")
        bench.report.save()
        for name in (s for s in SECTIONS if s in args.sections):
            bench.current = name
            bench.log(f"{name}: start")
            sub = bench.attempt(bench.report.data["sections"], name, lambda entry, n=name: sections[n](bench, entry))
            bench.log(f"{name}: done in {sub['elapsed_s']:.1f} s")
    bench.report.save()
    print(tables(bench.report.data))
    bench.log(f"wrote {bench.report.path}" + (f"; FAILED: {', '.join(bench.report.data['failed'])}"
                                               if bench.report.data["failed"] else ""))
    return 1 if bench.report.data["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
