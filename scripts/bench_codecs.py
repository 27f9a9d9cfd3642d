#!/usr/bin/env python
"""Accuracy of the stage-to-stage activation codecs (``engine/codecs.py``) on a real model, in one run.

The model (default: the embedded SmolLM2-135M, fp32) is split into ``--stages`` pipeline stages in one
process; every hidden-state message between two stages is cast to ``--wire-dtype`` (default bfloat16,
the realistic wire format), encoded, decoded and cast back (``LLM.forward(..., boundary=...)``). The
baseline is the ``exact`` codec over the same wire dtype, so only the codec differs; ``exact`` over an
fp32 wire is reported for reference (what the bf16 cast itself costs). Against the baseline, per codec:

- bytes ratio: baseline wire bytes / encoded bytes over the real messages of the greedy runs (8 chat
  prompts prefilled as one batch, then one decode message per step): prefill, decode and overall;
- KL(p_baseline || p_codec) of the next-token distributions (mean and max over positions) and top-1
  agreement (share of positions whose argmax agrees), teacher-forced (``all_logits``) over a fixed set
  of English passages, one passage per forward;
- perplexity on those passages (every next token; token-weighted), and its change in %;
- greedy continuation: ``--greedy-tokens`` (default 64) greedy tokens per chat prompt, EOS ignored;
  the mean share of tokens identical up to the first divergence, and how many prompts are identical;
- encode+decode time per message on this CPU (a side figure; the machine may be shared).

The low-rank codec keeps state per key (the last Q, to warm-start the power iteration): messages use
one key per (boundary, message kind), so decode steps warm-start from the previous decode step and
prefills from the previous prefill; each phase (teacher-forced, greedy) starts with fresh codecs.

A markdown table goes to stdout, the goal verdicts after it; everything, with per-prompt details, goes to
``--out`` (JSON); progress goes to stderr. Goals (from the issue, judged against ``--wire-dtype``): int8
at least 1.9x fewer bytes with top-1 agreement >= 99.5%; 4-bit at least 3.5x with >= 98%; low-rank
is reported as measured. Nothing is tuned to pass: a goal that is missed is printed as NOT MET.

    .venv/bin/python scripts/bench_codecs.py                     # 2 stages, bf16 wire, all default codecs
    .venv/bin/python scripts/bench_codecs.py --stages 3 --codecs exact,int8,int4
    .venv/bin/python scripts/bench_codecs.py --boundaries 10     # split after layer 10 (of 30)
    .venv/bin/python scripts/bench_codecs.py --quick             # tiny settings (the test)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CODECS = "exact,int8,int8:rotate=true,int4,int4:rotate=false,lowrank:rank=8,lowrank:rank=32"
WIRE_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_STAGES = 2
DEFAULT_GREEDY_TOKENS = 64
QUICK = {"passages": 2, "passage_tokens": 48, "prompts": 2, "greedy_tokens": 8}
# (codec name, label, minimum bytes ratio vs the wire dtype, minimum top-1 agreement)
GOALS = (("int8", "int8", 1.9, 0.995), ("int4", "4-bit", 3.5, 0.98))
REFERENCE = "exact (fp32 wire)"

# Fixed, varied English passages for teacher forcing (perplexity, KL, top-1).
PASSAGES = (
    "The history of the bicycle is a story of small improvements. Early machines had no pedals at all: "
    "riders pushed themselves along with their feet. Pedals were first fixed to the front wheel, which "
    "grew larger and larger to make each turn of the cranks carry the rider further. The chain drive and "
    "two wheels of equal size finally made the safety bicycle, the shape most bicycles still have today.",
    "To make a simple loaf of bread, mix five hundred grams of flour with ten grams of salt, seven grams "
    "of dried yeast and about three hundred and fifty millilitres of warm water. Knead the dough for ten "
    "minutes until it is smooth and elastic, then leave it covered in a warm place until it has doubled "
    "in size. Shape it, let it rise once more, and bake it in a hot oven for around thirty minutes.",
    "Photosynthesis is the process by which green plants turn light into chemical energy. In the "
    "chloroplasts, chlorophyll absorbs mostly red and blue light, and that energy is used to split water "
    "molecules, releasing oxygen. The plant then uses carbon dioxide from the air to build sugars, which "
    "it stores or burns to power its growth. Nearly all life on Earth depends on this process.",
    "Dear Ms. Patel, thank you for your letter of the fourteenth. I am sorry to hear that the parcel "
    "arrived damaged. We have arranged for a replacement to be sent by courier this week, at no cost to "
    "you, and there is no need to return the broken item. Please do not hesitate to contact me if there "
    "is anything else we can do. Yours sincerely, Daniel Moore, Customer Service.",
    "The old lighthouse stood at the end of a narrow spit of rock. Every evening the keeper climbed the "
    "one hundred and twelve steps to light the lamp, and every morning he climbed them again to put it "
    "out. In the winter storms the waves threw spray as high as the gallery, and the whole tower seemed "
    "to hum with the wind. He never once missed a night in thirty years.",
    "A hash table stores values under keys. A hash function turns each key into an index in an array of "
    "buckets; to find a value, the table hashes the key and looks only in that bucket. When two keys land "
    "in the same bucket, the table must resolve the collision, for example by keeping a short list in "
    "each bucket or by probing for the next free slot. Lookups take constant time on average.",
    "The French Revolution began in 1789, when a financial crisis forced King Louis XVI to call the "
    "Estates-General for the first time in more than a century. The representatives of the common people "
    "declared themselves a National Assembly, and within weeks a crowd in Paris stormed the Bastille. "
    "Over the following decade France abolished its monarchy and went through years of war and terror.",
    "Regular exercise is one of the best things you can do for your health. Adults should aim for at "
    "least one hundred and fifty minutes of moderate activity a week, such as brisk walking or cycling, "
    "along with exercises that strengthen the muscles on two or more days. Even short walks help: "
    "people who sit less and move more tend to sleep better and feel less anxious.",
    "Interest rates are the price of borrowing money. When a central bank raises its rate, loans and "
    "mortgages become more expensive, people and firms borrow and spend less, and inflation tends to "
    "slow. When it cuts the rate, borrowing becomes cheaper and spending usually picks up. The effects "
    "take time, often a year or more, to work their way through the economy.",
    "The match was decided in the final minute. With the score level at one goal each, the visiting "
    "captain won the ball in midfield, played a quick pass out to the left wing and sprinted into the box. "
    "The cross was low and hard, and she met it at the near post with the outside of her boot. The home "
    "crowd fell silent as the ball curled into the top corner.",
    "Glaciers form where more snow falls in winter than melts in summer. Over many years the snow is "
    "pressed into dense ice, which slowly flows downhill under its own weight. As it moves, a glacier "
    "scrapes the rock beneath it, carving deep U-shaped valleys and carrying boulders for many "
    "kilometres. Most of the world's glaciers have been shrinking for more than a century.",
    "Once upon a time, a fox found a bunch of grapes hanging from a vine high above the path. He jumped "
    "and jumped, but he could not reach them. At last he walked away with his nose in the air, saying, "
    "\"I am sure they were sour anyway.\" It is easy to pretend that we never wanted the things we cannot "
    "have.",
)

# A second set, written after codec settings had been explored on PASSAGES: settings picked on one set
# are confirmed on the other (``--text-set heldout``), so a goal is not met by choosing among noise.
HELDOUT_PASSAGES = (
    "Glaciers form where more snow falls in winter than melts in summer. Year after year the snow is "
    "pressed into dense ice, and once the ice is thick enough it begins to flow downhill under its own "
    "weight, grinding the rock beneath it into fine powder and carving valleys into a U shape.",
    "Our meeting on Thursday will start at half past nine in the small conference room on the third "
    "floor. Please bring the draft budget and your notes on the supplier contracts. If you cannot attend, "
    "send your comments to Maria by Wednesday evening so that she can raise them for you.",
    "The recipe for a good vegetable soup is mostly patience. Soften an onion, two carrots and a stick of "
    "celery in olive oil over a low heat for twenty minutes, add chopped potatoes, tomatoes and stock, "
    "then simmer until everything is tender. Season at the end, not at the start.",
    "In chess, the opening is about three things: developing your pieces, controlling the centre and "
    "keeping your king safe. Beginners often move the same piece twice or bring the queen out too early, "
    "where it can be chased around the board while the opponent develops with tempo.",
    "The train left the station ten minutes late and crawled through the suburbs in the rain. By the time "
    "it reached the coast the clouds had broken, and the passengers pressed against the windows to watch "
    "the sun come out over a grey and restless sea.",
    "A compiler translates a program written in a high-level language into machine code. It first splits "
    "the source text into tokens, parses them into a tree that reflects the program's structure, checks "
    "types and names, and finally generates instructions, often improving them along the way.",
    "Honey bees communicate the location of flowers with a dance. A forager returning to the hive walks in "
    "a figure of eight, waggling her body in the straight middle part; the angle of that run shows the "
    "direction relative to the sun, and its length tells the distance.",
    "The city council voted on Monday to extend the cycle lane along the river by another two kilometres. "
    "Supporters said the change would make the route safer for commuters, while some shop owners worried "
    "that the loss of parking spaces would keep customers away during the works.",
    "Sleep is not a single state. Over the night the brain cycles through light sleep, deep slow-wave sleep "
    "and rapid eye movement sleep, each cycle lasting roughly ninety minutes. Most dreaming happens in the "
    "REM phase, when the body's muscles are almost completely relaxed.",
    "To replace a bicycle inner tube, first remove the wheel and let out any remaining air. Use tyre levers "
    "to lift one side of the tyre off the rim, pull out the old tube, and check the inside of the tyre for "
    "thorns or glass before fitting the new tube and pumping it up.",
    "The Roman road network stretched for tens of thousands of miles. Built by soldiers and engineers, the "
    "roads were made of layers of stone and gravel, slightly curved so that rain ran off to the sides, and "
    "they allowed armies, traders and messages to move quickly across the empire.",
    "Volcanoes are openings in the Earth's crust through which molten rock, gas and ash escape. Many lie "
    "along the edges of tectonic plates, where one plate slides beneath another and melts, feeding "
    "chambers of magma that can erupt after centuries of quiet.",
    "She opened the letter slowly, already guessing what it would say. The handwriting was her "
    "grandmother's, shaky but careful, and the paper smelled faintly of lavender. Inside, folded twice, "
    "was a photograph of a house she had never seen.",
    "A budget is simply a plan for money. List what comes in each month, then what goes out, starting "
    "with fixed costs such as rent and bills. Whatever is left can be split between savings, debts and "
    "the things you enjoy, and it helps to review the plan every few months.",
    "Electric cars store energy in large lithium-ion batteries and use electric motors to turn the wheels. "
    "They are quiet and efficient, converting most of the stored energy into motion, and they can recover "
    "some energy when braking by running the motor as a generator.",
    "The museum's new exhibition brings together more than two hundred objects from the ancient city, "
    "including jewellery, coins, cooking pots and fragments of painted walls. Visitors can also walk "
    "through a full-size reconstruction of a merchant's house.",
    "Version control systems record every change made to a set of files. Developers can see who changed "
    "what and why, go back to an earlier state when something breaks, and work on separate branches that "
    "are merged together once the work is ready.",
    "Whales are mammals, not fish. They breathe air through blowholes on the tops of their heads, give "
    "birth to live young and feed them milk. Some species, such as the blue whale, feed by filtering huge "
    "amounts of tiny shrimp-like krill from the water.",
    "The hikers reached the ridge just after noon. Below them the valley spread out in shades of green and "
    "gold, and far to the north they could see the white peaks they would cross tomorrow. They ate their "
    "lunch in silence, too tired and too happy to talk.",
    "When learning a new language, little and often works better than long sessions once a week. Ten "
    "minutes of vocabulary each morning, a short conversation with a friend and listening to the radio "
    "while cooking will build up more than a single evening of grammar exercises.",
    "The printing press, developed in Europe in the fifteenth century, made books far cheaper to produce. "
    "Ideas spread faster than ever before, literacy grew, and the new technology played a part in the "
    "scientific revolution and the religious debates of the following decades.",
    "Good passwords are long rather than complicated. A phrase of four or five unrelated words is easier to "
    "remember and harder to guess than a short jumble of symbols, and a password manager can keep a "
    "different one for every site so that one leak does not open every account.",
    "The storm arrived in the night. Wind tore slates from the roofs, the river rose over its banks, and by "
    "morning the main road was closed by fallen trees. Volunteers spent the day clearing branches and "
    "checking on elderly neighbours who had lost power.",
    "Tides are caused mainly by the Moon's gravity pulling on the oceans. The water bulges towards the Moon "
    "on one side of the Earth and away from it on the other, so most coasts see two high tides and two low "
    "tides roughly every day.",
)

# Fixed chat prompts for the greedy continuations.
PROMPTS = (
    "Explain in a few sentences why the sky looks blue during the day.",
    "Write a short poem about a lighthouse keeper who loves the winter sea.",
    "What are three practical tips for someone learning to cook at home?",
    "How does a bicycle stay upright when it is moving?",
    "Give me a packing list for a weekend camping trip in early autumn.",
    "Describe the difference between a virus and a bacterium to a ten-year-old.",
    "What is the capital of Australia, and why was it chosen?",
    "Write a Python function that checks whether a string is a palindrome.",
)


class BenchError(Exception):
    """A bad argument or a result that cannot be trusted; main() prints it and returns 2."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codecs", default=DEFAULT_CODECS,
                   help=f"comma-separated codec specs; a spec's own parameters follow ':' and are separated "
                        f"by ',' too, e.g. int4:block=64,rotate=false (default {DEFAULT_CODECS})")
    p.add_argument("--stages", type=int, default=None,
                   help=f"pipeline stages, layers split evenly (default {DEFAULT_STAGES}, or one more than "
                        f"the split points of --boundaries)")
    p.add_argument("--boundaries", default=None,
                   help="comma-separated layer indices where a stage ends, e.g. 10 or 10,20 (default: even split)")
    p.add_argument("--wire-dtype", default="bfloat16", choices=WIRE_DTYPES,
                   help="dtype of the hidden states on the wire, before the codec (default bfloat16)")
    p.add_argument("--greedy-tokens", type=int, default=None,
                   help=f"greedy tokens per chat prompt (default {DEFAULT_GREEDY_TOKENS})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--text-set", default="dev", choices=("dev", "heldout"),
                   help="teacher-forcing passages: dev (the set settings were explored on) or heldout (a "
                        "second set, to confirm a setting picked on dev) (default dev)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny settings for tests: {QUICK['passages']} passages cut to {QUICK['passage_tokens']} "
                        f"tokens, {QUICK['prompts']} prompts, {QUICK['greedy_tokens']} greedy tokens")
    p.add_argument("--out", default="out/bench_codecs.json", help="JSON report (default out/bench_codecs.json)")
    args = p.parse_args(argv)
    args.codec_specs = parse_codecs(args.codecs)
    if args.greedy_tokens is None:
        args.greedy_tokens = QUICK["greedy_tokens"] if args.quick else DEFAULT_GREEDY_TOKENS
    if args.greedy_tokens < 1:
        raise BenchError(f"--greedy-tokens={args.greedy_tokens} must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads={args.threads} must be >= 1")
    if args.stages is not None and args.stages < 2:
        raise BenchError(f"--stages={args.stages} must be >= 2: with one stage there is no link to compress")
    args.split_points = parse_split_points(args.boundaries) if args.boundaries is not None else None
    if args.split_points is not None:
        if args.stages is not None and args.stages != len(args.split_points) + 1:
            raise BenchError(f"--stages={args.stages} disagrees with --boundaries={args.boundaries!r} "
                             f"({len(args.split_points) + 1} stages)")
        args.stages = len(args.split_points) + 1
    elif args.stages is None:
        args.stages = DEFAULT_STAGES
    args.passage_set = HELDOUT_PASSAGES if args.text_set == "heldout" else PASSAGES
    args.passages = QUICK["passages"] if args.quick else len(args.passage_set)
    args.passage_tokens = QUICK["passage_tokens"] if args.quick else None
    args.prompts = QUICK["prompts"] if args.quick else len(PROMPTS)
    return args


