"""The namespace fabric itself: a node's address is reachable through the bridge, `cut` isolates it,
`restore` brings it back, `limit` shapes its bandwidth, and nothing is left behind."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.faults.netns import Fabric, netns_unavailable, run

_reason = netns_unavailable()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

PREFIX = f"tft{os.getpid() % 1000}"
SUBNET = f"10.77.{os.getpid() % 250}"
PAYLOAD = 1_000_000

# Per connection, one command byte: "d" sends PAYLOAD bytes, "u" reads until EOF, anything else: b"ok".
SERVER = f"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    with c:
        cmd = c.recv(1)
        if cmd == b"d":
            c.sendall(b"x" * {PAYLOAD})
        elif cmd == b"u":
            while c.recv(1 << 16):
                pass
        else:
            c.sendall(b"ok")
"""

CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
    c.sendall(b"?")
    sys.exit(0 if c.recv(2) == b"ok" else 3)
"""


@contextmanager
def serve_in(fabric: Fabric, i: int) -> Iterator[int]:
    """A TCP server inside node i's namespace on its address; yields the port."""
    proc = subprocess.Popen([*fabric.exec_prefix(i), sys.executable, "-c", SERVER, fabric.address(i)],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"the server in {fabric.netns(i)} did not start (exit {proc.poll()})"
        yield int(line)
    finally:
        proc.kill()
        proc.wait()


def reachable_from_ns(fabric: Fabric, i: int, address: str, port: int, timeout: float = 1.0) -> bool:
    cmd = [*fabric.exec_prefix(i), sys.executable, "-c", CLIENT, address, str(port), str(timeout)]
    return subprocess.run(cmd, capture_output=True, timeout=timeout + 20).returncode == 0


def reachable_from_root(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout) as c:
            c.sendall(b"?")
            return c.recv(2) == b"ok"
    except OSError:
        return False


def leftovers() -> set[str]:
    """Links and namespaces whose names start with this run's prefix."""
    links = re.findall(r"^\d+: ([^:@\s]+)", run("ip", "-o", "link", "show").stdout, flags=re.M)
    namespaces = [line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line.strip()]
    return {name for name in links + namespaces if name.startswith(PREFIX)}


def test_reach_cut_restore_and_clean_up() -> None:
    with Fabric(2, prefix=PREFIX, subnet=SUBNET) as fabric:
        assert fabric.host_address == f"{SUBNET}.1" and fabric.address(1) == f"{SUBNET}.11"
        with serve_in(fabric, 0) as port:
            address = fabric.address(0)
            assert reachable_from_ns(fabric, 1, address, port)
            assert reachable_from_root(address, port)

            fabric.cut(0)
            started = time.monotonic()
            assert not reachable_from_ns(fabric, 1, address, port, timeout=1.0)
            assert not reachable_from_root(address, port, timeout=1.0)
            assert time.monotonic() - started < 15

            fabric.restore(0)
            deadline = time.monotonic() + 10
            while not reachable_from_ns(fabric, 1, address, port):
                assert time.monotonic() < deadline, "node 0 is still unreachable after restore"
            assert reachable_from_root(address, port)
        assert leftovers()  # the check below would pass vacuously if it could not see our links
    assert leftovers() == set()
    fabric.close()  # idempotent


def test_a_crashed_runs_leftovers_are_removed() -> None:
    Fabric(2, prefix=PREFIX, subnet=SUBNET).open()  # never closed, as if the test process had died
    with Fabric(1, prefix=PREFIX, subnet=SUBNET) as fabric:
        assert leftovers() == {fabric.bridge, fabric.host_link(0), fabric.netns(0)}
    assert leftovers() == set()


def _transfer(address: str, port: int, command: bytes) -> float:
    """Seconds to move PAYLOAD bytes: b"u" from the root namespace to the node, b"d" the other way."""
    started = time.monotonic()
    with socket.create_connection((address, port), timeout=10) as c:
        if command == b"u":
            c.sendall(b"u" + b"x" * PAYLOAD)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""  # the server closes once it has read everything
        else:
            c.sendall(b"d")
            got = 0
            while chunk := c.recv(1 << 16):
                got += len(chunk)
            assert got == PAYLOAD
    return time.monotonic() - started


def test_limit_slows_both_directions_and_unlimit_removes_it() -> None:
    with Fabric(1, prefix=PREFIX, subnet=SUBNET) as fabric, serve_in(fabric, 0) as port:
        fabric.limit(0, "20mbit")  # 1 MB takes about 0.4 s
        assert "tbf" in run("tc", "qdisc", "show", "dev", fabric.host_link(0)).stdout
        assert "tbf" in run(*fabric.exec_prefix(0), "tc", "qdisc", "show", "dev", "eth0").stdout
        # Lower bounds only: a loaded machine makes transfers slower, never faster than the limit.
        assert _transfer(fabric.address(0), port, b"u") > 0.25
        assert _transfer(fabric.address(0), port, b"d") > 0.25
        fabric.limit(0, "1gbit")  # replacing a limit works too
        fabric.unlimit(0)
        fabric.unlimit(0)  # no limit: nothing to do
        assert "tbf" not in run("tc", "qdisc", "show", "dev", fabric.host_link(0)).stdout
        assert "tbf" not in run(*fabric.exec_prefix(0), "tc", "qdisc", "show", "dev", "eth0").stdout
        _transfer(fabric.address(0), port, b"d")
