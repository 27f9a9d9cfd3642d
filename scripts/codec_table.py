#!/usr/bin/env python
"""The README's codec table in one command: accuracy and link speed of each codec against exact.

It runs scripts/bench_codecs.py (accuracy on the embedded model: bytes against a bf16 wire, KL of
next-token distributions, top-1 agreement, perplexity change on the held-out text set, greedy
continuations of 64 tokens) and scripts/bench_links.py (time to first token of a 512-token prompt and
decode speed, 2 nodes in network namespaces behind tc-limited links of 100 Mbit/s and 1 Gbit/s; needs
root) for the same codecs, then prints one markdown table and, with ``--readme``, puts it into
README.md between the ``codec-table`` markers.

``auto`` has no accuracy row of its own: on a link where it compresses it is its codec
(``node/link.py``, AUTO_CODEC); where it does not, it is exact.

``--gpu-links FILE`` adds the TTFT speedups of a bench_links.py run on a GPU (JSON; its card is named
in the column) made separately, since the accuracy model cannot travel to the GPU machine.

    sudo .venv/bin/python scripts/codec_table.py --readme
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "proto"))

CODECS = "exact,int8,int8:rotate=true,outliers=3,int4,int4:outliers=4,lowrank:rank=8,lowrank:rank=32,auto"
START, END = "<!-- codec-table:start -->", "<!-- codec-table:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codecs", default=CODECS, help=f"codec specs, comma-separated (default {CODECS})")
    p.add_argument("--rates", default="100mbit,1gbit")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-links", default=None, metavar="FILE", help="bench_links.py JSON from a GPU run")
    p.add_argument("--out-dir", default="out/codec_table")
    p.add_argument("--readme", action="store_true", help="write the table into README.md between the markers")
    p.add_argument("--quick", action="store_true", help="tiny settings (tests): bench_codecs --quick, "
                   "no link runs")
    return p.parse_args(argv)


def canonical(spec: str) -> str:
    from node.link import parse_link_codec

    return str(parse_link_codec(spec))


def speedups(links: dict[str, Any], tokens: int) -> dict[tuple[str, str], dict[str, float]]:
    """(canonical codec, rate) -> TTFT speedup over exact at that rate, and decode speed relative to exact."""
    rows = links["rows"]
    base = {r["rate"]: r for r in rows if canonical(r["codec"]) == "exact"}
    out = {}
    for r in rows:
        b = base.get(r["rate"])
        if b is None or f"ttft_{tokens}_s" not in r:
            continue
        out[(canonical(r["codec"]), r["rate"])] = {"ttft": b[f"ttft_{tokens}_s"] / r[f"ttft_{tokens}_s"],
                                                   "decode": r["decode_tok_s"] / b["decode_tok_s"]}
    return out


def table(accuracy: dict[str, Any], specs: list[str], rates: list[str], links: dict | None, gpu: dict | None,
          tokens: int) -> str:
    by_codec = {r["codec"]: r for r in accuracy["results"]}
    cpu_speed = speedups(links, tokens) if links else {}
    gpu_speed = speedups(gpu, tokens) if gpu else {}
    gpu_rates = list(dict.fromkeys(rate for _, rate in gpu_speed))
    head = ["codec", "bytes vs bf16", "KL mean", "top-1", "greedy identical / mean prefix", "ppl change"]
    head += [f"TTFT {tokens} @ {rate} (CPU)" for rate in rates] + ["decode vs exact (CPU)"]
    if gpu:
        card = gpu.get("machine", {}).get("gpu", "GPU")
        shape = gpu.get("settings", {}).get("shape") or "model"
        head += [f"TTFT {tokens} @ {rate} ({card}, {shape})" for rate in gpu_rates]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for spec in specs:
        name = canonical(spec)
        acc = by_codec.get(name)
        if acc is not None and not name.startswith("auto"):
            g = acc["greedy"]
            cells = [f"{acc['bytes_ratio']['prefill']:.2f}x", f"{acc['kl_mean']:.2e}",
                     f"{100 * acc['top1_agreement']:.2f}%",
                     f"{g['identical_prompts']}/{g['prompts']} / {100 * g['prefix_agreement_mean']:.0f}%",
                     f"{acc['perplexity_change_pct']:+.2f}%"]
        else:
            cells = ["as its codec where it compresses"] + [""] * 4
        cells += [_x(cpu_speed.get((name, rate), {}).get("ttft")) for rate in rates]
        decode = [cpu_speed[(name, r)]["decode"] for r in rates if (name, r) in cpu_speed]
        cells.append(f"{min(decode):.2f}-{max(decode):.2f}x" if decode else "-")
        cells += [_x(gpu_speed.get((name, rate), {}).get("ttft")) for rate in gpu_rates]
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    ref = by_codec.get("exact (fp32 wire)")
    if ref is not None:
        lines.append(f"\nBaseline: the exact codec on a bf16 wire. An fp32 wire differs from it at "
                     f"{ref['top1_disagreements']} of {ref['positions']} positions (the bf16 cast alone).")
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def write_readme(text: str) -> None:
    readme = REPO_ROOT / "README.md"
    body = readme.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    readme.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", body, count=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from engine.codecs import split_specs
    from scripts import bench_codecs, bench_links
    from tests.faults.netns import netns_unavailable

    try:
        specs = split_specs(args.codecs)
        for spec in specs:
            canonical(spec)
    except ValueError as e:
        print(f"codec_table: {e}", file=sys.stderr)
        return 2
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    accuracy_specs = [s for s in specs if not canonical(s).startswith("auto")]
    acc_args = ["--codecs", ",".join(accuracy_specs), "--text-set", "heldout", "--out", str(out / "accuracy.json")]
    if bench_codecs.main(acc_args + (["--quick"] if args.quick else [])) != 0:
        return 1
    accuracy = json.loads((out / "accuracy.json").read_text())
    links = None
    reason = "--quick" if args.quick else netns_unavailable()
    if reason is None:
        link_args = ["--codecs", ",".join(specs), "--rates", ",".join(rates), "--prompt-tokens",
                     str(args.prompt_tokens), "--repeats", str(args.repeats), "--out", str(out / "links.json")]
        if bench_links.main(link_args) != 0:
            return 1
        links = json.loads((out / "links.json").read_text())
    else:
        print(f"codec_table: no link runs ({reason}): the TTFT columns stay empty", file=sys.stderr)
    gpu = json.loads(Path(args.gpu_links).read_text()) if args.gpu_links else None
    text = table(accuracy, specs, rates, links, gpu, args.prompt_tokens)
    print(text)
    (out / "table.md").write_text(text + "\n")
    if args.readme:
        write_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