def split_specs(text: str) -> list[str]:
    from engine.codecs import split_specs as split

    try:
        return split(text)
    except ValueError as e:
        raise BenchError(f"--codecs: {e}") from e


def parse_codecs(text: str) -> list[str]:
    """Validated, canonical codec specs (``make_codec(spec).spec``), in the order given."""
    _ensure_importable()
    from engine.codecs import make_codec
    from engine.errors import ConfigError

    out: list[str] = []
    for spec in split_specs(text):
        try:
            canonical = make_codec(spec).spec
        except ConfigError as e:
            raise BenchError(f"--codecs: {e}") from None
        if canonical in out:
            raise BenchError(f"--codecs: {spec!r} is given twice (as {canonical!r})")
        out.append(canonical)
    return out


def parse_split_points(text: str) -> list[int]:
    try:
        points = [int(s) for s in text.split(",")]
    except ValueError:
        raise BenchError(f"--boundaries={text!r} must be comma-separated layer indices, e.g. 15 or 10,20") from None
    if any(b <= a for a, b in zip(points, points[1:], strict=False)) or points[0] < 1:
        raise BenchError(f"--boundaries={text!r} must be strictly increasing layer indices >= 1")
    return points


def layer_ranges(split_points: list[int] | None, stages: int, num_layers: int) -> list[tuple[int, int]]:
    from engine.llm import even_split

    if split_points is None:
        if stages > num_layers:
            raise BenchError(f"--stages={stages} exceeds the model's {num_layers} layers")
        return even_split(num_layers, stages)
    if split_points[-1] >= num_layers:
        raise BenchError(f"--boundaries: layer {split_points[-1]} must be below the model's {num_layers} layers")
    bounds = [0, *split_points, num_layers]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


