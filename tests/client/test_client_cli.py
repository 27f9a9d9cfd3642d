"""The `tensorfleet` command against a fake coordinator (tests/client/conftest.py): streamed text,
the summary, status tables and JSON, the address from the flag or the environment, and one-line
errors with exit status 2."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from client import cli
from client.api import status_to_dict

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_coordinator_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.ENV_COORDINATOR, raising=False)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


def test_generate_streams_the_text_and_a_summary(fake_coordinator, capsys) -> None:
    argv = ["generate", "hi", "--coordinator", fake_coordinator.address, "--max-tokens", "16", "--seed", "3"]
    argv += ["--temperature", "0.5", "--top-k", "4", "--top-p", "0.8", "--stop", "###", "--stop", "\n\n"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out == "Hello, world!\n"
    summary = _one_line(err)
    assert summary.startswith("[5 tokens, finish: stop, ") and summary.endswith(" tokens/s]")
    s = fake_coordinator.requests[0].sampling
    assert (s.max_tokens, s.seed, s.top_k, list(s.stop)) == (16, 3, 4, ["###", "\n\n"])
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.8)


def test_generate_without_seed_leaves_it_to_the_server(fake_coordinator, capsys) -> None:
    assert cli.main(["generate", "hi", "--coordinator", fake_coordinator.address]) == 0
    assert not fake_coordinator.requests[0].sampling.HasField("seed")


def test_generate_no_stream_and_json(fake_coordinator, capsys) -> None:
    assert cli.main(["generate", "hi", "--coordinator", fake_coordinator.address, "--no-stream"]) == 0
    out, err = capsys.readouterr()
    assert out == "Hello, world!\n" and "finish: stop" in err
    assert cli.main(["generate", "hi", "--coordinator", fake_coordinator.address, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == "Hello, world!" and result["token_ids"] == [101, 102, 103, 104, 105]
    assert result["finish_reason"] == "stop" and result["request_id"] == "assigned-1"
    assert (result["prompt_tokens"], result["completion_tokens"]) == (3, 5) and result["seconds"] >= 0


def test_prompt_from_stdin(fake_coordinator, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a prompt\nover two lines"))
    assert cli.main(["generate", "-", "--coordinator", fake_coordinator.address]) == 0
    assert fake_coordinator.requests[0].text == "a prompt\nover two lines"


def test_status_prints_the_tables(fake_coordinator, capsys) -> None:
    assert cli.main(["status", "--coordinator", fake_coordinator.address]) == 0
    out = capsys.readouterr().out
    for expected in (
        "model     SmolLM2-135M",
        "epoch     3",
        "serving   yes, 2 stage(s) on 2 node(s)",
        "requests  2 running, 1 waiting (the queue holds up to 1024)",
        "slots     6 free of 8 (256 tokens per step, 2 micro-batch(es) in flight)",
        "nodes (2: 1 serving, 1 suspect)",
        "ID  NAME",
        "n1  alpha  10.0.0.1:7001  serving  0.2 s ago  cuda:0 NVIDIA H100 80GB HBM3",  # 0.25 rounds to even
        "suspect",
        "60.0/80.0 GiB",
        "cpu:0",
        "32.0/64.0 GiB",
        "stages (2)",
        "DEVICES (node:device, by rank)",
        "0-19 (20)",
        "20-29 (10)",
        "n1:0 n1:1",
        "n2:0",
        "1.50 GiB",  # weights of stage 0
        "4.00 GiB",  # KV cache of stage 0
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    stage0 = next(line for line in out.splitlines() if "n1:0 n1:1" in line).split()
    assert stage0[:4] == ["0", "0-19", "(20)", "2"] and stage0[-6:] == ["1.50", "GiB", "4.00", "GiB", "8", "24"]
    # The second device of n1 has a line of its own, under the first.
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if "cuda:0" in line)
    second = lines[first + 1]
    assert second.lstrip().startswith("cuda:1") and second.index("cuda:1") == lines[first].index("cuda:0")


def test_status_json(fake_coordinator, capsys) -> None:
    assert cli.main(["status", "--json", "--coordinator", fake_coordinator.address]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed == status_to_dict(fake_coordinator.status_response)
    assert parsed["epoch"]["value"] == "3" and parsed["stages"][1]["layers"] == {"start": 20, "end": 30}


def test_address_from_the_environment_at_call_time(fake_coordinator, capsys, monkeypatch, free_port) -> None:
    monkeypatch.setenv(cli.ENV_COORDINATOR, fake_coordinator.address)
    assert cli.main(["status"]) == 0
    assert fake_coordinator.status_calls == 1
    # The flag wins over the environment.
    monkeypatch.setenv(cli.ENV_COORDINATOR, f"127.0.0.1:{free_port}")
    assert cli.main(["status", "--coordinator", fake_coordinator.address]) == 0
    assert fake_coordinator.status_calls == 2
    capsys.readouterr()
    assert cli.main(["status"]) == 2
    assert f"cannot reach the coordinator at 127.0.0.1:{free_port}" in _one_line(capsys.readouterr().err)


def test_default_address() -> None:
    assert cli.resolve_address(None) == "127.0.0.1:50051"


@pytest.mark.parametrize("command", [["status"], ["generate", "hi"], ["generate", "hi", "--no-stream"]])
def test_unreachable_coordinator_is_one_line_and_exit_2(command, free_port, capsys) -> None:
    address = f"127.0.0.1:{free_port}"
    assert cli.main([*command, "--coordinator", address]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert _one_line(err) == (
        f"tensorfleet: UNAVAILABLE: cannot reach the coordinator at {address} (is `coordinator start` running?)"
    )


def test_server_error_is_one_line_and_exit_2(fake_coordinator, capsys) -> None:
    fake_coordinator.abort_with = (grpc.StatusCode.RESOURCE_EXHAUSTED, "no capacity left")
    assert cli.main(["generate", "hi", "--coordinator", fake_coordinator.address]) == 2
    assert _one_line(capsys.readouterr().err) == "tensorfleet: RESOURCE_EXHAUSTED: no capacity left"


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["generate"], "the following arguments are required: prompt"),
        (["generate", "hi", "--max-tokens", "many"], "invalid int value"),
        (["generate", "hi", "--max-tokens", "0"], "max_tokens=0"),
        (["generate", "hi", "--top-p", "0"], "top_p=0.0 is out of range"),
        (["generate", "hi", "--temperature", "-1"], "temperature=-1.0"),
        (["generate", "hi", "--seed", "-5"], "seed=-5"),
        (["generate", "hi", "--timeout", "0"], "timeout=0.0 must be > 0"),
        (["status", "--max-tokens", "3"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice"),
        (["status", "--coordinator", "nohost"], "--coordinator='nohost' is not HOST:PORT"),
        (["status", "--coordinator", "h:99999"], "1..65535"),
        (["status", "--coordinator", "::1:5000"], "brackets"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv, complaint, capsys) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and complaint in _one_line(err)


def test_bad_address_in_the_environment_names_the_variable(capsys, monkeypatch) -> None:
    monkeypatch.setenv(cli.ENV_COORDINATOR, "head")
    assert cli.main(["status"]) == 2
    assert "TENSORFLEET_COORDINATOR='head' is not HOST:PORT" in _one_line(capsys.readouterr().err)


def test_no_subcommand_prints_help_and_exits_2(capsys) -> None:
    assert cli.main([]) == 2
    assert "usage: tensorfleet" in capsys.readouterr().err


def test_help_names_the_address_sources(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--coordinator HOST:PORT" in out and "TENSORFLEET_COORDINATOR" in out and "--no-stream" in out


def test_the_command_in_a_subprocess_fails_cleanly(free_port) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "proto"), env.get("PYTHONPATH", "")])
    env.pop(cli.ENV_COORDINATOR, None)
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "status", "--coordinator", f"127.0.0.1:{free_port}"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert _one_line(out.stderr).startswith("tensorfleet: UNAVAILABLE: cannot reach the coordinator")
