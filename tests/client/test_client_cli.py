"""The `tensorfleet` client command: parses its arguments and says plainly that it is not ready."""

from __future__ import annotations

import pytest

from client import cli


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "hello"],
        ["generate", "--coordinator", "10.0.0.5:50051", "--max-tokens", "8", "--seed", "3", "hi"],
        ["status"],
    ],
)
def test_subcommands_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "not implemented yet" in err[0] and "tensorfleet-generate" in err[0]


def test_help_says_it_is_not_implemented(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "NOT IMPLEMENTED YET" in " ".join(capsys.readouterr().out.split())


def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: tensorfleet" in capsys.readouterr().err