# ------------------------------------------------------------------------------------------- the wire
@dataclass
class Traffic:
    messages: int = 0
    rows: int = 0
    elements: int = 0  # of the hidden states: baseline bytes = elements * wire element size
    encoded_bytes: int = 0
    codec_seconds: float = 0.0  # encode + decode
    sent_exact: int = 0  # messages a codec chose to send uncompressed (low-rank, where it cannot win)

    def add(self, other: Traffic) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class Wire:
    """The ``boundary`` hook: cast to the wire dtype, encode, decode, cast back; count the bytes.

    ``kind`` ("prefill" or "decode") is set by the caller; the low-rank state key is (boundary, kind).
    """

    spec: str
    wire_dtype: Any  # torch.dtype
    kind: str = "prefill"
    traffic: dict[str, Traffic] = field(default_factory=lambda: {"prefill": Traffic(), "decode": Traffic()})
    decode_rows: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        from engine.codecs import make_codec

        self.codec = make_codec(self.spec)

    def __call__(self, i: int, h: Any) -> Any:
        x = h.to(self.wire_dtype)
        t0 = time.perf_counter()
        e = self.codec.encode(x, key=(i, self.kind))
        y = self.codec.decode(e)
        dt = time.perf_counter() - t0
        t = self.traffic[self.kind]
        t.messages += 1
        t.rows += x.shape[0]
        t.elements += x.numel()
        t.encoded_bytes += e.nbytes
        t.codec_seconds += dt
        t.sent_exact += int(e.codec == "exact" and self.spec != "exact")
        if self.kind == "decode":
            self.decode_rows.add(x.shape[0])
        return y.to(h.dtype)


