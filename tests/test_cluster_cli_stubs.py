"""`node` and `coordinator`: arguments are parsed and validated, then the commands say plainly that
the cluster is not implemented yet and exit with status 2; importing them is light."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator import cli as coordinator_cli
from node import cli as node_cli

REPO = Path(__file__).resolve().parents[1]
MESSAGE = (
    "tensorfleet: the cluster (coordinator start / node join) is not implemented yet in this version; "
    "use `tensorfleet-generate` for single-process generation"
)


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (node_cli.main, ["join", "127.0.0.1:50051"]),
        (
            node_cli.main,
            [
                "join",
                "[::1]:7000",
                "--devices",
                "cuda:0,cuda:1",
                "--name",
                "n1",
                "--port",
                "0",
                "--cache-dir",
                "/tmp/c",
                "--model-dir",
                "/tmp/m",
            ],
        ),
        (node_cli.main, ["join", "head:50051", "--devices", "cpu"]),
        (coordinator_cli.main, ["start"]),
        (
            coordinator_cli.main,
            ["start", "--model", "/models/x.gguf", "--host", "0.0.0.0", "--port", "6000", "--min-nodes", "3"],
        ),
    ],
)
def test_commands_print_one_line_and_exit_2(
    main, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err == MESSAGE + "\n"


@pytest.mark.parametrize(
    ("main", "argv", "complaint"),
    [
        (node_cli.main, ["join", "nohost"], "is not HOST:PORT"),
        (node_cli.main, ["join", "h:99999"], "1..65535"),
        (node_cli.main, ["join", "::1:5000"], "brackets"),
        (node_cli.main, ["join", "h:1", "--devices", "gpu0"], "not understood"),
        (node_cli.main, ["join", "h:1", "--devices", "cpu,cpu"], "names a device twice"),
        (coordinator_cli.main, ["start", "--min-nodes", "0"], "integer >= 1"),
        (coordinator_cli.main, ["start", "--port", "x"], "not a port number"),
    ],
)
def test_bad_arguments_are_usage_errors(main, argv, complaint, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert complaint in err and MESSAGE not in err


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (node_cli.main, ["--help"]),
        (node_cli.main, ["join", "--help"]),
        (coordinator_cli.main, ["--help"]),
        (coordinator_cli.main, ["start", "--help"]),
    ],
)
def test_help_says_not_implemented(main, argv, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "not implemented yet" in " ".join(capsys.readouterr().out.split()).lower()


def test_cli_modules_import_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "import node.cli, coordinator.cli\n"
        "names = ('torch', 'grpc', 'numpy', 'engine', 'transformers')\n"
        "heavy = sorted(m for m in names if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "proto"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing the CLIs pulled in: {out.stdout.strip()}"
