#!/usr/bin/env python
"""Faults under load: kill, hang and cut off a node mid-generation; measure detection, time until tokens
flow again, and lost or changed requests.

For each fault of ``--faults``, a fresh local cluster (``--nodes`` CPU nodes, ``--stages`` stages, so the
other nodes are spares) serves ``--concurrency`` streaming requests (greedy, or seeded sampling with
``--sampling seeded``) twice: once undisturbed (the reference), then again while the fault hits the node
that holds stage ``--victim-stage`` once the clients have received ``--fault-at`` of the expected tokens:

- ``kill``: SIGKILL to the node's process group (daemon and executors);
- ``stop``: SIGSTOP to it (a hang: its sockets stay open, nothing answers); SIGCONT after the run, when
  it must rejoin as a new member without disturbing anything;
- ``cut``: its network link goes down (each node in its own network namespace joined to the host by a
  veth pair; needs root); the link comes back after the run, with the same checks.

Reported per fault: detection (the coordinator noticing, from its placement-change record, minus the
fault's time), resumption (the new placement serving), tokens flowing again (the first token any client
receives after the failover began, minus the fault's time), lost requests (ended in an error or not at
all), and changed requests (output differs from the reference). Goals on CPU with the embedded model:
detection under 1.5 s, tokens again within 5 s, 0 lost, 0 changed. JSON to ``--out``.

    .venv/bin/python scripts/bench_faults.py                       # kill, stop (and cut as root)
    .venv/bin/python scripts/bench_faults.py --faults kill --sampling seeded
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "proto"))

from client.workload import StreamingWorkload  # noqa: E402 - after the path setup

FAULTS = ("kill", "stop", "cut")
PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain what a CPU does in one sentence.", "Name a famous painter.", "What is 12 times 12?",
    "Give me a synonym for happy.", "Translate 'good morning' into Spanish.",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", default=None, help="comma-separated, of kill, stop, cut (default: kill,stop, "
                                                  "plus cut when network namespaces are available)")
    p.add_argument("--sampling", default="greedy", choices=("greedy", "seeded"))
    p.add_argument("--concurrency", type=int, default=16, help="streaming requests at once (default 16)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per request (default 48)")
    p.add_argument("--nodes", type=int, default=3, help="CPU nodes (default 3)")
    p.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2: one spare node)")
    p.add_argument("--victim-stage", type=int, default=-1, help="the stage whose node fails (default: last)")
    p.add_argument("--fault-at", type=float, default=0.3, help="inject once this share of the expected tokens "
                                                               "arrived (default 0.3)")
    p.add_argument("--heartbeat-ms", type=int, default=200, help="heartbeat interval (default 200)")
    p.add_argument("--heartbeat-timeout-ms", type=int, default=1000, help="heartbeat timeout (default 1000)")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--out", default="out/bench_faults.json")
    p.add_argument("--workdir", default=None, help="keep the clusters' logs here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.faults is None:
        from tests.faults.netns import netns_unavailable

        args.faults = "kill,stop" + ("" if netns_unavailable() else ",cut")
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    bad = [f for f in args.faults if f not in FAULTS]
    if bad or not args.faults:
        p.error(f"--faults must name some of {', '.join(FAULTS)}, got {bad or 'none'}")
    if not 1 <= args.stages < args.nodes + 1 or args.concurrency < 1 or args.max_tokens < 2:
        p.error("need 1 <= --stages <= --nodes, --concurrency >= 1 and --max-tokens >= 2")
    if not 0.0 < args.fault_at < 1.0:
        p.error("--fault-at must be in (0, 1)")
    return args


def workload(address: str, args: argparse.Namespace, tag: str) -> StreamingWorkload:
    seeded = range(args.concurrency) if args.sampling == "seeded" else ()
    return StreamingWorkload(address, PROMPTS, count=args.concurrency, max_tokens=args.max_tokens, seeded=seeded,
                             tag=tag, timeout=args.request_timeout)


def victim_node(address: str, stage: int) -> str:
    from client.api import TensorfleetClient

    with TensorfleetClient(address, timeout=10) as client:
        status = client.status()
    node_id = status.stages[stage].members[0].node_id
    return next(n.info.name for n in status.nodes if n.node_id == node_id)


def run_fault(fault: str, args: argparse.Namespace, model_dir: str, workdir: Path) -> dict[str, Any]:
    from client.api import TensorfleetClient
    from coordinator.local_cluster import LocalCluster, NodeSpec

    with ExitStack() as stack:
        fabric = None
        host = "127.0.0.1"
        if fault == "cut":
            from tests.faults.netns import Fabric

            fabric = stack.enter_context(Fabric(args.nodes, prefix=f"tfb{os.getpid() % 1000}"))
            host = fabric.host_address
        nodes = [NodeSpec(devices="cpu", model_dir=model_dir, name=f"node{i}",
                          netns=fabric.netns(i) if fabric else None, host=fabric.address(i) if fabric else None)
                 for i in range(args.nodes)]
        cluster = LocalCluster(workdir / fault, model=model_dir, nodes=nodes, host=host, coordinator_args=[
            "--stages", str(args.stages), "--slots", str(args.concurrency), "--max-seq-len", "512",
            "--heartbeat-ms", str(args.heartbeat_ms), "--heartbeat-timeout-ms", str(args.heartbeat_timeout_ms)])
        stack.callback(cluster.stop)
        log(f"[{fault}] starting {args.nodes} nodes, {args.stages} stages")
        cluster.start(timeout_s=300)
        reference = workload(cluster.address, args, "ref").run()
        name = victim_node(cluster.address, args.victim_stage)
        index = int(name.removeprefix("node"))
        log(f"[{fault}] reference done; now the faulty run, {name} fails at {args.fault_at:.0%} of the tokens")
        run = workload(cluster.address, args, "run").start()
        run.wait_tokens(int(args.fault_at * args.concurrency * args.max_tokens), args.request_timeout)
        t_fault = time.time()
        if fault == "kill":
            cluster.signal_node(name, signal.SIGKILL)
        elif fault == "stop":
            cluster.signal_node(name, signal.SIGSTOP)
        else:
            fabric.cut(index)
        run.join()
        # The node comes back: it must rejoin as a new member and disturb nothing.
        if fault == "stop":
            cluster.signal_node(name, signal.SIGCONT)
        elif fault == "cut":
            fabric.restore(index)
        after = None
        if fault != "kill":
            time.sleep(3 * args.heartbeat_timeout_ms / 1000 + 1)
            after = workload(cluster.address, args, "after").run()
        with TensorfleetClient(cluster.address, timeout=10) as client:
            status = client.status()
        return report(fault, name, t_fault, reference, run, after, status)


def report(fault: str, victim: str, t_fault: float, reference: StreamingWorkload, run: StreamingWorkload,
           after: StreamingWorkload | None, status: Any) -> dict[str, Any]:
    changes = [c for c in status.placement_changes if c.kind == "failure" and c.detected_at >= t_fault - 1]
    change = changes[0] if changes else None
    arrivals = sorted(t for r in run.records for t in r.arrivals)
    flowing = None
    if change is not None:
        later = [t for t in arrivals if t > change.detected_at]
        flowing = later[0] - t_fault if later else None
    ref = reference.outputs()
    lost = len(run.lost())
    changed = sum(1 for mine, theirs in zip(run.outputs(), ref, strict=True) if mine != theirs)
    result = {
        "fault": fault, "victim": victim, "fault_at_unix": t_fault,
        "detection_s": change.detected_at - t_fault if change else None,
        "resumed_s": change.resumed_at - t_fault if change and change.resumed_at else None,
        "tokens_again_s": flowing, "requests": len(run.records), "lost": lost, "changed": changed,
        "errors": [r.error for r in run.records if r.error],
        "replayed": change.requests_replayed if change else None,
        "layers_moved": change.layers_moved if change else None, "epoch": status.epoch.value,
        "change_reason": change.reason if change else None,
        "after_return": None,
    }
    if after is not None:
        result["after_return"] = {
            "lost": len(after.lost()),
            "changed": sum(1 for mine, theirs in zip(after.outputs(), ref, strict=True) if mine != theirs),
            "nodes": len(status.nodes), "epoch": status.epoch.value,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from engine.model_source import resolve_model

    model_dir = str(resolve_model(None).path)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        if args.workdir:
            tmp = args.workdir
        for fault in args.faults:
            results.append(run_fault(fault, args, model_dir, Path(tmp)))
            r = results[-1]
            log(f"[{fault}] detection {_s(r['detection_s'])}, tokens again {_s(r['tokens_again_s'])}, "
                f"lost {r['lost']}, changed {r['changed']} of {r['requests']}")
    print(f"{'fault':6} {'detect s':>9} {'resumed s':>10} {'tokens again s':>15} {'lost':>5} {'changed':>8} "
          f"{'replayed':>9} {'moved':>6}  after return")
    for r in results:
        back = r["after_return"]
        back_text = "-" if back is None else f"lost {back['lost']}, changed {back['changed']}"
        print(f"{r['fault']:6} {_s(r['detection_s']):>9} {_s(r['resumed_s']):>10} {_s(r['tokens_again_s']):>15} "
              f"{r['lost']:>5} {r['changed']:>8} {r['replayed']!s:>9} {r['layers_moved']!s:>6}  {back_text}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()}, "results": results}, indent=1))
    log(f"wrote {out}")
    ok = all(r["lost"] == 0 and r["changed"] == 0 and (r["after_return"] is None or
                                                      (r["after_return"]["lost"] == 0 and
                                                       r["after_return"]["changed"] == 0)) for r in results)
    return 0 if ok else 1


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