@dataclass
class Config:
    name: str  # a codec spec, or REFERENCE
    spec: str
    wire_dtype: Any
    tf: dict[str, list[float]] = field(default_factory=lambda: {"kl": [], "top1": [], "nll": []})
    tf_wire: Wire | None = None
    greedy: list[list[int]] = field(default_factory=list)
    gen_wire: Wire | None = None


# ------------------------------------------------------------------------------------------- measure
def load_engine(args: argparse.Namespace) -> Any:
    from engine.config import ModelConfig
    from engine.llm import LLM, EngineConfig
    from engine.model_source import load_hf_config, resolve_model

    num_layers = ModelConfig.from_hf(load_hf_config(Path(resolve_model(None).path))).num_layers
    ranges = layer_ranges(args.split_points, args.stages, num_layers)
    log(f"loading the embedded model (fp32) as {len(ranges)} stages: layers {ranges}")
    t0 = time.perf_counter()
    config = EngineConfig(dtype="float32", stages=len(ranges), num_slots=args.prompts,
                          max_seq_len=max(512, 128 + args.greedy_tokens))
    llm = LLM(config, layer_ranges=ranges)
    log(f"  loaded in {time.perf_counter() - t0:.1f} s")
    return llm, ranges


def texts(llm: Any, args: argparse.Namespace) -> tuple[list[list[int]], list[list[int]]]:
    passages = [llm.encode(t)[: args.passage_tokens] for t in args.passage_set[: args.passages]]
    prompts = [llm.encode(t, chat=True) for t in PROMPTS[: args.prompts]]
    limit = llm.config.max_seq_len
    longest = max(max(len(p) for p in passages), max(len(p) for p in prompts) + args.greedy_tokens)
    if longest > limit:
        raise BenchError(f"a sequence of {longest} tokens exceeds max_seq_len={limit}")
    return passages, prompts


