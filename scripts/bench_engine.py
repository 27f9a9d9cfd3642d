#!/usr/bin/env python
"""Engine vs Hugging Face transformers ``generate`` on one model on CPU, at several batch sizes, in one run.

Both systems get the same prompt token ids, the same dtype and the same thread count, and are measured
the same way: for each system and batch size B, a generation of N new tokens (t_N) and of 1 new token
(t_1, prefill only), EOS ignored on both sides. Then

    decode tokens/s     = B * (N - 1) / (t_N - t_1)
    end-to-end tokens/s = B * N / t_N
    time to first token ~ t_1

The systems are interleaved (transformers, engine, transformers, engine, ...) for ``--repeats`` rounds
and the medians of t_N and t_1 are used, so background load hits both alike. Results go to a table on
stdout and, with every raw timing, to a JSON file; progress goes to stderr.

    .venv/bin/python scripts/bench_engine.py                  # embedded SmolLM2-135M, float32, B=1,8
    .venv/bin/python scripts/bench_engine.py --dtype bfloat16 --batch-sizes 1,4,8 --repeats 5
    .venv/bin/python scripts/bench_engine.py --model /path/to/hf-dir --threads 2
    .venv/bin/python scripts/bench_engine.py --engine-dtypes float32,float16,bfloat16   # make bench

``--engine-dtypes`` adds engine runs in other dtypes to the same interleaved run (named
``engine-<dtype>``), compared with transformers in ``--dtype``; their greedy agreement with
transformers shows what the lower precision changes.

A model directory without tokenizer files is benchmarked on fixed, seeded random token-id prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16")
MAX_BATCH = 8
NOISY_SPREAD = 1.3  # max/min of t_N above this is reported as a noisy measurement
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
QUICK = {"new_tokens": 8, "repeats": 1, "batch_sizes": "1,2"}
DEFAULTS = {"new_tokens": 64, "repeats": 3, "batch_sizes": "1,8"}

PROMPTS = (
    "Explain in a few sentences why the sky looks blue during the day.",
    "Write a short poem about a lighthouse keeper who loves the winter sea.",
    "What are three practical tips for someone learning to cook at home?",
    "Summarize the plot of a detective story set in a small mountain village.",
    "How does a bicycle stay upright when it is moving?",
    "Give me a packing list for a weekend camping trip in early autumn.",
    "Describe the difference between a virus and a bacterium to a ten-year-old.",
    "Suggest a name and a slogan for a bakery that only sells bread made with local grain.",
)
RANDOM_PROMPT_SEED = 1234
RANDOM_PROMPT_LENGTHS = (8, 40)


class BenchError(Exception):
    """A bad argument or a result that cannot be trusted; main() prints it and returns 2."""


# ------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of BOTH systems (default float32)")
    p.add_argument("--engine-dtypes", default=None,
                   help="comma-separated engine dtypes to measure against transformers in --dtype "
                        "(default: just --dtype)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help=f"N new tokens per generation (default {DEFAULTS['new_tokens']})")
    p.add_argument("--batch-sizes", default=None,
                   help=f"comma-separated batch sizes, each 1..{MAX_BATCH} (default {DEFAULTS['batch_sizes']})")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"interleaved rounds; medians are reported (default {DEFAULTS['repeats']})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--out", default="out/bench_engine.json", help="JSON result file (folder is created)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for tests: new-tokens 8, repeats 1, batch sizes 1,2 (explicit flags win)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.batch_sizes = parse_batch_sizes(args.batch_sizes)
    args.engine_dtypes = [d.strip() for d in (args.engine_dtypes or args.dtype).split(",") if d.strip()]
    bad = [d for d in args.engine_dtypes if d not in DTYPES]
    if bad or not args.engine_dtypes:
        raise BenchError(f"--engine-dtypes: {bad[0] if bad else 'empty'!r} is not one of {', '.join(DTYPES)}")
    if args.new_tokens < 2:
        raise BenchError(f"--new-tokens={args.new_tokens} must be >= 2 (decode rate needs t_N - t_1)")
    if args.repeats < 1:
        raise BenchError(f"--repeats={args.repeats} must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads={args.threads} must be >= 1")
    return args


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--batch-sizes={text!r} must be comma-separated integers, e.g. 1,8") from None
    if not sizes:
        raise BenchError("--batch-sizes is empty")
    bad = [b for b in sizes if not 1 <= b <= MAX_BATCH]
    if bad:
        raise BenchError(f"batch size {bad[0]} is outside 1..{MAX_BATCH} (there are {MAX_BATCH} fixed prompts)")
    return sorted(set(sizes))


# ------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(dtype: str) -> dict[str, Any]:
    import torch
    import transformers

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "dtype": dtype, "loadavg": load_average()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------- prompts
def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).exists() for name in TOKENIZER_FILES)


def random_prompts(vocab_size: int, count: int = MAX_BATCH) -> list[list[int]]:
    """Fixed, seeded token-id prompts of lengths 8..40 (ids avoid 0..2, the usual special tokens)."""
    rng = random.Random(RANDOM_PROMPT_SEED)
    low = 3 if vocab_size > 3 else 0
    return [[rng.randrange(low, vocab_size) for _ in range(rng.randint(*RANDOM_PROMPT_LENGTHS))]
            for _ in range(count)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- systems
@dataclass
class Runner:
    """One system: ``generate(prompts, n)`` returns the new token ids per prompt."""

    name: str
    llm: Any = None
    hf: Any = None
    pad_id: int = 0
    extra: dict[str, list[float]] = field(default_factory=dict)

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        return self._engine(prompts, n) if self.llm is not None else self._transformers(prompts, n)

    def _engine(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        from engine.llm import StepStats
        from engine.sampling import SamplingParams

        self.llm.stats = StepStats()
        outs = self.llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
        st = self.llm.stats
        if st.decode_seconds > 0:
            self.extra.setdefault(f"internal_decode_tok_s_b{len(prompts)}_n{n}", []).append(
                st.decode_tokens / st.decode_seconds)
        return [list(o.token_ids) for o in outs]

    def _transformers(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        import torch

        # Left padding with an attention mask, as tokenizer.pad does with padding_side="left".
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        with torch.inference_mode():
            out = self.hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                   min_new_tokens=n, pad_token_id=self.pad_id)
        return out[:, width:].tolist()


def engine_name(dtype: str, args: argparse.Namespace) -> str:
    return "engine" if dtype == args.dtype else f"engine-{dtype}"


def load_systems(args: argparse.Namespace) -> tuple[Runner, list[Runner], list[list[int]], str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.llm import LLM, EngineConfig
    from engine.model_source import load_hf_config, resolve_model

    model_dir = Path(resolve_model(args.model).path)
    with_tok = has_tokenizer(model_dir)
    vocab = int(load_hf_config(model_dir).get("vocab_size", 0) or 0)
    engines = []
    for dtype in args.engine_dtypes:
        log(f"loading the engine ({args.model or 'embedded'}, {dtype}) from {model_dir}")
        t0 = time.perf_counter()
        # One slot per prompt of the largest batch; 256 tokens of room for the (short) prompts.
        config = EngineConfig(model=args.model, dtype=dtype, num_slots=max(args.batch_sizes),
                              max_seq_len=max(1024, 256 + args.new_tokens))
        engines.append(Runner(engine_name(dtype, args), llm=LLM(config, load_tokenizer=with_tok)))
        log(f"  engine loaded in {time.perf_counter() - t0:.1f} s")
    llm = engines[0].llm
    if with_tok:
        prompts = [llm.encode(text, chat=True) for text in PROMPTS]
        source = "chat-template prompts (fixed English texts)"
    else:
        prompts = random_prompts(vocab or llm.model_cfg.vocab_size)
        source = (f"no tokenizer in {model_dir}: fixed random token-id prompts "
                  f"(seed {RANDOM_PROMPT_SEED}, lengths {RANDOM_PROMPT_LENGTHS[0]}..{RANDOM_PROMPT_LENGTHS[1]})")
    log(f"loading transformers AutoModelForCausalLM ({args.dtype})")
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    pad_id = None
    if with_tok:
        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.padding_side = "left"
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        gc = hf.generation_config
        eos = gc.eos_token_id[0] if isinstance(gc.eos_token_id, list) else gc.eos_token_id
        pad_id = gc.pad_token_id if gc.pad_token_id is not None else (eos if eos is not None else 0)
    log(f"  transformers loaded in {time.perf_counter() - t0:.1f} s")
    return Runner("transformers", hf=hf, pad_id=int(pad_id)), engines, prompts, source, model_dir


# ------------------------------------------------------------------------------------------- measure
def timed(runner: Runner, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = runner.generate(prompts, n)
    elapsed = time.perf_counter() - t0
    lengths = sorted({len(o) for o in out})
    if len(out) != len(prompts) or lengths != [n]:
        raise BenchError(f"{runner.name} returned {len(out)} outputs of lengths {lengths} for "
                         f"{len(prompts)} prompts x {n} tokens: the comparison would be unfair")
    return elapsed, out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How far two systems' greedy outputs agree: identical rows and mean common-prefix length."""
    prefixes = []
    for x, y in zip(a, b, strict=True):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefixes.append(k)
    return {"identical": sum(1 for x, y in zip(a, b, strict=True) if x == y), "of": len(a),
            "mean_common_prefix": statistics.fmean(prefixes), "tokens": len(a[0]) if a else 0}


