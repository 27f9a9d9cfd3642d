"""node/security.py without a cluster: the secret files, the verdicts of a check, the data keys."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from client.credentials import CredentialsError
from node.security import (
    API_KEYS_FILE,
    JOIN_TOKEN_FILE,
    data_key,
    find_secret,
    load_or_create,
    matches,
    presented,
    read_secrets,
    require,
)


def test_secrets_are_created_once_private_and_reused(tmp_path: Path) -> None:
    first = load_or_create(tmp_path / "home")
    assert set(first.created) == {JOIN_TOKEN_FILE, API_KEYS_FILE}
    for name in (JOIN_TOKEN_FILE, API_KEYS_FILE):
        assert (tmp_path / "home" / name).stat().st_mode & 0o777 == 0o600
    again = load_or_create(tmp_path / "home")
    assert again.created == () and (again.join_token, again.api_keys) == (first.join_token, first.api_keys)
    assert first.join_token != first.api_keys[0] and len(first.join_token) > 40


def test_secret_files_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\nkey-one\n\nkey-two\n")
    path.chmod(0o600)
    assert read_secrets(path) == ["key-one", "key-two"]
    path.chmod(0o640)
    with pytest.raises(CredentialsError, match="chmod 600"):
        read_secrets(path)
    path.chmod(0o600)
    path.write_text("two words\n")
    with pytest.raises(CredentialsError, match="no usable secret"):
        read_secrets(path)
    with pytest.raises(CredentialsError, match="does not exist"):
        read_secrets(tmp_path / "missing")


def test_find_secret_prefers_flag_then_environment_then_file(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    (tmp_path / "f").write_text("from-file\n")
    (tmp_path / "f").chmod(0o600)
    monkeypatch.delenv("TF_TEST_SECRET", raising=False)
    assert find_secret(None, "TF_TEST_SECRET", tmp_path, "f") == "from-file"
    assert find_secret(None, "TF_TEST_SECRET", tmp_path, "absent") is None
    monkeypatch.setenv("TF_TEST_SECRET", "from-env")
    assert find_secret(None, "TF_TEST_SECRET", tmp_path, "f") == "from-env"
    assert find_secret("from-flag", "TF_TEST_SECRET", tmp_path, "f") == "from-flag"


def test_a_check_tells_missing_unknown_misplaced_and_stale_apart() -> None:
    check = require("a data key", lambda: ("now",), others=lambda: ("api",), stale=lambda: ("before",))
    assert check("now") is None
    assert check(None)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert check("forged")[0] == grpc.StatusCode.UNAUTHENTICATED
    assert check("api")[0] == grpc.StatusCode.PERMISSION_DENIED
    code, message = check("before")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "older placement epoch" in message
    assert check("")[0] == grpc.StatusCode.UNAUTHENTICATED


def test_bearer_metadata_and_comparison() -> None:
    assert presented([("x", "y"), ("authorization", "Bearer abc")]) == "abc"
    assert presented([("authorization", "Basic abc")]) is None and presented(None) is None
    assert matches("abc", ["x", "abc"]) and not matches("abc", ["abcd"]) and not matches(None, ["abc"])


def test_data_keys_depend_on_token_run_and_epoch() -> None:
    keys = {data_key(t, r, e) for t in ("t1", "t2") for r in ("r1", "r2") for e in (1, 2)}
    assert len(keys) == 8 and data_key("t1", "r1", 1) == data_key("t1", "r1", 1)