def teacher_forced(llm: Any, configs: list[Config], baseline: Config, passages: list[list[int]]) -> None:
    """Per passage: the baseline's next-token distributions, then every config's against them."""
    import torch

    for c in [baseline, *configs]:
        c.tf_wire = Wire(c.spec, c.wire_dtype)
    for n, ids in enumerate(passages):
        log(f"teacher-forced passage {n + 1}/{len(passages)} ({len(ids)} tokens)")
        target = torch.tensor(ids[1:]).unsqueeze(-1)

        def logprobs(c: Config, ids: list[int] = ids) -> torch.Tensor:
            logits = llm.forward([0], [0], [ids], all_logits=True, boundary=c.tf_wire)[0, :-1]
            return torch.log_softmax(logits.double(), dim=-1)

        base = logprobs(baseline)
        base_p, base_top = base.exp(), base.argmax(-1)
        baseline.tf["nll"] += (-base.gather(-1, target)).squeeze(-1).tolist()
        for c in configs:
            lp = logprobs(c)
            c.tf["kl"] += (base_p * (base - lp)).sum(-1).tolist()
            c.tf["top1"] += (lp.argmax(-1) == base_top).double().tolist()
            c.tf["nll"] += (-lp.gather(-1, target)).squeeze(-1).tolist()