def run_benchmark(runners: list[Runner], prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    n, sizes = args.new_tokens, args.batch_sizes
    raw: dict[str, dict[str, dict[str, list[float]]]] = {
        r.name: {str(b): {"t_n_s": [], "t_1_s": []} for b in sizes} for r in runners}
    for r in runners:
        b, warm_n = max(sizes), min(n, 16)
        t, _ = timed(r, prompts[:b], warm_n)
        log(f"warm-up  {r.name:<12} B={b} N={warm_n}: {t:.2f} s")
    outputs: dict[int, dict[str, list[list[int]]]] = {b: {} for b in sizes}
    total, done = args.repeats * len(sizes) * len(runners) * 2, 0
    for rnd in range(args.repeats):
        for b in sizes:
            for r in runners:
                for tokens, key in ((n, "t_n_s"), (1, "t_1_s")):
                    t, out = timed(r, prompts[:b], tokens)
                    raw[r.name][str(b)][key].append(t)
                    if tokens == n:
                        outputs[b].setdefault(r.name, out)
                    done += 1
                    log(f"[{done}/{total}] round {rnd + 1}/{args.repeats}  {r.name:<12} B={b} N={tokens:<4} "
                        f"{t:8.3f} s")
    engines = [r.name for r in runners if r.name != "transformers"]
    return {"raw": raw, "agreement": {
        name: {str(b): agreement(o["transformers"], o[name]) for b, o in outputs.items()} for name in engines}}


def decode_rate(b: int, n: int, t_n: float, t_1: float) -> float | None:
    # None when noise made t_N <= t_1: there is no meaningful decode rate then.
    return b * (n - 1) / (t_n - t_1) if t_n > t_1 else None


def summarize(raw: dict[str, Any], sizes: list[int], n: int, systems: list[str]
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rates from the median times (the headline) and from the minimum times ("best": least disturbed
    by other load), plus the spread max/min of t_N, which flags a noisy measurement."""
    rows = []
    for system in systems:
        for b in sizes:
            times = raw[system][str(b)]
            t_n, t_1 = statistics.median(times["t_n_s"]), statistics.median(times["t_1_s"])
            best_n, best_1 = min(times["t_n_s"]), min(times["t_1_s"])
            rows.append({"system": system, "batch": b, "new_tokens": n, "t_n_median_s": t_n, "t_1_median_s": t_1,
                         "decode_tok_s": decode_rate(b, n, t_n, t_1), "e2e_tok_s": b * n / t_n,
                         "ttft_ms": t_1 * 1000.0, "t_n_min_s": best_n, "t_1_min_s": best_1,
                         "decode_tok_s_best": decode_rate(b, n, best_n, best_1),
                         "t_n_spread": max(times["t_n_s"]) / best_n})
    by_key = {(r["system"], r["batch"]): r for r in rows}
    ratios: dict[str, Any] = {"decode_over_transformers": {}, "decode_best_over_transformers": {}}
    for system in systems[1:]:
        for b in sizes:
            e, h = by_key[(system, b)], by_key[("transformers", b)]
            for name, key in (("decode_over_transformers", "decode_tok_s"),
                              ("decode_best_over_transformers", "decode_tok_s_best")):
                ratios[name].setdefault(system, {})[str(b)] = e[key] / h[key] if e[key] and h[key] else None
    if "engine" in systems:  # the same-dtype comparison, under its own keys
        ratios["decode_engine_over_transformers"] = ratios["decode_over_transformers"]["engine"]
        ratios["decode_best_engine_over_transformers"] = ratios["decode_best_over_transformers"]["engine"]
    return rows, ratios


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def print_report(result: dict[str, Any]) -> None:
    m, s = result["machine"], result["settings"]
    print(f"machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
          f"torch {m['torch']}, transformers {m['transformers']}, threads {m['threads']}, dtype {m['dtype']}")
    print(f"model:   {s['model']} ({s['model_dir']})")
    print(f"prompts: {s['prompt_source']}; lengths {s['prompt_lengths']}")
    print(f"setup:   N={s['new_tokens']} new tokens, EOS ignored, greedy; medians of {s['repeats']} interleaved "
          f"round(s); decode = B*(N-1)/(t_N - t_1), e2e = B*N/t_N, TTFT ~ t_1")
    print()
    print(f"{'system':<13} {'batch':>5} {'decode tok/s':>13} {'e2e tok/s':>10} {'TTFT ms':>9}   "
          f"{'best decode':>11} {'t_N spread':>10}")
    for r in result["results"]:
        print(f"{r['system']:<13} {r['batch']:>5} {_fmt(r['decode_tok_s'], '13.1f')} "
              f"{_fmt(r['e2e_tok_s'], '10.1f')} {_fmt(r['ttft_ms'], '9.1f')}   "
              f"{_fmt(r['decode_tok_s_best'], '11.1f')} {r['t_n_spread']:>9.2f}x")
    print("(decode/e2e/TTFT from median times; best decode from minimum times; spread = max/min of t_N)")
    print()
    for system, per_batch in result["ratios"]["decode_over_transformers"].items():
        best = result["ratios"]["decode_best_over_transformers"][system]
        for b, ratio in per_batch.items():
            ag = result["agreement"][system][b]
            print(f"batch {b}: {system}/transformers decode tok/s = {_fmt(ratio, '.2f')}x "
                  f"(best: {_fmt(best[b], '.2f')}x)   greedy outputs identical for {ag['identical']}/{ag['of']} "
                  f"prompts, mean common prefix {ag['mean_common_prefix']:.1f}/{ag['tokens']} tokens")
    noisy = [f"{r['system']} B={r['batch']}" for r in result["results"] if r["t_n_spread"] > NOISY_SPREAD]
    if noisy:
        print(f"WARNING: noisy measurement (t_N varied more than {NOISY_SPREAD:.1f}x for {', '.join(noisy)}; "
              f"load average {result['machine']['loadavg_start']} -> {result['machine']['loadavg']}): "
              "other processes compete for the CPU; rerun on a quiet machine or with more --repeats")


# ---------------------------------------------------------------------------------------------- main
def _ensure_importable() -> None:
    """Running ``python scripts/bench_engine.py`` puts scripts/ (not the repo root) on sys.path."""
    if str(REPO_ROOT) not in sys.path:
        try:
            import engine  # noqa: F401
        except ImportError:
            sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as e:
        print(f"bench_engine: {e}", file=sys.stderr)
        return 2
    _ensure_importable()
    import torch

    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    except BenchError as e:
        print(f"bench_engine: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process (tests)


def _run(args: argparse.Namespace) -> int:
    load_start = load_average()
    hf_runner, engine_runners, prompts, source, model_dir = load_systems(args)
    runners = [hf_runner, *engine_runners]
    measured = run_benchmark(runners, prompts, args)
    rows, ratios = summarize(measured["raw"], args.batch_sizes, args.new_tokens, [r.name for r in runners])
    result = {
        "machine": {**machine_info(args.dtype), "loadavg_start": load_start},
        "settings": {"model": args.model or "embedded SmolLM2-135M-Instruct", "model_dir": str(model_dir),
                     "dtype": args.dtype, "new_tokens": args.new_tokens, "batch_sizes": args.batch_sizes,
                     "repeats": args.repeats, "quick": args.quick, "prompt_source": source,
                     "prompt_lengths": [len(p) for p in prompts], "engine_dtypes": args.engine_dtypes,
                     "systems_order": [r.name for r in runners]},
        "raw": measured["raw"],
        "engine_internal": {r.name: r.extra for r in engine_runners},
        "results": rows,
        "ratios": ratios,
        "agreement": measured["agreement"],
    }
    print_report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
