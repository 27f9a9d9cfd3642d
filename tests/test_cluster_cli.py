"""`node` and `coordinator`: arguments are parsed and validated, bad input is one line and exit status 2,
and importing the CLIs is light."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator import cli as coordinator_cli
from node import cli as node_cli

REPO = Path(__file__).resolve().parents[1]


def test_coordinator_with_a_missing_model_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert coordinator_cli.main(["start", "--model", "/nonexistent/model", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "Traceback" not in err


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
        (coordinator_cli.main, ["start", "--lookahead", "5"], "from 0 to 4"),
        (coordinator_cli.main, ["start", "--lookahead", "-1"], "from 0 to 4"),
        (coordinator_cli.main, ["start", "--lookahead", "2", "--no-lookahead"], "contradicts"),
    ],
)
def test_bad_arguments_are_usage_errors(main, argv, complaint, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert complaint in err


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (node_cli.main, ["--help"]),
        (node_cli.main, ["join", "--help"]),
        (coordinator_cli.main, ["--help"]),
        (coordinator_cli.main, ["start", "--help"]),
    ],
)
def test_help_describes_the_commands(main, argv, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split()).lower()
    assert "not implemented" not in out and ("join" in out or "start" in out or "coordinator" in out)


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