def greedy(llm: Any, configs: list[Config], prompts: list[list[int]], tokens: int) -> None:
    from engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, ignore_eos=True)  # temperature 0: greedy
    for n, c in enumerate(configs):
        log(f"greedy {c.name}: {len(prompts)} prompts x {tokens} tokens ({n + 1}/{len(configs)})")
        wire = c.gen_wire = Wire(c.spec, c.wire_dtype)

        def after_prefill(_request: int, _token: int, wire: Wire = wire) -> None:
            wire.kind = "decode"  # every prompt is prefilled in the first step (one slot per prompt)

        outs = llm.generate(prompts, params, on_token=after_prefill, boundary=wire)
        c.greedy = [list(o.token_ids) for o in outs]
        if wire.decode_rows - {len(prompts)}:
            raise BenchError(f"decode messages of {sorted(wire.decode_rows)} rows: expected the whole batch "
                             f"({len(prompts)}) in every step")


# ------------------------------------------------------------------------------------------ summarize
def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def perplexity(nll: list[float]) -> float:
    return math.exp(statistics.fmean(nll))


def traffic_summary(wire: Wire, wire_bytes: int) -> dict[str, Any]:
    total = Traffic()
    for t in wire.traffic.values():
        total.add(t)
    out = {}
    for kind, t in (*wire.traffic.items(), ("overall", total)):
        baseline = t.elements * wire_bytes
        out[kind] = {"messages": t.messages, "rows": t.rows, "baseline_bytes": baseline,
                     "encoded_bytes": t.encoded_bytes,
                     "bytes_ratio": baseline / t.encoded_bytes if t.encoded_bytes else None,
                     "sent_exact": t.sent_exact,
                     "codec_ms_per_message": 1e3 * t.codec_seconds / t.messages if t.messages else None}
    return out


