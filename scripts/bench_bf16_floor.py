#!/usr/bin/env python
"""How far 16-bit arithmetic alone moves the logits: the same random-init weights (a published shape,
tests/engine/reference.py SHAPES, saved in bf16) computed in ``--dtype`` and in fp32, on the CPU, teacher
forced over ``--prompts`` random prompts of ``--prompt-tokens``. The floor against which a tensor-parallel
group's difference from one device (scripts/bench_multigpu.py tp_logits) is read.

The model runs ``--chunk`` layers at a time (the hidden states carried from one stage to the next), so an
8B shape in fp32 fits in 24 GiB of memory.

    .venv/bin/python scripts/bench_bf16_floor.py --shape llama-3.1-8b --chunk 4
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "proto"))


def logits(model_dir: Path, prompts: list[list[int]], dtype: str, chunk: int, num_layers: int):  # noqa: ANN201
    import torch

    from engine.stage import StageModel

    tokens = len(prompts[0])
    x = torch.tensor([t for p in prompts for t in p])
    for start in range(0, num_layers, chunk):
        stage = StageModel.from_pretrained(model_dir, start=start, end=min(num_layers, start + chunk), dtype=dtype)
        cache = stage.new_cache(num_slots=len(prompts), max_seq_len=tokens)
        meta = stage.make_meta(list(range(len(prompts))), [0] * len(prompts), [tokens] * len(prompts))
        with torch.inference_mode():
            x = stage(x, meta, cache, all_logits=True)
        del stage, cache
        gc.collect()
    return x.float().reshape(len(prompts), tokens, -1)  # [prompts, tokens, vocab]


def main(argv: list[str] | None = None) -> int:
    from scripts.bench_multigpu import compare_logits
    from tests.engine.reference import SHAPES, make_shaped_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--chunk", type=int, default=8, help="layers per stage (default: %(default)s)")
    p.add_argument("--workdir", default=None, help="where the model is saved (reused when complete)")
    p.add_argument("--out", default=None, help="JSON file for the result")
    args = p.parse_args(argv)
    if min(args.prompts, args.prompt_tokens, args.chunk) < 1:
        p.error("--prompts, --prompt-tokens and --chunk must be >= 1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bf16-floor-"))
    model_dir = make_shaped_model(args.shape, work / f"{args.shape}-bfloat16")
    shape = SHAPES[args.shape]
    rng = random.Random(1234)
    prompts = [[rng.randrange(shape["vocab_size"]) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)]
    ref = logits(model_dir, prompts, "float32", args.chunk, shape["num_hidden_layers"])
    got = logits(model_dir, prompts, args.dtype, args.chunk, shape["num_hidden_layers"])
    result = {"shape": args.shape, "dtype": args.dtype, "against": "float32", "device": "cpu",
              "command": sys.argv, **compare_logits(got, ref)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
