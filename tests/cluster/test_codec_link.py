"""Compressed hidden states between stages on a real cluster: a 2-stage cluster whose link uses a codec
produces exactly the tokens of the single-process engine with the same codec applied at the same layer
boundary (the wire adds nothing to the codec's own error), and a malformed codec is refused at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from client.api import TensorfleetClient
from coordinator.local_cluster import LocalCluster, NodeSpec
from engine.codecs import make_codec
from engine.llm import LLM, EngineConfig
from engine.sampling import SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name a famous painter."]
SPEC, TOKENS = "int4", 16  # coarse enough to change tokens: the test sees that the link used it


def test_a_compressed_link_equals_the_engine_with_the_same_codec(tmp_path: Path, embedded_model_dir) -> None:  # noqa: ANN001
    nodes = [NodeSpec(standby=False, devices="cpu", model_dir=str(embedded_model_dir)) for _ in range(2)]
    with LocalCluster(tmp_path, model=str(embedded_model_dir), nodes=nodes, coordinator_args=[
            "--stages", "2", "--codec", SPEC, "--codec-min-tokens", "0", "--slots", "2", "--max-seq-len", "256"]) as c:
        with TensorfleetClient(c.address) as client:
            ranges = [(s.layers.start, s.layers.end) for s in client.status().stages]
            got = [client.generate(p, max_tokens=TOKENS, ignore_eos=True).token_ids for p in PROMPTS]
        traffic = link_traffic(c, messages=len(PROMPTS) * TOKENS)
    llm = LLM(EngineConfig(model=str(embedded_model_dir), num_slots=2, max_seq_len=256), layer_ranges=ranges)
    codec = make_codec(SPEC)
    expected = [llm.generate([p], SamplingParams(max_tokens=TOKENS, ignore_eos=True), chat=True,
                             boundary=lambda i, h: codec.decode(codec.encode(h)))[0].token_ids for p in PROMPTS]
    exact = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=TOKENS, ignore_eos=True),
                                               chat=True)]
    assert got == expected
    assert got != exact
    assert len(ranges) == 2 and sum(len(t) for t in got) == len(PROMPTS) * TOKENS
    # The coordinator's /metrics shows the link's bytes (from the nodes' heartbeats): int4 about 4.3 bits
    # a value where exact sends 32.
    (codec, (raw, wire, messages)), = traffic.items()  # the codec's full spec: int4:block=32
    assert codec.startswith(SPEC), traffic
    assert messages >= len(PROMPTS) * TOKENS and 0.1 < wire / raw < 0.2


def link_traffic(cluster: LocalCluster, *, messages: int, timeout_s: float = 10.0) -> dict[str, tuple]:
    """codec -> (raw bytes, wire bytes, messages) from /metrics, once the heartbeats report ``messages``."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        samples = cluster.metrics()
        out: dict[str, list] = {}
        for key, value in samples.items():
            for i, name in enumerate(("raw_bytes", "wire_bytes", "messages")):
                if key.startswith(f"tensorfleet_link_{name}_total{{"):
                    codec = key.split("codec=", 1)[1].split(",", 1)[0].rstrip("}")
                    out.setdefault(codec, [0, 0, 0])[i] += value
        if sum(v[2] for v in out.values()) >= messages or time.monotonic() > deadline:
            return {k: tuple(v) for k, v in out.items()}
        time.sleep(0.25)


BAD_CODECS = [("--codec", "zstd", "unknown codec 'zstd'"), ("--codec", "int8:block=0", "block=0"),
              ("--codec", "auto:exact", "compressing codec"), ("--tp-codec", "int5", "unknown codec 'int5'")]


@pytest.fixture(scope="module")
def refused_starts() -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """`coordinator start` with each bad codec, all started at once (each run is mostly the import of
    torch, so together they take about the time of two one after the other on 2 cores)."""
    procs = {(flag, spec): subprocess.Popen([sys.executable, "-m", "coordinator.cli", "start", flag, spec,
                                             "--port", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True, cwd=Path(__file__).resolve().parents[2])
             for flag, spec, _ in BAD_CODECS}
    done = {}
    try:
        for key, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


@pytest.mark.parametrize("flag, spec, complaint", BAD_CODECS)
def test_a_bad_codec_is_refused_at_start(refused_starts: dict, flag: str, spec: str, complaint: str) -> None:
    out = refused_starts[(flag, spec)]
    assert out.returncode == 2 and complaint in out.stderr