def summarize(c: Config, baseline: Config, wire_bytes: int, tokens: int) -> dict[str, Any]:
    ppl, base_ppl = perplexity(c.tf["nll"]), perplexity(baseline.tf["nll"])
    prefixes = [common_prefix(a, b) for a, b in zip(c.greedy, baseline.greedy, strict=True)]
    gen = traffic_summary(c.gen_wire, wire_bytes)
    tf = traffic_summary(c.tf_wire, wire_bytes)
    return {
        "codec": c.name,
        "wire_dtype": str(c.wire_dtype).removeprefix("torch."),
        "bytes": {"greedy_run": gen, "teacher_forced": tf["prefill"]},
        "bytes_ratio": {k: gen[k]["bytes_ratio"] for k in ("prefill", "decode", "overall")},
        "kl_mean": statistics.fmean(c.tf["kl"]),
        "kl_max": max(c.tf["kl"]),
        "top1_agreement": statistics.fmean(c.tf["top1"]),
        "top1_disagreements": int(len(c.tf["top1"]) - sum(c.tf["top1"])),
        "positions": len(c.tf["top1"]),
        "perplexity": ppl,
        "perplexity_baseline": base_ppl,
        "perplexity_change_pct": 100.0 * (ppl / base_ppl - 1.0),
        "greedy": {"tokens": tokens, "prompts": len(prefixes),
                   "prefix_agreement_mean": statistics.fmean(p / tokens for p in prefixes),
                   "identical_prompts": sum(p == tokens for p in prefixes),
                   "first_divergence": [p if p < tokens else None for p in prefixes],
                   "token_ids": c.greedy},
        "codec_ms_per_message": {k: gen[k]["codec_ms_per_message"] for k in ("prefill", "decode")},
    }


def goal_verdicts(rows: list[dict[str, Any]], wire_dtype: str) -> list[dict[str, Any]]:
    verdicts = []
    for row in rows:
        name = row["codec"].split(":")[0]
        for codec, label, min_ratio, min_top1 in GOALS:
            if name != codec or row["codec"] == REFERENCE:
                continue
            ratio, top1 = row["bytes_ratio"]["overall"], row["top1_agreement"]
            misses = []
            if ratio < min_ratio:
                misses.append(f"bytes ratio {ratio:.3f}x < {min_ratio}x")
            if top1 < min_top1:
                misses.append(f"top-1 agreement {100 * top1:.2f}% < {100 * min_top1:g}%")
            verdicts.append({"codec": row["codec"], "goal": f"{label}: >= {min_ratio}x fewer bytes than the "
                             f"{wire_dtype} wire, top-1 agreement >= {100 * min_top1:g}%",
                             "bytes_ratio": ratio, "top1_agreement": top1,
                             "top1_disagreements": row["top1_disagreements"], "positions": row["positions"],
                             "met": not misses, "misses": misses})
    return verdicts


def lowrank_notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for row in rows:
        if not row["codec"].startswith("lowrank"):
            continue
        gen = row["bytes"]["greedy_run"]
        if gen["decode"]["messages"] and gen["decode"]["sent_exact"] == gen["decode"]["messages"]:
            notes.append(f"{row['codec']}: every decode message went uncompressed (a batch of "
                         f"{gen['decode']['rows'] // gen['decode']['messages']} rows is too few for the rank), "
                         f"so decode bytes are not reduced")
        notes.append(f"{row['codec']}: {row['bytes_ratio']['prefill']:.1f}x fewer prefill bytes, "
                     f"{row['bytes_ratio']['overall']:.2f}x overall; top-1 {100 * row['top1_agreement']:.2f}%, "
                     f"perplexity {row['perplexity_change_pct']:+.1f}%, "
                     f"{row['greedy']['identical_prompts']}/{row['greedy']['prompts']} greedy continuations "
                     f"identical")
    return notes


