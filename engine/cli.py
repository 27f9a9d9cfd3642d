"""``tensorfleet-generate``: single-process generation (``make run`` uses it).

Loads a model (default: the embedded SmolLM2-135M-Instruct), optionally split into pipeline stages in
this process, and streams the answer to each prompt. Bad input ends with a one-line error, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from engine.errors import TensorfleetError

DEMO_PROMPT = "In two sentences: why do people split a large language model across several machines?"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensorfleet-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", nargs="*", help=f"prompts to answer (default: a demo prompt: {DEMO_PROMPT!r})")
    p.add_argument("--model", default=None,
                   help="a Hugging Face model directory or a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--stages", type=int, default=1, help="split the layers into this many stages in-process")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size: run on this many local processes joined over gloo")
    p.add_argument("--tp-codec", default="exact", metavar="SPEC",
                   help="compress the tensor-parallel all-reduces: exact (default), int8, "
                        "int8:rotate=true,outliers=3, int4, lowrank:rank=8, ...")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except TensorfleetError as e:
        print(f"tensorfleet-generate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from engine.config import ModelConfig
    from engine.errors import ConfigError
    from engine.llm import EngineConfig
    from engine.model_source import load_hf_config, resolve_model
    from engine.sampling import SamplingParams

    # Validate everything before loading weights or starting processes.
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens,
                            seed=args.seed, stop=tuple(args.stop))
    source = resolve_model(args.model)
    ModelConfig.from_hf(load_hf_config(source.path)).check_tensor_parallel(args.tp)
    reducer = _tp_reducer(args.tp_codec)  # a ConfigError names what is wrong with the spec
    if args.tp == 1 and reducer is not None:
        raise ConfigError(f"--tp-codec {args.tp_codec} needs --tp 2 or more (one process has no all-reduce)")
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, stages=args.stages,
                          max_seq_len=args.max_seq_len, num_slots=max(1, len(args.prompts)))
    if args.tp == 1:
        return _generate(args, config, params)
    return _spawn_tensor_parallel(args, config, params)


def _spawn_tensor_parallel(args: argparse.Namespace, config, params) -> int:  # noqa: ANN001
    """Run the same generation on tp local processes joined in a gloo group; rank 0 prints."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_tp_rank, args=(rank, args, config, params, port)) for rank in range(args.tp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    return 0 if codes == [0] * len(codes) else max(c for c in codes if c) if any(codes) else 1


def _tp_rank(rank: int, args: argparse.Namespace, config, params, port: int) -> None:  # noqa: ANN001
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from engine.parallel import TPGroup

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tp))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.tp,
                            timeout=timedelta(minutes=10))
    try:
        if rank != 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the leader alone prints
            sys.stderr = sys.stdout
        code = _generate(args, config, params, tp=TPGroup.from_group(reducer=_tp_reducer(args.tp_codec)))
    except TensorfleetError as e:
        print(f"tensorfleet-generate: error: {e}", file=sys.stderr)
        code = 2
    finally:
        dist.destroy_process_group()
    sys.exit(code)


def _tp_reducer(spec: str):  # noqa: ANN202 - an AllReducer, or None for the plain exact all-reduce
    from engine.collectives import make_reducer

    reducer = make_reducer(spec)
    return None if reducer.spec == "exact" else reducer


def _generate(args: argparse.Namespace, config, params, *, tp=None) -> int:  # noqa: ANN001
    from engine.llm import LLM

    started = time.perf_counter()
    llm = LLM(config, tp=tp)
    tp_note = f", tp={tp.size}" if tp is not None else ""
    print(f"loaded {llm.model_name}{tp_note} ({llm.model_cfg.model_type}, {llm.model_cfg.num_layers} layers, "
          f"{len(llm.stages)} stage(s), {args.dtype}) in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    prompts = args.prompts or [DEMO_PROMPT]
    for prompt in prompts:
        print(f"\n>>> {prompt}")
        printer = _StreamPrinter(llm, tuple(args.stop))
        out = llm.generate([prompt], params, chat=not args.raw, on_token=printer)[0]
        printer.finish()
        print(f"[{len(out.token_ids)} tokens, finish={out.finish_reason}]", file=sys.stderr)
    stats = llm.stats
    if stats.decode_seconds > 0:
        print(f"decode: {stats.decode_tokens / stats.decode_seconds:.1f} tokens/s over {stats.decode_steps} steps; "
              f"prefill: {stats.prefill_tokens} tokens in {stats.prefill_seconds * 1e3:.0f} ms", file=sys.stderr)
    if tp is not None and tp.reducer is not None:
        r = tp.reducer.stats
        print(f"tp all-reduce ({tp.reducer.spec}): {r.compressed_calls} compressed, {r.exact_calls} exact calls; "
              f"{r.ratio:.2f}x fewer bytes than exact", file=sys.stderr)
    return 0


class _StreamPrinter:
    """Prints text deltas as tokens arrive (never half a character, never part of a stop string)."""

    def __init__(self, llm, stop: tuple[str, ...]) -> None:  # noqa: ANN001
        from engine.detokenize import IncrementalDetokenizer

        self.detok = IncrementalDetokenizer(llm.tokenizer, stop)

    def __call__(self, _request: int, token: int) -> None:
        if self.detok.final_text is None:
            sys.stdout.write(self.detok.push(token)[0])
            sys.stdout.flush()

    def finish(self) -> None:
        sys.stdout.write(self.detok.finish() + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
