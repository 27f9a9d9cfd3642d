#!/usr/bin/env python
"""Start a local cluster (a coordinator and N nodes on this machine, through the public CLIs), stream an
answer to a demo prompt, then keep serving until interrupted (Ctrl-C stops every process).

    .venv/bin/python scripts/local_cluster.py                       # 2 nodes, the embedded model
    .venv/bin/python scripts/local_cluster.py --nodes 3 --prompt "Tell me a joke."
    .venv/bin/python scripts/local_cluster.py --once                # answer, then stop (for CI and demos)

While it runs, other terminals can use it: `tensorfleet status --coordinator ADDRESS`,
`tensorfleet generate "..." --coordinator ADDRESS`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_PROMPT = "In two sentences: why do people split a large language model across several machines?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--nodes", type=int, default=2, help="number of nodes, one pipeline stage each (default 2)")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--once", action="store_true", help="stop after the demo answer")
    args = p.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from client.api import TensorfleetClient
    from client.display import format_status
    from coordinator.local_cluster import LocalCluster, NodeSpec
    from engine.model_source import resolve_model

    model_dir = str(resolve_model(args.model).path)  # convert a GGUF once, before the processes start
    with tempfile.TemporaryDirectory(prefix="tensorfleet-") as work:
        nodes = [NodeSpec(devices="cpu", model_dir=model_dir) for _ in range(args.nodes)]
        print(f"starting a coordinator on 127.0.0.1:{args.port} and {args.nodes} node(s); logs in {work}",
              file=sys.stderr)
        with LocalCluster(work, model=model_dir, nodes=nodes, port=args.port,
                          coordinator_args=["--stages", str(args.nodes)]) as cluster:
            with TensorfleetClient(cluster.address) as client:
                print(format_status(client.status()))
                print(f"\n>>> {args.prompt}")
                for delta in client.generate_stream(args.prompt, max_tokens=args.max_tokens):
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
                print()
            if args.once:
                return 0
            print(f"\nserving on {cluster.address} until Ctrl-C (try: .venv/bin/tensorfleet generate \"Hi\" "
                  f"--coordinator {cluster.address})", file=sys.stderr)
            try:
                while all(proc.poll() is None for proc in cluster.procs.values()):
                    time.sleep(1)
            except KeyboardInterrupt:
                print("\nstopping", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