# ---------------------------------------------------------------------------------------------- report
def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]], wire_dtype: str) -> str:
    head = (f"| codec | bytes ratio vs {wire_dtype} (prefill / decode / all) | KL mean | KL max | top-1 agree | "
            f"greedy prefix agree | identical | perplexity | ppl change | enc+dec ms/msg (prefill / decode) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        b, g, ms = r["bytes_ratio"], r["greedy"], r["codec_ms_per_message"]
        lines.append(
            f"| {r['codec']} | {_f(b['prefill'], '.2f')} / {_f(b['decode'], '.2f')} / {_f(b['overall'], '.2f')} "
            f"| {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {100 * r['top1_agreement']:.2f}% "
            f"| {100 * g['prefix_agreement_mean']:.1f}% | {g['identical_prompts']}/{g['prompts']} "
            f"| {r['perplexity']:.3f} | {r['perplexity_change_pct']:+.2f}% "
            f"| {_f(ms['prefill'], '.2f')} / {_f(ms['decode'], '.2f')} |")
    return "\n".join(lines)


def print_report(result: dict[str, Any]) -> None:
    s = result["settings"]
    print(f"\nCodec accuracy vs exact over a {s['wire_dtype']} wire: {s['model']}, fp32, {s['stages']} stages "
          f"(layers {s['layer_ranges']}), {s['positions']} teacher-forced positions in {s['passages']} passages, "
          f"{s['prompts']} chat prompts x {s['greedy_tokens']} greedy tokens\n")
    print(table(result["results"], s["wire_dtype"]))
    print(f"\nbaseline perplexity {result['baseline']['perplexity']:.3f}; bytes ratios from the greedy runs' "
          f"messages; {s['lowrank_state']}")
    print("\nGoals:")
    for v in result["goals"]:
        verdict = "met" if v["met"] else "NOT MET (" + "; ".join(v["misses"]) + ")"
        print(f"- {v['codec']}: {v['goal']}: {v['bytes_ratio']:.3f}x, top-1 {100 * v['top1_agreement']:.2f}% "
              f"({v['top1_disagreements']} of {v['positions']} positions differ) -> {verdict}")
    if not result["goals"]:
        print("- no int8 or int4 codec measured")
    for note in result["lowrank_notes"]:
        print(f"- low-rank, as measured: {note}")


# ---------------------------------------------------------------------------------------------- main
def _ensure_importable() -> None:
    """Running ``python scripts/bench_codecs.py`` puts scripts/ (not the repo root) on sys.path."""
    if str(REPO_ROOT) not in sys.path:
        try:
            import engine  # noqa: F401
        except ImportError:
            sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as e:
        print(f"bench_codecs: {e}", file=sys.stderr)
        return 2
    import torch

    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    except BenchError as e:
        print(f"bench_codecs: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process (tests)


def _run(args: argparse.Namespace) -> int:
    import torch

    t_start = time.perf_counter()
    llm, ranges = load_engine(args)
    passages, prompts = texts(llm, args)
    wire_dtype = getattr(torch, args.wire_dtype)
    baseline = Config("exact (baseline)", "exact", wire_dtype)
    configs = [Config(REFERENCE, "exact", torch.float32)] if args.wire_dtype != "float32" else []
    configs += [Config(spec, spec, wire_dtype) for spec in args.codec_specs]
    with torch.inference_mode():  # the hook runs between stages, outside the stages' own inference mode
        teacher_forced(llm, configs, baseline, passages)
        greedy(llm, [baseline, *configs], prompts, args.greedy_tokens)
    wire_bytes = torch.empty((), dtype=wire_dtype).element_size()
    rows = [summarize(c, baseline, wire_bytes, args.greedy_tokens) for c in configs]
    lowrank_state = ("low-rank state keyed per (boundary, message kind): decode steps warm-start from the "
                     "previous decode step, prefills from the previous prefill; fresh codecs per phase")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "settings": {"model": llm.model_name, "dtype": "float32", "stages": len(ranges),
                     "layer_ranges": [list(r) for r in ranges], "wire_dtype": args.wire_dtype,
                     "codecs": args.codec_specs, "text_set": args.text_set, "passages": len(passages),
                     "passage_tokens": [len(p) for p in passages], "positions": sum(len(p) - 1 for p in passages),
                     "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
                     "greedy_tokens": args.greedy_tokens, "greedy_batch": len(prompts), "quick": args.quick,
                     "baseline": f"exact codec over a {args.wire_dtype} wire",
                     "bytes_ratio": f"{args.wire_dtype} wire bytes of the hidden states / encoded bytes, over "
                                    "the messages of the greedy runs (all prompts prefilled in one message "
                                    "per boundary, then one decode message per step and boundary)",
                     "lowrank_state": lowrank_state},
        "baseline": {"perplexity": perplexity(baseline.tf["nll"]), "greedy_token_ids": baseline.greedy},
        "results": rows,
        "goals": goal_verdicts(rows, args.wire_dtype),
        "lowrank_notes": lowrank_notes(rows),
        "seconds": time.perf_counter() - t_start,
    }
    print_report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
